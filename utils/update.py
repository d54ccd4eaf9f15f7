"""One update on a rollout batch: epochs × mini-batches × micro-batches (gradient accumulation), of the policy
and, for PPO, of the critic."""

import contextlib
import math

import torch

from utils.attention import BucketMasses
from utils.distributed import all_reduce_mean, all_reduce_sum, equal_passes, grad_norm_value
from utils.logprobs import completion_hidden_states, logprobs_from_hidden
from utils.precision import autocast
from utils.rl import aggregate, clipped_surrogate, clipped_value_loss, k3_kl
from utils.rollout import slice_inputs


def policy_update(policy, optimizer, batch, advantages, logp_old, loss_mask, *, ref_logp=None, clip_low, clip_high,
                  kl_beta, entropy_coef, aggregation, epochs, mini_batches, micro_batch_size, max_grad_norm,
                  temperature, precision="fp32", dual_clip=0.0, critic=None, values_old=None, returns=None,
                  vf_coef=0.0, clip_range_value=0.0, train_policy=True, image_token_id=None, batch_is_padding=False,
                  warn=print):
    """Optimise the clipped surrogate (+ β·k3 − entropy bonus) on `batch`; returns mean statistics.

    advantages: [B] per sequence (broadcast over tokens) or [B, L] per token; logp_old, ref_logp, loss_mask: [B, L].
    Each mini-batch is one optimizer step; its loss is normalised by the mini-batch's total valid tokens
    (token level) or sequences (sample level), so splitting it into micro-batches does not change it.
    With a `critic` (PPO), VF_COEF × the clipped value loss against `returns` (token mean; values_old, returns:
    [B, L]) is added; a critic that shares the policy's backbone reads the hidden states of the policy's own
    forward pass. train_policy=False (critic warm-up) trains the critic alone: no policy loss, and a shared critic
    trains only its head (the policy's pass runs without gradients), so the policy does not move.
    Forward passes run in `precision` (utils/precision.py: bf16 autocast over fp32 weights, or fp32); log-probs,
    entropy and the loss are fp32. Also returns logp_mismatch: mean |logp_old − logp| over the valid tokens of
    the first micro-batch (of each rank), before any update — the numeric gap between the model that computed
    logp_old (the rollout copy) and the trained policy; 0 when they are one fp32 model.
    logp_old=None (a batch used for one optimizer step by the policy that sampled it): π_old is the update's own
    log-probs, detached (ratio 1), so no separate pass computes them; they are returned as stats["logp_old"]
    [B, L], and with `image_token_id` the attention bucket masses of the same forward passes as
    stats["attention_masses"] [layers, B, L, 4] (utils/attention.py).
    A non-finite loss or gradient skips that optimizer step with a warning.
    Under torchrun (utils/distributed.py) `batch` is this rank's share of the global batch: the normalisers are
    the global counts of each mini-batch, every rank runs as many micro-batch passes as the busiest one (the
    extra ones with zero weight), and the statistics are global. batch_is_padding: this rank has nothing to train
    on this step (dynamic sampling left it no informative group); it runs its passes on `batch` with zero weight.
    """
    n = len(batch)
    own_old = logp_old is None
    if own_old and epochs * mini_batches != 1:
        raise ValueError("logp_old=None (π_old from the update itself) needs a batch used once: epochs × mini_batches = 1")
    own_logp, own_masses = [], []
    shared_critic = critic is not None and critic.backbone is policy.model
    params = [p for group in optimizer.param_groups for p in group["params"]]
    stats = {k: 0.0 for k in ("loss", "entropy", "clip_frac_low", "clip_frac_high", "clip_frac_dual", "kl",
                              "grad_norm")}
    if critic is not None:
        stats.update(value_loss=0.0, value_clip_frac=0.0)
    counted_tokens, valid_tokens, updates, skipped = 0, 0, 0, 0
    mismatch_tokens = 0  # valid tokens behind logp_mismatch
    device = next(policy.parameters()).device
    generator = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        order = torch.randperm(n, generator=generator) if mini_batches > 1 else torch.arange(n)
        for mb_rows in order.tensor_split(mini_batches):
            mb_rows = mb_rows.tolist()
            own_tokens = 0 if batch_is_padding else int(loss_mask[mb_rows].sum())
            total_tokens, total_sequences = all_reduce_sum([own_tokens, 0 if batch_is_padding else len(mb_rows)])
            n_micro = equal_passes(len(mb_rows), micro_batch_size)  # FSDP: the same number of passes on all ranks
            optimizer.zero_grad(set_to_none=True)
            mb_loss, mb_policy_loss = 0.0, 0.0  # the optimised loss, and its policy part
            for start in range(0, n_micro * micro_batch_size, micro_batch_size):
                rows = mb_rows[start : start + micro_batch_size]
                weight = 0.0 if batch_is_padding or not rows else 1.0  # 0: a pass that only joins the collectives
                rows = rows or [0]
                mask = loss_mask[rows].to(device) * weight
                inputs, ids = slice_inputs(batch.prompt_inputs, rows), batch.completion_ids[rows]
                record = own_old and image_token_id is not None
                with (torch.set_grad_enabled(train_policy), autocast(precision, device),
                      BucketMasses(policy, inputs, batch.completion_mask[rows], image_token_id) if record
                      else contextlib.nullcontext() as collector):
                    hidden = completion_hidden_states(policy.model, inputs, ids, batch.completion_mask[rows])
                    logp, entropy = logprobs_from_hidden(policy, hidden, ids, temperature, with_entropy=True)
                if own_old:
                    old = logp.detach()
                    if weight:
                        own_logp.append(old.cpu())
                        if record:
                            own_masses.append(collector.values.cpu())
                else:
                    old = logp_old[rows].to(device)
                if "logp_mismatch" not in stats:  # the first micro-batch, before any optimizer step
                    valid = batch.completion_mask[rows].to(device).bool()
                    stats["logp_mismatch"] = (logp.detach() - old)[valid].abs().mean().item()
                    mismatch_tokens = int(valid.sum()) if weight else 0
                adv = advantages[rows].to(device)  # [b] per sequence, or [b, L] per token (token weights, PPO)
                adv = adv.unsqueeze(1) if adv.dim() == 1 else adv
                per_token, clipped_low, clipped_high, clipped_dual = clipped_surrogate(
                    logp, old, adv, clip_low, clip_high, dual_clip
                )
                kl = k3_kl(logp, ref_logp[rows].to(device)) if ref_logp is not None else torch.zeros_like(logp)
                per_token = per_token + kl_beta * kl - entropy_coef * entropy
                loss = aggregate(per_token, mask, aggregation, total_tokens, total_sequences)
                mb_policy_loss += loss.item()
                loss = loss if train_policy else 0.0
                if critic is not None:
                    if shared_critic:  # one forward pass of the shared backbone serves the policy and the critic
                        values = critic.values(hidden)
                    else:
                        with autocast(precision, device):
                            values = critic(inputs, ids, batch.completion_mask[rows])
                    value_loss, value_clipped = clipped_value_loss(values, values_old[rows].to(device),
                                                                   returns[rows].to(device), clip_range_value)
                    loss = loss + vf_coef * aggregate(value_loss, mask, "token", total_tokens, total_sequences)
                    with torch.no_grad():
                        stats["value_loss"] += (value_loss * mask).sum().item()
                        stats["value_clip_frac"] += (value_clipped.float() * mask).sum().item()
                loss.backward()
                mb_loss += loss.item()
                with torch.no_grad():  # token-weighted sums; divided by the token counts at the end
                    m, valid = mask.float(), batch.completion_mask[rows].to(device).float() * weight
                    stats["entropy"] += (entropy * valid).sum().item()  # over every valid token
                    valid_tokens += valid.sum().item()
                    stats["clip_frac_low"] += (clipped_low.float() * m).sum().item()
                    stats["clip_frac_high"] += (clipped_high.float() * m).sum().item()
                    stats["clip_frac_dual"] += (clipped_dual.float() * m).sum().item()
                    stats["kl"] += (kl * m).sum().item()
            counted_tokens += total_tokens
            mb_loss, mb_policy_loss = all_reduce_sum([mb_loss, mb_policy_loss])
            grad_norm = grad_norm_value(torch.nn.utils.clip_grad_norm_(params, max_grad_norm))
            if not (math.isfinite(mb_loss) and math.isfinite(grad_norm)):
                optimizer.zero_grad(set_to_none=True)
                skipped += 1
                warn(f"non-finite loss ({mb_loss}) or gradient norm ({grad_norm}); optimizer step skipped")
                continue
            optimizer.step()
            stats["loss"] += mb_policy_loss
            stats["grad_norm"] += grad_norm
            updates += 1
    # This rank's sums; loss and grad_norm are global already, logp_mismatch a mean (weighted by tokens below).
    summed = [k for k in stats if k not in ("loss", "grad_norm", "logp_mismatch")]
    *totals, valid_tokens = all_reduce_sum([stats[k] for k in summed] + [valid_tokens])
    stats.update(zip(summed, totals))
    stats["logp_mismatch"] = all_reduce_mean(stats.get("logp_mismatch", float("nan")), mismatch_tokens)
    stats["entropy"] /= max(valid_tokens, 1)
    for k in ("clip_frac_low", "clip_frac_high", "clip_frac_dual", "kl", "value_loss", "value_clip_frac"):
        if k in stats:  # means over the tokens that carry loss
            stats[k] /= max(counted_tokens, 1)
    for k in ("loss", "grad_norm"):
        stats[k] = stats[k] / updates if updates else float("nan")
    stats["updates"], stats["skipped_updates"] = updates, skipped
    if own_old:
        stats["logp_old"] = torch.cat(own_logp)
        if own_masses:
            stats["attention_masses"] = torch.cat(own_masses, 1)
    return stats


def needs_old_logprob_pass(updates_per_batch, policy_generates, attention_before_update):
    """Whether π_old needs a forward pass of its own before the update. Not when the batch is used for one
    optimizer step (PPO_EPOCHS × MINI_BATCHES = 1) by the policy that sampled it (one model, one precision):
    π_old is then the update's own log-probs, detached (ratio 1), as in TRL and verl — unless the advantages need
    the attention masses before the update (VGR token weights, the MDI reward)."""
    return updates_per_batch > 1 or not policy_generates or attention_before_update


def learning_rate_at(step, total_steps, base_lr, schedule):
    """Learning rate of training step `step` (1-based): constant, or a cosine from base_lr towards 0."""
    if schedule == "constant":
        return base_lr
    if schedule == "cosine":
        return base_lr * 0.5 * (1 + math.cos(math.pi * (step - 1) / max(total_steps, 1)))
    raise ValueError(f"LR_SCHEDULE must be 'constant' or 'cosine', got {schedule!r}")
