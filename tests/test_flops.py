"""FLOP accounting (utils/flops.py): the per-token constants by hand for the tiny VLM's config, the counts of the
passes against PyTorch's own FLOP counter, the peak lookup, and the MFU metrics of a run."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from data.synthetic import SyntheticVQA
from utils import flops, layout
from utils.generation import Decoding
from utils.logprobs import completion_logprobs
from utils.model import load_model, load_processor, suppressed_token_ids
from utils.rollout import generate


@pytest.fixture(scope="module")
def tiny(tiny_vlm_path):
    return load_model(tiny_vlm_path, "cpu", torch.float32), load_processor(tiny_vlm_path)


def test_per_token_constants_by_hand(tiny):
    model, _ = tiny
    f = flops.model_flops(layout.backbone(model))
    # The tiny VLM's decoder: 4 layers of width 128, 4 query heads and 2 key/value heads of 32, MLP 384 (SwiGLU).
    per_layer = 128 * 128 + 2 * (128 * 64) + 128 * 128 + 3 * (128 * 384)  # q, k and v, o, gate / up / down
    assert f.decoder == 2 * 4 * per_layer
    assert f.attention == 4 * 4 * 32 * 4  # q·k and the sum over v, per (query, key) pair, in each of 4 layers
    # Vision: 2 blocks of width 64 (block 1 full attention, block 0 windows of (112 / 7)² = 256 patches), merge 2×2.
    assert (f.full_blocks, f.windowed_blocks, f.window_patches, f.merge) == (1, 1, 256, 4)
    assert f.vision_attention == 4 * 64
    # count_suffix by hand: one row of 2 tokens after 5 cached ones attends 6 + 7 keys.
    flops.take()
    with torch.no_grad():
        flops.count_suffix(layout.backbone(model), torch.tensor([5]), torch.tensor([2]))
    assert flops.take() == 2 * f.decoder + 13 * f.attention
    with torch.enable_grad():  # with gradients: forward and backward, 3×
        flops.count_logits(model, 10)
    assert flops.take() == 3 * 2 * 128 * 448 * 10


def test_counts_agree_with_pytorchs_flop_counter(tiny):
    """Our counts against torch.utils.flop_counter on the same calls: generation, a teacher-forced pass, and a
    pass with its backward. They differ by what each leaves out (norms, the windowed attention's exact pairs, the
    patch embedding's input gradient, which nothing needs); a factor-2 slip would not pass."""
    model, processor = tiny
    data = SyntheticVQA(4, seed=1, split="test")
    decoding = Decoding(12, greedy=True, suppress_ids=suppressed_token_ids(processor.tokenizer))
    flops.take()
    with FlopCounterMode(display=False) as counter:
        rollout = generate(model, processor, [data[i] for i in range(4)], 3, decoding)
    assert flops.take() == pytest.approx(counter.get_total_flops(), rel=0.15)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        completion_logprobs(model, rollout.prompt_inputs, rollout.completion_ids, rollout.completion_mask)
    assert flops.take() == pytest.approx(counter.get_total_flops(), rel=0.15)
    with FlopCounterMode(display=False) as counter:
        logp, _ = completion_logprobs(model, rollout.prompt_inputs, rollout.completion_ids, rollout.completion_mask)
        logp.sum().backward()
    assert flops.take() == pytest.approx(counter.get_total_flops(), rel=0.25)


def test_peak_flops(tmp_path, monkeypatch):
    assert flops.peak_flops("cpu", "fp32", override_tflops=2.5) == 2.5e12
    measured = flops.peak_flops("cpu", "fp32", cache_dir=str(tmp_path))
    assert 1e8 < measured < 1e14  # a CPU: between 0.1 GFLOP/s and 100 TFLOP/s
    assert (tmp_path / "cpu_peak_flops.json").exists()
    assert flops.peak_flops("cpu", "fp32", cache_dir=str(tmp_path)) == measured  # cached
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    assert flops.peak_flops("cuda:0", "bf16-mixed") == 989e12 and flops.peak_flops("cuda:0", "fp32") == 67e12
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some Future GPU")
    assert flops.peak_flops("cuda:0", "bf16-mixed") is None  # unknown: no MFU, unless PEAK_TFLOPS says
