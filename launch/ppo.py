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
from dataclasses import dataclass
from typing import Protocol
from pathlib import Path

import ray
import torch

from actors.startup import startup_over
from actors.weight_sync import WeightSync, make_weight_sync
from launch.common import RunError, cause_line, cluster_device, mean_over_ranks, run_cli, start_ray
from launch.roles import Actors, build_actors
from launch.rollout import RolloutError, Rollouts, ScoredRollout, make_rollouts
from rlhf_ray import checkpoint as ckpt
from rlhf_ray import preflight
from rlhf_ray.algos import (AdvantageSettings, ScoreNorm, adaptive_kl_coef, compute_experience, missing_eos_penalty,
                            overlong_penalty)
from rlhf_ray.batch import first_rollouts, response_texts
from rlhf_ray.config import Config, dump_config, resolve_paths
from rlhf_ray.data import PromptStream
from rlhf_ray.env import episode_metrics, failure_line
from rlhf_ray.guard import DivergenceGuard
from rlhf_ray.metrics import MetricsLogger, process_started_at, startup_report

IMPORTED_AT = time.time()          # the driver's imports (torch, Ray, the actor modules) done


# ------------------------------------------------------------------------------------------------ phases

class PhaseTimer:
    """A step's phases, each timed (time/<phase>); a phase entered twice (dynamic sampling's rounds) adds up."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.started = time.time()       # the step's start, wall clock: time/start (consecutive rows: whole steps)
        self.t0 = time.perf_counter()

    @contextmanager
    def __call__(self, name: str):
        t0 = time.perf_counter()
        yield
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0


# ------------------------------------------------------------------------------------------------ checkpoints

def step_checkpoint(run: "Run", step: int, healthy: bool) -> Path | None:
    """The checkpoint at the end of `step`, if one is due (checkpoint.every, the last step) and the step is healthy."""
    cfg = run.cfg
    if not (step == cfg.train.steps or (cfg.checkpoint.every and step % cfg.checkpoint.every == 0)):
        return None
    if not healthy:
        print(f"step {step}: checkpoint held back: KL to the reference over guard.max_kl_per_token", flush=True)
        return None
    return save_checkpoint(run, step)


def save_checkpoint(run: "Run", step: int) -> Path:
    """The trained models, their DeepSpeed state and the loop's state. A next rollout already drawn by older
    weights than this checkpoint's (rollout.max_staleness 1) is saved with it, so a resumed run trains on the
    samples the uninterrupted run would have."""
    cfg = run.cfg
    root = ckpt.checkpoint_root(run.run_dir)
    staging = ckpt.begin(root, step)
    ray.get([ref for name, group in run.actors.trained.items()
             for ref in group.call("save_hf", str(staging / name), run.tok_dir)
             + group.call("save_ds", str(staging / f"{name}_ds"))])
    run.rollouts.save_pending(staging)
    final = ckpt.commit(root, step, {"step": step, "data": run.rollouts.data_state(), "seed": cfg.run.seed,
                                     "kl_coef": run.kl.coef, "score_norm": run.norm.state(),
                                     "guard_strikes": run.guard.strikes})
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


def restore(run: "Run", latest: Path | None, push: bool) -> int:
    """Put the trained roles and the loop's state where checkpoint `latest` left them (None: where a fresh run
    starts), push the policy to the engines if `push`, and start (or reload) the next step's rollout. Returns the
    step the state belongs to."""
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
    run.rollouts.restart(step, latest)
    return step


def recover(run: "Run", step: int, error: BaseException, latest: Path | None) -> int:
    """An actor died during `step`: replace it in its placement group, roll every role back to checkpoint `latest`
    (a trainer's ZeRO state is partitioned, and the survivors may have updated part-way through the step) and
    replay from there, so the run ends as it would have without the fault. Returns the step to run next. An error
    with no dead actor (a bug, a bad input) is re-raised; past fault_tolerance.max_actor_restarts, a one-line
    RunError."""
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
    actors.attach()
    back_to = ckpt.load_state(latest)["step"] if latest is not None else 0
    run.logger.rewind(back_to)
    busy_seconds(actors), judge_stats(actors)     # the failed step's counts must not land in the replayed step's row
    print(f"step {step}: {who} died ({cause}); replaced {', '.join(sorted(respawned))}, replaying from step "
          f"{back_to + 1} (restart {run.restarts} of {cfg.fault_tolerance.max_actor_restarts})", flush=True)
    return restore(run, latest, push=True) + 1


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
    rollouts: Rollouts                # where each step's scored samples come from (launch/rollout.py)
    advantage: AdvantageSettings      # the ppo section's advantage keys (rlhf_ray/algos.py)
    logger: MetricsLogger
    run_dir: Path
    tok_dir: str
    kl: KLCoef
    norm: ScoreNorm
    guard: DivergenceGuard
    gold_fn: object = None
    watch: "Watch | None" = None      # sees each step's samples; may end the run early (Watch.stop)
    restarts: int = 0                 # actor deaths recovered from so far (fault_tolerance.max_actor_restarts)
    startup: dict | None = None       # the driver's start-up marks, until the first step reports them


class Watch(Protocol):
    """What watches a PPO run from outside the loop (the pipeline's audit, launch/rounds.py): it sees each step's
    scored samples and metrics, returns metrics of its own, and sets `stop` (why) to end the run after that step."""
    stop: str | None

    def observe(self, step: int, scored: ScoredRollout, metrics: dict) -> dict: ...


def ppo_step(run: Run, step: int) -> Path | None:
    """One PPO iteration, phase by phase, each phase timed; returns the checkpoint written at its end, if one was
    due. How the samples are drawn (one or many turns, dynamic sampling, one step off the policy, sleeping
    engines) is the rollout source's business (launch/rollout.py), not this loop's."""
    timer = PhaseTimer()

    # 1. this step's samples, scored by every reward source (time/rollout_wait, time/score); possibly nothing to
    #    train on (dynamic sampling that found too few groups with signal)
    scored = run.rollouts.take(step, timer)
    update = None
    if not scored.empty:
        # 2. logprobs and values, in parallel on their actors: pi_old's, the reference's, a teacher's, V(s_t)
        with timer("logprobs"):
            lp = logprobs_and_values(run, scored)

        # 3. experience: the shaped score, KL to the reference (in the reward or as a loss term), the advantage
        #    estimator, the teacher's per-token signal, importance weights between the sampling policy and pi_old
        with timer("advantage"):
            scores = shaped_scores(run, scored)
            exp, exp_stats = compute_experience(scored.batch, lp.old, lp.ref, lp.values, scores, run.advantage,
                                                run.kl.coef, scored.token_rewards, lp.teacher)

        # 4. epochs over minibatches: clipped surrogate on the policy (+ KL loss), clipped value loss on the critic
        with timer("train"):
            stats = train_roles(run, step, exp)
        update = Update(lp.old, scores, exp_stats, stats)

    # 5. weight sync, policy -> every engine, between generations; then the next step's generation may start
    run.rollouts.before_sync(timer)
    with timer("weight_sync"):
        sync_stats = run.sync.push(version=step)
    busy, judged = busy_seconds(run.actors), judge_stats(run.actors)     # every actor is idle here
    run.rollouts.after_sync(step)

    # 6. metrics, the divergence guard, then a checkpoint: never of a diverged state
    metrics = log_step(run, step, scored, update, sync_stats, busy, judged, timer)
    stop, healthy = run.guard.check(step, metrics)
    if stop:
        raise RunError(stop)
    return step_checkpoint(run, step, healthy)


@dataclass
class Update:
    """What a step's update leaves for its metrics."""
    old_logprobs: torch.Tensor        # [B, T] pi_old (or the engines' sampling logprobs, ppo.reuse_sample_logprobs)
    scores: torch.Tensor              # [B] the shaped score the advantages started from
    exp_stats: dict                   # compute_experience's statistics
    stats: dict[str, dict]            # each trained role's training statistics, averaged over its ranks


@dataclass
class Forwards:
    """A step's per-token forwards over its samples, each from its own actors."""
    old: torch.Tensor                 # [B, T] pi_old (or the engines' sampling logprobs, ppo.reuse_sample_logprobs)
    ref: torch.Tensor                 # [B, T] the reference's
    values: torch.Tensor | None       # [B, T] the critic's V(s_t); GAE only
    teacher: torch.Tensor | None      # [B, T] the distillation teacher's (models.teacher) or None


def logprobs_and_values(run: Run, scored: ScoredRollout) -> Forwards:
    """Every forward a step needs, asked of their actors at once. pi_old: the policy's forward, or the engines' own
    sampling logprobs (ppo.reuse_sample_logprobs); the reference: its own ranks, or the policy's ranks with the
    adapters off (reference.from_policy_base); the teacher: its own ranks (or a process it shares)."""
    a, ref = run.actors, scored.ref()
    ref_refs = a.reference.call("logprobs", ref) if a.reference else a.policy.call("reference_logprobs", ref)
    old_refs = None if run.cfg.ppo.reuse_sample_logprobs else a.policy.call("logprobs", ref)
    value_refs = a.critic.call("values", ref) if a.critic else None
    teacher_refs = a.teacher.call("logprobs", ref) if a.teacher else None

    def gathered(refs):
        return torch.cat(ray.get(refs)) if refs else None
    old = gathered(old_refs)
    return Forwards(old if old is not None else scored.batch.sample_logprobs, gathered(ref_refs),
                    gathered(value_refs), gathered(teacher_refs))


def shaped_scores(run: Run, scored: ScoredRollout) -> torch.Tensor:
    """[B] the sources' weighted total, less the missing-EOS and overlong penalties, normalised (ppo.reward_norm)."""
    ppo, batch = run.cfg.ppo, scored.batch
    scores = missing_eos_penalty(scored.rewards.total, batch.finished, ppo.missing_eos_penalty)
    return run.norm(scores + overlong_penalty(batch.response_mask.sum(-1), run.cfg.generation.max_new_tokens,
                                              ppo.overlong_buffer, ppo.overlong_penalty))


def train_roles(run: Run, step: int, exp) -> dict[str, dict]:
    """Every trained role's epochs over the experience, side by side; their statistics, averaged over ranks."""
    exp_ref = ray.put(exp)
    refs = {name: g.call("train", exp_ref, step, run.kl.coef) for name, g in run.actors.trained.items()}
    return {name: mean_over_ranks(ray.get(r)) for name, r in refs.items()}


def log_step(run: Run, step: int, scored: ScoredRollout, update: Update | None, sync_stats: dict, busy: dict,
             judged: dict | None, timer: PhaseTimer) -> dict:
    """The step's metrics row and its line; the first step also reports where the start-up went."""
    cfg = run.cfg
    if update is None:                 # no update: the filter's counts and the times
        metrics = {**scored.stats, **{f"time/{k}": v for k, v in timer.seconds.items()}, "time/step": timer.elapsed(),
                   "time/start": timer.started, "kl/coef": run.kl.coef, "fault/actor_restarts": run.restarts}
        run.logger.log(step, metrics)
        print(f"step {step}/{cfg.train.steps}  no update: {scored.stats['filter/signal_groups']} groups with differing "
              f"rewards in {scored.stats['filter/rounds']} rounds (rollout.max_rounds), too few for a minibatch",
              flush=True)
    else:
        metrics = {**step_metrics(run, step, scored, update, sync_stats, timer, busy, judged), **scored.stats}
        if run.watch is not None:      # the closed loop's audit and drift rule (launch/rounds.py)
            metrics.update(run.watch.observe(step, scored, metrics))
        run.kl.update(update.exp_stats["kl/ref_per_seq"])
        run.logger.log(step, metrics)
        total = update.scores if scored.token_rewards is None else update.scores + scored.token_rewards.sum(-1)
        run.logger.log_samples(step, [{**r, "score": s} for r, s in zip(
            first_rollouts(run.tokenizer, scored.batch, cfg.logging.samples_per_step), total.tolist())])
        print(step_line(cfg, step, metrics), flush=True)
        failed = failure_line(scored.episodes, "agent" if cfg.needs_agent() else "environment")
        if failed:                     # counted in the metrics; the first failure's own words once a step
            print(f"step {step}: {failed}", flush=True)
    if run.startup is not None:
        report_startup(run)
    return metrics


def report_startup(run: Run) -> None:
    """After the first step: one line on where the start-up went, and startup.json with every actor's phases."""
    run.startup["first_step"] = time.time()
    marks = {f"{role} {i}": m for role, g in run.actors.groups().items()
             for i, m in enumerate(ray.get([a.startup_marks.remote() for a in g.actors]))}
    line, table = startup_report(run.startup, marks)
    print(line, flush=True)
    (run.run_dir / "startup.json").write_text(json.dumps(table, indent=1))
    run.startup = None
    startup_over()                     # `rlhf-ray ppo` starts without cyclic collection (launch/cli.py)


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


def step_metrics(run: Run, step: int, scored: ScoredRollout, update: Update, sync_stats: dict, timer: PhaseTimer,
                 busy: dict, judged: dict | None) -> dict:
    """The step's metrics row (metrics.jsonl and W&B): rollout, rewards, losses, staleness and importance
    weights, each phase's wall time and each role's busy time."""
    cfg, stats, batch, rewards = run.cfg, update.stats, scored.batch, scored.rewards
    p, staleness, step_seconds = stats["policy"], scored.staleness(step), timer.elapsed()
    mask = batch.response_mask
    sources = cfg.reward_sources()
    generating = sum(busy["engine"].get(k, 0.0) for k in ("generate", "episodes", "complete"))
    m = {
        **update.exp_stats,
        "response/finished_frac": batch.finished.float().mean().item(),
        "response/length_mean": mask.sum(-1).mean().item(),
        "policy/loss": p["loss"], "policy/clipfrac": p["clipfrac"], "policy/clipfrac_low": p["clipfrac_low"],
        "policy/clipfrac_high": p["clipfrac_high"], "policy/approx_kl": p["approx_kl"],
        "policy/entropy": p["entropy"], **{f"policy/{k}": p[k] for k in ("kl_loss", "dual_clipfrac") if k in p},
        "policy/skipped_steps": p["skipped_steps"],
        **{f"reward/source{i}_{s.kind}_mean": rewards.sources[:, i].mean().item()
           for i, s in enumerate(sources) if len(sources) > 1},
        "rollout/logprob_diff_max": (p["logprob_diff_max"] if cfg.ppo.reuse_sample_logprobs else
                                     ((batch.sample_logprobs - update.old_logprobs).abs() * batch.action_mask).max().item()),
        "rollout/staleness_mean": staleness.float().mean().item(), "rollout/staleness_max": int(staleness.max()),
        "rollout/engine_version": int(batch.version.min()),
        "perf/tokens_per_s": batch.action_mask.sum().item() / max(generating, 1e-9),
        "perf/weight_sync_mb": sync_stats["bytes"] / 2 ** 20,
        "perf/weight_sync_staged_mb": sync_stats["staged"] / 2 ** 20,     # copied on the way (0: in place)
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
    if scored.episodes is not None:      # multi-turn: turns, tokens, the environment's or agents' rewards, failures
        m.update(episode_metrics(scored.episodes, "agent" if cfg.needs_agent() else "env"))      # and counts
    if "teacher" in busy:                # distillation: the teacher's scoring rate and its share of the step
        scoring = busy["teacher"].get("logprobs", 0.0)
        m["perf/teacher_tokens_per_s"] = mask.sum().item() / max(scoring, 1e-9)
        m["perf/teacher_share"] = scoring / max(step_seconds, 1e-9)
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
    teacher = f"  kl_teacher {m['distill/reverse_kl_per_token']:.4f}/tok" if "distill/reverse_kl_per_token" in m else ""
    # episodes' own rewards (an environment's per turn, an agent's) reach the tokens, not the score: shown beside it
    episodes = next((f"  {k.split('/')[0]} {m[k]:+.3f}" for k in ("env/reward_mean", "agent/reward_mean") if k in m), "")
    return (f"step {step}/{cfg.train.steps}  score {m['reward/score_mean']:+.3f}±{m['reward/score_std']:.3f}{episodes}"
            f"  kl {m['kl/ref_per_seq']:.4f}{teacher}  pg {m['policy/loss']:+.4f}{vf}  len {m['response/length_mean']:.1f}"
            f"{stale}  | gen {m['time/generate']:.2f}s score {m['time/score']:.2f}s lp {m['time/logprobs']:.2f}s"
            f" train {m['time/train']:.2f}s"
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


def actors_beside_logger(cfg: Config, device: str, run_dir: Path, resume_step: int | None) -> tuple[Actors, MetricsLogger]:
    """Every role's actors, and the metrics logger opened while they start (W&B's import and service take about a
    second, which the actors' start-up hides). Either failing leaves neither behind."""
    with ThreadPoolExecutor(1) as pool:
        opening = pool.submit(MetricsLogger, run_dir, cfg, cfg.run.name, resume_step=resume_step)
        try:
            actors = build_actors(cfg, device, run_dir)
        except BaseException:
            opening.result().close()
            raise
        try:
            return actors, opening.result()
        except BaseException:
            actors.shutdown()
            raise


def train(cfg: Config, resume: bool | str = False, keep_actors: bool = False, gold_fn=None,
          watch: Watch | None = None) -> dict:
    """Run PPO to cfg.train.steps, or until `watch` says stop (then that step is checkpointed); returns where things
    were written, the last step and why it stopped early, if it did (and the live actors if keep_actors).
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

    start_step = ckpt.load_state(latest)["step"] if latest is not None else 0
    actors, logger = actors_beside_logger(cfg, device, run_dir, start_step if latest is not None else None)
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
    if cfg.needs_teacher():
        print(f"teacher: {cfg.models.teacher}, distill.coef {cfg.distill.coef}, gamma {cfg.distill.gamma}"
              + (" (the only signal)" if cfg.distill.only else " (beside the task reward)"), flush=True)

    run = Run(cfg, actors, sync, tokenizer, stream, make_rollouts(cfg, actors, tokenizer, stream),
              AdvantageSettings.of(cfg.ppo, cfg.generation.n, cfg.distill if cfg.needs_teacher() else None), logger, run_dir, tok_dir, KLCoef(cfg.ppo),
              ScoreNorm(cfg.ppo.reward_norm), DivergenceGuard(cfg.guard), gold_fn, watch, startup=startup)
    last_ckpt = latest
    try:
        # a resumed policy differs from models.policy, which the engines loaded; so does a 4-bit one (it computes
        # with its dequantised base): either way the engines get the policy's own weights before they sample
        step = restore(run, latest, push=latest is not None or cfg.policy.quantization != "none")
        if latest is not None:
            print(f"resumed from {latest} (step {step})", flush=True)
        step += 1
        while step <= cfg.train.steps:
            try:
                saved = ppo_step(run, step)
                last_ckpt, step = saved or last_ckpt, step + 1
                if watch is not None and watch.stop:
                    last_ckpt = saved or save_checkpoint(run, step - 1)     # where the next round starts from
                    print(f"step {step - 1}: stopped: {watch.stop}", flush=True)
                    break
            except (ray.exceptions.RayError, RolloutError) as e:
                last_ckpt = ckpt.latest(ckpt.checkpoint_root(run_dir))
                step = recover(run, step, e, last_ckpt)
    except BaseException:
        logger.close()
        actors.shutdown()
        raise

    summary = {"run_dir": str(run_dir), "metrics": str(logger.path), "wandb": logger.wandb_dir,
               "checkpoint": str(last_ckpt) if last_ckpt else None, "steps": step - 1,
               "stopped": watch.stop if watch is not None else None}
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
