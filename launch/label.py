"""Rank K answers per prompt with the LLM judge (the judge section), as the RM and DPO stages read rankings:

    rlhf-ray label --config C [--set k=v]

The answers are label.responses' rows {prompt, responses: [...]}, ranked as they are, or are sampled first from
models.policy for the prompts in label.prompts (generation.n each, generation.max_new_tokens long). Each compared
pair (all C(K, 2), or judge.max_pairs per prompt) is asked in both orders and the answers ranked by a
Bradley-Terry fit of the averaged verdicts (rlhf_ray/judge.py). The output rows carry {prompt, responses,
ranking}, the judge's strengths and how many of its verdicts flipped with the order. Nothing is written unless
every row was ranked: a judge that fails past its retries is a one-line error.

With label.queue (a label store's SQLite file) the answers go to people instead: queued as ranking tasks in batch
label.batch (label.wanted people each), for the labelling page (`rlhf-ray label-server serve`, docs/labelling.md);
no judge is needed or started.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

from launch.answers import Judge, Sampler, answer_sets, judge_ranked, write_jsonl
from launch.common import cluster_device, run_cli, start_ray
from rlhf_ray.config import Config, resolve_paths
from rlhf_ray.data import load_answer_sets, load_prompts
from rlhf_ray.label_store import LabelStore
from rlhf_ray.models import load_tokenizer
from rlhf_ray.preflight import judge_tokenizer, output_dir


def run_label(cfg: Config) -> dict:
    cfg = resolve_paths(cfg.check_label())
    lc = cfg.label
    if not lc.queue:
        judge_tokenizer(cfg)                          # the judge's model and labels, before anything starts
    rows = load_answer_sets(lc.responses) if lc.responses else None
    prompts = None if rows is not None else load_prompts(lc.prompts, cfg.data.prompt_key)
    store = LabelStore(lc.queue) if lc.queue else None
    out = Path(lc.output) if lc.output else output_dir(cfg.run.output_dir) / "rankings.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    e = cfg.judge.engine
    if store is None or rows is None:           # a judge to start, or answers to sample: a cluster
        start_ray(cfg, extra_cpus=0 if store else e.num_ranks * e.cpus_per_rank)
        device = cluster_device(cfg, e.gpus_per_rank if store is None else cfg.engine.gpus_per_rank)
    judge = None if store else Judge.start(cfg, out.parent, device)
    seconds = 0.0
    try:
        if rows is None:
            sampler = Sampler.start(cfg, out.parent, device)
            try:
                tokenizer = load_tokenizer(cfg.models.tokenizer or cfg.models.policy, cfg.models.trust_remote_code)
                rows = answer_sets(cfg, sampler, tokenizer, prompts, cfg.generation.n, cfg.run.seed)
            finally:
                sampler.group.shutdown()
        if store is not None:                   # for people: queued at the labelling page, ranked there
            ids = store.add_tasks(lc.batch, rows, "rank", lc.wanted)
            return {"queued": len(ids), "queue": str(store.path), "batch": lc.batch, "rows": len(rows)}
        t0 = time.perf_counter()
        judge_ranked(rows, judge, cfg.run.seed)
        seconds = time.perf_counter() - t0
    finally:
        if judge is not None:
            judge.shutdown()
    write_jsonl(out, rows)
    pairs, flips = sum(r["judge_pairs"] for r in rows), sum(r["judge_flips"] for r in rows)
    return {"output": str(out), "rows": len(rows), "pairs": pairs, "flips": flips, "seconds": seconds}


def main(argv: list[str] | None = None) -> int:
    s = run_cli("rlhf-ray label", __doc__.splitlines()[0], lambda cfg, _: run_label(cfg), argv)
    if isinstance(s, int):                     # bad input or a failed run: said in one line
        return s
    if "queued" in s:
        print(f"queued {s['queued']} prompts' answers for people in {s['queue']} (batch {s['batch']!r}): "
              f"rlhf-ray label-server serve --db {s['queue']}", flush=True)
        return 0
    print(f"ranked {s['rows']} prompts' answers from {s['pairs']} pairs, each asked in both orders, in "
          f"{s['seconds']:.1f} s; {s['flips']} verdicts flipped with the order\n  rankings: {s['output']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
