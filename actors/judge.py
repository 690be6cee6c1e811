"""The judge as a reward source: the reward actor's ranks ask the judge's engines (actors/engine.py `Engine`
serving judge.model, built from `Config.judge_engine_config`) for each answer's score labels' logprobs and read
the expected score (rlhf_ray/judge.py).

Calls are bounded: each waits at most judge.timeout_s and a failed or timed-out one is retried judge.retries times
(on the next engine when there are several); then either the step fails with one line, or, with
judge.fallback_score set, the call's answers get that score and are counted. A dead engine is never retried: its
error goes up to the driver, which replaces the engine like any other actor and replays from the checkpoint.
"""
from __future__ import annotations

import time

import ray

from rlhf_ray.judge import JudgeFormat, expected_score, label_ids, pointwise_text
from rlhf_ray.prompts import render_prompt
from rlhf_ray.rewards import RewardSourceError


class JudgeScorer:
    """A text reward source (the reward actor's `scorer(prompts, responses)` contract) backed by judge engines."""

    def __init__(self, cfg, tokenizer):
        self.cfg, self.tokenizer = cfg.judge, tokenizer
        self.fmt: JudgeFormat = cfg.judge_format()
        self.labels = label_ids(tokenizer, self.fmt.score_labels, "judge.score_labels")
        self.engines: list = []
        self.stats = {"answers": 0, "fallbacks": 0, "retries": 0, "label_mass": 0.0, "seconds": 0.0}

    def attach(self, engines: list) -> None:
        """The judge engines' handles (again after any of them was replaced)."""
        self.engines = list(engines)

    def take_stats(self) -> dict:
        out, self.stats = self.stats, dict.fromkeys(self.stats, 0)
        return out

    def __call__(self, prompts: list[str], responses: list[str], **fields) -> list[float]:
        if not self.engines:
            raise RewardSourceError("judge: no judge engines attached to the reward actor")
        t0 = time.perf_counter()
        ids = [render_prompt(self.tokenizer, pointwise_text(self.fmt, p, r), self.fmt.chat_template)
               for p, r in zip(prompts, responses)]
        n = self.cfg.batch_size
        chunks = [(i, ids[i:i + n]) for i in range(0, len(ids), n)]
        calls = {i: self._call(c, k % len(self.engines)) for k, (i, c) in enumerate(chunks)}   # all in flight
        scores: list[float] = []
        for k, (i, chunk) in enumerate(chunks):
            logprobs = self._collect(calls[i], chunk, k)
            if logprobs is None:                                  # fallback, counted
                scores += [self.cfg.fallback_score] * len(chunk)
                self.stats["fallbacks"] += len(chunk)
                continue
            for lp in logprobs:
                s = expected_score(lp, self.fmt.score_values)
                scores.append(s.score)
                self.stats["label_mass"] += s.mass
        self.stats["answers"] += len(ids)
        self.stats["seconds"] += time.perf_counter() - t0
        return scores

    def _call(self, chunk: list[list[int]], engine: int):
        return self.engines[engine].label_logprobs.remote(chunk, self.labels)

    def _collect(self, ref, chunk: list[list[int]], k: int) -> list[list[float]] | None:
        """The chunk's label logprobs, with bounded retries; None when they ran out and a fallback is set."""
        last = ""
        for attempt in range(self.cfg.retries + 1):
            if attempt:
                self.stats["retries"] += 1
                ref = self._call(chunk, (k + attempt) % len(self.engines))
            try:
                return ray.get(ref, timeout=self.cfg.timeout_s)
            except ray.exceptions.ActorDiedError:
                raise                                             # the driver replaces it (launch/ppo.py recover)
            except ray.exceptions.GetTimeoutError:
                last = f"no answer within judge.timeout_s {self.cfg.timeout_s:g} s"
            except ray.exceptions.RayTaskError as e:
                last = " ".join(str(e.cause if isinstance(e.cause, BaseException) else e).split())[-200:]
        if self.cfg.fallback_score is not None:
            return None
        raise RewardSourceError(f"judge: a call for {len(chunk)} answers failed {self.cfg.retries + 1} times "
                                f"(last: {last}); set judge.fallback_score to score such answers and go on")
