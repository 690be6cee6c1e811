"""Supervised stages on the actor machinery: SFT, reward model from rankings, DPO, KTO on thumbs.

    rlhf-ray sft --config C      rlhf-ray rm --config C      rlhf-ray dpo --config C      rlhf-ray kto --config C

Each stage: rows -> tensors (held-out split by prompt) -> a DeepSpeed ZeRO rank group -> epochs, evaluated
before training and after every epoch -> an HF-format model directory, published atomically, that the next
stage opens with `from_pretrained`.
"""
from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

import ray
import torch

from actors.group import RankGroup
from actors.supervised import SupervisedActor
from launch.common import cluster_device, mean_over_ranks, run_cli, start_ray, trainer_env
from rlhf_ray import preflight
from rlhf_ray.checkpoint import publish_dir
from rlhf_ray.config import Config, StageConfig, dump_config, resolve_paths
from rlhf_ray.data import DataError
from rlhf_ray.formats import load_preferences, load_sft, load_thumbs
from rlhf_ray.metrics import MetricsLogger
from rlhf_ray.models import check_model_dir, check_tokenizer_matches, load_tokenizer
from rlhf_ray.stage_data import (ranking_batch, sft_batch, sft_prompt_key, split_by_prompt, thumbs_batch,
                                 trim_to_multiple)

def stage_tensors(cfg: Config, name: str, tokenizer):
    """(train, held-out) tensors; prompts rendered as PPO renders them (data.apply_chat_template)."""
    st, chat = getattr(cfg, name), cfg.data.apply_chat_template
    if name == "sft":
        rows = load_sft(st.data, st.format)
        train, held = split_by_prompt(rows, sft_prompt_key, st.eval_fraction, cfg.run.seed, st.data)
        return sft_batch(tokenizer, train, st.max_len, chat), sft_batch(tokenizer, held, st.max_len, chat)
    if name == "kto":
        thumbs = load_thumbs(st.data)
        train, held = split_by_prompt(thumbs, lambda t: t[0], st.eval_fraction, cfg.run.seed, st.data)
        return (thumbs_batch(tokenizer, train, st.max_len, chat, cfg.run.seed),
                thumbs_batch(tokenizer, held, st.max_len, chat, cfg.run.seed + 1))
    prefs = load_preferences(st.data, st.format)
    train, held = split_by_prompt(prefs, lambda p: p[0], st.eval_fraction, cfg.run.seed, st.data)
    return ranking_batch(tokenizer, train, st.max_len, chat), ranking_batch(tokenizer, held, st.max_len, chat)


def run_stage(cfg: Config, name: str) -> dict:
    cfg.check_stage(name)
    cfg = resolve_paths(cfg)
    st = getattr(cfg, name)
    t0 = time.perf_counter()

    # every input checked before anything is started or written
    check_model_dir(st.model, f"{name}.model")            # before the tokenizer: a missing model named as such
    preference = name in ("dpo", "kto")          # trained against a frozen reference's logprobs
    if preference and st.reference:
        check_model_dir(st.reference, f"{name}.reference")
    tokenizer = load_tokenizer(st.model, cfg.models.trust_remote_code)
    check_tokenizer_matches(tokenizer, st.model, f"{name}.model")
    if preference and st.reference:
        check_tokenizer_matches(tokenizer, st.reference, f"{name}.reference")
    train, held = stage_tensors(cfg, name, tokenizer)
    ranks = st.trainer.num_ranks
    train, held = trim_to_multiple(train, ranks), trim_to_multiple(held, ranks)
    if len(train) < st.batch_size:
        raise DataError(f"{st.data}: {len(train)} training {'prompts' if name in ('rm', 'dpo') else 'examples'} after "
                        f"holding out {name}.eval_fraction, fewer than one batch ({name}.batch_size {st.batch_size})")
    run_dir = preflight.output_dir(cfg.run.output_dir)
    out = Path(st.output) if st.output else run_dir / name
    device = cluster_device(cfg, st.trainer.gpus_per_rank)      # resolves train.dtype auto: the dump says what ran
    dump_config(cfg, run_dir / "config.yaml")

    start_ray(cfg)

    def trainers(section: StageConfig, role: str) -> RankGroup:
        return RankGroup(SupervisedActor, role, ranks, st.trainer.cpus_per_rank, st.trainer.gpus_per_rank,
                         (section, name, cfg.train.dtype, device, cfg.run.seed, cfg.models.trust_remote_code),
                         distributed=True, runtime_env=trainer_env(cfg, device))

    def reference_logprobs(g: RankGroup) -> None:
        for batch in (train, held):
            batch.ref_logprobs = torch.cat(g.run("answer_logprobs", ray.put(batch)))

    if preference and st.reference:     # the reference's logprobs from its own ranks, gone before training starts
        ref = trainers(dataclasses.replace(st, model=st.reference), f"{name}-reference")
        try:
            reference_logprobs(ref)
        finally:
            ref.shutdown()
    group = trainers(st, name)
    logger = None
    try:
        if preference and not st.reference:     # the starting weights are the reference: before the first step
            reference_logprobs(group)
        train_ref, held_ref = ray.put(train), ray.put(held)
        logger = MetricsLogger(run_dir, cfg, f"{cfg.run.name}-{name}", filename=f"{name}_metrics.jsonl")
        before = mean_over_ranks(group.run("evaluate", held_ref))
        logger.log(0, {f"{name}/eval_{k}": v for k, v in before.items()})
        if name == "kto":
            good = int(train.desirable.sum())
            ratio = st.desirable_weight * good / max(st.undesirable_weight * (len(train) - good), 1e-9)
            print(f"kto: {good} thumbs up, {len(train) - good} down; lambda_D n_D / lambda_U n_U = {ratio:.2f} "
                  "(the paper: 1 to 4/3)", flush=True)
        print(f"{name}: {len(train)} train, {len(held)} held out; before: "
              + "  ".join(f"{k} {v:.4f}" for k, v in before.items()), flush=True)
        evaluation = before
        for epoch in range(1, st.epochs + 1):
            tr = mean_over_ranks(group.run("train", train_ref, epoch))
            evaluation = mean_over_ranks(group.run("evaluate", held_ref))
            logger.log(epoch, {**{f"{name}/train_{k}": v for k, v in tr.items()},
                               **{f"{name}/eval_{k}": v for k, v in evaluation.items()}})
            print(f"{name} epoch {epoch}/{st.epochs}: train loss {tr['loss']:.4f}  eval "
                  + "  ".join(f"{k} {v:.4f}" for k, v in evaluation.items()), flush=True)
        staging = out.with_name(f".{out.name}.partial")
        group.run("save_hf", str(staging), st.model)
        publish_dir(staging, out)
    finally:
        if logger is not None:
            logger.close()
        group.shutdown()
    return {"model": str(out), "eval_before": before, "eval": evaluation, "seconds": time.perf_counter() - t0}


def main(name: str, argv: list[str] | None = None) -> int:
    result = run_cli(f"rlhf-ray {name}", f"the {name} stage", lambda cfg, _: run_stage(cfg, name), argv)
    if isinstance(result, int):              # bad input or a failed run: said in one line
        return result
    print(f"{name}: model written to {result['model']} in {result['seconds']:.0f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2:]))
