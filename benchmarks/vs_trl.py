"""The PPO step against TRL 1.12's PPOTrainer, side by side on this box, at three model sizes.

    .venv/bin/python benchmarks/vs_trl.py [--sizes 0.6M 3M 17M] [--steps 8] [--rounds 1] [--bf16] [--no-async]
                                          [--set key=value ...]

Builds Qwen2 policy and scalar-head models of each size once (random init, the tiny world's 2,048-token BPE;
tied embeddings; heads of 64 dims), under runs/bench-vs-trl/<size>/, and the prompt token ids both systems
get. Then, per size and round, one after the other: TRL (its own virtual environment, .venv-trl, made here on
first use: TRL 1.12 is the last release with PPOTrainer and needs transformers 5.23, which our vLLM does not
allow), rlhf-ray at fp32 (FAST below), rlhf-ray in bf16 (BF16) where `train.dtype: auto` picks bf16 on this
machine (a measured matmul, rlhf_ray/hardware.py; or with --bf16), and rlhf-ray one step off-policy (ASYNC: the
engine samples step s+1 while step s trains, truncated importance weights) at the dtype auto picks. Same workload
everywhere: 32 prompts x 1 sample x up to 32 new tokens (stop at EOS), GAE
with a critic initialised from the reward model, 4 PPO epochs over one minibatch of 32, KL coefficient 0.05. Each
figure is the median over steps 2..N-1 of every round (step 1 warms up), phases alike. TRL runs with
OMP_NUM_THREADS=2, the box's two cores; rlhf-ray runs its actors with one thread each (policy and critic train
in parallel, one core each).

Step spans, alike on both sides: contiguous, one whole iteration of each system's training loop. TRL: from one
on_step_end to the next (benchmarks/trl_peer.py), so its metrics, logging and gc count. rlhf-ray: from one step's
start to the next's (`time/start` in consecutive metrics rows), so its metrics, logging, divergence guard and
the start of the next rollout count (its own `time/step` stops before them). rlhf-ray's last step has no next
start, so both sides' figures are over steps 2..N-1. Sampling: the peer reports the settings HF generate used
(merged with the model's and transformers' defaults); they must equal rlhf-ray's (temperature, top_p,
max_new_tokens from the config it ran; top_k, min_p, repetition_penalty as the engines ask vLLM: off) before
anything is reported (TRL's PPOTrainer adds 1e-7 to the temperature: allowed).

Training FLOP/s: the useful work of the train phase, 6 x parameters x tokens (prompt + rlhf-ray's mean response
length) x epochs for the policy and again for the critic, over the phase's seconds; the same numerator for both
systems (TRL also computes over the padding after EOS, not counted). Against the machine's peak at that dtype: the
one-thread matmul of rlhf_ray/hardware.py times the cores.

Prints one table (step time and phases per system, the ratios, weight sync's share of the step) and writes it to
runs/bench-vs-trl/vs_trl.md. A benchmark, not a test: nothing here is in .ci/run.
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
from benchmarks.peer_sampling import SAMPLING  # noqa: E402
from benchmarks.tables import publish  # noqa: E402
from rlhf_ray.hardware import SHAPE, fastest_dtype, matmul_ms  # noqa: E402

OUT = ROOT / "runs" / "bench-vs-trl"
TRL_VENV = ROOT / ".venv-trl"
TRL_PINS = ["torch==2.13.0", "trl==1.12.0", "transformers==5.23.0", "datasets==5.2.0", "accelerate==1.15.0",
            "requests"]    # GRPOTrainer imports its vLLM client module, which needs requests, even without vLLM
SIZES = {"0.6M": (128, 2), "3M": (256, 4), "17M": (512, 6)}       # hidden size, layers (MLP 2x hidden)
BATCH, RESPONSE, EPOCHS, KL = 32, 32, 4, 0.05
# fp32: the engines' logprobs equal the policy's (gap ~1e-6 nats), so they serve as pi_old. bf16: they differ by
# ~0.02-0.03 nats, so the policy recomputes pi_old. Micro-batches of 16, cut by length, trim better than one of 32.
FAST = ["ppo.reuse_sample_logprobs=true", "policy.micro_batch_size=16", "critic.micro_batch_size=16"]
BF16 = ["policy.micro_batch_size=16", "critic.micro_batch_size=16", "train.dtype=bfloat16",
        "train.attn_implementation=eager"]
ASYNC = ["rollout.max_staleness=1", "ppo.is_correction=tis", "policy.micro_batch_size=16",
         "critic.micro_batch_size=16"]
# TRL has no weight sync (it generates with its policy) and no logprobs phase (its score phase holds them)
PHASES = ["generate", "score", "logprobs", "train", "weight_sync"]


def trl_python() -> str:
    py = TRL_VENV / "bin" / "python"
    if not py.exists():
        print(f"making the TRL venv at {TRL_VENV} ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(TRL_VENV)], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", "-c", str(ROOT / "constraints.txt"), *TRL_PINS],
                       check=True)
    return str(py)


def ours_generation(config: str, sets: list[str]) -> dict:
    """generation.{temperature, top_p, max_new_tokens} of the rlhf-ray config `config` + `sets`: what the peer
    is given."""
    from rlhf_ray.config import load_config
    g = load_config(ROOT / config, sets).generation
    return {"temperature": g.temperature, "top_p": g.top_p, "max_new_tokens": g.max_new_tokens}


def ours_sampling(run_dir: Path) -> dict:
    """The sampling settings an rlhf-ray run used: generation.{temperature, top_p, max_new_tokens} from the config
    it dumped (run_dir/config.yaml), the rest read back from a vLLM SamplingParams built as actors/engine.py builds
    it (it sets only those three: top_k, min_p, repetition_penalty stay vLLM's defaults, all off)."""
    import yaml
    from vllm import SamplingParams
    g = yaml.safe_load((run_dir / "config.yaml").read_text())["generation"]
    p = SamplingParams(n=1, max_tokens=g["max_new_tokens"], temperature=g["temperature"], top_p=g["top_p"], logprobs=0)
    if p.presence_penalty or p.frequency_penalty:
        sys.exit(f"vLLM's default penalties are on (presence {p.presence_penalty}, frequency {p.frequency_penalty})")
    return {"do_sample": p.temperature > 0, "temperature": p.temperature, "top_p": p.top_p, "top_k": p.top_k,
            "min_p": p.min_p, "repetition_penalty": p.repetition_penalty, "max_new_tokens": p.max_tokens}


def sampling_mismatch(ours: dict, peer: dict, temperature_tol: float = 0.0) -> list[str]:
    """Where the peer's effective sampling settings (its `sampling`, read back from its trainer) differ from
    rlhf-ray's, one line each; empty: alike. "Off" is compared as off: top_k 0 or -1 (vLLM) and 0 (HF); min_p 0.0
    (vLLM) and None (HF: no min-p warper)."""
    def canon(k, v):
        if k == "top_k" and v in (-1, 0):
            return 0
        if k == "min_p" and v is None:
            return 0.0
        return v

    def alike(k, a, b):
        a, b = canon(k, a), canon(k, b)
        if k == "temperature" and isinstance(a, (int, float)) and isinstance(b, (int, float)):
            return abs(a - b) <= temperature_tol
        return a == b
    bad = [f"{k}: rlhf-ray {ours[k]!r}, TRL {peer.get(k)!r}" for k in SAMPLING if not alike(k, ours[k], peer.get(k))]
    if peer.get("other_filters"):
        bad.append(f"TRL samples with more logits processors on: {peer['other_filters']}")
    return bad


def check_sampling(ours: dict, peer: dict, temperature_tol: float = 0.0) -> None:
    bad = sampling_mismatch(ours, peer, temperature_tol)
    if bad:
        sys.exit("the two systems do not sample alike:\n  " + "\n  ".join(bad))


def contiguous(rows: list[dict]) -> list[float | None]:
    """rlhf-ray's per-step wall spans: each row's `time/start` to the next's (the whole step: metrics, logging,
    the guard included); None for the last row, whose end no row records."""
    if not rows or "time/start" not in rows[0]:
        sys.exit("metrics.jsonl rows carry no time/start (launch/ppo.py logs it): cannot time whole steps")
    starts = [r["time/start"] for r in rows]
    return [b - a for a, b in zip(starts, starts[1:])] + [None]


def build_models(size: str, shape: tuple[int, int] | None = None, out: Path = OUT) -> Path:
    """policy/ (causal LM + tokenizer), reward/ (scalar head), prompts.jsonl and prompt_ids.json, once, under
    out/size. shape: (hidden size, layers); None: SIZES[size]. Weights are a seeded random init."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen2ForSequenceClassification

    from rlhf_ray.prompts import render_prompts
    from rlhf_ray.tiny_world.world import corpus_text, make_prompts, train_tokenizer
    from rlhf_ray.config import DataConfig
    d = out / size
    if (d / "prompt_ids.json").exists():
        return d
    hidden, layers = shape or SIZES[size]
    text = corpus_text()
    tok = train_tokenizer(text, 2048)
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64, max_position_embeddings=512,
                      tie_word_embeddings=True, bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, dtype="float32")
    torch.manual_seed(0)
    lm = Qwen2ForCausalLM(cfg)
    lm.generation_config.eos_token_id, lm.generation_config.pad_token_id = tok.eos_token_id, tok.pad_token_id
    lm.save_pretrained(d / "policy")
    tok.save_pretrained(d / "policy")
    rm = Qwen2ForSequenceClassification(Qwen2Config(**{**cfg.to_dict(), "id2label": {0: "score"}}))
    rm.save_pretrained(d / "reward")
    tok.save_pretrained(d / "reward")
    prompts = make_prompts(text, 512, 0)
    (d / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    ids = render_prompts(tok, prompts[:BATCH], DataConfig(apply_chat_template=False))
    (d / "prompt_ids.json").write_text(json.dumps(ids))
    print(f"{size}: {sum(p.numel() for p in lm.parameters()) / 1e6:.1f} M params policy, written to {d}", flush=True)
    return d


def run_trl(d: Path, steps: int, gen: dict) -> tuple[list[dict], dict]:
    """One TRL run: per step {"interval", "generate", "score", "train"} in seconds (interval: on_step_end to
    on_step_end); and the sampling settings it used."""
    env = {**os.environ, "OMP_NUM_THREADS": "2", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([trl_python(), str(ROOT / "benchmarks" / "trl_peer.py"), "--models", str(d),
                          "--steps", str(steps), "--batch", str(BATCH), "--response-length", str(RESPONSE),
                          "--epochs", str(EPOCHS), "--kl-coef", str(KL), "--temperature", str(gen["temperature"])],
                         env=env, capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"TRL run failed:\n{out.stderr[-3000:]}")
    res = json.loads(out.stdout.strip().splitlines()[-1])
    return [{"interval": t, **ph} for t, ph in zip(res["step_seconds"], res["phases"])], res["sampling"]


def ours_sets(d: Path, run_dir: Path, steps: int, overrides: list[str]) -> list[str]:
    return [f"models.policy={d}/policy", f"models.reward={d}/reward", f"data.prompts={d}/prompts.jsonl",
            "data.shuffle=false", f"run.output_dir={run_dir}", f"train.steps={steps}", "checkpoint.every=0",
            "logging.wandb.enabled=false", "logging.samples_per_step=0", "policy.num_ranks=1",
            f"generation.prompts_per_step={BATCH}", "generation.n=1", f"generation.max_new_tokens={RESPONSE}",
            f"ppo.epochs={EPOCHS}", f"ppo.minibatch_size={BATCH}", f"ppo.kl_coef={KL}", "ppo.advantage=gae",
            f"policy.micro_batch_size={BATCH}", f"critic.micro_batch_size={BATCH}",  # as TRL's; FAST halves them
            f"reference.micro_batch_size={BATCH}", f"reward.micro_batch_size={BATCH}", *overrides]


def run_ours(d: Path, steps: int, name: str, overrides: list[str]) -> tuple[list[dict], dict]:
    """One rlhf-ray run: its metrics rows, each with "interval" (contiguous(): None on the last); and the sampling
    settings it used."""
    run_dir = OUT / "runs" / f"{d.name}-{name}"
    sets = ours_sets(d, run_dir, steps, overrides)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled")}
    cmd = [sys.executable, "-m", "launch.ppo", "--config", "configs/tiny_ppo.yaml"]
    for s in sets:
        cmd += ["--set", s]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"rlhf-ray run failed ({name}):\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{**r, "interval": t} for r, t in zip(rows, contiguous(rows))], ours_sampling(run_dir)


def summarize(runs: list[list[dict]]) -> dict:
    """Medians over steps 2..N-1 of every run (rounds pooled; step 1 warms up, rlhf-ray's step N has no span);
    rlhf-ray's metrics rows or TRL's per-step dicts, each with its contiguous "interval"."""
    rows = [r for run in runs for r in run[1:-1]]
    def med(key):
        return statistics.median(r[key] for r in rows)
    if "time/step" not in rows[0]:                                        # TRL
        return {"step": med("interval"), "phases": {p: med(p) for p in PHASES if p in rows[0]}}
    out = {"step": med("interval"), "phases": {p: med(f"time/{p}") for p in PHASES},
           "logprob_gap": max(r["rollout/logprob_diff_max"] for r in rows),
           "response_length": med("response/length_mean"),
           "updates": {k: med(k) for k in ("time/policy_update", "time/critic_update")}}
    out["sync_share"] = out["phases"]["weight_sync"] / out["step"]
    return out


def phases(s: dict) -> str:
    return " / ".join(f"{s['phases'][p]:.2f}" if p in s["phases"] else "-" for p in PHASES)


def peak_flops(dtype: str) -> float:
    """The machine's matmul peak at `dtype`: the one-thread SHAPE matmul's rate times the cores."""
    import torch
    m, k, n = SHAPE
    return 2 * m * k * n / (matmul_ms(getattr(torch, dtype)) / 1e3) * (os.cpu_count() or 1)


def train_flops(r: dict, prompt_tokens: float, ours: dict) -> float:
    """Useful training FLOPs per step: policy and critic, forward and backward, every epoch (module docstring)."""
    return 2 * 6 * r["params"] * 1e6 * BATCH * (prompt_tokens + ours["response_length"]) * EPOCHS


def report(rows: list[dict], a, choice) -> str:
    rec_name = "bf16" if choice.dtype == "bfloat16" else "fp32"
    peak = {d: peak_flops(d) for d in {"float32", choice.dtype}}
    lines = ["| policy | TRL 1.12 step | TRL phases | rlhf-ray fp32 step | rlhf-ray phases | fp32 ratio "
             "| bf16 step | bf16 ratio | auto picks | auto ratio | off-policy (auto) step | off-policy ratio "
             "| train GFLOP/s (% of peak): TRL / ours at auto | sync share | engine-policy logprob gap |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        trl, fp32, bf, asy = r["trl"], r["fp32"], r.get("bf16"), r.get("async")
        rec = bf if rec_name == "bf16" else fp32
        runs = [x for x in (fp32, bf, asy) if x]
        bf_step, bf_ratio = (f"{bf['step']:.2f} s", f"{bf['step'] / trl['step']:.2f}x") if bf else ("-", "-")
        as_step, as_ratio = (f"{asy['step']:.2f} s", f"**{asy['step'] / trl['step']:.2f}x**") if asy else ("-", "-")
        flops = train_flops(r, r["prompt_tokens"], rec)
        rate = [flops / s["phases"]["train"] for s in (trl, rec)]
        fl = " / ".join(f"{x / 1e9:.2f} ({100 * x / peak[choice.dtype]:.0f} %)" for x in rate)
        gaps = " / ".join(f"{x['logprob_gap']:.1e}" for x in runs)
        lines.append(
            f"| {r['size']} ({r['params']:.1f} M) | {trl['step']:.2f} s | {phases(trl)} | {fp32['step']:.2f} s "
            f"| {phases(fp32)} | **{fp32['step'] / trl['step']:.2f}x** | {bf_step} | {bf_ratio} | {rec_name} "
            f"| **{rec['step'] / trl['step']:.2f}x** | {as_step} | {as_ratio} | {fl} "
            f"| {100 * max(x['sync_share'] for x in runs):.1f} % | {gaps} |")
    lines += ["", f"Median over steps 2-{a.steps - 1} of {a.rounds} round(s), TRL and rlhf-ray alternating. Step: "
              "contiguous spans on both sides, TRL's on_step_end to on_step_end, rlhf-ray's step start to the next "
              "step's start (its metrics, logging and guard inside). Sampling checked alike (module docstring). "
              "Phases: "
              f"{' / '.join(PHASES)} in seconds (TRL's from its own functions, timed by benchmarks/trl_peer.py; it "
              "has no weight sync). Ratio: rlhf-ray's step over TRL's. Off-policy: one step stale, the engine "
              "generating beside training (its generate phase is not on the step's critical path). Sync share: "
              "weight sync's share of rlhf-ray's step, the largest over its runs. Logprob gap: the largest "
              f"rollout/logprob_diff_max (engine vs policy, nats). fp32: {', '.join(FAST + a.extra)}. bf16: "
              f"{', '.join(BF16 + a.extra)}. Off-policy: {', '.join(ASYNC + a.extra)}. Training FLOP/s as in the "
              f"module docstring; peak here: " + ", ".join(f"{d} {p / 1e9:.1f} GFLOP/s" for d, p in peak.items())
              + ".",
              f"{cpu_model()}, {os.cpu_count()} cores; {choice.line()}; {datetime.date.today().isoformat()}; "
              f"commit {git_commit()}."]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    ap.add_argument("--steps", type=int, default=8, help="steps per run (at least 3: figures are over 2..N-1)")
    ap.add_argument("--rounds", type=int, default=1, help="TRL / rlhf-ray alternations per size (steps pooled)")
    ap.add_argument("--bf16", action="store_true", help="also run bf16 where train.dtype auto picks fp32")
    ap.add_argument("--no-async", dest="async_", action="store_false", help="skip the one-step-off-policy runs")
    ap.add_argument("--set", dest="extra", action="append", default=[], help="more overrides for our runs")
    a = ap.parse_args()
    if a.steps < 3:
        ap.error("--steps must be at least 3 (figures are over steps 2..N-1)")
    choice = fastest_dtype("cpu")
    print(choice.line(), flush=True)
    auto = BF16 if choice.dtype == "bfloat16" else FAST
    rows = []
    for size in a.sizes:
        d = build_models(size)
        from safetensors.torch import load_file
        params = sum(t.numel() for t in load_file(str(d / "policy" / "model.safetensors")).values()) / 1e6
        prompt_tokens = statistics.mean(len(p) for p in json.loads((d / "prompt_ids.json").read_text()))
        runs: dict[str, list] = {"trl": [], "fp32": [], "bf16": [], "async": []}
        gen = ours_generation("configs/tiny_ppo.yaml", ours_sets(d, OUT / "runs" / "probe", a.steps, a.extra))
        for i in range(a.rounds):
            trl, peer = run_trl(d, a.steps, gen)
            runs["trl"].append(trl)
            todo = [("fp32", FAST + a.extra)]
            if choice.dtype == "bfloat16" or a.bf16:
                todo.append(("bf16", BF16 + a.extra))
            if a.async_:
                dtype = [o for o in auto if o.startswith("train.")]       # bf16's, where auto picks it
                todo.append(("async", ASYNC + dtype + a.extra))
            for name, overrides in todo:
                metrics, ours = run_ours(d, a.steps, f"{name}-{i}", overrides)
                check_sampling(ours, peer, temperature_tol=2e-7)           # TRL's PPOTrainer samples at T + 1e-7
                runs[name].append(metrics)
        rows.append({"size": size, "params": params, "prompt_tokens": prompt_tokens,
                     **{k: summarize(v) for k, v in runs.items() if v}})
        print(json.dumps(rows[-1]), flush=True)
    publish(report(rows, a, choice), OUT / "vs_trl.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
