"""PPO's math on hand-computed examples (token rewards, GAE, whitening, value clipping, explained variance) and
its critic on the tiny model (causal values, warm-up that leaves the policy alone)."""

import pytest
import torch

from tests.test_model import examples
from utils import layout
from utils.critic import Critic
from utils.generation import Decoding
from utils.model import load_model, load_processor
from utils.rl import clipped_value_loss, explained_variance, gae, token_rewards, whiten
from utils.rollout import generate
from utils.update import Targets, policy_update


def test_token_rewards_by_hand():
    outcome = torch.tensor([3.0, 1.0])
    logp_old = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -1.0, 0.0]])
    ref_logp = torch.tensor([[-1.5, -2.0, -2.0], [-1.0, -2.0, 5.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    # k1 = logp_old - ref: row 0 [0.5, 0, -1] -> -0.1·k1 = [-0.05, 0, 0.1], plus 3 on the last token;
    # row 1 [0, 1, (padding)] -> [0, -0.1, 0], plus 1 on its last valid token (t = 1).
    expected = torch.tensor([[-0.05, 0.0, 3.1], [0.0, 0.9, 0.0]])
    assert torch.allclose(token_rewards(outcome, logp_old, ref_logp, mask, kl_coef=0.1), expected, atol=1e-6)
    no_kl = token_rewards(outcome, logp_old, None, mask, kl_coef=0.1)
    assert torch.equal(no_kl, torch.tensor([[0.0, 0.0, 3.0], [0.0, 1.0, 0.0]]))


def test_gae_on_a_hand_computed_5_token_example_with_masks():
    # 4 valid tokens, then padding whose reward and value must not leak in. γ = 1, λ = 0.5:
    # t=3: δ = 1 - 0.4 = 0.6                    A = 0.6
    # t=2: δ = 0 + 0.4 - 0.9 = -0.5             A = -0.5 + 0.5·0.6 = -0.2
    # t=1: δ = -0.1 + 0.9 - 0.2 = 0.6           A = 0.6 + 0.5·(-0.2) = 0.5
    # t=0: δ = 0 + 0.2 - 0.5 = -0.3             A = -0.3 + 0.5·0.5 = -0.05
    rewards = torch.tensor([[0.0, -0.1, 0.0, 1.0, 7.0]])
    values = torch.tensor([[0.5, 0.2, 0.9, 0.4, 9.0]])
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    advantages, returns = gae(rewards, values, mask, gamma=1.0, lam=0.5)
    assert torch.allclose(advantages, torch.tensor([[-0.05, 0.5, -0.2, 0.6, 0.0]]), atol=1e-6)
    assert torch.allclose(returns, torch.tensor([[0.45, 0.7, 0.7, 1.0, 0.0]]), atol=1e-6)  # A + V


def test_gae_with_lambda_1_gives_discounted_monte_carlo_returns():
    rewards = torch.tensor([[0.0, 2.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0, 1.0]])
    values = torch.tensor([[1.0, 1.5, 3.0, 3.0, 3.0], [0.1, 0.2, 0.3, 0.4, 0.5]])
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1]])
    advantages, returns = gae(rewards, values, mask, gamma=0.9, lam=1.0)
    assert torch.allclose(returns[0, :2], torch.tensor([1.8, 2.0]), atol=1e-6)  # 0.9·2, 2
    assert torch.allclose(returns[1], 0.9 ** torch.arange(4.0, -1, -1), atol=1e-6)
    assert torch.allclose(advantages, (returns - values) * mask, atol=1e-6)


def test_whiten_uses_valid_tokens_only():
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 100.0, 100.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    out = whiten(values, mask)
    std = torch.tensor([1.0, 2, 3, 4]).std()
    assert torch.allclose(out, torch.tensor([[-1.5, -0.5, 0.5], [1.5, 0, 0]]) / std, atol=1e-6)
    assert out[mask.bool()].mean().abs() < 1e-6


@pytest.mark.parametrize(
    "value, old, target, loss, clipped",
    [
        (1.5, 1.0, 2.0, 0.5 * 0.8**2, True),  # moved +0.5 towards the target: the clipped 1.2 is further off
        (0.5, 1.0, 0.0, 0.5 * 0.8**2, True),  # the same on the way down
        (1.1, 1.0, 2.0, 0.5 * 0.9**2, False),  # inside the clip range: the plain squared error
        (2.5, 1.0, 2.0, 0.5 * 0.8**2, True),  # overshoot: max of (0.5)² and (0.8)², the pessimistic one
    ],
)
def test_value_clipping(value, old, target, loss, clipped):
    out, was_clipped = clipped_value_loss(torch.tensor([[value]]), torch.tensor([[old]]), torch.tensor([[target]]), 0.2)
    assert out.item() == pytest.approx(loss) and was_clipped.item() == clipped
    unclipped, _ = clipped_value_loss(torch.tensor([[value]]), torch.tensor([[old]]), torch.tensor([[target]]), 0.0)
    assert unclipped.item() == pytest.approx(0.5 * (value - target) ** 2)


def test_explained_variance():
    returns, mask = torch.tensor([[1.0, 2.0, 3.0, 50.0]]), torch.tensor([[1, 1, 1, 0]])
    assert explained_variance(returns, returns, mask) == pytest.approx(1.0)
    assert explained_variance(torch.full((1, 4), 7.0), returns, mask) == pytest.approx(0.0)  # a constant
    # R - V = [0, 0, 1]: Var = 1/3 against Var(R) = 1.
    assert explained_variance(torch.tensor([[1.0, 2.0, 2.0, 0.0]]), returns, mask) == pytest.approx(2 / 3)
    assert explained_variance(-returns, returns, mask) < 0  # worse than predicting the mean


@pytest.fixture(scope="module")
def tiny(tiny_vlm_path):
    processor = load_processor(tiny_vlm_path)
    model = load_model(tiny_vlm_path, "cpu", torch.float32)
    torch.manual_seed(0)
    rollout = generate(model, processor, examples(3, seed=3), 2, Decoding(8))
    return tiny_vlm_path, processor, model, rollout


def test_critic_values_are_causal(tiny):
    """V at token t sees the prompt and tokens < t only: changing token 2 moves the values from t = 3 on."""
    path, _, _, rollout = tiny
    critic = Critic(layout.backbone(load_model(path, "cpu", torch.float32)), 128)
    torch.nn.init.normal_(critic.head.weight)
    ids = rollout.completion_ids.clone()
    full_mask = torch.ones_like(rollout.completion_mask)
    before = critic(rollout.prompt_inputs, ids, full_mask)
    assert before.shape == ids.shape and before.dtype == torch.float32
    ids[:, 2] = (ids[:, 2] + 1) % 300
    after = critic(rollout.prompt_inputs, ids, full_mask)
    assert torch.allclose(before[:, :3], after[:, :3], atol=1e-5)
    assert not torch.allclose(before[:, 3:], after[:, 3:], atol=1e-3)


@pytest.mark.parametrize("shared", [True, False])
def test_critic_warmup_trains_the_critic_and_leaves_the_policy(tiny, make_specs, shared):
    path, _, _, rollout = tiny
    specs = make_specs("ppo", CLIP_RANGE_VALUE=0.0, PPO_EPOCHS=2, MINI_BATCHES=1, MICRO_BATCH_SIZE=4)
    policy = load_model(path, "cpu", torch.float32)
    backbone = layout.backbone(policy if shared else load_model(path, "cpu", torch.float32))
    critic = Critic(backbone, layout.hidden_size(policy), specs.critic)
    params = {id(p): p for p in [*policy.parameters(), *critic.parameters()]}
    optimizer = torch.optim.AdamW(list(params.values()), lr=1e-2)
    rollout.rewards = {"total": torch.arange(6.0)}
    mask = rollout.completion_mask.float()
    returns = rollout.rewards["total"].unsqueeze(1) * mask  # [B, L]
    policy_before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    critic_backbone_before = {n: p.detach().clone() for n, p in critic.backbone.named_parameters()}
    targets = Targets(torch.randn_like(mask), mask, torch.zeros_like(mask) - 1.0, values_old=torch.zeros_like(mask),
                      returns=returns)
    update = lambda train_policy: policy_update(policy, optimizer, rollout, targets, specs.loss,  # noqa: E731
                                                specs.optim, critic=critic, train_policy=train_policy)
    first, second = update(False), update(False)
    assert second["value_loss"] < first["value_loss"]  # the critic learns
    assert critic.head.weight.abs().sum() > 0
    assert all(torch.equal(p, policy_before[n]) for n, p in policy.named_parameters())  # the policy waits
    moved = any(not torch.equal(p, critic_backbone_before[n]) for n, p in critic.backbone.named_parameters())
    assert moved == (not shared)  # a separate critic trains its whole copy; a shared one only its head
    update(True)
    assert any(not torch.equal(p, policy_before[n]) for n, p in policy.named_parameters())
