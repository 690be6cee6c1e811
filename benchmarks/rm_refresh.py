"""A later round's reward model from scratch or warm-started: which judges the policy's new answers better.

    .venv/bin/python benchmarks/rm_refresh.py [--seeds 0 1 2] [--runs runs/bench-rounds]

Reads the over-optimising world's 3-round runs of benchmarks/rounds.py (mode rounds: run it first, or pass the
same --seeds to both), <runs>/seed<N>/overopt-rounds. There round r >= 2 trained its RM from scratch
(pipeline.rm_refresh scratch, the default: the SFT model on every ranking so far, rm_r<r>). Here, on the same
rankings, the warm-started RM is trained beside it as pipeline.rm_refresh warm would: from the last round's RM
(round 2 from round 1's rm, round 3 from this benchmark's warm round 2) on the round's new rankings only (the last
round's audit rankings and this round's fresh ones), with the same rm settings.

Both are scored against gold (pairs of a prompt's answers whose gold differs, the share the RM orders as gold does)
on answers neither trained on:

    audits     the round's own audit rankings: the answers of the policy this RM trained, as PPO moved it
    next       the next round's label answers: the policy at the round's end (the last round has none)
    sft        the monitor prompts' answers of the SFT model (what the first rankings were of: forgetting)

The policy's trajectory is the scratch run's, so both RMs are judged on the same answers. Writes
<runs>/rm_refresh.md. A benchmark, not a test.
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
from launch.common import start_ray  # noqa: E402
from launch.pipeline import rm_gold_accuracy  # noqa: E402
from launch.stages import run_stage  # noqa: E402
from rlhf_ray.config import derive, load_config  # noqa: E402

SETS = ("audits", "next", "sft")


def one_seed(run: Path) -> dict[int, dict]:
    """Per later round: the scratch RM's and the warm RM's gold accuracy on each set."""
    if not (run / "summary.json").is_file():
        raise SystemExit(f"{run}: no finished pipeline; run benchmarks/rounds.py --worlds overopt --modes rounds first")
    cfg = load_config(str(run / "config.yaml"))
    start_ray(cfg)
    data, out = run / "data", run / "rm_refresh"
    rounds = len(json.loads((run / "summary.json").read_text())["rounds"])
    warm, rows = str(run / "rm"), {}
    for r in range(2, rounds + 1):
        new = out / f"new_r{r}.jsonl"
        new.parent.mkdir(parents=True, exist_ok=True)
        new.write_text((data / f"audit_r{r - 1}_kept.jsonl").read_text() + (data / f"label_r{r}_rankings.jsonl").read_text())
        warm = run_stage(derive(cfg, {"rm.data": str(new), "rm.model": warm, "rm.output": str(out / f"warm_r{r}")}),
                         "rm")["model"]
        sets = {"audits": data / f"audit_r{r}_rankings.jsonl", "next": data / f"label_r{r + 1}_rankings.jsonl",
                "sft": data / "monitor_rankings.jsonl"}
        row = {}
        for name, path in sets.items():
            for kind, rm in (("scratch", run / f"rm_r{r}"), ("warm", Path(warm))):
                row[f"{kind}_{name}"] = rm_gold_accuracy(rm, path, cfg) if path.is_file() else float("nan")
            row[f"diff_{name}"] = row[f"warm_{name}"] - row[f"scratch_{name}"]
        rows[r] = row
    import ray
    ray.shutdown()
    return rows


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--runs", default="runs/bench-rounds")
    args = ap.parse_args()
    runs = ROOT / args.runs
    res = {seed: one_seed(runs / f"seed{seed}" / "overopt-rounds") for seed in args.seeds}
    lines = [f"A later round's RM, from scratch (every ranking so far, from SFT) or warm (from the last RM, on the new "
             f"rankings only): gold accuracy on answers neither trained on. Seeds {', '.join(map(str, args.seeds))}.", ""]
    cols = [(f"{kind}_{name}", f"{name}: {kind}", "{:.3f}") for name in SETS for kind in ("scratch", "warm")] + \
           [(f"diff_{name}", f"{name}: warm − scratch", "{:+.3f}") for name in SETS]
    for r in sorted({r for rows in res.values() for r in rows}):
        per = {seed: rows[r] for seed, rows in res.items() if r in rows}
        have = [c for c in cols if all(row[c[0]] == row[c[0]] for row in per.values())]   # the last round: no next
        lines += [f"**round {r}**", ""] + seed_table(per, have) + [""]
    every = [row for rows in res.values() for row in rows.values()]
    for name in SETS:
        d = [row[f"diff_{name}"] for row in every if row[f"diff_{name}"] == row[f"diff_{name}"]]
        if d:
            lines.append(f"- {name}: warm − scratch {statistics.mean(d):+.3f} ± "
                         f"{statistics.stdev(d) if len(d) > 1 else 0.0:.3f} over {len(d)} seed-rounds "
                         f"(warm ahead in {sum(x > 0 for x in d)})")
    lines += ["", f"Runs: {runs}/seed<N>/overopt-rounds (benchmarks/rounds.py); {cpu_model()}, {os.cpu_count()} cores; "
              f"OMP_NUM_THREADS=1; {datetime.date.today()}; commit {git_commit()}."]
    publish("\n".join(lines), runs / "rm_refresh.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
