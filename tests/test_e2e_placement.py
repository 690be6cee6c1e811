"""Colocated roles on the real machinery: placement.colocate puts rank i of each listed role in bundle i of one
shared placement group (same node, same GPU share on a cluster); PPO then runs as usual, here with LoRA adapters
on a ZeRO-3 policy, whose merged weights reach the engine. Slow."""
import json
import math

import pytest
import ray

from conftest import tiny_overrides
from launch.ppo import train
from rlhf_ray.config import load_config
from rlhf_ray.models import load_causal_lm

pytestmark = pytest.mark.slow



def test_colocated_roles_share_bundles_and_ppo_with_lora_runs(tiny_world, tmp_path):
    """Two shared placement groups in one run: policy beside reference (2 ranks each), and critic, reward, the
    engine and an LLM judge's engine in one bundle, the engine sleeping while the trainers run (a no-op on CPU: no
    GPU memory, but the driver's sleep and wake calls run; the judge scores every step, at weight 0 here). The
    policy and critic train LoRA adapters only; the policy at ZeRO-3, so adapters and base weights are merged from
    partitions before each push to the engine; the critic on a 4-bit NF4 base (QLoRA, its value head full
    precision), the reward model in int8."""
    run_dir = tmp_path / "run"
    cfg = load_config("configs/tiny_ppo.yaml", tiny_overrides(tiny_world, run_dir) + [
        "placement.colocate=[[policy, reference], [critic, reward, engine, judge]]", "placement.engines_sleep=true",
        "reward.sources=[{kind: model}, {kind: judge, weight: 0.0}]", f"judge.model={tiny_world['policy']}",
        "judge.score_labels=['1','2','3','4','5']",
        "reference.num_ranks=2", "placement.share_process=[]",
        "policy.zero_stage=3", "policy.lora.rank=8", "policy.lora.alpha=16", "critic.lora.rank=4", "policy.lr=2e-3",
        "critic.quantization=nf4", "reward.quantization=int8"])
    summary = train(cfg, keep_actors=True)
    actors = summary["actors"]
    try:
        where = {name: ray.get([a.placement.remote() for a in g.actors]) for name, g in actors.groups().items()}
        for a, b in [("policy", "reference"), ("critic", "reward"), ("critic", "engine"), ("critic", "judge")]:
            assert [(w["pg"], w["node"], w["gpu_ids"]) for w in where[a]] == \
                   [(w["pg"], w["node"], w["gpu_ids"]) for w in where[b]]
        assert where["policy"][0]["pg"] != where["critic"][0]["pg"]
        assert len({w["pid"] for ws in where.values() for w in ws}) == 8    # placed together, each its own process
        for group in (actors.policy, actors.critic):
            counts = group.run("parameter_counts")[0]
            assert 0 < counts["trainable"] < 0.2 * counts["total"], counts
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert all(math.isfinite(r["value/loss"]) and math.isfinite(r["reward/score_mean"]) for r in rows)
        # steps 2 and 3 sampled from engines that had received the merged weights W + (alpha/r) B A:
        # their sampling logprobs match the adapted policy's own forward pass
        assert len(rows) == 3 and max(r["rollout/logprob_diff_max"] for r in rows) < 1e-3
        assert all(r["judge/answers"] == 16 and r["judge/fallbacks"] == 0 for r in rows)      # 8 prompts x 2
        assert rows[-1]["kl/ref_per_seq"] > 0
        saved = load_causal_lm(summary["checkpoint"] + "/policy")       # merged, plain HF names
        start = load_causal_lm(tiny_world["policy"])
        assert set(saved.state_dict()) == set(start.state_dict())
        moved = {k: (saved.state_dict()[k] - v).abs().max().item() for k, v in start.state_dict().items()}
        assert max(moved.values()) > 1e-4
        assert moved["model.embed_tokens.weight"] == 0.0               # frozen outside the adapters
    finally:
        actors.shutdown()
