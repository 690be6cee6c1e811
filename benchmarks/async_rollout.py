"""Asynchronous rollout on the 2-core box: how much generation and training overlap, and whether one step
off-policy learns as well as on-policy, over several seeds.

    .venv/bin/python benchmarks/async_rollout.py [--seeds 0 1 2] [--steps 30]

Per seed: a tiny world of its own (pretrained base model and prompts, runs/bench-async/world<seed>/), then GRPO on
the tiny world's gold rule (configs/tiny_grpo.yaml with WORKLOAD below: no reward model, no critic) twice from
the same start, with rollout.max_staleness 0 (synchronous) and 1 (the engines sample step s+1 while the policy
trains on step s, truncated importance weights). Generation and scoring are pinned to core 0 (engine, reference,
reward), training to core 1 (the policy: one rank), so the two can overlap.

Overlap: the median step of each run (steps 3..N), and the bound an overlap can reach, max(gen + score, train),
from the synchronous run's phases. Learning: the gold rule's mean over the last 5 steps' rollouts (the same
number of samples in both runs) and the KL to the reference. Prints per-seed rows, mean ± sd and the target
(async step <= 1.15 x the bound), writes runs/bench-async/async.md. A benchmark, not a test.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.machine import cpu_model, git_commit  # noqa: E402
from benchmarks.tables import publish, seed_table  # noqa: E402

OUT = ROOT / "runs" / "bench-async"
PIN = ["engine.cpu_cores=[0]", "reference.cpu_cores=[0]", "reward.cpu_cores=[0]", "policy.cpu_cores=[1]",
       "policy.num_ranks=1", "placement.share_process=[[reference, reward]]"]   # (tiny_grpo.yaml's is now hybrid)
# 128 samples a step (32 prompts x 4) in two minibatches: enough work per step that the loop's fixed costs (weight
# sync, Ray round trips) do not decide the overlap; a learning rate and KL coefficient that keep the KL to the
# reference within tens of nats over the run
WORKLOAD = ["generation.prompts_per_step=32", "generation.n=4", "ppo.minibatch_size=64", "policy.lr=2e-4",
            "ppo.kl_coef=0.05"]
ASYNC = ["rollout.max_staleness=1", "ppo.is_correction=tis", "ppo.is_cap=2.0"]
SYNC = ["rollout.max_staleness=0", "ppo.is_correction=tis", "ppo.is_cap=2.0"]    # same loss: weights are ~1 here
LAST = 5


def world(seed: int) -> Path:
    d = OUT / f"world{seed}"
    if not (d / "policy" / "model.safetensors").is_file():
        from rlhf_ray.tiny_world.world import TinySpec, build_tiny_world
        build_tiny_world(d, TinySpec(seed=seed))
    return d


def run(seed: int, mode: str, steps: int, extra: list[str]) -> list[dict]:
    w, run_dir = world(seed), OUT / f"seed{seed}-{mode}"
    sets = [f"models.policy={w}/policy", f"data.prompts={w}/prompts.jsonl", f"run.output_dir={run_dir}",
            f"run.seed={seed}", f"train.steps={steps}", "checkpoint.every=0", "logging.wandb.enabled=false",
            "logging.samples_per_step=0", *PIN, *WORKLOAD, *(ASYNC if mode == "async" else SYNC), *extra]
    cmd = [sys.executable, "-m", "launch.ppo", "--config", "configs/tiny_grpo.yaml"]
    for s in sets:
        cmd += ["--set", s]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled")}
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"run failed (seed {seed}, {mode}):\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def med(rows: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rows[2:])          # steps 1-2 warm up (and step 1 is never stale)


def seed_row(sync: list[dict], asyn: list[dict]) -> dict:
    # score: the rewards (time/score) and the logprob and value forwards (time/logprobs), what happens between
    # generation and training
    gen, train = med(sync, "time/generate"), med(sync, "time/train")
    score = statistics.median(r["time/score"] + r["time/logprobs"] for r in sync[2:])
    bound = max(gen + score, train)
    gold = lambda rows: statistics.mean(r["reward/source0_function_mean"] for r in rows[-LAST:])  # noqa: E731
    return {"sync_step": med(sync, "time/step"), "async_step": med(asyn, "time/step"), "gen": gen, "score": score,
            "train": train, "bound": bound, "async_over_bound": med(asyn, "time/step") / bound,
            "speedup": med(sync, "time/step") / med(asyn, "time/step"),
            "gold_sync": gold(sync), "gold_async": gold(asyn),
            "kl_sync": sync[-1]["kl/ref_per_seq"], "kl_async": asyn[-1]["kl/ref_per_seq"],
            "stale_async": max(r["rollout/staleness_max"] for r in asyn),
            "is_corrected": statistics.mean(r["rollout/is_corrected_frac"] for r in asyn)}


COLUMNS = [("sync_step", "sync step (s)", "{:.2f}"), ("async_step", "async step (s)", "{:.2f}"),
           ("gen", "gen", "{:.2f}"), ("score", "score", "{:.2f}"), ("train", "train", "{:.2f}"),
           ("bound", "max(gen + score, train)", "{:.2f}"), ("async_over_bound", "async / bound", "{:.2f}x"),
           ("speedup", "sync / async", "{:.2f}x"), ("gold_sync", f"gold, last {LAST} steps: sync", "{:.3f}"),
           ("gold_async", "async", "{:.3f}"), ("kl_sync", "KL sync", "{:.2f}"), ("kl_async", "KL async", "{:.2f}"),
           ("is_corrected", "tokens truncated (async)", "{:.3f}")]


def report(rows: dict[int, dict], a) -> str:
    lines = seed_table(rows, COLUMNS)
    worst = max(r["async_over_bound"] for r in rows.values())
    lines += ["", f"- [{'met' if worst <= 1.15 else 'missed'}] async step <= 1.15 x max(gen + score, train) on every "
              f"seed (worst {worst:.2f}x)",
              "", f"GRPO on the tiny world's gold rule (configs/tiny_grpo.yaml; {', '.join(WORKLOAD)}), "
              f"{a.steps} steps, policy 1 rank; "
              "engine, reference and reward pinned to core 0, the policy to core 1; medians over steps 3-"
              f"{a.steps}; phases from the synchronous run. Gold: the rule's mean over the last {LAST} steps' "
              "rollouts (the same samples count in both runs).",
              f"{cpu_model()}, {os.cpu_count()} cores; {datetime.date.today().isoformat()}; commit {git_commit()}."]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--set", dest="extra", action="append", default=[], help="more overrides for both runs")
    a = ap.parse_args()
    rows = {}
    for seed in a.seeds:
        rows[seed] = seed_row(run(seed, "sync", a.steps, a.extra), run(seed, "async", a.steps, a.extra))
        print(json.dumps({"seed": seed, **rows[seed]}), flush=True)
    publish(report(rows, a), OUT / "async.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
