"""Where a PPO policy update's time goes besides the model: DeepSpeed's ZeRO stages at one rank against a plain
PyTorch AdamW loop, on the same model, batch and loss, interleaved in one process (the box is noisy).

    .venv/bin/python benchmarks/update_overhead.py [--sizes 0.6M 3M 17M] [--reps 7]

One update = 4 epochs over 32 sequences (prompts of 3-13 tokens, 32 response tokens), micro-batches of 16 cut
by length, one optimizer step per epoch, gradient clipping at 1.0: what benchmarks/vs_trl.py's policy does each
step. Every variant runs the project's own loss (`response_logprobs` + `ppo_policy_loss`) with one thread. Prints
each variant's median and its ratio to the plain loop. A benchmark, not a test.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.machine import cpu_model, git_commit  # noqa: E402
from benchmarks.vs_trl import SIZES, build_models  # noqa: E402
from rlhf_ray.algos import ppo_policy_loss  # noqa: E402
from rlhf_ray.batch import Experience, chunks, sort_by_length  # noqa: E402
from rlhf_ray.models import load_causal_lm, response_logprobs  # noqa: E402

B, P, T, MICRO, EPOCHS, LR = 32, 13, 32, 16, 4, 1e-5


def make_batch() -> Experience:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 2000, (B, P + T), generator=g)
    mask = torch.zeros(B, P + T, dtype=torch.long)
    for i, n in enumerate(torch.randint(3, P + 1, (B,), generator=g).tolist()):
        mask[i, P - n:] = 1
    return Experience(ids, mask, loss_mask=torch.ones(B, T), old_logprobs=torch.full((B, T), -7.6),
                      ref_logprobs=torch.full((B, T), -7.6), advantages=torch.randn(B, T, generator=g))


def micro_losses(model, batch: Experience):
    """The micro-batches' losses, each scaled so that their gradients add up to the minibatch's token mean."""
    den = float(batch.loss_mask.sum())
    for mb in chunks(sort_by_length(batch)[0], MICRO):
        lp = response_logprobs(model, mb.input_ids, mb.attention_mask, T)
        yield ppo_policy_loss(lp, mb.old_logprobs, mb.advantages, mb.loss_mask, 0.2, None, "token-mean", den)[0]


class PlainTorch:
    name = "plain PyTorch AdamW"

    def __init__(self, path: str):
        self.model = load_causal_lm(path)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=LR, betas=(0.9, 0.95), weight_decay=0.0)

    def update(self, batch: Experience) -> None:
        for _ in range(EPOCHS):
            for loss in micro_losses(self.model, batch):
                loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)


class DeepSpeedStage:
    def __init__(self, path: str, stage: int):
        import deepspeed
        from rlhf_ray.config import TrainerRoleConfig
        from rlhf_ray.ds_config import deepspeed_config
        self.name = f"DeepSpeed ZeRO-{stage}" + (" (what one rank runs)" if stage == 0 else "")
        ds = deepspeed_config(TrainerRoleConfig(num_ranks=1, lr=LR, micro_batch_size=MICRO), B, "float32", "cpu")
        ds["zero_optimization"]["stage"] = stage          # past effective_zero_stage, to measure what it avoids
        model = load_causal_lm(path)
        self.engine, *_ = deepspeed.initialize(model=model, model_parameters=list(model.parameters()), config=ds)

    def update(self, batch: Experience) -> None:
        for _ in range(EPOCHS):
            for loss in micro_losses(self.engine.module, batch):
                self.engine.backward(loss)
                self.engine.step()


def init_single_rank() -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", "29531"), RANK="0",
                      WORLD_SIZE="1", LOCAL_RANK="0", DS_ACCELERATOR="cpu")
    import deepspeed
    import deepspeed.comm  # noqa: F401  (the same shm-op skip as actors/base.py)
    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False, verbose=False)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    ap.add_argument("--reps", type=int, default=7)
    a = ap.parse_args()
    torch.set_num_threads(1)
    init_single_rank()
    batch = make_batch()
    lines = ["| policy | variant | update (s, median) | ratio to plain PyTorch |", "|---|---|---|---|"]
    for size in a.sizes:
        path = str(build_models(size) / "policy")
        variants = [PlainTorch(path)] + [DeepSpeedStage(path, s) for s in (0, 1, 2)]
        times: list[list[float]] = [[] for _ in variants]
        for v in variants:
            v.update(batch)                                # warm-up
        for _ in range(a.reps):
            for v, ts in zip(variants, times):
                t0 = time.perf_counter()
                v.update(batch)
                ts.append(time.perf_counter() - t0)
        base = statistics.median(times[0])
        for v, ts in zip(variants, times):
            lines.append(f"| {size} | {v.name} | {statistics.median(ts):.3f} | {statistics.median(ts) / base:.2f}x |")
            print(lines[-1], flush=True)
    lines += ["", f"{EPOCHS} epochs x {B} sequences, micro-batches of {MICRO}, 1 thread, {a.reps} interleaved "
              f"repetitions; {cpu_model()}; commit {git_commit()}."]
    print("\n" + "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
