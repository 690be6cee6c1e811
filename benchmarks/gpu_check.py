"""The trainer's CUDA path on one GPU, measured: the project's own policy and critic code (actors/policy.py,
actors/critic.py: DeepSpeed init, `logprobs`/`values`, the PPO micro-batch loop of `train`) on Qwen2-shaped
models built from config, each configuration's memory, step time and tokens/s, beside what `rlhf-ray plan`
predicts; and one bf16 step of the PPO loss against fp32 from the same weights.

    python benchmarks/gpu_check.py --out DIR             # on a GPU: the matrix below (~7 min on an H200)
    python benchmarks/gpu_check.py --tiny --device cpu   # the same code at toy sizes on CPU (tests/test_gpu_check.py)
    python benchmarks/gpu_check.py --report FILE.json    # the tables again from a saved run, with today's planner

No Ray here: the trainer classes run in-process, one rank each, and `ray` is a stand-in whose `remote` returns the
class unchanged (the GPU machines lent to this project have no Ray; the check never calls a method that uses it).
DeepSpeed joins a one-rank process group (NCCL on CUDA) exactly as in an actor. Adam is torch's (ds_config.py):
no fused kernel is built.

One rank runs ZeRO stage 0 in the product (`effective_zero_stage`: nothing to partition); the check forces
stages 2 and 3 too, to measure their buffers. What one rank cannot show: the division of gradients, optimizer
states (stage >= 1) and parameters (stage 3) across N ranks, the all-gathers' prefetch at N > 1 and NCCL's
buffers per peer. The planner's 1/N terms stay the ZeRO paper's, untested here.

Every configuration runs in its own process (so the CUDA context and the allocator start fresh): a warm-up step,
then `--steps` measured ones. A step is one `logprobs` (or `values`) pass over the batch and one `train` call:
one PPO epoch over one minibatch of all rows, cut into micro-batches, one optimizer step. Memory: the caching
allocator's peak allocated and reserved bytes, per phase (forward, backward, optimizer step, the scoring pass),
the resident bytes after a step (model states), and the device's used memory (CUDA context, NCCL and allocator
included: what a co-located role sees taken).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import types
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GiB = 1024 ** 3
# Qwen2.5-0.5B and -1.5B as published (config.json); the tiny one keeps the check honest on CPU
SHAPES = {
    "0.5B": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, vocab_size=151936),
    "1.5B": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                 num_key_value_heads=2, vocab_size=151936),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512),
}
# (role, ZeRO stage, gradient checkpointing, micro-batch): stage 0 with and without checkpointing, stage 0 at half
# the micro-batch (activations' slope), stages 2 and 3 forced, the critic at stages 0 and 3
MATRIX = [("policy", 0, False, 4), ("policy", 0, True, 4), ("policy", 0, False, 2), ("policy", 2, True, 4),
          ("policy", 3, True, 4), ("critic", 0, False, 4), ("critic", 3, True, 4)]
TINY_MATRIX = [("policy", 0, False, 2), ("policy", 3, True, 2), ("critic", 2, True, 2)]


def workload(tiny: bool) -> dict:
    """Rows x (prompt + response) tokens per step, every row full length (the planner's worst case)."""
    return dict(rows=4, prompt=16, response=16) if tiny else dict(rows=16, prompt=256, response=256)


# ------------------------------------------------------------------------------------------------ in the worker

def ray_standin() -> None:
    """`ray` for modules that wrap their class at import (`PolicyActor = ray.remote(Policy)`), and the node address a
    rank hosting its group's store asks for."""
    sys.modules["ray"] = types.SimpleNamespace(remote=lambda cls: cls,
                                               util=types.SimpleNamespace(get_node_ip_address=lambda: "127.0.0.1"))


class Probe:
    """Peak memory per phase: `mark(phase)` assigns the allocator's peak since the previous mark to `phase`."""

    def __init__(self, device: str):
        import torch
        self.torch, self.cuda = torch, device == "cuda"
        self.peak: dict[str, int] = defaultdict(int)
        self.reserved_peak = 0

    def mark(self, phase: str) -> None:
        if not self.cuda:
            return
        c = self.torch.cuda
        self.peak[phase] = max(self.peak[phase], c.max_memory_allocated())
        self.reserved_peak = max(self.reserved_peak, c.memory_stats().get("reserved_bytes.all.peak", 0))
        c.reset_peak_memory_stats()

    def allocated(self) -> int | None:
        return self.torch.cuda.memory_allocated() if self.cuda else None

    def device_used(self) -> int | None:
        if not self.cuda:
            return None
        free, total = self.torch.cuda.mem_get_info()
        return total - free

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()


def instrument(engine, probe: Probe) -> None:
    """Mark the phases of `_minibatch_updates` (actors/base.py) on the live engine: forward ends where backward
    starts, the optimizer step is engine.step (a no-op but at the accumulation boundary)."""
    backward, step = engine.backward, engine.step

    def timed_backward(loss, *a, **k):
        probe.mark("forward")
        out = backward(loss, *a, **k)
        probe.mark("backward")
        return out

    def timed_step(*a, **k):
        out = step(*a, **k)
        probe.mark("step")
        return out
    engine.backward, engine.step = timed_backward, timed_step


def config_for(job: dict, dtype: str):
    from rlhf_ray.config import load_config
    role, w = job["role"], job["work"]
    return load_config(None, [
        f"models.policy={job['model']}", f"models.critic={job['model']}", "data.prompts=unused",
        f"data.max_prompt_tokens={w['prompt']}", f"generation.max_new_tokens={w['response']}",
        f"ppo.minibatch_size={w['rows']}", "ppo.epochs=1", f"train.dtype={dtype}",
        f"{role}.zero_stage={job['stage']}", f"{role}.micro_batch_size={job['micro']}",
        f"{role}.gradient_checkpointing={str(job['ckpt']).lower()}", f"{role}.lr={job.get('lr', 1e-5)}"])


def make_role(job: dict, dtype: str, device: str):
    ray_standin()
    from rlhf_ray import ds_config
    # one rank would run stage 0 whatever the config says (effective_zero_stage); the check forces the stage asked
    ds_config.effective_zero_stage = lambda role: role.zero_stage
    if job["role"] == "policy":
        from actors.policy import Policy as cls
    else:
        from actors.critic import Critic as cls
    actor = cls(0, 1, config_for(job, dtype), device)
    os.environ.setdefault("DS_ACCELERATOR", device)
    actor.init_process_group("127.0.0.1", actor.host_store(1))
    return actor


def make_rollout(w: dict, vocab: int, seed: int = 0):
    import torch
    from rlhf_ray.batch import RolloutBatch
    g = torch.Generator().manual_seed(seed)
    n, P, T = w["rows"], w["prompt"], w["response"]
    ones = torch.ones(n, T)
    return RolloutBatch(input_ids=torch.randint(0, vocab, (n, P + T), generator=g),
                        attention_mask=torch.ones(n, P + T, dtype=torch.long), response_mask=ones,
                        action_mask=ones, sample_logprobs=torch.zeros(n, T))


def experience(batch, scored, role: str, seed: int):
    """What `compute_experience` would hand the role: seeded advantages (and returns near the values)."""
    import torch
    from rlhf_ray.batch import Experience
    g = torch.Generator().manual_seed(seed)
    adv = torch.randn(batch.action_mask.shape, generator=g)
    common = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask, loss_mask=batch.action_mask,
                  advantages=adv)
    if role == "policy":
        return Experience(**common, old_logprobs=scored, ref_logprobs=scored)
    zeros = torch.zeros_like(scored)
    return Experience(**common, old_logprobs=zeros, ref_logprobs=zeros, values=scored,
                      returns=scored + 0.1 * torch.randn(scored.shape, generator=g))


def run_build(job: dict) -> dict:
    """A random-init Qwen2 causal LM of the given shape, saved as bf16 safetensors (tied embeddings)."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config
    cfg = Qwen2Config(**SHAPES[job["size"]], tie_word_embeddings=True, max_position_embeddings=4096,
                      rope_theta=1e6, rms_norm_eps=1e-6)
    torch.manual_seed(0)
    with torch.device(job["device"]):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(job["model"], safe_serialization=True)
    return {"params": sum(p.numel() for p in model.parameters())}


def run_train(job: dict) -> dict:
    """One configuration: warm-up + measured steps of the role's own scoring pass and train call."""
    import torch
    device, w = job["device"], job["work"]
    probe = Probe(device)
    if probe.cuda:
        torch.zeros(1, device="cuda")
        probe.sync()
    context = probe.device_used()
    actor = make_role(job, job["dtype"], device)
    probe.sync()
    loaded, used_loaded = probe.allocated(), probe.device_used()
    instrument(actor.engine, probe)
    batch = make_rollout(w, SHAPES[job["size"]]["vocab_size"])
    score = actor.logprobs if job["role"] == "policy" else actor.values
    steps = []
    for i in range(1 + job["steps"]):
        probe.mark("idle")
        t0 = time.perf_counter()
        scored = score(batch)
        probe.sync()
        probe.mark("scoring")
        t1 = time.perf_counter()
        stats = actor.train(experience(batch, scored, job["role"], seed=i), step=i)
        probe.sync()
        probe.mark("idle")
        steps.append({"score_s": t1 - t0, "train_s": time.perf_counter() - t1, "loss": stats["loss"],
                      "resident": probe.allocated()})
    measured = steps[1:]
    train_s = statistics.median(s["train_s"] for s in measured)
    tokens = w["rows"] * (w["prompt"] + w["response"])
    counts = actor.parameter_counts()
    return {
        "params": counts["total"], "context_used": context, "loaded": loaded, "loaded_used": used_loaded,
        "resident": measured[-1]["resident"], "peak_by_phase": dict(probe.peak),
        "peak_allocated": max(probe.peak.values(), default=None) if probe.cuda else None,
        "peak_reserved": probe.reserved_peak if probe.cuda else None, "device_used": probe.device_used(),
        "ds_stage": actor.zero_stage, "optimizer": type(actor.engine.optimizer).__name__,
        "train_s": train_s, "score_s": statistics.median(s["score_s"] for s in measured),
        "tokens_per_s": tokens / train_s, "model_tflops": model_flops(job, counts["total"]) / train_s / 1e12,
        "losses": [s["loss"] for s in steps],
    }


def model_flops(job: dict, params: int) -> float:
    """6 x (parameters outside the embedding) x tokens, plus the LM head on the response positions (policy)."""
    s, w = SHAPES[job["size"]], job["work"]
    rows, L = w["rows"], w["prompt"] + w["response"]
    body = params - s["vocab_size"] * s["hidden_size"]
    head = s["vocab_size"] * s["hidden_size"] * w["response"] * rows if job["role"] == "policy" else 0
    return 6 * (body * rows * L + head)


def run_compare(job: dict) -> dict:
    """The PPO loss's gradient in bf16 against fp32, same weights (the bf16 file, upcast exactly for fp32), same
    batch and advantages, old logprobs each model's own (as the policy computes them), one optimizer step."""
    import torch
    device, w = job["device"], job["work"]
    batch = make_rollout(w, SHAPES[job["size"]]["vocab_size"])
    runs = {}
    for dtype in ("float32", "bfloat16"):
        actor = make_role(job, dtype, device)
        grads: list[torch.Tensor] = []
        step = actor.engine.step

        def snapshot_then_step(*a, **k):
            if actor.engine.is_gradient_accumulation_boundary():
                grads.append(torch.cat([p.grad.detach().float().flatten() for p in actor.model.parameters()
                                        if p.requires_grad]).cpu())
            return step(*a, **k)
        actor.engine.step = snapshot_then_step
        lp = actor.logprobs(batch)
        actor.train(experience(batch, lp, "policy", seed=0), step=0)
        runs[dtype] = {"logprobs": lp, "grad": grads[0], "after": actor.logprobs(batch)}
        del actor
        if device == "cuda":
            torch.cuda.empty_cache()
    f, b = runs["float32"], runs["bfloat16"]
    gf, gb = f["grad"].double(), b["grad"].double()      # float64: sums over ~1e9 elements
    df, db = f["after"] - f["logprobs"], b["after"] - b["logprobs"]
    return {
        "logprob_max_abs_diff": float((b["logprobs"] - f["logprobs"]).abs().max()),
        "logprob_mean_abs_diff": float((b["logprobs"] - f["logprobs"]).abs().mean()),
        "grad_cosine": float(torch.nn.functional.cosine_similarity(gf, gb, dim=0)),
        "grad_rel_error": float((gb - gf).norm() / gf.norm()),
        "grad_norm_fp32": float(gf.norm()), "grad_norm_bf16": float(gb.norm()),
        "step_logprob_change_fp32": float(df.abs().mean()), "step_logprob_change_bf16": float(db.abs().mean()),
        "step_change_correlation": float(torch.corrcoef(torch.stack([df.flatten(), db.flatten()]))[0, 1]),
    }


def run_ipc(job: dict) -> dict:
    """CUDA IPC under this process's allocator settings (what the cuda_ipc weight sync does): a bucket's tensors
    shared with `reduce_tensor`, rebuilt and read in another process."""
    import torch
    import torch.multiprocessing as mp
    from torch.multiprocessing.reductions import reduce_tensor
    tensors = [torch.arange(n, dtype=torch.bfloat16, device="cuda") for n in (1000, 4096 * 1024, 333)]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_ipc_reader, args=([reduce_tensor(t) for t in tensors], q))
    p.start()
    sums = q.get(timeout=60)
    p.join(60)
    return {"ipc_ok": sums == [float(t.float().sum()) for t in tensors],
            "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "")}


def _ipc_reader(handles, q) -> None:
    q.put([float(fn(*args).float().sum()) for fn, args in handles])


def worker(job: dict) -> dict:
    return {"build": run_build, "train": run_train, "compare": run_compare, "ipc": run_ipc}[job["kind"]](job)


# ------------------------------------------------------------------------------------------------ the driver

_log_lock = threading.Lock()


def run_job(job: dict, log, timeout: float) -> dict:
    """The job in a fresh process; its result, or what went wrong in one line (the matrix goes on)."""
    with tempfile.NamedTemporaryFile("r", suffix=".json") as res:
        t0 = time.perf_counter()
        try:
            p = subprocess.run([sys.executable, __file__, "--worker", json.dumps(job), "--result", res.name],
                               capture_output=True, text=True, timeout=timeout)
            out, rc = p.stdout + p.stderr, p.returncode
        except subprocess.TimeoutExpired as e:
            out, rc = f"{e.stdout or ''}{e.stderr or ''}\ntimed out after {timeout:.0f} s", -1
        with _log_lock:
            log.write(f"===== {job['name']} (rc {rc}, {time.perf_counter() - t0:.1f} s)\n{out}\n")
            log.flush()
        text = Path(res.name).read_text()
        if rc == 0 and text:
            return {**job, **json.loads(text), "wall_s": time.perf_counter() - t0}
        last = [line for line in out.splitlines() if line.strip()][-1:] or ["no output"]
        return {**job, "error": f"rc {rc}: {last[0][:300]}"}


def jobs(args) -> list[dict]:
    sizes = ["tiny"] if args.tiny else args.sizes
    work = workload(args.tiny)
    base = {"device": args.device, "work": work, "steps": args.steps}
    out = []
    for size in sizes:
        model = str(Path(args.models) / size)
        out.append({**base, "kind": "build", "name": f"build {size}", "size": size, "model": model})
        for role, stage, ckpt, micro in TINY_MATRIX if args.tiny else MATRIX:
            out.append({**base, "kind": "train", "size": size, "model": model, "role": role, "stage": stage,
                        "ckpt": ckpt, "micro": micro, "dtype": args.dtype,
                        "name": f"{size} {role} ZeRO-{stage} ckpt {'on' if ckpt else 'off'} micro {micro}"})
        if size == sizes[0]:
            out.append({**base, "kind": "compare", "size": size, "model": model, "role": "policy", "stage": 0,
                        "ckpt": False, "micro": 4 if not args.tiny else 2, "lr": 1e-5,
                        "name": f"{size} policy bf16 vs fp32, one step"})
    if args.device == "cuda":
        out.append({**base, "kind": "ipc", "name": "CUDA IPC of a bucket under this allocator setting"})
    return out


def predicted(r: dict, meta: dict) -> dict:
    """What rlhf_ray/planner.py says for the configuration, per GPU, for the same arch, role settings, lengths,
    allocator setting and ZeRO-3 sub-group as the run: `used` (what the device must have) and `allocated` (the
    same without the allocator's slack and the CUDA context)."""
    from rlhf_ray.planner import Arch, plan_trained
    s = SHAPES[r["size"]]
    arch = Arch(s["hidden_size"], s["num_hidden_layers"], s["num_attention_heads"], s["num_key_value_heads"],
                s["intermediate_size"], s["vocab_size"], tied_embeddings=True)
    rc = getattr(config_for(r, r["dtype"]), r["role"])
    T = r["work"]["response"]
    plan = plan_trained(r["role"], arch, rc, r["work"]["prompt"] + T, T if r["role"] == "policy" else 0,
                        cuda_alloc_conf=meta.get("alloc_conf"), sub_group=meta.get("zero3_sub_group", 1e9))
    outside = plan.per_gpu["allocator_slack"] + plan.per_gpu["cuda_context"]
    return {"used": plan.total, "allocated": plan.total - outside}


def measured_used(r: dict, meta: dict) -> float:
    """The device memory the configuration took. Run one at a time: the device's own count. Run in parallel (the
    device's count then holds a neighbour too): the peak reserved plus the planner's CUDA context, which is what
    the one-at-a-time runs measured outside the allocator (1.29-1.30 GiB in every configuration)."""
    from rlhf_ray.planner import CUDA_CONTEXT
    return r["device_used"] if meta.get("parallel", 1) == 1 else r["peak_reserved"] + CUDA_CONTEXT


def planner_errors(results: list[dict], meta: dict) -> list[dict]:
    """Per configuration: the planner's prediction against the measurement, in per cent (positive: over)."""
    rows = []
    for r in results:
        if r["kind"] != "train" or "error" in r or r.get("peak_allocated") is None:
            continue
        p, used = predicted(r, meta), measured_used(r, meta)
        rows.append({"name": r["name"], "size": r["size"], "used": used, "predicted_used": p["used"],
                     "used_error": (p["used"] - used) / used * 100, "allocated": r["peak_allocated"],
                     "predicted_allocated": p["allocated"],
                     "allocated_error": (p["allocated"] - r["peak_allocated"]) / r["peak_allocated"] * 100})
    return rows


def report(results: list[dict], meta: dict) -> str:
    alone = meta.get("parallel", 1) == 1
    lines = [f"GPU check: {meta.get('gpu', '?')}, torch {meta.get('torch', '?')}, {meta.get('date', '?')}, "
             f"commit {meta.get('commit', '?')}; workload {json.dumps(results[0]['work'])} per step, "
             f"{meta.get('dtype', '?')}; PYTORCH_CUDA_ALLOC_CONF {meta.get('alloc_conf') or 'unset'}"
             + ("" if alone else f"; {meta['parallel']} configurations at once (memory only: timings overlap)"), "",
             "| configuration | params | step (s) | tokens/s | model TFLOP/s | resident GiB | peak alloc GiB | "
             "peak reserved GiB | device used GiB | planner: alloc GiB (error) | planner: used GiB (error) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    g = lambda b: f"{b / GiB:.2f}" if isinstance(b, (int, float)) else "-"       # noqa: E731
    errors = {e["name"]: e for e in planner_errors(results, meta)}
    for r in results:
        if r["kind"] != "train":
            continue
        if "error" in r:
            lines.append(f"| {r['name']} | failed: {r['error']} |")
            continue
        e = errors.get(r["name"])
        plan = (f"{g(e['predicted_allocated'])} ({e['allocated_error']:+.0f} %) | {g(e['predicted_used'])} "
                f"({e['used_error']:+.0f} %)") if e else "- | -"
        lines.append(f"| {r['name']} | {r['params'] / 1e9:.2f} B | {r['train_s']:.3f} | {r['tokens_per_s']:,.0f} | "
                     f"{r['model_tflops']:.1f} | {g(r['resident'])} | {g(r['peak_allocated'])} | "
                     f"{g(r['peak_reserved'])} | {g(measured_used(r, meta)) if e else '-'} | {plan} |")
    for r in results:
        if r["kind"] == "compare":
            lines += ["", f"bf16 vs fp32 ({r['name']}): " + (r.get("error") or ", ".join(
                f"{k} {v:.4g}" for k, v in r.items() if k.startswith(("logprob_", "grad_", "step_")) and
                isinstance(v, float)))]
        if r["kind"] == "ipc":
            lines += ["", f"{r['name']}: " + (r.get("error") or ("round trip ok" if r["ipc_ok"] else "WRONG VALUES"))]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(ROOT / "runs" / "gpu-check"))
    ap.add_argument("--models", default=None, help="where the built models go (default: a temporary directory)")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--sizes", nargs="+", default=["0.5B", "1.5B"], choices=[s for s in SHAPES if s != "tiny"])
    ap.add_argument("--tiny", action="store_true", help="toy sizes and a short matrix (CPU)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--timeout", type=float, default=150.0, help="seconds per configuration")
    ap.add_argument("--commit", default=None)
    ap.add_argument("--parallel", type=int, default=1, help="configurations at once (memory only: timings overlap)")
    ap.add_argument("--alloc-conf", default=None, help="PYTORCH_CUDA_ALLOC_CONF for the workers")
    ap.add_argument("--report", default=None, help="print the tables of a saved gpu_check.json")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        Path(args.result).write_text(json.dumps(worker(json.loads(args.worker))))
        return 0
    if args.report:
        saved = json.loads(Path(args.report).read_text())
        print(report(saved["results"], saved["meta"]))
        return 0
    import torch
    from benchmarks.machine import git_commit
    from rlhf_ray.ds_config import ZERO3_SUB_GROUP
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"date": datetime.date.today().isoformat(), "commit": args.commit or git_commit(), "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu", "dtype": args.dtype,
            "zero3_sub_group": ZERO3_SUB_GROUP}
    if args.alloc_conf is not None:                       # the workers inherit it
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = meta["alloc_conf"] = args.alloc_conf
    results: list[dict] = []

    def done(r: dict) -> None:
        results.append(r)
        print(f"{r['name']}: " + (r.get("error") or f"{r.get('wall_s', 0):.1f} s"), flush=True)
        (out / "gpu_check.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))

    with tempfile.TemporaryDirectory() as tmp, (out / "gpu_check.log").open("w") as log:
        args.models = args.models or tmp
        todo = jobs(args)
        if args.parallel > 1:        # memory per process stays exact; the timings are then not for reading
            meta["parallel"] = args.parallel
            from concurrent.futures import ThreadPoolExecutor
            with ThreadPoolExecutor(args.parallel) as pool:
                for r in pool.map(lambda j: run_job(j, log, args.timeout), [j for j in todo if j["kind"] == "build"]):
                    done(r)
                for r in pool.map(lambda j: run_job(j, log, args.timeout), [j for j in todo if j["kind"] != "build"]):
                    done(r)
        else:
            for job in todo:
                done(run_job(job, log, args.timeout))
                if "error" in results[-1] and not any(x["kind"] == "train" and "error" not in x for x in results):
                    print("stopping: nothing has run yet, the rest would fail the same way", flush=True)
                    break
    text = report(results, meta)
    (out / "gpu_check.md").write_text(text + "\n")
    print("\n" + text)
    return 0 if not any("error" in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
