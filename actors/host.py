"""Roles sharing one worker process (`placement.share_process`, e.g. [[reference, reward]],
[[engine, reference, reward]], or the hybrid layout [[policy, engine, reference, reward]]): rank i of every member
role lives in the i-th process of one rank group.

Why: on a small box, each Ray worker process costs seconds of CPU before it does anything (the worker itself,
then torch and transformers, and vLLM for an engine: ~4-15 CPU-s each), and start-up is the sum of that work on
two cores. Frozen roles (reference, reward) and the engines run one after another within a synchronous step, so
sharing a process costs them nothing; what is traded: the shared roles' calls run one at a time (an off-policy
engine could not generate beside its process's scoring, so the config refuses sharing an engine with
rollout.max_staleness > 0), and a fault takes every role of the process, all replaced together.

The hybrid layout (the policy with its engine, as veRL's hybrid engine and OpenRLHF's colocate_all_models have
them): the process is the policy's rank and joins its process group (the host group is distributed); the engine is
built after that, so vLLM's in-process engine finds torch.distributed initialised (a world of one rank) and uses it
instead of opening its own; weights go from the policy's parameters to the engine's in the same process
(`load_engine_weights`: no packing, no object store, no serialisation).

The roles stay what they are: each is its plain class (Policy, Reference, Reward, Engine), built in the host's
process; the driver reaches it through `HostedRole`, which quacks like a Ray actor handle
(`handle.method.remote(...)`), and `RoleView`, which quacks like the role's RankGroup. Nothing else in the driver
knows, but the weight sync, which asks the host to load its engine in place (actors/weight_sync.py).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass

import ray

from actors.startup import startup_begins, startup_over


class RoleHost:
    """Rank `rank` of several roles in one process: members is [(role, "module:Class" or a class, args)], built in
    order. With the policy among them the host is a rank of the policy's process group (its RankGroup is
    distributed): the engine is then built once that group is up (`init_process_group`), the other members at once.
    The classes come by name, imported here with the collector off, as every rank's start-up runs
    (actors/startup.py)."""

    def __init__(self, rank: int, world_size: int, members: list[tuple[str, str | type, tuple]]):
        startup_begins()                # until `ready`: the members' modules import torch, transformers, vLLM
        self.rank, self.world_size = rank, world_size
        self.roles: dict = {}
        members = [(role, _load(cls) if isinstance(cls, str) else cls, args) for role, cls, args in members]
        after_group = {"engine"} if any(role == "policy" for role, _, _ in members) else set()
        self.later = [m for m in members if m[0] in after_group]
        for role, cls, args in members:
            if role not in after_group:
                self.roles[role] = cls(rank, world_size, *args)

    def call(self, role: str, method: str, *args, **kwargs):
        return getattr(self.roles[role], method)(*args, **kwargs)

    def ready(self) -> bool:
        """Every member built (the group's liveness probe; each role answers its own `ready` through `call`): the
        start-up is over."""
        startup_over()
        return True

    # ------------------------------------------------------------------ the hybrid layout: the policy's rank
    def node_ip(self) -> str:
        return self.roles["policy"].node_ip()

    def host_store(self, world_size: int) -> int:
        return self.roles["policy"].host_store(world_size)

    def init_process_group(self, master_addr: str, master_port: int) -> None:
        """The policy joins its group (and loads its model under DeepSpeed); then the engine is built."""
        self.roles["policy"].init_process_group(master_addr, master_port)
        for role, cls, args in self.later:
            self.roles[role] = cls(self.rank, self.world_size, *args)
        self.later = []

    def load_engine_weights(self, bucket_bytes: int) -> dict:
        """Weight sync in place: the policy's weights, bucket by bucket, loaded into this process's engine."""
        return self.roles["policy"].load_into(self.roles["engine"], bucket_bytes)


def _load(path: str) -> type:
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


RoleHostActor = ray.remote(RoleHost)


@dataclass(frozen=True)
class HostedRole:
    """A role living in a RoleHost, used like an actor handle: `hosted.generate.remote(...)`. Picklable (the
    policy's weight sync calls engines from inside its own actor)."""
    host: object                       # the RoleHost's ActorHandle
    role: str

    def __getattr__(self, method: str):
        if method.startswith("__"):
            raise AttributeError(method)
        return _HostedMethod(self.host, self.role, method)


@dataclass(frozen=True)
class _HostedMethod:
    host: object
    role: str
    method: str

    def remote(self, *args, **kwargs):
        return self.host.call.remote(self.role, self.method, *args, **kwargs)


class RoleView:
    """One role of a RankGroup of RoleHosts, used like that role's own RankGroup (actors, call, run, wait,
    respawn, shutdown). Respawning or shutting down acts on the shared processes, so on every member role: the
    driver does each once per group (`base`)."""

    def __init__(self, hosts, role: str):
        self.base, self.role, self.name = hosts, role, role

    @property
    def actors(self) -> list[HostedRole]:
        return [HostedRole(h, self.role) for h in self.base.actors]

    def call(self, method: str, *args, **kwargs) -> list:
        return [a.call.remote(self.role, method, *args, **kwargs) for a in self.base.actors]

    def run(self, method: str, *args, **kwargs) -> list:
        return ray.get(self.call(method, *args, **kwargs))

    def wait(self) -> None:
        self.base.wait()

    def respawn(self, ranks: list[int]) -> list[int]:
        return self.base.respawn(ranks)

    def shutdown(self) -> None:
        self.base.shutdown()
