"""bf16-mixed training (utils/precision.py): fp32 master weights and AdamW state, bf16 compute, bf16 inference copies;
and the image size limits (MIN_PIXELS / MAX_PIXELS)."""

import pytest
import torch
from PIL import Image

from data.synthetic import SyntheticVQA
from utils.generation import Decoding
from utils.logprobs import Passes, batched_logprobs
from utils.model import load_model, load_processor, make_rollout_model, set_pixel_limits, sync_rollout_model
from utils.precision import autocast, inference_dtype, resolve_precision
from utils.rollout import generate
from utils.update import Targets, policy_update


def rollout_batch(model, processor, seed=0):
    data = SyntheticVQA(3, seed=seed, split="test")
    torch.manual_seed(seed)
    return generate(model, processor, [data[i] for i in range(3)], 4, Decoding(12, temperature=1.5))


@pytest.fixture
def update_specs(make_specs):
    return make_specs(MICRO_BATCH_SIZE=6, MAX_GRAD_NORM=1e9)


def one_update(policy, rollout_model, batch, precision, advantages, specs, lr=1e-6):
    """One AdamW step of policy_update in `precision`, π_old from `rollout_model`. Returns (stats, optimizer)."""
    logp_old, _ = batched_logprobs(rollout_model, batch, 16)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=lr, weight_decay=0.0)
    targets = Targets(advantages, batch.completion_mask.float(), logp_old)
    stats = policy_update(policy, optimizer, batch, targets, specs.loss, specs.optim, Passes(precision=precision),
                          warn=lambda *_: None)
    return stats, optimizer


def test_resolve_precision():
    assert resolve_precision("auto", "cpu") == "fp32" and resolve_precision("auto", "cuda:0") == "bf16-mixed"
    assert resolve_precision("bf16-mixed", "cpu") == "bf16-mixed" and inference_dtype("fp32") == torch.float32
    with pytest.raises(ValueError, match="PRECISION='bf16'"):
        resolve_precision("bf16", "cpu")  # pure-bf16 training is not offered


def test_bf16_mixed_moves_fp32_master_weights_at_a_tiny_learning_rate(tiny_vlm_path, update_specs):
    processor = load_processor(tiny_vlm_path)
    policy = load_model(tiny_vlm_path, "cpu", torch.float32).train()
    rollout_model = make_rollout_model(policy, "cpu", inference_dtype("bf16-mixed"))
    assert rollout_model is not policy and next(rollout_model.parameters()).dtype == torch.bfloat16
    batch = rollout_batch(rollout_model, processor)
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    stats, optimizer = one_update(policy, rollout_model, batch, "bf16-mixed", torch.linspace(-1, 1, len(batch)),
                                  update_specs)
    assert stats["updates"] == 1
    changed = sum(int((p.detach() != before[n]).sum()) for n, p in policy.named_parameters())
    total = sum(p.numel() for p in policy.parameters())
    assert changed / total >= 0.99, f"only {changed / total:.1%} of the fp32 weights moved at lr 1e-6"
    assert all(p.dtype == torch.float32 for p in policy.parameters())
    state = [s for s in optimizer.state.values()]
    assert state and all(s["exp_avg"].dtype == s["exp_avg_sq"].dtype == torch.float32 for s in state)
    # A bf16 copy cannot hold those steps: rounding the moved weights to bf16 gives back mostly the old values.
    sync_rollout_model(policy, rollout_model)
    kept = sum(int((q == before[n].to(torch.bfloat16)).sum()) for (n, _), q in
               zip(policy.named_parameters(), rollout_model.parameters()))
    assert kept / total > 0.5
    # The generation copy and the policy differ numerically (bf16 vs fp32 logits): the first micro-batch shows it.
    assert stats["logp_mismatch"] > 1e-5


def test_logp_mismatch_is_zero_for_one_fp32_model(tiny_vlm_path, update_specs):
    processor = load_processor(tiny_vlm_path)
    policy = load_model(tiny_vlm_path, "cpu", torch.float32).train()
    assert make_rollout_model(policy, "cpu", inference_dtype("fp32")) is policy  # the policy generates itself
    batch = rollout_batch(policy, processor, seed=1)
    stats, _ = one_update(policy, policy, batch, "fp32", torch.linspace(-1, 1, len(batch)), update_specs)
    assert stats["logp_mismatch"] < 1e-6


def test_bf16_mixed_loss_agrees_with_fp32(tiny_vlm_path, update_specs):
    processor = load_processor(tiny_vlm_path)
    reference = load_model(tiny_vlm_path, "cpu", torch.float32)
    batch = rollout_batch(reference, processor, seed=2)
    advantages = torch.ones(len(batch))  # loss ≈ -1: a relative comparison is meaningful
    results = {}
    for precision in ("fp32", "bf16-mixed"):
        policy = load_model(tiny_vlm_path, "cpu", torch.float32).train()
        results[precision], _ = one_update(policy, reference, batch, precision, advantages, update_specs, lr=0.0)
    fp32, mixed = results["fp32"], results["bf16-mixed"]
    assert fp32["loss"] == pytest.approx(-1.0, abs=1e-5)  # ratio 1 in fp32
    assert mixed["loss"] == pytest.approx(fp32["loss"], rel=2e-2) and mixed["loss"] != fp32["loss"]
    assert mixed["entropy"] == pytest.approx(fp32["entropy"], rel=5e-2)


def test_autocast_runs_matrix_products_in_bf16_on_fp32_weights():
    layer = torch.nn.Linear(8, 8)
    x = torch.randn(2, 8)
    with autocast("bf16-mixed", "cpu"):
        assert layer(x).dtype == torch.bfloat16
    with autocast("fp32", "cpu"):
        assert layer(x).dtype == torch.float32
    assert layer.weight.dtype == torch.float32


def qwen_like_image_processor(**size):
    """Qwen2.5-VL's image processor settings (patch 14, merge 2), as a hub checkpoint's preprocessor_config gives
    them: up to 12,845,056 pixels per image (16,384 visual tokens)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(patch_size=14, merge_size=2, temporal_patch_size=2,
                                    size={"shortest_edge": 3136, "longest_edge": 12_845_056, **size})


def visual_tokens(image_processor, image):
    grid = image_processor(images=[image], return_tensors="pt")["image_grid_thw"][0]
    return int(grid.prod()) // image_processor.merge_size**2


@pytest.mark.parametrize("max_pixels, most_tokens", [(0, 1280), (200 * 28 * 28, 200), (16_384 * 28 * 28, 16_384)])
def test_max_pixels_bounds_the_visual_tokens_of_a_large_image(max_pixels, most_tokens):
    image_processor = qwen_like_image_processor()
    set_pixel_limits(image_processor, 0, max_pixels)
    tokens = visual_tokens(image_processor, Image.new("RGB", (1000, 1000), "white"))
    assert tokens <= most_tokens and tokens >= 0.8 * min(most_tokens, 1000 * 1000 // 784)
    # MIN_PIXELS scales a small image up.
    set_pixel_limits(image_processor, 64 * 28 * 28, max_pixels)
    assert visual_tokens(image_processor, Image.new("RGB", (56, 56), "white")) >= 64


def test_pixel_limits_of_the_embedded_processor(tiny_vlm_path):
    processor = load_processor(tiny_vlm_path)  # 0 / 0: its own limits, 56x56 images give 16 visual tokens
    assert (processor.image_processor.size.shortest_edge, processor.image_processor.size.longest_edge) == (784, 12544)
    raised = load_processor(tiny_vlm_path, max_pixels=40_000)
    tokens = visual_tokens(raised.image_processor, Image.new("RGB", (1000, 1000), "white"))
    assert 150 <= tokens <= 40_000 // 196
    with pytest.raises(ValueError, match="MIN_PIXELS"):
        load_processor(tiny_vlm_path, min_pixels=50_000, max_pixels=40_000)
