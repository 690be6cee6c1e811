"""The PPO driver: one readable loop per step, each phase named and timed.

    python -m launch.ppo --config configs/tiny_ppo.yaml [--set ppo.kl_coef=0.1 ...] [--resume [auto]]

With `ray.address` unset it starts a local Ray cluster on the spot; under `ray job submit` (or with
`ray.address: auto`) it joins the cluster it runs on. The driver holds no model weights: it moves token ids
and padded tensors between the actors and does the (cheap) advantage math.
"""
from __future__ import annotations

import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import ray
import torch

from actors.critic import CriticActor
from actors.engine import Engine, EngineActor
from actors.env import EnvWorkerActor
from actors.group import RankGroup, SharedPlacement
from actors.host import RoleHostActor, RoleView
from actors.policy import PolicyActor
from actors.reference import Reference, ReferenceActor
from actors.reward import Reward, RewardActor
from actors.weight_sync import WeightSync, make_weight_sync
from launch.common import (RunError, actor_env, cause_line, cluster_device, engine_env, mean_over_ranks, run_cli,
                           start_ray, trainer_env)
from rlhf_ray import checkpoint as ckpt
from rlhf_ray import preflight
from rlhf_ray.algos import (ScoreNorm, adaptive_kl_coef, compute_experience, groups_with_signal, missing_eos_penalty,
                            overlong_penalty, trainable_groups)
from rlhf_ray.batch import (RewardScores, RolloutBatch, Sample, cat, first_rollouts, merge_round_robin,
                            response_texts, rollout_from_samples, select, split_round_robin)
from rlhf_ray.config import Config, dump_config, resolve_paths
from rlhf_ray.data import PromptStream
from rlhf_ray.env import env_stop_ids, episode_metrics
from rlhf_ray.guard import DivergenceGuard
from rlhf_ray.metrics import MetricsLogger, process_started_at, startup_report
from rlhf_ray.prompts import render_prompts
from rlhf_ray.seeds import derive_seed

IMPORTED_AT = time.time()          # the driver's imports (torch, Ray, the actor modules) done


# ------------------------------------------------------------------------------------------------ setup

@dataclass
class Actors:
    policy: RankGroup
    critic: RankGroup | None          # only the GAE estimator has one
    reference: RankGroup | None       # none with reference.from_policy_base: the policy's ranks answer for it
    reward: RankGroup
    engine_group: RankGroup
    placements: list = field(default_factory=list)   # shared placement groups of colocated roles
    judge: RankGroup | None = None    # the LLM judge's engines (a reward source of kind judge), weights never synced
    env: RankGroup | None = None      # environment workers of multi-turn rollouts (env.cls)

    @property
    def engines(self) -> list:
        return self.engine_group.actors

    def groups(self) -> dict[str, RankGroup]:
        """Every role's rank group, by role."""
        return {"policy": self.policy, **({"critic": self.critic} if self.critic else {}),
                **({"reference": self.reference} if self.reference else {}), "reward": self.reward,
                "engine": self.engine_group,
                **({"judge": self.judge} if self.judge else {}), **({"env": self.env} if self.env else {})}

    def attach_judge(self) -> None:
        """The reward ranks' judge sources get the judge engines' handles: at start and after any replacement."""
        if self.judge:
            self.reward.run("attach_judge", self.judge.actors)

    @property
    def trained(self) -> dict[str, RankGroup]:
        return {"policy": self.policy, **({"critic": self.critic} if self.critic else {})}

    def shutdown(self) -> None:
        for g in self.groups().values():
            g.shutdown()
        for sp in self.placements:
            sp.remove()


def role_resources(cfg: Config, role: str) -> tuple[int, float, float, str | None]:
    """(ranks, CPUs per rank, GPUs per rank, node_resource) of a role; an engine's rank is a whole engine."""
    if role in ("engine", "judge"):
        e = cfg.engine if role == "engine" else cfg.judge.engine
        return e.num_engines, e.cpus_per_engine, e.gpus_per_engine * e.tensor_parallel_size, e.node_resource
    if role == "env":
        return cfg.env.num_workers, cfg.env.cpus_per_worker, 0.0, None
    rc = getattr(cfg, role)
    return rc.num_ranks, rc.cpus_per_rank, rc.gpus_per_rank, rc.node_resource


def judge_group(cfg: Config, device: str, run_dir: Path, shared: SharedPlacement | None = None,
                wait: bool = True) -> RankGroup:
    """The LLM judge's engines: the policy's engine code serving judge.model (Config.judge_engine_config)."""
    jcfg = cfg.judge_engine_config()
    n, cpus, gpus, node = role_resources(cfg, "judge")
    return RankGroup(EngineActor, "judge", n, cpus, gpus, (jcfg, device), node_resource=node, wait=wait,
                     runtime_env=engine_env(jcfg, device, str(run_dir)), shared=shared)


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
        res = [role_resources(cfg, m) for m in present]
        sp = SharedPlacement("+".join(present), res[0][0], sum(r[1] for r in res), max(r[2] for r in res),
                             len(present), res[0][3])
        placements.append(sp)
        shared.update({m: sp for m in present})
    env = {"env_vars": actor_env(device)}
    engine_runtime = engine_env(cfg, device, str(run_dir))
    hosted = {}
    for members in map(cfg.present, cfg.placement.share_process):
        if len(members) < 2:
            continue
        res = [role_resources(cfg, m) for m in members]
        ordered = sorted(members, key=lambda m: m == "engine")     # vLLM last: it sets the process's threads
        hosts = RankGroup(RoleHostActor, "+".join(members), res[0][0], sum(r[1] for r in res), max(r[2] for r in res),
                          ([(m, ROLE_CLASSES[m], args) for m in ordered],), node_resource=res[0][3], wait=False,
                          runtime_env=engine_runtime if "engine" in members else env)
        hosted.update({m: RoleView(hosts, m) for m in members})

    def group(actor_cls, role, distributed=False, runtime=env, gpu_bundles=1):
        if role in hosted:
            return hosted[role]
        n, cpus, gpus, node = role_resources(cfg, role)
        return RankGroup(actor_cls, role, n, cpus, gpus, args, distributed=distributed, runtime_env=runtime,
                         shared=shared.get(role), node_resource=node, gpu_bundles=gpu_bundles,
                         wait=False)       # every role starts up side by side

    tp = cfg.engine.tensor_parallel_size
    engines = group(EngineActor, "engine", runtime=engine_runtime, gpu_bundles=tp if device == "cuda" and tp > 1 else 1)
    policy = group(PolicyActor, "policy", True, runtime=trainer_env(cfg, device))
    critic = group(CriticActor, "critic", True, runtime=trainer_env(cfg, device)) if cfg.needs_critic() else None
    reference = group(ReferenceActor, "reference", cfg.reference.zero_stage == 3) if cfg.needs_reference() else None
    reward = group(RewardActor, "reward", cfg.reward.zero_stage == 3)
    judge = judge_group(cfg, device, run_dir, shared.get("judge"), wait=False) if cfg.needs_judge() else None
    env_workers = group(EnvWorkerActor, "env") if cfg.needs_env() else None
    every = (policy, critic, reference, reward, engines, judge, env_workers)
    for g in every:
        if g:
            g.wait()
    ray.get([a.ready.remote() for g in every if g for a in g.actors])
    actors = Actors(policy, critic, reference, reward, engines, placements, judge, env_workers)
    actors.attach_judge()
    return actors


ROLE_CLASSES = {"reference": Reference, "reward": Reward, "engine": Engine}     # roles placement.share_process hosts


class PhaseTimer:
    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.started = time.time()       # the step's start, wall clock: time/start (consecutive rows: whole steps)

    @contextmanager
    def __call__(self, name: str):
        t0 = time.perf_counter()
        yield
        self.seconds[name] = time.perf_counter() - t0


# ------------------------------------------------------------------------------------------------ rollouts

class RolloutError(RunError):
    """A generation that failed on an engine; the message is one line naming the step."""


@dataclass
class Rollout:
    """One step's generation: started on the engines (Ray futures, so the driver can go on), collected later."""
    step: int
    prompt_ids: list[list[int]]       # rendered prompts, one per data row
    prompts: list                     # the rows' prompt strings, one per sample (text reward sources see them)
    extras: dict                      # data.reward_keys fields, one entry per sample
    refs: list                        # one ObjectRef per engine that got prompts
    stream_state: dict                # the prompt stream's position before this rollout drew its prompts


def start_rollout(cfg: Config, actors: Actors, tokenizer, stream: PromptStream, step: int,
                  round_: int = 0) -> Rollout:
    """Draw the step's prompts and split them over the engines, n samples (or, with env.cls, n multi-turn episodes)
    each; returns without waiting. The sampling seed derives from (run seed, step, engine, and the round past the
    first of dynamic sampling), so when a rollout starts does not change its samples."""
    state, rows, g = stream.state(), stream.next(), cfg.generation
    where = (step,) if not round_ else (step, round_)
    keys = cfg.data.reward_keys           # row fields for rule/HTTP rewards and environments, one entry per sample
    prompts = [r["prompt"] for r in rows] if keys else rows
    ids = render_prompts(tokenizer, prompts, cfg.data)
    engines = actors.engines
    if actors.env:
        fields = [r if keys else {"prompt": r} for r in rows]
        stop = env_stop_ids(tokenizer, cfg.env.turn_stop)
        refs = [e.episodes.remote(part, rows_part, g.n, g.max_new_tokens, g.temperature, g.top_p,
                                  derive_seed(cfg.run.seed, "sample", *where, i), cfg.env, stop, actors.env.actors)
                for i, (e, part, rows_part) in enumerate(zip(engines, split_round_robin(ids, len(engines)),
                                                             split_round_robin(fields, len(engines)))) if part]
    else:
        refs = [e.generate.remote(part, g.n, g.max_new_tokens, g.temperature, g.top_p,
                                  derive_seed(cfg.run.seed, "sample", *where, i))
                for i, (e, part) in enumerate(zip(engines, split_round_robin(ids, len(engines)))) if part]
    return Rollout(step, ids, [p for p in prompts for _ in range(g.n)],
                   {k: [r[k] for r in rows for _ in range(g.n)] for k in keys}, refs, state)


def collect_rollout(cfg: Config, rollout: Rollout, pad_id: int) -> tuple[RolloutBatch, list[dict] | None]:
    """Wait for a rollout: one padded batch (prompt-major) with each sample's weight version, and for multi-turn
    episodes each one's summary (rlhf_ray/env.py Episode.summary; None single-turn). An engine's failure becomes a
    one-line RolloutError, never a hang."""
    return padded(cfg, rollout.prompt_ids, collect_samples(cfg, rollout), pad_id)


def collect_samples(cfg: Config, rollout: Rollout) -> list[Sample]:
    """Wait for a rollout's samples, prompt-major (n per prompt)."""
    try:
        parts = ray.get(rollout.refs)
    except (ray.exceptions.RayTaskError, ray.exceptions.RayActorError) as e:
        raise RolloutError(f"rollout for step {rollout.step} failed on an engine: {cause_line(e)}") from None
    return merge_round_robin(parts, len(rollout.prompt_ids), cfg.generation.n)


def padded(cfg: Config, prompt_ids: list[list[int]], samples: list[Sample],
           pad_id: int) -> tuple[RolloutBatch, list[dict] | None]:
    batch = rollout_from_samples([p for p in prompt_ids for _ in range(cfg.generation.n)], samples, pad_id)
    return batch, [s["episode"] for s in samples] if samples and "episode" in samples[0] else None


@dataclass
class Filled:
    """A step's samples after dynamic sampling (rollout.filter_groups): the groups it trains on, their rewards
    (computed to find them) and what finding them took."""
    batch: RolloutBatch | None         # the trained groups, prompt-major (None: too few to fill a minibatch)
    episodes: list[dict] | None
    rewards: RewardScores | None
    stats: dict                        # the filter/* metrics


def fill_groups(run: "Run", step: int, rollout: Rollout) -> Filled:
    """DAPO's dynamic sampling. Score each round of generation.prompts_per_step prompts and keep the groups whose n
    rewards are not all equal; while fewer than prompts_per_step are kept, draw the next round from the prompt
    stream (its sampling seeded by step and round), up to rollout.max_rounds rounds. The step trains on the first
    prompts_per_step kept groups, or, past the bound, on those that fill whole minibatches (`trainable_groups`:
    possibly none). Rewards are compared as the sources gave them, before length shaping (DAPO filters on
    accuracy). Every round runs on the weights of the last sync, so the extra samples are on-policy."""
    cfg, g, pad = run.cfg, run.cfg.generation, run.tokenizer.pad_token_id
    kept: list[tuple[list[int], list[Sample], RewardScores]] = []      # per group: prompt, samples, their rewards
    totals = []
    for r in range(cfg.rollout.max_rounds):
        if r:
            rollout = start_rollout(cfg, run.actors, run.tokenizer, run.stream, step, r)
        samples = collect_samples(cfg, rollout)
        batch, _ = padded(cfg, rollout.prompt_ids, samples, pad)
        rewards = cat(ray.get(run.actors.reward.call("scores", ray.put(batch), rollout.prompts, rollout.extras)))
        turns = env_rewards(cfg, batch, rewards)
        totals.append(rewards.total if turns is None else rewards.total + turns.sum(-1))
        for j in groups_with_signal(totals[-1], g.n).nonzero().flatten().tolist():
            rows = torch.arange(j * g.n, (j + 1) * g.n)
            kept.append((rollout.prompt_ids[j], samples[j * g.n:(j + 1) * g.n], select(rewards, rows)))
        if len(kept) >= g.prompts_per_step:
            break
    rounds, drawn = len(totals), len(totals) * g.prompts_per_step
    take = trainable_groups(len(kept), g.prompts_per_step, g.n, cfg.ppo.minibatch_size)
    stats = {"filter/rounds": rounds, "filter/uniform_frac": 1 - len(kept) / drawn,
             "filter/signal_groups": len(kept), "filter/groups": take,
             "filter/extra_samples": (rounds - 1) * g.prompts_per_step * g.n,
             "filter/short": float(take < g.prompts_per_step), "filter/skipped": float(take == 0),
             "filter/reward_all_mean": torch.cat(totals).mean().item()}
    if not take:
        return Filled(None, None, None, stats)
    kept = kept[:take]
    batch, episodes = padded(cfg, [k[0] for k in kept], [s for k in kept for s in k[1]], pad)
    return Filled(batch, episodes, cat([k[2] for k in kept]), stats)


def rollout_done(rollout: Rollout | None) -> None:
    """Block until the engines have finished generating `rollout` (its results stay in the object store)."""
    if rollout is not None:
        ray.wait(rollout.refs, num_returns=len(rollout.refs), fetch_local=False)


PENDING_ROLLOUT = "pending_rollout.pt"


def save_checkpoint(run: "Run", step: int, data_state: dict, pending: Rollout | None) -> Path:
    """The trained models, their DeepSpeed state and the loop's state. A next rollout already drawn by older
    weights than this checkpoint's (rollout.max_staleness 1) is saved with it, so a resumed run trains on the
    samples the uninterrupted run would have."""
    cfg = run.cfg
    root = ckpt.checkpoint_root(run.run_dir)
    staging = ckpt.begin(root, step)
    ray.get([ref for name, group in run.actors.trained.items()
             for ref in group.call("save_hf", str(staging / name), run.tok_dir)
             + group.call("save_ds", str(staging / f"{name}_ds"))])
    if pending is not None and cfg.rollout.max_staleness:
        torch.save({"step": pending.step, "prompt_ids": pending.prompt_ids, "prompts": pending.prompts,
                    "extras": pending.extras, "parts": ray.get(pending.refs)}, staging / PENDING_ROLLOUT)
    final = ckpt.commit(root, step, {"step": step, "data": data_state, "seed": cfg.run.seed, "kl_coef": run.kl.coef,
                                     "score_norm": run.norm.state(), "guard_strikes": run.guard.strikes})
    ckpt.prune(root, cfg.checkpoint.keep)
    return final


def resume_point(run_dir: Path, resume: bool | str) -> Path | None:
    """The checkpoint to continue from: None without --resume, else the newest whole one (a damaged newer one is
    passed over with a one-line warning). Finding none is an error, unless resume is "auto" (then: start fresh)."""
    if not resume:
        return None
    root, skipped = ckpt.checkpoint_root(run_dir), []
    latest = ckpt.latest(root, skipped)
    for why in skipped:
        print(f"warning: checkpoint {why}: passed over for an older one", flush=True)
    if latest is None and resume != "auto":
        raise RunError(f"--resume: no complete checkpoint under {root} (--resume auto starts fresh when there is none)")
    if latest is None:
        print(f"--resume auto: no complete checkpoint under {root}; starting fresh", flush=True)
    return latest


def resumed_rollout(latest: Path, stream: PromptStream) -> Rollout | None:
    """The rollout a checkpoint saved for its next step, if any; the stream moves past its prompts."""
    path = latest / PENDING_ROLLOUT
    if not path.is_file():
        return None
    saved = torch.load(path, weights_only=True)
    state = stream.state()
    stream.next()
    return Rollout(saved["step"], saved["prompt_ids"], saved["prompts"], saved["extras"],
                   [ray.put(part) for part in saved["parts"]], state)


def restore(run: "Run", latest: Path | None, push: bool) -> tuple[int, Rollout | None]:
    """Put the trained roles and the loop's state where checkpoint `latest` left them (None: where a fresh run
    starts), push the policy to the engines if `push`, and start (or reload) the next step's rollout. Returns the
    step the state belongs to and that rollout."""
    cfg = run.cfg
    state = ckpt.load_state(latest) if latest is not None else {"step": 0, "data": {"epoch": 0, "pos": 0}}
    if latest is not None:
        ray.get([r for name, g in run.actors.trained.items() for r in g.call("load_ds", str(latest / f"{name}_ds"))])
    run.stream.load_state(state["data"])
    run.kl.coef = state.get("kl_coef", cfg.ppo.kl_coef)
    run.norm.load(state.get("score_norm"))
    run.guard.strikes = state.get("guard_strikes", 0)
    step = state["step"]
    if push:
        run.sync.push(version=step)
    rollout = resumed_rollout(latest, run.stream) if latest is not None else None
    if rollout is None and step < cfg.train.steps:
        rollout = start_rollout(cfg, run.actors, run.tokenizer, run.stream, step + 1)
    return step, rollout


def recover(run: "Run", step: int, error: BaseException, latest: Path | None) -> tuple[int, Rollout | None]:
    """An actor died during `step`: replace it in its placement group, roll every role back to checkpoint `latest`
    (a trainer's ZeRO state is partitioned, and the survivors may have updated part-way through the step) and
    replay from there, so the run ends as it would have without the fault. Returns the step to run next and its
    rollout. An error with no dead actor (a bug, a bad input) is re-raised; past
    fault_tolerance.max_actor_restarts, a one-line RunError."""
    cfg, actors = run.cfg, run.actors
    dead = dead_actors(actors, cfg.fault_tolerance.probe_timeout_s)
    if not dead:
        raise error
    who = ", ".join(f"{role} rank {rank}" for role, rank in dead)
    cause = str(error) if isinstance(error, RunError) else cause_line(error)
    if run.restarts >= cfg.fault_tolerance.max_actor_restarts:
        raise RunError(f"step {step}: {who} died ({cause}); fault_tolerance.max_actor_restarts "
                       f"({cfg.fault_tolerance.max_actor_restarts}) already used") from None
    run.restarts += 1
    groups = actors.groups()
    respawned = {role for role, _ in dead}
    if latest is None:                  # no checkpoint to roll back to: every trained role starts over
        respawned |= set(actors.trained)
    bases: dict[int, tuple] = {}       # roles sharing processes are respawned together, once
    for role in sorted(respawned):
        base = groups[role].base
        bases.setdefault(id(base), (base, set()))[1].update(rank for r, rank in dead if r == role)
    for base, ranks in bases.values():
        base.respawn(sorted(ranks))
    run.sync = make_weight_sync(cfg, actors.policy, actors.engines)
    actors.attach_judge()
    back_to = ckpt.load_state(latest)["step"] if latest is not None else 0
    run.logger.rewind(back_to)
    print(f"step {step}: {who} died ({cause}); replaced {', '.join(sorted(respawned))}, replaying from step "
          f"{back_to + 1} (restart {run.restarts} of {cfg.fault_tolerance.max_actor_restarts})", flush=True)
    back_to, rollout = restore(run, latest, push=True)
    return back_to + 1, rollout


def dead_actors(actors: "Actors", timeout: float) -> list[tuple[str, int]]:
    """(role, rank) of every actor that is dead: each is asked whether it is ready, and the dead answer with an
    error at once (a live one busy past `timeout`, e.g. stuck in a collective with a dead peer, is not counted:
    its group is replaced whole when a peer died)."""
    probes = {(role, i): a.ready.remote() for role, g in actors.groups().items() for i, a in enumerate(g.actors)}
    ray.wait(list(probes.values()), num_returns=len(probes), timeout=timeout)
    dead = []
    for key, ref in probes.items():
        try:
            ray.get(ref, timeout=0)
        except ray.exceptions.RayActorError:
            dead.append(key)
        except ray.exceptions.GetTimeoutError:
            pass
    return dead


# ------------------------------------------------------------------------------------------------ the loop

class KLCoef:
    """The KL penalty's coefficient: fixed, or adapted toward ppo.kl_target after every step."""

    def __init__(self, ppo):
        self.ppo, self.coef = ppo, ppo.kl_coef

    def update(self, observed_kl: float) -> None:
        if self.ppo.kl_target is not None:
            self.coef = adaptive_kl_coef(self.coef, observed_kl, self.ppo.kl_target, self.ppo.kl_horizon)


@dataclass
class Run:
    """What lives for the whole run: the config, the actors and the sync channel, the data and the loop's state."""
    cfg: Config
    actors: Actors
    sync: WeightSync
    tokenizer: object
    stream: PromptStream
    logger: MetricsLogger
    run_dir: Path
    tok_dir: str
    kl: KLCoef
    norm: ScoreNorm
    guard: DivergenceGuard
    gold_fn: object = None
    restarts: int = 0                 # actor deaths recovered from so far (fault_tolerance.max_actor_restarts)
    startup: dict | None = None       # the driver's start-up marks, until the first step reports them


def ppo_step(run: Run, step: int, rollout: Rollout) -> tuple[Rollout | None, Path | None]:
    """One PPO iteration on `rollout`, this step's samples. Returns the next step's rollout, already started on
    the engines, and the checkpoint written at the step's end, if any."""
    cfg, actors, ppo = run.cfg, run.actors, run.cfg.ppo
    timer, t_step = PhaseTimer(), time.perf_counter()
    last = step == cfg.train.steps
    overlap = cfg.rollout.max_staleness > 0 and not last
    next_rollout = None

    # 1. rollout: this step's samples, stamped with the weight version that drew them. With rollout.max_staleness
    #    1 the next step's sampling starts now, on the same weights, while the trainers work on this one
    #    (rollout.filter_groups: only groups whose rewards differ, more rounds of prompts until there are enough)
    with timer("rollout_wait"):
        filled = fill_groups(run, step, rollout) if cfg.rollout.filter_groups else None
        batch, episodes = (filled.batch, filled.episodes) if filled else \
            collect_rollout(cfg, rollout, run.tokenizer.pad_token_id)
        if cfg.placement.engines_sleep:            # colocated engines free their GPU memory for the trainers
            ray.get([e.sleep.remote() for e in actors.engines])
    if overlap:
        next_rollout = start_rollout(cfg, actors, run.tokenizer, run.stream, step + 1)
    if batch is None:                              # no whole minibatch of groups with signal: no update
        return idle_step(run, step, next_rollout, filled, timer, t_step)
    staleness = (step - 1) - batch.version         # policy updates between the sampling weights and this step's
    if int(staleness.max()) > cfg.rollout.max_staleness:
        raise RunError(f"step {step}: samples {int(staleness.max())} updates old, over rollout.max_staleness")
    batch_ref = ray.put(batch)

    # 2. score, in parallel on their actors: policy (old) and reference logprobs, critic values (GAE only),
    #    rewards from every source (reward models, rules, remote scorers), weighted and summed; an environment's
    #    came with the rollout, per turn
    with timer("score"):
        ref_refs = actors.reference.call("logprobs", batch_ref) if actors.reference else \
            actors.policy.call("reference_logprobs", batch_ref)        # reference.from_policy_base
        reward_refs = None if filled else actors.reward.call("scores", batch_ref, rollout.prompts, rollout.extras)
        old_refs = None if ppo.reuse_sample_logprobs else actors.policy.call("logprobs", batch_ref)
        value_refs = actors.critic.call("values", batch_ref) if actors.critic else None
        ref_logprobs = torch.cat(ray.get(ref_refs))
        rewards: RewardScores = filled.rewards if filled else cat(ray.get(reward_refs))
        old_logprobs = torch.cat(ray.get(old_refs)) if old_refs else batch.sample_logprobs   # reused: the engines'
        values = torch.cat(ray.get(value_refs)) if value_refs else None
        scores = missing_eos_penalty(rewards.total, batch.finished, ppo.missing_eos_penalty)
        scores = run.norm(scores + overlong_penalty(batch.response_mask.sum(-1), cfg.generation.max_new_tokens,
                                                    ppo.overlong_buffer, ppo.overlong_penalty))
        turn_rewards = env_rewards(cfg, batch, rewards)

    # 3. advantages: KL to the reference (in the reward or as a loss term), then the chosen estimator; importance
    #    weights between the sampling policy and pi_old (ppo.is_correction)
    with timer("advantage"):
        exp, exp_stats = compute_experience(
            batch, old_logprobs, ref_logprobs, values, scores, estimator=ppo.advantage, n=cfg.generation.n,
            kl_coef=run.kl.coef, kl_estimator=ppo.kl_estimator, kl_in_reward=ppo.kl_placement == "reward",
            gamma=ppo.gamma, lam=ppo.lam, whiten_advantages=ppo.whiten_advantages, grpo_norm_std=ppo.grpo_norm_std,
            is_correction=ppo.is_correction, is_cap=ppo.is_cap, token_rewards=turn_rewards,
            no_loss=~batch.finished if ppo.mask_truncated else None)
    exp_ref = ray.put(exp)

    # 4. epochs over minibatches: clipped surrogate on the policy (+ KL loss), clipped value loss on the critic
    with timer("train"):
        train_refs = {name: g.call("train", exp_ref, step, run.kl.coef) for name, g in actors.trained.items()}
        stats = {name: mean_over_ranks(ray.get(r)) for name, r in train_refs.items()}

    # 5. weight sync, policy -> every engine, between generations: an overlapping one finishes first
    with timer("next_rollout_wait"):
        rollout_done(next_rollout)
    with timer("weight_sync"):
        if cfg.placement.engines_sleep:
            ray.get([e.wake_up.remote() for e in actors.engines])
        sync_stats = run.sync.push(version=step)
    busy = busy_seconds(actors)                    # every actor is idle here
    judged = judge_stats(actors)
    if not overlap and not last:
        next_rollout = start_rollout(cfg, actors, run.tokenizer, run.stream, step + 1)

    metrics = step_metrics(run, batch, rewards, old_logprobs, scores, exp_stats, stats, sync_stats, staleness, timer,
                           busy, time.perf_counter() - t_step, judged, episodes)
    if filled:
        metrics.update(filled.stats)
    run.kl.update(exp_stats["kl/ref_per_seq"])
    run.logger.log(step, metrics)
    total = scores if turn_rewards is None else scores + turn_rewards.sum(-1)     # an environment's rewards too
    run.logger.log_samples(step, [{**r, "score": s} for r, s in zip(
        first_rollouts(run.tokenizer, batch, cfg.logging.samples_per_step), total.tolist())])
    print(step_line(cfg, step, metrics), flush=True)
    if run.startup is not None:
        report_startup(run)

    # 6. the divergence guard, then a checkpoint: never of a diverged state
    stop, healthy = run.guard.check(step, metrics)
    if stop:
        raise RunError(stop)
    return next_rollout, step_checkpoint(run, step, next_rollout, healthy)


def step_checkpoint(run: Run, step: int, next_rollout: Rollout | None, healthy: bool) -> Path | None:
    """The checkpoint at the end of `step`, if one is due (checkpoint.every, the last step) and the step is healthy."""
    cfg = run.cfg
    if not (step == cfg.train.steps or (cfg.checkpoint.every and step % cfg.checkpoint.every == 0)):
        return None
    if not healthy:
        print(f"step {step}: checkpoint held back: KL to the reference over guard.max_kl_per_token", flush=True)
        return None
    data_state = next_rollout.stream_state if next_rollout else run.stream.state()
    return save_checkpoint(run, step, data_state, next_rollout)


def idle_step(run: Run, step: int, next_rollout: Rollout | None, filled: Filled, timer: PhaseTimer,
              t_step: float) -> tuple[Rollout | None, Path | None]:
    """The rest of a step whose dynamic sampling found too few groups with signal for one minibatch within
    rollout.max_rounds: no update. The engines still get the step's weight version (the same weights), so
    staleness keeps counting updates; the filter/* metrics are logged, the next rollout starts, a checkpoint is
    written when due."""
    cfg, actors = run.cfg, run.actors
    with timer("next_rollout_wait"):
        rollout_done(next_rollout)
    with timer("weight_sync"):
        if cfg.placement.engines_sleep:
            ray.get([e.wake_up.remote() for e in actors.engines])
        run.sync.push(version=step)
    busy_seconds(actors), judge_stats(actors)      # this step's busy time and judge counts are not the next one's
    if next_rollout is None and step < cfg.train.steps:
        next_rollout = start_rollout(cfg, actors, run.tokenizer, run.stream, step + 1)
    metrics = {**filled.stats, **{f"time/{k}": v for k, v in timer.seconds.items()},
               "time/step": time.perf_counter() - t_step, "time/start": timer.started, "kl/coef": run.kl.coef,
               "fault/actor_restarts": run.restarts}
    run.logger.log(step, metrics)
    print(f"step {step}/{cfg.train.steps}  no update: {filled.stats['filter/signal_groups']} groups with differing "
          f"rewards in {filled.stats['filter/rounds']} rounds (rollout.max_rounds), too few for a minibatch", flush=True)
    if run.startup is not None:
        report_startup(run)
    return next_rollout, step_checkpoint(run, step, next_rollout, healthy=True)


def report_startup(run: Run) -> None:
    """After the first step: one line on where the start-up went, and startup.json with every actor's phases."""
    run.startup["first_step"] = time.time()
    marks = {f"{role} {i}": m for role, g in run.actors.groups().items()
             for i, m in enumerate(ray.get([a.startup_marks.remote() for a in g.actors]))}
    line, table = startup_report(run.startup, marks)
    print(line, flush=True)
    (run.run_dir / "startup.json").write_text(json.dumps(table, indent=1))
    run.startup = None


def env_rewards(cfg: Config, batch: RolloutBatch, rewards: RewardScores) -> torch.Tensor | None:
    """Multi-turn: the environment's per-turn rewards times its source's weight, each on its turn's last action
    token (the advantages add them to r_t); its column of `rewards.sources` gets each episode's sum. None for a
    single-turn rollout."""
    if batch.token_rewards is None:
        return None
    i, src = next((i, s) for i, s in enumerate(cfg.reward_sources()) if s.kind == "env")
    rewards.sources[:, i] = batch.token_rewards.sum(-1)
    return src.weight * batch.token_rewards


def busy_seconds(actors: Actors) -> dict[str, dict[str, float]]:
    """Each role's busy time since the last call, per work method, of its busiest rank; called at the end of a
    step, when no actor is working."""
    refs = {role: [a.take_busy.remote() for a in g.actors] for role, g in actors.groups().items()}
    return {role: max(ray.get(r), key=lambda spent: sum(spent.values())) for role, r in refs.items()}


def judge_stats(actors: Actors) -> dict | None:
    """The judge sources' counts since the last call, summed over the reward ranks (None: no judge)."""
    if not actors.judge:
        return None
    total: dict = {}
    for stats in actors.reward.run("judge_stats"):
        for k, v in stats.items():
            total[k] = total.get(k, 0) + v
    return total


def step_metrics(run: Run, batch: RolloutBatch, rewards: RewardScores, old_logprobs: torch.Tensor,
                 scores: torch.Tensor, exp_stats: dict, stats: dict, sync_stats: dict, staleness: torch.Tensor,
                 timer: PhaseTimer, busy: dict, step_seconds: float, judged: dict | None = None,
                 episodes: list[dict] | None = None) -> dict:
    """The step's metrics row (metrics.jsonl and W&B): rollout, rewards, losses, staleness and importance
    weights, each phase's wall time and each role's busy time."""
    cfg, p = run.cfg, stats["policy"]
    mask = batch.response_mask
    sources = cfg.reward_sources()
    generating = busy["engine"].get("generate", 0.0) + busy["engine"].get("episodes", 0.0)
    m = {
        **exp_stats,
        "response/finished_frac": batch.finished.float().mean().item(),
        "response/length_mean": mask.sum(-1).mean().item(),
        "policy/loss": p["loss"], "policy/clipfrac": p["clipfrac"], "policy/clipfrac_low": p["clipfrac_low"],
        "policy/clipfrac_high": p["clipfrac_high"], "policy/approx_kl": p["approx_kl"],
        "policy/entropy": p["entropy"], **{f"policy/{k}": p[k] for k in ("kl_loss", "dual_clipfrac") if k in p},
        "policy/skipped_steps": p["skipped_steps"],
        **{f"reward/source{i}_{s.kind}_mean": rewards.sources[:, i].mean().item()
           for i, s in enumerate(sources) if len(sources) > 1},
        "rollout/logprob_diff_max": (p["logprob_diff_max"] if cfg.ppo.reuse_sample_logprobs else
                                     ((batch.sample_logprobs - old_logprobs).abs() * batch.action_mask).max().item()),
        "rollout/staleness_mean": staleness.float().mean().item(), "rollout/staleness_max": int(staleness.max()),
        "rollout/engine_version": int(batch.version.min()),
        "perf/tokens_per_s": batch.action_mask.sum().item() / max(generating, 1e-9),
        "perf/weight_sync_mb": sync_stats["bytes"] / 2 ** 20,
        **{f"time/{k}": v for k, v in timer.seconds.items()},
        "time/generate": generating, "time/policy_update": p["update_seconds"],
        "time/step": step_seconds, "time/start": timer.started,
        **{f"time/busy/{role}": sum(spent.values()) for role, spent in busy.items()},
        **{f"time/idle/{role}": max(0.0, step_seconds - sum(spent.values())) for role, spent in busy.items()},
        "kl/coef": run.kl.coef, "fault/actor_restarts": run.restarts,
    }
    if "critic" in stats:
        m.update({"value/loss": stats["critic"]["loss"], "value/clipfrac": stats["critic"]["vf_clipfrac"],
                  "value/skipped_steps": stats["critic"]["skipped_steps"],
                  "time/critic_update": stats["critic"]["update_seconds"]})
    if run.norm.mode != "none":          # reward/score_* are then the normalised scores PPO optimises
        m["reward/raw_score_mean"] = rewards.total.mean().item()
    if judged:                           # the LLM judge: answers scored, bounded failures, how sure it was
        answers = max(judged["answers"], 1)
        m.update({"judge/answers": judged["answers"], "judge/fallbacks": judged["fallbacks"],
                  "judge/retries": judged["retries"],
                  "judge/label_mass_mean": judged["label_mass"] / max(answers - judged["fallbacks"], 1),
                  "judge/answers_per_s": judged["answers"] / max(judged["seconds"], 1e-9),
                  "time/judge": judged["seconds"] / max(len(run.actors.reward.actors), 1)})
    if episodes is not None:             # multi-turn: turns, tokens, the environment's rewards, failures and counts
        m.update(episode_metrics(episodes))
    if rewards.monitor is not None:      # overoptimisation monitor: a held-out RM beside the proxy, every step
        m["monitor/score_mean"] = rewards.monitor.mean().item()
    if run.gold_fn is not None:          # the tiny world's hidden gold reward beside the proxy, every step
        gold = torch.tensor([run.gold_fn(t) for t in response_texts(run.tokenizer, batch)])
        m["gold/mean"], m["gold/std"] = gold.mean().item(), gold.std().item()
    return m


def step_line(cfg: Config, step: int, m: dict) -> str:
    """The one line a step prints."""
    vf = f"  vf {m['value/loss']:.4f}" if "value/loss" in m else ""
    stale = f"  stale {m['rollout/staleness_max']}" if cfg.rollout.max_staleness else ""
    return (f"step {step}/{cfg.train.steps}  score {m['reward/score_mean']:+.3f}±{m['reward/score_std']:.3f}"
            f"  kl {m['kl/ref_per_seq']:.4f}  pg {m['policy/loss']:+.4f}{vf}  len {m['response/length_mean']:.1f}"
            f"{stale}  | gen {m['time/generate']:.2f}s score {m['time/score']:.2f}s train {m['time/train']:.2f}s"
            f" sync {m['time/weight_sync']:.2f}s step {m['time/step']:.2f}s")


def tokenizer_beside_ray(cfg: Config, configs: dict):
    """The run's tokenizer (loading it imports transformers: seconds) while the Ray cluster starts (seconds too,
    mostly waiting on its processes). A tokenizer that does not fit stops a cluster this started, then is raised:
    no actor started."""
    joined = ray.is_initialized()
    with ThreadPoolExecutor(1) as pool:
        loading = pool.submit(preflight.ppo_tokenizer, cfg, configs)
        start_ray(cfg)
        try:
            return loading.result()
        except BaseException:
            if not joined:
                ray.shutdown()
            raise


def train(cfg: Config, resume: bool | str = False, keep_actors: bool = False, gold_fn=None) -> dict:
    """Run PPO to cfg.train.steps; returns where things were written (and the live actors if keep_actors).
    resume: True continues from the newest whole checkpoint (none is an error), "auto" also starts fresh.
    gold_fn(text) -> float, when given, is logged beside the proxy reward every step (the tiny world's monitor)."""
    startup = {"start": process_started_at() or IMPORTED_AT, "imports": IMPORTED_AT}
    cfg = resolve_paths(cfg.check_ppo())
    prompts, model_configs = preflight.ppo_inputs(cfg)   # every input checked before anything starts or is written
    run_dir = preflight.output_dir(cfg.run.output_dir)
    latest = resume_point(run_dir, resume)
    startup["inputs"] = time.time()
    tokenizer = tokenizer_beside_ray(cfg, model_configs)
    startup["ray_and_tokenizer"] = time.time()
    device = cluster_device(cfg, cfg.policy.gpus_per_rank)      # resolves train.dtype auto: the dump says what ran
    dump_config(cfg, run_dir / "config.yaml")
    torch.manual_seed(cfg.run.seed)
    tok_dir = cfg.models.tokenizer or cfg.models.policy
    stream = PromptStream(prompts, cfg.generation.prompts_per_step, cfg.run.seed, cfg.data.shuffle)

    actors = build_actors(cfg, device, run_dir)
    startup["actors"] = time.time()
    sync = make_weight_sync(cfg, actors.policy, actors.engines)
    for name, group in actors.trained.items():
        counts = ray.get(group.actors[0].parameter_counts.remote())
        rc = getattr(cfg, name)
        print(f"{name}: {counts['trainable']:,} of {counts['total']:,} parameters train"
              + (f" (LoRA on a {rc.quantization} base)" if rc.quantization != "none" else " (LoRA)" if rc.lora.rank
                 else ""), flush=True)
    if not cfg.needs_reference():
        print("reference: the policy's base, adapters switched off (reference.from_policy_base)", flush=True)

    start_step = ckpt.load_state(latest)["step"] if latest is not None else 0
    logger = MetricsLogger(run_dir, cfg, cfg.run.name, resume_step=start_step if latest is not None else None)
    run = Run(cfg, actors, sync, tokenizer, stream, logger, run_dir, tok_dir, KLCoef(cfg.ppo),
              ScoreNorm(cfg.ppo.reward_norm), DivergenceGuard(cfg.guard), gold_fn, startup=startup)
    last_ckpt = latest
    try:
        # a resumed policy differs from models.policy, which the engines loaded; so does a 4-bit one (it computes
        # with its dequantised base): either way the engines get the policy's own weights before they sample
        step, rollout = restore(run, latest, push=latest is not None or cfg.policy.quantization != "none")
        if latest is not None:
            print(f"resumed from {latest} (step {step})", flush=True)
        step += 1
        while step <= cfg.train.steps:
            try:
                rollout, saved = ppo_step(run, step, rollout)
                last_ckpt, step = saved or last_ckpt, step + 1
            except (ray.exceptions.RayError, RolloutError) as e:
                last_ckpt = ckpt.latest(ckpt.checkpoint_root(run_dir))
                step, rollout = recover(run, step, e, last_ckpt)
    except BaseException:
        logger.close()
        actors.shutdown()
        raise

    summary = {"run_dir": str(run_dir), "metrics": str(logger.path), "wandb": logger.wandb_dir,
               "checkpoint": str(last_ckpt) if last_ckpt else None}
    logger.close()
    if keep_actors:
        summary["actors"] = actors
    else:
        actors.shutdown()
    return summary


def main(argv: list[str] | None = None) -> int:
    t0 = time.time()
    summary = run_cli("rlhf-ray ppo", __doc__.splitlines()[0], lambda cfg, args: train(cfg, resume=args.resume), argv,
                      resume_flag=True)
    if isinstance(summary, int):              # bad input or a failed run: said in one line
        return summary
    print(f"\ndone in {time.time() - t0:.0f}s\n  metrics:    {summary['metrics']}\n  W&B run:    {summary['wandb']}"
          f"\n  checkpoint: {summary['checkpoint']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
