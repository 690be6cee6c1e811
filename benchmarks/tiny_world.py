"""The tiny-world pipeline with fixed seeds, against the issue's targets and the best-of-n baseline.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/tiny_world.py [--set key=value ...]

Prints: RM held-out pairwise accuracy; held-out gold reward of SFT, PPO and DPO with the gain in SFT standard
deviations; mean KL per sequence to the SFT model; best-of-n from SFT ranked by the RM (n = 2..16, KL
log n - (n-1)/n); the wall time of each stage; and each target as met or missed. The peer in the same run is
best-of-n: the baseline every RLHF paper compares against.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("OMP_NUM_THREADS", "1")

from launch.pipeline import run_pipeline  # noqa: E402
from rlhf_ray.config import load_config  # noqa: E402

TARGETS = {"rm_accuracy": 0.75, "ppo_gain_sd": 1.0, "ppo_kl": 2.0, "total_seconds": 600}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/tiny_world.yaml")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args()
    cfg = load_config(args.config, ["run.output_dir=runs/bench-tiny-world", *args.overrides])
    s = run_pipeline(cfg)
    ev, sft = s["eval"], s["eval"]["sft"]
    checks = {
        "RM held-out pairwise accuracy >= 0.75": s["rm_eval"]["accuracy"] >= TARGETS["rm_accuracy"],
        "PPO gold gain >= +1.0 SFT sd": s["ppo_gain_sd"] >= TARGETS["ppo_gain_sd"],
        "PPO mean KL to SFT <= 2 nats/seq": ev["ppo"]["kl_to_sft"] <= TARGETS["ppo_kl"],
        "whole pipeline <= 10 min": s["seconds"]["total"] <= TARGETS["total_seconds"],
    }
    print("\nbenchmark: tiny world (2-core CPU)")
    print(f"  RM held-out pairwise accuracy   {s['rm_eval']['accuracy']:.3f}")
    for name in ("sft", "ppo", "dpo"):
        r = ev[name]
        print(f"  {name:4s} gold {r['gold_mean']:.3f} ± {r['gold_sd']:.3f}   gain {(r['gold_mean'] - sft['gold_mean']) / sft['gold_sd']:+.2f} sd"
              f"   KL to SFT {r['kl_to_sft']:.3f} nats/seq")
    for n in cfg.pipeline.best_of_n:
        r = ev[f"best_of_{n}"]
        print(f"  best-of-{n:<2d} gold {r['gold_mean']:.3f}   gain {(r['gold_mean'] - sft['gold_mean']) / sft['gold_sd']:+.2f} sd"
              f"   KL {r['kl_to_sft']:.3f} (log n - (n-1)/n)")
    bon = [ev[f"best_of_{n}"] for n in cfg.pipeline.best_of_n]
    matched = [r for r in bon if r["kl_to_sft"] >= ev["ppo"]["kl_to_sft"]] or bon[-1:]
    print(f"  PPO gain / best-of-n gain at no smaller KL: "
          f"{(ev['ppo']['gold_mean'] - sft['gold_mean']) / max(matched[0]['gold_mean'] - sft['gold_mean'], 1e-8):.2f}x")
    print("  stage seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in s["seconds"].items()))
    for what, ok in checks.items():
        print(f"  [{'met' if ok else 'MISSED'}] {what}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
