"""When a reward model has gone stale on the policy it trains (pure): the closed loop's two signals.

- The **audit**: every few PPO steps a handful of the current policy's answer groups are labelled afresh (by the
  labelers, the judge or people) and the reward model's scores of them are compared with the labels, pair by pair.
  A reward model is accurate on the answers it was trained on and less so on the answers a policy moved to (Gao et
  al. 2022; Llama 2 retrained its RM each round for this reason). The audit's accuracy, pooled over the last few
  audits (one is a few dozen pairs: a single audit's sd is about 0.06), is the stale-or-not signal.
- The **monitor**: the held-out monitor RM (trained on rankings of other prompts) falling while the proxy rises,
  each a least-squares trend over the last steps, both trends clear of noise (|t| > 2).
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field


def ranking_accuracy(scores: list[float], ranking: list[int]) -> tuple[int, int]:
    """(pairs the scores order as the best-first `ranking` does, pairs): every pair of a ranking counts; tied
    scores count as wrong (a reward model that cannot tell two answers apart has not agreed with the label)."""
    right = total = 0
    for a, b in itertools.combinations(ranking, 2):      # a ranked above b
        total += 1
        right += scores[a] > scores[b]
    return right, total


def gold_pairs(scores: list[float], gold: list[float]) -> tuple[int, int]:
    """(pairs `scores` order as gold does, pairs whose gold differs) among one group's answers: how a reward
    model's scores (or a ranking's places, negated) agree with the tiny world's gold."""
    right = total = 0
    for a, b in itertools.combinations(range(len(gold)), 2):
        if gold[a] != gold[b]:
            total += 1
            right += (scores[a] > scores[b]) == (gold[a] > gold[b])
    return right, total


def trend(values: list[float]) -> tuple[float, float]:
    """(slope, t statistic) of the least-squares line through values at steps 0..n-1 (t is inf on a perfect line,
    0 with fewer than 3 values)."""
    n = len(values)
    if n < 3:
        return 0.0, 0.0
    xm, ym = (n - 1) / 2, sum(values) / n
    sxx = sum((x - xm) ** 2 for x in range(n))
    slope = sum((x - xm) * (y - ym) for x, y in enumerate(values)) / sxx
    resid = sum((y - ym - slope * (x - xm)) ** 2 for x, y in enumerate(values)) / (n - 2)
    se = math.sqrt(resid / sxx)
    return slope, (slope / se if se > 0 else math.copysign(math.inf, slope) if slope else 0.0)


def monitor_disagrees(proxy: list[float], monitor: list[float], span: int, t: float = 2.0) -> bool:
    """Over the last `span` steps, the proxy's trend up and the monitor's down, each with |t| > `t`."""
    if len(proxy) < span or span < 3:
        return False
    _, tp = trend(proxy[-span:])
    _, tm = trend(monitor[-span:])
    return tp > t and tm < -t


@dataclass
class DriftCheck:
    """The drift rule of one round: `audit` each audit's (right, pairs), `step` each step's proxy and monitor
    means; `fired` names the first reason the reward model looked stale (None while it does not).

    The audit rule is relative: the accuracy pooled over the last `audits` audits has fallen by more than `drop`
    below the round's first `audits` audits' (the answers of the policy the RM was trained beside). An absolute
    bar would mistake a hard world for a stale RM: on the tiny world's own answer groups a fresh RM scores only
    0.6-0.75 against noisy labels, since many of a group's answers tie in gold and their labelled order is a coin.

    `trusted` is set when the audit rule fires: the step of the audit just before the pooled window that fell, the
    last one the RM passed. The pipeline's last round goes on from there."""
    drop: float                        # fall in pooled audit accuracy that makes the RM stale
    audits: int                        # audits pooled, at the start and at the end
    monitor_span: int = 0              # steps of trend for the monitor rule (0: the monitor is not consulted)
    history: list[tuple[int, int]] = field(default_factory=list)
    audit_steps: list[int] = field(default_factory=list)
    proxy: list[float] = field(default_factory=list)
    monitor: list[float] = field(default_factory=list)
    fired: str | None = None
    trusted: int | None = None

    def _pool(self, part: list[tuple[int, int]]) -> float:
        right, total = map(sum, zip(*part))
        return right / max(total, 1)

    def baseline(self) -> float | None:
        """The accuracy over the round's first `audits` audits (None before that many)."""
        return self._pool(self.history[:self.audits]) if len(self.history) >= self.audits else None

    def pooled(self) -> float | None:
        """The accuracy over the last `audits` audits' pairs (None before that many)."""
        return self._pool(self.history[-self.audits:]) if len(self.history) >= self.audits else None

    def audit(self, step: int, right: int, pairs: int) -> None:
        self.history.append((right, pairs))
        self.audit_steps.append(step)
        if self.fired is None and len(self.history) >= 2 * self.audits:
            base, now = self.baseline(), self.pooled()
            if now < base - self.drop:
                self.fired = (f"audit accuracy {now:.2f} over the last {self.audits} audits, down from {base:.2f} "
                              f"at the round's start (by more than {self.drop:g})")
                self.trusted = self.audit_steps[-self.audits - 1]

    def step(self, proxy: float, monitor: float | None) -> None:
        self.proxy.append(proxy)
        if monitor is None or not self.monitor_span:
            return
        self.monitor.append(monitor)
        if self.fired is None and monitor_disagrees(self.proxy, self.monitor, self.monitor_span):
            self.fired = f"the monitor RM fell while the proxy rose over the last {self.monitor_span} steps"


def pooled_audits(wanted: int, steps: int, every: int) -> int:
    """Audits the drift rule pools in a round of `steps` PPO steps audited every `every`: `wanted`
    (pipeline.drift_audits), fewer when the round has not room for twice as many (its start and its latest), at
    least one; a 15-step round audited every 5 steps compares single audits."""
    return max(1, min(wanted, steps // every // 2))
