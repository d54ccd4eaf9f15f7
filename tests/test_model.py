"""The embedded model, its processor, and the log-prob machinery against generation."""

import torch

from data.synthetic import SyntheticVQA
from utils.logprobs import batched_logprobs, completion_logprobs
from utils.model import load_model, load_processor, suppressed_token_ids
from utils.rollout import concat_inputs, generate, slice_inputs


def examples(n, seed=0):
    data = SyntheticVQA(n, seed=seed, split="test")
    return [data[i] for i in range(n)]


def test_teacher_forced_logprobs_match_generation(tiny_vlm_path):
    """Left-padded prompts of different lengths; log-probs from one forward pass equal generate()'s scores."""
    processor = load_processor(tiny_vlm_path)
    model = load_model(tiny_vlm_path, "cpu", torch.float32)
    batch = examples(4)
    rollout = generate(model, processor, batch, 1, 12, greedy=True)
    inputs = {k: v for k, v in rollout.prompt_inputs.items()}
    assert (inputs["attention_mask"] == 0).any(), "the test needs left padding"
    out = model.generate(**inputs, max_new_tokens=12, do_sample=False, output_scores=True,
                         return_dict_in_generate=True, pad_token_id=processor.tokenizer.pad_token_id)
    scores = torch.log_softmax(torch.stack(out.scores, 1).float(), -1)  # [B, L, V]
    ids = rollout.completion_ids
    expected = scores[:, : ids.shape[1]].gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    logp, entropy = completion_logprobs(model, rollout.prompt_inputs, ids, rollout.completion_mask, with_entropy=True)
    mask = rollout.completion_mask.bool()
    assert torch.allclose(logp[mask], expected[mask], atol=1e-4)
    assert (entropy[mask] >= 0).all() and (entropy[mask] <= torch.log(torch.tensor(scores.shape[-1]))).all()


def test_micro_batches_give_the_same_logprobs(tiny_vlm_path):
    processor = load_processor(tiny_vlm_path)
    model = load_model(tiny_vlm_path, "cpu", torch.float32)
    rollout = generate(model, processor, examples(5, seed=1), 2, 10)
    args = (rollout.prompt_inputs, rollout.completion_ids, rollout.completion_mask)
    whole = batched_logprobs(model, *args, micro_batch_size=10)
    split = batched_logprobs(model, *args, micro_batch_size=3)
    mask = rollout.completion_mask.bool()
    assert torch.allclose(whole[mask], split[mask], atol=1e-5)
    rows = [slice_inputs(rollout.prompt_inputs, slice(0, 4)), slice_inputs(rollout.prompt_inputs, slice(4, 10))]
    joined = concat_inputs(rows)
    assert torch.equal(joined["pixel_values"], rollout.prompt_inputs["pixel_values"])


def test_sampling_never_emits_vision_tokens_and_groups_are_contiguous(tiny_vlm_path):
    processor = load_processor(tiny_vlm_path)
    model = load_model(tiny_vlm_path, "cpu", torch.float32)
    batch = examples(3, seed=2)
    rollout = generate(model, processor, batch, 4, 16, temperature=3.0, suppress_ids=suppressed_token_ids(processor.tokenizer))
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
