"""Colocated roles on the real machinery: placement.colocate puts rank i of each listed role in bundle i of one
shared placement group (same node, same GPU share on a cluster); PPO then runs as usual. Slow."""
import json

import pytest
import ray

from conftest import tiny_overrides
from launch.ppo import train
from rlhf_ray.config import load_config

pytestmark = pytest.mark.slow



def test_colocated_roles_share_bundles_and_ppo_runs(tiny_world, tmp_path):
    """Two shared placement groups in one run: policy beside reference (2 ranks each), and critic, reward and the
    engine in one bundle, the engine sleeping while the trainers run (a no-op on CPU: no GPU memory, but the
    driver's sleep and wake calls run)."""
    run_dir = tmp_path / "run"
    cfg = load_config("configs/tiny_ppo.yaml", tiny_overrides(tiny_world, run_dir) + [
        "placement.colocate=[[policy, reference], [critic, reward, engine]]", "placement.engines_sleep=true",
        "reference.num_ranks=2", "placement.share_process=[]"])
    summary = train(cfg, keep_actors=True)
    actors = summary["actors"]
    try:
        where = {name: ray.get([a.placement.remote() for a in g.actors]) for name, g in actors.groups().items()}
        for a, b in [("policy", "reference"), ("critic", "reward"), ("critic", "engine")]:   # rank i beside rank i
            assert [(w["pg"], w["node"], w["gpu_ids"]) for w in where[a]] == \
                   [(w["pg"], w["node"], w["gpu_ids"]) for w in where[b]]
        assert where["policy"][0]["pg"] != where["critic"][0]["pg"]
        assert len({w["pid"] for ws in where.values() for w in ws}) == 7    # placed together, each its own process
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert len(rows) == 3 and max(r["rollout/logprob_diff_max"] for r in rows) < 1e-3
    finally:
        actors.shutdown()
