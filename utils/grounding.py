"""Visual dependency per completion token: how much the next-token distribution changes when the image is blanked.

For each completion token t, KL(π(·|image, prefix) ‖ π(·|blank image, prefix)): one extra pair of forward passes
without gradients over a training batch, the second with every image replaced by a blank one of the same size (each
image's patches set to its mean colour: the same visual tokens, nothing to see). Attention masses say where the
model looks; this says whether what it says depends on what it sees. A token that copies the answer letter off the
image has a large KL; "<think>" has a KL near 0. Every GROUNDING_EVERY steps (0 = off), and every step when it
drives the token weights (TOKEN_WEIGHT_SOURCE = "visual_kl").

    visual = visual_dependency(model, batch, micro_batch_size, temperature)   # VisualDependency: kl, entropy [B, L]
    metrics = grounding_metrics(visual, batch.completion_mask, masses, pool)   # grounding/*
"""

from dataclasses import dataclass

import torch

from utils import flops, layout
from utils.attention import BUCKETS
from utils.batch import slice_inputs
from utils.logprobs import LOGITS_BUDGET_BYTES, completion_hidden_states

CHANNELS = 3  # Qwen-VL patches are [channel, time, row, column] flattened: channel first


def blank_pixel_values(prompt_inputs):
    """The prompt inputs with each image blanked: every patch of an image set to the image's mean over its pixels,
    per channel (the processor's normalisation is affine per channel, so this is the normalised mean colour). A
    blank image stays as it is; text-only inputs are returned unchanged."""
    if "pixel_values" not in prompt_inputs:
        return prompt_inputs
    pixels, grids = prompt_inputs["pixel_values"], prompt_inputs["image_grid_thw"]
    blank = []
    for patches in pixels.split(grids.prod(-1).tolist()):  # one image's patches [n, C·T·P·P]
        channels = patches.view(len(patches), CHANNELS, -1)
        blank.append(channels.mean((0, 2), keepdim=True).expand_as(channels).reshape(patches.shape))
    return {**prompt_inputs, "pixel_values": torch.cat(blank)}


@dataclass
class VisualDependency:
    """kl: KL(π(·|image) ‖ π(·|blank)) per completion token [B, L] (NaN for a row without images, 0 on padding);
    entropy: the entropy of π(·|image) per token [B, L]."""

    kl: torch.Tensor
    entropy: torch.Tensor


def kl_and_entropy(model, hidden, blank_hidden, temperature, budget_bytes=LOGITS_BUDGET_BYTES):
    """Per token, KL(p ‖ q) and the entropy of p, where p and q are the next-token distributions (at `temperature`)
    from the final hidden states `hidden` and `blank_hidden` [b, L+1, H] (completion_hidden_states). fp32 logits,
    a chunk of the sequence at a time (as utils.logprobs.logprobs_from_hidden). Returns [b, L] each."""
    head = layout.lm_head(model)
    weight = head.weight.float()
    bias = None if head.bias is None else head.bias.float()
    b, L = hidden.shape[0], hidden.shape[1] - 1
    chunk = max(1, budget_bytes // (2 * b * weight.shape[0] * 4))
    flops.count_logits(model, 2 * b * L)
    kls, entropies = [], []
    with torch.autocast(hidden.device.type, enabled=False):
        for start in range(0, L, chunk):
            end = min(start + chunk, L)
            log_p, log_q = (torch.log_softmax(torch.nn.functional.linear(h[:, start:end].float(), weight, bias)
                                              / temperature, -1) for h in (hidden, blank_hidden))
            p = log_p.exp()
            kls.append((p * (log_p - log_q)).sum(-1).clamp(min=0))  # ≥ 0 up to rounding
            entropies.append(-(p * log_p).sum(-1))
    return torch.cat(kls, 1), torch.cat(entropies, 1)


@torch.no_grad()
def visual_dependency(model, batch, micro_batch_size, temperature=1.0):
    """VisualDependency of every completion token of `batch` (a Rollout) under `model`, in micro-batches; on CPU."""
    backbone = layout.backbone(model)
    kls, entropies = [], []
    for start in range(0, len(batch), micro_batch_size):
        rows = slice(start, start + micro_batch_size)
        inputs, ids, mask = slice_inputs(batch.prompt_inputs, rows), batch.completion_ids[rows], \
            batch.completion_mask[rows]
        hidden = completion_hidden_states(backbone, inputs, ids, mask)
        blank = completion_hidden_states(backbone, blank_pixel_values(inputs), ids, mask)
        kl, entropy = kl_and_entropy(model, hidden, blank, temperature)
        kls.append(kl.cpu() * mask)
        entropies.append(entropy.cpu() * mask)
    kl = torch.cat(kls)
    has_image = torch.tensor([bool(n) for n in image_token_counts(batch.prompt_inputs, model)])
    return VisualDependency(kl.masked_fill(~has_image.unsqueeze(1), float("nan")), torch.cat(entropies))


def image_token_counts(prompt_inputs, model):
    """Image tokens in each prompt row [B]."""
    return (prompt_inputs["input_ids"] == model.config.image_token_id).sum(1).tolist()


def correlation(x, y):
    """Pearson correlation of two 1-D tensors; NaN when either is constant or there are fewer than 2 values."""
    if x.numel() < 2:
        return float("nan")
    x, y = x.double() - x.double().mean(), y.double() - y.double().mean()
    denominator = (x.square().sum() * y.square().sum()).sqrt()
    return (x * y).sum().item() / denominator.item() if denominator > 0 else float("nan")


def position_thirds(mask):
    """0, 1 or 2 for each token in the first, middle or last third of its completion (by index / length) [B, L]."""
    length = mask.sum(1, keepdim=True).clamp(min=1)
    index = torch.arange(mask.shape[1]).unsqueeze(0)
    return (3 * index // length).clamp(max=2)


def grounding_metrics(visual, mask, masses=None, pool=None):
    """The grounding/ metrics of a batch, over the valid tokens of the rows with images (pool: as in utils.rl.whiten,
    the rows of every rank): visual_kl_mean, _p50, _p90, _max; visual_kl_first / _middle / _last: the mean over the
    tokens of each third of the completions; corr_entropy: its Pearson correlation with the token's entropy, and
    corr_image_attention with the token's attention mass on image keys (from the bucket masses [layers, B, L, 4],
    averaged over layers; None: not logged). {} when `visual` is None or no row has an image."""
    if visual is None:
        return {}
    pool = pool or (lambda values: values)
    valid = mask.bool() & torch.isfinite(visual.kl)
    kl, thirds = pool(visual.kl[valid]), pool(position_thirds(mask)[valid])
    if kl.numel() == 0:
        return {}
    quantiles = torch.quantile(kl.double(), torch.tensor([0.5, 0.9], dtype=torch.float64)).tolist()
    out = {"grounding/visual_kl_mean": kl.mean().item(), "grounding/visual_kl_p50": quantiles[0],
           "grounding/visual_kl_p90": quantiles[1], "grounding/visual_kl_max": kl.max().item()}
    for third, name in enumerate(("first", "middle", "last")):
        part = kl[thirds == third]
        out[f"grounding/visual_kl_{name}"] = part.mean().item() if part.numel() else float("nan")
    out["grounding/corr_entropy"] = correlation(kl, pool(visual.entropy[valid]))
    if masses is not None:
        image_mass = masses[..., BUCKETS.index("vision")].mean(0)  # [B, L]
        out["grounding/corr_image_attention"] = correlation(kl, pool(image_mass[valid]))
    return out
