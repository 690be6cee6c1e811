"""KTO on thumbs against DPO on rankings, over the same judged answers, at a bounded KL.

    .venv/bin/python benchmarks/kto.py [--seeds 0 1 2] [--runs runs/bench-tiny-world] [--betas 0.1 0.3 0.5 1.0]

Reads the tiny world's pipeline runs of benchmarks/tiny_world.py (<runs>/seed<N>/simulated; where one is missing,
the pipeline runs here first with PPO cut to one step, which comes after all that is used): their SFT model, the label stage's answers (label_prompts x K answers of the SFT model, ranked by
simulated labelers), the evaluation prompts and the proxy RM. On those very answers:

    DPO   on the rankings (each prompt's C(K, 2) pairs), the dpo section of the run's config
    KTO   on thumbs: each answer's noisy gold (the labelers' noise) against the median gold of all of them
          (rlhf_ray/tiny_world/gold.py simulated_thumbs), the kto section (as many answers a step as DPO)

both from the SFT model, the reference the SFT model, at each beta of --betas; every model evaluated as the pipeline
evaluates (gold and KL to SFT on the held-out prompts, launch/pipeline.py evaluate). Per method and seed the gold
gain (in SFT sd) at <= --kl-bound nats is the best gain among its betas whose KL stays within the bound.
Writes <runs>/kto.md. A benchmark, not a test.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_NUM_THREADS", "1")
from benchmarks.machine import cpu_model, git_commit  # noqa: E402
from benchmarks.tables import publish  # noqa: E402

METHODS = ("dpo", "kto")


def one_seed(run: Path, seed: int, betas: list[float]) -> dict:
    """{method: {beta: {gain, kl}}, thumbs_up, answers} for one seed's run."""
    from actors.group import RankGroup
    from actors.reward import RewardActor
    from launch.answers import Sampler, write_jsonl
    from launch.common import actor_env, cluster_device, start_ray
    from launch.pipeline import evaluate
    from launch.stages import run_stage
    from rlhf_ray.config import derive, load_config
    from rlhf_ray.data import read_jsonl
    from rlhf_ray.models import load_tokenizer
    from rlhf_ray.tiny_world.gold import GOLDS, simulated_thumbs
    if not (run / "summary.json").is_file():          # none from benchmarks/tiny_world.py: run the pipeline here,
        from launch.pipeline import run_pipeline      # PPO cut to one step (SFT and the labels come before it)
        run_pipeline(load_config(str(ROOT / "configs" / "tiny_world.yaml"), [
            f"run.seed={seed}", f"run.output_dir={run}", f"pipeline.world_dir={run.parent}/world", "train.steps=1",
            "pipeline.best_of_n=[2]"]))
    sft, data, out = str(run / "sft"), run / "data", run / "kto_bench"
    if (out / "result.json").is_file():                # measured before (delete it to measure again)
        res = json.loads((out / "result.json").read_text())
        if all(f"{b}" in res["dpo"] for b in betas):
            return {**res, **{m: {float(b): v for b, v in res[m].items()} for m in METHODS}}
    # the stages' settings as configs/tiny_world.yaml has them now (the run's own dump may predate KTO), its seed
    cfg = load_config(str(ROOT / "configs" / "tiny_world.yaml"), [f"run.seed={seed}", f"run.output_dir={out}"])
    rankings = [row for _, row in read_jsonl(data / "label_rankings.jsonl")]
    thumbs = simulated_thumbs(rankings, random.Random(cfg.run.seed + 7), cfg.pipeline.labeler_noise,
                              GOLDS[cfg.pipeline.gold])
    out.mkdir(parents=True, exist_ok=True)
    thumbs_path = write_jsonl(out / "thumbs.jsonl", thumbs)
    device = cluster_device(cfg, cfg.policy.gpus_per_rank)
    start_ray(cfg, extra_cpus=cfg.engine.cpus_per_rank + cfg.reward.cpus_per_rank)
    models = {}
    for beta in betas:
        for method, path in (("dpo", data / "label_rankings.jsonl"), ("kto", thumbs_path)):
            name = f"{method}_b{beta:g}"
            done = out / name / "model.safetensors"
            models[name] = str(out / name) if done.is_file() else run_stage(derive(cfg, {
                f"{method}.data": str(path), f"{method}.model": sft, f"{method}.reference": "",
                f"{method}.beta": beta, f"{method}.output": str(out / name)}), method)["model"]
    eval_cfg = derive(cfg, {"models.policy": sft, "models.reward": str(run / "rm"), "models.monitor": None})
    sampler = Sampler.start(eval_cfg, out, device)
    reward = RankGroup(RewardActor, "eval-reward", 1, cfg.reward.cpus_per_rank, cfg.reward.gpus_per_rank,
                       (eval_cfg, device), distributed=cfg.reward.zero_stage == 3,
                       runtime_env={"env_vars": actor_env(device)})
    try:
        ev, _ = evaluate(eval_cfg, sampler, reward, load_tokenizer(sft), str(data / "eval_prompts.jsonl"),
                         {"sft": sft, **models}, sft)
    finally:
        reward.shutdown()
        sampler.group.shutdown()
    base = ev["sft"]
    res = {m: {b: {"gain": (ev[f"{m}_b{b:g}"]["gold_mean"] - base["gold_mean"]) / max(base["gold_sd"], 1e-8),
                   "kl": ev[f"{m}_b{b:g}"]["kl_to_sft"]} for b in betas} for m in METHODS}
    res["thumbs_up"] = sum(t["label"] for t in thumbs) / len(thumbs)
    res["answers"] = len(thumbs)
    (out / "result.json").write_text(json.dumps(res, indent=1))
    return res


def at_bound(per_beta: dict, bound: float) -> tuple[float | None, float | None]:
    """(gain, beta) of the best gain among the betas whose KL is within `bound`; (None, None) if none is."""
    inside = [(v["gain"], b) for b, v in per_beta.items() if v["kl"] <= bound]
    return max(inside) if inside else (None, None)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--runs", default="runs/bench-tiny-world")
    ap.add_argument("--betas", type=float, nargs="+", default=[0.1, 0.3, 0.5, 1.0])
    ap.add_argument("--kl-bound", type=float, default=2.0)
    args = ap.parse_args()
    runs = Path(args.runs)
    results = {s: one_seed(runs / f"seed{s}" / "simulated", s, args.betas) for s in args.seeds}
    lines = [f"# KTO on thumbs against DPO on rankings, the same answers ({cpu_model()}, commit {git_commit()}, "
             f"{datetime.date.today()}, OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']})", "",
             "Gold gain in SFT sd, KL to SFT in nats/sequence, on the held-out prompts; both from the SFT model on "
             f"the label stage's answers. Gain at <= {args.kl_bound:g} nats: the best over the betas within it.", "",
             "| seed | answers | thumbs up | " + " | ".join(f"{m.upper()} β {b:g}: gain / KL" for m in METHODS
                                                       for b in args.betas)
             + f" | DPO at ≤ {args.kl_bound:g} | KTO at ≤ {args.kl_bound:g} | KTO ÷ DPO |",
             "|" + "---|" * (4 + 2 * len(args.betas) + 2)]
    ratios, at = [], {m: [] for m in METHODS}
    for s, r in results.items():
        best = {m: at_bound({b: r[m][b] for b in args.betas}, args.kl_bound) for m in METHODS}
        for m in METHODS:
            if best[m][0] is not None:
                at[m].append(best[m][0])
        ratio = best["kto"][0] / best["dpo"][0] if best["kto"][0] is not None and best["dpo"][0] else None
        if ratio is not None:
            ratios.append(ratio)
        cell = lambda g: "none within" if g[0] is None else f"{g[0]:+.2f} (β {g[1]:g})"   # noqa: E731
        lines.append(f"| {s} | {r['answers']} | {r['thumbs_up']:.2f} | "
                     + " | ".join(f"{r[m][b]['gain']:+.2f} / {r[m][b]['kl']:.2f}" for m in METHODS for b in args.betas)
                     + f" | {cell(best['dpo'])} | {cell(best['kto'])} | "
                     + ("–" if ratio is None else f"{ratio:.2f}") + " |")
    sd = lambda v: statistics.stdev(v) if len(v) > 1 else 0.0                # noqa: E731
    summary = [f"{m.upper()} at ≤ {args.kl_bound:g} nats: {statistics.mean(v):+.2f} ± {sd(v):.2f} over {len(v)} "
               f"seeds" for m, v in at.items() if v]
    if ratios:
        summary.append(f"KTO ÷ DPO at ≤ {args.kl_bound:g} nats: {statistics.mean(ratios):.2f} ± {sd(ratios):.2f} "
                       f"(per seed: {', '.join(f'{x:.2f}' for x in ratios)})")
    publish("\n".join(lines + [""] + [f"- {x}" for x in summary]), runs / "kto.md")


if __name__ == "__main__":
    main()
