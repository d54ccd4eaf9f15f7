"""Bucket masses from inside the attention call agree with eager `output_attentions`, and change nothing else."""

import pytest
import torch

from data.synthetic import SyntheticVQA
from utils.attention import BUCKETS, BucketMasses, key_buckets
from utils.logprobs import full_inputs
from utils.model import load_model, load_processor
from utils.rollout import generate


def test_key_buckets_by_hand():
    # Row 0 is left-padded by one; prompt length 5 (image token id 9), then 2 completion tokens (1 padding).
    ids = torch.tensor([[0, 3, 9, 9, 4, 7, 0], [3, 9, 4, 4, 4, 7, 7]])
    mask = torch.tensor([[0, 1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1, 1]])
    buckets = key_buckets(ids, mask, prompt_length=5, image_token_id=9)
    names = [[BUCKETS[k] if row.any() else "-" for k in [int(row.argmax())]][0] for row in buckets[0]]
    assert names == ["-", "sink", "vision", "vision", "text", "completion", "-"]
    names = [BUCKETS[int(row.argmax())] for row in buckets[1]]
    assert names == ["sink", "vision", "text", "text", "text", "completion", "completion"]
    assert buckets.sum(-1).tolist() == mask.float().tolist()  # one bucket per real token, none for padding


def reference_masses(attentions, buckets, prompt_length, completion_mask):
    """The same quantity from the full eager attention maps: [layers, B, L, 4]."""
    length = completion_mask.shape[1]
    out = []
    for layer in attentions:  # [B, H, T, T]
        rows = layer[:, :, prompt_length - 1 : prompt_length - 1 + length].mean(1)  # [B, L, T]
        out.append(torch.einsum("blt,btk->blk", rows, buckets) * completion_mask.unsqueeze(-1))
    return torch.stack(out)


@pytest.mark.parametrize("padded", [True, False])
def test_bucket_masses_match_eager_attention_and_leave_logits_unchanged(tiny_vlm_path, padded):
    """padded: left-padded prompts and a shorter completion (sdpa gets a mask); else one row (no mask at all)."""
    processor = load_processor(tiny_vlm_path)
    model = load_model(tiny_vlm_path, "cpu", torch.float32)
    data = SyntheticVQA(4, seed=5, split="test")
    examples = [data[i] for i in range(4 if padded else 1)]
    if padded:
        examples[1]["problem"] = "Look closely. " + examples[1]["problem"]  # different lengths: left padding
    rollout = generate(model, processor, examples, 1, 16, greedy=True)
    if padded:
        rollout.completion_mask[2, 6:] = 0  # a shorter completion: right padding inside the batch
        rollout.completion_ids[2, 6:] = processor.tokenizer.pad_token_id
    assert (rollout.prompt_inputs["attention_mask"] == 0).any() == padded
    inputs = full_inputs(rollout.prompt_inputs, rollout.completion_ids, rollout.completion_mask)
    assert model.config.get_text_config().num_key_value_heads < model.config.get_text_config().num_attention_heads

    with torch.no_grad():
        plain = model(**inputs).logits
        image_id = model.config.image_token_id
        with BucketMasses(model, rollout.prompt_inputs, rollout.completion_mask, image_id) as collector:
            hooked = model(**inputs).logits
        eager = load_model(tiny_vlm_path, "cpu", torch.float32)
        eager.set_attn_implementation("eager")
        reference = eager(**inputs, output_attentions=True)

    assert model.config.get_text_config()._attn_implementation == "sdpa"  # restored
    assert torch.allclose(plain, hooked, atol=1e-5)
    masses = collector.values  # [layers, B, L, 4]
    layers = model.config.get_text_config().num_hidden_layers
    assert masses.shape == (layers, len(examples), rollout.completion_ids.shape[1], 4)
    buckets = key_buckets(inputs["input_ids"], inputs["attention_mask"], rollout.prompt_inputs["input_ids"].shape[1],
                          image_id)
    expected = reference_masses(reference.attentions, buckets, rollout.prompt_inputs["input_ids"].shape[1],
                                rollout.completion_mask.float())
    assert torch.allclose(masses, expected, atol=1e-5)
    valid = rollout.completion_mask.bool()
    assert torch.allclose(masses.sum(-1)[:, valid], torch.ones(layers, int(valid.sum())), atol=1e-5)
    assert (masses[..., 1][:, valid] > 0).all()  # every completion row looks at the image a little
