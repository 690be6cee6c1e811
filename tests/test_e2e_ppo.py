"""PPO end to end on a multi-node Ray cluster simulated on loopback (ray.cluster_utils.Cluster: a head and three
worker nodes, each its own raylet and object store, with custom resources naming their roles): a DeepSpeed ZeRO-3
policy (2 ranks) and a critic on the trainer node, a ZeRO-3 reference (2 ranks), reward model (3 ranks) and
distillation teacher (2 ranks, beside the reward: distill.coef) on the scorer node, one vLLM CPU engine on the rollout
node; the weights cross nodes over the process-group backend (gloo).
Nothing mocked. (ZeRO-2, the default, runs in most other end-to-end tests.) Slow: it starts every actor."""
import json
import math
from pathlib import Path

import pytest
import ray
import torch
from ray.cluster_utils import Cluster

from conftest import tiny_overrides
from launch.ppo import train
from rlhf_ray.batch import build_rollout_batch
from rlhf_ray.config import load_config
from rlhf_ray.models import load_causal_lm, load_tokenizer, response_logprobs

pytestmark = [pytest.mark.slow, pytest.mark.own_cluster]

REQUIRED = ["reward/score_mean", "reward/score_std", "kl/ref_per_seq", "policy/loss", "value/loss", "policy/clipfrac",
            "policy/entropy", "policy/approx_kl", "response/length_mean", "perf/tokens_per_s", "time/generate",
            "time/score", "time/policy_update", "time/critic_update", "time/weight_sync"]


def read_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_ppo_at_zero3_across_nodes_then_engine_matches_policy(tiny_world, tmp_path):
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "object_store_memory": 200 << 20,
                                                            "include_dashboard": False})
    nodes = {name: cluster.add_node(num_cpus=cpus, resources={name: 100}, object_store_memory=200 << 20)
             for name, cpus in (("trainer", 3), ("scorer", 7), ("rollout", 1))}
    run_dir = tmp_path / "run"
    # the frozen roles are partitioned too: reference over 2 ranks, reward over 3 ranks whose shards (5, 5, 6 rows
    # in micro-batches of 5) need different numbers of forwards, which the collective evens out
    # and a teacher (here the starting policy itself, so its KL must equal the reference's) at ZeRO-3 over 2 ranks
    frozen = ["reference.zero_stage=3", "reference.num_ranks=2", "reward.zero_stage=3", "reward.num_ranks=3",
              "reward.micro_batch_size=5", "placement.share_process=[]", f"models.teacher={tiny_world['policy']}",
              "teacher.zero_stage=3", "teacher.num_ranks=2", "teacher.micro_batch_size=3", "distill.coef=0.1"]
    nodes_of_roles = ["policy.node_resource=trainer", "critic.node_resource=trainer", "reference.node_resource=scorer",
                      "reward.node_resource=scorer", "teacher.node_resource=scorer", "engine.node_resource=rollout"]
    try:
        cfg = load_config("configs/tiny_ppo.yaml", tiny_overrides(tiny_world, run_dir) + [
            f"ray.address={cluster.address}", "policy.zero_stage=3", "weight_sync.backend=process_group",
            *frozen, *nodes_of_roles])
        summary = train(cfg, keep_actors=True)
        actors = summary["actors"]
        node_of = {n.node_id: name for name, n in nodes.items()}
        where = {name: {node_of.get(ray.get(a.placement.remote())["node"]) for a in g.actors}
                 for name, g in (("policy", actors.policy), ("critic", actors.critic), ("reference", actors.reference),
                                 ("reward", actors.reward), ("teacher", actors.teacher), ("engine", actors.engine_group))}
        assert where == {"policy": {"trainer"}, "critic": {"trainer"}, "reference": {"scorer"},
                         "reward": {"scorer"}, "teacher": {"scorer"}, "engine": {"rollout"}}

        rows = read_metrics(run_dir)
        assert [r["step"] for r in rows] == [1, 2, 3]
        for r in rows:
            missing = [k for k in REQUIRED if k not in r]
            assert not missing, missing
            assert all(math.isfinite(r[k]) for k in REQUIRED), r
        assert abs(rows[0]["kl/ref_per_seq"]) < 1e-4               # step 1: the reference is the starting policy
        for r in rows:          # the partitioned teacher scores every token as the partitioned reference does
            assert r["distill/reverse_kl_per_seq"] == pytest.approx(r["kl/ref_per_seq"], abs=1e-4), r
            assert r["time/busy/teacher"] > 0 and r["perf/teacher_tokens_per_s"] > 0
        assert rows[-1]["kl/ref_per_seq"] > 0                      # the policy moved away from the reference
        # steps 2 and 3 sampled with weights broadcast from the trainer node to the rollout node
        assert max(r["rollout/logprob_diff_max"] for r in rows) < 1e-3 and rows[-1]["perf/weight_sync_mb"] > 1

        # the saved policy is an HF directory that from_pretrained opens, and it differs from the start
        saved = load_causal_lm(summary["checkpoint"] + "/policy")
        start = load_causal_lm(tiny_world["policy"])
        diffs = [(a - b).abs().max().item() for a, b in zip(saved.state_dict().values(), start.state_dict().values())]
        assert max(diffs) > 1e-4

        # after the last sync, the engine scores a fixed prompt+response exactly as the policy's own forward pass
        tok = load_tokenizer(tiny_world["policy"])
        prompt = tok("The yield statement", add_special_tokens=False)["input_ids"]
        response = tok(" can be used in a function body", add_special_tokens=False)["input_ids"]
        batch = build_rollout_batch([prompt] * 2, [response] * 2, [[0.0] * len(response)] * 2, tok.pad_token_id)
        policy_lp = torch.cat(actors.policy.run("logprobs", batch))[0]        # both ZeRO ranks take a shard
        hf_lp = response_logprobs(saved, batch.input_ids[:1], batch.attention_mask[:1], len(response))[0]
        start_lp = response_logprobs(start, batch.input_ids[:1], batch.attention_mask[:1], len(response))[0]
        for engine in actors.engines:      # (more than one engine, each getting every push: test_e2e_async.py)
            engine_lp = torch.tensor(ray.get(engine.prompt_logprobs.remote([prompt + response], [len(prompt)]))[0])
            assert (engine_lp - policy_lp).abs().max().item() < 1e-4
            assert (engine_lp - hf_lp.detach()).abs().max().item() < 1e-4
            assert (engine_lp - start_lp.detach()).abs().max().item() > 1e-3   # no longer the start weights
            # a judge's verdict is read the same way: the next-token logprobs of given label tokens
            labels = tok(" 1 2 3 A B", add_special_tokens=False)["input_ids"]
            judged = torch.tensor(ray.get(engine.label_logprobs.remote([prompt + response], labels))[0])
            with torch.no_grad():
                hf_next = torch.log_softmax(saved(torch.tensor([prompt + response])).logits[0, -1].float(), -1)
            assert (judged - hf_next[labels]).abs().max().item() < 1e-4, (judged, hf_next[labels])

        wandb_dir = summary["wandb"]
        assert wandb_dir and list(Path(wandb_dir).glob("*.wandb"))
        actors.shutdown()
    finally:
        ray.shutdown()
        cluster.shutdown()
