"""Asynchronous rollout end to end on the real actor machinery (Ray, DeepSpeed ZeRO over gloo, vLLM CPU engines;
nothing mocked): the overlapping path changes nothing but which weights sample, GRPO learns one step off-policy,
and a resumed run trains on the rollout its checkpoint saved. Slow."""
import json
import math

import pytest
import ray
import torch
from safetensors.torch import load_file

from conftest import tiny_overrides
from launch.ppo import train
from rlhf_ray.config import load_config

pytestmark = pytest.mark.slow

SAME = ["reward/score_mean", "reward/score_std", "kl/ref_per_seq", "policy/loss", "value/loss", "value/clipfrac",
        "advantage/mean", "returns/mean", "response/length_mean", "rollout/is_ratio_max"]


# an engine generating beside scoring has a process of its own; one policy rank (what is compared needs no ZeRO split)
OFF_POLICY_LAYOUT = ["placement.share_process=[[reference, reward]]", "policy.num_ranks=1"]


def read_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_overlapping_rollouts_change_only_the_sampling_weights(tiny_world, tmp_path):
    """With the policy frozen (lr 1e-30: each update is below fp32 resolution) every weight version is the same
    weights: one step off-policy must then give, bit for bit, the synchronous run's samples, losses and critic.
    GAE with a critic."""
    runs = {}
    for staleness in (0, 1):
        run_dir = tmp_path / f"staleness{staleness}"
        cfg = load_config("configs/tiny_ppo.yaml", tiny_overrides(tiny_world, run_dir) + [
            f"rollout.max_staleness={staleness}", "ppo.is_correction=tis", "policy.lr=1e-30", "checkpoint.every=2",
            *OFF_POLICY_LAYOUT])
        summary = train(cfg)
        runs[staleness] = (read_metrics(run_dir), summary["checkpoint"])
    (sync_rows, sync_ckpt), (async_rows, async_ckpt) = runs[0], runs[1]
    assert [r["rollout/staleness_max"] for r in sync_rows] == [0, 0, 0]
    assert [r["rollout/staleness_max"] for r in async_rows] == [0, 1, 1]      # step s sampled by update s - 2
    for s, a in zip(sync_rows, async_rows):
        assert {k: s[k] for k in SAME} == {k: a[k] for k in SAME}
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
        "rollout.max_staleness=1", "ppo.is_correction=tis", "policy.lr=1e-30", "train.steps=4", *OFF_POLICY_LAYOUT])
    (run_dir / "checkpoints" / "step_000003").rename(run_dir / "checkpoints" / "moved_aside")
    train(cfg, resume=True)
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert rows[2]["rollout/staleness_max"] == 1
    assert {k: rows[2][k] for k in SAME} == {k: async_rows[2][k] for k in SAME}


def test_grpo_learns_one_step_off_policy_with_truncated_importance_weights_on_two_engines(tiny_world, tmp_path):
    run_dir = tmp_path / "run"
    cfg = load_config("configs/tiny_grpo.yaml", tiny_overrides(tiny_world, run_dir) + [
        "rollout.max_staleness=1", "ppo.is_correction=tis", "ppo.is_cap=2.0", "policy.num_ranks=1", *OFF_POLICY_LAYOUT,
        "engine.num_engines=2", "generation.prompts_per_step=8", "generation.n=4", "ppo.minibatch_size=16",
        "policy.lr=1e-3", "train.steps=5"])
    summary = train(cfg, keep_actors=True)
    actors = summary["actors"]
    try:
        assert actors.critic is None
        where = {r: ray.get(g.actors[0].placement.remote()) for r, g in actors.groups().items()}
        assert where["reference"]["pid"] == where["reward"]["pid"] != where["policy"]["pid"]   # share_process
        rows = read_metrics(run_dir)
        assert len(actors.engines) == 2
        assert [r["rollout/staleness_max"] for r in rows] == [0, 1, 1, 1, 1]
        assert [r["rollout/engine_version"] for r in rows] == [0, 0, 1, 2, 3]      # both engines got every push
        assert rows[0]["rollout/is_ratio_max"] == pytest.approx(1.0, abs=1e-3)   # step 1: no update yet
        assert max(r["rollout/is_ratio_max"] for r in rows[1:]) > 1.0 + 1e-3      # stale samples reweighted
        assert all(0 <= r["rollout/is_corrected_frac"] < 0.5 for r in rows)
        assert all(math.isfinite(r["policy/loss"]) for r in rows) and rows[-1]["kl/ref_per_seq"] > 0
    finally:
        actors.shutdown()
