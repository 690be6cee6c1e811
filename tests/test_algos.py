"""The RL math against small hand-computed cases and known properties."""
import math

import pytest
import torch

from rlhf_ray.batch import RolloutBatch
from rlhf_ray.algos import (AdvantageSettings, compute_experience, entropy_from_logits, gae_advantages,
                            kl_penalized_rewards, logprobs_from_logits, masked_mean, masked_whiten, ppo_policy_loss,
                            value_loss)


def test_masked_mean_ignores_padding():
    x = torch.tensor([[1.0, 2.0, 100.0], [3.0, 100.0, 100.0]])
    m = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    assert masked_mean(x, m).item() == pytest.approx(2.0)
    assert masked_mean(x, m, dim=-1).tolist() == pytest.approx([1.5, 3.0])


def test_whiten_zero_mean_unit_std_on_mask():
    x = torch.tensor([[1.0, 2.0, 3.0, 50.0], [4.0, 5.0, 0.0, 0.0]])
    m = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    w = masked_whiten(x, m)
    vals = w[m.bool()]
    assert vals.mean().item() == pytest.approx(0.0, abs=1e-6)
    assert vals.std().item() == pytest.approx(1.0, abs=1e-4)   # unbiased, as masked_var
    assert (w[~m.bool()] == 0).all()


def test_logprobs_and_entropy_match_log_softmax():
    logits = torch.tensor([[[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]]])
    labels = torch.tensor([[2, 1]])
    lp = logprobs_from_logits(logits, labels)
    ref = torch.log_softmax(logits, -1).gather(-1, labels[..., None]).squeeze(-1)
    assert torch.allclose(lp, ref)
    assert entropy_from_logits(logits)[0, 1].item() == pytest.approx(math.log(3))


def test_kl_penalised_reward_puts_score_on_last_real_token():
    lp = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -1.0, 0.0]])
    ref = torch.tensor([[-1.5, -2.0, -2.0], [-2.0, -1.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    rewards, kl = kl_penalized_rewards(torch.tensor([10.0, 20.0]), lp, ref, mask, kl_coef=0.1)
    # kl = lp - ref = [[0.5, 0, -1], [1, 0, (pad)]]; r = -0.1 kl, + score at the last real token
    assert torch.allclose(rewards, torch.tensor([[-0.05, 0.0, 0.1 + 10.0], [-0.1, 0.0 + 20.0, 0.0]]))
    assert kl[1, 2] == 0


def test_gae_hand_computed():
    # one sequence, 3 tokens, gamma=0.9, lam=0.5
    r = torch.tensor([[1.0, 0.0, 2.0]])
    v = torch.tensor([[0.5, 1.0, 1.5]])
    m = torch.ones(1, 3)
    adv, ret = gae_advantages(r, v, m, gamma=0.9, lam=0.5)
    d2 = 2.0 - 1.5                      # terminal: V after the last token is 0
    d1 = 0.0 + 0.9 * 1.5 - 1.0
    d0 = 1.0 + 0.9 * 1.0 - 0.5
    a2 = d2
    a1 = d1 + 0.45 * a2
    a0 = d0 + 0.45 * a1
    assert adv[0].tolist() == pytest.approx([a0, a1, a2])
    assert ret[0].tolist() == pytest.approx([a0 + 0.5, a1 + 1.0, a2 + 1.5])


def test_gae_lambda_one_is_discounted_return_minus_value_and_padding_is_inert():
    r = torch.tensor([[1.0, 2.0, 3.0, 0.0], [0.5, 0.0, 0.0, 0.0]])
    v = torch.tensor([[0.3, -0.2, 0.7, 9.0], [1.0, 9.0, 9.0, 9.0]])     # values on padding must not leak in
    m = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    g = 0.9
    adv, ret = gae_advantages(r, v, m, gamma=g, lam=1.0)
    disc = [1 + g * 2 + g * g * 3, 2 + g * 3, 3.0]
    assert ret[0, :3].tolist() == pytest.approx(disc)
    assert adv[0, :3].tolist() == pytest.approx([d - x for d, x in zip(disc, [0.3, -0.2, 0.7])])
    assert adv[1].tolist() == pytest.approx([0.5 - 1.0, 0, 0, 0])


def test_policy_loss_clipping_bounds_the_ratio():
    old = torch.zeros(1, 2)
    new = torch.tensor([[math.log(2.0), math.log(0.5)]])      # ratios 2 and 0.5
    mask = torch.ones(1, 2)
    # positive advantage: ratio 2 clipped to 1.2 -> -1.2;  ratio 0.5 unclipped (pessimistic min) -> -0.5
    loss, st = ppo_policy_loss(new, old, torch.ones(1, 2), mask, clip=0.2)
    assert loss.item() == pytest.approx((-1.2 - 0.5) / 2)
    assert st["clipfrac"].item() == pytest.approx(0.5)
    # negative advantage: ratio 2 unclipped -> +2;  ratio 0.5 clipped to 0.8 -> +0.8
    loss, _ = ppo_policy_loss(new, old, -torch.ones(1, 2), mask, clip=0.2)
    assert loss.item() == pytest.approx((2.0 + 0.8) / 2)
    # gradient is zero where the clip is active (first token, A>0)
    new.requires_grad_(True)
    loss, _ = ppo_policy_loss(new, old, torch.ones(1, 2), mask, clip=0.2)
    loss.backward()
    assert new.grad[0, 0].item() == 0.0 and new.grad[0, 1].item() != 0.0


def test_policy_loss_at_ratio_one_is_minus_mean_advantage_and_approx_kl_zero():
    lp = torch.randn(3, 4)
    adv = torch.randn(3, 4)
    mask = torch.ones(3, 4)
    loss, st = ppo_policy_loss(lp, lp, adv, mask, clip=0.2)
    assert loss.item() == pytest.approx(-adv.mean().item(), abs=1e-6)
    assert st["approx_kl"].item() == pytest.approx(0.0, abs=1e-7)


def test_value_loss_clipped_takes_the_larger_error():
    old = torch.tensor([[1.0, 1.0]])
    new = torch.tensor([[2.0, 1.1]])
    ret = torch.tensor([[3.0, 0.0]])
    mask = torch.ones(1, 2)
    loss, st = value_loss(new, old, ret, mask, clip=0.2)
    # token 0: unclipped (2-3)^2 = 1, clipped (1.2-3)^2 = 3.24 -> 3.24; token 1: (1.1)^2 both -> 1.21
    assert loss.item() == pytest.approx(0.5 * (3.24 + 1.21) / 2)
    assert st["vf_clipfrac"].item() == pytest.approx(0.5)
    loss0, _ = value_loss(new, old, ret, mask, clip=0.0)
    assert loss0.item() == pytest.approx(0.5 * (1.0 + 1.21) / 2)


def test_compute_experience_composes_kl_gae_whitening():
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    lp, ref = torch.full((2, 3), -1.0), torch.full((2, 3), -1.2)
    batch = RolloutBatch(torch.zeros(2, 5, dtype=torch.long), torch.ones(2, 5), mask, mask, lp.clone())
    values = torch.zeros(2, 3)
    exp, st = compute_experience(batch, lp, ref, values, torch.tensor([1.0, -1.0]),
                                 AdvantageSettings(gamma=1.0, lam=1.0, whiten_advantages=False), kl_coef=0.5)
    # kl 0.2 per token; returns with gamma=lam=1 and V=0 are the reward-to-go
    assert exp.returns[0].tolist() == pytest.approx([1.0 - 0.3, 1.0 - 0.2, 1.0 - 0.1])
    assert exp.returns[1].tolist() == pytest.approx([-1.0 - 0.2, -1.0 - 0.1, 0.0])
    assert st["kl/ref_per_seq"] == pytest.approx((0.6 + 0.4) / 2)


def test_adaptive_kl_controller_moves_toward_target_with_clipped_error():
    from rlhf_ray.algos import adaptive_kl_coef
    assert adaptive_kl_coef(0.1, observed_kl=2.0, target=1.0, horizon=10) == pytest.approx(0.1 * (1 + 0.2 / 10))
    assert adaptive_kl_coef(0.1, observed_kl=0.9, target=1.0, horizon=10) == pytest.approx(0.1 * (1 - 0.1 / 10))
    assert adaptive_kl_coef(0.1, observed_kl=1.0, target=1.0, horizon=10) == pytest.approx(0.1)
    coef = 0.1
    for _ in range(100):                       # persistently above target: the coefficient keeps growing
        coef = adaptive_kl_coef(coef, 3.0, 1.0, 10)
    assert coef > 0.1 * 1.02 ** 99


def test_initial_score_norm_fixes_the_first_batch_statistics_and_round_trips():
    from rlhf_ray.algos import ScoreNorm
    norm = ScoreNorm("initial")
    first = torch.tensor([1.0, 3.0, 5.0])
    assert torch.allclose(norm(first), torch.tensor([-1.0, 0.0, 1.0]))
    assert torch.allclose(norm(torch.tensor([5.0, 7.0])), torch.tensor([1.0, 2.0]))   # the same shift and scale
    again = ScoreNorm("initial")
    again.load(norm.state())                                   # a resumed run keeps the starting statistics
    assert torch.allclose(again(torch.tensor([9.0])), torch.tensor([3.0]))
    assert torch.equal(ScoreNorm("none")(first), first)
