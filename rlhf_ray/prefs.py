"""Preferences as pure functions: K-way rankings -> pairs, the Bradley-Terry loss, and per-response scores
fitted from rankings (Bradley-Terry maximum likelihood, or Elo).

InstructGPT (Ouyang et al. 2022) has labelers rank K in 4..9 answers per prompt and trains the reward model on
all C(K, 2) pairs of each ranking, taken together as one batch element per prompt so that a prompt with many
answers does not dominate. Bradley & Terry (1952): P(i beats j) = sigmoid(s_i - s_j).
The same two fits rank policies against each other from games between their answers (`leaderboard`).
"""
from __future__ import annotations

import itertools
import math
import random
import statistics
from collections.abc import Collection

import torch
import torch.nn.functional as F


def ranking_from_scores(scores: list[float]) -> list[int]:
    """Indices ordered best first (higher score is better; ties keep the earlier index first)."""
    return sorted(range(len(scores)), key=lambda i: (-scores[i], i))


def ranking_to_pairs(ranking: list[int]) -> list[tuple[int, int]]:
    """All C(K, 2) (winner, loser) index pairs implied by a best-first ranking."""
    return [(ranking[a], ranking[b]) for a, b in itertools.combinations(range(len(ranking)), 2)]


def scores_to_pairs(scores: list[float]) -> list[tuple[int, int]]:
    """Pairs from scores; equal scores give no pair (no preference was expressed)."""
    return [(i, j) if scores[i] > scores[j] else (j, i)
            for i, j in itertools.combinations(range(len(scores)), 2) if scores[i] != scores[j]]


def weighted_mean(loss: torch.Tensor, weights: torch.Tensor | None, denominator: float | None) -> torch.Tensor:
    """sum(w * loss) / denominator (default: sum(w); unweighted: the plain mean). With per-pair weights 1/#pairs of
    their ranking and the whole minibatch's count of rankings as the denominator, every ranking counts once and
    micro-batches add up to the minibatch's loss however it is cut."""
    if weights is None:
        weights = torch.ones_like(loss)
    return (loss * weights).sum() / (denominator if denominator is not None else weights.sum())


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor, weights: torch.Tensor | None = None,
                       margin: torch.Tensor | None = None, denominator: float | None = None) -> torch.Tensor:
    """-log sigmoid(r_chosen - r_rejected [- margin]) over pairs, reduced by `weighted_mean`."""
    diff = chosen - rejected
    if margin is not None:
        diff = diff - margin
    return weighted_mean(-F.logsigmoid(diff), weights, denominator)


def pairwise_accuracy(chosen: torch.Tensor, rejected: torch.Tensor) -> float:
    return (chosen > rejected).float().mean().item()


def fit_bradley_terry(n_items: int, pairs: list[tuple[int, int]], l2: float = 1e-3, iters: int = 500,
                      wins: list[float] | None = None) -> list[float]:
    """Maximum-likelihood Bradley-Terry strengths for n_items from (winner, loser) pairs, centred to mean 0.
    wins[k], when given, is the probability that the first item of pairs[k] won (a judge's soft verdict; 1 for a
    hard one): each pair then counts as wins[k] of a win and 1 - wins[k] of a loss.

    A small L2 term keeps the optimum finite when an item wins (or loses) every comparison.
    """
    if not pairs:
        return [0.0] * n_items
    w = torch.tensor([p[0] for p in pairs])
    lo = torch.tensor([p[1] for p in pairs])
    q = torch.ones(len(pairs), dtype=torch.float64) if wins is None else torch.tensor(wins, dtype=torch.float64)
    s = torch.zeros(n_items, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([s], lr=1.0, max_iter=iters, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        margin = s[w] - s[lo]
        loss = -(q * F.logsigmoid(margin) + (1 - q) * F.logsigmoid(-margin)).sum() + l2 * (s ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    out = s.detach()
    return (out - out.mean()).tolist()


def elo_ratings(n_items: int, pairs: list[tuple[int, int]], k: float = 16.0, base: float = 1000.0,
                rounds: int = 20) -> list[float]:
    """Elo ratings from (winner, loser) pairs, replayed `rounds` times so the order of games matters little."""
    r = [base] * n_items
    for _ in range(rounds):
        for winner, loser in pairs:
            expected = 1.0 / (1.0 + 10 ** ((r[loser] - r[winner]) / 400.0))
            r[winner] += k * (1.0 - expected)
            r[loser] -= k * (1.0 - expected)
    return r


def games_per_prompt(golds: list[list[list[float]]],
                     apart: Collection[tuple[int, int]] = ()) -> list[list[tuple[int, int]]]:
    """golds[e][p]: the gold values of entry e's answers to prompt p -> each prompt's (winner, loser) games:
    entry a's answer j against entry b's answer j, for j below both counts. Equal gold is a tie and gives no game
    (as in scores_to_pairs). Entry pairs (a, b), a < b, in `apart` play none: e.g. entries picked from the same
    samples, whose games would not be independent draws."""
    return [[(a, b) if ga > gb else (b, a)
             for a, b in itertools.combinations(range(len(golds)), 2) if (a, b) not in apart
             for ga, gb in zip(golds[a][p], golds[b][p]) if ga != gb]
            for p in range(len(golds[0]))]


def leaderboard(names: list[str], games: list[list[tuple[int, int]]], boot: int = 200, seed: int = 0,
                rounds: int = 40) -> list[dict]:
    """Ratings of the entries `names` from their games grouped by prompt (games_per_prompt), best first.

    Per entry: "rating", the Bradley-Terry maximum-likelihood strength (fit_bradley_terry) in Elo points (400 / ln 10
    per unit, mean 1000 over the entries), as Chatbot Arena reports its ratings, with its uncertainty from a
    bootstrap over prompts ("rating_sd" and the 95 % percentile interval "rating_lo".."rating_hi": the prompts
    resampled with replacement `boot` times and fitted again; seeded, so deterministic); "elo", the classic online
    Elo (elo_ratings) over the same games, replayed `rounds` times, for comparison; "games" played and "win_rate".

    Why the fit and not online Elo carries the error bar: online Elo depends on the order of games and its last
    updates leave noise of ~9 sqrt(k) points in every rating however many games there are; its fixed point, reached
    with a step k small against the games per entry, is the same maximum-likelihood fit. The fit is also ~100x
    cheaper to bootstrap (a 7-entry, 128-prompt board: 3 s against 20 s).
    """
    n = len(names)
    flat = [g for gs in games for g in gs]

    def rating(pairs):
        return [1000.0 + s * 400.0 / math.log(10) for s in fit_bradley_terry(n, pairs)]

    rng = random.Random(seed)
    reps = list(zip(*[rating([g for gs in rng.choices(games, k=len(games)) for g in gs]) for _ in range(boot)]))
    # k at most elo_ratings' 16, smaller as games grow: then the replays settle near the fixed point (see above)
    elo = elo_ratings(n, flat, k=min(16.0, 400.0 * n / max(2 * len(flat), 1)), rounds=rounds)
    played = [sum(i in g for g in flat) for i in range(n)]
    rows = []
    for i, (name, r) in enumerate(zip(names, rating(flat))):
        q = statistics.quantiles(reps[i], n=40, method="inclusive")          # q[0] = 2.5 %, q[-1] = 97.5 %
        rows.append({"name": name, "rating": r, "rating_sd": statistics.stdev(reps[i]), "rating_lo": q[0],
                     "rating_hi": q[-1], "elo": elo[i], "games": played[i],
                     "win_rate": sum(w == i for w, _ in flat) / played[i] if played[i] else float("nan")})
    return sorted(rows, key=lambda r: -r["rating"])


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float, weights: torch.Tensor | None = None,
             denominator: float | None = None) -> tuple[torch.Tensor, dict]:
    """Direct Preference Optimisation (Rafailov et al. 2023) on summed sequence logprobs.

    loss = -log sigmoid(beta * [(log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l))]).
    The implicit rewards beta * (log pi - log ref) give the reward accuracy and margin. Reduced over pairs by
    `weighted_mean`.
    """
    chosen_reward = beta * (policy_chosen - ref_chosen)
    rejected_reward = beta * (policy_rejected - ref_rejected)
    loss = weighted_mean(-F.logsigmoid(chosen_reward - rejected_reward), weights, denominator)
    with torch.no_grad():
        stats = {"reward_acc": (chosen_reward > rejected_reward).float().mean(),
                 "reward_margin": (chosen_reward - rejected_reward).mean()}
    return loss, stats


def kto_loss(policy_logps: torch.Tensor, ref_logps: torch.Tensor, desirable: torch.Tensor, kl_ref_point: torch.Tensor,
             beta: float, desirable_weight: float = 1.0, undesirable_weight: float = 1.0,
             denominator: float | None = None) -> tuple[torch.Tensor, dict]:
    """Kahneman-Tversky Optimisation (Ethayarajh et al. 2024, eq. 8) on unpaired thumbs: each answer desirable or not.

    r = log pi(y|x) - log ref(y|x);  z0 = the reference point, an estimate of KL(pi || ref) (`kto_reference_point`);
    v = lambda_D sigmoid(beta (r - z0)) if desirable, lambda_U sigmoid(beta (z0 - r)) if not;
    loss = sum(lambda_y - v) / denominator (default: the number of answers).
    z0 carries no gradient (as in the paper's implementation and TRL's). With lambda_D n_D ~ lambda_U n_U the
    paper's guidance is met (lambda_D n_D / lambda_U n_U in [1, 4/3]).
    """
    logratio = policy_logps - ref_logps
    z0 = kl_ref_point.detach()
    lam = torch.where(desirable, torch.full_like(logratio, desirable_weight),
                      torch.full_like(logratio, undesirable_weight))
    v = lam * torch.sigmoid(beta * torch.where(desirable, logratio - z0, z0 - logratio))
    losses = lam - v
    loss = losses.sum() / (denominator if denominator is not None else len(losses))
    with torch.no_grad():
        stats = {"reward_desirable": (beta * logratio[desirable]).mean() if desirable.any() else logratio.new_zeros(()),
                 "reward_undesirable": ((beta * logratio[~desirable]).mean() if (~desirable).any()
                                        else logratio.new_zeros(())),
                 "kl_ref_point": z0}
    return loss, stats


def kto_reference_point(policy_logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """KTO's z0: mean(log pi(y'|x) - log ref(y'|x)) over answers y' paired with prompts x they were not written for
    (each example's prompt with another example's answer), clamped at 0: a biased but cheap estimate of the
    batch's KL(pi || ref), as the paper's implementation and TRL compute it."""
    return (policy_logps - ref_logps).mean().clamp(min=0)
