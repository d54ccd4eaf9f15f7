"""Sampling completions (G per prompt) and slicing multimodal batches."""

from collections import deque
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from data.prompts import encode_prompts
from utils.distributed import all_reduce_max, all_reduce_sum, is_main_process, rank_sampling, replay_slots
from utils.generation import sample_completions
from utils.rl import is_informative


@dataclass
class Rollout:
    """A batch of prompts with one completion each; the completions of a prompt (a group) are contiguous rows.

    prompt_inputs: processor outputs for the prompts (input_ids / attention_mask / mm_token_type_ids [B, P],
        pixel_values [patches, D], image_grid_thw [B, 3]); completion_ids [B, L] right-padded;
    completion_mask [B, L]: 1 on generated tokens up to and including the end token;
    truncated [B]: hit the length limit without an end token; texts: decoded completions;
    examples: the data example behind each row; rewards: {component: [B]} once scored.
    """

    prompt_inputs: dict
    completion_ids: torch.Tensor
    completion_mask: torch.Tensor
    truncated: torch.Tensor
    texts: list
    examples: list = field(default_factory=list)
    rewards: dict = field(default_factory=dict)

    def __len__(self):
        return self.completion_ids.shape[0]


def image_patch_counts(prompt_inputs):
    """(images, patches): per prompt, how many images it has and how many rows of pixel_values they fill (0 and
    0 for a text-only prompt). image_grid_thw has one row per image, in prompt order; a prompt's images are the
    next rows whose image tokens (patches / merge², merge² = patches per image token of the whole batch) add up
    to the prompt's image tokens (mm_token_type_ids == 1)."""
    n_prompts = prompt_inputs["input_ids"].shape[0]
    if "image_grid_thw" not in prompt_inputs:
        return [0] * n_prompts, [0] * n_prompts
    patches = prompt_inputs["image_grid_thw"].prod(-1).tolist()  # per image
    if "mm_token_type_ids" not in prompt_inputs:  # no way to tell: one image per prompt
        if len(patches) != n_prompts:
            raise ValueError("prompt inputs without mm_token_type_ids must have exactly one image per prompt")
        return [1] * n_prompts, patches
    tokens = (prompt_inputs["mm_token_type_ids"] == 1).sum(1).tolist()  # [B] image tokens per prompt
    per_token = sum(patches) // max(sum(tokens), 1)
    images, counts, next_image = [], [], 0
    for n_tokens in tokens:
        first = next_image
        while n_tokens > 0:
            n_tokens -= patches[next_image] // per_token
            next_image += 1
        images.append(next_image - first)
        counts.append(sum(patches[first:next_image]))
    return images, counts


def slice_inputs(inputs, rows):
    """Rows `rows` (a python slice or list of indices) of a processor batch, with their images' pixel_values and
    image_grid_thw rows (a prompt may have 0, 1 or several images; a slice without images has neither key)."""
    indices = list(range(inputs["input_ids"].shape[0]))[rows] if isinstance(rows, slice) else list(rows)
    out = {k: v[indices] for k, v in inputs.items() if k not in ("pixel_values", "image_grid_thw")}
    if "pixel_values" in inputs:
        images, patches = image_patch_counts(inputs)
        image_start, patch_start = [0], [0]
        for n_images, n_patches in zip(images, patches):
            image_start.append(image_start[-1] + n_images)
            patch_start.append(patch_start[-1] + n_patches)
        image_rows = [j for i in indices for j in range(image_start[i], image_start[i + 1])]
        patch_rows = [j for i in indices for j in range(patch_start[i], patch_start[i + 1])]
        if image_rows:
            out["pixel_values"] = inputs["pixel_values"][patch_rows]
            out["image_grid_thw"] = inputs["image_grid_thw"][image_rows]
    # Left padding is shared across the batch; drop columns that are padding in every kept row.
    keep = out["attention_mask"].any(0).nonzero()
    first = int(keep[0]) if len(keep) else 0
    for k in ("input_ids", "attention_mask", "mm_token_type_ids"):
        if k in out:
            out[k] = out[k][:, first:]
    return out


def concat_inputs(batches):
    """Concatenate processor batches row-wise, re-padding the prompts on the left; batches without images
    (text-only prompts) add no pixel_values rows."""
    width = max(b["input_ids"].shape[1] for b in batches)
    out = {}
    for k in ("input_ids", "attention_mask", "mm_token_type_ids"):
        if k not in batches[0]:
            continue
        pad_value = 0
        parts = [torch.nn.functional.pad(b[k], (width - b[k].shape[1], 0), value=pad_value) for b in batches]
        out[k] = torch.cat(parts)
    for k in ("pixel_values", "image_grid_thw"):
        parts = [b[k] for b in batches if k in b]
        if parts:
            out[k] = torch.cat(parts)
    return out


def completion_mask_from_ids(completion_ids, eos_ids):
    """[B, L] mask that is 1 up to and including the first end token; and [B] whether an end token occurred."""
    is_eos = torch.isin(completion_ids, torch.tensor(eos_ids, device=completion_ids.device))
    seen_before = (is_eos.cumsum(1) - is_eos.long()) > 0  # an end token strictly earlier in the row
    return (~seen_before).long(), is_eos.any(1)


@torch.no_grad()
def generate(model, processor, examples, group_size, max_new_tokens, temperature=1.0, top_p=1.0, greedy=False,
             suppress_ids=(), batch_size=None, desc=None):
    """Sample `group_size` completions per example (greedy when `greedy`); returns a Rollout of len(examples)*G.

    Each prompt is encoded and prefilled once for its G completions (utils/generation.py). Sequences are
    generated about `batch_size` at a time (whole groups), with a progress bar named `desc` (none when desc is None).
    """
    tokenizer = processor.tokenizer
    eos_ids = model.generation_config.eos_token_id
    eos_ids = [eos_ids] if isinstance(eos_ids, int) else list(eos_ids)
    prompts_per_batch = max(1, (batch_size or len(examples) * group_size) // group_size)
    prompts, completions = [], []
    for start in tqdm(range(0, len(examples), prompts_per_batch), desc=desc, leave=False,
                      disable=desc is None or not is_main_process()):
        inputs = encode_prompts(processor, examples[start : start + prompts_per_batch])  # [b, P]
        ids, _ = sample_completions(model, inputs, group_size, max_new_tokens, temperature=temperature, top_p=top_p,
                                    greedy=greedy, suppress_ids=suppress_ids, eos_ids=eos_ids,
                                    pad_id=tokenizer.pad_token_id)  # [b*G, L]
        prompts.append(slice_inputs(inputs, [i for i in range(len(inputs["input_ids"])) for _ in range(group_size)]))
        completions.append(ids.cpu())
    width = max(c.shape[1] for c in completions)
    completion_ids = torch.cat(
        [torch.nn.functional.pad(c, (0, width - c.shape[1]), value=tokenizer.pad_token_id) for c in completions]
    )
    completion_mask, ended = completion_mask_from_ids(completion_ids, eos_ids)
    texts = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
    prompt_inputs = prompts[0] if len(prompts) == 1 else concat_inputs(prompts)
    repeated = [ex for ex in examples for _ in range(group_size)]
    return Rollout(prompt_inputs, completion_ids, completion_mask, ~ended, texts, repeated)


def select_rows(rollout, rows):
    """The rollout restricted to `rows` (list of indices), rewards and examples included."""
    return Rollout(
        slice_inputs(rollout.prompt_inputs, rows),
        rollout.completion_ids[rows],
        rollout.completion_mask[rows],
        rollout.truncated[rows],
        [rollout.texts[i] for i in rows],
        [rollout.examples[i] for i in rows],
        {k: v[rows] for k, v in rollout.rewards.items()},
    )


def concat_rollouts(rollouts, pad_token_id):
    """One rollout from several (completions right-padded to a common length)."""
    width = max(r.completion_ids.shape[1] for r in rollouts)
    pad = lambda t, value: torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value)  # noqa: E731
    if len(rollouts) == 1:
        return rollouts[0]
    return Rollout(
        concat_inputs([r.prompt_inputs for r in rollouts]),
        torch.cat([pad(r.completion_ids, pad_token_id) for r in rollouts]),
        torch.cat([pad(r.completion_mask, 0) for r in rollouts]),
        torch.cat([r.truncated for r in rollouts]),
        [t for r in rollouts for t in r.texts],
        [e for r in rollouts for e in r.examples],
        {k: torch.cat([r.rewards[k] for r in rollouts]) for k in rollouts[0].rewards},
    )


def collect_groups(sample, draw_prompts, n_groups, group_size, pad_token_id, mode, max_rounds=1, max_group_size=0,
                   quota=None):
    """Sample the groups of one training step.

    mode "all": one round of `n_groups` prompts × G completions; every group is trained on (GRPO, PPO).
    mode "refill" (DAPO's dynamic sampling): keep only informative groups (0 < #correct < n) and draw new
        rounds of prompts until `n_groups` are kept or `max_rounds` rounds have run.
    mode "topup" (the seeds' per-prompt variant): one round; then each flat group gets one more completion at
        a time (all such groups in one generation round) until it is informative or has `max_group_size`
        completions. Groups still flat are dropped.
    Under torchrun each rank calls this with its share of the prompts as `n_groups`, and for "refill" with
    `quota` = utils.distributed.global_group_quota(...): a callable mapping this rank's number of informative
    groups to (whether all ranks together have the global batch's, how many of them this rank keeps), so that
    the rounds go on until the *global* count is reached (or max_rounds) on every rank alike.

    sample(examples, n) -> a scored Rollout with n completions per example; draw_prompts(k) -> k examples.
    Returns (everything: every completion sampled, as one Rollout; groups: the rows of each group in
    `everything`; kept: indices of the groups to train on, at most n_groups; rounds: generation rounds run).
    """
    parts, accuracy, row_examples, n_rounds = [], [], [], 0

    def sample_round(examples, n):  # -> the new rows of each example's completions
        nonlocal n_rounds
        rollout = sample(examples, n)
        start = len(accuracy)
        parts.append(rollout)
        accuracy.extend(rollout.rewards["accuracy"].tolist())
        row_examples.extend(rollout.examples)
        n_rounds += 1
        return [list(range(start + i * n, start + (i + 1) * n)) for i in range(len(examples))]

    def informative(rows):
        return is_informative(torch.tensor([accuracy[r] for r in rows]))

    groups, kept, keep = [], [], n_groups
    if mode == "refill":
        quota = quota or (lambda n_kept: (n_kept >= n_groups, n_groups))  # -> (batch full?, groups to keep)
        full = False
        while not full and n_rounds < max_rounds:
            new = sample_round(draw_prompts(n_groups), group_size)
            kept += [len(groups) + i for i, rows in enumerate(new) if informative(rows)]
            groups += new
            full, keep = quota(len(kept))
    elif mode in ("all", "topup"):
        groups = sample_round(draw_prompts(n_groups), group_size)
        while mode == "topup":
            short = [g for g, rows in enumerate(groups) if not informative(rows) and len(rows) < max_group_size]
            if not short:
                break
            for g, rows in zip(short, sample_round([row_examples[groups[g][0]] for g in short], 1)):
                groups[g] = groups[g] + rows
        kept = [g for g, rows in enumerate(groups) if mode == "all" or informative(rows)]
    else:
        raise ValueError(f"sampling mode must be 'all', 'refill' or 'topup', got {mode!r}")
    return concat_rollouts(parts, pad_token_id), groups, kept[:keep], n_rounds


class ReplayBuffer:
    """Informative groups kept to stand in for the flat groups of later steps (the seeds' replay variant of
    dynamic sampling). A group is stored only when it is informative, the std of its total rewards is at least
    `min_reward_std` and its success rate (fraction correct) is at most `max_success_rate`; the oldest group is
    dropped when the buffer is full. A stored group is handed out once, newest first (the least off-policy).
    """

    def __init__(self, size, min_reward_std, max_success_rate):
        self.groups = deque(maxlen=size)  # single-group Rollouts
        self.min_reward_std, self.max_success_rate = min_reward_std, max_success_rate

    def __len__(self):
        return len(self.groups)

    def state_dict(self):
        """The stored groups: scored single-group Rollouts, oldest first."""
        return {"groups": list(self.groups)}

    def load_state_dict(self, state):
        self.groups = deque(state["groups"], maxlen=self.groups.maxlen)

    def passes(self, group):
        accuracy, total = group.rewards["accuracy"], group.rewards["total"].float()
        return (is_informative(accuracy) and total.std().item() >= self.min_reward_std
                and (accuracy > 0).float().mean().item() <= self.max_success_rate)

    def swap_flat_groups(self, groups, n_groups):
        """The step's groups with their flat ones (and the slots up to `n_groups` they lack) replaced by stored
        groups, as far as the buffer reaches; then the step's own informative groups are stored.

        groups: scored single-group Rollouts. Returns (the groups to train on, how many came from the buffer).
        """
        fresh = [g for g in groups if is_informative(g.rewards["accuracy"])]
        flat = [g for g in groups if not is_informative(g.rewards["accuracy"])]
        replayed = [self.groups.pop() for _ in range(min(max(n_groups - len(fresh), 0), len(self.groups)))]
        flat = flat[: max(n_groups - len(fresh) - len(replayed), 0)]  # flat groups nothing could replace
        self.groups.extend(g for g in fresh if self.passes(g))
        return fresh + replayed + flat, len(replayed)


def sample_step(sample, draw_prompts, n_groups, group_size, pad_token_id, mode, max_rounds, max_group_size,
                replay=None):
    """One training step's sampling: collect_groups (arguments as there), then, with a ReplayBuffer, its swaps.

    Under torchrun `n_groups` is the global batch: each rank samples its share of every draw of prompts, refill
    rounds go on until the ranks *together* hold n_groups informative groups (or max_rounds), and the metrics count
    the groups of all ranks (utils/distributed.py). A group never spans ranks; each rank has its own replay buffer.

    Returns (everything: every completion this rank sampled; train_groups: the groups it trains on, one scored
    Rollout each; padding: True when this rank has no group to train on while other ranks have some — it then
    trains on one of its flat groups with zero weight (policy_update's batch_is_padding), to join the sharded
    update; metrics: the step's dapo/* sampling metrics, global).
    """
    n_local, draw_local, quota = rank_sampling(draw_prompts, n_groups)
    everything, groups, kept, rounds = collect_groups(sample, draw_local, n_local, group_size, pad_token_id,
                                                      mode, max_rounds, max_group_size, quota)
    train_groups = [select_rows(everything, groups[g]) for g in kept]
    n_flat = sum(not is_informative(everything.rewards["accuracy"][rows]) for rows in groups)
    n_replayed = 0
    if replay is not None:  # stored informative groups stand in for flat (or missing) ones
        slots = replay_slots(len(train_groups), len(replay), n_groups)  # what the global batch lacks, this rank's part
        train_groups, n_replayed = replay.swap_flat_groups(train_groups, len(train_groups) + slots)
    n_kept, n_sampled, n_flat, n_topup, n_replayed, n_stored, n_train = all_reduce_sum(
        [len(kept), len(groups), n_flat, len(everything) - group_size * len(groups), n_replayed,
         len(replay) if replay is not None else 0, len(train_groups)])
    metrics = {"dapo/gen_batches": all_reduce_max(rounds), "dapo/kept_group_frac": n_kept / n_sampled,
               "dapo/flat_group_frac": n_flat / n_sampled}
    if mode == "topup":
        metrics["dapo/topup_samples"] = n_topup
    if replay is not None:
        metrics.update({"dapo/replayed_groups": n_replayed, "dapo/replay_buffer_size": n_stored})
    metrics["dapo/train_groups"] = n_train
    padding = n_train > 0 and not train_groups
    if padding:
        train_groups = [select_rows(everything, groups[0])]
    return everything, train_groups, padding, metrics
