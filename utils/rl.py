"""The policy-gradient math of GRPO, DAPO and PPO (SPEC §5). Pure functions on tensors.

Shapes: B = sequences in the batch, L = completion length. A group is the completions of one prompt; groups are
contiguous rows, and `group_sizes` lists their sizes (G each, or more after DAPO's top-up sampling).
`mask` is 1 on real completion tokens (up to and including the end token).
"""

import math

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


def clip_terms(ratio, advantages, low, high):
    """-min(r·A, clip(r, 1 - low, 1 + high)·A) per token, and the tokens whose gradient the clip removed: ratio
    below 1 - low with A < 0 (clip_frac_low), above 1 + high with A > 0 (clip_frac_high). All [B, L]."""
    per_token = -torch.minimum(ratio * advantages, torch.clamp(ratio, 1 - low, 1 + high) * advantages)
    flags = {"clip_frac_low": (ratio < 1 - low) & (advantages < 0),
             "clip_frac_high": (ratio > 1 + high) & (advantages > 0)}
    return per_token, flags


def sequence_mean(values, mask=None):
    """Each row's mean over its mask's tokens (None: all), [B, L] -> [B, 1] (0 for a row without any)."""
    mask = torch.ones_like(values) if mask is None else mask.to(values.dtype)
    return (values * mask).sum(1, keepdim=True) / mask.sum(1, keepdim=True).clamp(min=1)


def clipped_surrogate(logp, logp_old, advantages, loss, mask=None, chosen=None):
    """PPO's clipped surrogate, per token: -min(r·A, clip(r, 1 - ε_low, 1 + ε_high)·A), r = exp(logp - logp_old)
    (Schulman et al. 2017; DAPO's Clip-Higher is ε_high > ε_low). With DUAL_CLIP_C = c > 1 (Ye et al. 2020) the
    loss of a negative-advantage token is also bounded by -c·A, so a huge ratio on a bad token cannot blow up the
    update.

    The signature of every POLICY_LOSSES entry: logp, logp_old: [B, L]; advantages: [B, L] or [B, 1]; loss: the
    LossSpec; mask: [B, L], the loss tokens (None: all; the sequence-level losses average over them); chosen:
    [B, L] bool, the tokens a covariance loss picked (select_tokens), else None.
    Returns (loss [B, L], {statistic: [B, L] bool or float}): here the tokens whose gradient a clip removed —
    ratio below 1 - ε_low with A < 0 (clip_frac_low), above 1 + ε_high with A > 0 (clip_frac_high), or beyond the
    dual clip (clip_frac_dual). policy_loss logs each statistic's mean over the loss tokens as policy/<name>.
    """
    per_token, flags = clip_terms(torch.exp(logp - logp_old), advantages, loss.clip_low, loss.clip_high)
    flags["clip_frac_dual"] = torch.zeros_like(per_token, dtype=torch.bool)
    if loss.dual_clip:
        bound = -loss.dual_clip * advantages  # > 0 where A < 0
        flags["clip_frac_dual"] = (advantages < 0) & (per_token > bound)
        per_token = torch.where(flags["clip_frac_dual"], bound.expand_as(per_token), per_token)
    return per_token, flags


def gspo(logp, logp_old, advantages, loss, mask=None, chosen=None):
    """GSPO (Zheng et al. 2025, arXiv:2507.18071): one ratio per sequence, s = exp(mean_t log r_t), in
    -min(s·A, clip(s, 1 - ε_low, 1 + ε_high)·A), carried by each token of the sequence (GSPO_CLIP_EPS_LOW/HIGH,
    published 3e-4 / 4e-4: s moves far less than a token's ratio). The paper's objective is the mean over sequences:
    LOSS_AGGREGATION="sample"; under "token" a sequence counts by its length. Statistics: clip_frac_low/high (tokens
    of clipped sequences), seq_log_ratio_abs (mean |log s|, the spread of the sequence ratios)."""
    log_s = sequence_mean(logp - logp_old, mask)  # [B, 1]
    per_token, flags = clip_terms(torch.exp(log_s).expand_as(logp), advantages, loss.gspo_clip_low,
                                  loss.gspo_clip_high)
    return per_token, {**flags, "seq_log_ratio_abs": log_s.detach().abs().expand_as(logp)}


def gspo_token(logp, logp_old, advantages, loss, mask=None, chosen=None):
    """GSPO-token (Zheng et al. 2025): each token's ratio is sg(s)·π(y_t)/sg(π(y_t)) — the value of the sequence
    ratio s, the gradient of its own log-prob — so per-token advantages (PPO's GAE, VGR token weights) apply; with
    one advantage per sequence it equals GSPO in value and gradient. Statistics as GSPO's."""
    log_s = sequence_mean(logp - logp_old, mask).detach()  # [B, 1]
    ratio = torch.exp(logp - logp.detach() + log_s)  # value s, gradient s·∇log π(y_t)
    per_token, flags = clip_terms(ratio, advantages, loss.gspo_clip_low, loss.gspo_clip_high)
    return per_token, {**flags, "seq_log_ratio_abs": log_s.abs().expand_as(logp)}


def cispo(logp, logp_old, advantages, loss, mask=None, chosen=None):
    """CISPO (MiniMax-M1, arXiv:2506.13585): -sg(clip(r, 1 - ε_low, 1 + ε_high))·A·log π — the importance weight is
    clipped and detached, and every token keeps its gradient (none is dropped by a clip). CISPO_EPS_LOW 1.0 (no
    lower bound, as in the paper) and CISPO_EPS_HIGH 4.0 (ScaleRL's CISPO; MiniMax-M1 tuned it without publishing a
    value). Statistics: is_clip_frac_low/high (tokens whose weight was clipped)."""
    ratio = torch.exp(logp - logp_old)
    weight = torch.clamp(ratio, 1 - loss.cispo_clip_low, 1 + loss.cispo_clip_high).detach()
    return -weight * advantages * logp, {"is_clip_frac_low": ratio < 1 - loss.cispo_clip_low,
                                         "is_clip_frac_high": ratio > 1 + loss.cispo_clip_high}


def sapo(logp, logp_old, advantages, loss, mask=None, chosen=None):
    """SAPO (Gao et al. 2025, arXiv:2511.20347): a soft gate instead of the hard clip, -A·(4/τ)·σ(τ(r - 1)) with
    τ = SAPO_TAU_POS for A > 0 and SAPO_TAU_NEG for A < 0 (published 1.0 / 1.05). Its gradient is the policy
    gradient times the gate 4·σ(1 - σ) (1 at r = 1, fading smoothly as r leaves 1). Statistics: gate_mean (mean
    gate), gate_frac_below_half (tokens whose gradient the gate more than halved)."""
    ratio = torch.exp(logp - logp_old)
    tau = torch.where(advantages > 0, loss.sapo_tau_pos, loss.sapo_tau_neg)
    sigma = torch.sigmoid(tau * (ratio - 1))
    gate = (4 * sigma * (1 - sigma)).detach().expand_as(logp)
    return -advantages * (4 / tau) * sigma, {"gate_mean": gate, "gate_frac_below_half": gate < 0.5}


def gmpo(logp, logp_old, advantages, loss, mask=None, chosen=None):
    """GMPO (Zhao et al. 2025, arXiv:2507.20673): the geometric mean of a sequence's token ratios instead of their
    arithmetic mean, with each token's log-ratio clipped to [-ε, ε] (GMPO_CLIP_EPS, published 0.4) on the side the
    advantage pushes it: -A·exp(mean_t sgn(A)·min(sgn(A)·log r_t, sgn(A)·clip(log r_t, -ε, ε))), carried by each
    token of the sequence (a sequence-level objective, like GSPO's). Statistics: clip_frac (tokens whose log-ratio
    was clipped), seq_log_ratio_abs."""
    sign = torch.sign(advantages)
    log_ratio = logp - logp_old
    kept = sign * torch.minimum(sign * log_ratio, sign * log_ratio.clamp(-loss.gmpo_clip_eps, loss.gmpo_clip_eps))
    log_s = sequence_mean(kept, mask)  # [B, 1]
    per_token = (-advantages * torch.exp(log_s)).expand_as(logp)
    return per_token, {"clip_frac": (kept != log_ratio) & (advantages != 0),
                       "seq_log_ratio_abs": log_s.detach().abs().expand_as(logp)}


def clip_cov(logp, logp_old, advantages, loss, mask=None, chosen=None):
    """Clip-Cov (Cui et al. 2025, arXiv:2505.22617): the clipped surrogate with the gradient of a few tokens of high
    covariance between log-prob and advantage removed — `chosen`: CLIP_COV_FRACTION of the batch's tokens (published
    2e-4, at least one when > 0), drawn at random among those whose covariance lies in [CLIP_COV_LOW, CLIP_COV_HIGH]
    (published 1, 5; select_tokens). Such tokens drive entropy down most. Statistic: cov_frac (tokens detached)."""
    per_token, flags = clipped_surrogate(logp, logp_old, advantages, loss)
    if chosen is not None:
        per_token = torch.where(chosen, per_token.detach(), per_token)
    return per_token, {**flags, "cov_frac": torch.zeros_like(logp, dtype=torch.bool) if chosen is None else chosen}


def kl_cov(logp, logp_old, advantages, loss, mask=None, chosen=None):
    """KL-Cov (Cui et al. 2025): the clipped surrogate plus KL_COV_COEF·|log r| on the KL_COV_FRACTION of the batch's
    tokens with the highest covariance between log-prob and advantage (`chosen`, select_tokens; published for a 7B
    model: fraction 2e-3, coefficient 1). Statistic: cov_frac (tokens penalised). The paper applies it to the
    unclipped -r·A; here it is on the clipped surrogate, so KL_COV_COEF=0 is exactly POLICY_LOSS="clip"."""
    per_token, flags = clipped_surrogate(logp, logp_old, advantages, loss)
    if chosen is not None:
        per_token = per_token + loss.kl_cov_coef * chosen * (logp - logp_old).abs()
    return per_token, {**flags, "cov_frac": torch.zeros_like(logp, dtype=torch.bool) if chosen is None else chosen}


# POLICY_LOSS -> fn(logp, logp_old, advantages, loss, mask, chosen) -> (per-token loss [B, L], {statistic: [B, L]}).
# A new loss is one function here, one entry in this table and its name among LossSpec's POLICY_LOSS choices.
POLICY_LOSSES = {"clip": clipped_surrogate, "gspo": gspo, "gspo_token": gspo_token, "cispo": cispo, "sapo": sapo,
                 "gmpo": gmpo, "clip_cov": clip_cov, "kl_cov": kl_cov}


def rollout_weights(logp_old, sampler_logp, mask, loss):
    """ROLLOUT_CORRECTION's importance weight of each token for the gap between the sampler and the learner:
    w = π_old / π_sampler per token, or at ROLLOUT_CORRECTION_LEVEL="sequence" the product over the sequence's
    tokens (on each of them). "tis" (truncated importance sampling, Yao et al. 2025): min(w, ROLLOUT_TIS_CAP);
    "mis" (masked importance sampling): 1 where ROLLOUT_MIS_LOW <= w <= ROLLOUT_MIS_HIGH, else 0 (the token, or the
    whole sequence, leaves the loss). The weight is detached: it rescales a token's term, it is not trained.

    logp_old: the learner's π_old [b, L]; sampler_logp: the sampler's log-probs under the distribution it drew from
    [b, L] (utils.rollout.Rollout); mask: [b, L]. Returns (weight [b, L], {statistic: [b, L] bool}).
    """
    log_w = ((logp_old - sampler_logp) * mask).detach()
    if loss.rollout_correction_level == "sequence":
        log_w = log_w.sum(1, keepdim=True).expand_as(log_w)
    w = torch.exp(log_w)
    if loss.rollout_correction == "tis":
        return w.clamp(max=loss.rollout_tis_cap), {"rollout_tis_capped_frac": w > loss.rollout_tis_cap}
    keep = (w >= loss.rollout_mis_low) & (w <= loss.rollout_mis_high)
    return keep.to(logp_old.dtype), {"rollout_mis_masked_frac": ~keep}


def rollout_gap(logp, sampler_logp, sampler_log_kept, mask, pool=None):
    """How far the sampler's numbers are from the learner's, over the valid tokens: the rollout/ metrics.

    logp: the learner's log-probs of the sampled tokens (π_old) [B, L]; sampler_logp, sampler_log_kept: the sampler's
    (utils.rollout.Rollout) — compared under its full distribution (sampler_logp + sampler_log_kept), like with like,
    so that the numbers measure the numeric gap (bf16 copy, KV-cache decoding) and not top-p's truncation, which is
    reported on its own (log_kept_mean: the mean log of the mass top-p and suppression kept; 0 when they cut
    nothing). With r = π_learner / π_sampler per token: kl_k3 = mean(r − 1 − log r), an estimate of
    KL(π_sampler ‖ π_learner) from the sampler's tokens; chi2 = mean((r − 1)²); logp_diff_mean / _max over
    |log r|; ratio_outside_frac: tokens with r outside [0.5, 2]; seq_logp_diff_mean and seq_ratio_outside_frac: the
    same for the sequence's ratio (the product over its tokens). pool: as in whiten (every rank's rows)."""
    pool = pool or (lambda values: values)
    valid = mask.bool()
    d = (logp - (sampler_logp + sampler_log_kept)) * mask  # log r, 0 off the mask
    tokens, seq = pool(d[valid]), pool(d.sum(1)[valid.any(1)])
    if tokens.numel() == 0:
        return {}
    r = torch.exp(tokens)
    outside = lambda log_r: ((log_r < -math.log(2)) | (log_r > math.log(2))).float().mean().item()  # noqa: E731
    return {"rollout/kl_k3": (r - 1 - tokens).mean().item(), "rollout/chi2": ((r - 1) ** 2).mean().item(),
            "rollout/logp_diff_mean": tokens.abs().mean().item(), "rollout/logp_diff_max": tokens.abs().max().item(),
            "rollout/ratio_outside_frac": outside(tokens), "rollout/seq_logp_diff_mean": seq.abs().mean().item(),
            "rollout/seq_ratio_outside_frac": outside(seq),
            "rollout/log_kept_mean": pool(sampler_log_kept[valid]).mean().item()}


def policy_loss(logp, logp_old, advantages, mask, loss, totals, ref_logp=None, entropy=None, selected=None,
                sampler_logp=None):
    """The policy objective of one micro-batch, as its share of the mini-batch's loss (utils/update.py sums the
    shares): the POLICY_LOSS term, + β·k3 KL to the reference, − the entropy bonus, aggregated over the mask.

    logp, logp_old, mask, ref_logp (None: no KL term), entropy (None: no bonus): [b, L]; advantages: [b, L] or
    [b, 1]; loss: the LossSpec; totals: (valid tokens, sequences) of the whole mini-batch, over every rank — the
    normalisers that make the sum of the shares independent of how the mini-batch is split. selected: the token
    choices of select_tokens for these rows ({"high_entropy": [b, L] bool, "chosen": [b, L] bool}), or None:
    with TOP_ENTROPY_QUANTILE < 1 only the high-entropy tokens carry the POLICY_LOSS term (every token still
    counts in the normaliser, as in Wang et al. 2025). sampler_logp: [b, L], the sampler's log-probs, for
    ROLLOUT_CORRECTION (its weights rescale the POLICY_LOSS term, rollout_weights); None: no correction.
    Returns (loss: a scalar with gradients, {statistic: the sum over the mask's tokens, a float}): one entry per
    statistic of the loss (e.g. clip_frac_low), "kl", and "entropy_selected_frac" under TOP_ENTROPY_QUANTILE < 1;
    utils/update.py divides them by the token count.
    """
    selected = selected or {}
    per_token, flags = POLICY_LOSSES[loss.policy_loss](logp, logp_old, advantages, loss, mask, selected.get("chosen"))
    if "high_entropy" in selected:
        per_token = per_token * selected["high_entropy"]
        flags["entropy_selected_frac"] = selected["high_entropy"]
    if loss.rollout_correction and sampler_logp is not None:
        weight, correction_flags = rollout_weights(logp_old, sampler_logp, mask, loss)
        per_token = per_token * weight
        flags.update(correction_flags)
    kl = k3_kl(logp, ref_logp) if ref_logp is not None else torch.zeros_like(logp)
    per_token = per_token + loss.kl_beta * kl - loss.entropy_coef * (entropy if entropy is not None else 0.0)
    with torch.no_grad():
        m = mask.float()
        stats = {name: (flag.float() * m).sum().item() for name, flag in flags.items()}
        stats["kl"] = (kl * m).sum().item()
    return aggregate(per_token, mask, loss.aggregation, *totals, loss.max_new_tokens), stats


def needs_token_selection(loss):
    """Whether the loss picks tokens by batch statistics (select_tokens): TOP_ENTROPY_QUANTILE < 1, Clip-Cov, KL-Cov."""
    return loss.top_entropy_quantile < 1 or loss.policy_loss in ("clip_cov", "kl_cov")


def select_tokens(logp, entropy, advantages, mask, loss, pool=None, keys=None):
    """The tokens a loss picks by statistics of the whole mini-batch, computed once before its update from the
    policy's log-probs and entropies at that point, so that the choice does not depend on how the mini-batch is
    split into micro-batches or ranks (verl picks them within each micro-batch).

    logp, entropy, mask: [B, L] (mask: the loss tokens); advantages: [B] or [B, L]; pool: maps this rank's values to
    those of every rank (utils.distributed.gather_rows), None in one process; keys: [B, L] uniform random numbers for
    Clip-Cov's draw (utils.distributed.rank_uniform: the same for a token however the batch is split; None: drawn
    here; KL-Cov breaks its ties with them). Returns {"high_entropy": [B, L] bool}
    with TOP_ENTROPY_QUANTILE = q < 1 — the q fraction of the tokens with the highest entropy (Wang et al. 2025,
    "Beyond the 80/20 rule", arXiv:2506.01939, published q = 0.2) — and {"chosen": [B, L] bool} for Clip-Cov /
    KL-Cov: by the covariance (A - mean A)·(log π - mean log π) of each token, centred over the mini-batch.
    Clip-Cov draws its tokens among those inside its bounds: the ones with the smallest keys; KL-Cov takes exactly
    its k tokens, ties at the k-th covariance going to the smallest keys.
    """
    pool = pool or (lambda values: values)
    valid = mask.bool()
    n_valid = pool(logp[valid]).numel()
    out = {}
    if loss.top_entropy_quantile < 1:
        k = max(1, math.ceil(loss.top_entropy_quantile * n_valid))
        out["high_entropy"] = valid & (entropy >= kth_largest(pool(entropy[valid]), k))
    if loss.policy_loss in ("clip_cov", "kl_cov"):
        adv = (advantages.unsqueeze(1) if advantages.dim() == 1 else advantages).expand_as(logp)
        cov = (adv - pool(adv[valid]).mean()) * (logp - pool(logp[valid]).mean())
        fraction = loss.clip_cov_fraction if loss.policy_loss == "clip_cov" else loss.kl_cov_fraction
        k = max(1, int(fraction * n_valid)) if fraction > 0 else 0
        keys = torch.rand(logp.shape) if keys is None else keys
        if loss.policy_loss == "kl_cov":  # the k of highest covariance (many tokens tie: log π = 0 in fp32)
            out["chosen"] = top_k(cov, valid, k, keys, pool)
        else:  # k tokens drawn among those with covariance inside the bounds: the k smallest keys
            inside = valid & (cov > loss.clip_cov_low) & (cov < loss.clip_cov_high)
            out["chosen"] = inside & (-keys >= kth_largest(pool(-keys[inside]), k))
    return out


def top_k(values, valid, k, keys, pool):
    """Exactly k of the `valid` tokens (all of them when fewer) with the largest values, over every rank (pool); of
    the tokens tied at the k-th value, those with the smallest keys. values, valid, keys: [B, L]."""
    threshold = kth_largest(pool(values[valid]), k)
    above, tied = valid & (values > threshold), valid & (values == threshold)
    room = max(k - pool(values[above]).numel(), 0)
    return above | (tied & (-keys >= kth_largest(pool(-keys[tied]), room)))


def kth_largest(values, k):
    """The k-th largest of a 1-D tensor (+inf when k = 0: nothing reaches it; -inf when k exceeds its size)."""
    if k == 0:
        return float("inf")
    return values.topk(k).values[-1] if k <= values.numel() else float("-inf")


def k3_kl(logp, ref_logp):
    """Per-token k3 estimator of KL(π‖π_ref): exp(ref - logp) - (ref - logp) - 1 (≥ 0). [B, L] -> [B, L]."""
    log_ratio = ref_logp - logp
    return torch.exp(log_ratio) - log_ratio - 1


def aggregate(per_token, mask, level, total_tokens, total_sequences, max_new_tokens=None):
    """Reduce a per-token loss of a micro-batch to its share of the whole batch's loss.

    "token":    sum over the micro-batch's valid tokens / total_tokens (valid tokens of the whole batch) —
                DAPO's token-level mean; the sum of the shares over micro-batches is the same however the
                batch is split, and so is its gradient.
    "sample":   sum over sequences of each sequence's token mean / total_sequences — GRPO's sample-level mean.
    "constant": sum over the valid tokens / (total_sequences × max_new_tokens) — Dr.GRPO (Liu et al. 2025,
                arXiv:2503.20783): a normaliser that depends on neither the lengths nor the batch's token count.
    per_token, mask: [b, L]; returns a scalar.
    """
    mask = mask.to(per_token.dtype)
    if level == "token":
        return (per_token * mask).sum() / max(total_tokens, 1)
    if level == "sample":
        per_sequence = (per_token * mask).sum(1) / mask.sum(1).clamp(min=1)
        return per_sequence.sum() / max(total_sequences, 1)
    if level == "constant":
        return (per_token * mask).sum() / max(total_sequences * max_new_tokens, 1)
    raise ValueError(f"loss aggregation must be 'token', 'sample' or 'constant', got {level!r}")


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
