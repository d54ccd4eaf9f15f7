"""The embedded model, its processor, and the log-prob machinery against generation."""

import pytest
import torch

from data.synthetic import SyntheticVQA
from utils import layout
from utils.batch import concat_inputs, slice_inputs
from utils.generation import Decoding
from utils.logprobs import batched_logprobs, completion_logprobs
from utils.model import load_model, load_processor, suppressed_token_ids
from utils.rollout import generate


def examples(n, seed=0):
    """n held-out examples; every other one with a longer question, so that batches are left-padded."""
    data = SyntheticVQA(n, seed=seed, split="test")
    out = [data[i] for i in range(n)]
    for ex in out[1::2]:
        ex["problem"] = "Look at the image. " + ex["problem"]
    return out


def assert_logprobs_match_generation(model, processor, n_prompts=4, max_new_tokens=12):
    """Teacher-forced log-probs of greedy completions equal the scores generate() saw at each step."""
    rollout = generate(model, processor, examples(n_prompts), 1, Decoding(max_new_tokens, greedy=True))
    assert (rollout.prompt_inputs["attention_mask"] == 0).any(), "the check needs left padding"
    out = model.generate(**rollout.prompt_inputs, max_new_tokens=max_new_tokens, do_sample=False, output_scores=True,
                         return_dict_in_generate=True, pad_token_id=processor.tokenizer.pad_token_id)
    ids = rollout.completion_ids
    scores = torch.log_softmax(torch.stack(out.scores, 1).float(), -1)  # [B, L, V]
    expected = scores[:, : ids.shape[1]].gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    logp, entropy = completion_logprobs(model, rollout.prompt_inputs, ids, rollout.completion_mask, with_entropy=True)
    mask = rollout.completion_mask.bool()
    assert torch.allclose(logp[mask], expected[mask], atol=1e-4)
    assert (entropy[mask] >= 0).all() and (entropy[mask] <= torch.log(torch.tensor(scores.shape[-1]))).all()


def test_teacher_forced_logprobs_match_generation(tiny_vlm_path):
    """Left-padded prompts of different lengths; one forward pass reproduces generation's log-probs."""
    assert_logprobs_match_generation(load_model(tiny_vlm_path, "cpu", torch.float32), load_processor(tiny_vlm_path))


def test_micro_batches_give_the_same_logprobs(tiny_vlm_path):
    processor = load_processor(tiny_vlm_path)
    model = load_model(tiny_vlm_path, "cpu", torch.float32)
    rollout = generate(model, processor, examples(5, seed=1), 2, Decoding(10))
    whole, no_masses = batched_logprobs(model, rollout, micro_batch_size=10)
    split, _ = batched_logprobs(model, rollout, micro_batch_size=3)
    assert no_masses is None  # masses only with an image token id (Passes)
    mask = rollout.completion_mask.bool()
    assert torch.allclose(whole[mask], split[mask], atol=1e-5)
    rows = [slice_inputs(rollout.prompt_inputs, slice(0, 4)), slice_inputs(rollout.prompt_inputs, slice(4, 10))]
    joined = concat_inputs(rows)
    assert torch.equal(joined["pixel_values"], rollout.prompt_inputs["pixel_values"])


def test_sampling_never_emits_vision_tokens_and_groups_are_contiguous(tiny_vlm_path):
    processor = load_processor(tiny_vlm_path)
    model = load_model(tiny_vlm_path, "cpu", torch.float32)
    batch = examples(3, seed=2)
    decoding = Decoding(16, temperature=3.0, suppress_ids=suppressed_token_ids(processor.tokenizer))
    rollout = generate(model, processor, batch, 4, decoding)
    assert len(rollout) == 12 and [ex["problem"] for ex in rollout.examples[:4]] == [batch[0]["problem"]] * 4
    banned = torch.tensor(suppressed_token_ids(processor.tokenizer))
    assert not torch.isin(rollout.completion_ids[rollout.completion_mask.bool()], banned).any()
    # The mask ends at the first end token; truncated rows have none.
    lengths = rollout.completion_mask.sum(1)
    assert ((lengths == rollout.completion_ids.shape[1]) | ~rollout.truncated).all()


def test_processor_round_trip(tiny_vlm_path, tmp_path):
    processor = load_processor(tiny_vlm_path)
    processor.save_pretrained(tmp_path)
    again = load_processor(str(tmp_path))
    batch = examples(2)
    from data.prompts import encode_prompts

    a, b = encode_prompts(processor, batch), encode_prompts(again, batch)
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["pixel_values"], b["pixel_values"])
    assert again.tokenizer.padding_side == "left"
    # White pixels map to 0 (the tiny model's normalisation).
    assert a["pixel_values"].max().item() == 0.0


def _update_delta(make_specs, model_path, batch, micro_batch_size, advantages, aggregation="token"):
    """Parameter change of one policy_update with plain SGD (lr 1): minus the gradient, exactly."""
    from utils.update import Targets, policy_update

    specs = make_specs(CLIP_EPS_LOW=0.2, CLIP_EPS_HIGH=0.28, KL_BETA=0.0, ENTROPY_COEF=0.0,
                       LOSS_AGGREGATION=aggregation, PPO_EPOCHS=1, MINI_BATCHES=1, MICRO_BATCH_SIZE=micro_batch_size,
                       MAX_GRAD_NORM=1e9)
    model = load_model(model_path, "cpu", torch.float32)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    logp_old, _ = batched_logprobs(model, batch, 16)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    targets = Targets(advantages, batch.completion_mask.float(), logp_old=logp_old)
    stats = policy_update(model, optimizer, batch, targets, specs.loss, specs.optim, warn=lambda *_: None)
    return {n: p.detach() - before[n] for n, p in model.named_parameters()}, stats


def test_policy_update_does_not_depend_on_micro_batch_size(tiny_vlm_path, make_specs):
    processor = load_processor(tiny_vlm_path)
    model = load_model(tiny_vlm_path, "cpu", torch.float32)
    torch.manual_seed(0)  # the same batch whichever tests ran before
    batch = generate(model, processor, examples(3, seed=3), 4, Decoding(14, temperature=2.0))  # lengths differ a lot
    advantages = torch.linspace(-1.5, 1.5, len(batch))
    whole, stats_whole = _update_delta(make_specs, tiny_vlm_path, batch, 12, advantages)
    split, stats_split = _update_delta(make_specs, tiny_vlm_path, batch, 5, advantages)
    assert stats_whole["loss"] == pytest.approx(stats_split["loss"], abs=1e-6)
    worst = max((whole[n] - split[n]).abs().max().item() for n in whole)
    assert worst < 1e-6 and max(d.abs().max().item() for d in whole.values()) > 1e-4


def test_non_finite_loss_skips_the_step(tiny_vlm_path, make_specs):
    processor = load_processor(tiny_vlm_path)
    batch = generate(load_model(tiny_vlm_path, "cpu", torch.float32), processor, examples(2), 2, Decoding(8))
    advantages = torch.tensor([1.0, float("nan"), 0.5, -1.0])
    delta, stats = _update_delta(make_specs, tiny_vlm_path, batch, 4, advantages)
    assert stats["skipped_updates"] == 1 and stats["updates"] == 0
    assert all((d == 0).all() for d in delta.values())


def qwen2_vl_checkpoint(path):
    """Save a tiny random Qwen2-VL (not 2.5) with the embedded processor into `path`."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    from utils.tiny_vlm import RECIPE, SPECIAL_TOKENS, build_processor, train_tokenizer

    tokenizer = train_tokenizer(RECIPE["vocab_size"])
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    config = Qwen2VLConfig(
        text_config={"vocab_size": 448, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                     "num_attention_heads": 4, "num_key_value_heads": 2, "eos_token_id": ids["<|im_end|>"],
                     "pad_token_id": ids["<|endoftext|>"],
                     "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}},
        vision_config={"depth": 1, "embed_dim": 32, "hidden_size": 64, "num_heads": 2, "patch_size": 7},
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )
    torch.manual_seed(0)
    Qwen2VLForConditionalGeneration(config).save_pretrained(path)
    build_processor(tokenizer, 7, 56).save_pretrained(path)
    return str(path)


def test_a_qwen2_vl_checkpoint_works_too(tmp_path):
    """Qwen2-VL (not 2.5): saved, loaded through load_model / load_processor, log-probs match generation."""
    from transformers import Qwen2VLForConditionalGeneration

    path = qwen2_vl_checkpoint(tmp_path)
    model, processor = load_model(path, "cpu", torch.float32), load_processor(path)
    assert isinstance(model, Qwen2VLForConditionalGeneration)
    assert_logprobs_match_generation(model, processor, max_new_tokens=6)


def test_shared_prompt_pass_gives_the_same_logprobs_and_gradients(tiny_vlm_path):
    """completion_hidden_states runs each group's prompt once; log-probs and gradients equal one pass per row."""
    from utils.logprobs import completion_hidden_states, full_inputs, logprobs_from_hidden

    processor = load_processor(tiny_vlm_path)
    model = load_model(tiny_vlm_path, "cpu", torch.float32).train()
    torch.manual_seed(0)
    # Left-padded prompts, completions of different lengths.
    batch = generate(model, processor, examples(3, seed=5), 3, Decoding(14, temperature=2.0))
    rows = [0, 1, 2, 3, 4, 6, 7, 8]  # groups of 3, 2 and 2 rows
    inputs, ids, mask = slice_inputs(batch.prompt_inputs, rows), batch.completion_ids[rows], batch.completion_mask[rows]
    m = mask.bool()

    def loss_and_grads(hidden_fn):
        model.zero_grad()
        logp, entropy = logprobs_from_hidden(model, hidden_fn(), ids, 1.5, with_entropy=True)
        (logp[m].sum() + 0.1 * entropy[m].sum()).backward()
        return logp.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    backbone = layout.backbone(model)

    def one_pass_per_row():
        return backbone(**full_inputs(inputs, ids, mask), use_cache=False).last_hidden_state[:, -(ids.shape[1] + 1) :]

    shared, shared_grads = loss_and_grads(lambda: completion_hidden_states(backbone, inputs, ids, mask))
    whole, whole_grads = loss_and_grads(one_pass_per_row)
    assert torch.allclose(shared[m], whole[m], atol=1e-5)
    for n, g in whole_grads.items():  # fp32 summation order differs: within 1e-5 of each tensor's scale
        assert (shared_grads[n] - g).abs().max() <= 1e-5 * g.abs().max() + 1e-8, n
