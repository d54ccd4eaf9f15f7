"""The update without a separate π_old pass equals the update with one (SPEC §5: π_old is the rollout policy's)."""

import pytest
import torch

from data.synthetic import SyntheticVQA
from utils.generation import Decoding
from utils.logprobs import Passes, batched_logprobs
from utils.model import load_model, load_processor, suppressed_token_ids
from utils.rollout import generate
from utils.update import Targets, needs_old_logprob_pass, policy_update


def test_when_a_separate_old_logprob_pass_is_needed(make_specs):
    once, twice = make_specs().optim, make_specs(PPO_EPOCHS=2).optim
    assert not needs_old_logprob_pass(once, policy_generates=True, attention_before_update=False)
    assert needs_old_logprob_pass(twice, True, False)  # the batch is reused: π_old must stay fixed
    assert needs_old_logprob_pass(make_specs(MINI_BATCHES=2).optim, True, False)
    assert needs_old_logprob_pass(once, False, False)  # a bf16 generation copy (or another device) sampled it
    assert needs_old_logprob_pass(once, True, True)  # VGR token weights / the MDI reward need the masses first


def test_update_without_old_logprob_pass_equals_the_separate_pass(tiny_vlm_path, make_specs):
    processor = load_processor(tiny_vlm_path)
    model = load_model(tiny_vlm_path, "cpu", torch.float32)
    data = SyntheticVQA(3, seed=4, split="test")
    torch.manual_seed(4)
    batch = generate(model, processor, [data[i] for i in range(3)], 4,
                     Decoding(14, temperature=2.0, suppress_ids=suppressed_token_ids(processor.tokenizer)))
    advantages, passes = torch.linspace(-1.5, 1.5, len(batch)), Passes(image_token_id=model.config.image_token_id)
    specs = make_specs(MICRO_BATCH_SIZE=5, MAX_GRAD_NORM=1e9)
    separate_old, separate_masses = batched_logprobs(model, batch, 5, passes)
    results = {}
    for name, logp_old in (("separate", separate_old), ("fused", None)):
        policy = load_model(tiny_vlm_path, "cpu", torch.float32).train()
        before = {n: p.detach().clone() for n, p in policy.named_parameters()}
        optimizer = torch.optim.SGD(policy.parameters(), lr=1.0)
        targets = Targets(advantages, batch.completion_mask.float(), logp_old)
        stats = policy_update(policy, optimizer, batch, targets, specs.loss, specs.optim, passes,
                              warn=lambda *_: None)
        results[name] = stats, {n: p.detach() - before[n] for n, p in policy.named_parameters()}
    (separate, delta_separate), (fused, delta_fused) = results["separate"], results["fused"]
    assert "logp_old" not in separate and fused["logp_mismatch"] == 0.0
    assert fused["loss"] == pytest.approx(separate["loss"], abs=1e-6)
    worst = max((delta_fused[n] - delta_separate[n]).abs().max().item() for n in delta_fused)
    assert worst < 1e-6 and max(d.abs().max().item() for d in delta_fused.values()) > 1e-4
    mask = batch.completion_mask.bool()
    assert torch.allclose(fused["logp_old"][mask], separate_old[mask], atol=1e-6)
    assert torch.allclose(fused["attention_masses"], separate_masses, atol=1e-6)
    with pytest.raises(ValueError, match="used once"):
        policy_update(policy, optimizer, batch, Targets(advantages, batch.completion_mask.float()), specs.loss,
                      make_specs(PPO_EPOCHS=2).optim)
