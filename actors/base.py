"""What every rank actor shares: identity, thread pinning, the process-group rendezvous, and for trained
roles the DeepSpeed ZeRO engine (init, PPO minibatch loop, gathered weights, HF save, exact resume)."""
from __future__ import annotations

import os
import socket
import sys
import time
from collections import defaultdict
from contextlib import nullcontext
from typing import Callable, Iterator

import torch

from rlhf_ray.batch import Batch, batch_size, chunks, select, shard
from rlhf_ray.ds_config import deepspeed_config


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


class RankActor:
    """One rank of a role. Subclasses are wrapped with `ray.remote` in their role module."""

    def __init__(self, rank: int, world_size: int, num_threads: int, device: str):
        self.rank, self.world_size = rank, world_size
        self.device = resolve_device(device)
        torch.set_num_threads(max(1, num_threads))
        torch.manual_seed(1234 + rank)

    def node_ip(self) -> str:
        import ray
        return ray.util.get_node_ip_address()

    def free_port(self) -> int:
        with socket.socket() as s:
            s.bind(("", 0))
            return s.getsockname()[1]

    def init_process_group(self, master_addr: str, master_port: int) -> None:
        """Join the role's process group: gloo on CPU, NCCL on GPU (through DeepSpeed's comm layer)."""
        os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(master_port), RANK=str(self.rank),
                          WORLD_SIZE=str(self.world_size), LOCAL_RANK="0")
        import deepspeed
        if self.device == "cpu":
            # DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce op at init (~2 min) that ZeRO
            # training never uses. Patch the module object itself: `import deepspeed.comm.torch` would yield
            # the real torch package, because deepspeed.comm has an attribute named `torch`.
            import deepspeed.comm  # noqa: F401  (loads deepspeed.comm.torch)
            sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
        deepspeed.init_distributed(dist_backend="gloo" if self.device == "cpu" else "nccl",
                                   auto_mpi_discovery=False, verbose=False)

    def ready(self) -> bool:
        return True

    def _to_device(self, batch: Batch) -> Batch:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    @torch.no_grad()
    def _forward_shard(self, batch: Batch, fn: Callable[[Batch], torch.Tensor], micro: int) -> torch.Tensor:
        """Run `fn` over this rank's shard in micro-batches. Under ZeRO-3 every rank must call this (collective)."""
        part = shard(batch, self.rank, self.world_size)
        return torch.cat([fn(self._to_device(mb)).cpu() for mb in chunks(part, micro)])


class FrozenRole(RankActor):
    """A frozen model on one rank (reference, reward): data-parallel forward passes, no gradients."""

    def _set_model(self, model: torch.nn.Module) -> None:
        self.model = model.to(self.device).eval().requires_grad_(False)


class DeepSpeedRole(RankActor):
    """A model trained under DeepSpeed ZeRO on one rank of a group (policy, critic)."""

    def _init_engine(self, load_model: Callable[[], torch.nn.Module], role_cfg, minibatch_size: int, dtype: str):
        import deepspeed
        ds_cfg = deepspeed_config(role_cfg, minibatch_size, dtype, self.device)
        self.zero_stage = role_cfg.zero_stage
        self.micro = ds_cfg["train_micro_batch_size_per_gpu"]
        if self.zero_stage == 3:
            # Partition at load time (zero.Init inside from_pretrained): no rank ever holds the whole model.
            from transformers.integrations import HfDeepSpeedConfig
            self._hf_ds_config = HfDeepSpeedConfig(ds_cfg)   # must stay alive while the model loads
        model = load_model()
        if role_cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        self.engine, *_ = deepspeed.initialize(
            model=model, model_parameters=[p for p in model.parameters() if p.requires_grad], config=ds_cfg)
        self.model = self.engine.module
        self.device = self.engine.device

    # ------------------------------------------------------------------ epochs over minibatches (PPO, stages)
    def _minibatch_updates(self, exp: Batch, epochs: int, minibatch_size: int, seed: int,
                           loss_fn: Callable[[Batch], tuple[torch.Tensor, dict]]) -> dict:
        """Epochs x shuffled minibatches; each rank takes its shard of each minibatch, in micro-batches.
        A trailing partial minibatch is dropped (every optimizer step sees `minibatch_size` sequences).

        The shuffle is seeded identically on every rank so the ranks agree on each minibatch. DeepSpeed
        averages gradients across ranks and accumulates over micro-batches; one optimizer step per minibatch.
        """
        t0 = time.perf_counter()
        n = batch_size(exp)
        stats: dict[str, list[float]] = defaultdict(list)
        self.engine.train()
        for epoch in range(epochs):
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + epoch))
            for idx in perm.split(minibatch_size):
                if len(idx) < minibatch_size:
                    break
                mb = shard(select(exp, idx), self.rank, self.world_size)
                for micro in chunks(mb, self.micro):
                    loss, s = loss_fn(self._to_device(micro))
                    self.engine.backward(loss)
                    self.engine.step()
                    stats["loss"].append(loss.item())
                    for k, v in s.items():
                        stats[k].append(float(v))
        out = {k: sum(v) / len(v) for k, v in stats.items()}
        out["update_seconds"] = time.perf_counter() - t0
        return out

    # ------------------------------------------------------------------ full weights, bucket by bucket
    def _named_buckets(self, bucket_bytes: int) -> Iterator[dict[str, torch.Tensor] | None]:
        """Yield the full (HF-named) weights in buckets of about `bucket_bytes`; rank 0 gets the tensors,
        other ranks None. Under ZeRO-3 each bucket is gathered as a collective (all ranks must iterate), so
        no rank ever materialises more than one bucket of the gathered model at a time."""
        import deepspeed
        params = list(self.model.named_parameters())   # tied aliases appear once
        bucket: list[tuple[str, torch.nn.Parameter]] = []
        size = 0

        def emit(items):
            gathered = (deepspeed.zero.GatheredParameters([p for _, p in items], modifier_rank=None)
                        if self.zero_stage == 3 else nullcontext())
            with gathered:
                return {n: p.detach().cpu().clone() for n, p in items} if self.rank == 0 else None

        for name, p in params:
            numel = p.ds_numel if hasattr(p, "ds_numel") else p.numel()
            bucket.append((name, p))
            size += numel * p.element_size()
            if size >= bucket_bytes:
                yield emit(bucket)
                bucket, size = [], 0
        if bucket:
            yield emit(bucket)

    def save_hf(self, path: str, tokenizer_dir: str | None = None) -> None:
        """Write an HF-format directory (safetensors) that `from_pretrained` opens. Collective under ZeRO-3."""
        state: dict[str, torch.Tensor] = {}
        for bucket in self._named_buckets(256 << 20):
            if bucket is not None:
                state.update(bucket)
        if self.rank == 0:
            self.model.save_pretrained(path, state_dict=state)
            if tokenizer_dir is not None:
                from rlhf_ray.models import load_tokenizer
                load_tokenizer(tokenizer_dir).save_pretrained(path)

    def save_ds(self, path: str) -> None:
        """DeepSpeed's own checkpoint (partitioned weights, optimizer, scheduler) for an exact resume."""
        self.engine.save_checkpoint(path, tag="ds", save_latest=False)

    def load_ds(self, path: str) -> None:
        load_path, _ = self.engine.load_checkpoint(path, tag="ds", load_optimizer_states=True,
                                                   load_lr_scheduler_states=True)
        if load_path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint under {path}")
