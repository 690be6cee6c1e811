"""Asynchronous rollout end to end on the real actor machinery (Ray, DeepSpeed ZeRO over gloo, vLLM CPU engines;
nothing mocked): the overlapping path changes nothing but which weights sample, GRPO learns one step off-policy,
and a resumed run trains on the rollout its checkpoint saved. Multi-turn episodes (env.cls) run in both: a one-turn
environment through the episodes' machinery; a tool the model calls over several turns, token in, token out, some
of its calls crashing or hanging. Slow."""
import json
import math

import pytest
import ray
import torch
from safetensors.torch import load_file

from conftest import OFF_POLICY_LAYOUT, tiny_overrides
from episode_envs import OBSERVATION
from launch.ppo import train
from rlhf_ray.config import load_config
from rlhf_ray.env import ENDINGS, env_stop_ids
from rlhf_ray.models import load_tokenizer
from rlhf_ray.prompts import render_prompts

pytestmark = pytest.mark.slow

SAME = ["reward/score_mean", "reward/score_std", "kl/ref_per_seq", "policy/loss", "value/loss", "value/clipfrac",
        "advantage/mean", "returns/mean", "response/length_mean", "rollout/is_ratio_max"]


# an engine generating beside scoring has a process of its own; one policy rank (what is compared needs no ZeRO split)


TOOLS = ["ok", "ok", "ok", "raise", "ok", "hang", "ok", "ok"]     # the tool each prompt row gets, by row index mod 8


def read_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# every episode ends after its first turn, run through the multi-turn machinery (episodes, environment workers, the
# env reward source, a pending rollout of episodes saved with a checkpoint)
SINGLE_TURN_ENV = ["env.cls=tests.episode_envs:OneTurn", "reward.sources=[{kind: model}, {kind: env}]"]


def test_overlapping_rollouts_change_only_the_sampling_weights(tiny_world, tmp_path):
    """With the policy frozen (lr 1e-30: each update is below fp32 resolution) every weight version is the same
    weights: one step off-policy must then give, bit for bit, the synchronous run's samples, losses and critic.
    GAE with a critic. Both sample through a one-turn environment (episodes on the engines, environment workers, the
    env reward source). (Its episodes are not the plain single-turn run's tokens: each episode is sampled with a
    seed of its own, as an agent's calls are, while a plain rollout seeds the whole call.)"""
    runs = {}
    for staleness in (0, 1):
        run_dir = tmp_path / f"staleness{staleness}"
        cfg = load_config("configs/tiny_ppo.yaml", tiny_overrides(tiny_world, run_dir) + [
            f"rollout.max_staleness={staleness}", "ppo.is_correction=tis", "policy.lr=1e-30", "checkpoint.every=2",
            *OFF_POLICY_LAYOUT, *SINGLE_TURN_ENV])
        summary = train(cfg)
        runs[staleness] = (read_metrics(run_dir), summary["checkpoint"])
    (sync_rows, sync_ckpt), (async_rows, async_ckpt) = runs[0], runs[1]
    assert [r["rollout/staleness_max"] for r in sync_rows] == [0, 0, 0]
    assert [r["rollout/staleness_max"] for r in async_rows] == [0, 1, 1]      # step s sampled by update s - 2
    for s, a in zip(sync_rows, async_rows):
        assert {k: s[k] for k in SAME} == {k: a[k] for k in SAME}
    for a in sync_rows + async_rows:          # through the environment: one turn each, ended by it, nothing observed
        assert (a["env/turns_mean"], a["env/ended_done_frac"], a["env/observation_tokens_mean"]) == (1, 1, 0), a
    critic = [load_file(f"{c}/critic/model.safetensors") for c in (sync_ckpt, async_ckpt)]
    assert all(torch.equal(critic[0][k], critic[1][k]) for k in critic[0])
    for r in sync_rows + async_rows:          # each role's busy time within the step is logged
        assert r["time/busy/engine"] >= r["time/generate"] >= 0 and r["time/busy/critic"] > 0
    # the engines generate within every step, except the last one off-policy (its samples were drawn in the one before)
    assert all(r["time/generate"] > 0 for r in sync_rows + async_rows[:-1]) and async_rows[-1]["time/generate"] == 0

    # the step-2 checkpoint holds step 3's rollout, drawn by update-1 weights; a run resumed there trains on it
    # (stale by one, as the uninterrupted run did) instead of sampling afresh
    run_dir = tmp_path / "staleness1"
    cfg = load_config("configs/tiny_ppo.yaml", tiny_overrides(tiny_world, run_dir) + [
        "rollout.max_staleness=1", "ppo.is_correction=tis", "policy.lr=1e-30", "train.steps=4", *OFF_POLICY_LAYOUT,
        *SINGLE_TURN_ENV])
    (run_dir / "checkpoints" / "step_000003").rename(run_dir / "checkpoints" / "moved_aside")
    train(cfg, resume=True)
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert rows[2]["rollout/staleness_max"] == 1
    assert {k: rows[2][k] for k in SAME} == {k: async_rows[2][k] for k in SAME}


def test_grpo_one_step_off_policy_with_truncated_importance_weights_on_two_engines_runs_multi_turn_episodes(
        tiny_world, tmp_path):
    """GRPO one step off-policy on multi-turn episodes: a tool (tests/episode_envs.py Echo) answers each turn that
    ends on "." and the model goes on, up to 3 turns; one prompt in 8 has a tool that crashes, one a tool that hangs
    past the timeout. What it checks is the machinery (staleness, both engines synced, the IS weights, the episodes'
    tokens and masks, failures counted), not learning: 5 steps of 32 samples are too few to show it. That GRPO one
    step off-policy learns is measured in benchmarks/vs_trl_grpo.py (gold over 100 steps, 3 seeds)."""
    run_dir = tmp_path / "run"
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": json.loads(line)["prompt"], "tool": TOOLS[i % 8]}) + "\n"
                               for i, line in enumerate(open(tiny_world["prompts"]))))
    cfg = load_config("configs/tiny_grpo.yaml", tiny_overrides(tiny_world, run_dir) + [
        "rollout.max_staleness=1", "ppo.is_correction=tis", "ppo.is_cap=2.0", "policy.num_ranks=1", *OFF_POLICY_LAYOUT,
        "engine.num_ranks=2", "generation.prompts_per_step=8", "generation.n=4", "ppo.minibatch_size=16",
        "policy.lr=1e-3", "train.steps=5", f"data.prompts={prompts}", "data.reward_keys=[tool]",
        "reward.sources=[{kind: function, path: 'rlhf_ray.tiny_world.gold:tiny_gold'}, {kind: env, weight: 0.5}]",
        "env.cls=tests.episode_envs:Echo", "env.turn_stop=['.']", "env.max_turns=3", "env.max_turn_tokens=6",
        "env.timeout_s=1", "env.error_reward=-1", "env.num_ranks=2"])
    summary = train(cfg, keep_actors=True)
    actors = summary["actors"]
    try:
        assert actors.critic is None
        where = {r: ray.get(g.actors[0].placement.remote()) for r, g in actors.groups().items()}
        assert where["reference"]["pid"] == where["reward"]["pid"] == where["policy"]["pid"]   # share_process
        assert where["engine"]["pid"] != where["policy"]["pid"]
        rows = read_metrics(run_dir)
        assert len(actors.engines) == 2
        assert [r["rollout/staleness_max"] for r in rows] == [0, 1, 1, 1, 1]
        assert [r["rollout/engine_version"] for r in rows] == [0, 0, 1, 2, 3]      # both engines got every push
        assert rows[0]["rollout/is_ratio_max"] == pytest.approx(1.0, abs=1e-3)   # step 1: no update yet
        assert max(r["rollout/is_ratio_max"] for r in rows[1:]) > 1.0 + 1e-3      # stale samples reweighted
        assert all(0 <= r["rollout/is_corrected_frac"] < 0.5 for r in rows)
        assert all(math.isfinite(r["policy/loss"]) for r in rows) and rows[-1]["kl/ref_per_seq"] > 0
        # the episodes: several turns with the tool's answers between them; each crashing or hanging tool ends its
        # episode (all n of its prompt's), counted, and the run goes on
        assert all(r["env/turns_mean"] > 1 and r["env/observation_tokens_mean"] > 0 for r in rows), rows
        assert all(r["env/errors"] % 4 == 0 and r["env/timeouts"] % 4 == 0 for r in rows)
        assert sum(r["env/errors"] for r in rows) > 0 and sum(r["env/timeouts"] for r in rows) > 0
        for r in rows:
            assert sum(r[f"env/ended_{why}_frac"] for why in ENDINGS) == pytest.approx(1.0)
            assert r["env/tool_calls_mean"] > 0
        assert all(r["time/busy/env"] > 0 for r in rows[:-1])     # the last step's episodes ran in the one before
        # token in, token out: each episode is the engine's own ids, the observation's ids appended between
        # turns, masked out; the model's turns end on "." (or their budget), and their sampling logprobs are what the
        # engine gives the whole transcript
        tok = load_tokenizer(tiny_world["policy"])
        dot, obs = env_stop_ids(tok, ["."]), tok(OBSERVATION, add_special_tokens=False)["input_ids"]
        rows_in = [json.loads(line) for line in open(prompts)]
        ok = [r for r in rows_in if r["tool"] == "ok"][:4]
        ids = render_prompts(tok, [r["prompt"] for r in ok], cfg.data)
        eps = ray.get(actors.engines[0].episodes.remote(ids, ok, 2, 16, 1.0, 1.0, list(range(7, 15)), cfg.env, dot,
                                                        actors.env.actors))
        assert len(eps) == 8 and max(e["episode"]["turns"] for e in eps) > 1
        for e, p in zip(eps, [p for p in ids for _ in range(2)]):
            turns, i, a = [], 0, e["action"]
            while i < len(a):                 # split into runs: the model's turns and the observations between them
                j = i
                while j < len(a) and a[j] == a[i]:
                    j += 1
                turns.append((a[i], e["ids"][i:j]))
                i = j
            assert [k for k, _ in turns] == [1, 0] * (len(turns) // 2) + [1] * (len(turns) % 2)
            for k, (kind, part) in enumerate(turns):
                if kind == 0:
                    assert part == obs[:len(part)] and (part == obs or k == len(turns) - 1)
                elif k + 1 < len(turns):
                    assert part[-1] in dot or len(part) == 6
            whole = ray.get(actors.engines[0].prompt_logprobs.remote([p + e["ids"]], [len(p)]))[0]
            acted = [(lp, w) for lp, w, m in zip(e["logprobs"], whole, a) if m]
            assert max(abs(x - y) for x, y in acted) < 1e-3, acted
            assert all(lp == 0.0 for lp, m in zip(e["logprobs"], a) if not m)
            assert sum(e["token_rewards"]) == e["episode"]["reward"]
    finally:
        actors.shutdown()
