"""Rank groups: N actors of one role on one placement group, with their rendezvous.

A group places its ranks' bundles (CPUs, and GPUs on a cluster) with a Ray placement group, creates one
actor per bundle, and — for trained roles — has them join one process group. It offers: call a method on
every rank, and gather their results. Batches go by object-store reference; each rank slices its shard.
"""
from __future__ import annotations

import json
import re

import ray
from ray.util.placement_group import placement_group, placement_group_table, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy


def bundle(cpus: float, gpus: float, node_resource: str | None = None) -> dict:
    """One rank's resources; a node_resource (a custom resource only some nodes advertise) pins it there."""
    b = {"CPU": cpus}
    if gpus:
        b["GPU"] = gpus
    if node_resource:
        b[node_resource] = 0.001
    return b


class PlacementError(RuntimeError):
    """Resources a role asked for that the cluster could not give in time; one line naming the role."""


def _units(x: float) -> int:
    return round(x * 10000)            # Ray counts resources in units of 1e-4


def _fits(node: dict, b: dict) -> int:
    """How many copies of bundle b a node with these total resources holds."""
    return min((_units(node.get(k, 0)) // _units(v) for k, v in b.items() if _units(v) > 0), default=0)


def unplaceable(bundles: list[dict], nodes: list[dict], strategy: str = "PACK") -> str | None:
    """Why `bundles` can never be placed on nodes with these total resources, or None when they may be.
    Exact for identical bundles (what a rank group asks for); mixed ones are checked kind by kind, which
    finds only part of what cannot fit (None then means "may")."""
    if strategy == "STRICT_PACK":
        need = {k: sum(b.get(k, 0) for b in bundles) for b in bundles for k in b}
        return None if any(_fits(n, need) for n in nodes) else f"no single node holds all of them ({need})"
    kinds = [dict(k) for k in {tuple(sorted(b.items())) for b in bundles}]
    for b in kinds:
        want = sum(x == b for x in bundles)
        held = [_fits(n, b) for n in nodes]
        room = sum(h >= 1 for h in held) if strategy == "STRICT_SPREAD" else sum(held)
        if room < want:
            return f"room for {room} of {want}" + (f" x {b}" if len(kinds) > 1 else "")
    return None


def room_left(nodes: dict[str, dict], held: list[tuple[str, dict]]) -> list[dict]:
    """Each node's total resources less the bundles (node id, resources) this run already holds there: while one of
    its roles waits, the others keep theirs, so that room never frees."""
    left = {n: dict(r) for n, r in nodes.items()}
    for node, b in held:
        for k, v in b.items():
            if node in left:
                left[node][k] = left[node].get(k, 0) - v
    return list(left.values())


def node_shapes(nodes: list[dict], keys) -> str:
    """The nodes' totals of the resources in `keys`, alike ones counted: "2 nodes: {'CPU': 8.0, 'GPU': 0}"."""
    shapes = [str({k: n.get(k, 0) for k in sorted(keys)}) for n in nodes]
    return "; ".join(f"{shapes.count(x)} node{'s' * (shapes.count(x) > 1)}: {x}" for x in sorted(set(shapes)))


def _cluster_can_grow() -> bool | None:
    """Whether an autoscaler may add nodes to this cluster; None while that cannot be told.

    Every head runs Ray's autoscaler monitor. Started without an autoscaling config (`ray start --head` by
    hand, `ray.init()`), it mirrors the live nodes through a read-only provider, which names each node's type
    `node_<node id>` (ray/autoscaler/_private/util.py: format_readonly_node_type, used by v1 and v2 alike);
    a cluster config (`ray up`, KubeRay) names its own types. v1 publishes its report in the GCS's internal KV
    (what `ray status` reads); v2 answers through its SDK instead."""
    from ray.autoscaler.v2.utils import is_autoscaler_v2
    try:
        if is_autoscaler_v2():
            from ray.autoscaler.v2.sdk import get_cluster_status
            status = get_cluster_status(ray.get_runtime_context().gcs_address)
            types = {n.ray_node_type_name for n in status.active_nodes + status.idle_nodes}
        else:
            from ray._private.ray_constants import DEBUG_AUTOSCALING_STATUS
            from ray.experimental.internal_kv import _internal_kv_get
            raw = _internal_kv_get(DEBUG_AUTOSCALING_STATUS)
            report = json.loads(raw).get("autoscaler_report") if raw else None
            types = set((report or {}).get("node_type_mapping", {}).values())
    except Exception:                  # only advice: a status that cannot be read leaves the plain wait
        return None
    if not types:
        return None
    return not all(re.fullmatch(r"node_[0-9a-f]+", t) for t in types)


_reserved = []                         # the placement groups this process reserved


def _held_bundles() -> list[tuple[str, dict]]:
    """(node id, resources) of every bundle this process holds; groups since removed (or of an earlier cluster)
    are forgotten."""
    tables = [(pg, placement_group_table(pg)) for pg in _reserved]
    _reserved[:] = [pg for pg, t in tables if t.get("state") == "CREATED"]
    return [(t["bundles_to_node_id"][i], b) for _, t in tables if t.get("state") == "CREATED"
            for i, b in t["bundles"].items()]


def reserve(name: str, bundles: list[dict], strategy: str = "PACK", ready_timeout: float = 600):
    """A placement group. On a cluster that cannot grow, one that no node layout could ever hold is a one-line
    error at once; otherwise it is waited for, with a progress line every 30 s and a clear error at the timeout."""
    pg = placement_group(bundles, strategy=strategy)
    what = f"{name}: placement group of {len(bundles)} x {bundles[0]} ({strategy})"
    waited, ready, tick, checked = 0.0, pg.ready(), 5.0, False
    while not ray.wait([ready], timeout=tick)[0]:
        waited += tick
        if not checked:                # a group that is not placed at once: can it ever be?
            nodes = {n["NodeID"]: n["Resources"] for n in ray.nodes() if n["Alive"]}
            held = _held_bundles()
            why = unplaceable(bundles, room_left(nodes, held), strategy)
            grows = _cluster_can_grow() if why else True
            checked = grows is not None
            if why and grows is False:
                remove_placement_group(pg)
                keys = set().union(*bundles)
                ours = {k: sum(b.get(k, 0) for _, b in held) for k in sorted(keys)}
                raise PlacementError(f"{what} can never be placed on this cluster's nodes "
                                     f"({node_shapes(list(nodes.values()), keys)}"
                                     f"{f'; this run already holds {ours}' if held else ''}): {why}; "
                                     "the cluster cannot grow (no autoscaler)")
        if waited >= ready_timeout:
            remove_placement_group(pg)
            raise PlacementError(f"{what} could not be placed within {ready_timeout:.0f}s "
                                 f"(available: {ray.available_resources()})")
        if waited % 30 < tick:
            print(f"{what} still waiting for resources after {waited:.0f}s "
                  f"(available: {ray.available_resources()})", flush=True)
    _reserved.append(pg)
    return pg


class SharedPlacement:
    """One placement group for roles colocated on the same GPUs: bundle i holds rank i of every member role,
    with the members' CPUs added up and one GPU share (each member's actor takes 1/len(members) of it)."""

    def __init__(self, name: str, num_ranks: int, cpus_per_rank: float, gpus_per_rank: float, members: int,
                 node_resource: str | None = None):
        self.pg = reserve(name, [bundle(cpus_per_rank, gpus_per_rank, node_resource)] * num_ranks)
        self.gpus_per_actor = gpus_per_rank / members

    def remove(self) -> None:
        remove_placement_group(self.pg)


class RankGroup:
    def __init__(self, actor_cls, name: str, num_ranks: int, cpus_per_rank: float, gpus_per_rank: float,
                 args: tuple = (), distributed: bool = False, runtime_env: dict | None = None,
                 strategy: str = "PACK", ready_timeout: float = 600, shared: SharedPlacement | None = None,
                 node_resource: str | None = None, gpu_bundles: int = 1, wait: bool = True):
        """gpu_bundles k > 1 (a vLLM engine with tensor parallelism k on GPUs): each rank gets k one-GPU bundles;
        the engine actor itself holds no GPU, and vLLM's Ray workers take those bundles, named for it by
        VLLM_RAY_BUNDLE_INDICES (vLLM refuses a bundle with more than one GPU).

        wait=False returns as soon as the actors are requested, their rendezvous under way: a driver creating
        several groups then has them all starting side by side (imports, model loads, an engine's warm-up) and
        calls `wait` on each afterwards."""
        self.name = name
        k = gpu_bundles
        if shared is not None:          # colocated: rank i in bundle i of the shared group, a share of its GPU
            self.pg, self.owns_pg, gpus_per_rank = shared.pg, False, shared.gpus_per_actor
            k = 1
        else:
            specs = [bundle(cpus_per_rank / k, gpus_per_rank / k, node_resource)] * (num_ranks * k)
            self.pg, self.owns_pg = reserve(name, specs, strategy, ready_timeout), True
        self.actor_cls, self.args, self.runtime_env, self.k = actor_cls, args, runtime_env, k
        self.cpus_per_rank, self.gpus_per_rank, self.distributed = cpus_per_rank, gpus_per_rank, distributed
        self.actors = [self._spawn(i, num_ranks) for i in range(num_ranks)]
        self.starting = list(range(num_ranks))             # ranks whose start-up `wait` sees through
        self.joining = self._rendezvous() if distributed else []
        if wait:
            self.wait()

    def _spawn(self, i: int, num_ranks: int):
        """Rank i's actor, in its own bundle(s) of the group's placement group."""
        env, opts, k = self.runtime_env, {}, self.k
        if k > 1:
            env = dict(self.runtime_env or {})
            env["env_vars"] = {**env.get("env_vars", {}),
                               "VLLM_RAY_BUNDLE_INDICES": ",".join(str(i * k + j) for j in range(k))}
            opts = {"placement_group_capture_child_tasks": True}
        return self.actor_cls.options(
            num_cpus=self.cpus_per_rank / k, num_gpus=0 if k > 1 else self.gpus_per_rank, runtime_env=env,
            scheduling_strategy=PlacementGroupSchedulingStrategy(
                placement_group=self.pg, placement_group_bundle_index=i * k, **opts),
        ).remote(i, num_ranks, *self.args)

    def _rendezvous(self) -> list:
        """Every rank joins the process group at rank 0's address; returns those calls. Nothing blocks here: the
        address and port go to the ranks as references, which Ray resolves before each rank's call runs."""
        master = self.actors[0]
        addr, port = master.node_ip.remote(), master.host_store.remote(len(self.actors))
        return [a.init_process_group.remote(addr, port) for a in self.actors]

    def wait(self) -> None:
        """Until every rank has joined the group's process group and answered `ready` (its start-up over: see
        actors/startup.py); raises what a rank raised on the way."""
        ray.get(self.joining)
        ray.get([self.actors[i].ready.remote() for i in self.starting])
        self.joining, self.starting = [], []

    def respawn(self, ranks: list[int]) -> list[int]:
        """Replace `ranks` with fresh actors in the same bundles (their resources stay reserved, so the new ones
        cannot lose their place). A distributed group is replaced whole: its process group, and any ZeRO-partitioned
        state, die with one rank. Returns the ranks replaced; waits until they are ready."""
        ranks = list(range(len(self.actors))) if self.distributed else sorted(set(ranks))
        for i in ranks:
            ray.kill(self.actors[i])
        for i in ranks:
            self.actors[i] = self._spawn(i, len(self.actors))
        self.starting = ranks
        if self.distributed:
            self.joining = self._rendezvous()
        self.wait()
        return ranks

    def call(self, method: str, *args, **kwargs) -> list:
        """Start `method` on every rank; returns the ObjectRefs (rank order)."""
        return [getattr(a, method).remote(*args, **kwargs) for a in self.actors]

    def run(self, method: str, *args, **kwargs) -> list:
        return ray.get(self.call(method, *args, **kwargs))

    @property
    def base(self) -> "RankGroup":
        """The group whose processes these are (a RoleView of shared processes answers with the host group)."""
        return self

    def shutdown(self) -> None:
        """Kill the ranks and free their placement group; a second call does nothing."""
        if getattr(self, "_down", False):
            return
        self._down = True
        for a in self.actors:
            ray.kill(a)
        if self.owns_pg:
            remove_placement_group(self.pg)
