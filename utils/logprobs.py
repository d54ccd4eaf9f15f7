"""Teacher-forced per-token log-probs and exact entropy of completions."""

import contextlib
from dataclasses import dataclass

import torch

from utils import flops, layout
from utils.attention import BucketMasses
from utils.batch import slice_inputs
from utils.distributed import compute_device
from utils.generation import prompt_positions

LOGITS_BUDGET_BYTES = 256 * 2**20  # fp32 logits of one chunk of logprobs_from_hidden, bytes; sets the chunk length


def full_inputs(prompt_inputs, completion_ids, completion_mask):
    """Prompt + completion as one model input. mm_token_type_ids is extended with zeros over the completion:
    without it Qwen2.5-VL silently computes wrong (text-only) rope positions and log-probs stop matching
    generation."""
    inputs = dict(prompt_inputs)
    inputs["input_ids"] = torch.cat([prompt_inputs["input_ids"], completion_ids], 1)
    inputs["attention_mask"] = torch.cat([prompt_inputs["attention_mask"], completion_mask], 1)
    if "mm_token_type_ids" in prompt_inputs:
        inputs["mm_token_type_ids"] = torch.cat(
            [prompt_inputs["mm_token_type_ids"], torch.zeros_like(completion_ids)], 1
        )
    return inputs


def prompt_runs(prompt_inputs):
    """First row of each run of identical consecutive prompts (a group's G rows are one run). Returns
    (first rows [n], run lengths [n]) as python lists."""
    ids, mask = prompt_inputs["input_ids"], prompt_inputs["attention_mask"]
    same = ((ids[1:] == ids[:-1]) & (mask[1:] == mask[:-1])).all(1).tolist()  # row i+1 has row i's text
    if "pixel_values" in prompt_inputs:  # ... and its images (a text-only row has none)
        rows = [slice_inputs(prompt_inputs, [i]) for i in range(len(ids))]
        images = [(r.get("pixel_values"), r.get("image_grid_thw")) for r in rows]
        same = [s and all(a is b or (a is not None and b is not None and torch.equal(a, b))
                          for a, b in zip(images[i + 1], images[i])) for i, s in enumerate(same)]
    firsts = [0] + [i + 1 for i, s in enumerate(same) if not s]
    return firsts, [b - a for a, b in zip(firsts, firsts[1:] + [len(ids)])]


def fsdp_sharded(module):
    """Whether FSDP2 shards `module` or any of its submodules."""
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in module.modules())


def completion_hidden_states(backbone, prompt_inputs, completion_ids, completion_mask):
    """Final hidden states of the last L+1 positions of prompt + completion: position t predicts completion token
    t (the last one predicts past the end). backbone: the decoder of a Qwen-VL model (utils.layout.backbone).

    Rows that share a prompt (the G completions of a group) share its forward pass: each distinct prompt (image
    encoding included) runs once, its KV cache is copied to its rows, and only the last prompt token and the
    completion run per row. Gradients through the shared prompt are the sum over its rows, as with one pass per
    row. Every row runs whole with gradient checkpointing in training (transformers drops the cache) and with
    gradients through an FSDP2-sharded model (the gradient reaches the prompt's layers through the cache, not their
    outputs, so FSDP's backward hooks would not gather their weights).

    prompt_inputs: processor batch [b, P]; completion_ids, completion_mask: [b, L]. Returns [b, L+1, H].
    """
    device = compute_device(backbone)
    length = completion_ids.shape[1]
    whole_rows = backbone.is_activation_checkpointing and backbone.training
    if whole_rows or (torch.is_grad_enabled() and fsdp_sharded(backbone)):
        inputs = {k: v.to(device) for k, v in full_inputs(prompt_inputs, completion_ids, completion_mask).items()}
        flops.count_prompts(backbone, inputs)
        return backbone(**inputs, use_cache=False).last_hidden_state[:, -(length + 1) :]
    firsts, sizes = prompt_runs(prompt_inputs)
    prompts = {k: v.to(device) for k, v in slice_inputs(prompt_inputs, firsts).items()}  # [n, P'], n distinct
    flops.count_prompts(backbone, prompts, exclude_last=True)  # each distinct prompt once; then each row's suffix:
    flops.count_suffix(backbone, prompt_inputs["attention_mask"].sum(1) - 1, completion_mask.sum(1) + 1)
    rows = torch.repeat_interleave(torch.arange(len(firsts), device=device), torch.tensor(sizes, device=device))
    positions, next_position = prompt_positions(backbone, prompts)  # [3, n, P'], [n]
    prefix = {k: v[:, :-1] for k, v in prompts.items() if k in ("input_ids", "attention_mask", "mm_token_type_ids")}
    images = {k: v for k, v in prompts.items() if k in ("pixel_values", "image_grid_thw")}
    cache = backbone(**prefix, **images, position_ids=positions[:, :, :-1], use_cache=True).past_key_values
    cache.batch_select_indices(rows)  # each prompt's keys and values to its rows (a differentiable gather)
    # The last prompt token (it predicts completion token 0) and the completion, per row: text positions.
    suffix_ids = torch.cat([prompts["input_ids"][rows, -1:], completion_ids.to(device)], 1)  # [b, L+1]
    attention_mask = torch.cat([prompts["attention_mask"][rows], completion_mask.to(device)], 1)  # [b, P'+L]
    suffix_positions = (next_position[rows] - 1).unsqueeze(1) + torch.arange(length + 1, device=device)  # [b, L+1]
    out = backbone(input_ids=suffix_ids, attention_mask=attention_mask,
                   position_ids=suffix_positions.unsqueeze(0).expand(3, -1, -1), past_key_values=cache, use_cache=True)
    return out.last_hidden_state


def logprobs_from_hidden(model, hidden, completion_ids, temperature=1.0, with_entropy=False,
                         budget_bytes=LOGITS_BUDGET_BYTES):
    """Log-prob of each completion token (and the exact entropy of each next-token distribution) from
    completion_hidden_states: hidden [b, L+1, H], completion_ids [b, L]. Returns logp [b, L], entropy [b, L] or None.
    Logits are divided by the sampling temperature so that log-probs are those of the sampling policy.

    The logits are fp32 (hidden and lm_head weight cast to fp32, autocast off): a bf16 LM head makes training and
    sampling probabilities disagree (MiniMax-M1). They are never held whole ([b, L, vocab] fp32 is 20 GB for 8 x
    4,096 tokens of Qwen's 151,936-token vocabulary): the sequence is cut into chunks whose logits stay under
    budget_bytes, and with gradients the backward recomputes each chunk's logits and adds its share of the lm_head
    weight's gradient into one buffer (ChunkedLogprobs).
    """
    hidden = hidden[:, :-1]  # [b, L, H]; position t predicts token t
    completion_ids = completion_ids.to(hidden.device)
    head = layout.lm_head(model)
    weight = head.weight.float()  # [V, H]; a no-op for fp32 weights
    bias = None if head.bias is None else head.bias.float()
    b, L, _ = hidden.shape
    chunk = max(1, budget_bytes // (b * weight.shape[0] * 4))  # tokens per chunk
    with_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    with torch.set_grad_enabled(with_grad):
        flops.count_logits(model, b * L, checkpointed=True)  # with gradients, each chunk's logits run twice
    with torch.autocast(hidden.device.type, enabled=False):
        logp, entropy = ChunkedLogprobs.apply(hidden, weight, bias, completion_ids, temperature, chunk, with_entropy)
    return logp, entropy if with_entropy else None


class ChunkedLogprobs(torch.autograd.Function):
    """log_softmax((h·Wᵀ + b) / T) gathered at the tokens, and the entropy, a chunk of positions at a time, in fp32.

    Forward keeps no logits. Backward recomputes the log-probs of half a chunk at a time and turns them in place into
    the logits' gradient, g·(onehot − p) from the log-probs and −g_H·p·(log p + H) from the entropy (/T), then adds
    that part's share of the weight's gradient into one [V, H] buffer: memory beyond the weight's gradient stays at
    about one chunk of logits. (Autograd summing a gradient per checkpointed chunk held up to three copies of it:
    6.1 GiB for Qwen2.5-VL-7B's lm_head, benchmarks/logprob_memory.py.)"""

    @staticmethod
    def forward(ctx, hidden, weight, bias, ids, temperature, chunk, with_entropy):
        ctx.save_for_backward(hidden, weight, bias, ids)
        ctx.temperature, ctx.chunk = temperature, chunk
        ctx.set_materialize_grads(False)  # an entropy left out of the loss gets no gradient (None), and no work
        logp, entropy = [], []
        for start in range(0, hidden.shape[1], chunk):
            log_probs = _chunk_log_probs(hidden[:, start : start + chunk], weight, bias, temperature)
            logp.append(log_probs.gather(-1, ids[:, start : start + chunk].unsqueeze(-1)).squeeze(-1))
            entropy.append(_entropy(log_probs) if with_entropy else torch.zeros_like(logp[-1]))
            del log_probs
        return torch.cat(logp, 1), torch.cat(entropy, 1)

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        hidden, weight, bias, ids = ctx.saved_tensors
        want_hidden, want_weight, want_bias = ctx.needs_input_grad[:3]
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        grad_weight = torch.zeros_like(weight) if want_weight else None
        grad_bias = torch.zeros_like(bias) if want_bias else None
        chunk = max(1, ctx.chunk // 2)  # half the forward's: the entropy's gradient holds two [b, c, V] tensors
        for start in range(0, hidden.shape[1], chunk):
            part = slice(start, start + chunk)
            h = hidden[:, part].float()
            log_probs = _chunk_log_probs(h, weight, bias, ctx.temperature)  # [b, c, V]
            g = grad_logp[:, part].unsqueeze(-1) if grad_logp is not None else torch.zeros_like(log_probs[..., :1])
            if grad_entropy is not None:  # d/dz of (g·log p_y + g_H·H) = g·onehot − p·(g + g_H·(log p + H))
                g_h = grad_entropy[:, part].unsqueeze(-1)
                coef = log_probs.add(_entropy(log_probs).unsqueeze(-1)).mul_(g_h).add_(g)
                grad_logits = log_probs.exp_().mul_(coef).neg_()
                del coef
            else:  # g·onehot − p·g
                grad_logits = log_probs.exp_().mul_(-g)
            grad_logits.scatter_add_(-1, ids[:, part].unsqueeze(-1), g).div_(ctx.temperature)
            if want_hidden:
                grad_hidden[:, part] = (grad_logits @ weight).to(hidden.dtype)
            if want_weight:
                grad_weight.addmm_(grad_logits.flatten(0, 1).T, h.flatten(0, 1))
            if want_bias:
                grad_bias.add_(grad_logits.sum((0, 1)))
            del grad_logits, log_probs
        return grad_hidden, grad_weight, grad_bias, None, None, None, None


def _chunk_log_probs(h, weight, bias, temperature):
    """fp32 log-softmax of one chunk's logits / temperature, [b, c, V]."""
    return torch.log_softmax(torch.nn.functional.linear(h.float(), weight, bias).div_(temperature), -1)


def _entropy(log_probs):
    """−Σ p·log p over the last dimension, as a batched dot product (no [b, c, V] temporary but exp)."""
    p = log_probs.exp()
    return -torch.linalg.vecdot(p, log_probs)


def completion_logprobs(model, prompt_inputs, completion_ids, completion_mask, temperature=1.0, with_entropy=False):
    """Log-prob of each completion token under `model` (and the entropy of each next-token distribution).

    prompt_inputs: processor batch [b, P]; completion_ids, completion_mask: [b, L].
    Returns logp [b, L] and entropy [b, L] (or None). Gradients flow unless called under no_grad.
    """
    hidden = completion_hidden_states(layout.backbone(model), prompt_inputs, completion_ids, completion_mask)
    return logprobs_from_hidden(model, hidden, completion_ids, temperature, with_entropy)


@dataclass(frozen=True)
class Passes:
    """How the forward passes of a trainer run: the sampling temperature (log-probs are those of the sampling
    policy), the precision of a trainable model's passes (utils/precision.py) and the image token id with which the
    attention bucket masses are recorded (None: attention metrics off)."""

    temperature: float = 1.0
    precision: str = "fp32"
    image_token_id: int | None = None


@torch.no_grad()
def batched_logprobs(model, batch, micro_batch_size, passes=Passes(), record=True):
    """completion_logprobs over a whole Rollout in micro-batches, without gradients, at passes.temperature.

    Returns (logp [B, L] on CPU, masses): with record and passes.image_token_id, the attention bucket masses of the
    same forward passes (utils/attention.py) [layers, B, L, 4]; else None. (None, None) when `model` is None (a
    trainer without a reference model). `model` may be a LoRA policy's base (utils.layout.AdaptersOff).
    """
    if model is None:
        return None, None
    record = record and passes.image_token_id is not None
    out, masses = [], []
    with layout.running(model) as model:  # a LoRA reference (layout.AdaptersOff): the policy, adapters off
        for start in range(0, len(batch), micro_batch_size):
            rows = slice(start, start + micro_batch_size)
            inputs, ids = slice_inputs(batch.prompt_inputs, rows), batch.completion_ids[rows]
            mask = batch.completion_mask[rows]
            recorder = BucketMasses(model, inputs, mask, passes.image_token_id) if record else contextlib.nullcontext()
            with recorder as collector:
                logp, _ = completion_logprobs(model, inputs, ids, mask, passes.temperature)
            if record:
                masses.append(collector.values.cpu())
            out.append(logp.cpu())
    return torch.cat(out), torch.cat(masses, 1) if record else None
