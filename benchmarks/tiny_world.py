"""The tiny-world pipeline over several seeds, against the targets and the best-of-n baseline.

    .venv/bin/python benchmarks/tiny_world.py --seeds 0 1 2 [--labels judge simulated] [--set key=value ...]

Each seed is a whole world of its own: its own pretrained base model, tokenizer, data split, labeler noise and
every stage's randomness (run.seed), built from scratch under runs/bench-tiny-world/seed<N>/. Prints, per seed
and as mean ± sd over the seeds: RM (and monitor RM) held-out pairwise accuracy on the labels' rankings; the
rankings' and the RM's agreement with gold (the RM on the monitor prompts' answers, which it never saw); held-out
gold of SFT, PPO and DPO as gains in SFT standard deviations with their KL to SFT; best-of-n from SFT ranked by the RM (n = 2..16,
KL log n - (n-1)/n); PPO's gain over best-of-n's at PPO's own KL (best-of-n's curve interpolated linearly in
KL between n = 1, 2, 4, 8, 16); how the held-out monitor RM tracks gold over the PPO steps; wall time. Then
each target as met or missed, the machine and the date. The whole report is also written to
runs/bench-tiny-world/benchmark.md.

The peer in the same run is best-of-n: the baseline every RLHF paper compares against. With `--labels judge
simulated`, each seed's world runs the pipeline twice, its rankings from the stand-in LLM judge (RLAIF, no labeler;
rlhf_ray/tiny_world/judge.py) and from the simulated labelers (RLHF), and the report adds the judge's agreement with gold
and RLAIF's PPO gain beside RLHF's.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.machine import cpu_model, git_commit  # noqa: E402
from benchmarks.tables import seed_table  # noqa: E402
os.environ.setdefault("OMP_NUM_THREADS", "1")

from launch.pipeline import rm_gold_accuracy, run_pipeline  # noqa: E402
from rlhf_ray.config import load_config  # noqa: E402
from rlhf_ray.metrics import interpolate_from_origin  # noqa: E402

TARGETS = {"rm_accuracy": 0.75, "ppo_gain_sd": 1.0, "ppo_gain_sd_min": 0.85, "ppo_kl": 2.0, "bon_ratio": 0.9,
           "total_seconds": 600, "rlaif_ratio": 0.9}


def label_gold_accuracy(run: Path) -> float:
    """The rankings the RM learned from, against gold: of each prompt's answer pairs whose gold differs, the share
    the ranking orders as gold does (the labelers' noise, or the judge's errors)."""
    from rlhf_ray.drift import gold_pairs
    from rlhf_ray.tiny_world.gold import gold_score
    right = total = 0
    for line in (run / "data" / "label_rankings.jsonl").read_text().splitlines():
        row = json.loads(line)
        place = {answer: i for i, answer in enumerate(row["ranking"])}        # 0: best
        a, b = gold_pairs([-place[i] for i in range(len(row["responses"]))], [gold_score(r) for r in row["responses"]])
        right, total = right + a, total + b
    return right / max(total, 1)


def seed_row(s: dict, best_of: list[int]) -> dict:
    ev, sft = s["eval"], s["eval"]["sft"]
    gain = lambda r: (r["gold_mean"] - sft["gold_mean"]) / sft["gold_sd"]  # noqa: E731
    bon = {n: (ev[f"best_of_{n}"]["kl_to_sft"], gain(ev[f"best_of_{n}"])) for n in best_of}
    ppo_kl = ev["ppo"]["kl_to_sft"]
    at_kl, extrapolated = interpolate_from_origin(ppo_kl, list(bon.values()))
    row = {"rm_acc": s["rm_eval"]["accuracy"], "sft_gold": sft["gold_mean"], "ppo_gain": gain(ev["ppo"]),
           "ppo_kl": ppo_kl, "dpo_gain": gain(ev["dpo"]), "dpo_kl": ev["dpo"]["kl_to_sft"],
           **{f"bo{n}_gain": g for n, (_, g) in bon.items()}, "bon_at_ppo_kl": at_kl,
           "ppo_over_bon": gain(ev["ppo"]) / at_kl if at_kl > 0 else float("nan"), "bon_extrapolated": extrapolated,
           "seconds": s["seconds"]["total"]}
    if s.get("judge_eval"):
        j = s["judge_eval"]
        row.update({"judge_first": j["pair_acc_first"], "judge_second": j["pair_acc_second"],
                    "judge_avg": j["pair_acc_averaged"], "judge_point": j["pair_acc_pointwise"],
                    "judge_flips": j["flip_rate"], "judge_build_s": s["seconds"].get("judge", 0.0),
                    "label_s": s["seconds"]["label"]})
    if s.get("monitor_rm_eval"):
        m = s["monitor"]["monitor"]
        row.update({"monitor_acc": s["monitor_rm_eval"]["accuracy"], "monitor_r": m["pearson"],
                    "proxy_r": s["monitor"]["proxy"]["pearson"], "monitor_peak": m["peak_step"],
                    "gold_peak": m["reference_peak_step"]})
    return row


COLUMNS = [  # (key, header, format)
    ("label_gold_acc", "rankings vs gold", "{:.3f}"), ("rm_acc", "RM acc", "{:.3f}"),
    ("rm_gold_acc", "RM acc vs gold", "{:.3f}"), ("monitor_acc", "monitor RM acc", "{:.3f}"),
    ("sft_gold", "SFT gold", "{:.3f}"),
    ("ppo_gain", "PPO gain (sd)", "{:+.2f}"), ("ppo_kl", "PPO KL", "{:.2f}"), ("dpo_gain", "DPO gain", "{:+.2f}"),
    ("dpo_kl", "DPO KL", "{:.2f}"), ("bo2_gain", "bo2", "{:+.2f}"), ("bo4_gain", "bo4", "{:+.2f}"),
    ("bo8_gain", "bo8", "{:+.2f}"), ("bo16_gain", "bo16", "{:+.2f}"), ("bon_at_ppo_kl", "best-of-n at PPO's KL", "{:+.2f}"),
    ("ppo_over_bon", "PPO ÷ best-of-n", "{:.2f}×"), ("monitor_r", "monitor-gold r", "{:+.2f}"),
    ("proxy_r", "proxy-gold r", "{:+.2f}"), ("monitor_peak", "monitor peak step", "{:.0f}"),
    ("gold_peak", "gold peak step", "{:.0f}"), ("seconds", "wall s", "{:.0f}"),
]
JUDGE_COLUMNS = [  # the judge against gold on the label stage's answers (pairs whose gold differs)
    ("judge_first", "pairwise, A/B order", "{:.3f}"), ("judge_second", "pairwise, B/A order", "{:.3f}"),
    ("judge_avg", "pairwise, both orders averaged", "{:.3f}"), ("judge_point", "pointwise", "{:.3f}"),
    ("judge_flips", "verdicts flipped by the order", "{:.3f}"), ("judge_build_s", "judge built, s", "{:.0f}"),
    ("label_s", "label stage, s", "{:.0f}"),
]


def report(rows: dict[int, dict], cfg, argv: list[str]) -> str:
    cols = [c for c in COLUMNS if all(c[0] in r for r in rows.values())]
    lines = seed_table(rows, cols, mark=lambda k, r: "*" if k == "bon_at_ppo_kl" and r["bon_extrapolated"] else "")
    if all("judge_avg" in r for r in rows.values()):
        lines += ["", "The judge's agreement with gold on the label stage's answers (the SFT policy's samples, never "
                  "seen by the judge), over the compared pairs whose gold differs:", "",
                  *seed_table(rows, JUDGE_COLUMNS)]
    if any(r["bon_extrapolated"] for r in rows.values()):
        lines.append("\n\\* PPO's KL lies beyond best-of-16's: best-of-n's last segment extended.")

    gains = [r["ppo_gain"] for r in rows.values()]
    mean = lambda k: statistics.mean(r[k] for r in rows.values())  # noqa: E731
    checks = {
        f"RM held-out pairwise accuracy >= {TARGETS['rm_accuracy']} (mean)": mean("rm_acc") >= TARGETS["rm_accuracy"],
        f"PPO gold gain >= +{TARGETS['ppo_gain_sd']} SFT sd (mean)": mean("ppo_gain") >= TARGETS["ppo_gain_sd"],
        f"PPO gold gain >= +{TARGETS['ppo_gain_sd_min']} on every seed": min(gains) >= TARGETS["ppo_gain_sd_min"],
        f"PPO KL to SFT <= {TARGETS['ppo_kl']} nats/seq (every seed)": all(r["ppo_kl"] <= TARGETS["ppo_kl"] for r in rows.values()),
        f"PPO gain >= {TARGETS['bon_ratio']} x best-of-n's at PPO's KL (mean)": mean("ppo_over_bon") >= TARGETS["bon_ratio"],
        f"whole pipeline <= {TARGETS['total_seconds'] // 60} min (every seed)": all(r["seconds"] <= TARGETS["total_seconds"] for r in rows.values()),
    }
    lines += ["", *(f"- [{'met' if ok else 'MISSED'}] {what}" for what, ok in checks.items())]
    lines += ["", f"Machine: {cpu_model()}, {os.cpu_count()} cores; OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}; "
              f"Python {platform.python_version()}; {datetime.date.today().isoformat()}; commit {git_commit()}.",
              f"Config: {cfg} {' '.join('--set ' + o for o in argv)}".rstrip(),
              "Gains are in SFT standard deviations of held-out gold (128 prompts never seen by any stage); KL is "
              "nats per sequence to the SFT model."]
    return "\n".join(lines)


def compare(rows: dict[str, dict[int, dict]]) -> str:
    """RLAIF beside RLHF on the same worlds: the judge's labels against the simulated labelers'."""
    both = {seed: {"lab_hf": r["label_gold_acc"], "lab_ai": rows["judge"][seed]["label_gold_acc"],
                   "rm_hf": r["rm_gold_acc"], "rm_ai": rows["judge"][seed]["rm_gold_acc"], "gain_hf": r["ppo_gain"],
                   "gain_ai": rows["judge"][seed]["ppo_gain"], "kl_hf": r["ppo_kl"], "kl_ai": rows["judge"][seed]["ppo_kl"],
                   "ratio": rows["judge"][seed]["ppo_gain"] / r["ppo_gain"]}
            for seed, r in rows["simulated"].items()}
    cols = [("lab_hf", "rankings vs gold, labelers", "{:.3f}"), ("lab_ai", "rankings vs gold, judge", "{:.3f}"),
            ("rm_hf", "RM acc vs gold, labelers", "{:.3f}"), ("rm_ai", "RM acc vs gold, judge", "{:.3f}"),
            ("gain_hf", "PPO gain, labelers (sd)", "{:+.2f}"), ("gain_ai", "PPO gain, judge (sd)", "{:+.2f}"),
            ("kl_hf", "PPO KL, labelers", "{:.2f}"), ("kl_ai", "PPO KL, judge", "{:.2f}"),
            ("ratio", "RLAIF ÷ RLHF gain", "{:.2f}×")]
    mean_ratio = statistics.mean(r["gain_ai"] for r in both.values()) / statistics.mean(r["gain_hf"] for r in both.values())
    return "\n".join(["RLAIF (rankings from the judge, no labeler) beside RLHF (the simulated labelers), same world, "
                      "prompts and budgets per seed:", "", *seed_table(both, cols), "",
                      f"- [{'met' if mean_ratio >= TARGETS['rlaif_ratio'] else 'MISSED'}] RLAIF's mean PPO gold gain "
                      f">= {TARGETS['rlaif_ratio']} x RLHF's: {mean_ratio:.2f}x"])


def main() -> int:
    import ray
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/tiny_world.yaml")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--labels", nargs="+", choices=["judge", "simulated"], default=["simulated"],
                    help="who ranks the answers; both: RLAIF beside RLHF on each seed's world (the judge's run first, "
                         "so that it pays for building the world as well as the judge)")
    ap.add_argument("--out", default="runs/bench-tiny-world")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--report-only", action="store_true", help="the report again from the runs' summary.json files")
    args = ap.parse_args()
    out = Path(args.out)
    labels = sorted(set(args.labels))                       # judge before simulated
    rows: dict[str, dict[int, dict]] = {lab: {} for lab in labels}
    for seed in args.seeds:
        for lab in labels:
            run = out / f"seed{seed}" / (lab if len(labels) > 1 else "")
            cfg = load_config(args.config, [f"run.seed={seed}", f"run.output_dir={run}", f"pipeline.labels={lab}",
                                            f"pipeline.world_dir={out}/seed{seed}/world", *args.overrides])
            if args.report_only:
                s = json.loads((run / "summary.json").read_text())
            else:
                s = run_pipeline(cfg)
                ray.shutdown()             # the next run starts on a fresh local cluster
            rm_gold = rm_gold_accuracy(run / "rm", run / "data" / "monitor_rankings.jsonl", cfg)
            rows[lab][seed] = {**seed_row(s, cfg.pipeline.best_of_n), "rm_gold_acc": rm_gold,
                               "label_gold_acc": label_gold_accuracy(run)}
            print(f"\nseed {seed}, labels {lab} done: " + ", ".join(f"{k} {v:.3f}" for k, v in rows[lab][seed].items()),
                  flush=True)
    parts = [(f"### Labels: {lab}\n\n" if len(labels) > 1 else "") + report(rows[lab], args.config, args.overrides)
             for lab in labels]
    if len(labels) > 1:
        parts.append(compare(rows))
    text = "\n\n".join(parts)
    (out / "benchmark.md").write_text(text + "\n")
    print("\nbenchmark: tiny world, " + ", ".join(map(str, args.seeds)) + "\n\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
