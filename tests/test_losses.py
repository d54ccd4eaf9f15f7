"""The POLICY_LOSS family (utils/rl.py): hand-computed values, and the reductions each loss must satisfy."""

import dataclasses
import math

import pytest
import torch

from utils.rl import (POLICY_LOSSES, aggregate, clipped_surrogate, cispo, gmpo, gspo, kl_cov,
                      needs_token_selection, policy_loss, rollout_gap, rollout_weights, sapo, select_tokens)


@pytest.fixture
def loss(specs):
    """dapo.py's LossSpec (clip 0.2 / 0.28); change fields with dataclasses.replace."""
    return specs.loss


def with_(spec, **fields):
    return dataclasses.replace(spec, **fields)


def grad_of(fn, logp):
    """(value, d value / d logp) of a scalar function of logp."""
    logp = logp.clone().requires_grad_()
    value = fn(logp)
    (grad,) = torch.autograd.grad(value, logp)
    return value.detach(), grad


def batch(seed=0, rows=4, length=5):
    generator = torch.Generator().manual_seed(seed)
    logp = -torch.rand(rows, length, generator=generator) * 2
    logp_old = logp + 0.3 * torch.randn(rows, length, generator=generator)
    mask = torch.ones(rows, length)
    mask[1, 3:] = 0  # uneven lengths
    mask[3, 2:] = 0
    advantages = torch.randn(rows, 1, generator=generator)
    return logp, logp_old, advantages, mask


# ── hand-computed values ─────────────────────────────────────────────────────────────────────────────────


def test_gspo_clips_the_sequence_ratio_exp_of_the_mean_log_ratio(loss):
    logp_old = torch.zeros(1, 2)
    logp = torch.tensor([[0.1, 0.3]])  # mean log-ratio 0.2: s = e^0.2
    spec = with_(loss, gspo_clip_low=0.1, gspo_clip_high=0.1)
    out, flags = gspo(logp, logp_old, torch.tensor([[1.0]]), spec)
    assert out.tolist()[0] == pytest.approx([-1.1, -1.1])  # A > 0: min(e^0.2, 1.1) = 1.1, on every token
    assert flags["clip_frac_high"].all() and flags["seq_log_ratio_abs"][0, 0].item() == pytest.approx(0.2)
    out, flags = gspo(logp, logp_old, torch.tensor([[-1.0]]), spec)
    assert out[0, 0].item() == pytest.approx(math.exp(0.2))  # A < 0: the unclipped term is the larger loss
    assert not flags["clip_frac_low"].any()


def test_gspo_averages_only_over_the_mask():
    logp_old = torch.zeros(1, 3)
    logp = torch.tensor([[0.2, 0.4, 9.0]])
    spec = type("Spec", (), {"gspo_clip_low": 1.0, "gspo_clip_high": 100.0})
    out, _ = gspo(logp, logp_old, torch.tensor([[1.0]]), spec, mask=torch.tensor([[1.0, 1.0, 0.0]]))
    assert out[0, 0].item() == pytest.approx(-math.exp(0.3))


def test_cispo_detaches_the_clipped_weight_and_keeps_every_gradient(loss):
    spec = with_(loss, cispo_clip_low=1.0, cispo_clip_high=0.5)
    logp_old = torch.log(torch.tensor([[0.2, 0.5]]))
    logp = torch.log(torch.tensor([[0.4, 0.25]]))  # ratios 2 (clipped to 1.5) and 0.5 (no lower bound)
    value, grad = grad_of(lambda lp: cispo(lp, logp_old, torch.tensor([[2.0]]), spec)[0].sum(), logp)
    assert grad.tolist()[0] == pytest.approx([-1.5 * 2.0, -0.5 * 2.0])  # -sg(w)·A: nothing is dropped
    flags = cispo(logp, logp_old, torch.tensor([[2.0]]), spec)[1]
    assert flags["is_clip_frac_high"].tolist() == [[True, False]] and not flags["is_clip_frac_low"].any()


def test_sapo_is_a_soft_gate_with_the_published_temperatures(loss):
    logp_old = torch.zeros(2, 1)
    logp = torch.tensor([[0.5], [0.5]])  # ratio e^0.5
    advantages = torch.tensor([[1.0], [-1.0]])
    out, flags = sapo(logp, logp_old, advantages, loss)
    r = math.exp(0.5)
    for row, (a, tau) in enumerate(((1.0, 1.0), (-1.0, 1.05))):
        sigma = 1 / (1 + math.exp(-tau * (r - 1)))
        assert out[row, 0].item() == pytest.approx(-a * 4 / tau * sigma)
        assert flags["gate_mean"][row, 0].item() == pytest.approx(4 * sigma * (1 - sigma))


def test_gmpo_clips_each_log_ratio_and_takes_the_geometric_mean(loss):
    logp_old = torch.zeros(1, 2)
    logp = torch.tensor([[0.1, 0.6]])  # log-ratios; 0.6 is clipped to 0.4 for A > 0
    out, flags = gmpo(logp, logp_old, torch.tensor([[1.0]]), loss)
    assert out[0, 0].item() == pytest.approx(-math.exp((0.1 + 0.4) / 2))
    assert flags["clip_frac"].tolist() == [[False, True]]
    out, flags = gmpo(logp, logp_old, torch.tensor([[-1.0]]), loss)  # A < 0: the larger ratio is kept
    assert out[0, 0].item() == pytest.approx(math.exp((0.1 + 0.6) / 2)) and not flags["clip_frac"].any()


def test_kl_cov_penalises_the_chosen_tokens_log_ratio(loss):
    logp_old = torch.zeros(1, 3)
    logp = torch.tensor([[0.05, -0.1, 0.02]])
    chosen = torch.tensor([[False, True, False]])
    spec = with_(loss, policy_loss="kl_cov", kl_cov_coef=2.0)
    out, flags = kl_cov(logp, logp_old, torch.tensor([[1.0]]), spec, chosen=chosen)
    plain, _ = clipped_surrogate(logp, logp_old, torch.tensor([[1.0]]), spec)
    assert (out - plain).tolist()[0] == pytest.approx([0.0, 0.2, 0.0])
    assert flags["cov_frac"].tolist() == chosen.tolist()


def test_clip_cov_removes_the_gradient_of_the_chosen_tokens_only(loss):
    logp, logp_old, advantages, mask = batch()
    chosen = torch.zeros_like(mask, dtype=torch.bool)
    chosen[0, 1] = chosen[2, 4] = True
    spec = with_(loss, policy_loss="clip_cov")
    _, grad = grad_of(lambda lp: POLICY_LOSSES["clip_cov"](lp, logp_old, advantages, spec, mask, chosen)[0].sum(),
                      logp)
    _, plain = grad_of(lambda lp: clipped_surrogate(lp, logp_old, advantages, spec)[0].sum(), logp)
    assert (grad[chosen] == 0).all() and torch.equal(grad[~chosen], plain[~chosen])
    assert (plain[chosen] != 0).any()


def test_constant_aggregation_divides_by_sequences_times_max_new_tokens():
    per_token = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    assert aggregate(per_token, mask, "constant", 3, 2, max_new_tokens=10).item() == pytest.approx(7 / 20)
    halves = [aggregate(per_token[r], mask[r], "constant", 3, 2, 10) for r in ([0], [1])]
    assert sum(halves).item() == pytest.approx(7 / 20)  # exact across micro-batches, like the others


# ── reductions that must hold ────────────────────────────────────────────────────────────────────────────


def policy_value_and_grad(spec, logp, logp_old, advantages, mask, selected=None):
    totals = (int(mask.sum()), len(mask))
    return grad_of(lambda lp: policy_loss(lp, logp_old, advantages, mask, spec, totals, selected=selected)[0], logp)


def test_gspo_with_equal_token_ratios_is_the_clipped_loss_on_the_sequence(loss):
    _, _, advantages, mask = batch()
    logp = -torch.rand(4, 5)
    log_ratio = torch.tensor([[0.1], [-0.2], [0.0003], [0.5]])  # one ratio per sequence, inside and outside the clip
    logp_old = logp - log_ratio
    gspo_spec = with_(loss, policy_loss="gspo", aggregation="sample")
    clip_spec = with_(loss, policy_loss="clip", aggregation="sample", clip_low=loss.gspo_clip_low,
                      clip_high=loss.gspo_clip_high, dual_clip=0.0)
    value, grad = policy_value_and_grad(gspo_spec, logp, logp_old, advantages, mask)
    expected, expected_grad = policy_value_and_grad(clip_spec, logp, logp_old, advantages, mask)
    assert value.item() == pytest.approx(expected.item(), rel=1e-6)
    assert torch.allclose(grad, expected_grad, atol=1e-7)


def test_gspo_token_with_sequence_advantages_equals_gspo(loss):
    logp, logp_old, advantages, mask = batch()
    logp_old = logp - 1e-4 * torch.randn(logp.shape, generator=torch.Generator().manual_seed(3))  # some unclipped
    for aggregation in ("token", "sample"):
        a = policy_value_and_grad(with_(loss, policy_loss="gspo", aggregation=aggregation), logp, logp_old,
                                  advantages, mask)
        b = policy_value_and_grad(with_(loss, policy_loss="gspo_token", aggregation=aggregation), logp, logp_old,
                                  advantages, mask)
        assert a[0].item() == pytest.approx(b[0].item(), rel=1e-6) and torch.allclose(a[1], b[1], atol=1e-7)
        assert a[1].abs().sum() > 0


@pytest.mark.parametrize("name", ["cispo", "sapo"])
def test_cispo_and_sapo_give_the_plain_policy_gradient_at_ratio_one(loss, name):
    logp, _, advantages, mask = batch()
    _, grad = policy_value_and_grad(with_(loss, policy_loss=name), logp, logp.clone(), advantages, mask)
    _, plain = grad_of(lambda lp: aggregate(-advantages * lp, mask, "token", int(mask.sum()), 4), logp)
    assert torch.allclose(grad, plain, atol=1e-7) and plain.abs().sum() > 0


def test_gmpo_on_one_token_sequences_is_the_clipped_loss(loss):
    logp = -torch.rand(6, 1)
    logp_old = logp - torch.tensor([[0.1], [0.7], [-0.7], [-0.1], [0.7], [-0.7]])
    advantages = torch.tensor([[1.0], [1.0], [1.0], [-1.0], [-1.0], [-2.0]])
    mask = torch.ones(6, 1)
    eps = loss.gmpo_clip_eps
    clip_spec = with_(loss, clip_low=1 - math.exp(-eps), clip_high=math.exp(eps) - 1, dual_clip=0.0)
    value, grad = policy_value_and_grad(with_(loss, policy_loss="gmpo"), logp, logp_old, advantages, mask)
    expected, expected_grad = policy_value_and_grad(clip_spec, logp, logp_old, advantages, mask)
    assert value.item() == pytest.approx(expected.item(), rel=1e-6)
    assert torch.allclose(grad, expected_grad, atol=1e-7)


@pytest.mark.parametrize("name, off", [("clip_cov", {"clip_cov_fraction": 0.0}), ("kl_cov", {"kl_cov_coef": 0.0}),
                                       ("clip", {"top_entropy_quantile": 1.0})])
def test_covariance_losses_and_top_entropy_switched_off_are_the_clipped_loss(loss, name, off):
    logp, logp_old, advantages, mask = batch()
    spec = with_(loss, policy_loss=name, **off)
    selected = select_tokens(logp, -logp, advantages.squeeze(1), mask, spec) if needs_token_selection(spec) else None
    value, grad = policy_value_and_grad(spec, logp, logp_old, advantages, mask, selected)
    expected, expected_grad = policy_value_and_grad(with_(loss, policy_loss="clip"), logp, logp_old, advantages, mask)
    assert value.item() == expected.item() and torch.equal(grad, expected_grad)


def test_top_entropy_keeps_the_policy_loss_of_the_highest_entropy_fraction_only(loss):
    logp, logp_old, advantages, mask = batch()
    entropy = torch.rand(logp.shape, generator=torch.Generator().manual_seed(2))
    spec = with_(loss, top_entropy_quantile=0.25)
    selected = select_tokens(logp, entropy, advantages.squeeze(1), mask, spec)
    high = selected["high_entropy"]
    assert int(high.sum()) == math.ceil(0.25 * mask.sum()) and not (high & (mask == 0)).any()
    assert entropy[high].min() >= entropy[mask.bool() & ~high].max()
    _, grad = policy_value_and_grad(spec, logp, logp_old, advantages, mask, selected)
    assert (grad[~high] == 0).all() and (grad[high] != 0).all()
    value, _ = policy_value_and_grad(spec, logp, logp_old, advantages, mask, selected)  # normaliser: every token
    per_token, _ = clipped_surrogate(logp, logp_old, advantages, spec)
    assert value.item() == pytest.approx((per_token * high).sum().item() / mask.sum().item(), rel=1e-6)


def test_covariance_choices_follow_their_definitions(loss):
    logp, _, advantages, mask = batch(rows=8, length=10)
    valid = mask.bool()
    adv = advantages.expand_as(logp)
    cov = (adv - adv[valid].mean()) * (logp - logp[valid].mean())
    spec = with_(loss, policy_loss="kl_cov", kl_cov_fraction=0.1)
    chosen = select_tokens(logp, None, advantages.squeeze(1), mask, spec)["chosen"]
    k = int(0.1 * mask.sum())
    assert int(chosen.sum()) == k and cov[chosen].min() >= cov[valid & ~chosen].max()
    spec = with_(loss, policy_loss="clip_cov", clip_cov_fraction=0.05, clip_cov_low=-0.2, clip_cov_high=0.2)
    chosen = select_tokens(logp, None, advantages.squeeze(1), mask, spec)["chosen"]
    inside = valid & (cov > -0.2) & (cov < 0.2)
    assert int(chosen.sum()) == min(int(0.05 * mask.sum()), int(inside.sum())) and not (chosen & ~inside).any()


def test_kl_cov_takes_exactly_its_fraction_when_covariances_tie(loss):
    """A sharp model gives many tokens log π = 0 exactly (fp32), and the tokens of one sequence share its advantage:
    their covariances tie. KL-Cov still takes exactly k tokens (a threshold alone took every tied one: 7% of the
    tokens instead of the published 0.2% on the tiny task), the tied ones by the smallest keys."""
    logp = torch.zeros(4, 6)
    logp[2, 0] = -1.0  # one uncertain token; every other token is certain (log π = 0)
    mask = torch.ones(4, 6)
    advantages = torch.tensor([-1.0, -0.5, 0.5, 1.0])  # covariance (A − Ā)(log π − mean log π), Ā = 0
    keys = torch.rand(4, 6)
    keys[3] = torch.tensor([0.9, 0.1, 0.8, 0.2, 0.7, 0.6])  # the smallest keys win a tie
    spec = with_(loss, policy_loss="kl_cov", kl_cov_fraction=0.1)  # k = int(0.1 · 24) = 2
    chosen = select_tokens(logp, None, advantages, mask, spec, keys=keys)["chosen"]
    assert int(chosen.sum()) == 2  # the six tokens of the last row tie at the highest covariance, 1 · 1/24
    assert chosen[3].tolist() == [False, True, False, True, False, False]


# ── rollout correction ───────────────────────────────────────────────────────────────────────────────────


def test_tis_caps_and_mis_masks_token_and_sequence_weights(loss):
    logp_old = torch.log(torch.tensor([[0.5, 0.4, 0.3], [0.2, 0.2, 0.9]]))
    sampler = torch.log(torch.tensor([[0.2, 0.4, 0.6], [0.2, 0.1, 0.9]]))  # token ratios 2.5, 1, 0.5 / 1, 2, 1
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    tis = with_(loss, rollout_correction="tis", rollout_tis_cap=2.0, rollout_correction_level="token")
    w, flags = rollout_weights(logp_old, sampler, mask, tis)
    assert w.tolist()[0] == pytest.approx([2.0, 1.0, 0.5]) and flags["rollout_tis_capped_frac"].tolist()[0] == [
        True, False, False]
    seq = with_(tis, rollout_correction_level="sequence")  # 2.5·1·0.5 = 1.25; 1·2 = 2 (the masked token is out)
    w, _ = rollout_weights(logp_old, sampler, mask, seq)
    assert w[0].tolist() == pytest.approx([1.25] * 3) and w[1, :2].tolist() == pytest.approx([2.0, 2.0])
    mis = with_(loss, rollout_correction="mis", rollout_mis_low=0.6, rollout_mis_high=2.2,
                rollout_correction_level="token")
    w, flags = rollout_weights(logp_old, sampler, mask, mis)
    assert w.tolist() == [[0.0, 1.0, 0.0], [1.0, 1.0, 1.0]] and flags["rollout_mis_masked_frac"][0].tolist() == [
        True, False, True]
    totals = (int(mask.sum()), 2)  # in the loss: at ratio 1 with A = 1 each kept token's term is -1 (token mean)
    corrected, _ = policy_loss(logp_old, logp_old, torch.ones(2, 1), mask, mis, totals, sampler_logp=sampler)
    plain, _ = policy_loss(logp_old, logp_old, torch.ones(2, 1), mask, mis, totals)  # no sampler log-probs: no weight
    assert plain.item() == pytest.approx(-1.0) and corrected.item() == pytest.approx(-3 / 5)


def test_rollout_gap_compares_full_distributions_and_reports_truncation():
    logp = torch.log(torch.tensor([[0.5, 0.25, 0.9]]))
    full = torch.log(torch.tensor([[0.5, 0.5, 0.9]]))  # the sampler's full-distribution log-probs; 2nd token off ×2
    log_kept = torch.tensor([[-0.1, -0.2, 0.0]])  # top-p kept e^-0.1, e^-0.2, all
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    gap = rollout_gap(logp, full - log_kept, log_kept, mask)
    assert gap["rollout/logp_diff_max"] == pytest.approx(math.log(2)) and gap["rollout/logp_diff_mean"] == \
        pytest.approx(math.log(2) / 2)
    assert gap["rollout/kl_k3"] == pytest.approx((0.5 - 1 + math.log(2)) / 2)
    assert gap["rollout/chi2"] == pytest.approx(0.25 / 2) and gap["rollout/ratio_outside_frac"] == 0.0
    assert gap["rollout/seq_logp_diff_mean"] == pytest.approx(math.log(2))
    assert gap["rollout/log_kept_mean"] == pytest.approx(-0.15)


def test_a_sampler_that_is_the_learner_in_fp32_gives_weights_of_one(tiny_vlm_path, make_specs):
    """The policy samples in fp32 at top_p 1: the sampler's log-probs are the learner's (to rounding), every
    weight is 1, and the corrected update equals the uncorrected one."""
    from tests.test_model import examples
    from utils.generation import Decoding
    from utils.model import load_model, load_processor
    from utils.rollout import generate
    from utils.update import Targets, policy_update

    processor = load_processor(tiny_vlm_path)
    model = load_model(tiny_vlm_path, "cpu", torch.float32)
    torch.manual_seed(0)
    batch = generate(model, processor, examples(3, seed=2), 4, Decoding(12, suppress_ids=()))  # as the update: T = 1
    mask = batch.completion_mask.float()
    states = {}
    for correction in ("", "tis", "mis"):
        policy = load_model(tiny_vlm_path, "cpu", torch.float32)
        specs = make_specs(ROLLOUT_CORRECTION=correction, ROLLOUT_CORRECTION_LEVEL="sequence", MAX_GRAD_NORM=1e9)
        stats = policy_update(policy, torch.optim.SGD(policy.parameters(), lr=1.0), batch,
                              Targets(torch.linspace(-1, 1, len(batch)), mask), specs.loss, specs.optim,
                              warn=lambda *_: None)
        states[correction] = policy.state_dict()
        gap = rollout_gap(stats["logp_old"], batch.sampler_logp, batch.sampler_log_kept, mask)
        assert gap["rollout/logp_diff_max"] < 1e-4 and gap["rollout/log_kept_mean"] == 0.0
        assert stats.get("rollout_tis_capped_frac", 0.0) == 0.0 and stats.get("rollout_mis_masked_frac", 0.0) == 0.0
    for correction in ("tis", "mis"):
        difference = max((states[correction][k] - states[""][k]).abs().max().item() for k in states[""])
        assert difference < 1e-5, correction


# ── every loss in the trainers ───────────────────────────────────────────────────────────────────────────

LOSS_STATISTICS = {"clip": "clip_frac_high", "gspo": "seq_log_ratio_abs", "gspo_token": "seq_log_ratio_abs",
                   "cispo": "is_clip_frac_high", "sapo": "gate_mean", "gmpo": "clip_frac", "clip_cov": "cov_frac",
                   "kl_cov": "cov_frac"}
SHORT_RUN = ["--TOTAL_STEPS=1", "--EVAL_EVERY=1", "--EVAL_SAMPLES=4", "--TRAIN_BATCH_PROMPTS=2", "--GROUP_SIZE=4",
             "--MAX_NEW_TOKENS=12", "--OVERLONG_BUFFER=4", "--LOG_EVERY=1", "--LOG_SAMPLES=1", "--PLOT_EVERY=0",
             "--CPU_THREADS=1", "--SAVE_EVERY=0", "--COMPARE_WITH=", "--DYNAMIC_SAMPLING=False"]  # every step trains


@pytest.mark.parametrize("trainer, args", [
    *[("dapo", [f"--POLICY_LOSS={name}"]) for name in POLICY_LOSSES],
    ("dapo", ["--POLICY_LOSS=gspo", "--LOSS_AGGREGATION=constant", "--TOP_ENTROPY_QUANTILE=0.2"]),
    ("grpo", ["--POLICY_LOSS=gspo_token", "--TOP_ENTROPY_QUANTILE=0.5"]),  # a reference model, KL term
    ("ppo", ["--POLICY_LOSS=sapo", "--GROUP_SIZE=1", "--TRAIN_BATCH_PROMPTS=4", "--CRITIC_WARMUP_STEPS=0",
             "--ROLLOUT_CORRECTION=mis"]),
    ("dapo", ["--POLICY_LOSS=cispo", "--ROLLOUT_CORRECTION=tis", "--ROLLOUT_CORRECTION_LEVEL=sequence",
              "--TOP_P=0.9"]),  # top-p: the sampler's distribution is truncated
], ids=lambda v: v if isinstance(v, str) else " ".join(a.split("=")[1] for a in v[:1]))
def test_every_policy_loss_trains_in_the_trainers(tmp_path, trainer, args):
    """One step of each loss: an update with finite statistics, the loss's own among them, under policy/."""
    import json
    import os

    from utils.config import run_cli

    module = __import__(trainer)
    run_cli(module.main, [*SHORT_RUN, f"--RUNS_DIR={tmp_path}", *args])
    (run_dir,) = os.listdir(tmp_path)
    rows = [json.loads(line) for line in open(tmp_path / run_dir / "metrics.jsonl")]
    step = rows[-1]
    name = next(a.split("=")[1] for a in args if a.startswith("--POLICY_LOSS="))
    assert f"policy/{LOSS_STATISTICS[name]}" in step
    policy = {k: v for k, v in step.items() if k.startswith("policy/")}
    assert policy and all(math.isfinite(v) for v in policy.values()), policy
    assert step["policy/updates"] >= 1 and step["policy/skipped_updates"] == 0
    assert all(math.isfinite(v) for k, v in step.items() if k.startswith("rollout/"))
    if "--TOP_P=0.9" in args:  # the sampler cut the tail: its distribution is truncated, and that is reported
        assert step["rollout/log_kept_mean"] < 0 and "policy/rollout_tis_capped_frac" in step
    else:  # the policy samples itself in fp32: the sampler's numbers are the learner's; only the suppressed
        assert step["rollout/logp_diff_max"] < 1e-3 and -1e-3 < step["rollout/log_kept_mean"] <= 0  # tokens cut
    if "--TOP_ENTROPY_QUANTILE=0.2" in args:
        assert 0 < step["policy/entropy_selected_frac"] <= 0.25
