"""A labeler pool with biased members, weighed by reliability against counted alike, and an all-honest pool.

    .venv/bin/python benchmarks/labelers.py [--seeds 0 1 2] [--set key=value ...]

Per seed, on one tiny world (runs/bench-labelers/seed<N>/world): the pipeline (configs/tiny_world.yaml, PPO cut to
one step: the reward model is what is measured) three times, its label stage ranked by a pool of four simulated
labelers (rlhf_ray/tiny_world/gold.py SimulatedLabeler, the rankings aggregated by rlhf_ray/labelers.py):

    honest        four honest labelers (Gaussian noise 0.15 on gold, the world's one labeler's)
    weighed       two honest ones, one who prefers longer answers (+0.1 per word above the mean: about the SFT
                  answers' gold sd over ten words) and one careless on half its rankings (a random order);
                  aggregated with each labeler weighed by its reliability estimated from the labels alone
    unweighted    the same pool, every labeler counted alike

Each run's SFT model, prompts and answers are the same (same seed); only the labels differ. Measured: the
aggregate rankings against gold (pairs whose gold differs), the reward model against gold on answers it never
trained on (the monitor prompts' answers), the inter-labeler agreement and each labeler's estimated reliability.
Targets (issue 37): the weighed RM's accuracy against gold >= the unweighted one's and >= 0.95 x the honest pool's;
a biased labeler estimated least reliable. Writes runs/bench-labelers/labelers.md. A benchmark, not a test.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_NUM_THREADS", "1")
from benchmarks.machine import cpu_model, git_commit  # noqa: E402
from benchmarks.tables import publish, seed_table  # noqa: E402
from benchmarks.tiny_world import label_gold_accuracy  # noqa: E402
from launch.pipeline import rm_gold_accuracy, run_pipeline  # noqa: E402
from rlhf_ray.config import load_config  # noqa: E402

HONEST = "{name: %s, noise: 0.15}"
POOLS = {
    "honest": [HONEST % f"honest{i}" for i in range(4)],
    "biased": [HONEST % "honest0", HONEST % "honest1", "{name: longer, noise: 0.15, bias: length, strength: 0.1}",
               "{name: careless, noise: 0.15, bias: careless, strength: 0.5}"],
}
RUNS = {"honest": ("honest", True), "weighed": ("biased", True), "unweighted": ("biased", False)}
BIASED = {"longer", "careless"}
FAST = ["train.steps=1", "pipeline.best_of_n=[2]"]       # the reward model is measured, not PPO


def one_run(seed: int, name: str, out: Path, config: str, extra: list[str]) -> dict:
    import ray
    pool, weigh = RUNS[name]
    run = out / f"seed{seed}" / name
    cfg = load_config(config, [f"run.seed={seed}", f"run.output_dir={run}", f"pipeline.world_dir={out}/seed{seed}/world",
                               f"pipeline.labelers=[{', '.join(POOLS[pool])}]", f"pipeline.weigh_labelers={weigh}",
                               *FAST, *extra])
    s = run_pipeline(cfg)
    ray.shutdown()                     # the next run starts on a fresh local cluster
    pool_report = s["labeler_pool"]
    reliability = pool_report["reliability"]
    return {"label_gold": label_gold_accuracy(run),
            "rm_gold": rm_gold_accuracy(run / "rm", run / "data" / "monitor_rankings.jsonl", cfg),
            "rm_acc": s["rm_eval"]["accuracy"], "agreement": pool_report["agreement"],
            "least": min(reliability, key=reliability.get), "reliability": reliability}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/tiny_world.yaml")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", default="runs/bench-labelers")
    ap.add_argument("--set", dest="extra", action="append", default=[])
    args = ap.parse_args()
    out = ROOT / args.out
    rows: dict[str, dict[int, dict]] = {name: {} for name in RUNS}
    for seed in args.seeds:
        for name in RUNS:
            rows[name][seed] = one_run(seed, name, out, args.config, args.extra)
            print(f"seed {seed} {name}: {json.dumps(rows[name][seed])}", flush=True)
    cols = [("label_gold", "rankings vs gold", "{:.3f}"), ("rm_gold", "RM acc vs gold", "{:.3f}"),
            ("rm_acc", "RM acc (held-out labels)", "{:.3f}"), ("agreement", "inter-labeler agreement", "{:.3f}")]
    lines = [f"Labeler pools on the tiny world, seeds {', '.join(map(str, args.seeds))}.", ""]
    for name in RUNS:
        lines += [f"**{name}** (pool {RUNS[name][0]}, {'weighed' if RUNS[name][1] else 'unweighted'})", ""]
        lines += seed_table(rows[name], cols) + [""]
        lines += ["| seed | " + " | ".join(rows[name][args.seeds[0]]["reliability"]) + " | least reliable |",
                  "|" + "---|" * (len(rows[name][args.seeds[0]]["reliability"]) + 2)]
        lines += [f"| {seed} | " + " | ".join(f"{v:.3f}" for v in r["reliability"].values()) + f" | {r['least']} |"
                  for seed, r in rows[name].items()] + [""]
    mean = {name: statistics.mean(r["rm_gold"] for r in rows[name].values()) for name in RUNS}
    checks = [
        (mean["weighed"] >= mean["unweighted"],
         f"weighed RM acc vs gold >= unweighted: {mean['weighed']:.3f} against {mean['unweighted']:.3f} (mean)"),
        (mean["weighed"] >= 0.95 * mean["honest"],
         f"weighed RM acc vs gold >= 0.95 x the honest pool's: {mean['weighed']:.3f} against "
         f"0.95 x {mean['honest']:.3f} = {0.95 * mean['honest']:.3f} (mean)"),
        (all(r["least"] in BIASED for r in rows["weighed"].values()),
         "a biased labeler estimated least reliable on every seed: "
         + ", ".join(r["least"] for r in rows["weighed"].values())),
    ]
    lines += [f"- [{'met' if ok else 'MISSED'}] {text}" for ok, text in checks]
    lines += ["", f"configs/tiny_world.yaml with {' '.join(FAST + args.extra)}; pools: "
              + "; ".join(f"{k}: {', '.join(v)}" for k, v in POOLS.items()),
              f"{cpu_model()}, {os.cpu_count()} cores; {datetime.date.today()}; commit {git_commit()}."]
    publish("\n".join(lines), out / "labelers.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
