"""Asking the judge: its engines (actors/engine.py `Engine` serving judge.model, built from
`Config.judge_engine_config`) return label tokens' logprobs, read as verdicts by rlhf_ray/judge.py.

- `JudgeScorer`: the judge as a reward source. The reward actor's ranks score each answer pointwise.
- `judge_rankings`: K answers per prompt ranked from pairwise verdicts, both orders (the label stage).

Calls are bounded (`JudgeClient`): each waits at most judge.timeout_s and a failed or timed-out one is retried
judge.retries times (on the next engine when there are several); then the caller fails with one line, or, where
judge.fallback_score is set (rewards only: labels are never made up), the call's answers get that score and are
counted. A dead engine is never retried: its error goes up, and a PPO run replaces the engine like any other
actor and replays from the checkpoint.
"""
from __future__ import annotations

import time

import ray

from rlhf_ray.judge import (JudgeFormat, PairVerdict, PointScore, Ranking, comparison_pairs, expected_score,
                            label_ids, pair_verdict, pairwise_text, pointwise_text, rank_answers)
from rlhf_ray.prompts import render_prompt
from rlhf_ray.rewards import RewardSourceError


class JudgeClient:
    """Label logprobs for many judge prompts: chunks of judge.batch_size spread over the engines, all in flight at
    once, each collected with bounded retries."""

    def __init__(self, jc, engines: list):
        self.cfg, self.engines, self.retries = jc, list(engines), 0

    def label_logprobs(self, prompts: list[list[int]], labels: list[int],
                       fallback: bool) -> list[list[float] | None]:
        """One list of label logprobs per prompt; None for the prompts of a call that failed past its retries
        when `fallback` (else a one-line RewardSourceError)."""
        if not self.engines:
            raise RewardSourceError("judge: no judge engines attached")
        n = self.cfg.batch_size
        chunks = [prompts[i:i + n] for i in range(0, len(prompts), n)]
        calls = [self._call(c, labels, k) for k, c in enumerate(chunks)]
        out: list[list[float] | None] = []
        for k, (ref, chunk) in enumerate(zip(calls, chunks)):
            got = self._collect(ref, chunk, labels, k, fallback)
            out += got if got is not None else [None] * len(chunk)
        return out

    def _call(self, chunk: list[list[int]], labels: list[int], engine: int):
        return self.engines[engine % len(self.engines)].label_logprobs.remote(chunk, labels)

    def _collect(self, ref, chunk, labels, k: int, fallback: bool) -> list[list[float]] | None:
        last = ""
        for attempt in range(self.cfg.retries + 1):
            if attempt:
                self.retries += 1
                ref = self._call(chunk, labels, k + attempt)
            try:
                return ray.get(ref, timeout=self.cfg.timeout_s)
            except ray.exceptions.ActorDiedError:
                raise                                     # replaced by the run (launch/ppo.py recover)
            except ray.exceptions.GetTimeoutError:
                last = f"no answer within judge.timeout_s {self.cfg.timeout_s:g} s"
            except ray.exceptions.RayTaskError as e:
                last = " ".join(str(e.cause if isinstance(e.cause, BaseException) else e).split())[-200:]
        if fallback:
            return None
        raise RewardSourceError(f"judge: a call for {len(chunk)} answers failed {self.cfg.retries + 1} times "
                                f"(last: {last})" + ("; set judge.fallback_score to score such answers and go on"
                                                     if self.cfg.fallback_score is None else ""))


class JudgeScorer:
    """A text reward source (the reward actor's `scorer(prompts, responses)` contract) backed by judge engines."""

    def __init__(self, cfg, tokenizer):
        self.cfg, self.tokenizer = cfg.judge, tokenizer
        self.fmt: JudgeFormat = cfg.judge_format()
        self.labels = label_ids(tokenizer, self.fmt.score_labels, "judge.score_labels")
        self.client = JudgeClient(self.cfg, [])
        self.stats = {"answers": 0, "fallbacks": 0, "retries": 0, "label_mass": 0.0, "seconds": 0.0}

    def attach(self, engines: list) -> None:
        """The judge engines' handles (again after any of them was replaced)."""
        self.client.engines = list(engines)

    def take_stats(self) -> dict:
        self.stats["retries"], self.client.retries = self.client.retries, 0
        out, self.stats = self.stats, dict.fromkeys(self.stats, 0)
        return out

    def __call__(self, prompts: list[str], responses: list[str], **fields) -> list[float]:
        t0 = time.perf_counter()
        scores = []
        for s in pointwise_scores(self.client, self.tokenizer, self.fmt, self.labels, prompts, responses,
                                  fallback=self.cfg.fallback_score is not None):
            if s is None:                                      # past its retries: the fallback, counted
                scores.append(self.cfg.fallback_score)
                self.stats["fallbacks"] += 1
                continue
            scores.append(s.score)
            self.stats["label_mass"] += s.mass
        self.stats["answers"] += len(prompts)
        self.stats["seconds"] += time.perf_counter() - t0
        return scores


def pointwise_scores(client: JudgeClient, tokenizer, fmt: JudgeFormat, labels: list[int], prompts: list[str],
                     responses: list[str], fallback: bool) -> list[PointScore | None]:
    """Each answer's expected score (and the judge's mass on the score labels); None for the answers of a call
    that failed past its retries when `fallback` (else a one-line RewardSourceError)."""
    ids = [render_prompt(tokenizer, pointwise_text(fmt, p, r), fmt.chat_template) for p, r in zip(prompts, responses)]
    return [None if lp is None else expected_score(lp, fmt.score_values)
            for lp in client.label_logprobs(ids, labels, fallback=fallback)]


def judge_rankings(cfg, engines: list, tokenizer, prompts: list[str], answers: list[list[str]],
                   seed: int) -> list[Ranking]:
    """Each prompt's K answers ranked by the judge: every compared pair (judge.max_pairs) asked in both orders,
    the verdicts averaged (rlhf_ray/judge.py pair_verdict), a Bradley-Terry fit over them. A call that fails past
    its retries is a one-line error: labels are never made up."""
    fmt: JudgeFormat = cfg.judge_format()
    verdict_ids = label_ids(tokenizer, fmt.verdict_labels, "judge.verdict_labels")
    asks, keys = [], []
    for i, (p, ans) in enumerate(zip(prompts, answers)):
        for a, b in comparison_pairs(len(ans), cfg.judge.max_pairs, seed + i):
            for first, second in ((a, b), (b, a)):
                asks.append(render_prompt(tokenizer, pairwise_text(fmt, p, ans[first], ans[second]),
                                          fmt.chat_template))
            keys.append((i, a, b))
    lps = JudgeClient(cfg.judge, engines).label_logprobs(asks, verdict_ids, fallback=False)
    verdicts: list[dict[tuple[int, int], PairVerdict]] = [{} for _ in prompts]
    for j, (i, a, b) in enumerate(keys):
        verdicts[i][(a, b)] = pair_verdict(lps[2 * j], lps[2 * j + 1])
    return [rank_answers(len(ans), v) for ans, v in zip(answers, verdicts)]
