"""The RL math of RLHF-PPO as pure functions over padded tensors and masks.

Shapes: B sequences, T response positions. `mask` is 1.0 on real response tokens (the EOS included),
0.0 on padding. Every reduction is masked; nothing here knows about actors, ranks or devices.

References: Ziegler et al. 2019 (KL-penalised reward), Schulman et al. 2016 (GAE), Schulman et al. 2017 (PPO),
Ouyang et al. 2022 (InstructGPT), Huang et al. "The N implementation details of RLHF with PPO" (2023).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


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


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over the masked entries; padding positions come back as 0."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask


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


def kl_penalized_rewards(scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
                         mask: torch.Tensor, kl_coef: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token reward r_t = -beta * KL_t, plus the sequence score at the last response token.

    Returns (rewards [B, T], kl [B, T]). The score lands on the final real token (the EOS when one was
    generated), as in Ziegler et al. 2019 and InstructGPT.
    """
    kl = kl_k1(logprobs, ref_logprobs) * mask
    rewards = -kl_coef * kl
    last = (mask.sum(-1).long() - 1).clamp(min=0)
    rewards = rewards.clone()
    rewards[torch.arange(rewards.size(0)), last] += scores.to(rewards.dtype)
    return rewards * mask, kl


def gae_advantages(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
                   gamma: float, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over the response tokens (Schulman et al. 2016).

    delta_t = r_t + gamma * V_{t+1} - V_t;  A_t = delta_t + gamma * lam * A_{t+1};  returns = A + V.
    V beyond the last real token is 0 (the episode ends with the response). Returns (advantages, returns).
    """
    values = values * mask
    rewards = rewards * mask
    T = rewards.size(1)
    adv = torch.zeros_like(rewards)
    last_gae = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(T)):
        next_v = values[:, t + 1] if t + 1 < T else torch.zeros_like(values[:, 0])
        delta = rewards[:, t] + gamma * next_v - values[:, t]
        last_gae = delta + gamma * lam * last_gae
        last_gae = last_gae * mask[:, t]           # padding contributes nothing and resets nothing after it
        adv[:, t] = last_gae
    returns = adv + values
    return adv * mask, returns * mask


def ppo_policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                    mask: torch.Tensor, clip: float) -> tuple[torch.Tensor, dict]:
    """Clipped surrogate objective (Schulman et al. 2017), token-mean over the batch.

    Returns (loss, stats) with clip fraction and the approximate KL(old || new) = mean((r - 1) - log r) (k3).
    """
    log_ratio = (logprobs - old_logprobs) * mask
    ratio = torch.exp(log_ratio)
    surr1 = -advantages * ratio
    surr2 = -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    loss = masked_mean(torch.maximum(surr1, surr2), mask)
    with torch.no_grad():
        clipfrac = masked_mean((surr2 > surr1).float(), mask)
        approx_kl = masked_mean((ratio - 1) - log_ratio, mask)
    return loss, {"clipfrac": clipfrac, "approx_kl": approx_kl}


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
               mask: torch.Tensor, clip: float) -> tuple[torch.Tensor, dict]:
    """0.5 * max((V - R)^2, (clip(V, V_old +- eps) - R)^2), token-mean; clip <= 0 turns clipping off."""
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
    return 0.5 * masked_mean(per_token, mask), {"vf_clipfrac": clipfrac}


def compute_experience(batch: dict, old_logprobs: torch.Tensor, ref_logprobs: torch.Tensor, values: torch.Tensor,
                       scores: torch.Tensor, *, kl_coef: float, gamma: float, lam: float,
                       whiten_advantages: bool) -> tuple[dict, dict]:
    """Rollout + scores -> the tensors PPO trains on, and the step's rollout statistics.

    rewards = score at the last token - beta * KL per token;  (A, R) = GAE(rewards, V);  A whitened (optional).
    """
    mask = batch["response_mask"]
    rewards, kl = kl_penalized_rewards(scores, old_logprobs, ref_logprobs, mask, kl_coef)
    advantages, returns = gae_advantages(rewards, values, mask, gamma, lam)
    if whiten_advantages:
        advantages = masked_whiten(advantages, mask)
    exp = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "response_mask": mask,
           "old_logprobs": old_logprobs, "values": values * mask, "returns": returns, "advantages": advantages}
    seq_kl = masked_sum(kl, mask, dim=-1)
    stats = {
        "reward/score_mean": scores.mean().item(), "reward/score_std": scores.std().item() if scores.numel() > 1 else 0.0,
        "reward/total_mean": masked_sum(rewards, mask, dim=-1).mean().item(),
        "kl/ref_per_seq": seq_kl.mean().item(), "kl/ref_per_token": masked_mean(kl, mask).item(),
        "value/mean": masked_mean(values, mask).item(), "returns/mean": masked_mean(returns, mask).item(),
    }
    return exp, stats


def adaptive_kl_coef(coef: float, observed_kl: float, target: float, horizon: float, n_steps: int = 1) -> float:
    """Ziegler et al. 2019's proportional controller: e = clip(KL / target - 1, -0.2, 0.2);
    beta <- beta * (1 + e * n / horizon). Raises beta when the policy drifts past the target, lowers it below."""
    error = min(max(observed_kl / target - 1.0, -0.2), 0.2)
    return coef * (1.0 + error * n_steps / horizon)
