"""A process group from the policy's rank 0 to every engine worker, for weight sync by broadcast.

It is its own group (a TCPStore hosted by policy rank 0 and a standalone ProcessGroupGloo / ProcessGroupNCCL),
so it touches neither DeepSpeed's group of the policy ranks nor vLLM's own distributed state in the workers.
A bucket travels as one flat byte buffer; its (name, shape, dtype) list goes beside it by Ray. Imported by the
vLLM worker extension too, so it imports nothing of Ray.
"""
from __future__ import annotations

import datetime

import torch
import torch.distributed as dist

Meta = list[tuple[str, list[int], str]]


def host_store(addr: str, world_size: int, timeout_s: float = 600) -> dist.TCPStore:
    """The store of a group this process hosts, listening on a port the OS picks (read it from `.port`). The port is
    bound here and held, never probed free and bound later: in between, any process on the node can take it (CI saw
    EADDRINUSE with two test clusters on one box)."""
    return dist.TCPStore(addr, 0, world_size, True, timeout=datetime.timedelta(seconds=timeout_s),
                         wait_for_workers=False)


def join_store(addr: str, port: int, world_size: int, timeout_s: float = 600) -> dist.TCPStore:
    return dist.TCPStore(addr, port, world_size, False, timeout=datetime.timedelta(seconds=timeout_s))


def open_group(store: dist.Store, rank: int, world_size: int, backend: str, timeout_s: float = 300):
    """Every member calls this at the same time (the constructor is a rendezvous); rank 0 hosts the store."""
    timeout = datetime.timedelta(seconds=timeout_s)
    store = dist.PrefixStore("rlhf_weight_sync", store)
    if backend == "nccl":
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = timeout
        return dist.ProcessGroupNCCL(store, rank, world_size, opts)
    return dist.ProcessGroupGloo(store, rank, world_size, timeout)


def pack(tensors: dict[str, torch.Tensor]) -> tuple[Meta, torch.Tensor]:
    meta = [(name, list(t.shape), str(t.dtype).removeprefix("torch.")) for name, t in tensors.items()]
    flat = torch.cat([t.contiguous().view(torch.uint8).reshape(-1) for t in tensors.values()])
    return meta, flat


def unpack(meta: Meta, flat: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    out, offset = [], 0
    for name, shape, dtype in meta:
        dt = getattr(torch, dtype)
        n = torch.Size(shape).numel() * torch.empty((), dtype=dt).element_size()
        out.append((name, flat[offset:offset + n].view(dt).reshape(shape)))
        offset += n
    return out


def nbytes(meta: Meta) -> int:
    return sum(torch.Size(s).numel() * torch.empty((), dtype=getattr(torch, d)).element_size() for _, s, d in meta)


def broadcast(group, flat: torch.Tensor) -> None:
    opts = dist.BroadcastOptions()
    opts.rootRank = 0
    group.broadcast([flat], opts).wait()
