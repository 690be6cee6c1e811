"""The tiny world's hidden gold reward and its simulated labelers (pure).

The gold function stands in for what people actually want; the reward model never sees it, only rankings
that noisy simulated labelers produce from it. Gold here: how much of an answer talks about Python's data
model — the share of its words naming objects, functions, methods, classes, values, types, ... (weight 1)
or related programming terms (arguments, calls, strings, exceptions, ...; weight 1/2), scaled by 10.
Graded so that few answers tie: on SFT samples 40 % score 0 and 17 % of answer pairs tie (with the core
words alone, 59 % scored 0).
"""
from __future__ import annotations

import random
import re

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


def simulated_ranking(responses: list[str], rng: random.Random, noise: float) -> list[int]:
    """A labeler's best-first ranking: gold plus Gaussian noise of std `noise` per answer (Thurstone)."""
    return ranking_from_scores([gold_score(r) + rng.gauss(0.0, noise) for r in responses])


def tiny_gold(prompts: list[str], responses: list[str]) -> list[float]:
    """The gold score as a rule reward: `reward.sources: [{kind: function, path: "rlhf_ray.tiny_world.gold:tiny_gold"}]`
    (GRPO on the world's verifiable reward, configs/tiny_grpo.yaml)."""
    return [gold_score(r) for r in responses]
