"""FLOP accounting: the model FLOPs each phase of a step does, and model FLOPs utilisation (MFU) against the device.

Model FLOPs are counted from the model's own weights and the tokens it runs on, at the two places every forward pass
goes through: the decoder (utils.generation.sample_completions: prefill and each decode step; utils.logprobs.
completion_hidden_states: every teacher-forced pass) and the LM head (logprobs_from_hidden, the grounding pass).
Per valid token (padding not counted: it is overhead, which MFU should show):

* decoder: 2 FLOPs per weight of its linear layers (multiply and add), plus attention: 4·heads·head_dim per layer for
  each (query, key) pair it attends to (q·k and the weighted sum of v), causal;
* vision tower, per image patch: 2 per weight of its patch embedding and blocks, attention 4·width per block for each
  pair of patches in the block's window (the whole image for full-attention blocks), and the merger's 2 per weight
  per merged token;
* LM head: 2·hidden·vocab per position whose logits are computed.

A pass with gradients costs 3× its forward (the backward computes the gradients of the inputs and of the weights),
4× with the forward recomputed (gradient checkpointing, the chunked LM head). RMS norms, rotary embeddings, softmax
and the sampling are left out: a few per cent for these widths.

    flops.take()                                # the FLOPs counted since the last take (StepTimer.lap takes them)
    peak_flops(device, precision, override)     # the device's peak, FLOP/s
"""

import json
import os
import platform
import time

import torch

from utils import layout

_counted = [0.0]  # FLOPs counted since the last take()

# Dense peaks in TFLOP/s (no sparsity) by GPU name: (bf16 tensor cores with fp32 accumulation, fp32 without TF32).
GPU_PEAK_TFLOPS = {"H200": (989.0, 67.0), "H100": (989.0, 67.0), "A100": (312.0, 19.5), "L40S": (362.0, 91.6),
                   "4090": (165.2, 82.6)}


def take():
    """The FLOPs counted since the last call (every rank counts its own)."""
    value, _counted[0] = _counted[0], 0.0
    return value


def _grad_factor(checkpointed=False):
    return (4.0 if checkpointed else 3.0) if torch.is_grad_enabled() else 1.0


class ModelFlops:
    """The per-token FLOP constants of one model, from its weights and config (computed once per backbone)."""

    def __init__(self, backbone):
        config = backbone.config
        text = config.get_text_config()
        linear = lambda module: sum(m.weight.numel() for m in module.modules()  # noqa: E731
                                    if isinstance(m, torch.nn.Linear))
        layers = layout.decoder_layers(backbone)
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        self.decoder = 2.0 * sum(linear(layer) for layer in layers)
        self.attention = 4.0 * text.num_attention_heads * head_dim * len(layers)
        tower, vision = layout.vision_tower(backbone), config.vision_config
        embed = tower.patch_embed.proj.weight.numel()
        self.patch = 2.0 * (embed + sum(linear(block) for block in layout.vision_blocks(backbone)))
        self.merged_token = 2.0 * linear(layout.vision_merger(backbone))
        self.merge = vision.spatial_merge_size ** 2
        width = getattr(vision, "hidden_size", None) or vision.embed_dim
        self.vision_attention = 4.0 * width
        window = getattr(vision, "window_size", None)  # Qwen2.5-VL: windowed blocks but for fullatt_block_indexes
        full = getattr(vision, "fullatt_block_indexes", None)
        depth = len(layout.vision_blocks(backbone))
        self.full_blocks = depth if window is None or full is None else len(full)
        self.windowed_blocks = depth - self.full_blocks
        self.window_patches = (window // vision.patch_size) ** 2 if self.windowed_blocks else None

    def images(self, grid_thw):
        """Vision tower FLOPs for images of grid_thw [n, 3] (t·h·w patches each)."""
        total = 0.0
        for patches in grid_thw.prod(-1).tolist():
            window = patches if self.window_patches is None else min(patches, self.window_patches)
            pairs = patches * (self.full_blocks * patches + self.windowed_blocks * window)
            total += patches * self.patch + patches / self.merge * self.merged_token + self.vision_attention * pairs
        return total

    def decode(self, tokens, pairs):
        """Decoder FLOPs of `tokens` tokens attending `pairs` (query, key) pairs in all."""
        return tokens * self.decoder + pairs * self.attention


def model_flops(backbone):
    """The ModelFlops of a backbone, computed on first use and kept on it."""
    flops = backbone.__dict__.get("_model_flops")
    if flops is None:
        flops = backbone.__dict__["_model_flops"] = ModelFlops(backbone)
    return flops


def count_prompts(backbone, prompt_inputs, exclude_last=False):
    """Count a forward over left-padded prompts [n, P] (their valid tokens, causal; their images). exclude_last:
    the last prompt token is left out (it runs with the completion)."""
    f = model_flops(backbone)
    lengths = prompt_inputs["attention_mask"].sum(1).double() - float(exclude_last)
    pairs = (lengths * (lengths + 1) / 2).sum().item()
    total = f.decode(lengths.sum().item(), pairs)
    if "image_grid_thw" in prompt_inputs:
        total += f.images(prompt_inputs["image_grid_thw"])
    _counted[0] += total * _grad_factor(getattr(backbone, "is_activation_checkpointing", False))


def count_suffix(backbone, prompt_lengths, suffix_lengths):
    """Count suffixes run against cached prompts: row i runs suffix_lengths[i] tokens after prompt_lengths[i] cached
    ones (each token attends the cache, the suffix so far and itself). [b] tensors."""
    f = model_flops(backbone)
    p, s = prompt_lengths.double(), suffix_lengths.double()
    pairs = (s * p + s * (s + 1) / 2).sum().item()
    _counted[0] += f.decode(s.sum().item(), pairs) * _grad_factor(getattr(backbone, "is_activation_checkpointing",
                                                                           False))


def count_logits(model, positions, checkpointed=False):
    """Count the LM head over `positions` positions."""
    head = layout.lm_head(model).weight
    _counted[0] += 2.0 * head.numel() * positions * _grad_factor(checkpointed)


_PEAK_CACHE = {}


def measured_cpu_peak(windows=10, seconds=0.03, size=1024, cache_dir=None):
    """FLOP/s of fp32 matrix products on this CPU with torch's current threads: the best of `windows` short runs of a
    square matmul (the best, so that a moment of load elsewhere does not lower it). Cached per CPU, thread count and
    torch version in cache_dir/cpu_peak_flops.json (delete it to measure again, on a quiet machine)."""
    key = f"{platform.processor() or platform.machine()}|{os.cpu_count()} cores|{torch.get_num_threads()} threads|" \
          f"torch {torch.__version__}"
    path = os.path.join(cache_dir, "cpu_peak_flops.json") if cache_dir else None
    stored = json.load(open(path)) if path and os.path.exists(path) else {}
    best = stored.get(key) or _PEAK_CACHE.get(key)
    if best is None:
        a, b = torch.randn(size, size), torch.randn(size, size)
        a @ b  # warm-up
        best = 0.0
        for _ in range(windows):
            start, runs = time.perf_counter(), 0
            while time.perf_counter() - start < seconds:
                a @ b
                runs += 1
            best = max(best, 2.0 * size**3 * runs / (time.perf_counter() - start))
    _PEAK_CACHE[key] = best
    if path and key not in stored:
        os.makedirs(cache_dir, exist_ok=True)
        with open(path, "w") as f:
            json.dump({**stored, key: best}, f, indent=1)
    return best


def peak_flops(device, precision, override_tflops=0.0, cache_dir=None):
    """The peak FLOP/s that MFU divides by: `override_tflops` when set; on a GPU, the dense peak of its kind from
    GPU_PEAK_TFLOPS (bf16 under bf16-mixed, else fp32), None for a GPU not in the table; on a CPU, measured
    (measured_cpu_peak)."""
    if override_tflops:
        return override_tflops * 1e12
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peaks = next((v for k, v in GPU_PEAK_TFLOPS.items() if k in name), None)
        return None if peaks is None else peaks[0 if precision == "bf16-mixed" else 1] * 1e12
    return measured_cpu_peak(cache_dir=cache_dir)
