"""Where a PPO step's samples come from: one boundary, `Rollouts.take(step) -> ScoredRollout`.

A source draws the step's prompts, samples them on the engines and scores them on the reward actors:

    Sampling           single-turn: n answers per prompt
    Episodes           multi-turn (env.cls): n episodes per prompt, the engines acting, the environment workers
                       answering; the environment's per-turn rewards come with the samples
    Agents             the user's agents (agent.cls): n episodes per prompt, each agent calling the policy through
                       the gateway's OpenAI-compatible endpoint, its calls stitched token for token; the agents'
                       rewards come with the samples
    DynamicSampling    wraps either (rollout.filter_groups, DAPO): more rounds of prompts until enough groups have
                       rewards that differ; possibly none ("nothing to train")

and a schedule decides when a step's generation runs relative to the weight sync:

    Rollouts           on-policy (rollout.max_staleness 0): the next step's generation starts after this step's sync
    SleepingEngines    the same, with engines that free their GPU memory while the trainers run
                       (placement.engines_sleep)
    OneStepOff         rollout.max_staleness 1: the next step's generation starts as soon as this step's samples
                       are in, on the same weights, and owns its pending rollout (saved with a checkpoint)

Every sampling seed derives from (run seed, step, engine, and the round past the first of dynamic sampling), so
when a generation starts never changes its samples. A multi-turn episode's (an environment's or an agent's) derives
from (run seed, step, round, the episode's index in the step): its turns are sampled with their own seeds, whatever
else an engine samples beside them, so an agent's episode and the same episode through env.cls are the same
tokens.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import ray
import torch

from launch.common import RunError, cause_line
from launch.roles import Actors
from rlhf_ray.algos import groups_with_signal, trainable_groups
from rlhf_ray.batch import (EpisodeSample, RewardScores, RolloutBatch, Sample, cat, merge_round_robin,
                            rollout_from_episodes, rollout_from_samples, select, split_round_robin)
from rlhf_ray.config import Config
from rlhf_ray.data import PromptStream
from rlhf_ray.env import env_stop_ids
from rlhf_ray.prompts import render_prompts
from rlhf_ray.seeds import derive_seed

PENDING_ROLLOUT = "pending_rollout.pt"     # a checkpoint's generation drawn by older weights (OneStepOff)


class RolloutError(RunError):
    """A generation that failed on an engine; the message is one line naming the step."""


@dataclass
class Generation:
    """One round of sampling, started on the engines (Ray futures, so the driver can go on), collected later."""
    step: int
    prompt_ids: list[list[int]]       # rendered prompts, one per data row
    prompts: list[str]                # each sample's prompt string, n per row (text reward sources see them)
    extras: dict[str, list]           # data.reward_keys fields, one entry per sample
    refs: list[ray.ObjectRef]         # one per engine that got prompts: its samples, prompt-major
    stream_state: dict                # the prompt stream's position before this drew its prompts

    def done(self) -> None:
        """Block until the engines have finished (the samples stay in the object store)."""
        ray.wait(self.refs, num_returns=len(self.refs), fetch_local=False)


@dataclass
class ScoredRollout:
    """A step's samples and their rewards: what the PPO step trains on. Prompt-major, B = groups x n rows."""
    batch: RolloutBatch | None        # None: nothing to train on this step (dynamic sampling found too few groups)
    rewards: RewardScores | None      # [B] weighted total over the sources (an environment's is in token_rewards
                                      #   instead), [B, S] each source's own (an environment's: the episode's sum
                                      #   of its per-turn rewards, unweighted)
    token_rewards: torch.Tensor | None = None  # [B, T] rewards on single tokens, added to r_t (compute_experience):
                                      #   an environment's per-turn rewards x its source's weight, each on its
                                      #   turn's last action token; None single-turn
    episodes: list[dict] | None = None     # multi-turn: each episode's summary (rlhf_ray/env.py Episode.summary)
    stats: dict = field(default_factory=dict)   # the source's own metrics: filter/* (dynamic sampling), agent/*
                                           #   (the gateway's counts: late calls, unknown sessions, bad keys)
    prompts: list[str] | None = None       # each row's prompt as the data gave it (B entries, n per group)
    _ref: ray.ObjectRef | None = None      # the batch in the object store, put once

    @property
    def empty(self) -> bool:
        return self.batch is None

    def ref(self) -> ray.ObjectRef:
        if self._ref is None:
            self._ref = ray.put(self.batch)
        return self._ref

    def staleness(self, step: int) -> torch.Tensor:
        """[B] policy updates between the weights that sampled each row and step `step`'s."""
        return (step - 1) - self.batch.version


Timer = Callable[[str], object]          # launch/ppo.py PhaseTimer: `with timer(name):` adds to time/<name>


class Sampling:
    """Single-turn: n answers per prompt, the prompts dealt round robin over the engines."""

    def __init__(self, cfg: Config, actors: Actors, tokenizer, stream: PromptStream):
        self.cfg, self.actors, self.tokenizer, self.stream = cfg, actors, tokenizer, stream

    def start(self, step: int, round_: int = 0) -> Generation:
        """Draw the next prompts and start sampling them; returns without waiting."""
        state, rows, g = self.stream.state(), self.stream.next(), self.cfg.generation
        keys = self.cfg.data.reward_keys     # row fields for rule/HTTP rewards and environments, one per sample
        prompts = [r["prompt"] for r in rows] if keys else rows
        ids = render_prompts(self.tokenizer, prompts, self.cfg.data)
        refs = self.dispatch(ids, [r if keys else {"prompt": r} for r in rows], (step,) if not round_ else (step, round_))
        return Generation(step, ids, [p for p in prompts for _ in range(g.n)],
                          {k: [r[k] for r in rows for _ in range(g.n)] for k in keys}, refs, state)

    def dispatch(self, ids: list[list[int]], rows: list[dict], when: tuple[int, ...]) -> list[ray.ObjectRef]:
        """Start sampling `ids` (rendered prompts of `rows`) for the step (and round) `when`."""
        g, engines = self.cfg.generation, self.actors.engines
        seeds = [derive_seed(self.cfg.run.seed, "sample", *when, i) for i in range(len(engines))]
        return [e.generate.remote(part, g.n, g.max_new_tokens, g.temperature, g.top_p, seed)
                for e, part, seed in zip(engines, split_round_robin(ids, len(engines)), seeds) if part]

    def samples(self, gen: Generation) -> list[Sample]:
        """Wait for a generation's samples, prompt-major (n per prompt); an engine's failure is one line."""
        try:
            parts = ray.get(gen.refs)
        except (ray.exceptions.RayTaskError, ray.exceptions.RayActorError) as e:
            raise RolloutError(f"rollout for step {gen.step} failed on an engine: {cause_line(e)}") from None
        return merge_round_robin(parts, len(gen.prompt_ids), self.cfg.generation.n)

    to_batch = staticmethod(rollout_from_samples)     # samples -> the padded batch (Episodes: with action masks)

    def padded(self, prompt_ids: list[list[int]], samples: list[Sample]) -> RolloutBatch:
        n = self.cfg.generation.n
        return self.to_batch([p for p in prompt_ids for _ in range(n)], samples, self.tokenizer.pad_token_id)

    def episodes(self, samples: list[Sample]) -> list[dict] | None:
        return None

    def score(self, batch: RolloutBatch, gen: Generation, ref: ray.ObjectRef | None = None) -> RewardScores:
        """Every reward source's score of each sample, weighted and summed (actors/reward.py); 0 for every sample
        when the teacher is the only signal (distill.only: no sources, no reward actors)."""
        if self.actors.reward is None:
            B = batch.input_ids.size(0)
            return RewardScores(torch.zeros(B), torch.zeros(B, 0))
        ref = ref if ref is not None else ray.put(batch)
        return cat(ray.get(self.actors.reward.call("scores", ref, gen.prompts, gen.extras)))

    def token_rewards(self, batch: RolloutBatch) -> torch.Tensor | None:
        return None

    def stats(self) -> dict:
        """The source's own counts since the last call (metrics)."""
        return {}

    def take(self, gen: Generation, timer: Timer, sampled: Callable[[], None]) -> ScoredRollout:
        """Wait for `gen`, call `sampled` (the engines are free), then score it."""
        with timer("rollout_wait"):
            samples = self.samples(gen)
        sampled()
        batch = self.padded(gen.prompt_ids, samples)
        out = ScoredRollout(batch, None, self.token_rewards(batch), self.episodes(samples), self.stats(),
                            gen.prompts)
        with timer("score"):
            out.rewards = self.score(batch, gen, out.ref())
        self.check_staleness(out, gen.step)
        return out

    def check_staleness(self, out: ScoredRollout, step: int) -> None:
        staleness = int(out.staleness(step).max())
        if staleness > self.cfg.rollout.max_staleness:
            raise RunError(f"step {step}: samples {staleness} updates old, over rollout.max_staleness")


class Episodes(Sampling):
    """Multi-turn (env.cls): n episodes per prompt, the engines acting, the environment workers answering
    (actors/engine.py `episodes`). The environment's per-turn rewards come with the samples: its reward source's
    column gets each episode's sum, and `token_rewards` puts them, weighted, on each turn's last action token."""

    def __init__(self, cfg: Config, actors: Actors, tokenizer, stream: PromptStream):
        super().__init__(cfg, actors, tokenizer, stream)
        self.stop_ids = env_stop_ids(tokenizer, cfg.env.turn_stop)
        self.env_source, self.env_weight = next((i, s.weight) for i, s in enumerate(cfg.reward_sources())
                                                if s.kind == "env")

    def dispatch(self, ids: list[list[int]], rows: list[dict], when: tuple[int, ...]) -> list[ray.ObjectRef]:
        g, engines, k = self.cfg.generation, self.actors.engines, len(self.actors.engines)
        seeds = split_round_robin(episode_seeds(self.cfg.run.seed, when, len(ids), g.n), k)
        return [e.episodes.remote(part, rows_part, g.n, g.max_new_tokens, g.temperature, g.top_p,
                                  [s for row in seeds_part for s in row], self.cfg.env, self.stop_ids,
                                  self.actors.env.actors)
                for e, part, rows_part, seeds_part in zip(engines, split_round_robin(ids, k),
                                                          split_round_robin(rows, k), seeds) if part]

    to_batch = staticmethod(rollout_from_episodes)

    def episodes(self, samples: list[EpisodeSample]) -> list[dict]:
        return [s["episode"] for s in samples]

    def score(self, batch: RolloutBatch, gen: Generation, ref: ray.ObjectRef | None = None) -> RewardScores:
        scores = super().score(batch, gen, ref)
        scores.sources[:, self.env_source] = batch.token_rewards.sum(-1)    # the reward actors leave it 0
        return scores

    def token_rewards(self, batch: RolloutBatch) -> torch.Tensor:
        return self.env_weight * batch.token_rewards


class Agents(Episodes):
    """The user's agents (agent.cls, actors/agent.py): n episodes per prompt, each agent calling the policy through
    the gateway, which stitches its calls into one trajectory (rlhf_ray/agent.py) and batches them onto the engines.
    The agent's returned number, times the `kind: agent` source's weight, lands on the trajectory's last action
    token; without that source, the configured sources score the whole transcript. Each sample's prompt is what its
    agent's first call rendered."""

    def __init__(self, cfg: Config, actors: Actors, tokenizer, stream: PromptStream):
        Sampling.__init__(self, cfg, actors, tokenizer, stream)
        found = [(i, s.weight) for i, s in enumerate(cfg.reward_sources()) if s.kind == "agent"]
        self.env_source, self.env_weight = found[0] if found else (None, 0.0)

    def dispatch(self, ids: list[list[int]], rows: list[dict], when: tuple[int, ...]) -> list[ray.ObjectRef]:
        g = self.cfg.generation
        seeds = [s for row in episode_seeds(self.cfg.run.seed, when, len(ids), g.n) for s in row]
        return [self.actors.gateway.actors[0].episodes.remote([r for r in rows for _ in range(g.n)], seeds,
                                                              self.actors.agent.actors, self.env_source is not None)]

    def samples(self, gen: Generation) -> list:
        """The episodes, prompt-major; one whose agent never called has the row's rendered prompt."""
        try:
            (out,) = ray.get(gen.refs)
        except (ray.exceptions.RayTaskError, ray.exceptions.RayActorError) as e:
            raise RolloutError(f"rollout for step {gen.step} failed on the agents' gateway: {cause_line(e)}") from None
        n = self.cfg.generation.n
        for i, s in enumerate(out):
            s["prompt"] = s["prompt"] or gen.prompt_ids[i // n]
        return out

    def padded(self, prompt_ids: list[list[int]], samples: list) -> RolloutBatch:
        return self.to_batch([s["prompt"] for s in samples], samples, self.tokenizer.pad_token_id)

    def score(self, batch: RolloutBatch, gen: Generation, ref: ray.ObjectRef | None = None) -> RewardScores:
        if self.env_source is not None:
            return super().score(batch, gen, ref)
        return Sampling.score(self, batch, gen, ref)

    def token_rewards(self, batch: RolloutBatch) -> torch.Tensor:
        """The agents' rewards times their source's weight; without one, only failures' agent.error_reward."""
        return batch.token_rewards * (self.env_weight if self.env_source is not None else 1.0)

    def stats(self) -> dict:
        return ray.get(self.actors.gateway.actors[0].take_counters.remote())


def episode_seeds(run_seed: int, when: tuple[int, ...], prompts: int, n: int) -> list[list[int]]:
    """Each multi-turn episode's seed, n per prompt: from (run seed, step [, round], the episode's index)."""
    return [[derive_seed(run_seed, "episode", *when, i * n + k) for k in range(n)] for i in range(prompts)]


class DynamicSampling:
    """DAPO's dynamic sampling (rollout.filter_groups) around a source. Score each round of
    generation.prompts_per_step prompts and keep the groups whose n rewards are not all equal; while fewer than
    prompts_per_step are kept, draw the next round from the prompt stream (its sampling seeded by step and round),
    up to rollout.max_rounds rounds. The step trains on the first prompts_per_step kept groups, or, past the bound,
    on those that fill whole minibatches (`trainable_groups`: possibly none). Rewards are compared as the sources
    gave them, an environment's included, before length shaping (DAPO filters on accuracy). Every round runs on the
    weights of the last sync, so the extra samples are on-policy."""

    def __init__(self, source: Sampling):
        self.source, self.cfg = source, source.cfg

    def start(self, step: int) -> Generation:
        return self.source.start(step)

    def take(self, gen: Generation, timer: Timer, sampled: Callable[[], None]) -> ScoredRollout:
        src, g = self.source, self.cfg.generation
        # per group: its rendered prompt, samples, rewards, and each sample's prompt as the data gave it
        kept: list[tuple[list[int], list[Sample], RewardScores, list[str]]] = []
        totals = []
        for r in range(self.cfg.rollout.max_rounds):
            if r:
                gen = src.start(gen.step, r)
            with timer("rollout_wait"):
                samples = src.samples(gen)
            batch = src.padded(gen.prompt_ids, samples)
            with timer("score"):
                rewards = src.score(batch, gen)
            turns = src.token_rewards(batch)
            totals.append(rewards.total if turns is None else rewards.total + turns.sum(-1))
            for j in groups_with_signal(totals[-1], g.n).nonzero().flatten().tolist():
                rows = torch.arange(j * g.n, (j + 1) * g.n)
                kept.append((gen.prompt_ids[j], samples[j * g.n:(j + 1) * g.n], select(rewards, rows),
                             gen.prompts[j * g.n:(j + 1) * g.n]))
            if len(kept) >= g.prompts_per_step:
                break
        sampled()
        rounds, drawn = len(totals), len(totals) * g.prompts_per_step
        take = trainable_groups(len(kept), g.prompts_per_step, g.n, self.cfg.ppo.minibatch_size)
        stats = {"filter/rounds": rounds, "filter/uniform_frac": 1 - len(kept) / drawn,
                 "filter/signal_groups": len(kept), "filter/groups": take,
                 "filter/extra_samples": (rounds - 1) * g.prompts_per_step * g.n,
                 "filter/short": float(take < g.prompts_per_step), "filter/skipped": float(take == 0),
                 "filter/reward_all_mean": torch.cat(totals).mean().item(), **src.stats()}
        if not take:
            return ScoredRollout(None, None, stats=stats)
        kept = kept[:take]
        samples = [s for k in kept for s in k[1]]
        batch = src.padded([k[0] for k in kept], samples)
        out = ScoredRollout(batch, cat([k[2] for k in kept]), src.token_rewards(batch), src.episodes(samples), stats,
                            [p for k in kept for p in k[3]])
        src.check_staleness(out, gen.step)
        return out


class Rollouts:
    """A run's rollouts, on-policy (rollout.max_staleness 0): a step's generation starts after the previous step's
    weight sync (the first step's at the start), so every sample comes from the weights the step updates."""

    def __init__(self, source: Sampling | DynamicSampling, stream: PromptStream, last_step: int):
        self.source, self.stream, self.last_step = source, stream, last_step
        self.pending: Generation | None = None     # the next step's generation, started

    def take(self, step: int, timer: Timer) -> ScoredRollout:
        """This step's samples, scored."""
        gen, self.pending = self.pending, None
        return self.source.take(gen, timer, lambda: self.sampled(step))

    def sampled(self, step: int) -> None:
        """This step's samples are in: the engines are free until the sync."""

    def before_sync(self, timer: Timer) -> None:
        """Nothing generates during the sync."""

    def after_sync(self, step: int) -> None:
        """The next step's generation starts on the weights just synced."""
        self.start_next(step)

    def start_next(self, step: int) -> None:
        if step < self.last_step:
            self.pending = self.source.start(step + 1)

    def data_state(self) -> dict:
        """The prompt stream's position a checkpoint records: before the pending generation drew its prompts."""
        return self.pending.stream_state if self.pending else self.stream.state()

    def save_pending(self, staging: Path) -> None:
        """A pending generation of the current weights is redrawn on resume (same seeds): nothing to save."""

    def restart(self, step: int, checkpoint: Path | None) -> None:
        """After the stream was put back to `step`'s end: the next step's generation, reloaded from `checkpoint`
        when it saved one, else started."""
        saved = checkpoint / PENDING_ROLLOUT if checkpoint is not None else None
        if saved is not None and saved.is_file():
            p = torch.load(saved, weights_only=True)
            state = self.stream.state()
            self.stream.next()                     # past the saved generation's prompts
            self.pending = Generation(p["step"], p["prompt_ids"], p["prompts"], p["extras"],
                                      [ray.put(part) for part in p["parts"]], state)
        else:
            self.pending = None
            self.start_next(step)


class SleepingEngines(Rollouts):
    """placement.engines_sleep: engines colocated with the trainers free their GPU memory (vLLM sleep mode) from
    the moment their samples are in until the sync."""

    def __init__(self, source, stream: PromptStream, last_step: int, actors: Actors):
        super().__init__(source, stream, last_step)
        self.actors = actors

    def sampled(self, step: int) -> None:
        ray.get([e.sleep.remote() for e in self.actors.engines])

    def before_sync(self, timer: Timer) -> None:
        with timer("wake_up"):
            ray.get([e.wake_up.remote() for e in self.actors.engines])


class OneStepOff(Rollouts):
    """rollout.max_staleness 1: the next step's generation starts as soon as this step's samples are in, on the
    same weights, and runs while the trainers update; the sync waits for it. Its samples are one update old when
    their step trains (ppo.is_correction weighs them). A checkpoint saves them: they cannot be redrawn."""

    def sampled(self, step: int) -> None:
        self.start_next(step)

    def before_sync(self, timer: Timer) -> None:
        with timer("next_rollout_wait"):
            if self.pending is not None:
                self.pending.done()

    def after_sync(self, step: int) -> None:
        """Started already."""

    def save_pending(self, staging: Path) -> None:
        p = self.pending
        if p is not None:
            torch.save({"step": p.step, "prompt_ids": p.prompt_ids, "prompts": p.prompts, "extras": p.extras,
                        "parts": ray.get(p.refs)}, staging / PENDING_ROLLOUT)


def make_rollouts(cfg: Config, actors: Actors, tokenizer, stream: PromptStream) -> Rollouts:
    """The run's rollouts, as its config asks."""
    source = (Episodes if cfg.needs_env() else Agents if cfg.needs_agent() else Sampling)(cfg, actors, tokenizer,
                                                                                           stream)
    if cfg.rollout.filter_groups:
        source = DynamicSampling(source)
    if cfg.rollout.max_staleness:
        return OneStepOff(source, stream, cfg.train.steps)
    if cfg.placement.engines_sleep:
        return SleepingEngines(source, stream, cfg.train.steps, actors)
    return Rollouts(source, stream, cfg.train.steps)
