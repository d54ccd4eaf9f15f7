"""The policy-gradient math shared by GRPO and DAPO (SPEC §5). Pure functions on tensors.

Shapes: B = sequences in the batch (prompts × G, groups contiguous), L = completion length.
`mask` is 1 on real completion tokens (up to and including the end token).
"""

import torch


def group_advantages(rewards, group_size, scale_by_std=True, eps=1e-6):
    """GRPO advantage: (R - group mean) / (group std + eps), one value per sequence.

    rewards: [B] with B = n_groups * group_size. std is the unbiased sample std (as torch.std).
    Returns [B].
    """
    grouped = rewards.view(-1, group_size)  # [N, G]
    centred = grouped - grouped.mean(1, keepdim=True)
    if scale_by_std:
        centred = centred / (grouped.std(1, keepdim=True) + eps)
    return centred.view(-1)


def clipped_surrogate(logp, logp_old, advantages, clip_low, clip_high):
    """Per-token PPO loss -min(r·A, clip(r, 1-clip_low, 1+clip_high)·A), with r = exp(logp - logp_old).

    logp, logp_old: [B, L]; advantages: [B, L] (or [B, 1]). Returns (loss [B, L], clipped_low [B, L],
    clipped_high [B, L]) where the clip masks mark tokens whose gradient the clip removed: ratio below
    1-clip_low with A<0, or above 1+clip_high with A>0.
    """
    ratio = torch.exp(logp - logp_old)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1 - clip_low, 1 + clip_high) * advantages
    loss = -torch.minimum(unclipped, clipped)
    clipped_low = (ratio < 1 - clip_low) & (advantages < 0)
    clipped_high = (ratio > 1 + clip_high) & (advantages > 0)
    return loss, clipped_low, clipped_high


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


def informative_groups(accuracy, group_size):
    """DAPO dynamic-sampling filter: keep a group iff 0 < #correct < G (its rewards are not all equal).

    accuracy: [B] with 1 (or a positive value) for a correct completion. Returns a bool tensor [B // G].
    """
    correct = (accuracy.view(-1, group_size) > 0).sum(1)
    return (correct > 0) & (correct < group_size)


def overlong_loss_mask(mask, truncated):
    """DAPO overlong filtering: completions cut at the length limit (no end token) get loss weight 0.

    mask: [B, L]; truncated: [B] bool. Returns [B, L].
    """
    return mask * (~truncated).to(mask.dtype).unsqueeze(1)


def masked_mean(values, mask):
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1)
