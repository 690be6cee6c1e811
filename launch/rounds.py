"""The closed loop's parts (launch/pipeline.py runs the rounds): who labels, the audit that watches PPO for a stale
reward model, and the record of finished stages a killed pipeline resumes from.

- A **label source** ranks K answers per prompt (`LabelSource.rank`): simulated labelers (one per ranking, or a pool
  aggregated by reliability), the LLM judge, or people at the labelling page (`HumanLabels`: the pipeline waits).
- The **audit** (a `launch.ppo.Watch`): every pipeline.audit_every PPO steps it has the first
  pipeline.audit_prompts answer groups of the step's own rollout labelled, and counts the pairs the reward
  model's scores order as the labels do (rlhf_ray/drift.py). Its rankings are written down: they count against the
  label budget and join the next round's reward-model data. With pipeline.refresh on_drift, the drift rule ends the
  round. The first audit's answers are the start of the round's policy, which the RM was trained beside, so a fall
  from there is the RM going stale.
- **Progress**: <run_dir>/pipeline_state.json, each finished stage's result written (atomically) as it ends;
  `rlhf-ray pipeline --resume` skips what is in it, and a round's PPO resumes from its newest checkpoint.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import time
from pathlib import Path
from typing import Callable, Protocol

from launch.answers import Judge, judge_ranked
from launch.common import RunError
from launch.rollout import ScoredRollout
from rlhf_ray.batch import response_texts
from rlhf_ray.drift import DriftCheck, gold_pairs, ranking_accuracy
from rlhf_ray.judge import PairVerdict, agreement
from rlhf_ray.label_store import LabelStore, labeled_ranking
from rlhf_ray.labelers import aggregate
from rlhf_ray.tiny_world.gold import SimulatedLabeler, pool_rankings, simulated_ranking


class LabelSource(Protocol):
    """Who ranks: sets each row's "ranking" (best first) over its "responses"; returns a report or None. `seed` is
    the seed the answers were drawn with: each source derives its own stream from it."""

    def rank(self, rows: list[dict], seed: int) -> dict | None: ...


class SimulatedLabels:
    """One simulated labeler per ranking: gold plus Gaussian noise (rlhf_ray/tiny_world/gold.py)."""

    def __init__(self, noise: float, gold: Callable[[str], float]):
        self.noise, self.gold = noise, gold

    def rank(self, rows: list[dict], seed: int) -> None:
        rng = random.Random(seed + 1)
        for r in rows:
            r["ranking"] = simulated_ranking(r["responses"], rng, self.noise, self.gold)
        return None


class PoolLabels:
    """A pool of simulated labelers, each ranking every row, aggregated by estimated reliability
    (rlhf_ray/labelers.py); the report names each labeler's reliability and the pool's agreement."""

    def __init__(self, pool: list[SimulatedLabeler], weigh: bool):
        self.pool, self.weigh = pool, weigh

    def rank(self, rows: list[dict], seed: int) -> dict:
        report = pool_rankings(rows, self.pool, random.Random(seed + 1), self.weigh)
        print("labelers: agreement {:.2f}; reliability {}{}".format(report["agreement"], ", ".join(
            f"{n} {p:.2f}" for n, p in report["reliability"].items()), "" if self.weigh else " (not used)"),
            flush=True)
        return report


class HumanLabels:
    """People at the labelling page (launch/label_server.py): the rows queued as rank tasks in the label store, then
    waited for until `wanted` people have ranked each (a skip passes a task on to someone else). A row's ranking is
    its one label (ties broken by answer index), or the aggregate of several by each person's reliability estimated
    from the shared tasks (rlhf_ray/labelers.py); each person's own tiers go under "labels". The batch is named by
    the seed and the prompts, so a pipeline resumed after a kill finds what it queued and the labels given, and
    waits for the rest; if it drew other answers to the same prompts, the queued ones (those people saw) stand."""

    def __init__(self, store: LabelStore, wanted: int, weigh: bool, wait_s: float = 0.0, poll_s: float = 0.25,
                 say_every_s: float = 60.0):
        self.store, self.wanted, self.weigh, self.wait_s = store, wanted, weigh, wait_s
        self.poll_s, self.say_every_s = poll_s, say_every_s

    def rank(self, rows: list[dict], seed: int) -> dict:
        digest = hashlib.sha256(json.dumps([r["prompt"] for r in rows]).encode()).hexdigest()[:12]
        batch = f"seed{seed}-{len(rows)}-{digest}"
        tasks = self.store.batch_tasks(batch)
        if not tasks:
            self.store.add_tasks(batch, [{"prompt": r["prompt"], "responses": r["responses"]} for r in rows],
                                 "rank", self.wanted)
            tasks = self.store.batch_tasks(batch)
            print(f"labels: {len(tasks)} ranking tasks queued for people (batch {batch}, {self.wanted} each) in "
                  f"{self.store.path}", flush=True)
        else:
            redrawn = sum(t["answers"] != r["responses"] for t, r in zip(tasks, rows))
            for t, r in zip(tasks, rows):
                r["responses"] = t["answers"]
            note = f"; {redrawn} answer sets kept as queued, not as drawn again" if redrawn else ""
            print(f"labels: batch {batch} found queued (resumed){note}", flush=True)
        self.wait(batch)
        by_task = {t["task"]: g for g, t in enumerate(tasks)}
        given = [lab for lab in self.store.labels(batch, "rank") if not lab["skipped"]]
        labeled = [labeled_ranking(by_task[lab["task_id"]], lab["labeler"], lab["tiers"]) for lab in given]
        people = {lab.labeler for lab in labeled}
        agg = aggregate(labeled, weigh=self.weigh and len(people) > 1)
        by_row: list[list] = [[] for _ in rows]
        for lab, ranked in zip(given, labeled):
            by_row[ranked.prompt].append((lab["labeler"], lab["tiers"], ranked.ranking))
        for g, (r, own) in enumerate(zip(rows, by_row)):
            r["labels"] = {name: tiers for name, tiers, _ in own}
            # one person's label as given (the aggregate of one label is no better, and weighs it at p = 0.5)
            r["ranking"] = list(own[0][2]) if len(own) == 1 else agg.rankings[g]
        return {"reliability": agg.reliability, "with_aggregate": agg.with_aggregate, "agreement": agg.agreement,
                "weighed": agg.weighed, "people": len(people), "batch": batch}

    def wait(self, batch: str) -> None:
        """Until every task of `batch` has its labels; past wait_s (> 0) a one-line error (`--resume` waits on)."""
        said, t0 = 0.0, time.monotonic()
        while True:
            p = self.store.progress(batch=batch)
            if p["done"] == p["tasks"]:
                return
            if self.wait_s and time.monotonic() - t0 > self.wait_s:
                raise RunError(f"labels: {p['tasks'] - p['done']} of {p['tasks']} tasks of batch {batch} still "
                               f"unlabelled after pipeline.label_wait_s {self.wait_s:g} s ({self.store.path}); "
                               "--resume waits on, the labels given kept")
            if time.monotonic() - said >= self.say_every_s:
                print(f"labels: waiting for people: {p['done']} of {p['tasks']} tasks of batch {batch} labelled",
                      flush=True)
                said = time.monotonic()
            time.sleep(self.poll_s)


class JudgeLabels:
    """The LLM judge: each prompt's answers ranked from pairwise verdicts asked in both orders; the report is its
    agreement with gold on these answers (the tiny world's, which the judge never saw)."""

    def __init__(self, judge: Judge, gold: Callable[[str], float]):
        self.judge, self.gold = judge, gold

    def rank(self, rows: list[dict], seed: int) -> dict:
        judge_ranked(rows, self.judge, seed)
        flat = self.judge.scores([r["prompt"] for r in rows for _ in r["responses"]],
                                 [a for r in rows for a in r["responses"]])
        scores, i = [], 0
        for r in rows:
            scores.append(flat[i:i + len(r["responses"])])
            i += len(r["responses"])
        verdicts = [{(a, b): PairVerdict(pf, ps, (pf + ps) / 2, (pf > 0.5) != (ps > 0.5))
                     for a, b, pf, ps in r["judge_verdicts"]} for r in rows]
        return agreement([[self.gold(a) for a in r["responses"]] for r in rows], verdicts, scores)


class Audit:
    """A PPO round's watch (launch.ppo.Watch): audits every `every` steps, logs audit/* metrics, and under
    on_drift sets `stop` when `check` fires. `gold` (the tiny world's) adds audit/gold_accuracy: the reward
    model's accuracy against gold on the whole step's answer groups, which no label source could give."""

    def __init__(self, source: LabelSource, tokenizer, out: Path, prompts: int, every: int, n: int, seed: int,
                 check: DriftCheck, stop_on_drift: bool, gold: Callable[[str], float] | None = None):
        self.source, self.tokenizer, self.out, self.prompts, self.every, self.n = source, tokenizer, out, prompts, every, n
        self.seed, self.check, self.stop_on_drift, self.gold = seed, check, stop_on_drift, gold
        self.stop: str | None = None
        self.labels = 0
        self.replay: Path | None = None    # a resumed round's metrics.jsonl: the drift rule's past, read once

    def observe(self, step: int, scored: ScoredRollout, metrics: dict) -> dict:
        if self.replay is not None:
            self._replay(step)
        proxy = scored.rewards.total.tolist()       # the reward model's own scores, before normalising and KL
        self.check.step(sum(proxy) / len(proxy), metrics.get("monitor/score_mean"))
        m = {}
        if self.prompts and step % self.every == 0:
            texts, n = response_texts(self.tokenizer, scored.batch), self.n
            groups = min(self.prompts, len(texts) // n)
            rows = [{"prompt": scored.prompts[g * n], "responses": texts[g * n:(g + 1) * n], "step": step}
                    for g in range(groups)]
            self.source.rank(rows, self.seed + step)
            right = total = 0
            for g, r in enumerate(rows):
                a, b = ranking_accuracy(proxy[g * n:(g + 1) * n], r["ranking"])
                right, total = right + a, total + b
            self.check.audit(step, right, total)
            self.labels += len(rows)
            with self.out.open("a") as f:
                f.writelines(json.dumps(r) + "\n" for r in rows)
            m = {"audit/accuracy": right / max(total, 1), "audit/pairs": total, "audit/labels": self.labels}
            if self.check.pooled() is not None:
                m["audit/pooled_accuracy"] = self.check.pooled()
            if self.gold is not None:
                m["audit/gold_accuracy"] = gold_accuracy(proxy, [self.gold(t) for t in texts], n)
        if self.stop_on_drift and self.check.fired:
            self.stop = f"the reward model drifted: {self.check.fired}"
        m["audit/drift"] = float(self.check.fired is not None)
        return m

    def _replay(self, step: int) -> None:
        """A resumed round: feed the drift rule the steps logged before `step` (the log is rewound to the
        checkpoint resumed from), as the uninterrupted round's rule saw them."""
        path, self.replay = self.replay, None
        rows = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
        for r in (r for r in rows if r["step"] < step):
            self.check.step(r.get("reward/raw_score_mean", r["reward/score_mean"]), r.get("monitor/score_mean"))
            if "audit/accuracy" in r:
                self.check.audit(r["step"], round(r["audit/accuracy"] * r["audit/pairs"]), r["audit/pairs"])
                self.labels = r["audit/labels"]


def gold_accuracy(scores: list[float], gold: list[float], n: int) -> float:
    """Of the pairs within each group of n whose gold differs, the share `scores` order as gold does."""
    pairs = [gold_pairs(scores[g * n:(g + 1) * n], gold[g * n:(g + 1) * n]) for g in range(len(scores) // n)]
    return sum(right for right, _ in pairs) / max(sum(total for _, total in pairs), 1)


def audit_rows(path: Path, last_step: int) -> list[dict]:
    """An audit file's rankings up to `last_step` (a resumed round audits its redone steps again: the last
    writing of a step wins)."""
    if not path.is_file():
        return []
    by_step: dict[int, list[dict]] = {}
    for line in path.read_text().splitlines():
        r = json.loads(line)
        by_step.setdefault(r["step"], [])
        if any(x["prompt"] == r["prompt"] and x["responses"] == r["responses"] for x in by_step[r["step"]]):
            continue
        by_step[r["step"]].append(r)
    return [r for s in sorted(by_step) if s <= last_step for r in by_step[s]]


class Progress:
    """The pipeline's finished stages and their results, in <run_dir>/pipeline_state.json. Fresh unless
    `resume`; resuming under another config is refused (the stages kept would not be this config's)."""

    def __init__(self, run_dir: Path, config: dict, resume: bool):
        self.path, self.config = run_dir / "pipeline_state.json", config
        self.done: dict = {}
        if resume and self.path.is_file():
            state = json.loads(self.path.read_text())
            if state["config"] != config:
                changed = sorted(k for k in set(state["config"]) | set(config)
                                 if state["config"].get(k) != config.get(k))
                raise RunError(f"{self.path}: the pipeline there ran another config (sections differ: "
                               f"{', '.join(changed)}); resume it with its own, or start in a fresh run.output_dir")
            self.done = state["done"]

    def run(self, key: str, fn: Callable[[], object]):
        """fn()'s result, or the result kept from before (then fn is not called)."""
        if key in self.done:
            print(f"pipeline: {key}: done before, kept", flush=True)
            return self.done[key]
        result = fn()
        self.done[key] = result
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"config": self.config, "done": self.done}, indent=1))
        os.replace(tmp, self.path)
        return result
