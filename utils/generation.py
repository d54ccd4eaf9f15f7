"""Sampling G completions per prompt with one prefill per prompt: a hand-written decode loop on the KV cache.

`model.generate` on a batch where each prompt is repeated G times encodes every image G times and prefills every
prompt G times. Here each distinct prompt is encoded and prefilled once; its KV cache is then copied to the G rows
of its group, and tokens are sampled one at a time. Rows that have ended leave the batch (their cache rows are
dropped), and the loop stops when every row has ended.

With `Decoding.compiled` (COMPILED_DECODE) the decode steps run instead on a static KV cache (preallocated for the
prompt and every new token, written in place) through one `torch.compile`d step, every row staying in the batch
until all have ended: fixed shapes, so one compiled graph serves every step (`decode_static`). It is a different
rounding of the same model: tested against the eager loop (the same greedy tokens) and against teacher forcing
(sampled log-probs to 1e-4). Whether it pays depends on the machine (docs/benchmarks.md: not on this project's
2-core CPU). It assumes full attention in every layer (Qwen2-VL and Qwen2.5-VL: no sliding windows) and sdpa.

Positions are the ones the model's own teacher-forced forward pass uses (utils/logprobs.py): Qwen2-VL's mrope
positions from `get_rope_index` for image prompts, so that the log-probs of the sampled tokens equal those a
later forward pass computes. They are passed explicitly at every step, so the model's `rope_deltas` state (which
transformers keeps between a prefill and its decode steps) is neither read nor written.
"""

import weakref
from dataclasses import dataclass

import torch

from utils import flops, layout


@dataclass(frozen=True)
class Decoding:
    """How completions are decoded: at most max_new_tokens tokens; logits / temperature, `suppress_ids` never
    sampled, then nucleus (top_p) sampling — or the argmax when `greedy`; `compiled`: the decode steps on a static
    KV cache, compiled (COMPILED_DECODE)."""

    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    greedy: bool = False
    suppress_ids: tuple = ()
    compiled: bool = False


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
    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in prompt_inputs.items()}
    backbone, lm_head = layout.backbone(model), layout.lm_head(model)
    positions, next_position = prompt_positions(backbone, inputs)  # [3, B, P], [B]
    prefill = backbone(**inputs, position_ids=positions, use_cache=True)
    cache, logits = prefill.past_key_values, lm_head(prefill.last_hidden_state[:, -1])  # [B, V]
    del prefill  # its hidden states [B, P, H]
    flops.count_prompts(backbone, inputs)
    flops.count_logits(model, len(logits))

    # Each prompt's cache, logits and position to its G rows.
    cache.batch_repeat_interleave(group_size)
    logits = logits.repeat_interleave(group_size, 0)  # [N, V], N = B*G
    attention_mask = inputs["attention_mask"].repeat_interleave(group_size, 0)  # [N, P]
    next_position = next_position.repeat_interleave(group_size, 0)  # [N]
    out = Completions(len(logits), decoding, eos_ids, pad_id, generator, device)
    if decoding.compiled:
        decode_static(model, cache, logits, attention_mask, next_position, out)
    else:
        decode_eager(backbone, lm_head, cache, logits, attention_mask, next_position, out)
    completion_ids, logprobs, log_kept = out.trimmed()
    count_decoding(model, inputs["attention_mask"].sum(1).repeat_interleave(group_size), completion_ids, out.eos)
    return completion_ids, logprobs, log_kept


class Completions:
    """The decode loop's outputs, filled step by step: completion_ids [N, L_max] (pad_id after the end), the log-prob
    of each sampled token and the log of the mass suppression and top-p left at its step (fp32, 0 after the end)."""

    def __init__(self, n, decoding, eos_ids, pad_id, generator, device):
        self.decoding, self.generator, self.pad_id, self.length = decoding, generator, pad_id, 0
        self.eos = torch.tensor(list(eos_ids), device=device)
        self.suppress = torch.tensor(list(decoding.suppress_ids), dtype=torch.long, device=device)
        self.ids = torch.full((n, decoding.max_new_tokens), pad_id, dtype=torch.long, device=device)
        self.logprobs = torch.zeros((n, decoding.max_new_tokens), dtype=torch.float32, device=device)
        self.log_kept = torch.zeros((n, decoding.max_new_tokens), dtype=torch.float32, device=device)

    def sample(self, t, rows, logits):
        """Token t of the output rows `rows` [n] from their logits [n, V]; returns the tokens [n] and which of the
        rows go on (did not sample an end token) [n]."""
        scores = logits.float() / self.decoding.temperature  # [n, V]
        log_probs = torch.log_softmax(scores, -1)
        if len(self.suppress):
            scores[:, self.suppress] = float("-inf")
        if self.decoding.greedy:
            tokens = scores.argmax(-1)
        else:
            if self.decoding.top_p < 1.0:
                scores = top_p_filter(scores, self.decoding.top_p)
            tokens = torch.multinomial(scores.softmax(-1), 1, generator=self.generator).squeeze(1)
        self.ids[rows, t] = tokens
        self.logprobs[rows, t] = log_probs.gather(1, tokens.unsqueeze(1)).squeeze(1)
        if len(self.suppress) or self.decoding.top_p < 1.0:  # the mass of the tokens that could still be sampled
            self.log_kept[rows, t] = torch.logsumexp(log_probs.masked_fill(scores == float("-inf"), float("-inf")),
                                                     -1)
        self.length = t + 1
        return tokens, ~torch.isin(tokens, self.eos)

    def trimmed(self):
        """completion_ids, logprobs, log_kept [N, L], L the longest completion."""
        return self.ids[:, :self.length], self.logprobs[:, :self.length], self.log_kept[:, :self.length]


def decode_eager(backbone, lm_head, cache, logits, attention_mask, next_position, out):
    """The decode loop on transformers' dynamic KV cache: rows that end leave the batch (their cache rows dropped),
    and the loop stops when every row has ended. logits [N, V] of the first new token; attention_mask [N, P];
    next_position [N]: each row's position of its first new token."""
    alive = torch.arange(len(logits), device=logits.device)  # rows still generating; the cache holds exactly these
    for t in range(out.decoding.max_new_tokens):
        tokens, running = out.sample(t, alive, logits)
        if t == out.decoding.max_new_tokens - 1 or not running.any():
            break
        if not running.all():  # ended rows leave the batch
            keep = running.nonzero().squeeze(1)
            cache.batch_select_indices(keep)
            alive, tokens = alive[keep], tokens[keep]
            attention_mask, next_position = attention_mask[keep], next_position[keep]
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(alive), 1)], 1)
        position_ids = next_position.view(1, -1, 1).expand(3, -1, 1)  # [3, n_alive, 1]: text, so t = h = w
        hidden = backbone(input_ids=tokens.unsqueeze(1), attention_mask=attention_mask, position_ids=position_ids,
                          past_key_values=cache, use_cache=True).last_hidden_state
        logits = lm_head(hidden[:, -1])
        next_position = next_position + 1


class StaticKV:
    """A preallocated KV cache: every layer's keys and values [N, kv heads, length, head dim], the prompt's copied
    in from transformers' cache, each decode step's written in place at position `index` (what the model's
    attention layers call: update(key, value, layer_idx)). Attention runs over the whole length, masked."""

    def __init__(self, cache, length):
        self.keys, self.values = [], []
        for layer in cache.layers:
            for prefilled, store in ((layer.keys, self.keys), (layer.values, self.values)):
                n, heads, prompt, dim = prefilled.shape
                buffer = prefilled.new_zeros(n, heads, length, dim)
                buffer[:, :, :prompt] = prefilled
                store.append(buffer)
        self.index = torch.zeros(1, dtype=torch.long, device=self.keys[0].device)

    def update(self, key, value, layer_idx, *args, **kwargs):
        self.keys[layer_idx].index_copy_(2, self.index, key)
        self.values[layer_idx].index_copy_(2, self.index, value)
        return self.keys[layer_idx], self.values[layer_idx]


COMPILE_BACKEND = "inductor"  # torch.compile's backend for the decode step; tests also run "eager" (no C++ compiler)
_COMPILED_STEPS = weakref.WeakKeyDictionary()  # model -> {backend: its compiled decode step}


def compiled_decode_step(model):
    """`step(tokens [N, 1], position_ids [3, N, 1], mask [N, 1, 1, length] bool, cache: StaticKV) -> logits [N, V]`:
    the text decoder's forward pass for one new token per row, with the attention mask given whole (no mask is
    built per step), through `torch.compile` (COMPILE_BACKEND). The weights are read as they are at each call (an
    optimizer step changes them in place). Dynamo compiles a graph on the first call, and once more when a second
    batch shape comes (with the shapes dynamic from then on); models of one architecture share it."""
    steps = _COMPILED_STEPS.setdefault(model, {})
    if COMPILE_BACKEND not in steps:
        text, lm_head = layout.text_decoder(model), layout.lm_head(model)

        def step(tokens, position_ids, mask, cache):
            hidden = text.embed_tokens(tokens)
            rope = text.rotary_emb(hidden, position_ids)
            for layer in text.layers:
                hidden = layer(hidden, attention_mask=mask, position_embeddings=rope, past_key_values=cache,
                               use_cache=True)
            return lm_head(text.norm(hidden)[:, -1])

        steps[COMPILE_BACKEND] = torch.compile(step, backend=COMPILE_BACKEND, fullgraph=True)
    return steps[COMPILE_BACKEND]


def decode_static(model, cache, logits, attention_mask, next_position, out):
    """The decode loop on a StaticKV cache through the compiled step: `model` the generating model, the other
    arguments as decode_eager's (transformers' prefilled `cache` is emptied once copied). Every row stays in the batch
    (fixed shapes); an ended row is fed padding and its outputs are not recorded. The cache's length is the prompt's
    plus max_new_tokens, rounded up to a multiple of 64 so that batches whose prompt lengths differ a little have
    one shape."""
    n, prompt = attention_mask.shape
    length = -(-(prompt + out.decoding.max_new_tokens) // 64) * 64
    static, step = StaticKV(cache, length), compiled_decode_step(model)
    cache.layers.clear()  # the prompt's keys and values live on in `static` only
    mask = torch.zeros(n, 1, 1, length, dtype=torch.bool, device=logits.device)
    mask[:, 0, 0, :prompt] = attention_mask.bool()
    running = torch.ones(n, dtype=torch.bool, device=logits.device)
    for t in range(out.decoding.max_new_tokens):
        rows = running.nonzero().squeeze(1)
        tokens, goes_on = out.sample(t, rows, logits[rows])
        running[rows] = goes_on
        if t == out.decoding.max_new_tokens - 1 or not running.any():
            break
        feed = torch.full((n,), out.pad_id, dtype=torch.long, device=logits.device)
        feed[rows] = tokens
        mask[:, 0, 0, prompt + t] = True
        static.index.fill_(prompt + t)
        logits = step(feed.unsqueeze(1), (next_position + t).view(1, -1, 1).expand(3, -1, 1), mask, static)


def count_decoding(model, prompt_lengths, completion_ids, eos):
    """Count the decode steps' model FLOPs (utils/flops.py) once the loop is done, not per token: each row fed back
    every token it sampled but its last (its end token, or the one at the length limit), each attending its prompt
    and the tokens before it. prompt_lengths: valid prompt tokens per row [N]; completion_ids [N, L]."""
    ended = torch.isin(completion_ids, eos)
    sampled = torch.where(ended.any(1), ended.int().argmax(1) + 1, completion_ids.shape[1])  # [N]
    flops.count_suffix(layout.backbone(model), prompt_lengths, sampled - 1)
    flops.count_logits(model, (sampled - 1).sum().item())
