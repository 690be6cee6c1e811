"""Build the tiny world's stand-in judge for several seeds and measure it against gold, in-process (HF forward
passes: no vLLM, no Ray), on held-out corpus answers (issue 35: how fragile is the recipe?).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/judge_build.py --seeds 42 0 1 [--perturb 1e-7] \
        [--set epochs=10 lr=5e-4] [--tag name] [--out runs/bench-judge-build]     # ~3 min a seed at 1 thread

The world (tokenizer; seed 42, 300 pretraining steps) is built under <out>/world on first use; judges go to
<out>/judges/<tag>_s<seed>, one JSON row per build to <out>/results.jsonl.

Held-out set: rlhf_ray/tiny_world/judge.py `unseen_answers` (corpus answers drawn with a seed disjoint from training's,
none sharing a run of 4 words with a training answer, grouped 8 per request); `agreement_in_process` asks every
answer pointwise and every pair of a group in both orders (as the label stage asks, judge.max_pairs None), then
rlhf_ray/judge.py `agreement` (as launch/pipeline.py judge_agreement computes it). --perturb multiplies every
initial weight by (1 + eps * N(0, 1)) (a separate generator: same seed, same data order) to stand in for another
CPU's rounding. JUDGE_MODULE=path.py builds with another version of rlhf_ray/tiny_world/judge.py (the recipe before a
change); the held-out set and the measurement stay this one's.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, fields
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import torch  # noqa: E402

if os.environ.get("JUDGE_MODULE"):             # another version of the module (e.g. the recipe before a change)
    import importlib.util
    _spec = importlib.util.spec_from_file_location("tiny_judge_alt", os.environ["JUDGE_MODULE"])
    tj = importlib.util.module_from_spec(_spec)
    sys.modules["tiny_judge_alt"] = tj
    _spec.loader.exec_module(tj)
else:
    import rlhf_ray.tiny_world.judge as tj  # noqa: E402
from rlhf_ray.judge import JudgeFormat  # noqa: E402
from rlhf_ray.tiny_world.judge import agreement_in_process, unseen_answers  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="runs/bench-judge-build")
    ap.add_argument("--seeds", type=int, nargs="+", default=[42, 0, 1])
    ap.add_argument("--perturb", type=float, default=0.0)
    ap.add_argument("--set", nargs="*", default=[])
    ap.add_argument("--tag", default="base")
    ap.add_argument("--eval-n", type=int, default=800)
    ap.add_argument("--eval-seed", type=int, default=987_654)
    ap.add_argument("--keep", action="store_true", help="reuse a judge already built in the output directory")
    a = ap.parse_args()
    torch.set_num_threads(1)
    out_dir = Path(a.out)
    world = out_dir / "world"
    if not (world / "policy" / "model.safetensors").is_file():
        from rlhf_ray.tiny_world.world import TinySpec, build_tiny_world
        build_tiny_world(world, TinySpec(pretrain_steps=300, seed=42))
    fmt = JudgeFormat(pointwise="Request: {prompt}\nAnswer: {response}\nRating:",      # configs/tiny_world.yaml
                      pairwise="Request: {prompt}\nA: {a}\nB: {b}\nBetter:",
                      score_labels=("1", "2", "3", "4", "5"))
    overrides = {}
    types = {f.name: f.type for f in fields(tj.TinyJudgeSpec)}
    for kv in a.set:
        k, v = kv.split("=", 1)
        overrides[k] = {"int": int, "float": float, "bool": lambda s: s.lower() in ("1", "true")}.get(
            types[k] if isinstance(types[k], str) else types[k].__name__, str)(v)
    if a.perturb:
        original = tj.pretrain

        def perturbed(lm, *args, **kw):
            g = torch.Generator().manual_seed(12345)
            with torch.no_grad():
                for p in lm.parameters():
                    p.mul_(1 + a.perturb * torch.randn(p.shape, generator=g))
            return original(lm, *args, **kw)
        tj.pretrain = perturbed
    for seed in a.seeds:
        spec = tj.TinyJudgeSpec(seed=seed, **overrides)
        out = out_dir / "judges" / f"{a.tag}_s{seed}"
        if not a.keep and out.exists():
            (out / "judge_recipe.json").unlink(missing_ok=True)
        lines = []

        def log(s):
            lines.append(s)
            print(s, flush=True)
        t0 = time.time()
        d = tj.build_tiny_judge(str(world), fmt, spec, out=out, log=log)
        secs = time.time() - t0
        prompts, answers = unseen_answers(spec, a.eval_n, 8, a.eval_seed)
        info = {"drawn": a.eval_n, "groups": len(prompts), "k": 8}
        t1 = time.time()
        res = agreement_in_process(d, fmt, prompts, answers)
        epochs = [ln for ln in lines if "judge epoch" in ln or "restart" in ln or "valid" in ln]
        row = {"tag": a.tag, "seed": seed, "perturb": a.perturb, "spec": asdict(spec), "build_s": round(secs, 1),
               "eval_s": round(time.time() - t1, 1), **info, **{k: round(v, 4) if isinstance(v, float) else v
                                                               for k, v in res.items()}, "log": epochs}
        print(json.dumps({k: v for k, v in row.items() if k not in ("spec", "log")}), flush=True)
        with open(out_dir / "results.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
