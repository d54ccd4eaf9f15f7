"""Sampling completions (G per prompt)."""

from collections import deque
from dataclasses import dataclass, field, fields

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from data.prompts import encode_prompts
from utils.batch import concat_inputs, slice_inputs
from utils.distributed import (all_reduce_max, all_reduce_sum, gather_rows, is_main_process, rank_sampling,
                               replay_slots)
from utils.generation import Decoding, sample_completions
from utils.rewards import score_completions
from utils.rl import is_informative


@dataclass
class Rollout:
    """A batch of prompts with one completion each; the completions of a prompt (a group) are contiguous rows.

    prompt_inputs: processor outputs for the prompts (input_ids / attention_mask / mm_token_type_ids [B, P],
        pixel_values [patches, D], image_grid_thw [B, 3]); completion_ids [B, L] right-padded;
    completion_mask [B, L]: 1 on generated tokens up to and including the end token;
    truncated [B]: hit the length limit without an end token; texts: decoded completions;
    examples: the data example behind each row; rewards: {component: [B]} once scored;
    sampler_logp [B, L]: the log-prob of each sampled token under the distribution the sampler actually drew it from
    (temperature, suppressed tokens and top-p applied); sampler_log_kept [B, L]: the log of the mass suppression and
    top-p kept (0: nothing cut), so sampler_logp + sampler_log_kept is the log-prob under the sampler's full
    distribution, the one a teacher-forced pass computes (utils/generation.py). Both 0 after the end token.
    """

    prompt_inputs: dict
    completion_ids: torch.Tensor
    completion_mask: torch.Tensor
    truncated: torch.Tensor
    texts: list
    examples: list = field(default_factory=list)
    rewards: dict = field(default_factory=dict)
    group_sizes: list = field(default_factory=list)  # sizes of its contiguous groups, once known (sample_step)
    sampler_logp: torch.Tensor | None = None
    sampler_log_kept: torch.Tensor | None = None

    def __len__(self):
        return self.completion_ids.shape[0]


def completion_mask_from_ids(completion_ids, eos_ids):
    """[B, L] mask that is 1 up to and including the first end token; and [B] whether an end token occurred."""
    is_eos = torch.isin(completion_ids, torch.tensor(eos_ids, device=completion_ids.device))
    seen_before = (is_eos.cumsum(1) - is_eos.long()) > 0  # an end token strictly earlier in the row
    return (~seen_before).long(), is_eos.any(1)


@torch.no_grad()
def generate(model, processor, examples, group_size, decoding, batch_size=None, desc=None, generator=None):
    """Sample `group_size` completions per example, decoded as `decoding` (utils.generation.Decoding) says, drawing
    from `generator` (None: torch's global one); returns a Rollout of len(examples)*G.

    Each prompt is encoded and prefilled once for its G completions (utils/generation.py). Sequences are
    generated about `batch_size` at a time (whole groups), with a progress bar named `desc` (none when desc is None).
    """
    tokenizer = processor.tokenizer
    eos_ids = model.generation_config.eos_token_id
    eos_ids = [eos_ids] if isinstance(eos_ids, int) else list(eos_ids)
    prompts_per_batch = max(1, (batch_size or len(examples) * group_size) // group_size)
    prompts, completions, logps, kepts = [], [], [], []
    for start in tqdm(range(0, len(examples), prompts_per_batch), desc=desc, leave=False,
                      disable=desc is None or not is_main_process()):
        inputs = encode_prompts(processor, examples[start : start + prompts_per_batch])  # [b, P]
        ids, logp, log_kept = sample_completions(model, inputs, group_size, decoding, eos_ids=eos_ids,
                                                 pad_id=tokenizer.pad_token_id, generator=generator)  # [b*G, L]
        prompts.append(slice_inputs(inputs, [i for i in range(len(inputs["input_ids"])) for _ in range(group_size)]))
        completions.append(ids.cpu())
        logps.append((logp - log_kept).cpu())  # under the distribution actually sampled
        kepts.append(log_kept.cpu())
    width = max(c.shape[1] for c in completions)
    pad = lambda parts, value: torch.cat(  # noqa: E731
        [torch.nn.functional.pad(c, (0, width - c.shape[1]), value=value) for c in parts])
    completion_ids = pad(completions, tokenizer.pad_token_id)
    completion_mask, ended = completion_mask_from_ids(completion_ids, eos_ids)
    texts = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
    prompt_inputs = prompts[0] if len(prompts) == 1 else concat_inputs(prompts)
    repeated = [ex for ex in examples for _ in range(group_size)]
    return Rollout(prompt_inputs, completion_ids, completion_mask, ~ended, texts, repeated,
                   sampler_logp=pad(logps, 0.0), sampler_log_kept=pad(kepts, 0.0))


def sample_and_score(models, examples, n, specs, weights):
    """n completions for each example from the generating model (utils.trainer.Models), as the RolloutSpec
    specs.rollout says, scored by every reward (utils/rewards.py) with the step's reward `weights`."""
    r = specs.rollout
    decoding = Decoding(r.max_new_tokens, r.temperature, r.top_p, suppress_ids=models.suppress_ids,
                        compiled=r.compiled_decode)
    rollout = generate(models.rollout, models.processor, examples, n, decoding, r.generation_batch_size, "generate")
    rewards = score_completions(rollout.texts, [ex["solution"] for ex in rollout.examples],
                                rollout.completion_mask.sum(1).tolist(), weights, specs.rewards, r.max_new_tokens)
    rollout.rewards = {k: torch.tensor(v) for k, v in rewards.items()}
    return rollout


def plain_rollout(rollout):
    """A Rollout as tensors and plain python values only (dicts, lists, strings, numbers): what torch.load with
    weights_only=True reads back. Images become {"image_pixels": uint8 tensor [H, W, C], "image_mode": mode}."""
    def plain(value):
        if isinstance(value, Image.Image):
            return {"image_pixels": torch.from_numpy(np.array(value)), "image_mode": value.mode}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    state = {f.name: plain(getattr(rollout, f.name)) for f in fields(Rollout) if f.name != "examples"}
    unique = list({id(ex): ex for ex in rollout.examples}.values())  # a group's rows share their example object
    where = {id(ex): i for i, ex in enumerate(unique)}
    return {**state, "examples": {"unique": plain(unique), "rows": [where[id(ex)] for ex in rollout.examples]}}


def rollout_from_plain(state):
    """The Rollout that plain_rollout(rollout) describes."""
    def restore(value):
        if isinstance(value, dict) and set(value) == {"image_pixels", "image_mode"}:
            return Image.fromarray(value["image_pixels"].numpy(), value["image_mode"])
        if isinstance(value, list):
            return [restore(v) for v in value]
        if isinstance(value, dict):
            return {k: restore(v) for k, v in value.items()}
        return value

    state = dict(state)
    unique = restore(state["examples"]["unique"])
    state["examples"] = [unique[i] for i in state["examples"]["rows"]]  # shared again, as sampled
    return Rollout(**state)


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
        sampler_logp=None if rollout.sampler_logp is None else rollout.sampler_logp[rows],
        sampler_log_kept=None if rollout.sampler_log_kept is None else rollout.sampler_log_kept[rows],
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
        sampler_logp=None if any(r.sampler_logp is None for r in rollouts) else
        torch.cat([pad(r.sampler_logp, 0.0) for r in rollouts]),
        sampler_log_kept=None if any(r.sampler_log_kept is None for r in rollouts) else
        torch.cat([pad(r.sampler_log_kept, 0.0) for r in rollouts]),
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

    @classmethod
    def of(cls, rollout):
        """The buffer a RolloutSpec asks for (REPLAY_BUFFER_SIZE and its filters), or None when the size is 0."""
        if not rollout.replay_buffer_size:
            return None
        return cls(rollout.replay_buffer_size, rollout.replay_min_reward_std, rollout.replay_max_success_rate)

    def __len__(self):
        return len(self.groups)

    def state_dict(self):
        """The stored groups, oldest first, as plain values (a checkpoint loads with weights_only)."""
        return {"groups": [plain_rollout(group) for group in self.groups]}

    def load_state_dict(self, state):
        self.groups = deque([rollout_from_plain(group) for group in state["groups"]], maxlen=self.groups.maxlen)

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


def sample_step(sample, draw_prompts, rollout, pad_token_id, replay=None, warn=print):
    """One training step's sampling as the RolloutSpec `rollout` says: collect_groups (TRAIN_BATCH_PROMPTS groups of
    GROUP_SIZE; the sampling mode, MAX_GEN_BATCHES, MAX_DYNAMIC_SAMPLES), then, with a ReplayBuffer, its swaps.
    sample(examples, n) -> a scored Rollout with n completions per example; draw_prompts(k) -> k examples.

    Under torchrun TRAIN_BATCH_PROMPTS is the global batch: each rank samples its share of every draw of prompts,
    refill rounds go on until the ranks *together* hold that many informative groups (or MAX_GEN_BATCHES), and the
    metrics count the groups of all ranks (utils/distributed.py). A group never spans ranks; each rank has its own
    replay buffer.

    Returns (everything: every completion this rank sampled; batch: the groups it trains on as one scored Rollout
    (with group_sizes), or None when no rank has an informative group — `warn` says so, and the step has no
    update; padding: True when this rank has no group to train on while other ranks have some — its batch is then
    one of its flat groups, trained on with zero weight (utils.update.Targets.padding) to join the sharded update;
    metrics: the step's reward/*, response/* and dapo/* sampling metrics, global).
    """
    n_groups, group_size, mode = rollout.train_batch_prompts, rollout.group_size, rollout.sampling_mode
    n_local, draw_local, quota = rank_sampling(draw_prompts, n_groups)
    everything, groups, kept, rounds = collect_groups(sample, draw_local, n_local, group_size, pad_token_id,
                                                      mode, rollout.max_gen_batches, rollout.max_dynamic_samples,
                                                      quota)
    train_groups = [select_rows(everything, groups[g]) for g in kept]
    n_flat = sum(not is_informative(everything.rewards["accuracy"][rows]) for rows in groups)
    n_replayed = 0
    if replay is not None:  # stored informative groups stand in for flat (or missing) ones
        slots = replay_slots(len(train_groups), len(replay), n_groups)  # what the global batch lacks, this rank's part
        train_groups, n_replayed = replay.swap_flat_groups(train_groups, len(train_groups) + slots)
    n_kept, n_sampled, n_flat, n_topup, n_replayed, n_stored, n_train = all_reduce_sum(
        [len(kept), len(groups), n_flat, len(everything) - group_size * len(groups), n_replayed,
         len(replay) if replay is not None else 0, len(train_groups)])
    metrics = {**rollout_metrics(everything), "dapo/gen_batches": all_reduce_max(rounds),
               "dapo/kept_group_frac": n_kept / n_sampled, "dapo/flat_group_frac": n_flat / n_sampled}
    if mode == "topup":
        metrics["dapo/topup_samples"] = n_topup
    if replay is not None:
        metrics.update({"dapo/replayed_groups": n_replayed, "dapo/replay_buffer_size": n_stored})
    metrics["dapo/train_groups"] = n_train
    padding = n_train > 0 and not train_groups
    if padding:
        train_groups = [select_rows(everything, groups[0])]
    if not n_train:  # (the count of every rank)
        warn("no informative group sampled; no update this step")
        return everything, None, padding, metrics
    batch = concat_rollouts(train_groups, pad_token_id)
    batch.group_sizes = [len(g) for g in train_groups]
    return everything, batch, padding, metrics


def rollout_metrics(rollout):
    """reward/<component>/{mean,std} and response/* over every completion generated this step (by every rank)."""
    metrics = {}
    for name, values in gather_rows(rollout.rewards).items():
        values = values.float()
        if name == "errors":  # reward calls that raised, hung or gave NaN (scored 0): a count, not a reward
            metrics["reward/errors"] = values.sum().item()
            continue
        metrics[f"reward/{name}/mean"] = values.mean().item()
        metrics[f"reward/{name}/std"] = values.std().item() if values.numel() > 1 else 0.0
    lengths = gather_rows(rollout.completion_mask.sum(1))
    metrics["response/length/mean"] = lengths.float().mean().item()
    metrics["response/length/max"] = lengths.max().item()
    metrics["response/truncated_frac"] = gather_rows(rollout.truncated).float().mean().item()
    return metrics

