"""GRPO with the LLM judge as the online reward: does gold rise, how fast does the judge score, what share of the
step is it? Over several seeds.

    .venv/bin/python benchmarks/judge_grpo.py [--seeds 0 1 2] [--steps 30]

Per seed: the tiny world and its stand-in judge (rlhf_ray/tiny_world/judge.py, the judge section of
configs/tiny_world.yaml; reused from runs/bench-tiny-world/seed<N>/world when benchmarks/tiny_world.py built them,
else built under runs/bench-judge/), then GRPO (configs/tiny_grpo.yaml) whose only reward is the judge's pointwise
expected score; the gold rule rides along as a source of weight 0, so it is logged every step and never optimised.
The judge has an engine of its own.

Per seed: gold and the judge's score over the first and the last 5 steps' rollouts, the judge's answers scored per
second of its calls, its share of the step (time/judge over time/step), its mass on the score labels, the median
step. Writes runs/bench-judge/judge_grpo.md. A benchmark, not a test.
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

OUT = ROOT / "runs" / "bench-judge"
EDGE = 5
SOURCES = ('reward.sources=[{kind: judge, weight: 1.0},'
           ' {kind: function, path: "rlhf_ray.tiny_world.gold:tiny_gold", weight: 0.0}]')
WORKLOAD = ["generation.prompts_per_step=16", "generation.n=4", "ppo.minibatch_size=32", "policy.lr=2e-4",
            "ppo.kl_coef=0.05",
            "placement.share_process=[[reference, reward]]"]    # the layout measured (tiny_grpo.yaml's is now hybrid)


def world(seed: int) -> Path:
    """The seed's world with its judge: the tiny-world benchmark's when there, else built here."""
    from rlhf_ray.config import load_config
    from rlhf_ray.tiny_world.world import TinySpec, build_tiny_world
    from rlhf_ray.tiny_world.judge import TinyJudgeSpec, build_tiny_judge
    cfg = load_config(ROOT / "configs" / "tiny_world.yaml", [f"run.seed={seed}"])
    shared = ROOT / "runs" / "bench-tiny-world" / f"seed{seed}" / "world"
    d = shared if (shared / "judge" / "judge_recipe.json").is_file() else OUT / f"world{seed}"
    if not (d / "policy" / "model.safetensors").is_file():
        build_tiny_world(d, TinySpec(seed=seed))
    build_tiny_judge(d, cfg.judge_format(), TinyJudgeSpec(examples=cfg.pipeline.label_prompts * cfg.pipeline.k,
                                                          seed=seed))            # reused when built from this recipe
    return d


def judge_sets(d: Path) -> list[str]:
    """The judge section of configs/tiny_world.yaml (templates and labels its judge learned), at this world's judge."""
    import yaml
    j = yaml.safe_load((ROOT / "configs" / "tiny_world.yaml").read_text())["judge"]
    return [f"judge.model={d / 'judge'}", *(f"judge.{k}={json.dumps(j[k])}" for k in
                                            ("pointwise", "pairwise", "score_labels", "engine"))]


def run(seed: int, steps: int, extra: list[str]) -> list[dict]:
    d, run_dir = world(seed), OUT / f"seed{seed}"
    sets = [f"models.policy={d}/policy", f"data.prompts={d}/prompts.jsonl", f"run.output_dir={run_dir}",
            f"run.seed={seed}", f"train.steps={steps}", "checkpoint.every=0", "logging.wandb.enabled=false",
            "logging.samples_per_step=0", SOURCES, *judge_sets(d), *WORKLOAD, *extra]
    cmd = [sys.executable, "-m", "launch.ppo", "--config", "configs/tiny_grpo.yaml"]
    for s in sets:
        cmd += ["--set", s]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled")}
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"run failed (seed {seed}):\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def seed_row(rows: list[dict]) -> dict:
    mean = lambda key, part: statistics.mean(r[key] for r in part)  # noqa: E731
    med = lambda key: statistics.median(r[key] for r in rows[2:])  # noqa: E731   (steps 1-2 warm up)
    gold, judged = "reward/source1_function_mean", "reward/source0_judge_mean"
    return {"gold_first": mean(gold, rows[:EDGE]), "gold_last": mean(gold, rows[-EDGE:]),
            "judge_first": mean(judged, rows[:EDGE]), "judge_last": mean(judged, rows[-EDGE:]),
            "answers_per_s": med("judge/answers_per_s"), "judge_s": med("time/judge"), "step_s": med("time/step"),
            "share": statistics.median(r["time/judge"] / r["time/step"] for r in rows[2:]),
            "mass": mean("judge/label_mass_mean", rows), "fallbacks": sum(r["judge/fallbacks"] for r in rows),
            "kl": rows[-1]["kl/ref_per_seq"]}


COLUMNS = [("gold_first", f"gold, first {EDGE} steps", "{:.3f}"), ("gold_last", f"gold, last {EDGE}", "{:.3f}"),
           ("judge_first", f"judge score, first {EDGE}", "{:.2f}"),
           ("judge_last", f"judge score, last {EDGE}", "{:.2f}"),
           ("answers_per_s", "judge answers / s", "{:.0f}"), ("judge_s", "judge s / step", "{:.3f}"),
           ("step_s", "step s", "{:.2f}"), ("share", "judge's share of the step", "{:.2f}"),
           ("mass", "mass on labels", "{:.3f}"), ("fallbacks", "fallbacks", "{:.0f}"),
           ("kl", "KL to ref, last", "{:.2f}")]


def report(rows: dict[int, dict], a) -> str:
    lines = seed_table(rows, COLUMNS)
    rose = all(r["gold_last"] > r["gold_first"] for r in rows.values())
    lines += ["", f"- [{'met' if rose else 'MISSED'}] gold rises on every seed with the judge as the only reward",
              "", f"GRPO (configs/tiny_grpo.yaml; {', '.join(WORKLOAD)}), {a.steps} steps, the judge's pointwise "
              "expected score (labels 1-5) the only reward, the gold rule logged at weight 0; one judge engine, one "
              "policy rank; medians over steps 3-N for speeds and times.",
              f"{cpu_model()}, {os.cpu_count()} cores; {datetime.date.today().isoformat()}; commit {git_commit()}."]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--set", dest="extra", action="append", default=[], help="more overrides")
    a = ap.parse_args()
    rows = {}
    for seed in a.seeds:
        rows[seed] = seed_row(run(seed, a.steps, a.extra))
        print(json.dumps({"seed": seed, **rows[seed]}), flush=True)
    publish(report(rows, a), OUT / "judge_grpo.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
