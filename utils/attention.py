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
one is registered with it); grouped-query attention (keys are repeated to the query heads); left padding (the
sink is the first *valid* prompt token of each row).
"""

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

BUCKETS = ("sink", "vision", "text", "completion")
NAME = "sdpa_bucket_masses"
_active = []  # the BucketMasses collecting right now (at most one)


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


class BucketMasses:
    """Context manager that records the bucket masses of one forward pass of `model` (see module docstring)."""

    def __init__(self, model, prompt_inputs, completion_mask, image_token_id):
        self.model = model
        ids = torch.cat([prompt_inputs["input_ids"], torch.zeros_like(completion_mask)], 1)
        mask = torch.cat([prompt_inputs["attention_mask"], completion_mask], 1)
        prompt_length, length = prompt_inputs["input_ids"].shape[1], completion_mask.shape[1]
        device = next(model.parameters()).device
        self.buckets = key_buckets(ids, mask, prompt_length, image_token_id).to(device)  # [B, T, 4]
        self.rows = torch.arange(prompt_length - 1, prompt_length - 1 + length, device=device)  # predict token t
        self.row_mask = completion_mask.to(device).float()  # [B, L]
        self.per_layer = {}

    @torch.no_grad()
    def record(self, module, query, key, attention_mask, scaling):
        q = query[:, :, self.rows].float()  # [B, H, L, D]
        k = repeat_kv(key, query.shape[1] // key.shape[1]).float()  # [B, H, T, D]
        scores = torch.einsum("bhld,bhtd->bhlt", q, k) * scaling
        if attention_mask is None:  # sdpa's is_causal path: no padding in the batch
            allowed = torch.ones(scores.shape[-2:], dtype=torch.bool, device=q.device).tril(int(self.rows[0]))
        elif attention_mask.dtype == torch.bool:
            allowed = attention_mask[:, :, self.rows]
        else:
            allowed = attention_mask[:, :, self.rows] > torch.finfo(attention_mask.dtype).min / 2
        probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1).nan_to_num()  # [B, H, L, T]
        masses = torch.einsum("bhlt,btk->blk", probs, self.buckets) / probs.shape[1]  # mean over heads
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
