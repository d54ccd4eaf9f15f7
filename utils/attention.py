"""Attention bucket masses, computed inside the attention call (SPEC §6), without `output_attentions`.

For every decoder layer and every query row that predicts a completion token, the attention mass (averaged over
heads) on four buckets of keys: the first prompt token (the attention sink), image tokens (V), the other prompt
tokens (T) and earlier completion tokens (G). The model keeps its fast attention kernel: a wrapper around sdpa
recomputes softmax(q·kᵀ) for the completion rows only, under no_grad, and stores [B, L, 4] per layer.

    with BucketMasses(model, prompt_inputs, completion_mask, image_token_id) as masses:
        model(**inputs)
    masses.values  # [layers, B, L, 4] with buckets in BUCKETS order; rows of padding are 0

Pitfalls handled: the vision tower calls attention too (only modules with a `layer_idx`, the decoder layers,
are recorded); a custom attention function needs a mask function too, or padding would be ignored (the sdpa
one is registered with it); grouped-query attention (the query heads are grouped by their key head, so the
keys are not copied per query head); left padding (the sink is the first *valid* prompt token of each row).

Memory: the fp32 scores of all completion rows at once would be [B, heads, L, T] — 19 GB per layer call at a 7B
shape (28 heads, batch 8, 4,096 completion + 1,100 prompt tokens). They are computed in chunks of query rows
sized so that the fp32 copy of the keys ([B, kv_heads, T, D]; none if they are fp32 already) and one chunk's
transients (scores, mask, queries) stay under RECORD_BUDGET_BYTES, plus the [B, L, 4] result. (At least one
row per chunk: past ~16k keys at that shape the keys alone exceed the budget.)
"""

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from utils.distributed import compute_device

BUCKETS = ("sink", "vision", "text", "completion")
NAME = "sdpa_bucket_masses"
_active = []  # the BucketMasses collecting right now (at most one)
RECORD_BUDGET_BYTES = 256 * 2**20  # transient memory of one record() call (one layer), bytes; sets the row chunk


def _attention(module, query, key, value, attention_mask, **kwargs):
    """sdpa, plus the bucket masses of the completion rows when a BucketMasses is collecting."""
    out = sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    if _active and getattr(module, "layer_idx", None) is not None:
        _active[-1].record(module, query, key, attention_mask, kwargs.get("scaling"))
    return out


def _register():
    AttentionInterface.register(NAME, _attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)  # without a mask function, padding would be ignored


def key_buckets(input_ids, attention_mask, prompt_length, image_token_id):
    """One-hot bucket of every key position: [B, T, 4] (sink, vision, text, completion); padding is all zeros."""
    valid = attention_mask.bool()
    position = torch.arange(input_ids.shape[1], device=input_ids.device)
    in_prompt = position < prompt_length
    first_valid = valid.int().argmax(1, keepdim=True)  # left padding: the sink is the first real token
    sink = valid & (position == first_valid)
    vision = valid & in_prompt & (input_ids == image_token_id)
    text = valid & in_prompt & ~sink & ~vision
    completion = valid & ~in_prompt
    return torch.stack([sink, vision, text, completion], -1).float()


def row_chunk(batch, heads, keys, head_dim, budget_bytes):
    """Query rows per chunk of completion_bucket_masses: fp32 scores [B, heads, rows, keys], the bool mask
    [B, rows, keys] and fp32 queries [B, heads, rows, head_dim] stay under budget_bytes (at least one row)."""
    per_row = batch * (heads * keys * 4 + keys + heads * head_dim * 4)
    return max(1, budget_bytes // per_row)


@torch.no_grad()
def completion_bucket_masses(query, key, attention_mask, scaling, first_row, n_rows, buckets,
                             budget_bytes=RECORD_BUDGET_BYTES):
    """Attention mass of query rows first_row .. first_row+n_rows-1 on each key bucket, averaged over heads:
    [B, n_rows, 4].

    query [B, H, T, D]; key [B, H_kv, T, D] (H = H_kv·G: query head h reads key head h // G); attention_mask: the
    one sdpa got ([B, 1, T, T] bool or additive float) or None (sdpa's is_causal path: no padding); buckets
    [B, T, 4] (key_buckets). softmax(q·kᵀ·scaling) in fp32, in chunks of rows (row_chunk) sized so that the
    fp32 keys and one chunk stay under budget_bytes. Fully masked rows give 0.
    """
    B, H, _, D = query.shape
    kv_heads, T = key.shape[1], key.shape[2]
    groups = H // kv_heads
    keys_t = key.float().transpose(-1, -2)  # [B, H_kv, D, T]
    out = torch.empty(B, n_rows, 4, device=query.device)
    key_copy = 0 if key.dtype == torch.float32 else key.numel() * 4  # keys_t is a new tensor unless fp32
    chunk = row_chunk(B, H, T, D, budget_bytes - key_copy)
    for start in range(0, n_rows, chunk):
        rows = slice(first_row + start, first_row + min(start + chunk, n_rows))
        n = rows.stop - rows.start
        q = query[:, :, rows].float().reshape(B, kv_heads, groups * n, D)  # heads of a key head together
        scores = torch.matmul(q, keys_t).mul_(scaling).view(B, H, n, T)  # query head h = kv head · G + g
        del q
        if attention_mask is None:
            blocked = torch.ones(n, T, dtype=torch.bool, device=query.device).triu_(rows.start + 1)
        elif attention_mask.dtype == torch.bool:
            blocked = ~attention_mask[:, :, rows]  # [B, 1, n, T]
        else:
            blocked = attention_mask[:, :, rows] <= torch.finfo(attention_mask.dtype).min / 2
        scores.masked_fill_(blocked, float("-inf"))
        del blocked
        scores.sub_(scores.amax(-1, keepdim=True)).exp_()  # softmax in place: one [B, H, n, T] buffer
        scores.div_(scores.sum(-1, keepdim=True)).nan_to_num_(0.0)  # fully masked rows: 0/0 -> 0
        out[:, start : start + n] = torch.matmul(scores.view(B, H * n, T), buckets).view(B, H, n, 4).mean(1)
        del scores  # before the next chunk's scores are allocated, not after
    return out


class BucketMasses:
    """Context manager that records the bucket masses of one forward pass of `model` (see module docstring)."""

    def __init__(self, model, prompt_inputs, completion_mask, image_token_id, budget_bytes=RECORD_BUDGET_BYTES):
        self.model, self.budget_bytes = model, budget_bytes
        ids = torch.cat([prompt_inputs["input_ids"], torch.zeros_like(completion_mask)], 1)
        mask = torch.cat([prompt_inputs["attention_mask"], completion_mask], 1)
        prompt_length = prompt_inputs["input_ids"].shape[1]
        device = compute_device(model)
        self.buckets = key_buckets(ids, mask, prompt_length, image_token_id).to(device)  # [B, T, 4]
        self.first_row = prompt_length - 1  # query row first_row + t predicts completion token t
        self.row_mask = completion_mask.to(device).float()  # [B, L]
        self.per_layer = {}

    def record(self, module, query, key, attention_mask, scaling):
        offset = key.shape[2] - query.shape[2]  # > 0: the prompt ran before, from a shared KV cache (utils/logprobs.py)
        if key.shape[2] != self.buckets.shape[1]:  # that shared prompt's own pass: no completion rows
            return
        if offset and attention_mask is None:  # causal over the whole sequence: query row r is position r + offset
            attention_mask = torch.ones(query.shape[2], key.shape[2], dtype=torch.bool, device=query.device)
            attention_mask = attention_mask.tril_(offset)[None, None]
        masses = completion_bucket_masses(query, key, attention_mask, scaling, self.first_row - offset,
                                          self.row_mask.shape[1], self.buckets, self.budget_bytes)
        self.per_layer[module.layer_idx] = masses * self.row_mask.unsqueeze(-1)

    @property
    def values(self):
        """[layers, B, L, 4]: mass on (sink, vision, text, completion) per decoder layer and completion row."""
        return torch.stack([self.per_layer[i] for i in sorted(self.per_layer)])

    def __enter__(self):
        _register()
        config = self.model.config.get_text_config()
        self._previous = config._attn_implementation_internal
        config._attn_implementation_internal = NAME
        _active.append(self)
        return self

    def __exit__(self, *exc):
        _active.remove(self)
        self.model.config.get_text_config()._attn_implementation_internal = self._previous
        return False


# ── Metrics (SPEC §6; Wu et al., arXiv:2508.10552) ──────────────────────────────────────────────────
SINK, VISION, TEXT, COMPLETION = range(4)
STAGES = ("early", "middle", "late", "all")


def stage_layers(n_layers):
    """{stage: layer indices}: early / middle / late thirds of the decoder layers (earlier thirds get the
    remainder), and all of them."""
    thirds = [t.tolist() for t in torch.arange(n_layers).tensor_split(3)]
    return dict(zip(STAGES, thirds + [list(range(n_layers))]))


def text_and_vision(masses, n_text, n_vision, exclude_sink=True):
    """(a_T, a_V, N_t) from masses [..., 4] and counts; with exclude_sink=False the sink joins the text bucket."""
    a_text, a_vision = masses[..., TEXT], masses[..., VISION]
    if not exclude_sink:
        a_text, n_text = a_text + masses[..., SINK], n_text + 1
    return a_text, a_vision, n_text


def sample_metrics(masses, completion_mask, n_text, n_vision, exclude_sink=True):
    """Per-sample metrics per stage: {stage: {metric: [B]}}.

    masses: [layers, B, L, 4] (BucketMasses.values); completion_mask: [B, L]; n_text, n_vision: [B] token counts
    (n_text without the sink). a_X = mass on bucket X averaged over heads (already), valid rows, then the stage's
    layers. text_ratio = a_T/(a_T+a_V); AEI_text = text_ratio/(N_t/(N_t+N_v)), AEI_vision likewise;
    MDI = (a_T/N_t)/(a_V/N_v) = AEI_text/AEI_vision. Text-only prompts (N_v = 0) give NaN.
    """
    mask = completion_mask.to(masses.dtype).unsqueeze(-1)  # [B, L, 1]
    per_layer = (masses * mask).sum(2) / mask.sum(1).clamp(min=1)  # [layers, B, 4]
    n_text, n_vision = n_text.to(masses.dtype), n_vision.to(masses.dtype)
    out = {}
    for stage, layers in stage_layers(masses.shape[0]).items():
        m = per_layer[layers].mean(0)  # [B, 4]
        a_text, a_vision, n_t = text_and_vision(m, n_text, n_vision, exclude_sink)
        text_ratio = a_text / (a_text + a_vision)
        share_text = n_t / (n_t + n_vision)
        metrics = {
            "a_text": a_text, "a_vision": a_vision, "sink_ratio": m[:, SINK], "response_ratio": m[:, COMPLETION],
            "text_ratio": text_ratio, "vision_ratio": 1 - text_ratio,
            "aei_text": text_ratio / share_text, "aei_vision": (1 - text_ratio) / (1 - share_text),
            "mdi": (a_text / n_t) / (a_vision / n_vision),
        }
        text_only = n_vision == 0
        out[stage] = {k: v.masked_fill(text_only, float("nan")) for k, v in metrics.items()}
    return out


def geometric_mean(values):
    """Geometric mean of the finite positive entries of the tensor `values`, in its dtype (NaN when there are
    none)."""
    values = values[torch.isfinite(values) & (values > 0)]
    return values.log().mean().exp().item() if len(values) else float("nan")


def batch_metrics(per_sample, n_text, n_vision):
    """`attention/<stage>/<metric>` for metrics.jsonl. Ratios come from masses averaged over the samples (never
    from averaged ratios); AEI and MDI are geometric means over samples (so mdi = aei_text / aei_vision holds
    for the batch too), plus the MDI median. Text-only samples are left out and counted."""
    text_only = torch.isnan(per_sample["all"]["mdi"])
    keep = ~text_only
    out = {"attention/text_only_count": int(text_only.sum()), "attention/vision_tokens": n_vision.float().mean().item(),
           "attention/text_tokens": n_text.float().mean().item()}
    for stage, m in per_sample.items():
        if not keep.any():
            for name in ("text_ratio", "vision_ratio", "sink_ratio", "response_ratio", "aei_text", "aei_vision",
                         "mdi", "mdi_median"):
                out[f"attention/{stage}/{name}"] = float("nan")
            continue
        a_text, a_vision = m["a_text"][keep].mean(), m["a_vision"][keep].mean()
        out[f"attention/{stage}/text_ratio"] = (a_text / (a_text + a_vision)).item()
        out[f"attention/{stage}/vision_ratio"] = (a_vision / (a_text + a_vision)).item()
        out[f"attention/{stage}/sink_ratio"] = m["sink_ratio"][keep].mean().item()
        out[f"attention/{stage}/response_ratio"] = m["response_ratio"][keep].mean().item()
        for name in ("aei_text", "aei_vision", "mdi"):
            out[f"attention/{stage}/{name}"] = geometric_mean(m[name][keep])
        out[f"attention/{stage}/mdi_median"] = m["mdi"][keep].quantile(0.5).item()
    return out


def token_vgr(masses, layers, n_text, n_vision, exclude_sink=True):
    """VGR per completion token: the token-level MDI over `layers`. [layers, B, L, 4] -> [B, L] (NaN if N_v = 0)."""
    m = masses[layers].mean(0)  # [B, L, 4]
    n_text, n_vision = n_text.to(m.dtype).unsqueeze(1), n_vision.to(m.dtype).unsqueeze(1)
    a_text, a_vision, n_t = text_and_vision(m, n_text, n_vision, exclude_sink)
    return (a_text / n_t) / (a_vision / n_vision)


def gaussian_smooth(values, mask, sigma):
    """Mask-aware Gaussian smoothing along the sequence: smooth(v·m) / smooth(m). values, mask: [B, L]."""
    radius = max(1, int(3 * sigma))
    offsets = torch.arange(-radius, radius + 1, dtype=values.dtype)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2).view(1, 1, -1)
    num = torch.nn.functional.conv1d((values * mask).unsqueeze(1), kernel, padding=radius).squeeze(1)
    den = torch.nn.functional.conv1d(mask.unsqueeze(1), kernel, padding=radius).squeeze(1)
    return num / den.clamp(min=1e-12)


def token_weights(vgr, mask, low=0.2, high=3.0, smoothing=0.0, source="vgr", rounds=20):
    """Loss weights from VGR (SPEC §6): u = 1/(VGR + 1e-6) — or with source "visual_kl", `vgr` holds each token's
    visual dependency (utils.grounding) and u is it —, optional mask-aware Gaussian smoothing (σ = `smoothing`
    tokens), divided by its mean over each sequence's valid tokens, clipped to [low, high] and renormalised to mean 1
    (clip and renormalise repeat until both hold). Sequences without a finite value (or whose u is 0 throughout) get
    weight 1. vgr, mask: [B, L]; returns [B, L], 0 on padding."""
    mask = mask.to(vgr.dtype)
    finite = torch.isfinite(vgr)
    signal = 1.0 / (vgr.clamp(min=0) + 1e-6) if source == "vgr" else vgr.clamp(min=0)
    u = torch.where(finite, signal, torch.ones_like(vgr)) * mask
    no_signal = ~(finite & mask.bool()).any(1, keepdim=True) | ((u * mask).sum(1, keepdim=True) <= 0)
    u = torch.where(no_signal, mask, u)
    if smoothing > 0:
        u = gaussian_smooth(u, mask, smoothing) * mask
    mean = lambda x: (x * mask).sum(1, keepdim=True) / mask.sum(1, keepdim=True).clamp(min=1)  # noqa: E731
    u = u / mean(u).clamp(min=1e-12)
    for _ in range(rounds):
        u = u.clamp(low, high) * mask
        u = u / mean(u).clamp(min=1e-12)
        if ((u <= high + 1e-6) | (mask == 0)).all() and ((u >= low - 1e-6) | (mask == 0)).all():
            break
    return u * mask


def mdi_reward(mdi, group_sizes, eps=1e-6):
    """Group-relative MDI reward: z_i = (median_g ln MDI − ln MDI_i) / (1.4826·MAD_g + eps), r_i = 0.5·tanh(z_i);
    lower MDI (more attention to the image) than the group's median is rewarded. 0 where MDI is undefined.
    mdi: [B] (contiguous groups of group_sizes rows) -> [B]."""
    out = []
    for row in mdi.log().split(list(group_sizes)):  # [n] each
        reward = torch.zeros_like(row)
        valid = torch.isfinite(row)
        if valid.any():
            median = row[valid].quantile(0.5)  # the mean of the two middle values for even counts
            mad = (row[valid] - median).abs().quantile(0.5)
            reward[valid] = 0.5 * torch.tanh((median - row[valid]) / (1.4826 * mad + eps))
        out.append(reward)
    return torch.cat(out)


def add_mdi_reward(batch, attention, weight, pool):
    """The MDI reward (W_MDI = `weight`; 0: nothing happens): each completion's group-relative reward from its
    MDI (mdi_reward over batch.group_sizes), stored as batch.rewards["mdi"] and added, weighted, to
    batch.rewards["total"]. attention: the per-sample metrics of attention_summary; pool: as there.
    Returns {"reward/mdi/mean": mean over the rows of every rank}, or {} with weight 0."""
    if not weight:
        return {}
    batch.rewards["mdi"] = mdi_reward(attention["all"]["mdi"], batch.group_sizes)
    batch.rewards["total"] = batch.rewards["total"] + weight * batch.rewards["mdi"]
    return {"reward/mdi/mean": pool(batch.rewards["mdi"]).mean().item()}


def prompt_token_counts(prompt_inputs, image_token_id):
    """(N_t, N_v) per prompt: text tokens without the sink (the first real token), and image tokens. [B] each."""
    valid = prompt_inputs["attention_mask"].bool()
    n_vision = ((prompt_inputs["input_ids"] == image_token_id) & valid).sum(1)
    return valid.sum(1) - n_vision - 1, n_vision


def per_row(per_sample):
    """{stage: {metric: [B]}} -> [{stage: {metric: float}}] (one dict per completion, for the markdown logs)."""
    n = len(next(iter(per_sample.values()))["mdi"])
    return [{stage: {k: v[i].item() for k, v in m.items()} for stage, m in per_sample.items()} for i in range(n)]


def token_weight_metrics(weights, mask, pool=None):
    """policy/token_weight_{mean,std,min,max} over the valid tokens. pool: maps this batch's valid weights to those
    the metrics run over (utils.distributed.rank_rows: every rank's)."""
    w = weights[mask.bool()]
    w = pool(w) if pool is not None else w
    return {"policy/token_weight_mean": w.mean().item(), "policy/token_weight_std": w.std().item(),
            "policy/token_weight_min": w.min().item(), "policy/token_weight_max": w.max().item()}


def attention_summary(masses, prompt_inputs, completion_mask, image_token_id, exclude_sink=True, vgr_layers="late",
                      pool=None):
    """Everything the trainers take from a batch's bucket masses: (per-sample metrics {stage: {metric: [B]}},
    VGR [B, L] over the `vgr_layers` stage, the batch's `attention/*` metrics). (None, None, {}) without masses.
    pool: maps the per-sample values to those the batch metrics run over (utils.distributed.rank_rows: the rows of
    every rank)."""
    if masses is None:
        return None, None, {}
    n_text, n_vision = prompt_token_counts(prompt_inputs, image_token_id)  # [B] each
    per_sample = sample_metrics(masses, completion_mask, n_text, n_vision, exclude_sink)
    vgr = token_vgr(masses, stage_layers(masses.shape[0])[vgr_layers], n_text, n_vision, exclude_sink)
    pool = pool or (lambda value: value)
    return per_sample, vgr, batch_metrics(pool(per_sample), pool(n_text), pool(n_vision))
