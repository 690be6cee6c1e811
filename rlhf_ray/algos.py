"""The RL math of RLHF-PPO as pure functions over padded tensors and masks.

Shapes: B sequences, T response positions. `mask` is 1.0 on the tokens the policy wrote (the EOS included),
0.0 on padding and, in a multi-turn rollout, on the observations an environment appended between its turns
(the action mask, rlhf_ray/batch.py). Every reduction is masked; nothing here knows about actors, ranks or
devices. The recurrences (GAE, discounted returns) run over the action tokens only: an observation token passes
the running return and the next action's value through unchanged, so a turn's advantage sees the turns after
it; a single-turn mask (contiguous, then padding) gives exactly the single-turn recurrence.

References: Ziegler et al. 2019 (KL-penalised reward), Schulman et al. 2016 (GAE), Schulman et al. 2017 (PPO),
Ouyang et al. 2022 (InstructGPT), Huang et al. "The N implementation details of RLHF with PPO" (2023).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from rlhf_ray.batch import Experience, RolloutBatch
from rlhf_ray.choices import (AdvantageEstimator, ISCorrection, KLEstimator, LossAggregation, RatioLevel,
                              RewardNorm, options)


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    return (x * mask).sum() if dim is None else (x * mask).sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1.0)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1.0)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        n = mask.sum()
        var = var * n / (n - 1).clamp(min=1.0)
    return var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over the masked entries; padding positions come back as 0."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    return (x - mean) * torch.rsqrt(var + eps) * mask


def logprobs_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[labels], computed without materialising the full log-softmax twice."""
    logits = logits.float()
    return torch.gather(logits, -1, labels.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    logits = logits.float()
    logp = F.log_softmax(logits, dim=-1)
    return -(logp.exp() * logp).sum(-1)


def kl_k1(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token k1 estimator log pi(a|s) - log pi_ref(a|s) (unbiased for KL(pi || pi_ref) under samples of pi)."""
    return logprobs - ref_logprobs


def kl_k2(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Schulman's k2 = (log r)^2 / 2 with r = pi_ref / pi: biased, low variance, >= 0."""
    return 0.5 * (ref_logprobs - logprobs) ** 2


def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 = (r - 1) - log r with r = pi_ref / pi: unbiased, low variance, >= 0 (GRPO's KL loss).
    The log ratio is clamped to +-20 so one wild token cannot overflow the exp."""
    log_r = torch.clamp(ref_logprobs - logprobs, -20.0, 20.0)
    return torch.exp(log_r) - 1.0 - log_r


KL_ESTIMATORS = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}
assert tuple(KL_ESTIMATORS) == options(KLEstimator)


def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str) -> torch.Tensor:
    return KL_ESTIMATORS[estimator](logprobs, ref_logprobs)


def last_action_index(mask: torch.Tensor) -> torch.Tensor:
    """[B, T] mask -> [B] long: the position of each row's last masked token (0 for an empty row)."""
    positions = torch.arange(mask.size(-1), device=mask.device).expand_as(mask)
    return torch.where(mask > 0, positions, torch.zeros_like(positions)).amax(-1)


def kl_penalized_rewards(scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
                         mask: torch.Tensor, kl_coef: float, estimator: str = "k1",
                         token_rewards: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token reward r_t = -beta * KL_t, plus the sequence score at the last action token.

    Returns (rewards [B, T], kl [B, T]). The score lands on the final token the policy wrote (the EOS when one
    was generated), as in Ziegler et al. 2019 and InstructGPT. kl_coef = 0 gives the bare score.
    token_rewards [B, T], when given, is added as it is: an environment's per-turn rewards, each on its turn's
    last action token (rlhf_ray/env.py).
    """
    kl = kl_estimate(logprobs, ref_logprobs, estimator) * mask
    rewards = -kl_coef * kl
    rewards = rewards.clone()
    rewards[torch.arange(rewards.size(0)), last_action_index(mask)] += scores.to(rewards.dtype)
    if token_rewards is not None:
        rewards = rewards + token_rewards.to(rewards.dtype)
    return rewards * mask, kl


def gae_advantages(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
                   gamma: float, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over the response tokens (Schulman et al. 2016).

    delta_t = r_t + gamma * V_{t+1} - V_t;  A_t = delta_t + gamma * lam * A_{t+1};  returns = A + V.
    t runs over the action tokens: t+1 is the next one, across any observation between turns. V after the last
    action token is 0 (the episode ends there). Returns (advantages, returns), 0 off the action tokens.
    """
    values = values * mask
    rewards = rewards * mask
    T = rewards.size(1)
    adv = torch.zeros_like(rewards)
    last_gae = torch.zeros_like(rewards[:, 0])
    next_v = torch.zeros_like(values[:, 0])
    for t in reversed(range(T)):
        act = mask[:, t] > 0
        delta = rewards[:, t] + gamma * next_v - values[:, t]
        gae = delta + gamma * lam * last_gae
        last_gae = torch.where(act, gae, last_gae)    # observations and padding pass the running sum through
        next_v = torch.where(act, values[:, t], next_v)
        adv[:, t] = last_gae
    returns = adv + values
    return adv * mask, returns * mask


def discounted_returns(rewards: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """G_t = r_t + gamma * G_{t+1} over the action tokens (t+1: the next one, across observations); 0 elsewhere."""
    rewards = rewards * mask
    out = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.size(1))):
        running = torch.where(mask[:, t] > 0, rewards[:, t] + gamma * running, running)
        out[:, t] = running
    return out * mask


def distill_rewards(logprobs: torch.Tensor, teacher_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """On-policy distillation's per-token reward d_t = log pi_teacher(y_t) - log pi(y_t) on the policy's own sampled
    tokens y_t [B, T]: minus the one-sample (k1) estimate of the per-token reverse KL(pi || pi_teacher), whose
    expectation over y_t ~ pi is minus the exact reverse KL at that position (Gu et al. 2024, MiniLLM; Agarwal et
    al. 2024, GKD's on-policy student-generated data with the reverse KL). 0 off the mask."""
    return -kl_k1(logprobs, teacher_logprobs) * mask


def distill_advantages(logprobs: torch.Tensor, teacher_logprobs: torch.Tensor, mask: torch.Tensor, coef: float,
                       gamma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(coef * sum_{s>=t} gamma^(s-t) d_s [B, T], d [B, T]): what the teacher adds to each token's advantage.
    gamma 0: each token's own d_t, the policy gradient of the per-position reverse KL (Qwen3's on-policy
    distillation, Thinking Machines 2025); gamma 1: the tokens after it too, the gradient of the sequence-level
    reverse KL (its score-function form: E[grad log pi * d] with the log pi term's own gradient 0 in expectation)."""
    d = distill_rewards(logprobs, teacher_logprobs, mask)
    return coef * discounted_returns(d, mask, gamma), d


def group_advantages(scores: torch.Tensor, n: int, estimator: str, norm_std: bool = True,
                     eps: float = 1e-6) -> torch.Tensor:
    """Outcome advantages from the n samples of each prompt (scores prompt-major, [P * n]) -> [P * n].

    grpo: (r - mean_group) / (std_group + eps), the std division switchable (Shao et al. 2024; Liu et al.
          2025 "Dr. GRPO" drop it). A group of one, or of equal rewards, gets advantage 0.
    rloo: r_i - mean_{j != i} r_j, the leave-one-out baseline (Kool et al. 2019; Ahmadian et al. 2024).
    """
    g = scores.float().view(-1, n)
    if estimator == "grpo":
        adv = g - g.mean(-1, keepdim=True)
        if norm_std and n > 1:
            adv = adv / (g.std(-1, keepdim=True) + eps)
    elif estimator == "rloo":
        if n < 2:
            raise ValueError("rloo needs generation.n >= 2 samples per prompt")
        adv = g - (g.sum(-1, keepdim=True) - g) / (n - 1)
    else:
        raise ValueError(f"not a group estimator: {estimator}")
    return adv.reshape(-1)


def aggregation_count(mask: torch.Tensor, mode: LossAggregation) -> float:
    """What `aggregate` divides by: the tokens (token-mean) or the sequences with a token (seq-*) of `mask`, at
    least 1 (a minibatch whose rows are all masked out, ppo.mask_truncated, then has loss 0, not 0/0). Summed
    over a minibatch, it is the denominator that makes micro-batch losses add up to the minibatch's exactly."""
    if mode not in options(LossAggregation):
        raise ValueError(f"unknown loss aggregation {mode!r}; expected one of {options(LossAggregation)}")
    return max(float(mask.sum()) if mode == "token-mean" else float((mask.sum(-1) > 0).sum()), 1.0)


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, mode: LossAggregation,
              denominator: float | None = None) -> torch.Tensor:
    """Reduce a [B, T] per-token loss to a scalar.

    token-mean           sum_{b,t} l / #tokens                  (every token weighs the same)
    seq-mean-token-mean  mean_b (sum_t l / |y_b|)               (every sequence weighs the same; GRPO's paper)
    seq-mean-token-sum   mean_b sum_t l                         (Dr. GRPO: no length normalisation)

    `denominator` replaces #tokens (token-mean) or #sequences (seq-*) by the whole minibatch's count (see
    `aggregation_count`), so that micro-batches, each reduced with it, add up to exactly the minibatch's loss
    however it is split.
    """
    if mode == "token-mean":
        num = masked_sum(per_token, mask)
    elif mode == "seq-mean-token-mean":
        num = masked_mean(per_token, mask, dim=-1).sum()
    elif mode == "seq-mean-token-sum":
        num = masked_sum(per_token, mask, dim=-1).sum()
    else:
        raise ValueError(f"unknown loss aggregation {mode!r}; expected one of {options(LossAggregation)}")
    return num / (denominator if denominator is not None else max(aggregation_count(mask, mode), 1.0))


# GSPO's sequence log-ratio is clamped here before exp: a mean log-ratio past 10 nats (a ratio of 22,000) is already
# far outside any clip range, and exp of an unclamped one overflows bf16/fp16 to inf and the loss to NaN (OpenRLHF
# PR #1293). Clamping stops the gradient only where the clipped branch has already stopped it, or on a ratio that large.
SEQ_LOG_RATIO_CAP = 10.0


def ppo_policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                    mask: torch.Tensor, clip: float | tuple[float, float], dual_clip: float | None = None,
                    agg: str = "token-mean", denominator: float | None = None,
                    token_weights: torch.Tensor | None = None,
                    level: RatioLevel = "token") -> tuple[torch.Tensor, dict]:
    """Clipped surrogate objective (Schulman et al. 2017): max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high)).

    `clip` is eps, or (eps_low, eps_high): DAPO's clip-higher (Yu et al. 2025) raises eps_high alone, so a
    low-probability token can grow more before its ratio is clipped.
    level "token": r_t = pi(y_t) / pi_old(y_t), one term per token.
    level "sequence" (GSPO, Zheng et al. 2025): one ratio per answer, s = exp(mean_t log r_t) over its action
    tokens (the length-normalised sequence likelihood ratio), with the answer's mean advantage; the loss is
    mean over answers, so `agg` must be seq-mean-token-mean (the config refuses another). The log-ratio is
    clamped to +-SEQ_LOG_RATIO_CAP before exp.
    dual_clip = c > 1 (Ye et al. 2020) also bounds the loss of a negative advantage by -c A, so a huge ratio on
    a bad action cannot dominate the step. token_weights (no gradient), when given, multiply each token's loss:
    the off-policy correction of `importance_weights` (at sequence level: the answer's loss, by the mean of its
    tokens' weights, since the per-sequence mean averages them). Returns (loss, stats): the fraction clipped (of
    tokens, or of answers at sequence level; clipfrac_low / clipfrac_high split it by bound) and the approximate
    KL(old || new) = mean((r_t - 1) - log r_t) (k3) over tokens.
    """
    low, high = clip if isinstance(clip, tuple) else (clip, clip)
    log_ratio = (logprobs - old_logprobs) * mask
    token_ratio = torch.exp(log_ratio)
    if level == "token":
        ratio, adv = token_ratio, advantages
    elif level == "sequence":
        if agg != "seq-mean-token-mean":
            raise ValueError(f"a sequence-level ratio needs the per-answer mean (seq-mean-token-mean), got {agg!r}")
        seq = masked_mean(log_ratio, mask, dim=-1).clamp(-SEQ_LOG_RATIO_CAP, SEQ_LOG_RATIO_CAP)
        ratio = torch.exp(seq).unsqueeze(-1).expand_as(logprobs)
        adv = masked_mean(advantages, mask, dim=-1).unsqueeze(-1).expand_as(logprobs)
    else:
        raise ValueError(f"unknown ratio level {level!r}; expected one of {options(RatioLevel)}")
    surr1 = -adv * ratio
    surr2 = -adv * torch.clamp(ratio, 1.0 - low, 1.0 + high)
    per_token = torch.maximum(surr1, surr2)
    stats = {}
    if dual_clip is not None:
        bounded = torch.minimum(per_token, -adv * dual_clip)
        with torch.no_grad():
            stats["dual_clipfrac"] = masked_mean(((adv < 0) & (bounded < per_token)).float(), mask)
        per_token = torch.where(adv < 0, bounded, per_token)
    if token_weights is not None:
        per_token = per_token * token_weights
    loss = aggregate(per_token, mask, agg, denominator)
    with torch.no_grad():
        clipped = surr2 > surr1
        # at sequence level every token of an answer holds its ratio: the token mean per answer is its 0 or 1
        frac = (lambda x: masked_mean(masked_mean(x, mask, dim=-1), (mask.sum(-1) > 0).float())) \
            if level == "sequence" else (lambda x: masked_mean(x, mask))
        stats["clipfrac"] = frac(clipped.float())
        stats["clipfrac_low"] = frac((clipped & (ratio < 1)).float())
        stats["clipfrac_high"] = frac((clipped & (ratio > 1)).float())
        stats["approx_kl"] = masked_mean((token_ratio - 1) - log_ratio, mask)
    return loss, stats


def importance_weights(old_logprobs: torch.Tensor, sample_logprobs: torch.Tensor, mask: torch.Tensor,
                       mode: ISCorrection, cap: float) -> tuple[torch.Tensor | None, dict]:
    """Per-token off-policy correction between the policy that sampled (the engines: weights one update old under
    asynchronous rollout, or another numeric precision) and pi_old, the policy the PPO ratio starts from.
    With rho_t = pi_old(y_t) / pi_sample(y_t):

        tis    w_t = min(rho_t, C)                   truncated importance sampling (Ionides 2008; Yao et al. 2025)
        mask   w_t = 1[1/C <= rho_t <= C]            tokens whose ratio leaves the band are dropped (IcePop)
        none   no weights (None)

    The weights carry no gradient. Stats describe rho over the response tokens whatever the mode: its mean and max,
    and the fraction of tokens the chosen correction changes (clipped above C, or masked)."""
    if mode not in options(ISCorrection):
        raise ValueError(f"unknown importance correction {mode!r}; expected one of {options(ISCorrection)}")
    rho = torch.exp((old_logprobs - sample_logprobs) * mask).detach()
    outside = (rho > cap) if mode == "tis" else (rho > cap) | (rho < 1.0 / cap)
    stats = {"rollout/is_ratio_mean": masked_mean(rho, mask).item(),
             "rollout/is_ratio_max": (rho * mask).max().item(),
             "rollout/is_corrected_frac": masked_mean(outside.float(), mask).item() if mode != "none" else 0.0}
    if mode == "none":
        return None, stats
    weights = torch.clamp(rho, max=cap) if mode == "tis" else (~outside).float()
    return weights * mask, stats


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip: float, agg: str = "token-mean", denominator: float | None = None) -> tuple[torch.Tensor, dict]:
    """0.5 * max((V - R)^2, (clip(V, V_old +- eps) - R)^2), aggregated; clip <= 0 turns clipping off."""
    loss_unclipped = (values - returns) ** 2
    if clip > 0:
        clipped = old_values + torch.clamp(values - old_values, -clip, clip)
        loss_clipped = (clipped - returns) ** 2
        per_token = torch.maximum(loss_unclipped, loss_clipped)
        with torch.no_grad():
            clipfrac = masked_mean((loss_clipped > loss_unclipped).float(), mask)
    else:
        per_token = loss_unclipped
        clipfrac = torch.zeros(())
    return 0.5 * aggregate(per_token, mask, agg, denominator), {"vf_clipfrac": clipfrac}


class ScoreNorm:
    """ppo.reward_norm = "initial": scores shifted and scaled by the mean and sd of the first batch it sees
    (the starting policy's rollouts), fixed from then on, so the objective stays the same over the run while
    beta is measured in units of the initial reward spread (Ziegler et al. 2019 normalise the reward model on
    the initial policy's samples). "none" passes scores through. `state`/`load` for the checkpoint."""

    def __init__(self, mode: RewardNorm):
        if mode not in options(RewardNorm):
            raise ValueError(f"unknown reward normalisation {mode!r}; expected one of {options(RewardNorm)}")
        self.mode, self.mean, self.std = mode, None, None

    def __call__(self, scores: torch.Tensor) -> torch.Tensor:
        if self.mode == "none":
            return scores
        if self.mean is None:
            self.mean, self.std = scores.mean().item(), max(scores.std().item(), 1e-6)
        return (scores - self.mean) / self.std

    def state(self) -> list | None:
        return None if self.mean is None else [self.mean, self.std]

    def load(self, state: list | None) -> None:
        self.mean, self.std = state if state is not None else (None, None)


def missing_eos_penalty(scores: torch.Tensor, finished: torch.Tensor, penalty: float) -> torch.Tensor:
    """Subtract `penalty` from the score of every response that hit the length limit without an EOS."""
    return scores - penalty * (~finished.bool()).to(scores.dtype)


def overlong_penalty(lengths: torch.Tensor, max_new_tokens: int, buffer: int, penalty: float) -> torch.Tensor:
    """DAPO's soft overlong punishment (Yu et al. 2025, eq. 13), per answer of `lengths` tokens: 0 up to
    max_new_tokens - buffer, then falling linearly to -penalty at max_new_tokens (the longest an answer can be
    here, so DAPO's "-1 past L_max" case never arises). buffer 0: all zeros."""
    if buffer <= 0:
        return torch.zeros_like(lengths, dtype=torch.float32)
    excess = (lengths.float() - (max_new_tokens - buffer)).clamp(min=0)
    return -penalty * (excess / buffer).clamp(max=1.0)


def groups_with_signal(rewards: torch.Tensor, n: int) -> torch.Tensor:
    """[B] rewards of B / n prompt-major groups -> [B / n] bool: True where the group's rewards are not all
    equal. A uniform group gives every outcome estimator (grpo, rloo) zero advantages: no signal (DAPO's dynamic
    sampling drops it)."""
    g = rewards.reshape(-1, n)
    return g.amax(-1) > g.amin(-1)


def trainable_groups(kept: int, wanted: int, n: int, minibatch_size: int) -> int:
    """How many of `kept` groups with signal a step trains on: `wanted` (generation.prompts_per_step) when there are
    that many, else the most that fill whole minibatches of whole groups (minibatch_size a multiple of n), which
    may be 0 (the step skips its update)."""
    if kept >= wanted:
        return wanted
    per_minibatch = minibatch_size // n
    return kept // per_minibatch * per_minibatch


@dataclass(frozen=True)
class AdvantageSettings:
    """How `compute_experience` turns scores into advantages: the ppo section's advantage keys, one typed value
    (docs/algorithms.md has each key's formula and source). `of(ppo, n)` reads them from the config."""
    estimator: AdvantageEstimator = "gae"
    n: int = 1                         # samples per prompt (the outcome estimators' group size)
    kl_estimator: KLEstimator = "k1"
    kl_in_reward: bool = True          # ppo.kl_placement reward; False: the policy's loss carries the KL
    gamma: float = 1.0
    lam: float = 0.95
    whiten_advantages: bool | None = None   # None: the estimator's own default
    grpo_norm_std: bool = True
    is_correction: ISCorrection = "none"
    is_cap: float = 2.0
    mask_truncated: bool = False       # answers cut at max_new_tokens (no EOS) carry no loss
    distill_coef: float = 0.0          # on-policy distillation (a teacher's logprobs given): its signal's weight
    distill_gamma: float = 0.0         # and the discount of its return (distill_advantages)

    @classmethod
    def of(cls, ppo, n: int, distill=None) -> "AdvantageSettings":
        """From the config's ppo section (rlhf_ray/config.py PPOConfig), generation.n and, when a teacher scores
        the samples, the distill section."""
        return cls(ppo.advantage, n, ppo.kl_estimator, ppo.kl_placement == "reward", ppo.gamma, ppo.lam,
                   ppo.whiten_advantages, ppo.grpo_norm_std, ppo.is_correction, ppo.is_cap, ppo.mask_truncated,
                   *((distill.coef, distill.gamma) if distill is not None else ()))


def compute_experience(batch: RolloutBatch, old_logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
                       values: torch.Tensor | None, scores: torch.Tensor, settings: AdvantageSettings,
                       kl_coef: float, token_rewards: torch.Tensor | None = None,
                       teacher_logprobs: torch.Tensor | None = None) -> tuple[Experience, dict]:
    """Rollout + scores -> the tensors the updates train on, and the step's rollout statistics.

    KL_t = estimator(log pi_old, log pi_ref). With the KL in the reward:
        gae, reinforce++   r_t = -beta KL_t (+ score at the last token)   [Ziegler et al. 2019]
        grpo, rloo         outcome = score - beta sum_t KL_t
    (with the KL as a loss term instead, beta is 0 here and the policy adds beta * KL to its loss).
    gae           (A, R) = GAE(r, V)                     (needs the critic's values)
    reinforce++   A = whiten_batch(sum_{s>=t} gamma^(s-t) r_s)     [Hu 2025]
    grpo / rloo   A_t = group_advantages(outcome) for every token of the response
    whiten_advantages None: the estimator's own default (gae and reinforce++ whiten, grpo and rloo do not).
    is_correction: the policy loss's per-token weights between the sampling logprobs (batch.sample_logprobs) and
    pi_old (`importance_weights`), the experience's is_weights unless "none".
    token_rewards [B, T]: an environment's per-turn rewards on each turn's last action token, added to r_t (so
    the outcome estimators get their sum).
    teacher_logprobs [B, T] (on-policy distillation): A_t += distill_coef * sum_{s>=t} distill_gamma^(s-t) d_s with
    d_s = log pi_teacher - log pi_old (`distill_advantages`), after any whitening and for every estimator alike:
    the teacher's signal stays per token (an outcome estimator would sum it into one number per answer), in nats
    whatever the task reward's scale, and the critic never fits it.
    Every term counts the tokens of batch.action_mask (the policy's own tokens).
    mask_truncated: rows cut without an EOS (batch.finished False) carry no loss: their advantages are computed
    as the others' (their scores still count in their group's baseline and in the batch whitening), then their
    rows of the experience's loss_mask are zeroed, so no loss term and no denominator counts them.
    """
    s = settings
    estimator, n, gamma, lam = s.estimator, s.n, s.gamma, s.lam
    if estimator not in options(AdvantageEstimator):
        raise ValueError(f"unknown advantage estimator {estimator!r}; expected one of {options(AdvantageEstimator)}")
    mask = batch.action_mask
    beta = kl_coef if s.kl_in_reward else 0.0
    rewards, kl = kl_penalized_rewards(scores, old_logprobs, ref_logprobs, mask, beta, s.kl_estimator, token_rewards)
    returns = None
    if estimator == "gae":
        advantages, returns = gae_advantages(rewards, values, mask, gamma, lam)
    elif estimator == "reinforce++":
        advantages = returns = discounted_returns(rewards, mask, gamma)
    else:
        outcome = masked_sum(rewards, mask, dim=-1)          # = score - beta * sum_t KL_t
        advantages = group_advantages(outcome, n, estimator, s.grpo_norm_std)[:, None] * mask
    if s.whiten_advantages if s.whiten_advantages is not None else estimator in ("gae", "reinforce++"):
        advantages = masked_whiten(advantages, mask)
    distill_stats = {}
    if teacher_logprobs is not None:
        distill, d = distill_advantages(old_logprobs, teacher_logprobs, mask, s.distill_coef, s.distill_gamma)
        advantages = advantages + distill
        distill_stats = {"distill/reverse_kl_per_token": -masked_mean(d, mask).item(),
                         "distill/reverse_kl_per_seq": -masked_sum(d, mask, dim=-1).mean().item(),
                         "distill/advantage_mean": masked_mean(distill, mask).item()}
    is_weights, is_stats = importance_weights(old_logprobs, batch.sample_logprobs, mask, s.is_correction, s.is_cap)
    loss_mask = mask * batch.finished.to(mask.dtype)[:, None] if s.mask_truncated else mask
    exp = Experience(batch.input_ids, batch.attention_mask, loss_mask, old_logprobs, ref_logprobs, advantages,
                     values=values * mask if values is not None else None, returns=returns if values is not None else None,
                     is_weights=is_weights)
    seq_kl = masked_sum(kl, mask, dim=-1)
    stats = {
        "reward/score_mean": scores.mean().item(), "reward/score_std": scores.std().item() if scores.numel() > 1 else 0.0,
        "reward/total_mean": masked_sum(rewards, mask, dim=-1).mean().item(),
        "kl/ref_per_seq": seq_kl.mean().item(), "kl/ref_per_token": masked_mean(kl, mask).item(),
        "advantage/mean": masked_mean(advantages, mask).item(), **is_stats, **distill_stats,
    }
    if values is not None:
        stats["value/mean"] = masked_mean(values, mask).item()
        stats["returns/mean"] = masked_mean(returns, mask).item()
    return exp, stats


def adaptive_kl_coef(coef: float, observed_kl: float, target: float, horizon: float) -> float:
    """Ziegler et al. 2019's proportional controller, applied once per step: e = clip(KL / target - 1, -0.2, 0.2);
    beta <- beta * (1 + e / horizon). Raises beta when the policy drifts past the target, lowers it below."""
    error = min(max(observed_kl / target - 1.0, -0.2), 0.2)
    return coef * (1.0 + error / horizon)
