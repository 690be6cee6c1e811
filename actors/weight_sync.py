"""Weight sync, policy -> every engine, behind one interface:

    sync = make_weight_sync(cfg, policy_group, engines)   # prepare: open whatever channel the backend needs
    stats = sync.push()                                    # every step: gather, load into every engine, reset caches

The driver calls `push()` and does not know which backend ran. Backends: `object_store` (Ray object store;
CPU and tests). ZeRO-3 parameters are gathered bucket by bucket, never the whole model at once on one rank.
"""
from __future__ import annotations

import time

import ray


class ObjectStoreSync:
    def __init__(self, policy_group, engines: list, bucket_mb: float):
        self.policy_group, self.engines = policy_group, engines
        self.bucket_bytes = int(bucket_mb * (1 << 20))

    def push(self) -> dict:
        t0 = time.perf_counter()
        results = self.policy_group.run("push_weights", self.engines, self.bucket_bytes)  # collective on all ranks
        # A prefix cache computed under the old weights would serve stale KV entries (off by nats).
        ray.get([e.reset_prefix_cache.remote() for e in self.engines])
        return {"bytes": results[0]["bytes"], "tensors": results[0]["tensors"], "seconds": time.perf_counter() - t0}


def make_weight_sync(cfg, policy_group, engines: list):
    if cfg.weight_sync.backend == "object_store":
        return ObjectStoreSync(policy_group, engines, cfg.weight_sync.bucket_mb)
    raise ValueError(f"weight_sync.backend: unknown backend {cfg.weight_sync.backend!r}")
