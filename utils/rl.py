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


def clipped_surrogate(logp, logp_old, advantages, loss):
    """PPO's clipped surrogate, per token: -min(r·A, clip(r, 1 - ε_low, 1 + ε_high)·A), r = exp(logp - logp_old)
    (Schulman et al. 2017; DAPO's Clip-Higher is ε_high > ε_low). With DUAL_CLIP_C = c > 1 (Ye et al. 2020) the
    loss of a negative-advantage token is also bounded by -c·A, so a huge ratio on a bad token cannot blow up the
    update.

    logp, logp_old: [B, L]; advantages: [B, L] (or [B, 1]); loss: the LossSpec (clip_low, clip_high, dual_clip).
    Returns (loss [B, L], {flag: [B, L] bool}): the tokens whose gradient a clip removed — ratio below 1 - ε_low
    with A < 0 (clip_frac_low), above 1 + ε_high with A > 0 (clip_frac_high), or beyond the dual clip
    (clip_frac_dual).
    """
    ratio = torch.exp(logp - logp_old)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1 - loss.clip_low, 1 + loss.clip_high) * advantages
    per_token = -torch.minimum(unclipped, clipped)
    flags = {"clip_frac_low": (ratio < 1 - loss.clip_low) & (advantages < 0),
             "clip_frac_high": (ratio > 1 + loss.clip_high) & (advantages > 0),
             "clip_frac_dual": torch.zeros_like(per_token, dtype=torch.bool)}
    if loss.dual_clip:
        bound = -loss.dual_clip * advantages  # > 0 where A < 0
        flags["clip_frac_dual"] = (advantages < 0) & (per_token > bound)
        per_token = torch.where(flags["clip_frac_dual"], bound.expand_as(per_token), per_token)
    return per_token, flags


# POLICY_LOSS -> fn(logp, logp_old, advantages, loss spec) -> (per-token loss [B, L], {statistic: [B, L] bool}).
# A new loss is one function here, one entry in this table and its name among LossSpec's POLICY_LOSS choices.
POLICY_LOSSES = {"clip": clipped_surrogate}


def policy_loss(logp, logp_old, advantages, mask, loss, totals, ref_logp=None, entropy=None):
    """The policy objective of one micro-batch, as its share of the mini-batch's loss (utils/update.py sums the
    shares): the POLICY_LOSS term, + β·k3 KL to the reference, − the entropy bonus, aggregated over the mask.

    logp, logp_old, mask, ref_logp (None: no KL term), entropy (None: no bonus): [b, L]; advantages: [b, L] or
    [b, 1]; loss: the LossSpec; totals: (valid tokens, sequences) of the whole mini-batch, over every rank — the
    normalisers that make the sum of the shares independent of how the mini-batch is split.
    Returns (loss: a scalar with gradients, {statistic: the sum over the mask's tokens, a float}): one entry per
    flag of the loss (e.g. clip_frac_low) and "kl"; utils/update.py divides them by the token count.
    """
    per_token, flags = POLICY_LOSSES[loss.policy_loss](logp, logp_old, advantages, loss)
    kl = k3_kl(logp, ref_logp) if ref_logp is not None else torch.zeros_like(logp)
    per_token = per_token + loss.kl_beta * kl - loss.entropy_coef * (entropy if entropy is not None else 0.0)
    with torch.no_grad():
        m = mask.float()
        stats = {name: (flag.float() * m).sum().item() for name, flag in flags.items()}
        stats["kl"] = (kl * m).sum().item()
    return aggregate(per_token, mask, loss.aggregation, *totals), stats


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


def loss_tokens(batch, overlong_filtering):
    """The loss mask of a Rollout [B, L] float: its completion tokens, and with OVERLONG_FILTERING (DAPO) none of a
    completion cut at the length limit."""
    mask = batch.completion_mask.float()
    return overlong_loss_mask(mask, batch.truncated) if overlong_filtering else mask


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
