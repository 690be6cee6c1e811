"""Rankings from several labelers, aggregated with each labeler's reliability estimated from the labels alone.

People disagree (InstructGPT's labelers agreed on ~73 % of pairs), and some are careless or biased: they prefer
the longer answer, or the one shown first. No gold is available to say who; what is available is that an honest
labeler agrees with the others more often than a careless or biased one does.

The model is Dawid and Skene's (1979) with one parameter per labeler (the "one-coin" model), applied to the pairs a
ranking implies: every pair of answers {a, b} of a prompt has a true order, and labeler j orders it correctly with
probability p_j, whatever the pair. EM alternates the posterior of each pair's order given every vote on it
(log-odds sum_j +-logit p_j) and each p_j given those posteriors (the expected share of its pairs it got right,
with a Beta(2, 2) prior: 1 of each outcome added, so a labeler with few pairs stays near 0.5 rather than 0 or
1). It starts from p = 0.7 for everyone, i.e. from the majority vote, which fixes the orientation (every p -> 1 - p
with every order flipped fits as well). A labeler right on every pair gets p near 1, a coin-flipper 0.5, one
biased on some pairs in between: exactly what weighing needs, since log(p / (1 - p)) is the weight of its vote in
the posterior. A prompt's aggregate ranking orders its answers by their expected wins, sum_b P(a above b)
(Borda on the posteriors). With `weigh=False` every vote counts alike: the posteriors are vote shares.

Reliability shows only in agreement: a labeler is trusted for agreeing with the others, so among labelers who
share no prompt, or where the honest ones are outnumbered by ones who agree with each other, it cannot be found.
Rankings may be partial in who labelled what: any labeler, any subset of prompts, two or more answers each, ties
allowed (tied answers state no pair). The same aggregation serves judge verdicts (a judge is one more labeler)
and people's rankings. Pure: no Ray.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

from rlhf_ray.prefs import ranking_from_scores, ranking_to_pairs

START = 0.7                            # every labeler's p before the first E step: the majority vote


@dataclass(frozen=True)
class LabeledRanking:
    """One labeler's best-first ranking of one prompt's answers."""
    prompt: int                        # the prompt's index (any integer naming it)
    labeler: str
    ranking: tuple[int, ...]           # answer indices of that prompt, best first (all of them, or a subset)
    tiers: tuple[int, ...] | None = None   # each ranked answer's tier (0 best), when the labeler tied some: tied
                                       # answers make no pair; None: strict

    def pairs(self) -> list[tuple[int, int]]:
        """(above, below) answer pairs the ranking states (tied ones left out)."""
        if self.tiers is None:
            return ranking_to_pairs(list(self.ranking))
        tier = dict(zip(self.ranking, self.tiers))
        return [(a, b) for a, b in ranking_to_pairs(list(self.ranking)) if tier[a] != tier[b]]


@dataclass
class Aggregate:
    """The aggregation of many labelers' rankings."""
    rankings: dict[int, list[int]]     # per prompt: its ranked answers best first
    wins: dict[int, dict[int, float]]  # per prompt: each answer's expected wins, sum_b P(a above b)
    reliability: dict[str, float]      # per labeler: p, the estimated chance it orders a pair as the truth does
    with_aggregate: dict[str, float]   # per labeler: the share of its pairs ordered as the aggregate orders them
    agreement: float                   # inter-labeler agreement (`agreement`), for the report
    weighed: bool                      # False: every vote counted alike (the reliabilities estimated, not used)


def agreement(labels: list[LabeledRanking]) -> float:
    """Inter-labeler agreement: over every two labelers who ranked the same prompt and every pair of answers both
    ranked, the share ordered alike (nan when no two labelers ever share a pair)."""
    by_prompt: dict[int, list[set[tuple[int, int]]]] = {}
    for lab in labels:
        by_prompt.setdefault(lab.prompt, []).append(set(lab.pairs()))
    same = total = 0
    for stated in by_prompt.values():
        for p, q in itertools.combinations(stated, 2):
            for a, b in p:                      # pairs both stated: agree if q states it the same way
                if (a, b) in q or (b, a) in q:
                    same += (a, b) in q
                    total += 1
    return same / total if total else float("nan")


def aggregate(labels: list[LabeledRanking], weigh: bool = True, iters: int = 200, tol: float = 1e-9) -> Aggregate:
    """The posterior order of every ranked pair and each labeler's reliability (module docstring), and each
    prompt's aggregate ranking from them."""
    if not labels:
        raise ValueError("aggregate: no rankings")
    votes: dict[tuple[int, int, int], list[tuple[str, bool]]] = {}    # (prompt, a, b), a < b -> (labeler, a above b)
    for lab in labels:
        if len(set(lab.ranking)) != len(lab.ranking):
            raise ValueError(f"aggregate: labeler {lab.labeler!r} ranks an answer of prompt {lab.prompt} twice: "
                             f"{list(lab.ranking)}")
        for w, lo in lab.pairs():
            votes.setdefault((lab.prompt, min(w, lo), max(w, lo)), []).append((lab.labeler, w < lo))
    names = sorted({lab.labeler for lab in labels})
    p = dict.fromkeys(names, START)
    posterior: dict[tuple[int, int, int], float] = {}
    for _ in range(iters):
        for pair, vs in votes.items():          # E: P(a above b) from every vote on the pair
            log_odds = sum((1 if above else -1) * math.log(p[j] / (1 - p[j])) for j, above in vs)
            posterior[pair] = 1 / (1 + math.exp(-max(min(log_odds, 50.0), -50.0)))
        right = {j: [1.0, 2.0] for j in names}  # M: Beta(2, 2) prior: one right and one wrong pair to start
        for pair, vs in votes.items():
            for j, above in vs:
                right[j][0] += posterior[pair] if above else 1 - posterior[pair]
                right[j][1] += 1
        new = {j: r / n for j, (r, n) in right.items()}
        done = max(abs(new[j] - p[j]) for j in names) < tol
        if weigh:
            p = new
        if done or not weigh:
            break
    if not weigh:                               # vote shares: the posterior with every p alike
        posterior = {pair: sum(above for _, above in vs) / len(vs) for pair, vs in votes.items()}
    wins: dict[int, dict[int, float]] = {}
    for lab in labels:
        for a in lab.ranking:
            wins.setdefault(lab.prompt, {}).setdefault(a, 0.0)
    for (g, a, b), q in posterior.items():
        wins[g][a] += q
        wins[g][b] += 1 - q
    rankings = {}
    for g, by_answer in wins.items():
        ids = sorted(by_answer)
        rankings[g] = [ids[k] for k in ranking_from_scores([by_answer[a] for a in ids])]
    agree = {name: [0, 0] for name in names}
    for lab in labels:
        pos = {a: k for k, a in enumerate(rankings[lab.prompt])}
        for a, b in lab.pairs():
            agree[lab.labeler][0] += pos[a] < pos[b]
            agree[lab.labeler][1] += 1
    return Aggregate(rankings, wins, new, {n: a / t if t else float("nan") for n, (a, t) in agree.items()},
                     agreement(labels), weigh)
