"""QLoRA against LoRA and full fine-tuning: the policy's and reference's memory at two model sizes, and PPO's gold
gain in the tiny world over several seeds, each at the KL it reached.

    .venv/bin/python benchmarks/qlora.py [--part memory gold] [--seeds 0 1 2] [--steps 45]

memory: per size (17M: hidden 512 x 6 layers, 107M: 1024 x 10; seeded random weights, the tiny world's tokenizer)
and variant, a 2-step GRPO run (4 prompts x 2 answers, 16 new tokens, fp32, one policy rank, every role in its own
process) launched as `rlhf-ray ppo` launches it; then of each actor (actors/base.py RankActor.memory), above its own
idle process (as it started: its role module imported, no model): the peak RSS (the high-water mark, which counts
the safetensors file's pages read through mmap while loading), and the anonymous memory resident after the steps
(file pages left out; what the allocator kept counts). Both include the imports an actor makes after it starts
(DeepSpeed, transformers, peft; bitsandbytes for the quantised ones), measured alone in a bare process. Variants:
  full       the policy fully trained, a reference actor holding the model again
  lora       policy.lora.rank 8, a reference actor holding the model again
  lora-base  LoRA with reference.from_policy_base: no reference actor
  qlora      policy.quantization nf4 + LoRA with reference.from_policy_base
  qlora-ref  QLoRA, the reference its own actor, quantised too (reference.quantization nf4)

gold: per seed, the tiny world's SFT policy and reward model (runs/bench-tiny-world/seed<N>/simulated, built by
benchmarks/tiny_world.py if absent), then configs/tiny_world.yaml's PPO (adaptive KL toward 1.7 nats, 45 steps)
three ways: full (lr 1e-4, as the pipeline), lora and qlora (rank 8, alpha 16, lr 1e-3, the reference the policy's
base). Gold gain: gold of the rollouts over the last 5 steps minus the full run's first step (the SFT policy's
samples), in units of that step's gold sd; the KL is kl/ref_per_seq over the same steps (for qlora, KL to its
4-bit base). Training prompts, not held-out ones. Writes runs/bench-qlora/qlora.md. A benchmark, not a test.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.machine import cpu_model, git_commit  # noqa: E402
from benchmarks.tables import publish, seed_table  # noqa: E402

OUT = ROOT / "runs" / "bench-qlora"
SIZES = {"17M": (512, 6), "107M": (1024, 10)}
LORA = ["policy.lora.rank=8", "policy.lora.alpha=16"]
MEMORY_VARIANTS = {
    "full": [],
    "lora": LORA,
    "lora-base": LORA + ["reference.from_policy_base=true"],
    "qlora": LORA + ["policy.quantization=nf4", "reference.from_policy_base=true"],
    "qlora-ref": LORA + ["policy.quantization=nf4", "reference.quantization=nf4"],
}
GOLD_VARIANTS = {
    "full": [],
    "lora": LORA + ["policy.lr=1e-3", "reference.from_policy_base=true"],
    "qlora": LORA + ["policy.lr=1e-3", "reference.from_policy_base=true", "policy.quantization=nf4"],
}
WINDOW = 5
MiB = 2 ** 20


# ------------------------------------------------------------------------------------------------ memory

def memory_one(size: str, variant: str) -> None:
    """In a process of its own: one short run, the actors kept; prints each role's memory as one JSON line."""
    from benchmarks.vs_trl import build_models
    from launch.ppo import train
    from rlhf_ray.config import load_config
    d = build_models(size, SIZES[size], OUT / "models")
    run_dir = OUT / "memory" / f"{size}-{variant}"
    sets = [f"models.policy={d / 'policy'}", f"models.reward={d / 'reward'}", f"data.prompts={d / 'prompts.jsonl'}",
            f"run.output_dir={run_dir}", "train.steps=2", "train.dtype=float32", "ppo.advantage=grpo",
            "generation.prompts_per_step=4", "generation.n=2", "generation.max_new_tokens=16", "ppo.minibatch_size=8",
            "policy.micro_batch_size=8", "policy.num_ranks=1", "placement.share_process=[]", "checkpoint.every=0",
            "logging.wandb.enabled=false", "guard.max_kl_per_token=null", "data.apply_chat_template=false",
            *MEMORY_VARIANTS[variant]]
    summary = train(load_config("configs/tiny_ppo.yaml", sets), keep_actors=True)
    actors = summary["actors"]
    try:
        import ray
        out = {role: ray.get(g.actors[0].memory.remote()) for role, g in actors.groups().items()
               if role in ("policy", "reference")}
        out["params"] = ray.get(actors.policy.actors[0].parameter_counts.remote())
    finally:
        actors.shutdown()
    print("MEMORY " + json.dumps(out), flush=True)


def memory_rows() -> dict[str, dict[str, dict]]:
    rows: dict[str, dict[str, dict]] = {}
    for size in SIZES:
        for variant in MEMORY_VARIANTS:
            out = subprocess.run([sys.executable, __file__, "--memory-one", size, variant], cwd=ROOT,
                                 env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
            line = next((x for x in out.stdout.splitlines() if x.startswith("MEMORY ")), None)
            if out.returncode or line is None:
                sys.exit(f"memory run {size} {variant} failed:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")
            m = json.loads(line[len("MEMORY "):])
            r = {"trainable": m["params"]["trainable"], "total_params": m["params"]["total"]}
            for role in ("policy", "reference"):
                idle, now = (m[role]["idle"], m[role]["now"]) if role in m else ({}, {})
                r[f"{role}_peak"] = (now["peak"] - idle["rss"]) / MiB if role in m else 0.0
                r[f"{role}_anon"] = (now["anon"] - idle["anon"]) / MiB if role in m else 0.0
            r["peak"], r["anon"] = r["policy_peak"] + r["reference_peak"], r["policy_anon"] + r["reference_anon"]
            rows.setdefault(size, {})[variant] = r
            print(f"{size} {variant}: " + ", ".join(f"{k} {v:.0f}" for k, v in r.items()), flush=True)
    return rows


IMPORTS = """
import json, sys
sys.path.insert(0, sys.argv[1])
from actors.base import memory_status
import actors.policy  # what an idle policy actor has imported
out = [memory_status()["rss"]]
import deepspeed, transformers, peft  # noqa: E401  (every trained role's, after it starts)
out.append(memory_status()["rss"])
import bitsandbytes  # noqa: F401  (a quantised role's)
out.append(memory_status()["rss"])
print(json.dumps(out))
"""


def import_costs() -> tuple[float, float]:
    """MiB an actor's later imports add in a bare process: DeepSpeed + transformers + peft, then bitsandbytes."""
    out = subprocess.run([sys.executable, "-c", IMPORTS, str(ROOT)], capture_output=True, text=True, check=True)
    a, b, c = json.loads(out.stdout.splitlines()[-1])
    return (b - a) / MiB, (c - b) / MiB


def memory_report(rows) -> list[str]:
    lines = ["| size | variant | trainable params | policy: peak RSS / anon resident (MiB) | reference: peak / anon "
             "(MiB) | both: peak / anon (MiB) | both vs full: peak / anon |", "|---|---|---|---|---|---|---|"]
    for size, by in rows.items():
        for v, r in by.items():
            full = by["full"]
            lines.append(f"| {size} ({r['total_params'] / 1e6:.0f} M) | {v} | {r['trainable']:,} | "
                         f"{r['policy_peak']:.0f} / {r['policy_anon']:.0f} | "
                         f"{r['reference_peak']:.0f} / {r['reference_anon']:.0f} | {r['peak']:.0f} / {r['anon']:.0f} | "
                         f"{r['peak'] / full['peak']:.2f}× / {r['anon'] / full['anon']:.2f}× |")
    trained, bnb = import_costs()
    return lines + ["", f"Imports after an actor starts, in a bare process: DeepSpeed + transformers + peft "
                        f"{trained:.0f} MiB, bitsandbytes {bnb:.0f} MiB more (peft imports it when installed; in every policy "
                        "figure above)."]


# ------------------------------------------------------------------------------------------------ gold

def world_run(seed: int) -> Path:
    """The seed's pipeline run (SFT policy, RM, PPO prompts): benchmarks/tiny_world.py's, built if absent."""
    for d in (ROOT / "runs" / "bench-tiny-world" / f"seed{seed}" / "simulated",
              ROOT / "runs" / "bench-tiny-world" / f"seed{seed}"):
        if (d / "sft" / "model.safetensors").is_file() and (d / "rm" / "model.safetensors").is_file():
            return d
    subprocess.run([sys.executable, "benchmarks/tiny_world.py", "--seeds", str(seed)], cwd=ROOT, check=True)
    return ROOT / "runs" / "bench-tiny-world" / f"seed{seed}"


def gold_one(seed: int, variant: str, steps: int) -> None:
    """In a process of its own: the seed's PPO run as the pipeline runs it, with the variant's changes."""
    from launch.ppo import train
    from rlhf_ray.config import load_config
    from rlhf_ray.tiny_world.gold import gold_score
    w = world_run(seed)
    sets = [f"models.policy={w / 'sft'}", f"models.reward={w / 'rm'}", f"data.prompts={w / 'data' / 'ppo_prompts.jsonl'}",
            f"run.output_dir={OUT / 'gold' / f'seed{seed}' / variant}", f"run.seed={seed}", f"train.steps={steps}",
            "logging.wandb.enabled=false", *GOLD_VARIANTS[variant]]
    train(load_config("configs/tiny_world.yaml", sets), gold_fn=gold_score)


def gold_rows(seeds: list[int], steps: int, reuse: list[str]) -> dict[int, dict]:
    rows = {}
    for seed in seeds:
        world_run(seed)
        metrics = {}
        for variant in GOLD_VARIANTS:
            run_dir = OUT / "gold" / f"seed{seed}" / variant
            done = run_dir / "metrics.jsonl"
            if variant in reuse and done.is_file() and len(done.read_text().splitlines()) == steps:
                metrics[variant] = [json.loads(line) for line in done.read_text().splitlines()]
                continue
            shutil.rmtree(run_dir, ignore_errors=True)
            out = subprocess.run([sys.executable, __file__, "--gold-one", str(seed), variant, "--steps", str(steps)],
                                 cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
            if out.returncode:
                sys.exit(f"gold run seed {seed} {variant} failed:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")
            metrics[variant] = [json.loads(line) for line in done.read_text().splitlines()]
        start = metrics["full"][0]
        r = {"sft_gold": start["gold/mean"]}
        for variant, ms in metrics.items():
            last = ms[-WINDOW:]
            r[f"{variant}_start"] = (ms[0]["gold/mean"] - start["gold/mean"]) / start["gold/std"]
            r[f"{variant}_gain"] = (statistics.mean(m["gold/mean"] for m in last) - start["gold/mean"]) / start["gold/std"]
            r[f"{variant}_kl"] = statistics.mean(m["kl/ref_per_seq"] for m in last)
            r[f"{variant}_step_s"] = statistics.median(m["time/step"] for m in ms[2:])
            r[f"{variant}_gap"] = max(m["rollout/logprob_diff_max"] for m in ms)
        rows[seed] = r
        print(f"seed {seed}: " + ", ".join(f"{k} {v:.3f}" for k, v in r.items()), flush=True)
    return rows


def gold_report(rows) -> list[str]:
    cols = []
    for v in GOLD_VARIANTS:
        cols += [(f"{v}_gain", f"{v} gold gain (SFT sd)", "{:+.2f}"), (f"{v}_kl", f"{v} KL", "{:.2f}")]
    costs = [(f"{v}_start", f"{v} step-1 gold vs SFT", "{:+.3f}") for v in GOLD_VARIANTS] + \
            [(f"{v}_step_s", f"{v} step s", "{:.2f}") for v in GOLD_VARIANTS] + \
            [(f"{v}_gap", f"{v} logprob gap max", "{:.1e}") for v in GOLD_VARIANTS]
    return seed_table(rows, cols) + [""] + seed_table(rows, costs)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", nargs="+", choices=["memory", "gold"], default=["memory", "gold"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=45)
    ap.add_argument("--reuse", nargs="*", default=[], choices=list(GOLD_VARIANTS),
                    help="gold: keep these variants' finished runs (all their steps logged) instead of running them again")
    ap.add_argument("--memory-one", nargs=2, metavar=("SIZE", "VARIANT"), help=argparse.SUPPRESS)
    ap.add_argument("--gold-one", nargs=2, metavar=("SEED", "VARIANT"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.memory_one:
        memory_one(*a.memory_one)
        return 0
    if a.gold_one:
        gold_one(int(a.gold_one[0]), a.gold_one[1], a.steps)
        return 0
    lines = [f"Machine: {cpu_model()}, {os.cpu_count()} cores; {datetime.date.today()}; commit {git_commit()}.", ""]
    if "memory" in a.part:
        lines += ["Memory above each actor's idle process, 2 GRPO steps, fp32:", "", *memory_report(memory_rows()), ""]
    if "gold" in a.part:
        lines += [f"PPO gold gain in the tiny world, {a.steps} steps, at each run's KL (last {WINDOW} steps):", "",
                  *gold_report(gold_rows(a.seeds, a.steps, a.reuse))]
    publish("\n".join(lines), OUT / "qlora.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
