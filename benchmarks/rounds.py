"""The closed loop against one pass, at equal labels and PPO steps, in the over-optimising world and the standard one.

    .venv/bin/python benchmarks/rounds.py [--seeds 0 1 2] [--worlds overopt standard]
                                          [--modes one one_trusted rounds on_drift]

Per seed, one tiny world (runs/bench-rounds/seed<N>/world: its base model, data split and every stage's randomness
from run.seed), and in each world config the pipeline several ways, every run 384 label prompts' worth of rankings
(K = 8 answers each) and 45 PPO steps, audits of 16 of the policy's answer groups every 5 steps in all of them:

    one        one round as one pass runs it: the SFT model's answers labelled (384), one RM, all 45 PPO steps
               (pipeline.keep_trusted off: the audits watch, nothing acts); DPO once on the same labels
    one_trusted  one round, but its PPO ends when the drift rule fires, keeping the policy of the last audit the
               RM passed (pipeline.keep_trusted, the default): what the audits alone are worth, without new labels
    rounds     pipeline.rounds 3 on a schedule: 192 labels of SFT answers, then two rounds of 96 rankings of the
               current policy's answers (the audits' rankings among them), the RM retrained from the SFT model on
               every ranking so far, 15 PPO steps a round, the last round kept to its last trusted audit;
               DPO iterated on each round's labels of its own answers
    on_drift   up to 3 rounds, each ended when the audit's accuracy (2 audits pooled; single audits in a round with
               room for fewer than 4) has fallen by 0.1 from the round's first, or the monitor RM falls while the
               proxy rises; the last round takes the rest, kept to its last trusted audit
    rounds_warm  as rounds, but each later RM warm-started from the last one on the new rankings only (not a
               default mode: pipeline.rm_refresh's choice, --modes rounds rounds_warm)

Worlds: configs/tiny_world_overopt.yaml (gold charges repeated topic words, which SFT answers almost never have: one
pass over-optimises) and configs/tiny_world.yaml (the standard world, with the same audits added).

Printed (and written to runs/bench-rounds/rounds.md), per world: the one-round PPO curve (gold's 5-step moving
average: its peak and where, its end, the proxy's rise after gold's peak, the audit's accuracy first and last, the
step the drift rule would have fired and the step the monitor rule did); then each mode's held-out gold of the final
PPO and DPO policies (gains in SFT sd, 128 prompts no stage saw) with KL, the final 5 steps' training gold against
one round's peak, rounds run and labels used. Then the issue's targets, met or missed. A benchmark, not a test.
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
from launch.pipeline import run_pipeline  # noqa: E402
from rlhf_ray.config import load_config  # noqa: E402
from rlhf_ray.drift import monitor_disagrees  # noqa: E402
from rlhf_ray.metrics import moving_average  # noqa: E402

WORLDS = {"overopt": "configs/tiny_world_overopt.yaml", "standard": "configs/tiny_world.yaml"}
AUDITS = ["pipeline.audit_prompts=16", "pipeline.audit_every=5"]   # as configs/tiny_world_overopt.yaml
MODES = {"one": ["pipeline.rounds=1", "pipeline.label_prompts=384", "pipeline.keep_trusted=false"],
         "one_trusted": ["pipeline.rounds=1", "pipeline.label_prompts=384"],
         "rounds": ["pipeline.rounds=3", "pipeline.label_prompts=192", "pipeline.round_labels=96"],
         "on_drift": ["pipeline.rounds=3", "pipeline.label_prompts=192", "pipeline.round_labels=96",
                      "pipeline.refresh=on_drift"],
         "rounds_warm": ["pipeline.rounds=3", "pipeline.label_prompts=192", "pipeline.round_labels=96",
                         "pipeline.rm_refresh=warm"]}
FAST = ["pipeline.best_of_n=[4]", "logging.wandb.mode=disabled"]
WINDOW = 5


def curve(run: Path, rounds: list[dict]) -> list[dict]:
    """Every round's PPO metrics rows on one step axis."""
    rows, offset = [], 0
    for r in rounds:
        name = "ppo" if r["round"] == 1 else f"ppo_r{r['round']}"
        part = [json.loads(line) for line in (run / name / "metrics.jsonl").read_text().splitlines()]
        rows += [{**x, "step": x["step"] + offset} for x in part]
        offset += len(part)
    return rows


def one_run(seed: int, world: str, mode: str, out: Path, extra: list[str], resume: bool) -> dict:
    import ray
    run = out / f"seed{seed}" / f"{world}-{mode}"
    cfg = load_config(WORLDS[world], [f"run.seed={seed}", f"run.output_dir={run}",
                                      f"pipeline.world_dir={out}/seed{seed}/world", *AUDITS, *MODES[mode], *FAST,
                                      *extra])
    s = run_pipeline(cfg, resume=resume)
    ray.shutdown()                     # the next run starts on a fresh local cluster
    ev, sd = s["eval"], max(s["eval"]["sft"]["gold_sd"], 1e-8)
    rows = curve(run, s["rounds"])
    gold = moving_average([r["gold/mean"] for r in rows], WINDOW)
    proxy = moving_average([r["reward/score_mean"] for r in rows], WINDOW)
    peak = max(range(len(gold)), key=gold.__getitem__)
    audits = [r for r in rows if "audit/accuracy" in r]
    drift = next((r["step"] for r in rows if r.get("audit/drift")), None)
    mon = [r.get("monitor/score_mean") for r in rows]
    raw = [r["reward/score_mean"] for r in rows]
    monitor = next((i + 1 for i in range(len(rows)) if mon[0] is not None
                    and monitor_disagrees(raw[:i + 1], mon[:i + 1], 2 * WINDOW)), None)
    return {"ppo_gain": (ev["ppo"]["gold_mean"] - ev["sft"]["gold_mean"]) / sd, "ppo_kl": ev["ppo"]["kl_to_sft"],
            "dpo_gain": (ev["dpo"]["gold_mean"] - ev["sft"]["gold_mean"]) / sd, "dpo_kl": ev["dpo"]["kl_to_sft"],
            "sft_gold": ev["sft"]["gold_mean"], "sft_sd": sd,
            "peak_gold": gold[peak], "peak_step": rows[peak]["step"], "end_gold": gold[-1],
            "drop_sd": (gold[peak] - gold[-1]) / sd, "proxy_after_peak": proxy[-1] - proxy[peak],
            "audit_first": audits[0]["audit/accuracy"] if audits else float("nan"),
            "audit_last": statistics.mean(r["audit/accuracy"] for r in audits[-2:]) if audits else float("nan"),
            "audit_gold_first": audits[0].get("audit/gold_accuracy", float("nan")) if audits else float("nan"),
            "audit_gold_last": statistics.mean(r["audit/gold_accuracy"] for r in audits[-2:]) if audits else float("nan"),
            "drift_step": drift or 0, "monitor_step": monitor or 0, "rounds": len(s["rounds"]),
            "labels": s["labels_used"]["ppo"], "dpo_labels": s["labels_used"]["dpo"],
            "seconds": s["seconds"]["total"], "ended": [r["stopped"] for r in s["rounds"]],
            "kept": s["rounds"][-1].get("kept") or 0}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--worlds", nargs="+", default=list(WORLDS), choices=list(WORLDS))
    ap.add_argument("--modes", nargs="+", default=["one", "one_trusted", "rounds", "on_drift"], choices=list(MODES))
    ap.add_argument("--out", default="runs/bench-rounds")
    ap.add_argument("--set", dest="extra", action="append", default=[])
    ap.add_argument("--resume", action="store_true", help="keep each run's finished stages (the pipeline's --resume; "
                    "a run under another config is refused): only after a change that touches none of them")
    args = ap.parse_args()
    out = ROOT / args.out
    res: dict[tuple[str, str], dict[int, dict]] = {}
    for seed in args.seeds:
        for world in args.worlds:
            for mode in args.modes:
                r = one_run(seed, world, mode, out, args.extra, args.resume)
                res.setdefault((world, mode), {})[seed] = r
                print(f"seed {seed} {world} {mode}: {json.dumps(r)}", flush=True)
    lines = [f"The closed loop against one pass, seeds {', '.join(map(str, args.seeds))}.", ""]
    checks = []
    for world in args.worlds:
        one = res.get((world, "one"))
        if one:
            lines += [f"### {world}: one round, its PPO curve (training gold, {WINDOW}-step average; steps 1..45)", ""]
            lines += seed_table(one, [
                ("sft_gold", "SFT gold", "{:.3f}"), ("peak_gold", "gold peak", "{:.3f}"), ("peak_step", "at step", "{:.0f}"),
                ("end_gold", "gold at the end", "{:.3f}"), ("drop_sd", "fall from the peak (SFT sd)", "{:+.2f}"),
                ("proxy_after_peak", "proxy's rise after gold's peak", "{:+.3f}"),
                ("audit_first", "audit acc first", "{:.2f}"), ("audit_last", "audit acc last 2", "{:.2f}"),
                ("audit_gold_first", "RM vs gold first", "{:.2f}"), ("audit_gold_last", "RM vs gold last 2", "{:.2f}"),
                ("drift_step", "drift rule fired at (0: never)", "{:.0f}"),
                ("monitor_step", "monitor rule fired at (0: never)", "{:.0f}")]) + [""]
            falls = [r for r in one.values() if r["drop_sd"] > 0.1 and r["proxy_after_peak"] > 0]
            if world == "overopt":
                checks += [(len(falls) >= 2, f"{world}, one round: gold peaks and falls (> 0.1 SFT sd) while the proxy "
                                             f"rises, on {len(falls)} of {len(one)} seeds (target >= 2 of 3)"),
                           (all(r["audit_last"] < r["audit_first"] for r in one.values()),
                            f"{world}, one round: the audit's accuracy falls on every seed"),
                           (all(r["drift_step"] for r in one.values()),
                            f"{world}, one round: the drift rule fires on every seed"),
                           (all(r["monitor_step"] for r in one.values()),
                            f"{world}, one round: the monitor rule fires on every seed")]
        lines += [f"### {world}: one round against the loop, equal labels and PPO steps", ""]
        cols = [("ppo_gain", "PPO gold gain (SFT sd)", "{:+.2f}"), ("ppo_kl", "PPO KL", "{:.2f}"),
                ("end_gold", "training gold, last 5 steps", "{:.3f}"), ("dpo_gain", "DPO gold gain", "{:+.2f}"),
                ("dpo_kl", "DPO KL", "{:.2f}"), ("rounds", "rounds", "{:.0f}"), ("labels", "PPO labels", "{:.0f}"),
                ("dpo_labels", "DPO labels", "{:.0f}"), ("kept", "last round kept step (0: all)", "{:.0f}"),
                ("seconds", "wall s", "{:.0f}")]
        for mode in args.modes:
            if (world, mode) in res:
                lines += [f"**{mode}**", ""] + seed_table(res[(world, mode)], cols) + [""]
                if mode != "one":
                    lines += ["Rounds ended by: " + "; ".join(
                        f"seed {seed}: " + ", ".join(e or "its steps" for e in r["ended"])
                        for seed, r in res[(world, mode)].items()), ""]
        mean = lambda mode, key: statistics.mean(r[key] for r in res[(world, mode)].values())  # noqa: E731
        sd = lambda mode, key: statistics.stdev([r[key] for r in res[(world, mode)].values()]) \
            if len(res[(world, mode)]) > 1 else 0.0  # noqa: E731
        for mode in (m for m in ("one_trusted", "rounds", "on_drift", "rounds_warm") if (world, m) in res and one):
            if world == "overopt":
                checks += [(mean(mode, "ppo_gain") >= mean("one", "ppo_gain") + 0.3,
                            f"{world}, {mode}: final PPO gain {mean(mode, 'ppo_gain'):+.2f} >= one round's "
                            f"{mean('one', 'ppo_gain'):+.2f} + 0.3 SFT sd"),
                           (mean(mode, "end_gold") >= mean("one", "peak_gold"),
                            f"{world}, {mode}: final training gold {mean(mode, 'end_gold'):.3f} >= one round's peak "
                            f"{mean('one', 'peak_gold'):.3f}"),
                           (mean(mode, "dpo_gain") >= mean("one", "dpo_gain") + 0.3,
                            f"{world}, {mode}: iterative DPO's gain {mean(mode, 'dpo_gain'):+.2f} >= one-pass DPO's "
                            f"{mean('one', 'dpo_gain'):+.2f} + 0.3 SFT sd")]
            else:
                spread = max(sd(mode, "ppo_gain"), sd("one", "ppo_gain"))
                dspread = max(sd(mode, "dpo_gain"), sd("one", "dpo_gain"))
                checks += [(mean(mode, "ppo_gain") >= mean("one", "ppo_gain") - spread,
                            f"{world}, {mode}: PPO gain {mean(mode, 'ppo_gain'):+.2f} not below one round's "
                            f"{mean('one', 'ppo_gain'):+.2f} by more than the spread ({spread:.2f})"),
                           (mean(mode, "dpo_gain") >= mean("one", "dpo_gain") - dspread,
                            f"{world}, {mode}: DPO gain {mean(mode, 'dpo_gain'):+.2f} not below one-pass DPO's "
                            f"{mean('one', 'dpo_gain'):+.2f} by more than the spread ({dspread:.2f})")]
    lines += [f"- [{'met' if ok else 'MISSED'}] {text}" for ok, text in checks]
    lines += ["", f"Configs: {', '.join(WORLDS[w] for w in args.worlds)} with {' '.join(AUDITS + FAST + args.extra)}; "
              + "; ".join(f"{m}: {' '.join(v)}" for m, v in MODES.items() if m in args.modes),
              f"{cpu_model()}, {os.cpu_count()} cores; OMP_NUM_THREADS=1; {datetime.date.today()}; "
              f"commit {git_commit()}."]
    publish("\n".join(lines), out / "rounds.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
