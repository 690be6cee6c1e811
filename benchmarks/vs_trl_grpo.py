"""GRPO against TRL 1.12's GRPOTrainer, side by side on this box: the workload most users start with.

    .venv/bin/python benchmarks/vs_trl_grpo.py [--seeds 0 1 2] [--steps 30 100]

The tiny world (rlhf_ray/tiny_world/world.py, built once under runs/bench-vs-trl-grpo/world: a 0.6 M-parameter Qwen2 policy and
its prompts), the same for every system and seed. Workload (WORKLOAD below): 32 prompts x 4 samples x up to 24 new
tokens a step, GRPO advantages (group mean and std), KL to the reference as a loss (k3, beta 0.05),
seq-mean-token-mean, learning rate 2e-4, one pass in two minibatches of 64, no EOS penalty; reward: the tiny
world's gold rule + 0.2 x ends-with-period. Systems, each run as a user runs it, one after the other:

    TRL         GRPOTrainer (benchmarks/trl_grpo_peer.py, its own venv .venv-trl made on first use), fp32, CPU,
                one process, OMP_NUM_THREADS=2 (the box's two cores); it generates with HF generate
    sync        rlhf-ray, configs/tiny_grpo.yaml, synchronous (rollout.max_staleness 0), the hybrid layout: policy,
                engine, reference and reward in one process on both cores (two threads), weights loaded in place
    off-policy  one step off-policy (rollout.max_staleness 1, truncated importance weights, C = 2): the engine in a
                process of its own on core 0 (it samples step s+1 while the step s trains), policy, reference and
                reward in one process on core 1, one thread each

Per seed and system: runs of each --steps length; the median step and tokens/s (completion tokens over the steps'
wall time, steps 2..N-1) from the longest run, the whole run's wall time from the command's start to its exit for
each length, and gold (the gold rule's mean over the last 5 steps' samples). Writes runs/bench-vs-trl-grpo/grpo.md.
A benchmark, not a test: nothing here is in .ci/run.

Step spans, alike on both sides: contiguous wall-clock spans, one whole iteration of each system's training loop,
nothing left out between one step and the next.
    TRL         the on_step_end that closes one generation step (its `minibatches` optimizer steps) to the one that
                closes the next (benchmarks/trl_grpo_peer.py): batch fetch, generation, rewards, the optimizer
                steps, TRL's logging and save checks, callbacks.
    rlhf-ray    one step's start to the next step's start, `time/start` of consecutive metrics.jsonl rows
                (launch/ppo.py): rollout wait, scoring, advantages, training, weight sync, starting the next
                rollout, the metrics, logging (metrics.jsonl, the step line) and the divergence guard. Its own
                `time/step` stops before the metrics and is not used here.
rlhf-ray's last step has no next start, so both sides' figures (step, tokens/s) are over steps 2..N-1 (step 1
warms up); gold is over the last 5 steps, N included, on both.

Sampling, alike and asserted: the TRL peer gets rlhf-ray's generation.{temperature, top_p, max_new_tokens} (from
the rlhf-ray config this runs) and top-k off (0), min-p off, repetition penalty 1; it reports the settings HF
generate used, read back from its trainer's generation config merged with the model's and transformers' defaults,
and every run stops unless they equal rlhf-ray's (its dumped config; top_k, min_p, repetition_penalty as its
engines ask vLLM: defaults, off) with no other logits processor on. rlhf-ray's engines sample with vLLM, TRL with
HF generate: the same distribution, not the same draws.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.machine import cpu_model, git_commit  # noqa: E402
from benchmarks.tables import publish, seed_table  # noqa: E402
from benchmarks.vs_trl import check_sampling, contiguous, ours_generation, ours_sampling, trl_python  # noqa: E402

OUT = ROOT / "runs" / "bench-vs-trl-grpo"
PROMPTS, N, MAX_NEW, LR, BETA, MINIBATCHES = 32, 4, 24, 2e-4, 0.05, 2
WORKLOAD = [f"generation.prompts_per_step={PROMPTS}", f"generation.n={N}", f"generation.max_new_tokens={MAX_NEW}",
            f"ppo.minibatch_size={PROMPTS * N // MINIBATCHES}", "ppo.epochs=1", f"policy.lr={LR}", f"ppo.kl_coef={BETA}",
            "ppo.missing_eos_penalty=0.0", "policy.num_ranks=1",
            # forwards and backwards in chunks of a whole minibatch, as TRL's per_device_train_batch_size here
            f"policy.micro_batch_size={PROMPTS * N // MINIBATCHES}", f"reference.micro_batch_size={PROMPTS * N // MINIBATCHES}"]
ROLES = ("policy", "engine", "reference", "reward")
MODES = {"sync": ["rollout.max_staleness=0", "placement.share_process=[[policy, engine, reference, reward]]",
                  *(f"{r}.cpu_cores=[0, 1]" for r in ROLES)],
         "off-policy": ["rollout.max_staleness=1", "ppo.is_correction=tis", "ppo.is_cap=2.0",
                        "placement.share_process=[[policy, reference, reward]]",
                        "engine.cpu_cores=[0]", *(f"{r}.cpu_cores=[1]" for r in ROLES if r != "engine")]}
LAST = 5


def world() -> Path:
    d = OUT / "world"
    if not (d / "policy" / "model.safetensors").is_file():
        from rlhf_ray.tiny_world.world import TinySpec, build_tiny_world
        build_tiny_world(d, TinySpec(seed=0))
    return d


def timed(cmd: list[str], env: dict) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.time()
    out = subprocess.run(cmd, cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"run failed: {' '.join(cmd[:4])} ...\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")
    return out, time.time() - t0


def run_trl(w: Path, seed: int, steps: int, gen: dict) -> dict:
    """One TRL run: its wall time, per generation step {"time" (on_step_end to on_step_end), "tokens", "gold"},
    and the sampling settings it read back from its trainer."""
    out, wall = timed([trl_python(), str(ROOT / "benchmarks" / "trl_grpo_peer.py"), "--policy", str(w / "policy"),
                       "--prompts", str(w / "prompts.jsonl"), "--steps", str(steps), "--prompts-per-step", str(PROMPTS),
                       "--n", str(N), "--minibatches", str(MINIBATCHES), "--max-new-tokens",
                       str(gen["max_new_tokens"]), "--temperature", str(gen["temperature"]), "--top-p",
                       str(gen["top_p"]), "--lr", str(LR), "--beta", str(BETA), "--seed", str(seed)],
                      {"OMP_NUM_THREADS": "2", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"})
    r = json.loads(out.stdout.strip().splitlines()[-1])
    if r["bf16"] or r["dtype"] != "torch.float32":
        sys.exit(f"TRL did not run in fp32 (bf16 {r['bf16']}, weights {r['dtype']})")
    return {"wall": wall, "sampling": r["sampling"],
            "steps": [{"time": t, "tokens": n, "gold": g}
                      for t, n, g in zip(r["step_seconds"], r["tokens"], r["gold"])]}


def ours_sets(w: Path, run_dir: Path, seed: int, steps: int, mode: str) -> list[str]:
    return [f"models.policy={w}/policy", f"data.prompts={w}/prompts.jsonl", f"run.output_dir={run_dir}",
            f"run.seed={seed}", f"train.steps={steps}", "checkpoint.every=0", "logging.wandb.enabled=false",
            "logging.samples_per_step=0", *WORKLOAD, *MODES[mode]]


def run_ours(w: Path, seed: int, steps: int, mode: str) -> dict:
    """One rlhf-ray run: its wall time, per step {"time" (this step's start to the next's; None on the last),
    "tokens", "gold"}, and the sampling settings it ran with."""
    run_dir = OUT / "runs" / f"seed{seed}-{mode}-{steps}"
    sets = ours_sets(w, run_dir, seed, steps, mode)
    cmd = [str(Path(sys.executable).parent / "rlhf-ray"), "ppo", "--config", "configs/tiny_grpo.yaml"]
    for s in sets:
        cmd += ["--set", s]
    _, wall = timed(cmd, {"OMP_NUM_THREADS": "1", "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled")})
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {"wall": wall, "sampling": ours_sampling(run_dir),
            "steps": [{"time": t, "tokens": r["response/length_mean"] * PROMPTS * N,
                       "gold": r["reward/source0_function_mean"]} for r, t in zip(rows, contiguous(rows))]}


def summary(runs: dict[int, dict]) -> dict:
    """The longest run's median step and tokens/s over steps 2..N-1, gold over its last LAST steps; each run's
    whole wall time."""
    longest = runs[max(runs)]["steps"]
    body = longest[1:-1]                 # step 1 warms up; rlhf-ray's step N has no next start: cut on both sides
    return {"step": statistics.median(s["time"] for s in body),
            "tokens_per_s": sum(s["tokens"] for s in body) / sum(s["time"] for s in body),
            "gold": statistics.mean(s["gold"] for s in longest[-LAST:]),
            **{f"wall_{n}": r["wall"] for n, r in runs.items()}}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, nargs="+", default=[30, 100],
                    help="run lengths (generation steps, at least 3: figures are over steps 2..N-1)")
    a = ap.parse_args()
    if min(a.steps) < 3:
        ap.error("--steps: each at least 3 (figures are over steps 2..N-1)")
    w = world()
    gen = ours_generation("configs/tiny_grpo.yaml", ours_sets(w, OUT / "runs" / "probe", 0, max(a.steps), "sync"))
    systems = ["TRL", *MODES]
    rows: dict[str, dict] = {}
    for seed in a.seeds:
        res = {name: {} for name in systems}
        for steps in a.steps:
            res["TRL"][steps] = run_trl(w, seed, steps, gen)
            for mode in MODES:
                res[mode][steps] = run_ours(w, seed, steps, mode)
                check_sampling(res[mode][steps]["sampling"], res["TRL"][steps]["sampling"])
        s = {name: summary(r) for name, r in res.items()}
        rows[seed] = {f"{name}_{k}": v for name, d in s.items() for k, v in d.items()}
        for name in MODES:
            rows[seed][f"{name}_tps_ratio"] = s[name]["tokens_per_s"] / s["TRL"]["tokens_per_s"]
            rows[seed][f"{name}_step_ratio"] = s[name]["step"] / s["TRL"]["step"]
            for n in a.steps:
                rows[seed][f"{name}_wall_ratio_{n}"] = s[name][f"wall_{n}"] / s["TRL"][f"wall_{n}"]
        print(json.dumps({"seed": seed, **rows[seed]}), flush=True)
    cols = [(f"{n}_step", f"{n} step (s)", "{:.2f}") for n in systems]
    cols += [(f"{n}_tokens_per_s", f"{n} tok/s", "{:.0f}") for n in systems]
    cols += [(f"{n}_tps_ratio", f"{n} tok/s ÷ TRL", "{:.2f}") for n in MODES]
    cols += [(f"{n}_wall_{k}", f"{n} wall {k} steps (s)", "{:.0f}") for k in a.steps for n in systems]
    cols += [(f"{n}_wall_ratio_{k}", f"{n} wall {k} ÷ TRL", "{:.2f}") for k in a.steps for n in MODES]
    cols += [(f"{n}_gold", f"{n} gold, last {LAST}", "{:.2f}") for n in systems]
    lines = seed_table(rows, cols)
    lines += ["", f"GRPO, tiny world (0.6 M policy), {PROMPTS} prompts x {N} samples x <= {MAX_NEW} tokens, k3 KL loss "
              f"beta {BETA}, lr {LR}, {MINIBATCHES} minibatches of {PROMPTS * N // MINIBATCHES}; step: median over steps "
              f"2-{max(a.steps) - 1} of contiguous spans (TRL: on_step_end to on_step_end; rlhf-ray: step start to "
              "the next step's start, its metrics, logging and guard inside); tokens/s: completion tokens over those "
              "steps' time; wall: command start to exit. Sampling, checked equal from each side's own config: "
              f"temperature {gen['temperature']:g}, top_p {gen['top_p']:g}, top-k and min-p off, no repetition "
              "penalty. "
              "TRL 1.12 GRPOTrainer: one process, 2 threads, HF generate. rlhf-ray: configs/tiny_grpo.yaml; sync: "
              "the hybrid layout, policy, engine, reference and reward in one process on both cores; off-policy: the "
              "engine alone on core 0, policy+reference+reward in one process on core 1.",
              f"{cpu_model()}, {os.cpu_count()} cores; {datetime.date.today().isoformat()}; commit {git_commit()}."]
    publish("\n".join(lines), OUT / "grpo.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
