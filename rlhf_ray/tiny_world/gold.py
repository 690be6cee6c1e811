"""The tiny world's hidden gold reward and its simulated labelers (pure).

The gold function stands in for what people actually want; the reward model never sees it, only rankings
that noisy simulated labelers produce from it. Gold here: how much of an answer talks about Python's data
model — the share of its words naming objects, functions, methods, classes, values, types, ... (weight 1)
or related programming terms (arguments, calls, strings, exceptions, ...; weight 1/2), scaled by 10.
Graded so that few answers tie: on SFT samples 40 % score 0 and 17 % of answer pairs tie (with the core
words alone, 59 % scored 0).

A variant, `pipeline.gold: topic_no_repeats` (configs/tiny_world_overopt.yaml), where one pass over-optimises:
the same words, but each counts once per answer, and every repeat of one costs what a new topic word earns.
The SFT model's answers barely vary on it (2 % of them repeat a topic word, 0.02 repeats an answer), so rankings
of them cannot teach a reward model the penalty; pushing topic words up, a policy soon repeats them ("the
object of the object"): DPO's answers at 6 nats from SFT repeat one 0.5 times an answer. That is the flaw
Gao et al. (2022) measure, in a form this world can count: the proxy keeps rising while gold turns down.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Callable, Literal

from rlhf_ray.labelers import LabeledRanking, aggregate
from rlhf_ray.prefs import ranking_from_scores

TOPIC_WORDS = frozenset("""object objects function functions method methods class classes value values type types
attribute attributes module modules name names""".split())
RELATED_WORDS = frozenset("""argument arguments return returns returned call called calls instance instances list
lists string strings integer integers dictionary sequence sequences default variable variables expression
expressions statement statements operator operators parameter parameters exception exceptions file files number
numbers""".split())
_WORD = re.compile(r"[a-z]+")


def gold_score(text: str) -> float:
    words = _WORD.findall(text.lower())
    if not words:
        return 0.0
    return 10.0 * (sum(w in TOPIC_WORDS for w in words) + 0.5 * sum(w in RELATED_WORDS for w in words)) / len(words)


REPEAT_COST = 1.0      # topic_no_repeats: a repeated topic or related word costs a topic word's worth
MIN_WORDS = 10         # topic_no_repeats: shares are of at least this many words (an SFT answer's mean length)


def gold_no_repeats(text: str) -> float:
    """The over-optimising world's gold: as `gold_score`, but each distinct word counts once, every further
    occurrence of a counted word costs REPEAT_COST, and the share is of at least MIN_WORDS words (a two-word
    answer is not the best one: without the floor, brevity would be gold's own optimum, and the policy takes it)."""
    words = _WORD.findall(text.lower())
    if not words:
        return 0.0
    seen, total = set(), 0.0
    for w in words:
        worth = 1.0 if w in TOPIC_WORDS else 0.5 if w in RELATED_WORDS else 0.0
        if worth:
            total += -REPEAT_COST if w in seen else worth
            seen.add(w)
    return 10.0 * total / max(len(words), MIN_WORDS)


GOLDS: dict[str, Callable[[str], float]] = {"topic": gold_score, "topic_no_repeats": gold_no_repeats}   # pipeline.gold


def noisy_gold(responses: list[str], rng: random.Random, noise: float, gold=gold_score) -> list[float]:
    """What a labeler perceives: each answer's gold plus Gaussian noise of std `noise` (Thurstone)."""
    return [gold(r) + rng.gauss(0.0, noise) for r in responses]


def simulated_ranking(responses: list[str], rng: random.Random, noise: float, gold=gold_score) -> list[int]:
    """A labeler's best-first ranking of `noisy_gold`."""
    return ranking_from_scores(noisy_gold(responses, rng, noise, gold))


def simulated_thumbs(rows: list[dict], rng: random.Random, noise: float, gold=gold_score) -> list[dict]:
    """Thumbs from simulated users on every answer of `rows` ({prompt, responses}): up when the answer's `noisy_gold`
    clears the median gold of all those answers (so about half are up: KTO's lambda_D n_D ~ lambda_U n_U at equal
    weights). Rows {prompt, completion, label} as `rlhf-ray kto` reads them."""
    answers = [(r["prompt"], a) for r in rows for a in r["responses"]]
    golds = sorted(gold(a) for _, a in answers)
    threshold = golds[len(golds) // 2]
    return [{"prompt": x, "completion": a, "label": gold(a) + rng.gauss(0.0, noise) > threshold} for x, a in answers]


@dataclass(frozen=True)
class SimulatedLabeler:
    """One simulated person of a labeler pool: gold plus Gaussian noise (as `simulated_ranking`), and a systematic
    bias of its own, of size `strength`:
        length     + strength per word above the answers' mean length (prefers longer answers)
        first      + strength for the answer shown first (each ranking shows the answers in a random order)
        careless   on a `strength` share of rankings, a random order instead
    Reliability estimated from the labels alone should find the biased ones (rlhf_ray/labelers.py)."""
    name: str
    noise: float = 0.15
    bias: Literal["none", "length", "first", "careless"] = "none"
    strength: float = 0.0
    gold: Callable[[str], float] = gold_score     # what people want in this world (GOLDS)

    def rank(self, responses: list[str], rng: random.Random) -> list[int]:
        if self.bias == "none":
            return simulated_ranking(responses, rng, self.noise, self.gold)
        if self.bias == "careless" and rng.random() < self.strength:
            return rng.sample(range(len(responses)), len(responses))
        scores = noisy_gold(responses, rng, self.noise, self.gold)
        if self.bias == "length":
            lengths = [len(r.split()) for r in responses]
            mean = sum(lengths) / len(lengths)
            scores = [sc + self.strength * (n - mean) for sc, n in zip(scores, lengths)]
        elif self.bias == "first":
            scores[rng.randrange(len(responses))] += self.strength
        return ranking_from_scores(scores)


def tiny_gold(prompts: list[str], responses: list[str]) -> list[float]:
    """The gold score as a rule reward: `reward.sources: [{kind: function, path: "rlhf_ray.tiny_world.gold:tiny_gold"}]`
    (GRPO on the world's verifiable reward, configs/tiny_grpo.yaml)."""
    return [gold_score(r) for r in responses]


def pool_rankings(rows: list[dict], pool: list[SimulatedLabeler], rng: random.Random, weigh: bool = True) -> dict:
    """Every labeler of `pool` ranks every row's "responses"; each row gets their aggregate as "ranking" (what the
    reward model trains on) and each labeler's own under "labels". Returns the pool's report: each labeler's
    estimated reliability and agreement with the aggregate, the inter-labeler agreement, whether weighed."""
    labels = []
    for g, r in enumerate(rows):
        r["labels"] = {lab.name: lab.rank(r["responses"], rng) for lab in pool}
        labels += [LabeledRanking(g, name, tuple(ranking)) for name, ranking in r["labels"].items()]
    agg = aggregate(labels, weigh=weigh)
    for g, r in enumerate(rows):
        r["ranking"] = agg.rankings[g]
    return {"reliability": agg.reliability, "with_aggregate": agg.with_aggregate, "agreement": agg.agreement,
            "weighed": agg.weighed}
