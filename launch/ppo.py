"""The PPO driver: one readable loop per step, each phase named and timed.

    python -m launch.ppo --config configs/tiny_ppo.yaml [--set ppo.kl_coef=0.1 ...] [--resume]

With `ray.address` unset it starts a local Ray cluster on the spot; under `ray job submit` (or with
`ray.address: auto`) it joins the cluster it runs on. The driver holds no model weights: it moves token ids
and padded tensors between the actors and does the (cheap) advantage math.
"""
from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import ray
import torch

from actors.critic import CriticActor
from actors.engine import EngineActor
from actors.group import RankGroup, SharedPlacement
from actors.policy import PolicyActor
from actors.reference import ReferenceActor
from actors.reward import RewardActor
from actors.weight_sync import make_weight_sync
from launch.common import actor_env, cluster_device, engine_env, mean_over_ranks, run_cli, start_ray
from rlhf_ray import checkpoint as ckpt
from rlhf_ray.algos import ScoreNorm, adaptive_kl_coef, compute_experience, missing_eos_penalty
from rlhf_ray.batch import build_rollout_batch, first_rollouts, merge_round_robin, response_texts, split_round_robin
from rlhf_ray.config import Config, dump_config, resolve_paths
from rlhf_ray.data import PromptStream, load_prompts
from rlhf_ray.metrics import MetricsLogger
from rlhf_ray.models import check_tokenizer_matches, load_tokenizer
from rlhf_ray.prompts import render_prompts


# ------------------------------------------------------------------------------------------------ setup

@dataclass
class Actors:
    policy: RankGroup
    critic: RankGroup | None          # only the GAE estimator has one
    reference: RankGroup
    reward: RankGroup
    engine_group: RankGroup
    placements: list = field(default_factory=list)   # shared placement groups of colocated roles

    @property
    def engines(self) -> list:
        return self.engine_group.actors

    @property
    def trained(self) -> dict[str, RankGroup]:
        return {"policy": self.policy, **({"critic": self.critic} if self.critic else {})}

    def shutdown(self) -> None:
        for g in (self.policy, self.critic, self.reference, self.reward, self.engine_group):
            if g is not None:
                g.shutdown()
        for sp in self.placements:
            sp.remove()


def role_resources(cfg: Config, role: str) -> tuple[int, float, float, str | None]:
    """(ranks, CPUs per rank, GPUs per rank, node_resource) of a role; an engine's rank is a whole engine."""
    if role == "engine":
        e = cfg.engine
        return e.num_engines, e.cpus_per_engine, e.gpus_per_engine * e.tensor_parallel_size, e.node_resource
    rc = getattr(cfg, role)
    return rc.num_ranks, rc.cpus_per_rank, rc.gpus_per_rank, rc.node_resource


def build_actors(cfg: Config, device: str, run_dir: Path) -> Actors:
    """Every role's rank group. Roles listed together in placement.colocate share one placement group: rank i of
    each in bundle i, on the same node and the same GPU (each taking a share of it)."""
    args = (cfg, device)
    shared, placements = {}, []
    for members in cfg.placement.colocate:
        present = [m for m in members if m != "critic" or cfg.needs_critic()]
        if len(present) < 2:
            continue
        res = [role_resources(cfg, m) for m in present]
        sp = SharedPlacement("+".join(present), res[0][0], sum(r[1] for r in res), max(r[2] for r in res),
                             len(present), res[0][3])
        placements.append(sp)
        shared.update({m: sp for m in present})

    def group(actor_cls, role, distributed=False, env=None, gpu_bundles=1):
        n, cpus, gpus, node = role_resources(cfg, role)
        return RankGroup(actor_cls, role, n, cpus, gpus, args, distributed=distributed,
                         runtime_env=env or {"env_vars": actor_env(device)}, shared=shared.get(role), node_resource=node,
                         gpu_bundles=gpu_bundles)

    policy = group(PolicyActor, "policy", True)
    critic = group(CriticActor, "critic", True) if cfg.needs_critic() else None
    reference = group(ReferenceActor, "reference", cfg.reference.zero_stage == 3)
    reward = group(RewardActor, "reward", cfg.reward.zero_stage == 3)
    tp = cfg.engine.tensor_parallel_size
    engines = group(EngineActor, "engine", env=engine_env(cfg, device, str(run_dir)),
                    gpu_bundles=tp if device == "cuda" and tp > 1 else 1)
    ray.get([a.ready.remote() for g in (policy, critic, reference, reward, engines) if g for a in g.actors])
    return Actors(policy, critic, reference, reward, engines, placements)


class PhaseTimer:
    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        t0 = time.perf_counter()
        yield
        self.seconds[name] = time.perf_counter() - t0


# ------------------------------------------------------------------------------------------------ phases

def generate(engines: list, prompt_ids: list[list[int]], cfg: Config, step: int, pad_id: int):
    """Split the prompts over the engines; n samples each; back as one padded batch (prompt-major)."""
    g = cfg.generation
    parts = split_round_robin(prompt_ids, len(engines))
    refs = [e.generate.remote(part, g.n, g.max_new_tokens, g.temperature, g.top_p, cfg.run.seed * 100_003 + step * 101 + i)
            for i, (e, part) in enumerate(zip(engines, parts)) if part]
    samples = merge_round_robin(ray.get(refs), len(prompt_ids), g.n)
    prompts_rep = [p for p in prompt_ids for _ in range(g.n)]
    batch = build_rollout_batch(prompts_rep, [s["ids"] for s in samples], [s["logprobs"] for s in samples], pad_id)
    batch["finished"] = torch.tensor([bool(s["finished"]) for s in samples])
    return batch, {"response/finished_frac": batch["finished"].float().mean().item()}


def save_checkpoint(cfg: Config, actors: Actors, run_dir: Path, step: int, stream: PromptStream, tok_dir: str,
                    kl_coef: float, score_norm: ScoreNorm) -> Path:
    root = ckpt.checkpoint_root(run_dir)
    staging = ckpt.begin(root, step)
    ray.get([ref for name, group in actors.trained.items()
             for ref in group.call("save_hf", str(staging / name), tok_dir) + group.call("save_ds", str(staging / f"{name}_ds"))])
    final = ckpt.commit(root, step, {"step": step, "data": stream.state(), "seed": cfg.run.seed, "kl_coef": kl_coef,
                                     "score_norm": score_norm.state()})
    ckpt.prune(root, cfg.checkpoint.keep)
    return final


# ------------------------------------------------------------------------------------------------ the loop

class KLCoef:
    """The KL penalty's coefficient: fixed, or adapted toward ppo.kl_target after every step."""

    def __init__(self, ppo):
        self.ppo, self.coef = ppo, ppo.kl_coef

    def update(self, observed_kl: float) -> None:
        if self.ppo.kl_target is not None:
            self.coef = adaptive_kl_coef(self.coef, observed_kl, self.ppo.kl_target, self.ppo.kl_horizon)


def ppo_step(cfg: Config, actors: Actors, sync, tokenizer, stream: PromptStream, logger: MetricsLogger, step: int,
             run_dir: Path, tok_dir: str, kl: KLCoef, norm: ScoreNorm, gold_fn=None) -> Path | None:
    """One PPO iteration; returns the checkpoint written at its end, if any."""
    timer = PhaseTimer()
    t_step = time.perf_counter()

    # 1. rollout: the engines sample n responses per prompt, with their sampling logprobs
    with timer("generate"):
        rows, n = stream.next(), cfg.generation.n
        keys = cfg.data.reward_keys           # row fields for rule/HTTP rewards, one entry per sample
        prompts = [r["prompt"] for r in rows] if keys else rows
        extras = {k: [r[k] for r in rows for _ in range(n)] for k in keys}
        batch, gen_stats = generate(actors.engines, render_prompts(tokenizer, prompts, cfg.data), cfg, step,
                                    tokenizer.pad_token_id)
        if cfg.placement.engines_sleep:            # colocated engines free their GPU memory for the trainers
            ray.get([e.sleep.remote() for e in actors.engines])
    batch_ref = ray.put(batch)

    # 2. score, in parallel on their actors: policy (old) and reference logprobs, critic values (GAE only),
    #    rewards from every source (reward models, rules, remote scorers), weighted and summed
    ppo = cfg.ppo
    with timer("score"):
        refs = {"ref": actors.reference.call("logprobs", batch_ref),
                "reward": actors.reward.call("scores_by_source", batch_ref, [p for p in prompts for _ in range(n)], extras)}
        if not ppo.reuse_sample_logprobs:      # else pi_old is the engines' sampling logprobs
            refs["old"] = actors.policy.call("logprobs", batch_ref)
        if actors.critic:
            refs["values"] = actors.critic.call("values", batch_ref)
        out = {k: torch.cat(ray.get(v)) for k, v in refs.items()}
        out.setdefault("old", batch["sample_logprobs"])
        scores = norm(missing_eos_penalty(out["reward"][:, 0], batch["finished"], ppo.missing_eos_penalty))

    # 3. advantages: KL to the reference (in the reward or as a loss term), then the chosen estimator
    with timer("advantage"):
        exp, exp_stats = compute_experience(
            batch, out["old"], out["ref"], out.get("values"), scores, estimator=ppo.advantage, n=cfg.generation.n,
            kl_coef=kl.coef, kl_estimator=ppo.kl_estimator, kl_in_reward=ppo.kl_placement == "reward",
            gamma=ppo.gamma, lam=ppo.lam, whiten_advantages=ppo.whiten_advantages, grpo_norm_std=ppo.grpo_norm_std)
    exp_ref = ray.put(exp)

    # 4. epochs over minibatches: clipped surrogate on the policy (+ KL loss), clipped value loss on the critic
    with timer("train"):
        train_refs = {name: g.call("train", exp_ref, step, kl.coef) for name, g in actors.trained.items()}
        stats = {name: mean_over_ranks(ray.get(r)) for name, r in train_refs.items()}
        p_stats = stats["policy"]

    # 5. weight sync: policy -> every engine (ZeRO-3: gathered bucket by bucket), prefix caches reset
    with timer("weight_sync"):
        if cfg.placement.engines_sleep:
            ray.get([e.wake_up.remote() for e in actors.engines])
        sync_stats = sync.push()

    mask = batch["response_mask"]
    n_tokens = int(mask.sum())
    metrics = {
        **exp_stats, **gen_stats,
        "policy/loss": p_stats["loss"], "policy/clipfrac": p_stats["clipfrac"],
        "policy/approx_kl": p_stats["approx_kl"], "policy/entropy": p_stats["entropy"],
        **{f"policy/{k}": p_stats[k] for k in ("kl_loss", "dual_clipfrac") if k in p_stats},
        **{f"reward/source{i}_{s.kind}_mean": out["reward"][:, 1 + i].mean().item()
           for i, s in enumerate(cfg.reward_sources()) if len(cfg.reward_sources()) > 1},
        "response/length_mean": mask.sum(-1).mean().item(),
        "rollout/logprob_diff_max": (p_stats["logprob_diff_max"] if ppo.reuse_sample_logprobs else
                                     ((batch["sample_logprobs"] - out["old"]).abs() * mask).max().item()),
        "perf/tokens_per_s": n_tokens / timer.seconds["generate"],
        "perf/weight_sync_mb": sync_stats["bytes"] / 2 ** 20,
        "time/generate": timer.seconds["generate"], "time/score": timer.seconds["score"],
        "time/advantage": timer.seconds["advantage"], "time/train": timer.seconds["train"],
        "time/policy_update": p_stats["update_seconds"],
        "time/weight_sync": timer.seconds["weight_sync"], "time/step": time.perf_counter() - t_step,
    }
    if "critic" in stats:
        metrics.update({"value/loss": stats["critic"]["loss"], "value/clipfrac": stats["critic"]["vf_clipfrac"],
                        "time/critic_update": stats["critic"]["update_seconds"]})
    if norm.mode != "none":          # reward/score_* are then the normalised scores PPO optimises
        metrics["reward/raw_score_mean"] = out["reward"][:, 0].mean().item()
    if cfg.models.monitor:           # overoptimisation monitor: a held-out RM beside the proxy, every step
        metrics["monitor/score_mean"] = out["reward"][:, -1].mean().item()
    if gold_fn is not None:          # the tiny world's hidden gold reward beside the proxy, every step
        gold = torch.tensor([gold_fn(t) for t in response_texts(tokenizer, batch)])
        metrics["gold/mean"], metrics["gold/std"] = gold.mean().item(), gold.std().item()
    metrics["kl/coef"] = kl.coef
    kl.update(exp_stats["kl/ref_per_seq"])
    logger.log(step, metrics)
    logger.log_samples(step, [{**r, "score": s} for r, s in zip(
        first_rollouts(tokenizer, batch, cfg.logging.samples_per_step), scores.tolist())])
    print(f"step {step}/{cfg.train.steps}  score {metrics['reward/score_mean']:+.3f}±{metrics['reward/score_std']:.3f}"
          f"  kl {metrics['kl/ref_per_seq']:.4f}  pg {metrics['policy/loss']:+.4f}"
          + (f"  vf {metrics['value/loss']:.4f}" if "value/loss" in metrics else "") +
          f"  len {metrics['response/length_mean']:.1f}  | gen {metrics['time/generate']:.2f}s"
          f" score {metrics['time/score']:.2f}s train {metrics['time/train']:.2f}s"
          f" sync {metrics['time/weight_sync']:.2f}s", flush=True)

    if step == cfg.train.steps or (cfg.checkpoint.every and step % cfg.checkpoint.every == 0):
        return save_checkpoint(cfg, actors, run_dir, step, stream, tok_dir, kl.coef, norm)
    return None



def train(cfg: Config, resume: bool = False, keep_actors: bool = False, gold_fn=None) -> dict:
    """Run PPO to cfg.train.steps; returns where things were written (and the live actors if keep_actors).
    gold_fn(text) -> float, when given, is logged beside the proxy reward every step (the tiny world's monitor)."""
    cfg = resolve_paths(cfg.check_ppo())
    run_dir = Path(cfg.run.output_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, run_dir / "config.yaml")
    device = cluster_device(cfg, cfg.policy.gpus_per_rank)
    torch.manual_seed(cfg.run.seed)

    tok_dir = cfg.models.tokenizer or cfg.models.policy
    tokenizer = load_tokenizer(tok_dir, cfg.models.trust_remote_code)
    for what, path in [("policy", cfg.models.policy)] + [("models.monitor", cfg.models.monitor)] * bool(
            cfg.models.monitor) + [(f"reward.sources[{i}]", s.path) for i, s in enumerate(cfg.reward_sources())
                                   if s.kind == "model"]:
        check_tokenizer_matches(tokenizer, path, what)
    stream = PromptStream(load_prompts(cfg.data.prompts, cfg.data.prompt_key, cfg.data.reward_keys),
                          cfg.generation.prompts_per_step,
                          cfg.run.seed, cfg.data.shuffle)

    start_ray(cfg)
    actors = build_actors(cfg, device, run_dir)
    sync = make_weight_sync(cfg, actors.policy, actors.engines)
    for name, group in actors.trained.items():
        counts = ray.get(group.actors[0].parameter_counts.remote())
        print(f"{name}: {counts['trainable']:,} of {counts['total']:,} parameters train"
              + (" (LoRA)" if getattr(cfg, name).lora.rank else ""), flush=True)

    start_step, kl, norm = 0, KLCoef(cfg.ppo), ScoreNorm(cfg.ppo.reward_norm)
    latest = ckpt.latest(ckpt.checkpoint_root(run_dir)) if resume else None
    if latest is not None:
        state = ckpt.load_state(latest)
        ray.get([r for name, g in actors.trained.items() for r in g.call("load_ds", str(latest / f"{name}_ds"))])
        stream.load_state(state["data"])
        start_step, kl.coef = state["step"], state.get("kl_coef", kl.coef)
        norm.load(state.get("score_norm"))
        sync.push()                                            # the engines start from the resumed policy
        print(f"resumed from {latest} (step {start_step})", flush=True)

    logger = MetricsLogger(run_dir, cfg, cfg.run.name, resume_step=start_step if latest is not None else None)
    last_ckpt = latest
    try:
        for step in range(start_step + 1, cfg.train.steps + 1):
            last_ckpt = ppo_step(cfg, actors, sync, tokenizer, stream, logger, step, run_dir, tok_dir, kl, norm,
                                 gold_fn) or last_ckpt
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
    if summary == 2:
        return 2
    print(f"\ndone in {time.time() - t0:.0f}s\n  metrics:    {summary['metrics']}\n  W&B run:    {summary['wandb']}"
          f"\n  checkpoint: {summary['checkpoint']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
