"""A multi-node Ray cluster simulated on loopback (ray.cluster_utils.Cluster: a head and three worker nodes,
each its own raylet and object store, with custom resources naming their roles). The tiny PPO loop runs with
its roles spread over the nodes the layout names, and the weights cross nodes over the process-group backend
(gloo). Real Ray, DeepSpeed and vLLM; slow."""
import json

import pytest
import ray
from ray.cluster_utils import Cluster

from conftest import tiny_overrides
from launch.ppo import train
from rlhf_ray.config import load_config

pytestmark = [pytest.mark.slow, pytest.mark.own_cluster]


def test_roles_land_on_the_nodes_the_layout_names_and_sync_crosses_nodes(tiny_world, tmp_path):
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "object_store_memory": 200 << 20,
                                                            "include_dashboard": False})
    nodes = {name: cluster.add_node(num_cpus=cpus, resources={name: 100}, object_store_memory=200 << 20)
             for name, cpus in (("trainer", 3), ("scorer", 2), ("rollout", 1))}
    run_dir = tmp_path / "run"
    try:
        cfg = load_config("configs/tiny_ppo.yaml", tiny_overrides(tiny_world, run_dir) + [
            f"ray.address={cluster.address}", "policy.zero_stage=3", "policy.node_resource=trainer",
            "critic.node_resource=trainer", "reference.node_resource=scorer", "reward.node_resource=scorer",
            "engine.node_resource=rollout", "weight_sync.backend=process_group", "logging.wandb.enabled=false",
            "placement.share_process=[[reference, reward]]"])   # the engine on a node of its own
        summary = train(cfg, keep_actors=True)
        actors = summary["actors"]
        node_of = {n.node_id: name for name, n in nodes.items()}
        where = {name: {node_of.get(ray.get(a.placement.remote())["node"]) for a in g.actors}
                 for name, g in (("policy", actors.policy), ("critic", actors.critic), ("reference", actors.reference),
                                 ("reward", actors.reward), ("engine", actors.engine_group))}
        assert where == {"policy": {"trainer"}, "critic": {"trainer"}, "reference": {"scorer"},
                         "reward": {"scorer"}, "engine": {"rollout"}}
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert len(rows) == 3
        # steps 2 and 3 sampled with weights broadcast from the trainer node to the rollout node
        assert max(r["rollout/logprob_diff_max"] for r in rows) < 1e-3
        assert rows[-1]["kl/ref_per_seq"] > 0 and rows[-1]["perf/weight_sync_mb"] > 1
        actors.shutdown()
    finally:
        ray.shutdown()
        cluster.shutdown()
