"""Bucket masses from inside the attention call agree with eager `output_attentions`, and change nothing else."""

import pytest
import torch

from data.synthetic import SyntheticVQA
from utils.attention import BUCKETS, BucketMasses, completion_bucket_masses, key_buckets, row_chunk
from utils.generation import Decoding
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
@pytest.mark.parametrize("budget_bytes", [None, 1])
def test_bucket_masses_match_eager_attention_and_leave_logits_unchanged(tiny_vlm_path, padded, budget_bytes):
    """padded: left-padded prompts and a shorter completion (sdpa gets a mask); else one row (no mask at all).
    budget_bytes=1: one query row per chunk; None: the default budget (one chunk here)."""
    processor = load_processor(tiny_vlm_path)
    model = load_model(tiny_vlm_path, "cpu", torch.float32)
    data = SyntheticVQA(4, seed=5, split="test")
    examples = [data[i] for i in range(4 if padded else 1)]
    if padded:
        examples[1]["problem"] = "Look closely. " + examples[1]["problem"]  # different lengths: left padding
    rollout = generate(model, processor, examples, 1, Decoding(16, greedy=True))
    if padded:
        rollout.completion_mask[2, 6:] = 0  # a shorter completion: right padding inside the batch
        rollout.completion_ids[2, 6:] = processor.tokenizer.pad_token_id
    assert (rollout.prompt_inputs["attention_mask"] == 0).any() == padded
    inputs = full_inputs(rollout.prompt_inputs, rollout.completion_ids, rollout.completion_mask)
    assert model.config.get_text_config().num_key_value_heads < model.config.get_text_config().num_attention_heads

    with torch.no_grad():
        plain = model(**inputs).logits
        image_id = model.config.image_token_id
        budget = {} if budget_bytes is None else {"budget_bytes": budget_bytes}
        with BucketMasses(model, rollout.prompt_inputs, rollout.completion_mask, image_id, **budget) as collector:
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


@pytest.mark.parametrize("mask_kind", ["none", "bool", "additive"])
def test_chunked_bucket_masses_equal_unchunked(mask_kind):
    """A budget of one byte (one query row per chunk) gives what one chunk gives, and both match softmax(q·kᵀ)
    with the keys repeated to the query heads. Grouped-query attention (6 query heads, 2 key heads); "bool" and
    "additive": left padding (rows 1 and 2 start late) through sdpa's two mask types; "none": the is_causal path."""
    torch.manual_seed(0)
    B, H, kv_heads, T, D, first_row, n_rows = 3, 6, 2, 13, 8, 4, 8  # rows 4..11 predict the 8 completion tokens
    query, key = torch.randn(B, H, T, D), torch.randn(B, kv_heads, T, D)
    ids = torch.zeros(B, T, dtype=torch.long)
    ids[:, 3] = 3  # the image token (prompt: positions 0..4)
    valid = torch.ones(B, T, dtype=torch.bool)
    if mask_kind != "none":
        valid[1, :1], valid[2, :2] = False, False
    allowed = torch.ones(T, T, dtype=torch.bool).tril() & valid[:, None, None, :]  # [B, 1, T, T]
    mask = {"none": None, "bool": allowed,
            "additive": torch.zeros(B, 1, T, T).masked_fill(~allowed, torch.finfo(torch.float32).min)}[mask_kind]
    buckets = key_buckets(ids, valid.long(), first_row + 1, image_token_id=3)
    scaling = D**-0.5

    assert row_chunk(B, H, T, D, 1) == 1
    chunked = completion_bucket_masses(query, key, mask, scaling, first_row, n_rows, buckets, budget_bytes=1)
    whole = completion_bucket_masses(query, key, mask, scaling, first_row, n_rows, buckets, budget_bytes=2**40)
    assert torch.allclose(chunked, whole, atol=1e-5)

    k = key.repeat_interleave(H // kv_heads, 1)  # [B, H, T, D]: query head h reads key head h // (H / kv_heads)
    scores = (query @ k.transpose(-1, -2) * scaling).masked_fill(~allowed, float("-inf"))
    probs = scores.softmax(-1)[:, :, first_row : first_row + n_rows].mean(1)  # [B, n_rows, T]
    assert torch.allclose(chunked, probs @ buckets, atol=1e-5)
    assert torch.allclose(chunked.sum(-1), torch.ones(B, n_rows), atol=1e-5)


def constructed_masses():
    """3 layers, 3 samples, 2 completion rows. Sample 0: N_t=4, N_v=16; sample 1: text only; sample 2: its second
    row is padding and holds garbage that must be ignored."""
    masses = torch.zeros(3, 3, 2, 4)
    masses[:, 0] = torch.tensor([0.1, 0.2, 0.5, 0.2])  # sink, vision, text, completion: every layer and row
    masses[2, 0] = torch.tensor([0.1, 0.4, 0.3, 0.2])  # the late layer looks at the image more
    masses[:, 1] = torch.tensor([0.3, 0.0, 0.5, 0.2])
    masses[:, 2, 0] = torch.tensor([0.2, 0.4, 0.4, 0.0])
    masses[:, 2, 1] = torch.tensor([0.0, 0.0, 1.0, 0.0])  # padding row
    completion_mask = torch.tensor([[1, 1], [1, 1], [1, 0]])
    return masses, completion_mask, torch.tensor([4, 10, 8]), torch.tensor([16, 0, 16])


def test_attention_metrics_by_hand():
    from utils.attention import sample_metrics, stage_layers

    assert stage_layers(3) == {"early": [0], "middle": [1], "late": [2], "all": [0, 1, 2]}
    assert stage_layers(4)["early"] == [0, 1] and stage_layers(36)["late"] == list(range(24, 36))
    masses, mask, n_text, n_vision = constructed_masses()
    m = sample_metrics(masses, mask, n_text, n_vision)
    # Sample 0, early: a_T = 0.5, a_V = 0.2, text_ratio = 5/7, share of text tokens 4/20.
    assert m["early"]["text_ratio"][0].item() == pytest.approx(5 / 7)
    assert m["early"]["aei_text"][0].item() == pytest.approx((5 / 7) / 0.2)
    assert m["early"]["aei_vision"][0].item() == pytest.approx((2 / 7) / 0.8)
    assert m["early"]["mdi"][0].item() == pytest.approx((0.5 / 4) / (0.2 / 16))  # = 10
    # Late: a_T = 0.3, a_V = 0.4 -> MDI 3; all layers: a_T = 1.3/3, a_V = 0.8/3 -> MDI (1.3/4)/(0.8/16) = 6.5.
    assert m["late"]["mdi"][0].item() == pytest.approx(3.0)
    assert m["all"]["mdi"][0].item() == pytest.approx(6.5)
    assert m["all"]["sink_ratio"][0].item() == pytest.approx(0.1)
    assert m["all"]["response_ratio"][0].item() == pytest.approx(0.2)
    for stage in m:
        assert torch.allclose(m[stage]["mdi"][[0, 2]], (m[stage]["aei_text"] / m[stage]["aei_vision"])[[0, 2]])
        assert all(torch.isnan(v[1]) for v in m[stage].values())  # the text-only sample
    # Sample 2 ignores its padding row: MDI = (0.4/8)/(0.4/16) = 2.
    assert m["all"]["mdi"][2].item() == pytest.approx(2.0)
    # The sink joins the text bucket when it is not excluded: a_T = 0.6, N_t = 5.
    with_sink = sample_metrics(masses, mask, n_text, n_vision, exclude_sink=False)
    assert with_sink["early"]["mdi"][0].item() == pytest.approx((0.6 / 5) / (0.2 / 16))


def test_batch_attention_metrics():
    from utils.attention import batch_metrics, sample_metrics

    masses, mask, n_text, n_vision = constructed_masses()
    out = batch_metrics(sample_metrics(masses, mask, n_text, n_vision), n_text, n_vision)
    assert out["attention/text_only_count"] == 1
    assert out["attention/vision_tokens"] == pytest.approx(32 / 3)
    assert out["attention/text_tokens"] == pytest.approx(22 / 3)
    # Geometric mean of MDI over the two image samples (6.5 and 2), and the identity for geometric means.
    assert out["attention/all/mdi"] == pytest.approx((6.5 * 2) ** 0.5)
    assert out["attention/all/mdi"] == pytest.approx(out["attention/all/aei_text"] / out["attention/all/aei_vision"])
    assert out["attention/all/mdi_median"] == pytest.approx(4.25)  # the mean of the two middle values
    # Ratios from averaged masses: a_T = mean(1.3/3, 0.4), a_V = mean(0.8/3, 0.4).
    a_t, a_v = (1.3 / 3 + 0.4) / 2, (0.8 / 3 + 0.4) / 2
    assert out["attention/all/text_ratio"] == pytest.approx(a_t / (a_t + a_v))
    assert out["attention/all/vision_ratio"] == pytest.approx(a_v / (a_t + a_v))
    stages = {k.split("/")[1] for k in out if k.count("/") == 2}
    assert stages == {"early", "middle", "late", "all"}


def test_vgr_and_token_weights():
    from utils.attention import token_vgr, token_weights

    masses, mask, n_text, n_vision = constructed_masses()
    vgr = token_vgr(masses, [2], n_text, n_vision)  # late layer only
    assert vgr[0, 0].item() == pytest.approx((0.3 / 4) / (0.4 / 16)) and torch.isnan(vgr[1]).all()
    torch.manual_seed(0)
    vgr = torch.rand(4, 12) * 20 + 0.01
    vgr[0, 3] = 1e-4  # a token that looks almost only at the image: huge raw weight, must be clipped
    mask = (torch.arange(12) < torch.tensor([[12], [7], [3], [1]])).float()
    for smoothing in (0.0, 1.5):
        w = token_weights(vgr, mask, 0.2, 3.0, smoothing)
        means = (w * mask).sum(1) / mask.sum(1)
        assert torch.allclose(means, torch.ones(4), atol=1e-5)
        assert (w[mask.bool()] >= 0.2 - 1e-5).all() and (w[mask.bool()] <= 3.0 + 1e-5).all()
        assert (w[~mask.bool()] == 0).all()
    # Lower VGR (more attention to the image) -> larger weight.
    w = token_weights(torch.tensor([[1.0, 2.0, 4.0]]), torch.ones(1, 3))
    assert w[0, 0] > w[0, 1] > w[0, 2]
    # No finite VGR (text-only prompt): every valid token weighs 1.
    assert torch.equal(token_weights(torch.full((1, 3), float("nan")), torch.tensor([[1.0, 1, 0]])),
                       torch.tensor([[1.0, 1, 0]]))


def test_mdi_reward_by_hand():
    from utils.attention import mdi_reward

    e = torch.tensor(1.0).exp().item()
    mdi = torch.tensor([1.0, e, e**2, e**3, 2.0, float("nan"), 2.0, 2.0])
    r = mdi_reward(mdi, group_sizes=[4, 4])
    # Group 1: ln MDI = 0..3, median 1.5, MAD 1.0 -> z = (1.5 - ln) / 1.4826.
    expected = 0.5 * torch.tanh((1.5 - torch.arange(4.0)) / (1.4826 + 1e-6))
    assert torch.allclose(r[:4], expected, atol=1e-5)
    assert r[0] > 0 > r[3]  # the sample that looked at the image most is rewarded
    assert r[5] == 0 and torch.allclose(r[[4, 6, 7]], torch.zeros(3))  # undefined -> 0; equal values -> 0
    # Groups of different sizes (after top-up sampling) are normalised each on their own.
    uneven = mdi_reward(torch.cat([mdi[:4], torch.tensor([1.0, e**2])]), group_sizes=[4, 2])
    assert torch.allclose(uneven[:4], expected, atol=1e-5)
    assert torch.allclose(uneven[4:], 0.5 * torch.tanh(torch.tensor([1.0, -1.0]) / (1.4826 + 1e-6)), atol=1e-5)


def test_add_mdi_reward_adds_the_weighted_reward_to_the_total():
    from types import SimpleNamespace

    from utils.attention import add_mdi_reward, mdi_reward

    e = torch.tensor(1.0).exp().item()
    mdi = torch.tensor([1.0, e, e**2, e**3, 1.0, e**2])
    total = torch.arange(6.0)
    batch = SimpleNamespace(rewards={"total": total.clone()}, group_sizes=[4, 2])
    attention = {"all": {"mdi": mdi}}
    assert add_mdi_reward(batch, attention, 0.0, pool=lambda x: x) == {}  # W_MDI = 0: nothing happens
    assert set(batch.rewards) == {"total"} and torch.equal(batch.rewards["total"], total)
    metrics = add_mdi_reward(batch, attention, 0.5, pool=lambda x: x)
    expected = mdi_reward(mdi, [4, 2])
    assert torch.equal(batch.rewards["mdi"], expected)
    assert torch.allclose(batch.rewards["total"], total + 0.5 * expected)
    assert metrics == {"reward/mdi/mean": pytest.approx(expected.mean().item())}
