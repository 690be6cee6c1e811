"""Roles sharing one worker process (`placement.share_process`, e.g. [[reference, reward]] or
[[engine, reference, reward]]): rank i of every member role lives in the i-th process of one rank group.

Why: on a small box, each Ray worker process costs seconds of CPU before it does anything (the worker itself,
then torch and transformers, and vLLM for an engine: ~4-15 CPU-s each), and start-up is the sum of that work on
two cores. Frozen roles (reference, reward) and the engines run one after another within a synchronous step, so
sharing a process costs them nothing; what is traded: the shared roles' calls run one at a time (an off-policy
engine could not generate beside its process's scoring, so the config refuses sharing an engine with
rollout.max_staleness > 0), and a fault takes every role of the process, all replaced together.

The roles stay what they are: each is its plain class (Reference, Reward, Engine), built in the host's process;
the driver reaches it through `HostedRole`, which quacks like a Ray actor handle (`handle.method.remote(...)`),
and `RoleView`, which quacks like the role's RankGroup. Nothing else in the driver knows.
"""
from __future__ import annotations

from dataclasses import dataclass

import ray


class RoleHost:
    """Rank `rank` of several roles in one process: members is [(role, class, args)], built in order."""

    def __init__(self, rank: int, world_size: int, members: list[tuple[str, type, tuple]]):
        self.roles = {role: cls(rank, world_size, *args) for role, cls, args in members}

    def call(self, role: str, method: str, *args, **kwargs):
        return getattr(self.roles[role], method)(*args, **kwargs)

    def ready(self) -> bool:
        """Every member built (the group's liveness probe; each role answers its own `ready` through `call`)."""
        return True


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
