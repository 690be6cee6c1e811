"""The action mask through the RL math: a multi-turn rollout's observation tokens (mask 0 between turns) count in no
loss term, KL or advantage, and carry the return across turns; a single-turn mask reproduces the single-turn
recurrences bit for bit."""
import torch

from rlhf_ray.algos import (AdvantageSettings, compute_experience, discounted_returns, gae_advantages, kl_estimate,
                            kl_penalized_rewards, ppo_policy_loss, aggregate, value_loss)
from rlhf_ray.batch import RolloutBatch


def single_turn_gae(rewards, values, mask, gamma, lam):
    """The single-turn recurrence as it was before multi-turn rollouts (contiguous masks only)."""
    values, rewards = values * mask, rewards * mask
    T = rewards.size(1)
    adv, last = torch.zeros_like(rewards), torch.zeros_like(rewards[:, 0])
    for t in reversed(range(T)):
        next_v = values[:, t + 1] if t + 1 < T else torch.zeros_like(values[:, 0])
        last = (rewards[:, t] + gamma * next_v - values[:, t] + gamma * lam * last) * mask[:, t]
        adv[:, t] = last
    return adv * mask, (adv + values) * mask


def contiguous_mask(lengths, T):
    return (torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]).float()


def gapped_mask(T, g):
    """Turns of action tokens with observations (0) between them, then padding."""
    rows = []
    for _ in range(6):
        row, t = torch.zeros(T), 0
        while t < T - 4:
            n = int(torch.randint(1, 4, (), generator=g))
            row[t:t + n] = 1.0
            t += n + int(torch.randint(1, 3, (), generator=g))
        rows.append(row)
    return torch.stack(rows)


def test_single_turn_masks_give_the_single_turn_gae_bit_for_bit():
    g = torch.Generator().manual_seed(0)
    mask = contiguous_mask([7, 3, 1, 7, 5], 7)
    r, v = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    for gamma, lam in ((1.0, 0.95), (0.9, 0.5)):
        got, want = gae_advantages(r, v, mask, gamma, lam), single_turn_gae(r, v, mask, gamma, lam)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_gae_and_returns_skip_observations_as_if_the_turns_were_one_sequence():
    """On a gapped mask, each row's advantages and returns at its action tokens equal the recurrence over those
    tokens alone, packed together: observations pass the return and the next action's value through."""
    g = torch.Generator().manual_seed(1)
    mask = gapped_mask(16, g)
    r, v = torch.randn(6, 16, generator=g), torch.randn(6, 16, generator=g)
    adv, ret = gae_advantages(r, v, mask, 0.9, 0.8)
    G = discounted_returns(r, mask, 0.9)
    for i in range(6):
        act = mask[i].bool()
        n = int(act.sum())
        packed_adv, packed_ret = gae_advantages(r[i, act][None], v[i, act][None], torch.ones(1, n), 0.9, 0.8)
        assert torch.allclose(adv[i, act], packed_adv[0], atol=1e-6) and torch.allclose(ret[i, act], packed_ret[0], atol=1e-6)
        assert torch.allclose(G[i, act], discounted_returns(r[i, act][None], torch.ones(1, n), 0.9)[0], atol=1e-6)
        assert not adv[i, ~act].any() and not ret[i, ~act].any() and not G[i, ~act].any()


def test_the_score_lands_on_the_last_action_token_and_turn_rewards_where_they_are_given():
    mask = torch.tensor([[1.0, 1.0, 0.0, 0.0, 1.0, 0.0], [1.0, 1.0, 1.0, 0.0, 0.0, 0.0]])
    zeros = torch.zeros(2, 6)
    turn = torch.zeros(2, 6)
    turn[0, 1] = 0.5                                               # row 0's first turn ended at position 1
    rewards, _ = kl_penalized_rewards(torch.tensor([2.0, 3.0]), zeros, zeros, mask, 0.1, token_rewards=turn)
    assert rewards.tolist() == [[0, 0.5, 0, 0, 2.0, 0], [0, 0, 3.0, 0, 0, 0]]


def test_observation_tokens_change_no_advantage_loss_or_gradient():
    """Whatever the old, reference and sampling logprobs, the values and the policy's own logprobs say on the
    observation tokens, every estimator's advantages, the policy loss with its KL and entropy terms, the value loss
    and their gradients are the same."""
    g = torch.Generator().manual_seed(2)
    B, T = 6, 16
    mask = gapped_mask(T, g)
    obs = (mask == 0) & (torch.arange(T)[None, :] <= torch.tensor([int(m.nonzero().max()) for m in mask])[:, None])
    assert obs.any()
    base = {k: torch.randn(B, T, generator=g) for k in ("lp", "old", "ref", "sample", "values", "ent")}
    noisy = {k: torch.where(obs, x + 5 * torch.randn(B, T, generator=g), x) for k, x in base.items()}
    scores = torch.randn(B, generator=g)
    turn = torch.zeros(B, T)

    def run(t, estimator):
        batch = RolloutBatch(torch.zeros(B, 4 + T, dtype=torch.long), torch.ones(B, 4 + T, dtype=torch.long),
                             (mask + obs.float()).clamp(max=1), mask, t["sample"])
        exp, _ = compute_experience(batch, t["old"], t["ref"], t["values"] if estimator == "gae" else None, scores,
                                    AdvantageSettings(estimator=estimator, n=2, is_correction="tis"), kl_coef=0.1,
                                    token_rewards=turn)
        lp = t["lp"].clone().requires_grad_(True)
        ent = t["ent"].clone().requires_grad_(True)
        loss, _ = ppo_policy_loss(lp, exp.old_logprobs, exp.advantages, mask, 0.2, 3.0, "seq-mean-token-mean",
                                  token_weights=exp.is_weights)
        loss = (loss + 0.1 * aggregate(kl_estimate(lp, exp.ref_logprobs, "k3"), mask, "seq-mean-token-mean")
                - 0.01 * aggregate(ent, mask, "seq-mean-token-mean"))
        loss.backward()
        out = [exp.advantages, loss.detach(), lp.grad, ent.grad]
        if estimator == "gae":
            v = t["values"].clone().requires_grad_(True)
            vl, _ = value_loss(v, exp.values, exp.returns, mask, 0.2)
            vl.backward()
            out += [exp.returns, vl.detach(), v.grad]
        return out

    for estimator in ("gae", "grpo", "rloo", "reinforce++"):
        a, b = run(base, estimator), run(noisy, estimator)
        for x, y in zip(a, b):
            assert torch.equal(x, y), estimator
        assert not a[2][obs].any()                      # no gradient reaches an observation token's logprob
