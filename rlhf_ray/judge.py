"""An LLM judge's verdicts as pure functions: its prompts, and scores read from its next-token distribution.

The judge is a frozen causal LM asked in one of two ways (both batched by the caller, on generation engines):
- pointwise: "rate this answer" -> the expected score under the judge's distribution over the score labels'
  tokens, E[v] = sum_i softmax(l)_i v_i, l the labels' logprobs at the next position. Nothing is generated or
  parsed, so a judge that would have written something malformed still gives a score, and how much of its
  next-token mass fell on the labels at all (`mass`) says how much to trust it.
- pairwise: "which answer is better, A or B?" -> P(A) from the two verdict labels' logprobs, asked in both orders
  and averaged, which cancels the judge's preference for a position (Zheng et al. 2023, *Judging LLM-as-a-judge*;
  Wang et al. 2023, *Large language models are not fair evaluators*); K answers are then ranked by a Bradley-Terry
  fit of the soft verdicts (rlhf_ray/prefs.py), over all pairs or a connected subset of them.
Lee et al. 2023 (*RLAIF*) read their AI labeler's preference the same way: the verdict tokens' probabilities,
both orders averaged, never a parsed generation.
"""
from __future__ import annotations

import itertools
import math
import random
import re
from dataclasses import dataclass, field


POINTWISE = ("Rate how well the answer responds to the request, from 1 (worst) to 5 (best).\n\n"
             "Request: {prompt}\n\nAnswer: {response}\n\nRating:")
PAIRWISE = ("Which answer responds better to the request, A or B?\n\nRequest: {prompt}\n\n"
            "Answer A: {a}\n\nAnswer B: {b}\n\nBetter answer:")


class JudgeError(ValueError):
    """A judge set-up that cannot work (a label that is not one token, a template without its fields); one line."""


@dataclass(frozen=True)
class JudgeFormat:
    """How the judge is asked and how its answer is read. Each label must be a single token of the judge's
    tokenizer (checked by `label_ids`); `score_values[i]` is what `score_labels[i]` is worth."""
    pointwise: str = POINTWISE                 # fields: {prompt}, {response}
    pairwise: str = PAIRWISE                   # fields: {prompt}, {a}, {b}
    score_labels: tuple[str, ...] = (" 1", " 2", " 3", " 4", " 5")
    score_values: tuple[float, ...] = (1.0, 2.0, 3.0, 4.0, 5.0)
    verdict_labels: tuple[str, str] = (" A", " B")
    chat_template: bool = False                # ask as one user turn (rlhf_ray/prompts.py render_prompt)
    # (the config's judge section holds the same fields, with these defaults)

    def __post_init__(self):
        if len(self.score_labels) != len(self.score_values) or len(self.score_labels) < 2:
            raise JudgeError(f"judge: {len(self.score_labels)} score_labels and {len(self.score_values)} "
                             "score_values; give two or more, one value per label")
        if len(self.verdict_labels) != 2:
            raise JudgeError(f"judge.verdict_labels: two labels (first answer, second answer), "
                             f"got {list(self.verdict_labels)}")
        for name, text, fields in (("pointwise", self.pointwise, ("prompt", "response")),
                                   ("pairwise", self.pairwise, ("prompt", "a", "b"))):
            missing = [f for f in fields if "{" + f + "}" not in text]
            if missing:
                raise JudgeError(f"judge.{name} template: no {', '.join('{' + f + '}' for f in missing)} in it")


def label_ids(tokenizer, labels: tuple[str, ...], key: str) -> list[int]:
    """The token id of each label. A label that encodes to more or less than one token, or two labels sharing
    one, cannot be read from a single next-token distribution: a JudgeError naming the config key."""
    ids = []
    for label in labels:
        toks = tokenizer(label, add_special_tokens=False)["input_ids"]
        if len(toks) != 1:
            raise JudgeError(f"{key}: {label!r} is {len(toks)} tokens for the judge's tokenizer ({toks}); each "
                             "label must be exactly one (try it with or without a leading space)")
        ids.append(toks[0])
    if len(set(ids)) != len(ids):
        raise JudgeError(f"{key}: labels {list(labels)} share token ids {ids}")
    return ids


def _fill(template: str, **values: str) -> str:
    """One pass over the template: text inside a value (code answers hold braces) is never substituted again."""
    return re.sub(r"\{(" + "|".join(values) + r")\}", lambda m: values[m.group(1)], template)


def pointwise_text(fmt: JudgeFormat, prompt: str, response: str) -> str:
    return _fill(fmt.pointwise, prompt=prompt, response=response)


def pairwise_text(fmt: JudgeFormat, prompt: str, a: str, b: str) -> str:
    return _fill(fmt.pairwise, prompt=prompt, a=a, b=b)


def _softmax(logprobs: list[float]) -> list[float]:
    top = max(logprobs)
    e = [math.exp(x - top) for x in logprobs]
    return [x / sum(e) for x in e]


@dataclass(frozen=True)
class PointScore:
    score: float            # expected value under the judge's distribution renormalised over the labels
    mass: float             # the judge's total probability on the labels (1: it meant to answer with one)


def expected_score(label_logprobs: list[float], values: tuple[float, ...]) -> PointScore:
    """label_logprobs: the judge's next-token logprobs (over its whole vocabulary) of each score label."""
    if not all(math.isfinite(x) for x in label_logprobs):
        raise JudgeError(f"judge: non-finite label logprobs {label_logprobs}")
    p = _softmax(label_logprobs)
    return PointScore(score=sum(pi * v for pi, v in zip(p, values)),
                      mass=min(1.0, sum(math.exp(x) for x in label_logprobs)))


@dataclass(frozen=True)
class PairVerdict:
    p_first: float          # P(a better), a shown first (as answer A)
    p_second: float         # P(a better), a shown second (as answer B)
    p: float                # their mean: the verdict with the position preference cancelled
    flipped: bool           # the single-order verdicts disagree (position bias decided one of them)


def pair_verdict(ab: list[float], ba: list[float]) -> PairVerdict:
    """ab: logprobs of the two verdict labels when the judge saw (a, b); ba: when it saw (b, a). In the second
    order the label for a is the second one."""
    p_first = _softmax(list(ab))[0]
    p_second = _softmax(list(ba))[1]
    return PairVerdict(p_first, p_second, (p_first + p_second) / 2, (p_first > 0.5) != (p_second > 0.5))


def comparison_pairs(k: int, max_pairs: int | None, seed: int) -> list[tuple[int, int]]:
    """Which of K answers to compare: all C(K, 2) pairs, or max_pairs of them (at least K, so the comparisons
    connect every answer): the cycle 0-1, 1-2, ..., (K-1)-0 first, then others drawn with `seed`."""
    every = list(itertools.combinations(range(k), 2))
    if max_pairs is None or max_pairs >= len(every):
        return every
    if max_pairs < k:
        raise JudgeError(f"judge.max_pairs: {max_pairs} comparisons cannot rank {k} answers (at least {k}: "
                         "each answer in two, every answer connected)")
    cycle = [tuple(sorted((i, (i + 1) % k))) for i in range(k)] if k > 2 else [(0, 1)]
    rest = [p for p in every if p not in cycle]
    random.Random(seed).shuffle(rest)
    return sorted(cycle + rest[:max_pairs - len(cycle)])


@dataclass
class Ranking:
    ranking: list[int]                      # best first
    strengths: list[float]                  # Bradley-Terry strength per answer (mean 0)
    verdicts: dict[tuple[int, int], PairVerdict] = field(default_factory=dict)


def rank_answers(k: int, verdicts: dict[tuple[int, int], PairVerdict]) -> Ranking:
    """K answers ranked by a Bradley-Terry fit of the judge's averaged soft verdicts (pair (i, j): P(i beats j))."""
    from rlhf_ray.prefs import fit_bradley_terry, ranking_from_scores     # (torch: not at import, the config reads
    pairs = sorted(verdicts)                                              # this module's templates)
    strengths = fit_bradley_terry(k, pairs, wins=[verdicts[p].p for p in pairs])
    return Ranking(ranking_from_scores(strengths), strengths, dict(verdicts))


def agreement(golds: list[list[float]], verdicts: list[dict[tuple[int, int], PairVerdict]],
              scores: list[list[float]] | None = None) -> dict:
    """How a judge agrees with a known score (the tiny world's gold) on the pairs it compared, per prompt: of the
    pairs whose gold differs, the share each single-order verdict, their average and (given pointwise `scores`) the
    pointwise scores order as gold does (a tied score counts half); and over all compared pairs, how often the two
    single-order verdicts disagree (position bias deciding one of them)."""
    right = {"first": 0.0, "second": 0.0, "averaged": 0.0, "pointwise": 0.0}
    decided = compared = flips = 0
    for i, pairs in enumerate(verdicts):
        for (a, b), v in pairs.items():
            compared += 1
            flips += v.flipped
            if golds[i][a] == golds[i][b]:
                continue
            decided += 1
            a_better = golds[i][a] > golds[i][b]
            for key, p in (("first", v.p_first), ("second", v.p_second), ("averaged", v.p)):
                right[key] += 0.5 if p == 0.5 else float((p > 0.5) == a_better)
            if scores is not None:
                d = scores[i][a] - scores[i][b]
                right["pointwise"] += 0.5 if d == 0 else float((d > 0) == a_better)
    out = {f"pair_acc_{k}": v / max(decided, 1) for k, v in right.items() if k != "pointwise" or scores is not None}
    return {**out, "flip_rate": flips / max(compared, 1), "pairs": compared, "pairs_gold_differs": decided}
