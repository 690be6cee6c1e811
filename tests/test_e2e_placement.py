"""Colocated roles on the real machinery: placement.colocate puts rank i of each listed role in bundle i of one
shared placement group (same node, same GPU share on a cluster); PPO then runs as usual. Slow."""
import json

import pytest
import ray

from conftest import tiny_overrides
from launch.ppo import train
from rlhf_ray.config import load_config

pytestmark = pytest.mark.slow

LAYOUTS = {
    "trainers-in-pairs": (["placement.colocate=[[policy, reference], [critic, reward]]", "reference.num_ranks=2"],
                          [("policy", "reference"), ("critic", "reward")]),
    # everything on the same bundle, engines sleeping while the trainers run (a no-op on CPU: no GPU memory)
    "all-with-sleeping-engines": (["placement.colocate=[[policy, reference, critic, reward, engine]]",
                                   "placement.engines_sleep=true", "policy.num_ranks=1"],
                                  [("policy", "reference"), ("policy", "critic"), ("policy", "reward"),
                                   ("policy", "engine")]),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_colocated_roles_share_bundles_and_ppo_runs(tiny_world, tmp_path, layout):
    sets, pairs = LAYOUTS[layout]
    run_dir = tmp_path / "run"
    cfg = load_config("configs/tiny_ppo.yaml", tiny_overrides(tiny_world, run_dir) + sets)
    summary = train(cfg, keep_actors=True)
    actors = summary["actors"]
    try:
        where = {name: ray.get([a.placement.remote() for a in g.actors])
                 for name, g in (("policy", actors.policy), ("reference", actors.reference),
                                 ("critic", actors.critic), ("reward", actors.reward), ("engine", actors.engine_group))}
        for a, b in pairs:                                              # rank i beside rank i, same GPUs
            assert [(w["pg"], w["node"], w["gpu_ids"]) for w in where[a]] == \
                   [(w["pg"], w["node"], w["gpu_ids"]) for w in where[b]]
        if layout == "trainers-in-pairs":
            assert where["policy"][0]["pg"] != where["critic"][0]["pg"] != where["engine"][0]["pg"]
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert len(rows) == 3 and max(r["rollout/logprob_diff_max"] for r in rows) < 1e-3
    finally:
        actors.shutdown()
