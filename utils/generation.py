"""Sampling G completions per prompt with one prefill per prompt: a hand-written decode loop on the KV cache.

`model.generate` on a batch where each prompt is repeated G times encodes every image G times and prefills every
prompt G times. Here each distinct prompt is encoded and prefilled once; its KV cache is then copied to the G rows
of its group, and tokens are sampled one at a time. Rows that have ended leave the batch (their cache rows are
dropped), and the loop stops when every row has ended.

Positions are the ones the model's own teacher-forced forward pass uses (utils/logprobs.py): Qwen2-VL's mrope
positions from `get_rope_index` for image prompts, so that the log-probs of the sampled tokens equal those a
later forward pass computes. They are passed explicitly at every step, so the model's `rope_deltas` state (which
transformers keeps between a prefill and its decode steps) is neither read nor written.
"""

from dataclasses import dataclass

import torch

from utils import flops, layout


@dataclass(frozen=True)
class Decoding:
    """How completions are decoded: at most max_new_tokens tokens; logits / temperature, `suppress_ids` never
    sampled, then nucleus (top_p) sampling — or the argmax when `greedy`."""

    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    greedy: bool = False
    suppress_ids: tuple = ()


def prompt_positions(backbone, prompt_inputs):
    """Rope positions of a left-padded prompt batch, as the model's forward pass computes them.

    Returns position_ids [3, B, P] and the position of each row's first new token [B]. Image prompts get
    Qwen2-VL's mrope positions (`get_rope_index`); text-only prompts get 0..P-1, padding included, which is what
    the model's forward pass does without an image.
    """
    ids, mask = prompt_inputs["input_ids"], prompt_inputs["attention_mask"]
    B, P = ids.shape
    if "image_grid_thw" not in prompt_inputs:
        positions = torch.arange(P, device=ids.device).view(1, 1, P).expand(3, B, P)
        return positions, torch.full((B,), P, device=ids.device)
    positions, _ = backbone.get_rope_index(
        ids, mm_token_type_ids=prompt_inputs["mm_token_type_ids"], image_grid_thw=prompt_inputs["image_grid_thw"],
        attention_mask=mask,
    )  # [3, B, P]; padding positions are not used
    last = positions.masked_fill(mask.unsqueeze(0) == 0, 0).amax(dim=(0, 2))  # [B]
    return positions, last + 1


def top_p_filter(scores, top_p):
    """Nucleus filtering (as transformers' TopPLogitsWarper): keep the smallest set of tokens whose probability
    reaches top_p, the most likely token always. scores: [N, V] logits; the others become -inf."""
    sorted_scores, order = torch.sort(scores, descending=False)
    cumulative = sorted_scores.softmax(-1).cumsum(-1)
    remove = cumulative <= (1 - top_p)
    remove[:, -1] = False
    return scores.masked_fill(remove.scatter(1, order, remove), float("-inf"))


@torch.no_grad()
def sample_completions(model, prompt_inputs, group_size, decoding, *, eos_ids, pad_id, generator=None):
    """`group_size` completions for each of the B distinct prompts of `prompt_inputs`, with one image encoding and
    one prefill per prompt, decoded as `decoding` says (a Decoding).

    prompt_inputs: processor batch [B, P], left-padded (on any device; moved to the model's). `generator` drives
    the sampling (None: torch's global generator).
    Returns completion_ids [B*G, L] (the G rows of a prompt contiguous; pad_id after the first end token; L the
    longest completion, at most decoding.max_new_tokens), logprobs [B*G, L] fp32: the log-prob of each sampled
    token under log_softmax(logits / temperature), before suppression and top-p, i.e. what a teacher-forced pass
    (utils.logprobs.completion_logprobs) computes; and log_kept [B*G, L] fp32: the log of the probability mass that
    suppression and top-p left at that step (0 when they cut nothing), so that the log-prob under the distribution
    actually sampled is logprobs - log_kept. Both are 0 after the end token.
    """
    if model.training:  # transformers drops the KV cache of a checkpointed layer in training mode; sample in eval
        model.eval()
        try:
            return sample_completions(model, prompt_inputs, group_size, decoding, eos_ids=eos_ids, pad_id=pad_id,
                                      generator=generator)
        finally:
            model.train()
    max_new_tokens, temperature, top_p = decoding.max_new_tokens, decoding.temperature, decoding.top_p
    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in prompt_inputs.items()}
    backbone, lm_head = layout.backbone(model), layout.lm_head(model)
    positions, next_position = prompt_positions(backbone, inputs)  # [3, B, P], [B]
    out = backbone(**inputs, position_ids=positions, use_cache=True)
    cache = out.past_key_values
    logits = lm_head(out.last_hidden_state[:, -1])  # [B, V]
    flops.count_prompts(backbone, inputs)
    flops.count_logits(model, len(logits))

    # Each prompt's cache, logits and position to its G rows.
    cache.batch_repeat_interleave(group_size)
    logits = logits.repeat_interleave(group_size, 0)  # [N, V], N = B*G
    attention_mask = inputs["attention_mask"].repeat_interleave(group_size, 0)  # [N, P + t]
    next_position = next_position.repeat_interleave(group_size, 0)  # [N]
    n = logits.shape[0]
    eos = torch.tensor(list(eos_ids), device=device)
    suppress = torch.tensor(list(decoding.suppress_ids), dtype=torch.long, device=device)
    completion_ids = torch.full((n, max_new_tokens), pad_id, dtype=torch.long, device=device)  # [N, L_max]
    logprobs = torch.zeros((n, max_new_tokens), dtype=torch.float32, device=device)  # [N, L_max]
    log_kept = torch.zeros((n, max_new_tokens), dtype=torch.float32, device=device)  # [N, L_max]
    alive = torch.arange(n, device=device)  # rows still generating; the cache holds exactly these rows

    length = 0
    for t in range(max_new_tokens):
        scores = logits.float() / temperature  # [n_alive, V]
        log_probs = torch.log_softmax(scores, -1)
        if len(suppress):
            scores[:, suppress] = float("-inf")
        if decoding.greedy:
            tokens = scores.argmax(-1)
        else:
            if top_p < 1.0:
                scores = top_p_filter(scores, top_p)
            tokens = torch.multinomial(scores.softmax(-1), 1, generator=generator).squeeze(1)
        completion_ids[alive, t] = tokens
        logprobs[alive, t] = log_probs.gather(1, tokens.unsqueeze(1)).squeeze(1)
        if len(suppress) or top_p < 1.0:  # the mass of the tokens that could still be sampled
            log_kept[alive, t] = torch.logsumexp(log_probs.masked_fill(scores == float("-inf"), float("-inf")), -1)
        length = t + 1
        running = ~torch.isin(tokens, eos)  # [n_alive]
        if t == max_new_tokens - 1 or not running.any():
            break
        if not running.all():  # ended rows leave the batch
            keep = running.nonzero().squeeze(1)
            cache.batch_select_indices(keep)
            alive, tokens = alive[keep], tokens[keep]
            attention_mask, next_position = attention_mask[keep], next_position[keep]
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(alive), 1)], 1)
        position_ids = next_position.view(1, -1, 1).expand(3, -1, 1)  # [3, n_alive, 1]: text, so t = h = w
        out = backbone(input_ids=tokens.unsqueeze(1), attention_mask=attention_mask, position_ids=position_ids,
                       past_key_values=cache, use_cache=True)
        logits = lm_head(out.last_hidden_state[:, -1])
        next_position = next_position + 1
    completion_ids = completion_ids[:, :length]
    count_decoding(model, inputs["attention_mask"].sum(1).repeat_interleave(group_size), completion_ids, eos)
    return completion_ids, logprobs[:, :length], log_kept[:, :length]


def count_decoding(model, prompt_lengths, completion_ids, eos):
    """Count the decode steps' model FLOPs (utils/flops.py) once the loop is done, not per token: each row fed back
    every token it sampled but its last (its end token, or the one at the length limit), each attending its prompt
    and the tokens before it. prompt_lengths: valid prompt tokens per row [N]; completion_ids [N, L]."""
    ended = torch.isin(completion_ids, eos)
    sampled = torch.where(ended.any(1), ended.int().argmax(1) + 1, completion_ids.shape[1])  # [N]
    flops.count_suffix(layout.backbone(model), prompt_lengths, sampled - 1)
    flops.count_logits(model, (sampled - 1).sum().item())
