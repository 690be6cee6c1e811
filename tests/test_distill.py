"""On-policy distillation's math (rlhf_ray/algos.py distill_advantages, compute_experience with a teacher) against
hand-computed values, and its estimator against the exact gradient of the reverse KL by enumeration; the config's
rules for a teacher. The run itself: tests/test_e2e_algos.py."""
import itertools

import pytest
import torch

from rlhf_ray.algos import AdvantageSettings, compute_experience, distill_advantages, masked_whiten
from rlhf_ray.batch import RolloutBatch
from rlhf_ray.config import ConfigError, load_config


def test_distill_advantages_hand_computed_with_a_hole_in_the_mask():
    lp = torch.tensor([[-1.0, -2.0, -0.5, -3.0]])
    teacher = torch.tensor([[-1.5, -1.0, -0.5, -9.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0, 1.0]])      # an observation between two turns, then the last action
    adv, d = distill_advantages(lp, teacher, mask, coef=2.0, gamma=0.0)
    assert d.tolist() == [[-0.5, 1.0, 0.0, -6.0]]
    assert adv.tolist() == [[-1.0, 2.0, 0.0, -12.0]]                # gamma 0: each token its own d_t
    adv, _ = distill_advantages(lp, teacher, mask, coef=1.0, gamma=0.5)
    # gamma 0.5 over the action tokens (the observation passes the running sum through):
    # t3: -6; t1: 1 + 0.5 * -6 = -2; t0: -0.5 + 0.5 * -2 = -1.5
    assert adv.tolist() == [[-1.5, -2.0, 0.0, -6.0]]


def batch_of(mask, lp):
    B, T = mask.shape
    return RolloutBatch(torch.zeros(B, T + 2, dtype=torch.long), torch.ones(B, T + 2), mask, mask, lp.clone())


@pytest.mark.parametrize("estimator", ["grpo", "rloo", "reinforce++", "gae"])
def test_every_estimator_adds_the_teachers_signal_after_its_own_advantages(estimator):
    torch.manual_seed(0)
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0], [1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    lp, ref, teacher = -torch.rand(4, 3), -torch.rand(4, 3), -2 * torch.rand(4, 3)
    scores = torch.tensor([1.0, -1.0, 0.5, 2.0])
    values = torch.randn(4, 3) if estimator == "gae" else None
    s = AdvantageSettings(estimator, n=2, gamma=1.0, lam=0.9)
    task, _ = compute_experience(batch_of(mask, lp), lp, ref, values, scores, s, kl_coef=0.1)
    s = AdvantageSettings(estimator, n=2, gamma=1.0, lam=0.9, distill_coef=0.5, distill_gamma=0.0)
    exp, st = compute_experience(batch_of(mask, lp), lp, ref, values, scores, s, 0.1, teacher_logprobs=teacher)
    assert torch.allclose(exp.advantages, task.advantages + 0.5 * (teacher - lp) * mask)
    if estimator == "gae":                 # the critic's targets are the task's returns: it never fits the teacher
        assert torch.equal(exp.returns, task.returns)
    rkl = ((lp - teacher) * mask).sum() / mask.sum()
    assert st["distill/reverse_kl_per_token"] == pytest.approx(rkl.item())
    assert st["distill/reverse_kl_per_seq"] == pytest.approx(((lp - teacher) * mask).sum(-1).mean().item())


def test_the_teacher_as_the_only_signal_is_its_per_token_advantage_exactly():
    """distill.only: every score 0, so a group estimator gives 0 and the advantage is coef * d_t, unwhitened."""
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    lp, teacher = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, -0.5, -0.5]]), torch.tensor([[-2.0, -1.0, 0.0], [-1.0, 0.0, -3.0]])
    s = AdvantageSettings("grpo", n=2, distill_coef=1.0)
    exp, _ = compute_experience(batch_of(mask, lp), lp, lp, None, torch.zeros(2), s, 0.0, teacher_logprobs=teacher)
    assert exp.advantages.tolist() == [[-1.0, 1.0, 0.0], [-0.5, 0.5, -2.5]]
    # whitened, the same signal would lose its scale (nats): the reason it joins after whitening
    assert not torch.allclose(masked_whiten(exp.advantages, mask), exp.advantages)


# ---------------------------------------------------------------- the estimator against the exact gradient

V, T = 3, 2      # a tabular policy over two-token answers: every answer enumerated, so expectations are exact


def tabular(theta):
    """log pi(y1) [V] and log pi(y2 | y1) [V, V] of a tabular two-step policy."""
    return torch.log_softmax(theta[0], -1), torch.log_softmax(theta[1:], -1)


def expected_surrogate(theta, teacher, gamma):
    """E_{y ~ pi}[sum_t A_t * log pi(y_t | y_<t)] with A = distill_advantages (held fixed, as the PPO loss holds its
    advantages), summed exactly over all V^T answers: its gradient is the estimator's expectation."""
    l1, l2 = tabular(theta)
    t1, t2 = tabular(teacher)
    total = 0.0
    for a, b in itertools.product(range(V), repeat=T):
        lp = torch.stack([l1[a], l2[a, b]])[None]
        adv, _ = distill_advantages(lp.detach(), torch.stack([t1[a], t2[a, b]])[None], torch.ones(1, T), 1.0, gamma)
        total = total + lp.sum().exp().detach() * (adv * lp).sum()
    return total


def estimated(seed: int, gamma: float):
    """A random policy and teacher; the estimator's expected gradient, and the log-probabilities of both."""
    torch.manual_seed(seed)
    theta, teacher = torch.randn(1 + V, V, requires_grad=True), torch.randn(1 + V, V)
    grad_est, = torch.autograd.grad(expected_surrogate(theta, teacher, gamma), theta)
    return theta, grad_est, tabular(theta), tabular(teacher)


def test_gamma_one_is_the_gradient_of_the_sequence_level_reverse_kl():
    theta, grad_est, (l1, l2), (t1, t2) = estimated(1, gamma=1.0)
    seq_lp = l1[:, None] + l2                                  # log pi(a, b) [V, V]
    kl = (seq_lp.exp() * (seq_lp - (t1[:, None] + t2))).sum()  # KL(pi || teacher) over whole answers
    grad_kl, = torch.autograd.grad(kl, theta)
    assert torch.allclose(grad_est, -grad_kl, atol=1e-5)


def test_gamma_zero_is_the_gradient_of_each_positions_reverse_kl_with_its_prefix_held():
    theta, grad_est, (l1, l2), (t1, t2) = estimated(2, gamma=0.0)
    prefix = l1.exp().detach()                                 # the first token's distribution, held
    kl = (l1.exp() * (l1 - t1)).sum() + (prefix[:, None] * l2.exp() * (l2 - t2)).sum()
    grad_kl, = torch.autograd.grad(kl, theta)
    assert torch.allclose(grad_est, -grad_kl, atol=1e-5)
    # and it is not the sequence-level gradient: the first token's effect on the second's KL is left out
    l1, l2 = tabular(theta)
    seq_lp = l1[:, None] + l2
    full, = torch.autograd.grad((seq_lp.exp() * (seq_lp - (t1[:, None] + t2))).sum(), theta)
    assert not torch.allclose(grad_est, -full, atol=1e-3)


# ---------------------------------------------------------------- the config's rules

def test_the_distill_keys_reach_the_advantage_settings_only_with_a_teacher():
    sets = ["distill.coef=0.3", "distill.gamma=0.5"]
    cfg = load_config("configs/tiny_grpo.yaml", ["models.teacher=t", *sets])
    s = AdvantageSettings.of(cfg.ppo, cfg.generation.n, cfg.distill)
    assert (s.distill_coef, s.distill_gamma) == (0.3, 0.5)
    assert AdvantageSettings.of(cfg.ppo, cfg.generation.n).distill_coef == 0.0



def test_a_teacher_is_a_role_of_its_own_placed_planned_and_shareable():
    cfg = load_config("configs/tiny_grpo.yaml", ["models.teacher=t", "placement.share_process=[[reference, teacher]]"])
    assert cfg.present(["reference", "teacher", "reward"]) == ["reference", "teacher", "reward"]
    cfg.check_ppo(paths=False)
    assert "teacher" not in load_config("configs/tiny_grpo.yaml").present(["reference", "teacher"])


@pytest.mark.parametrize("sets, message", [
    (["distill.only=true"], "distill.only needs models.teacher"),
    (["models.teacher=t", "distill.only=true"], "reward.sources must be empty with distill.only"),
    (["models.teacher=t", "distill.only=true", "reward.sources=[]", "ppo.advantage=gae"],
     "ppo.advantage gae fits a critic to the task return"),
    (["models.teacher=t", "distill.gamma=1.5"], "distill.gamma must lie in [0, 1]"),
    (["models.teacher=t", "distill.coef=-1"], "distill.coef must be a finite number >= 0"),
    (["models.teacher=t", "teacher.micro_batch_size=0"], "teacher.micro_batch_size must be >= 1"),
    (["models.teacher=t", "ppo.ratio_level=sequence", "ppo.clip=null", "ppo.loss_agg=seq-mean-token-mean"],
     "ppo.ratio_level must be token with models.teacher"),
])
def test_distillation_settings_that_cannot_work_are_one_line_errors(sets, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_config("configs/tiny_grpo.yaml", sets).check_ppo(paths=False)


def test_with_the_teacher_as_the_only_signal_no_reward_actor_is_placed():
    cfg = load_config("configs/tiny_grpo.yaml", ["models.teacher=t", "distill.only=true", "reward.sources=[]"])
    cfg.check_ppo(paths=False)
    assert cfg.reward_sources() == [] and cfg.present(["reference", "reward", "teacher"]) == ["reference", "teacher"]
