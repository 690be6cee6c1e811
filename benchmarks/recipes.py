"""GRPO against DAPO and GSPO on a verifiable reward in the tiny world, over several seeds: reward at equal samples,
at equal wall time and at equal steps, what dynamic sampling filtered and what its extra generation cost.

    .venv/bin/python benchmarks/recipes.py [--seeds 0 1 2] [--steps 40] [--set key=value ...]

Per seed:
1. the tiny world (runs/bench-recipes/seed<N>/world, seeded) and its copy task (rlhf_ray/tiny_world/copy_task.py): 2,000
   RL prompts, 200 held-out ones, and the world's policy after a short SFT on 2,000 other rows, stopped once it
   copies 30 % of 50 rows it never saw, at temperature 1 (so groups of 8 are neither all right nor all wrong);
2. three runs from that policy on the same prompt stream, launched as `rlhf-ray ppo` would:
   - dapo: configs/tiny_dapo.yaml as shipped (clip-higher 0.2/0.28, dynamic sampling up to 3 rounds, token-mean
     loss, overlong buffer 4);
   - grpo: the same file with each DAPO flag off (clip 0.2/0.2, no filtering, seq-mean-token-mean, no overlong
     penalty);
   - gspo: configs/tiny_gspo.yaml (sequence-level ratio, clip 3e-4/4e-4, seq-mean-token-mean);
   the same lr, batch (8 prompts x 8 answers, 2 minibatches per step) and no KL term in all three;
3. each final policy's success on the 200 held-out rows (temperature 1).

The reward "at equal samples" is the mean reward of every answer drawn (filtered or not: filter/reward_all_mean,
else reward/score_mean; each prompt is new to the policy, so it is its success rate on fresh prompts) over the
last 5 steps within GRPO's total samples; "at equal wall time", within GRPO's total step time. Writes
runs/bench-recipes/recipes.md. A benchmark, not a test.
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

OUT = ROOT / "runs" / "bench-recipes"
RECIPES = {
    "grpo": ("configs/tiny_dapo.yaml", ["rollout.filter_groups=false", "ppo.clip_high=0.2",
                                        "ppo.loss_agg=seq-mean-token-mean", "ppo.overlong_buffer=0"]),
    "dapo": ("configs/tiny_dapo.yaml", []),
    "gspo": ("configs/tiny_gspo.yaml", []),
}
WINDOW = 5


def run(d: Path, task: dict, seed: int, steps: int, name: str, extra: list[str]) -> tuple[list[dict], Path]:
    """One run as `rlhf-ray ppo` runs it; its metrics rows and its final policy directory."""
    config, recipe = RECIPES[name]
    run_dir = d / name
    sets = [f"models.policy={task['policy']}", f"data.prompts={task['train']}", f"run.output_dir={run_dir}",
            f"run.seed={seed}", f"train.steps={steps}", "logging.wandb.enabled=false", *recipe, *extra]
    cmd = [sys.executable, "-m", "launch.ppo", "--config", config, *[a for s in sets for a in ("--set", s)]]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled")}
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"{name} run failed (seed {seed}):\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return rows, sorted((run_dir / "checkpoints").glob("step_*"))[-1] / "policy"


def drawn(row: dict) -> float:
    """The mean reward of every answer the step drew, before filtering and length shaping."""
    return row.get("filter/reward_all_mean", row.get("reward/score_mean", 0.0))


def within(rows: list[dict], cost, budget: float) -> list[dict]:
    """The steps whose cumulative cost stays within budget."""
    out, total = [], 0.0
    for r in rows:
        total += cost(r)
        if total > budget + 1e-9:
            break
        out.append(r)
    return out


def seed_rows(seed: int, a) -> dict[str, dict]:
    from rlhf_ray.tiny_world.copy_task import build_copy_task, evaluate, problems
    from rlhf_ray.tiny_world.world import TinySpec, build_tiny_world
    d = OUT / f"seed{seed}"
    if not (d / "world" / "policy" / "model.safetensors").is_file():
        build_tiny_world(d / "world", TinySpec(seed=seed))
    task = build_copy_task(d / "world", d / "copy", seed)
    held = [json.loads(line) for line in task["held_out"].read_text().splitlines()]
    per_step = lambda r: r.get("filter/rounds", 1) * 64     # noqa: E731   (8 prompts x 8 answers a round)
    runs = {name: run(d, task, seed, a.steps, name, a.extra) for name in RECIPES}
    sample_budget = sum(per_step(r) for r in runs["grpo"][0])
    time_budget = sum(r["time/step"] for r in runs["grpo"][0])
    out = {"sft": {"held_out": evaluate(task["policy"], held, seed),
                   "sft_steps": float((task["policy"] / "sft_steps.txt").read_text())}}
    for name, (rows, policy) in runs.items():
        by_samples = within(rows, per_step, sample_budget)[-WINDOW:]
        by_time = within(rows, lambda r: r["time/step"], time_budget)[-WINDOW:]
        trained = [r for r in rows if "policy/loss" in r]
        out[name] = {
            "first": statistics.mean(drawn(r) for r in rows[:WINDOW]),
            "equal_samples": statistics.mean(drawn(r) for r in by_samples),
            "equal_time": statistics.mean(drawn(r) for r in by_time),
            "steps_in_samples": len(within(rows, per_step, sample_budget)),
            "steps_in_time": len(within(rows, lambda r: r["time/step"], time_budget)),
            "held_out": evaluate(policy, held, seed),
            "uniform": statistics.mean(r.get("filter/uniform_frac", 0.0) for r in rows),
            "extra": sum(r.get("filter/extra_samples", 0) for r in rows) / (64 * len(rows)),
            "skipped": sum(r.get("filter/skipped", 0) for r in rows),
            "short": sum(r.get("filter/short", 0) for r in rows),
            "step_s": statistics.median(r["time/step"] for r in rows[2:]),
            "gen_s": statistics.median(r["time/rollout_wait"] for r in rows[2:]),
            "clip_high": statistics.mean(r["policy/clipfrac_high"] for r in trained),
            "clip_low": statistics.mean(r["policy/clipfrac_low"] for r in trained),
            "kl": trained[-1]["kl/ref_per_seq"], "len": statistics.mean(r["response/length_mean"] for r in trained),
        }
    return out


REWARD = [("first", "first 5 steps", "{:.3f}"), ("equal_samples", "at GRPO's samples", "{:.3f}"),
          ("steps_in_samples", "its steps", "{:.0f}"), ("equal_time", "at GRPO's wall time", "{:.3f}"),
          ("steps_in_time", "its steps in that time", "{:.0f}"), ("held_out", "held-out success, end", "{:.3f}"),
          ("kl", "KL to start, end", "{:.2f}")]
COST = [("uniform", "groups filtered", "{:.3f}"), ("extra", "extra samples / base", "{:.2f}"),
        ("short", "short steps", "{:.0f}"), ("skipped", "skipped steps", "{:.0f}"),
        ("step_s", "step s (median)", "{:.2f}"), ("gen_s", "rollout s (median)", "{:.2f}"),
        ("clip_low", "clipfrac low", "{:.4f}"), ("clip_high", "clipfrac high", "{:.4f}"),
        ("len", "answer tokens", "{:.1f}")]


def report(rows: dict[int, dict], a) -> str:
    lines = ["Held-out success of the SFT policy (the runs' start): "
             + ", ".join(f"seed {s} {r['sft']['held_out']:.3f} ({r['sft']['sft_steps']:.0f} SFT steps)"
                         for s, r in rows.items()), ""]
    for name in RECIPES:
        lines += [f"**{name}**: reward of every drawn answer, and at the end", "",
                  *seed_table({s: r[name] for s, r in rows.items()}, REWARD), "",
                  *seed_table({s: r[name] for s, r in rows.items()}, COST), ""]
    lines += [f"{a.steps} steps per run{''.join('; ' + x for x in a.extra)}; 8 prompts x 8 answers per round, "
              "2 minibatches per step, lr 5e-4, no KL term; rewards: rlhf_ray.rule_rewards:contains_answer. "
              f"Windows of the last {WINDOW} steps within each budget.",
              f"{cpu_model()}, {os.cpu_count()} cores; {datetime.date.today().isoformat()}; commit {git_commit()}."]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--set", dest="extra", action="append", default=[], help="more overrides of every run")
    a = ap.parse_args()
    rows = {}
    for seed in a.seeds:
        rows[seed] = seed_rows(seed, a)
        print(json.dumps({"seed": seed, **rows[seed]}), flush=True)
    publish(report(rows, a), OUT / "recipes.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
