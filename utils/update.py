"""One update on a rollout batch — the mechanics around the objective of utils/rl.py: epochs × mini-batches ×
micro-batches (gradient accumulation), the global normalisers across micro-batches and ranks, precision, skipping
non-finite steps, statistics; for PPO, the critic's value loss too."""

import contextlib
import math
from dataclasses import dataclass

import torch

from utils.attention import BucketMasses
from utils.batch import slice_inputs
from utils.distributed import (all_reduce_mean, all_reduce_sum, compute_device, equal_passes, gather_rows,
                               grad_norm_value, rank_uniform)
from utils.layout import backbone
from utils.logprobs import Passes, completion_hidden_states, logprobs_from_hidden
from utils.precision import autocast
from utils.rl import aggregate, clipped_value_loss, needs_token_selection, policy_loss, select_tokens


@dataclass
class Targets:
    """What an update fits, row by row of the batch.

    advantages: [B] per sequence (broadcast over tokens) or [B, L] per token; loss_mask: [B, L] (the tokens that
    carry loss); logp_old: [B, L], or None (see policy_update); ref_logp: [B, L] for a KL term, else None;
    values_old, returns: [B, L] for PPO's critic, else None. padding: this rank has nothing to train on this step
    (dynamic sampling left it no informative group, utils.rollout.sample_step): it runs its passes with zero weight.
    """

    advantages: torch.Tensor
    loss_mask: torch.Tensor
    logp_old: torch.Tensor | None = None
    ref_logp: torch.Tensor | None = None
    values_old: torch.Tensor | None = None
    returns: torch.Tensor | None = None
    padding: bool = False


def policy_update(policy, optimizer, batch, targets, loss, optim, passes=Passes(), critic=None, train_policy=True,
                  warn=print):
    """Optimise utils.rl.policy_loss on `batch` for optim.epochs passes of optim.mini_batches optimizer steps;
    returns the mean statistics.

    loss: the LossSpec; optim: the OptimSpec (epochs, mini_batches, micro_batch_size, max_grad_norm). Each
    mini-batch is one optimizer step; its loss is normalised by the mini-batch's total valid tokens (token level)
    or sequences (sample level), so splitting it into micro-batches does not change it.
    With a `critic` (PPO; utils/critic.py, with its CriticSpec as critic.spec), VF_COEF × the clipped value loss
    against targets.returns (token mean) is added; a critic that shares the policy's backbone reads the hidden
    states of the policy's own forward pass. train_policy=False (critic warm-up) trains the critic alone: no policy
    loss, and a shared critic trains only its head (the policy's pass runs without gradients).
    Log-probs, entropy and the loss are fp32 whatever passes.precision. Also returns logp_mismatch: mean
    |logp_old − logp| over the valid tokens of the first micro-batch (of each rank), before any update — the
    numeric gap between the model that computed logp_old (the rollout copy) and the trained policy.
    targets.logp_old=None (a batch used for one optimizer step by the policy that sampled it): π_old is the
    update's own log-probs, detached (ratio 1), so no separate pass computes them; they are returned as
    stats["logp_old"] [B, L], and with passes.image_token_id the attention bucket masses of the same passes as
    stats["attention_masses"] [layers, B, L, 4] (utils/attention.py).
    A non-finite loss or gradient skips that optimizer step with a warning.
    Under torchrun (utils/distributed.py) `batch` is this rank's share of the global batch: the normalisers are
    the global counts of each mini-batch, every rank runs as many micro-batch passes as the busiest one (the
    extra ones with zero weight), and the statistics are global.
    """
    n, micro = len(batch), optim.micro_batch_size
    own_old = targets.logp_old is None
    if own_old and optim.epochs * optim.mini_batches != 1:
        raise ValueError("logp_old=None (π_old from the update itself) needs a batch used once: "
                         "epochs × mini_batches = 1")
    own_logp, own_masses = [], []
    shared_critic = critic is not None and critic.backbone is backbone(policy)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    stats = {"loss": 0.0, "entropy": 0.0, "grad_norm": 0.0}
    flag_sums = {}  # statistic -> sum over loss tokens: the loss's own (clip fractions, kl), the critic's
    counted_tokens, valid_tokens, updates, skipped = 0, 0, 0, 0
    mismatch_tokens = 0  # valid tokens behind logp_mismatch
    device = compute_device(policy)
    generator = torch.Generator().manual_seed(0)
    for _ in range(optim.epochs):
        order = torch.randperm(n, generator=generator) if optim.mini_batches > 1 else torch.arange(n)
        for mb_rows in order.tensor_split(optim.mini_batches):
            mb_rows = mb_rows.tolist()
            own_tokens = 0 if targets.padding else int(targets.loss_mask[mb_rows].sum())
            totals = all_reduce_sum([own_tokens, 0 if targets.padding else len(mb_rows)])  # tokens, sequences
            n_micro = equal_passes(len(mb_rows), micro)  # FSDP: the same number of passes on all ranks
            selection = token_selection(policy, batch, targets, mb_rows, n_micro, micro, loss, passes) \
                if needs_token_selection(loss) else None  # TOP_ENTROPY_QUANTILE, Clip-Cov, KL-Cov
            optimizer.zero_grad(set_to_none=True)
            mb_loss, mb_policy_loss = 0.0, 0.0  # the optimised loss, and its policy part
            for start in range(0, n_micro * micro, micro):
                rows = mb_rows[start : start + micro]
                weight = 0.0 if targets.padding or not rows else 1.0  # 0: a pass that only joins the collectives
                rows = rows or [0]
                mask = targets.loss_mask[rows].to(device) * weight
                inputs, ids = slice_inputs(batch.prompt_inputs, rows), batch.completion_ids[rows]
                record = own_old and passes.image_token_id is not None
                with (torch.set_grad_enabled(train_policy), autocast(passes.precision, device),
                      BucketMasses(policy, inputs, batch.completion_mask[rows], passes.image_token_id) if record
                      else contextlib.nullcontext() as collector):
                    hidden = completion_hidden_states(backbone(policy), inputs, ids, batch.completion_mask[rows])
                    logp, entropy = logprobs_from_hidden(policy, hidden, ids, passes.temperature, with_entropy=True)
                if own_old:
                    old = logp.detach()
                    if weight:
                        own_logp.append(old.cpu())
                        if record:
                            own_masses.append(collector.values.cpu())
                else:
                    old = targets.logp_old[rows].to(device)
                if "logp_mismatch" not in stats:  # the first micro-batch, before any optimizer step
                    valid = batch.completion_mask[rows].to(device).bool()
                    stats["logp_mismatch"] = (logp.detach() - old)[valid].abs().mean().item()
                    mismatch_tokens = int(valid.sum()) if weight else 0
                adv = targets.advantages[rows].to(device)  # [b] per sequence, or [b, L] per token
                adv = adv.unsqueeze(1) if adv.dim() == 1 else adv
                ref = targets.ref_logp[rows].to(device) if targets.ref_logp is not None else None
                selected = {k: v[start : start + micro].to(device) for k, v in selection.items()} \
                    if selection is not None and weight else None
                sampler = batch.sampler_logp[rows].to(device) if batch.sampler_logp is not None else None
                loss_value, sums = policy_loss(logp, old, adv, mask, loss, totals, ref, entropy, selected, sampler)
                mb_policy_loss += loss_value.item()
                total_loss = loss_value if train_policy else 0.0
                if critic is not None:  # a shared critic reads the policy's own pass; a separate one runs its own
                    with autocast(passes.precision, device):
                        values = critic.values(hidden) if shared_critic else critic(inputs, ids,
                                                                                    batch.completion_mask[rows])
                    value_loss, value_sums = critic_loss(critic, values, targets, rows, mask, totals)
                    total_loss = total_loss + value_loss
                    sums.update(value_sums)
                total_loss.backward()
                mb_loss += total_loss.item()
                for k, v in sums.items():
                    flag_sums[k] = flag_sums.get(k, 0.0) + v
                with torch.no_grad():  # entropy over every valid token
                    valid = batch.completion_mask[rows].to(device).float() * weight
                    stats["entropy"] += (entropy * valid).sum().item()
                    valid_tokens += valid.sum().item()
            counted_tokens += totals[0]
            mb_loss, mb_policy_loss = all_reduce_sum([mb_loss, mb_policy_loss])
            grad_norm = grad_norm_value(torch.nn.utils.clip_grad_norm_(params, optim.max_grad_norm))
            if not (math.isfinite(mb_loss) and math.isfinite(grad_norm)):
                optimizer.zero_grad(set_to_none=True)
                skipped += 1
                warn(f"non-finite loss ({mb_loss}) or gradient norm ({grad_norm}); optimizer step skipped")
                continue
            optimizer.step()
            stats["loss"] += mb_policy_loss
            stats["grad_norm"] += grad_norm
            updates += 1
    return finish_statistics(stats, flag_sums, valid_tokens, counted_tokens, mismatch_tokens, updates, skipped,
                             (own_logp, own_masses) if own_old else None)


def token_selection(policy, batch, targets, rows, n_micro, micro, loss, passes):
    """utils.rl.select_tokens over the mini-batch `rows`, from the policy's log-probs and entropies before its
    update: one pass without gradients (n_micro passes of `micro` rows, as many on every rank). Returns
    {name: [len(rows), L] bool} on the CPU."""
    device = compute_device(policy)
    logps, entropies = [], []
    for start in range(0, n_micro * micro, micro):
        chunk = rows[start : start + micro]
        inputs, ids = slice_inputs(batch.prompt_inputs, chunk or [0]), batch.completion_ids[chunk or [0]]
        with torch.no_grad(), autocast(passes.precision, device):
            hidden = completion_hidden_states(backbone(policy), inputs, ids, batch.completion_mask[chunk or [0]])
            logp, entropy = logprobs_from_hidden(policy, hidden, ids, passes.temperature, with_entropy=True)
        if chunk:
            logps.append(logp.float().cpu())
            entropies.append(entropy.float().cpu())
    own = 0.0 if targets.padding else 1.0  # a padding rank adds no token
    mask = targets.loss_mask[rows] * own
    keys = None
    if loss.policy_loss in ("clip_cov", "kl_cov"):  # Clip-Cov's draw, KL-Cov's tie-break: new each batch, the
        # same for a token on every split
        seed = int(all_reduce_sum(float((batch.completion_ids[rows] * batch.completion_mask[rows] * own).sum())))
        keys = rank_uniform(0 if targets.padding else len(rows), mask.shape[1], seed)  # a padding rank: no rows
        keys = torch.ones_like(mask) if targets.padding else keys  # (its tokens are never chosen: its mask is 0)
    return select_tokens(torch.cat(logps), torch.cat(entropies), targets.advantages[rows], mask, loss,
                         gather_rows, keys)


def critic_loss(critic, values, targets, rows, mask, totals):
    """VF_COEF × the clipped value loss of a micro-batch — its share of the mini-batch's token mean — and the sums
    of its statistics. values: the critic's V of the micro-batch's `rows` [b, L]; mask, totals: as for the policy
    loss (utils.rl.policy_loss)."""
    value_loss, value_clipped = clipped_value_loss(values, targets.values_old[rows].to(mask.device),
                                                   targets.returns[rows].to(mask.device), critic.spec.clip_range_value)
    with torch.no_grad():
        sums = {"value_loss": (value_loss * mask).sum().item(),
                "value_clip_frac": (value_clipped.float() * mask).sum().item()}
    return critic.spec.vf_coef * aggregate(value_loss, mask, "token", *totals), sums


def finish_statistics(stats, flag_sums, valid_tokens, counted_tokens, mismatch_tokens, updates, skipped, own):
    """The update's statistics from this rank's sums: global sums, then means over the tokens that carry loss
    (flag_sums: the loss's, e.g. clip_frac_low and kl, and the critic's value_*), over every valid token (entropy),
    over the optimizer steps (loss, grad_norm); π_old and the attention masses of the update's own passes when it
    computed them (`own`)."""
    names = list(flag_sums)
    *totals, entropy, valid_tokens = all_reduce_sum([flag_sums[k] for k in names] + [stats["entropy"], valid_tokens])
    means = {k: total / max(counted_tokens, 1) for k, total in zip(names, totals)}
    per_step = {k: stats[k] / updates if updates else float("nan") for k in ("loss", "grad_norm")}
    out = {"loss": per_step["loss"], "entropy": entropy / max(valid_tokens, 1),
           **{k: v for k, v in means.items() if not k.startswith("value_")}, "grad_norm": per_step["grad_norm"],
           **{k: v for k, v in means.items() if k.startswith("value_")},
           "logp_mismatch": all_reduce_mean(stats.get("logp_mismatch", float("nan")), mismatch_tokens),
           "updates": updates, "skipped_updates": skipped}
    if own is not None:
        out["logp_old"] = torch.cat(own[0])
        if own[1]:
            out["attention_masses"] = torch.cat(own[1], 1)
    return out


def needs_old_logprob_pass(optim, policy_generates, attention_before_update):
    """Whether π_old needs a forward pass of its own before the update. Not when the batch is used for one
    optimizer step (PPO_EPOCHS × MINI_BATCHES = 1) by the policy that sampled it (one model, one precision):
    π_old is then the update's own log-probs, detached (ratio 1), as in TRL and verl — unless the advantages need
    the attention masses before the update (VGR token weights, the MDI reward)."""
    return optim.epochs * optim.mini_batches > 1 or not policy_generates or attention_before_update


def learning_rate_at(step, total_steps, base_lr, schedule, warmup_steps=0):
    """Learning rate of training step `step` (1-based): constant, or a cosine from base_lr towards 0; during the
    first `warmup_steps` steps multiplied by step / warmup_steps (a linear warm-up; 0 = none).

    Why a warm-up: AdamW's first steps with fresh moments move every weight by about the learning rate whatever its
    gradient's size (the update is m / sqrt(v), near sign(g)). From a model that is already trained, where the
    policy gradient of a step is mostly noise, that alone undoes it: one step at 5e-4 took the tiny VLM's held-out
    accuracy from 0.975 to 0.512 (docs/algorithms.md)."""
    if schedule == "constant":
        lr = base_lr
    elif schedule == "cosine":
        lr = base_lr * 0.5 * (1 + math.cos(math.pi * (step - 1) / max(total_steps, 1)))
    else:
        raise ValueError(f"LR_SCHEDULE must be 'constant' or 'cosine', got {schedule!r}")
    return lr * step / warmup_steps if warmup_steps and step <= warmup_steps else lr


def set_learning_rate(optimizer, step, optim):
    """Set each parameter group's learning rate for training step `step` on the OptimSpec's schedule and warm-up,
    from the group's own base_lr when it has one (PPO's critic), else LEARNING_RATE; returns the first group's."""
    for group in optimizer.param_groups:
        group["lr"] = learning_rate_at(step, optim.total_steps, group.get("base_lr", optim.learning_rate),
                                       optim.lr_schedule, optim.lr_warmup_steps)
    return optimizer.param_groups[0]["lr"]
