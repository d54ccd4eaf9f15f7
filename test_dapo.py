"""Hand-computed checks of every formula in SPEC §5 (and §4's soft overlong punishment)."""

import math

import pytest
import torch

from data.answers import extract_answer
from utils.config import UserError
from utils.rewards import accuracy_reward, format_reward, score_completions, soft_overlong_punishment
from utils.rl import (aggregate, clipped_surrogate, group_advantages, is_informative, k3_kl, loss_tokens,
                      overlong_loss_mask, policy_loss)
from utils.rollout import ReplayBuffer, Rollout, collect_groups, sample_step
from utils.update import learning_rate_at, set_learning_rate


def test_group_advantages_by_hand():
    # Group [3, 1, 1, 3]: mean 2, unbiased std sqrt(4/3) = 1.1547 -> ±1/1.1547 = ±0.8660.
    rewards = torch.tensor([3.0, 1.0, 1.0, 3.0, 2.0, 2.0, 2.0, 2.0])
    adv = group_advantages(rewards, group_sizes=[4, 4])
    expected = torch.tensor([0.8660254, -0.8660254, -0.8660254, 0.8660254, 0, 0, 0, 0])
    assert torch.allclose(adv, expected, atol=1e-5)
    # Dr.GRPO: no division by the std.
    dr_grpo = group_advantages(rewards, [4, 4], scale_by_std=False)
    assert torch.allclose(dr_grpo, torch.tensor([1.0, -1, -1, 1, 0, 0, 0, 0]))
    # Groups of different sizes (top-up sampling): [3, 1, 1, 3, 2] has mean 2, std sqrt(4/4) = 1.
    uneven = group_advantages(torch.tensor([3.0, 1, 1, 3, 2, 0.0, 4.0]), [5, 2])
    assert torch.allclose(uneven, torch.tensor([1.0, -1, -1, 1, 0, -0.7071068, 0.7071068]), atol=1e-5)


@pytest.mark.parametrize(
    "ratio, advantage, loss, low, high",
    [
        (1.5, 1.0, -1.28, False, True),  # above 1 + 0.28 with A > 0: clipped (upper side)
        (1.5, -1.0, 1.5, False, False),  # above the clip with A < 0: the unclipped term is the min
        (0.5, -1.0, 0.8, True, False),  # below 1 - 0.2 with A < 0: clipped (lower side)
        (0.5, 1.0, -0.5, False, False),  # below the clip with A > 0: unclipped
        (1.1, 1.0, -1.1, False, False),  # inside the trust region
    ],
)
def test_clipped_surrogate_both_sides(specs, ratio, advantage, loss, low, high):
    logp_old = torch.tensor([[-1.0]])
    logp = logp_old + math.log(ratio)
    out, flags = clipped_surrogate(logp, logp_old, torch.tensor([[advantage]]), specs.loss)  # DAPO: 0.2 / 0.28
    assert out.item() == pytest.approx(loss, abs=1e-6)
    assert flags["clip_frac_low"].item() == low and flags["clip_frac_high"].item() == high
    assert not flags["clip_frac_dual"].item()


@pytest.mark.parametrize(
    "ratio, advantage, loss, dual",
    [
        (5.0, -1.0, 3.0, True),  # A < 0 and ratio 5 > c = 3: the loss stops at -c·A = 3 (no gradient)
        (2.0, -1.0, 2.0, False),  # A < 0 but ratio below c: the ordinary clipped loss r·|A|
        (5.0, -2.0, 6.0, True),  # the bound scales with |A|
        (5.0, 1.0, -1.28, False),  # A > 0: dual clip does not apply (Clip-Higher does)
    ],
)
def test_dual_clip(make_specs, ratio, advantage, loss, dual):
    logp_old = torch.tensor([[-2.0]])
    logp = (logp_old + math.log(ratio)).requires_grad_(True)
    out, flags = clipped_surrogate(logp, logp_old, torch.tensor([[advantage]]), make_specs(DUAL_CLIP_C=3.0).loss)
    assert out.item() == pytest.approx(loss, abs=1e-5) and flags["clip_frac_dual"].item() == dual
    out.sum().backward()
    assert (logp.grad.abs().item() == 0) == (dual or advantage > 0)  # clipped tokens carry no gradient
    # Off (c = 0), a bad token's loss grows with its ratio.
    plain, _ = clipped_surrogate(logp.detach(), logp_old, torch.tensor([[advantage]]), make_specs().loss)
    assert plain.item() == pytest.approx(-ratio * advantage if advantage < 0 else loss, abs=1e-5)


def test_clip_higher_differs_from_symmetric_clip(make_specs):
    logp_old = torch.tensor([[0.0]])
    logp = torch.tensor([[math.log(1.25)]])
    grpo, grpo_flags = clipped_surrogate(logp, logp_old, torch.tensor([[1.0]]), make_specs("grpo").loss)
    dapo, dapo_flags = clipped_surrogate(logp, logp_old, torch.tensor([[1.0]]), make_specs("dapo").loss)
    assert grpo.item() == pytest.approx(-1.2) and grpo_flags["clip_frac_high"].item()
    assert dapo.item() == pytest.approx(-1.25) and not dapo_flags["clip_frac_high"].item()


def test_policy_loss_adds_kl_and_entropy_and_sums_its_statistics(make_specs):
    """policy_loss = aggregate(clip term + β·k3 − c·entropy); statistics are sums over the mask's tokens."""
    loss = make_specs(KL_BETA=0.5, ENTROPY_COEF=0.1, LOSS_AGGREGATION="token").loss
    logp_old = torch.zeros(2, 3)
    logp = torch.log(torch.tensor([[1.5, 1.0, 0.5], [1.1, 1.0, 1.0]]))
    advantages, ref = torch.tensor([[1.0], [-1.0]]), torch.full((2, 3), -0.1)
    entropy, mask = torch.full((2, 3), 2.0), torch.tensor([[1.0, 1, 1], [1, 1, 0]])
    value, stats = policy_loss(logp, logp_old, advantages, mask, loss, (10, 2), ref, entropy)
    clip, _ = clipped_surrogate(logp, logp_old, advantages, loss)
    expected = ((clip + 0.5 * k3_kl(logp, ref) - 0.1 * entropy) * mask).sum() / 10  # 10: the mini-batch's tokens
    assert value.item() == pytest.approx(expected.item(), abs=1e-6)
    assert stats["clip_frac_high"] == 1.0  # ratio 1.5 > 1.28 with A > 0
    assert stats["clip_frac_low"] == 0.0  # ratio 0.5 < 0.8, but with A > 0 nothing is clipped below
    assert stats["kl"] == pytest.approx((k3_kl(logp, ref) * mask).sum().item(), abs=1e-6)
    without, stats_without = policy_loss(logp, logp_old, advantages, mask, make_specs().loss, (10, 2))
    assert stats_without["kl"] == 0.0 and without.item() == pytest.approx((clip * mask).sum().item() / 10, abs=1e-6)


def test_aggregations_by_hand():
    per_token = torch.tensor([[1.0, 2.0, 3.0], [4.0, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    # token level: (1 + 2 + 3 + 4) / 4 tokens; sample level: mean(2, 4).
    assert aggregate(per_token, mask, "token", total_tokens=4, total_sequences=2).item() == pytest.approx(2.5)
    assert aggregate(per_token, mask, "sample", total_tokens=4, total_sequences=2).item() == pytest.approx(3.0)
    with pytest.raises(ValueError, match="token"):
        aggregate(per_token, mask, "batch", 4, 2)


def test_k3_by_hand():
    logp = torch.tensor([0.0, -1.0])
    ref = torch.tensor([math.log(2.0), -1.0])
    # exp(log 2) - log 2 - 1 = 0.306853; identical log-probs give 0.
    assert torch.allclose(k3_kl(logp, ref), torch.tensor([2 - math.log(2) - 1, 0.0]), atol=1e-6)
    assert (k3_kl(torch.randn(100), torch.randn(100)) >= 0).all()


@pytest.mark.parametrize("length, expected", [(10, 0.0), (15, 0.0), (17, -0.4), (19, -0.8), (20, -1.0), (21, -1.0)])
def test_soft_overlong_punishment(length, expected):
    # L_max = 20, L_cache = 5: no penalty up to 15 tokens, linear to -1 at 20, -1 beyond.
    assert soft_overlong_punishment(length, max_length=20, cache_length=5) == pytest.approx(expected)


def test_dynamic_sampling_filter():
    accuracy = torch.tensor([1.0, 0, 0, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 1])
    assert [is_informative(group) for group in accuracy.split(4)] == [True, False, False, True]
    # With the +1/-1 accuracy reward, -1 is wrong.
    assert is_informative(torch.tensor([1.0, -1, -1, -1])) and not is_informative(torch.tensor([-1.0, -1]))
    assert is_informative(torch.tensor([1.0, 1, 1, 1, 1, 1, 1, 0]))  # any size (top-up groups grow)


def test_overlong_mask():
    mask = torch.tensor([[1.0, 1, 0], [1, 1, 1]])
    out = overlong_loss_mask(mask, torch.tensor([False, True]))
    assert out.tolist() == [[1, 1, 0], [0, 0, 0]]
    batch = _rollout(torch.zeros(2), ["q", "q"])
    batch.completion_mask, batch.truncated = mask.long(), torch.tensor([False, True])
    assert loss_tokens(batch, overlong_filtering=True).tolist() == [[1, 1, 0], [0, 0, 0]]
    assert loss_tokens(batch, overlong_filtering=False).tolist() == mask.tolist()


def test_rewards_by_hand(make_specs):
    good = "<think>the shapes are red</think>Answer: B"
    assert extract_answer(good) == "B" and extract_answer("<answer> C </answer>") == "C"
    assert extract_answer("no answer here") is None
    assert accuracy_reward(good, "B") == 1.0 and accuracy_reward(good, "C") == 0.0
    assert format_reward(good) == 1.0
    assert format_reward("Answer: B") == 0.0
    assert format_reward("<think>a<think>b</think>Answer: B") == 0.0
    spec = make_specs(MAX_NEW_TOKENS=20, OVERLONG_BUFFER=5).rewards
    scores = score_completions([good, "Answer: C"], ["B", "B"], [18, 20], {"accuracy": 3.0, "format": 1.0}, spec,
                               max_length=20)
    assert scores["accuracy"] == [1.0, 0.0] and scores["format"] == [1.0, 0.0]
    assert scores["overlong"] == pytest.approx([-0.6, -1.0])
    assert scores["total"] == pytest.approx([3.4, -1.0])
    # The DAPO paper's rule-based reward: +1 right, -1 wrong.
    signed = score_completions([good, "Answer: C"], ["B", "B"], [5, 5], {"accuracy": 1.0, "format": 0.0},
                               make_specs(NEGATIVE_ACCURACY_REWARD=True).rewards, max_length=20)
    assert signed["accuracy"] == [1.0, -1.0] and signed["total"] == [1.0, -1.0]
    off = score_completions([good], ["B"], [20], {"accuracy": 1.0, "format": 0.0},
                            make_specs(SOFT_OVERLONG_PUNISHMENT=False).rewards, max_length=20)
    assert off["overlong"] == [0.0] and off["total"] == [1.0]
    assert list(scores) == ["accuracy", "format", "overlong", "total", "errors"]  # every reward, the shaping, failures
    assert scores["errors"] == [0.0, 0.0]


def test_two_stage_reward_weights_switch_at_the_step(make_specs):
    early = {"format": 2.0, "mdi": 0.1}
    rewards = make_specs(REWARD_SWITCH_STEP=3, REWARD_WEIGHTS_EARLY=early).rewards
    regular = {"accuracy": 3.0, "format": 1.0, "mdi": 0.0}  # dapo.py's W_ACCURACY, W_FORMAT, W_MDI
    first = {"accuracy": 3.0, "format": 2.0, "mdi": 0.1}  # early entries override, missing ones stay regular
    assert [rewards.at(step) for step in (1, 3, 4, 50)] == [first, first, regular, regular]
    assert make_specs(REWARD_WEIGHTS_EARLY=early).rewards.at(1) == regular  # switch step 0: one stage
    with pytest.raises(UserError, match="unknown reward fmt"):
        make_specs(REWARD_WEIGHTS_EARLY={"fmt": 1.0}, REWARD_SWITCH_STEP=5)


def _toy_policy_loss(weight, features, tokens, logp_old, advantages, mask, rows, loss, totals):
    """A linear 'policy' over a 5-token vocabulary, so that gradients are cheap and exact."""
    logits = features[rows] @ weight  # [b, L, V]
    logp = torch.log_softmax(logits, -1).gather(-1, tokens[rows].unsqueeze(-1)).squeeze(-1)
    value, _ = policy_loss(logp, logp_old[rows], advantages[rows].unsqueeze(1), mask[rows], loss, totals)
    return value


@pytest.mark.parametrize("level", ["token", "sample"])
def test_loss_and_gradient_do_not_depend_on_micro_batches(make_specs, level):
    torch.manual_seed(0)
    B, L, D, V = 6, 7, 4, 5
    features, tokens = torch.randn(B, L, D), torch.randint(0, V, (B, L))
    logp_old, advantages = -torch.rand(B, L) * 2, torch.randn(B)
    lengths = torch.tensor([7, 2, 5, 1, 6, 3])
    mask = (torch.arange(L) < lengths.unsqueeze(1)).float()  # sequences of very different lengths
    totals, loss = (int(mask.sum()), B), make_specs(LOSS_AGGREGATION=level).loss

    def loss_and_grad(splits):
        weight = torch.randn(D, V, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
        total = 0.0
        for rows in splits:
            value = _toy_policy_loss(weight, features, tokens, logp_old, advantages, mask, rows, loss, totals)
            value.backward()
            total += value.item()
        return total, weight.grad

    full_loss, full_grad = loss_and_grad([list(range(B))])
    split_loss, split_grad = loss_and_grad([[0, 1], [2], [3, 4, 5]])
    assert split_loss == pytest.approx(full_loss, abs=1e-6)
    assert torch.allclose(split_grad, full_grad, atol=1e-6)


def test_per_micro_batch_token_mean_would_not_be_invariant():
    """The property above is not automatic: normalising by each micro-batch's own token count breaks it."""
    torch.manual_seed(0)
    per_token, mask = torch.randn(4, 6), (torch.arange(6) < torch.tensor([[6], [1], [3], [2]])).float()
    full = aggregate(per_token, mask, "token", int(mask.sum()), 4)
    naive = sum(aggregate(per_token[r], mask[r], "token", int(mask[r].sum()), 2) for r in ([0, 1], [2, 3])) / 2
    assert not torch.isclose(full, naive)


def test_learning_rate_schedules():
    assert learning_rate_at(7, 10, 1e-3, "constant") == 1e-3
    assert learning_rate_at(1, 10, 1e-3, "cosine") == pytest.approx(1e-3)
    assert learning_rate_at(6, 10, 1e-3, "cosine") == pytest.approx(0.5e-3)
    assert learning_rate_at(10, 10, 1e-3, "cosine") == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 0.9)))
    with pytest.raises(ValueError, match="LR_SCHEDULE"):
        learning_rate_at(1, 10, 1e-3, "linear")
    # A linear warm-up over the first steps, then the schedule itself; 0 steps: none (the exact same value).
    assert learning_rate_at(1, 10, 1e-3, "constant", warmup_steps=4) == pytest.approx(0.25e-3)
    assert learning_rate_at(4, 10, 1e-3, "constant", warmup_steps=4) == 1e-3
    assert learning_rate_at(2, 10, 1e-3, "cosine", 4) == pytest.approx(learning_rate_at(2, 10, 1e-3, "cosine") / 2)
    assert all(learning_rate_at(s, 10, 1e-3, "cosine", 0) == learning_rate_at(s, 10, 1e-3, "cosine") for s in range(11))


def test_set_learning_rate_follows_each_group_base(make_specs):
    optim = make_specs(LEARNING_RATE=1e-3, LR_SCHEDULE="cosine", TOTAL_STEPS=10, LR_WARMUP_STEPS=0).optim
    weights = [torch.nn.Parameter(torch.zeros(1)) for _ in range(2)]
    optimizer = torch.optim.AdamW([{"params": weights[:1]}, {"params": weights[1:], "base_lr": 1e-2}], lr=1e-3)
    assert set_learning_rate(optimizer, 6, optim) == pytest.approx(0.5e-3)  # LEARNING_RATE's schedule
    assert optimizer.param_groups[1]["lr"] == pytest.approx(0.5e-2)  # the group's own base_lr (PPO's critic)


def _fake_sampler(rounds_of_accuracy):
    """sample(examples, n) returning scripted accuracies, one list per call; records the prompts it saw."""
    rounds, seen = iter(rounds_of_accuracy), []

    def sample(examples, group_size):
        accuracy = torch.tensor(next(rounds), dtype=torch.float)
        n = len(accuracy)
        assert n == len(examples) * group_size
        seen.extend(examples)
        return _rollout(accuracy, [ex for ex in examples for _ in range(group_size)])

    counter = iter(range(10**6))
    return sample, lambda n: [next(counter) for _ in range(n)], seen


def _rollout(accuracy, examples):
    n = len(accuracy)
    ones = torch.ones(n, 2, dtype=torch.long)
    return Rollout({"input_ids": ones, "attention_mask": ones, "mm_token_type_ids": 0 * ones},
                   torch.arange(n).unsqueeze(1), torch.ones(n, 1, dtype=torch.long), torch.zeros(n, dtype=torch.bool),
                   [str(i) for i in range(n)], examples, {"accuracy": accuracy, "total": 3 * accuracy})


def test_dynamic_sampling_refills_until_the_batch_is_full():
    # 2 prompts per batch, G = 2. Round 1: groups [flat, mixed]; round 2: [mixed, mixed] -> full after 2 rounds.
    sample, draw, seen = _fake_sampler([[1, 1, 0, 1], [1, 0, 0, 1], [0, 1, 1, 0]])
    everything, groups, kept, rounds = collect_groups(sample, draw, 2, 2, 0, "refill", max_rounds=4)
    assert len(everything) == 8 and seen == [0, 1, 2, 3] and rounds == 2  # fresh prompts each round
    assert groups == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert kept == [1, 2]  # round 1 group 1, round 2 group 0; round 2 group 1 is not needed
    assert [everything.examples[r] for g in kept for r in groups[g]] == [1, 1, 2, 2]


def test_dynamic_sampling_stops_at_the_cap_and_keeps_what_it_has():
    sample, draw, _ = _fake_sampler([[1, 1, 1, 1], [0, 0, 1, 0], [0, 0, 0, 0], [1, 0, 1, 0]])
    everything, groups, kept, rounds = collect_groups(sample, draw, 2, 2, 0, "refill", max_rounds=3)
    assert len(everything) == 12 and rounds == 3 and [groups[g] for g in kept] == [[6, 7]]  # one group found
    sample, draw, _ = _fake_sampler([[1, 1, 0, 0]] * 2)
    assert collect_groups(sample, draw, 2, 2, 0, "refill", max_rounds=2)[2] == []  # nothing: no update


def test_without_dynamic_sampling_one_round_is_kept_whole():
    sample, draw, _ = _fake_sampler([[1, 1, 0, 1]])
    everything, groups, kept, rounds = collect_groups(sample, draw, 2, 2, 0, "all", max_rounds=4)
    assert len(everything) == 4 and rounds == 1 and groups == [[0, 1], [2, 3]] and kept == [0, 1]


def test_topup_grows_flat_groups_one_completion_at_a_time_until_the_cap():
    # 3 prompts, G = 2, groups may grow to 4. Round 1: [1, 1] flat, [0, 1] informative, [0, 0] flat.
    # Top-up round 1 (prompts 0 and 2): 1 -> group 0 still flat; 1 -> group 2 informative.
    # Top-up round 2 (prompt 0 only): 1 -> group 0 has 4 completions, all right: at the cap, dropped.
    sample, draw, seen = _fake_sampler([[1, 1, 0, 1, 0, 0], [1, 1], [1]])
    everything, groups, kept, rounds = collect_groups(sample, draw, 3, 2, 0, "topup", max_group_size=4)
    assert rounds == 3 and seen == [0, 1, 2, 0, 2, 0]  # top-ups re-use the flat group's prompt
    assert groups == [[0, 1, 6, 8], [2, 3], [4, 5, 7]] and kept == [1, 2]
    assert len(everything) == 9 and [everything.examples[r] for r in groups[2]] == [2, 2, 2]
    assert max(len(rows) for rows in groups) == 4  # never past MAX_DYNAMIC_SAMPLES
    # A group that is informative after one top-up stops growing at once.
    sample, draw, _ = _fake_sampler([[0, 0], [1]])
    assert collect_groups(sample, draw, 1, 2, 0, "topup", max_group_size=8)[1:] == ([[0, 1, 2]], [0], 2)


def test_replay_buffer_swaps_flat_groups_and_never_grows_past_its_size():
    buffer = ReplayBuffer(size=2, min_reward_std=0.5, max_success_rate=0.75)
    group = lambda *acc: _rollout(torch.tensor(acc, dtype=torch.float), ["q"] * len(acc))  # noqa: E731
    # Step 1: nothing stored yet, so the flat group stays; the informative groups that pass are stored.
    out, replayed = buffer.swap_flat_groups([group(1, 0, 0, 0), group(1, 1, 1, 1), group(0, 1, 0, 0)], 3)
    assert replayed == 0 and len(out) == 3 and len(buffer) == 2
    stored = list(buffer.groups)
    buffer.swap_flat_groups([group(1, 1, 1, 0, 1, 1, 1, 1)], 1)  # success rate 7/8 > 0.75: too easy to store
    tight = ReplayBuffer(size=2, min_reward_std=2.0, max_success_rate=1.0)
    tight.swap_flat_groups([group(1, 0, 0, 0, 0, 0, 0, 0)], 1)  # total-reward std 1.06 < 2.0: not stored
    assert list(buffer.groups) == stored and len(tight) == 0
    # Step 2: two flat groups are swapped for the two stored groups, newest first; a third stays flat.
    out, replayed = buffer.swap_flat_groups([group(0, 0, 0, 0), group(1, 1, 1, 1), group(0, 0, 0, 0),
                                             group(1, 0, 0, 0)], 4)
    assert replayed == 2 and out[1] is stored[1] and out[2] is stored[0]
    assert len(out) == 4 and [is_informative(g.rewards["accuracy"]) for g in out] == [True, True, True, False]
    assert len(buffer) == 1  # handed-out groups leave; this step's informative group came in
    for _ in range(5):  # many informative groups: the buffer keeps the newest `size`
        buffer.swap_flat_groups([group(1, 0, 0, 0), group(0, 1, 0, 0), group(0, 0, 1, 0)], 3)
        assert len(buffer) == 2
    flat_only = ReplayBuffer(size=4, min_reward_std=0.0, max_success_rate=1.0)
    flat_only.swap_flat_groups([group(0, 0), group(1, 1), group(1, 1, 1)], 3)
    assert len(flat_only) == 0  # a flat group is never stored, whatever the thresholds



def test_sample_step_metrics_with_topup_and_replay(make_specs):
    buffer = ReplayBuffer(size=4, min_reward_std=0.5, max_success_rate=1.0)
    rollout = make_specs(TRAIN_BATCH_PROMPTS=2, GROUP_SIZE=2, DYNAMIC_SAMPLING_MODE="topup", MAX_GEN_BATCHES=1,
                         MAX_DYNAMIC_SAMPLES=3).rollout
    # Step 1: groups [1, 1] (flat), [0, 1]; one top-up round adds a 0 to the first: [1, 1, 0] is informative.
    sample, draw, _ = _fake_sampler([[1, 1, 0, 1], [0]])
    everything, batch, padding, metrics = sample_step(sample, draw, rollout, 0, replay=buffer)
    assert batch.group_sizes == [3, 2] and len(batch) == 5 and len(everything) == 5 and not padding
    assert {k: v for k, v in metrics.items() if k.startswith("dapo/")} == {
        "dapo/gen_batches": 2, "dapo/kept_group_frac": 1.0, "dapo/flat_group_frac": 0.0, "dapo/topup_samples": 1,
        "dapo/replayed_groups": 0, "dapo/replay_buffer_size": 2, "dapo/train_groups": 2}
    assert metrics["reward/accuracy/mean"] == pytest.approx(3 / 5)  # every completion sampled, flat ones too
    # Step 2: both groups stay flat at the cap; the two stored groups stand in for them.
    sample, draw, _ = _fake_sampler([[0, 0, 1, 1], [0, 1], [0, 1]])
    everything, batch, padding, metrics = sample_step(sample, draw, rollout, 0, replay=buffer)
    assert metrics["dapo/flat_group_frac"] == 1.0 and metrics["dapo/kept_group_frac"] == 0.0
    assert metrics["dapo/replayed_groups"] == 2 and metrics["dapo/train_groups"] == 2 and len(buffer) == 0
    assert sorted(batch.group_sizes) == [2, 3]  # the stored groups, with their own sizes
    # Step 3: nothing informative and nothing stored: no batch, and a warning says so.
    sample, draw, _ = _fake_sampler([[0, 0, 1, 1], [0, 1], [0, 1]])
    warnings = []
    everything, batch, padding, metrics = sample_step(sample, draw, rollout, 0, replay=buffer, warn=warnings.append)
    assert batch is None and metrics["dapo/train_groups"] == 0 and warnings == [
        "no informative group sampled; no update this step"]
