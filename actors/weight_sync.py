"""Weight sync, policy -> every engine, behind one interface:

    sync = make_weight_sync(cfg, policy_group, engines)   # prepare: open whatever channel the backend needs
    stats = sync.push(version)                             # every step: gather, load into every engine, reset caches

The driver calls `push()` and does not know which backend ran. Backends:
    object_store    rank 0 puts each bucket, packed into one flat buffer, into Ray's object store
    process_group   rank 0 broadcasts each bucket as one flat buffer over a process group it shares with every
                    engine worker (gloo on CPU, NCCL on GPU; actors/sync_group.py), across nodes alike
    cuda_ipc        engines on the same GPU as policy rank 0 (placement.colocate) open its tensors through CUDA
                    IPC handles: no copy through the host
    in_process      the hybrid layout (placement.share_process [[policy, engine, ...]]): the engine lives in the
                    policy's process and loads its parameters as they are (actors/host.py)
Each push reports `bytes` (the weights loaded into each engine) and `staged` (bytes copied on the way there:
packed buffers, the object store's copy, receive buffers); the engine's own load into its layout is not counted.
ZeRO-3 parameters are gathered bucket by bucket, never the whole model at once on one rank.
"""
from __future__ import annotations

import time

import ray


class WeightSync:
    """What every backend shares: the policy's ranks gather the weights bucket by bucket and rank 0 sends them by
    the backend's own method (a Policy actor method, `method`); then every engine is told the version it holds."""
    method: str

    def __init__(self, policy_group, engines: list, bucket_mb: float):
        self.policy_group, self.engines = policy_group, engines
        self.bucket_bytes = int(bucket_mb * (1 << 20))

    def push(self, version: int) -> dict:
        """Load the policy's weights, those of update `version`, into every engine. An engine still generating
        takes them after that generation: its calls run one at a time, so weights never change mid-rollout."""
        t0 = time.perf_counter()
        sent = self._send()
        ray.get([e.weights_loaded.remote(version) for e in self.engines])
        return {"bytes": sent["bytes"], "staged": sent["staged"], "tensors": sent["tensors"],
                "seconds": time.perf_counter() - t0}

    def _send(self) -> dict:
        """Every rank gathers (collective under ZeRO-3); rank 0's count of what it sent."""
        return self.policy_group.run(self.method, self.engines, self.bucket_bytes)[0]


class ObjectStoreSync(WeightSync):
    method = "push_weights"


class ProcessGroupSync(WeightSync):
    method = "broadcast_weights"

    def __init__(self, policy_group, engines: list, bucket_mb: float, backend: str, tp: int):
        super().__init__(policy_group, engines, bucket_mb)
        root = policy_group.actors[0]
        world = 1 + len(engines) * tp
        addr, port = ray.get([root.node_ip.remote(), root.host_sync_store.remote(world)])
        ray.get([root.open_sync_group.remote(addr, port, world, backend)]
                + [e.open_sync_group.remote(addr, port, 1 + i * tp, world, backend) for i, e in enumerate(engines)])


class CudaIpcSync(WeightSync):
    method = "share_weights_ipc"


class InProcessSync(WeightSync):
    """The policy's process hosts its engine: that process (the host, actors/host.py) loads one into the other."""

    def _send(self) -> dict:
        return self.policy_group.base.run("load_engine_weights", self.bucket_bytes)[0]


def make_weight_sync(cfg, policy_group, engines: list) -> WeightSync:
    if cfg.weight_sync.backend == "object_store":
        return ObjectStoreSync(policy_group, engines, cfg.weight_sync.bucket_mb)
    if cfg.weight_sync.backend == "process_group":
        backend = "nccl" if cfg.device_for(cfg.policy.gpus_per_rank) == "cuda" else "gloo"
        return ProcessGroupSync(policy_group, engines, cfg.weight_sync.bucket_mb, backend,
                                cfg.engine.tensor_parallel_size)
    if cfg.weight_sync.backend == "cuda_ipc":
        return CudaIpcSync(policy_group, engines, cfg.weight_sync.bucket_mb)
    if cfg.weight_sync.backend == "in_process":
        return InProcessSync(policy_group, engines, cfg.weight_sync.bucket_mb)
    raise ValueError(f"weight_sync.backend: unknown backend {cfg.weight_sync.backend!r}")
