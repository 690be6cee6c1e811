"""Every role of a run as Ray actors: each role's resources, read in one place, and the rank groups built from them
(placement groups shared by colocated roles, processes shared by roles that share them).

Entry points (launch/ppo.py, launch/pipeline.py, launch/label.py) build their actors here.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import ray

from actors.agent import AgentWorkerActor, GatewayActor
from actors.critic import CriticActor
from actors.engine import EngineActor
from actors.env import EnvWorkerActor
from actors.group import RankGroup, SharedPlacement
from actors.host import RoleHostActor, RoleView
from actors.policy import PolicyActor
from actors.reference import ReferenceActor
from actors.reward import RewardActor
from actors.teacher import TeacherActor
from launch.common import RunError, actor_env, engine_env, trainer_env
from rlhf_ray.agent import unreachable
from rlhf_ray.config import Config


@dataclass
class Actors:
    policy: RankGroup
    critic: RankGroup | None          # only the GAE estimator has one
    reference: RankGroup | None       # none with reference.from_policy_base: the policy's ranks answer for it
    reward: RankGroup | None          # none with distill.only: the teacher is the only signal
    engine_group: RankGroup
    placements: list = field(default_factory=list)   # shared placement groups of colocated roles
    judge: RankGroup | None = None    # the LLM judge's engines (a reward source of kind judge), weights never synced
    env: RankGroup | None = None      # environment workers of multi-turn rollouts (env.cls)
    teacher: RankGroup | None = None  # on-policy distillation's teacher (models.teacher), frozen like the reference
    agent: RankGroup | None = None    # agent workers running the user's agents (agent.cls)
    gateway: RankGroup | None = None  # the agents' OpenAI-compatible endpoint (actors/agent.py), one rank

    @property
    def engines(self) -> list:
        return self.engine_group.actors

    def groups(self) -> dict[str, RankGroup]:
        """Every role's rank group, by role."""
        every = {"policy": self.policy, "critic": self.critic, "reference": self.reference, "teacher": self.teacher,
                 "reward": self.reward, "engine": self.engine_group, "judge": self.judge, "env": self.env,
                 "agent": self.agent, "gateway": self.gateway}
        return {role: g for role, g in every.items() if g is not None}

    def attach(self) -> None:
        """Hand actors the handles of others they call, at start and after any replacement: the reward ranks'
        judge sources get the judge engines, the gateway the engines (and starts serving)."""
        if self.judge:
            self.reward.run("attach_judge", self.judge.actors)
        if self.gateway:
            self.gateway.run("attach_engines", self.engines)
            self.gateway.run("serve")

    @property
    def trained(self) -> dict[str, RankGroup]:
        return {"policy": self.policy, **({"critic": self.critic} if self.critic else {})}

    def shutdown(self) -> None:
        for g in self.groups().values():
            g.shutdown()
        for sp in self.placements:
            sp.remove()


def judge_group(cfg: Config, device: str, run_dir: Path, shared: SharedPlacement | None = None,
                wait: bool = True) -> RankGroup:
    """The LLM judge's engines: the policy's engine code serving judge.model (Config.judge_engine_config)."""
    jcfg, r = cfg.judge_engine_config(), cfg.role_section("judge")
    return RankGroup(EngineActor, "judge", r.num_ranks, r.cpus_per_rank, r.gpus_per_rank, (jcfg, device),
                     node_resource=r.node_resource, wait=wait, runtime_env=engine_env(jcfg, device, str(run_dir)),
                     shared=shared)


def build_actors(cfg: Config, device: str, run_dir: Path) -> Actors:
    """Every role's rank group. Roles listed together in placement.colocate share one placement group: rank i of
    each in bundle i, on the same node and the same GPU (each taking a share of it). Roles listed together in
    placement.share_process share rank i's worker process too (actors/host.py)."""
    args = (cfg, device)
    shared, placements = {}, []
    for members in cfg.placement.colocate:
        present = cfg.present(members)
        if len(present) < 2:
            continue
        res = [cfg.role_section(m) for m in present]          # same num_ranks and node_resource (checked)
        sp = SharedPlacement("+".join(present), res[0].num_ranks, sum(r.cpus_per_rank for r in res),
                             max(r.gpus_per_rank for r in res), len(present), res[0].node_resource)
        placements.append(sp)
        shared.update({m: sp for m in present})
    env = {"env_vars": actor_env(device)}
    engine_runtime = engine_env(cfg, device, str(run_dir))
    hosted = {}
    for members in map(cfg.present, cfg.placement.share_process):
        if len(members) < 2:
            continue
        res = [cfg.role_section(m) for m in members]          # same num_ranks and node_resource (checked)
        # the policy first (the hybrid layout: the process is its rank), vLLM last: it sets the process's threads
        ordered = sorted(members, key=lambda m: (m != "policy", m == "engine"))
        hosts = RankGroup(RoleHostActor, "+".join(members), res[0].num_ranks, sum(r.cpus_per_rank for r in res),
                          max(r.gpus_per_rank for r in res), ([(m, ROLE_CLASSES[m], args) for m in ordered],),
                          distributed="policy" in members, node_resource=res[0].node_resource, wait=False,
                          runtime_env=engine_runtime if "engine" in members else
                          trainer_env(cfg, device) if "policy" in members else env)
        hosted.update({m: RoleView(hosts, m) for m in members})

    def group(actor_cls, role, distributed=False, runtime=env, gpu_bundles=1):
        if role in hosted:
            return hosted[role]
        r = cfg.role_section(role)
        return RankGroup(actor_cls, role, r.num_ranks, r.cpus_per_rank, r.gpus_per_rank, args, distributed=distributed,
                         runtime_env=runtime, shared=shared.get(role), node_resource=r.node_resource,
                         gpu_bundles=gpu_bundles, wait=False)       # every role starts up side by side

    tp = cfg.engine.tensor_parallel_size
    engines = group(EngineActor, "engine", runtime=engine_runtime, gpu_bundles=tp if device == "cuda" and tp > 1 else 1)
    policy = group(PolicyActor, "policy", True, runtime=trainer_env(cfg, device))
    critic = group(CriticActor, "critic", True, runtime=trainer_env(cfg, device)) if cfg.needs_critic() else None
    reference = group(ReferenceActor, "reference", cfg.reference.zero_stage == 3) if cfg.needs_reference() else None
    teacher = group(TeacherActor, "teacher", cfg.teacher.zero_stage == 3) if cfg.needs_teacher() else None
    reward = group(RewardActor, "reward", cfg.reward.zero_stage == 3) if cfg.needs_reward() else None
    judge = judge_group(cfg, device, run_dir, shared.get("judge"), wait=False) if cfg.needs_judge() else None
    env_workers = group(EnvWorkerActor, "env") if cfg.needs_env() else None
    agents = group(AgentWorkerActor, "agent") if cfg.needs_agent() else None
    gateway = (RankGroup(GatewayActor, "gateway", 1, cfg.agent.gateway_cpus, 0, args, runtime_env=env,
                         node_resource=cfg.agent.node_resource, wait=False) if cfg.needs_agent() else None)
    every = (policy, critic, reference, teacher, reward, engines, judge, env_workers, agents, gateway)
    for g in every:
        if g:
            g.wait()
    ray.get([a.ready.remote() for g in every if g for a in g.actors])
    actors = Actors(policy, critic, reference, reward, engines, placements, judge, env_workers, teacher, agents,
                    gateway)
    if gateway:
        why = unreachable(cfg.agent.host, ray.get(gateway.actors[0].node_ip.remote()),
                          ray.get([a.node_ip.remote() for a in agents.actors]))
        if why:
            actors.shutdown()
            raise RunError(why)
    actors.attach()
    return actors


ROLE_CLASSES = {role: f"actors.{role}:{role.capitalize()}"             # the roles placement.share_process hosts,
                for role in ("policy", "reference", "teacher", "reward", "engine")}   # by name (actors/host.py)
