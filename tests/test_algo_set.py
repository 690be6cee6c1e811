"""The algorithm set beyond the classic PPO spine (GRPO, RLOO, REINFORCE++, dual clip, KL estimators and placement,
loss aggregations, importance weights) against hand-computed cases and known properties (pure functions)."""
import math

import pytest
import torch

from rlhf_ray.batch import RolloutBatch
from rlhf_ray.algos import (AdvantageSettings, aggregate, compute_experience, discounted_returns,
                            group_advantages, kl_estimate, kl_k1, kl_k2, kl_k3, missing_eos_penalty, ppo_policy_loss)


def test_kl_estimators_hand_values_and_signs():
    lp, ref = torch.tensor([-1.0, -2.0, -0.5]), torch.tensor([-1.0, -1.0, -2.0])
    log_r = ref - lp                                   # r = pi_ref / pi
    assert torch.allclose(kl_k1(lp, ref), -log_r)
    assert torch.allclose(kl_k2(lp, ref), 0.5 * log_r ** 2)
    assert torch.allclose(kl_k3(lp, ref), log_r.exp() - 1 - log_r)
    x = torch.randn(1000) * 3
    y = torch.randn(1000) * 3
    assert (kl_k3(x, y) >= 0).all() and (kl_k2(x, y) >= 0).all()
    assert kl_k3(x, x).abs().max() == 0
    assert torch.isfinite(kl_k3(torch.tensor([0.0]), torch.tensor([-500.0]))).all()   # clamped, no overflow


def test_k1_and_k3_are_unbiased_for_kl_under_samples_of_pi():
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([0.5, 0.3, 0.15, 0.05])
    q = torch.tensor([0.25, 0.25, 0.25, 0.25])
    true_kl = (p * (p / q).log()).sum().item()
    a = torch.multinomial(p, 200_000, replacement=True, generator=g)
    for est in ("k1", "k3"):
        assert kl_estimate(p.log()[a], q.log()[a], est).mean().item() == pytest.approx(true_kl, abs=5e-3)
    # k3 has the smaller variance of the two unbiased estimators here (Schulman 2020)
    assert kl_estimate(p.log()[a], q.log()[a], "k3").var() < kl_estimate(p.log()[a], q.log()[a], "k1").var()


def test_grpo_group_normalisation_and_the_std_switch():
    scores = torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0])
    assert group_advantages(scores, 3, "grpo").tolist() == pytest.approx([-1.0, 0.0, 1.0, 0.0, 0.0, 0.0], abs=1e-5)
    assert group_advantages(scores * 10, 3, "grpo", norm_std=False).tolist() == pytest.approx([-10, 0, 10, 0, 0, 0])
    assert group_advantages(torch.tensor([4.0, 7.0]), 1, "grpo").tolist() == [0.0, 0.0]


def test_rloo_baseline_leaves_the_sample_itself_out():
    scores = torch.tensor([1.0, 2.0, 3.0, 10.0, 0.0])
    adv = group_advantages(scores[:3], 3, "rloo")
    assert adv.tolist() == pytest.approx([1 - 2.5, 2 - 2.0, 3 - 1.5])
    bumped = scores[:3].clone()
    bumped[0] = 100.0                                  # sample 0's own reward does not move its baseline
    assert (bumped[0] - group_advantages(bumped, 3, "rloo")[0]).item() == pytest.approx(2.5)
    assert group_advantages(scores[3:], 2, "rloo").tolist() == [10.0, -10.0]
    with pytest.raises(ValueError):
        group_advantages(scores, 1, "rloo")


def test_discounted_returns_hand_computed_with_padding():
    r = torch.tensor([[1.0, 0.0, 2.0], [3.0, 4.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    G = discounted_returns(r, mask, gamma=0.5)
    assert G.tolist() == [[1 + 0.5 * 0 + 0.25 * 2, 0 + 0.5 * 2, 2.0], [3 + 0.5 * 4, 4.0, 0.0]]


def test_dual_clip_bounds_the_loss_of_a_negative_advantage():
    lp, old = torch.tensor([[math.log(10.0)]], requires_grad=True), torch.zeros(1, 1)   # ratio 10
    mask = torch.ones(1, 1)
    neg = torch.tensor([[-1.0]])
    plain, _ = ppo_policy_loss(lp, old, neg, mask, clip=0.2)
    dual, st = ppo_policy_loss(lp, old, neg, mask, clip=0.2, dual_clip=3.0)
    assert plain.item() == pytest.approx(10.0) and dual.item() == pytest.approx(3.0)
    assert st["dual_clipfrac"].item() == 1.0
    dual.backward()
    assert lp.grad.abs().item() == 0.0                 # bounded: no gradient pushes the ratio further
    pos, _ = ppo_policy_loss(lp.detach(), old, -neg, mask, clip=0.2, dual_clip=3.0)
    assert pos.item() == pytest.approx(-1.2)           # positive advantages: the ordinary clip


def test_each_aggregation_mode_on_a_ragged_batch_and_exact_over_micro_batches():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0], [5.0, 7.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0], [1.0, 1.0, 0.0]])
    assert aggregate(x, mask, "token-mean").item() == pytest.approx(22 / 6)
    assert aggregate(x, mask, "seq-mean-token-mean").item() == pytest.approx((2 + 4 + 6) / 3)
    assert aggregate(x, mask, "seq-mean-token-sum").item() == pytest.approx((6 + 4 + 12) / 3)
    for mode, den in (("token-mean", 6.0), ("seq-mean-token-mean", 3.0), ("seq-mean-token-sum", 3.0)):
        parts = sum(aggregate(x[i:j], mask[i:j], mode, den) for i, j in ((0, 1), (1, 3)))
        assert parts.item() == pytest.approx(aggregate(x, mask, mode).item())
    with pytest.raises(ValueError):
        aggregate(x, mask, "sum")


def test_missing_eos_penalty_hits_only_truncated_responses():
    out = missing_eos_penalty(torch.tensor([1.0, 1.0]), torch.tensor([True, False]), 0.5)
    assert out.tolist() == [1.0, 0.5]


def _rollout():
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0], [1.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    lp = torch.full((4, 3), -1.0)
    batch = RolloutBatch(torch.zeros(4, 5, dtype=torch.long), torch.ones(4, 5), mask, mask, lp.clone())
    ref = torch.full((4, 3), -1.5)
    return batch, lp, ref, mask


@pytest.mark.parametrize("estimator", ["grpo", "rloo"])
def test_group_estimators_need_no_values_and_give_every_token_the_sequence_advantage(estimator):
    batch, lp, ref, mask = _rollout()
    scores = torch.tensor([1.0, 0.0, 2.0, 2.0])
    exp, st = compute_experience(batch, lp, ref, None, scores, AdvantageSettings(estimator=estimator, n=2), kl_coef=0.0)
    seq = group_advantages(scores, 2, estimator)
    assert torch.allclose(exp.advantages, seq[:, None] * mask)
    assert exp.values is None and "value/mean" not in st
    # KL in the reward becomes a sequence-level penalty on the outcome: beta * sum_t KL_t
    exp_kl, _ = compute_experience(batch, lp, ref, None, scores, AdvantageSettings(estimator=estimator, n=2), kl_coef=1.0)
    outcome = scores - 0.5 * mask.sum(-1)
    assert torch.allclose(exp_kl.advantages, group_advantages(outcome, 2, estimator)[:, None] * mask)


def test_kl_as_a_loss_term_leaves_the_reward_alone():
    batch, lp, ref, mask = _rollout()
    scores = torch.tensor([1.0, 0.0, 2.0, 2.0])
    in_loss, st = compute_experience(batch, lp, ref, None, scores,
                                     AdvantageSettings(estimator="grpo", n=2, kl_in_reward=False), kl_coef=1.0)
    bare, _ = compute_experience(batch, lp, ref, None, scores, AdvantageSettings(estimator="grpo", n=2), kl_coef=0.0)
    assert torch.equal(in_loss.advantages, bare.advantages)
    assert st["kl/ref_per_seq"] == pytest.approx((0.5 * mask.sum(-1)).mean().item())   # still measured
    assert torch.equal(in_loss.ref_logprobs, ref)                                      # for the policy's loss


def test_reinforce_pp_whitens_kl_penalised_returns_over_the_batch():
    batch, lp, ref, mask = _rollout()
    scores = torch.tensor([1.0, 0.0, 2.0, 3.0])
    exp, _ = compute_experience(batch, lp, ref, None, scores, AdvantageSettings(estimator="reinforce++", gamma=1.0),
                                kl_coef=0.1)
    a = exp.advantages
    assert (a * mask).sum().item() == pytest.approx(0.0, abs=1e-5)
    from rlhf_ray.algos import kl_penalized_rewards, masked_whiten
    rewards, _ = kl_penalized_rewards(scores, lp, ref, mask, 0.1)
    assert torch.allclose(a, masked_whiten(discounted_returns(rewards, mask, 1.0), mask), atol=1e-6)
    with pytest.raises(ValueError):
        compute_experience(batch, lp, ref, None, scores, AdvantageSettings(estimator="ppo2"), kl_coef=0.1)


def test_importance_weights_truncate_or_mask_and_carry_no_gradient():
    from rlhf_ray.algos import importance_weights
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0]])
    sample = torch.full((1, 5), -2.0)
    rho = torch.tensor([[1.0, 3.0, 0.25, 1.5, 9.0]])                    # the last token is padding
    old = (sample + rho.log()).requires_grad_(True)
    tis, st = importance_weights(old, sample, mask, "tis", 2.0)
    assert torch.allclose(tis, torch.tensor([[1.0, 2.0, 0.25, 1.5, 0.0]])) and not tis.requires_grad
    assert st["rollout/is_corrected_frac"] == pytest.approx(1 / 4)     # only rho = 3 is truncated
    assert st["rollout/is_ratio_max"] == pytest.approx(3.0) and st["rollout/is_ratio_mean"] == pytest.approx(5.75 / 4)
    masked, st = importance_weights(old, sample, mask, "mask", 2.0)
    assert masked.tolist() == [[1.0, 0.0, 0.0, 1.0, 0.0]]                 # 3 > 2 and 0.25 < 1/2 dropped
    assert st["rollout/is_corrected_frac"] == pytest.approx(2 / 4)
    none, st = importance_weights(old, sample, mask, "none", 2.0)
    assert none is None and st["rollout/is_corrected_frac"] == 0.0
    with pytest.raises(ValueError, match="unknown importance correction"):
        importance_weights(old, sample, mask, "ppo", 2.0)


def test_token_weights_scale_each_tokens_policy_loss_and_reach_the_experience():
    from rlhf_ray.algos import ppo_policy_loss
    mask = torch.ones(2, 3)
    lp, old, adv = torch.full((2, 3), -1.0, requires_grad=True), torch.full((2, 3), -1.0), torch.ones(2, 3)
    w = torch.tensor([[1.0, 0.0, 2.0], [0.5, 0.5, 0.0]])
    plain, _ = ppo_policy_loss(lp, old, adv, mask, 0.2)
    weighted, _ = ppo_policy_loss(lp, old, adv, mask, 0.2, token_weights=w)
    assert plain.item() == pytest.approx(-1.0) and weighted.item() == pytest.approx(-4.0 / 6)
    batch, lp, ref, mask = _rollout()
    batch.sample_logprobs = lp - 0.5                                  # the engines' weights were older
    exp, st = compute_experience(batch, lp, ref, None, torch.tensor([1.0, 0.0, 2.0, 2.0]),
                                 AdvantageSettings(estimator="grpo", n=2, is_correction="tis", is_cap=1.5), kl_coef=0.0)
    assert torch.allclose(exp.is_weights, 1.5 * mask)                 # rho = e^0.5 = 1.65 truncated at 1.5
    assert st["rollout/is_corrected_frac"] == 1.0
    plain_exp, _ = compute_experience(batch, lp, ref, None, torch.tensor([1.0, 0.0, 2.0, 2.0]),
                                      AdvantageSettings(estimator="grpo", n=2), kl_coef=0.0)
    assert plain_exp.is_weights is None
