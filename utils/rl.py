"""The policy-gradient math of GRPO, DAPO and PPO (SPEC §5). Pure functions on tensors.

Shapes: B = sequences in the batch, L = completion length. A group is the completions of one prompt; groups are
contiguous rows, and `group_sizes` lists their sizes (G each, or more after DAPO's top-up sampling).
`mask` is 1 on real completion tokens (up to and including the end token).
"""

import torch


def group_advantages(rewards, group_sizes, scale_by_std=True, eps=1e-6):
    """GRPO advantage: (R - group mean) / (group std + eps), one value per sequence.

    rewards: [B] with B = sum(group_sizes). std is the unbiased sample std (as torch.std).
    scale_by_std=False gives Dr.GRPO's advantage R - group mean. Returns [B].
    """
    out = []
    for group in rewards.split(list(group_sizes)):  # [n] each
        centred = group - group.mean()
        out.append(centred / (group.std() + eps) if scale_by_std else centred)
    return torch.cat(out)


def clipped_surrogate(logp, logp_old, advantages, clip_low, clip_high, dual_clip=0.0):
    """Per-token PPO loss -min(r·A, clip(r, 1-clip_low, 1+clip_high)·A), with r = exp(logp - logp_old).

    dual_clip = c > 1 (Ye et al. 2020) also bounds the loss of a negative-advantage token by -c·A, so a huge
    ratio on a bad token cannot blow up the update; 0 = off.
    logp, logp_old: [B, L]; advantages: [B, L] (or [B, 1]). Returns (loss [B, L], clipped_low [B, L],
    clipped_high [B, L], clipped_dual [B, L]) where the clip masks mark tokens whose gradient a clip removed:
    ratio below 1-clip_low with A<0, above 1+clip_high with A>0, or above c with A<0 (dual clip).
    """
    ratio = torch.exp(logp - logp_old)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1 - clip_low, 1 + clip_high) * advantages
    loss = -torch.minimum(unclipped, clipped)
    clipped_low = (ratio < 1 - clip_low) & (advantages < 0)
    clipped_high = (ratio > 1 + clip_high) & (advantages > 0)
    clipped_dual = torch.zeros_like(clipped_low)
    if dual_clip:
        bound = -dual_clip * advantages  # > 0 where A < 0
        clipped_dual = (advantages < 0) & (loss > bound)
        loss = torch.where(clipped_dual, bound.expand_as(loss), loss)
    return loss, clipped_low, clipped_high, clipped_dual


def k3_kl(logp, ref_logp):
    """Per-token k3 estimator of KL(π‖π_ref): exp(ref - logp) - (ref - logp) - 1 (≥ 0). [B, L] -> [B, L]."""
    log_ratio = ref_logp - logp
    return torch.exp(log_ratio) - log_ratio - 1


def aggregate(per_token, mask, level, total_tokens, total_sequences):
    """Reduce a per-token loss of a micro-batch to its share of the whole batch's loss.

    "token":  sum over the micro-batch's valid tokens / total_tokens (valid tokens of the whole batch) —
              DAPO's token-level mean; the sum of the shares over micro-batches is the same however the
              batch is split, and so is its gradient.
    "sample": sum over sequences of each sequence's token mean / total_sequences — GRPO's sample-level mean.
    per_token, mask: [b, L]; returns a scalar.
    """
    mask = mask.to(per_token.dtype)
    if level == "token":
        return (per_token * mask).sum() / max(total_tokens, 1)
    if level == "sample":
        per_sequence = (per_token * mask).sum(1) / mask.sum(1).clamp(min=1)
        return per_sequence.sum() / max(total_sequences, 1)
    raise ValueError(f"loss aggregation must be 'token' or 'sample', got {level!r}")


def is_informative(accuracy):
    """DAPO dynamic-sampling filter for one group: 0 < #correct < n (its accuracies are not all equal).

    accuracy: [n] with a positive value for a correct completion (1, or +1 of the ±1 reward)."""
    correct = int((accuracy > 0).sum())
    return 0 < correct < len(accuracy)


def overlong_loss_mask(mask, truncated):
    """DAPO overlong filtering: completions cut at the length limit (no end token) get loss weight 0.

    mask: [B, L]; truncated: [B] bool. Returns [B, L].
    """
    return mask * (~truncated).to(mask.dtype).unsqueeze(1)


# ── PPO with a critic ────────────────────────────────────────────────────────────────────────────────────


def token_rewards(outcome, logp_old, ref_logp, mask, kl_coef):
    """PPO's per-token rewards: -kl_coef·k1 on every valid token, k1 = logp_old - ref_logp, plus the outcome
    reward on the last valid token. outcome: [B]; logp_old, ref_logp (None = no KL), mask: [B, L]. Returns [B, L]."""
    mask = mask.to(logp_old.dtype)
    rewards = torch.zeros_like(logp_old) if ref_logp is None else -kl_coef * (logp_old - ref_logp) * mask
    last = (mask.cumsum(1) == mask.sum(1, keepdim=True)) & (mask > 0)  # [B, L] the last valid token
    return rewards + last * outcome.unsqueeze(1).to(rewards.dtype)


def gae(rewards, values, mask, gamma, lam):
    """Generalised advantage estimation over the valid tokens of each completion (Schulman et al. 2016).

    δ_t = r_t + γ·V_{t+1} − V_t and A_t = δ_t + γλ·A_{t+1}, where t+1 is the next *valid* token and V = 0 after
    the last one; invalid tokens get A = 0. rewards, values, mask: [B, L]. Returns (advantages, returns =
    advantages + values), both [B, L] and zero where mask is 0.
    """
    mask = mask.to(values.dtype)
    advantages = torch.zeros_like(values)
    next_value = torch.zeros_like(values[:, 0])  # [B]
    next_advantage = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        m = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = delta + gamma * lam * next_advantage
        advantages[:, t] = advantage * m
        # A masked token passes its successor's value and advantage through unchanged.
        next_value = m * values[:, t] + (1 - m) * next_value
        next_advantage = m * advantage + (1 - m) * next_advantage
    return advantages, (advantages + values) * mask


def whiten(values, mask, eps=1e-8, pool=None):
    """(x − mean) / std over the valid tokens (mask 1), 0 elsewhere. [B, L] -> [B, L].
    pool: maps this batch's valid values to those the statistics run over (utils.distributed.gather_rows: the
    valid values of every rank, so the whole global batch is whitened as one)."""
    valid = values[mask.bool()]
    valid = pool(valid) if pool is not None else valid
    if valid.numel() < 2:  # nothing to normalise against
        return values * mask.to(values.dtype)
    return (values - valid.mean()) / (valid.std() + eps) * mask.to(values.dtype)


def clipped_value_loss(values, values_old, returns, clip_range):
    """Per-token PPO value loss 0.5·max((V − R)², (V_clipped − R)²), V_clipped = V_old + clip(V − V_old, ±clip_range).

    All [B, L]; clip_range 0 = no clipping. Returns (loss [B, L], clipped [B, L]: the clipped term was larger)."""
    unclipped = (values - returns) ** 2
    if not clip_range:
        return 0.5 * unclipped, torch.zeros_like(unclipped, dtype=torch.bool)
    clipped_values = values_old + torch.clamp(values - values_old, -clip_range, clip_range)
    clipped = (clipped_values - returns) ** 2
    return 0.5 * torch.maximum(unclipped, clipped), clipped > unclipped


def explained_variance(values, returns, mask, pool=None):
    """1 − Var(R − V) / Var(R) over the valid tokens: 1 = the critic predicts the returns perfectly, 0 = no better
    than their mean, < 0 = worse. NaN when the returns do not vary. pool: as in whiten."""
    valid = mask.bool()
    returns, values = returns[valid], values[valid]
    if pool is not None:
        returns, values = pool(returns), pool(values)
    var = returns.var()
    return (1 - (returns - values).var() / var).item() if var > 0 else float("nan")
