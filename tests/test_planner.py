"""The memory planner against the ZeRO paper's accounting, hand-checked cases and the shipped layouts."""
import json
from pathlib import Path

import pytest

from launch.plan import main as plan_main
from rlhf_ray.config import ConfigError, load_config
from rlhf_ray.planner import (CUDA_CONTEXT, REDUCE_BUCKET, SLACK, GiB, PRESETS, Arch, activations, make_plan,
                              model_states)


def test_model_states_follow_the_zero_paper():
    # Rajbhandari et al. 2020, figure 1: Psi = 7.5B parameters, N = 64 GPUs, mixed-precision Adam (K = 12)
    psi, n = 7.5e9, 64
    gb = {s: sum(model_states(psi, n, s).values()) / 1e9 for s in (0, 1, 2, 3)}
    assert gb[0] == pytest.approx(120.0)          # 2 + 2 + 12 bytes per parameter
    assert gb[1] == pytest.approx(31.4, abs=0.05)  # P_os:       4 Psi + 12 Psi / N
    assert gb[2] == pytest.approx(16.6, abs=0.05)  # P_os+g:     2 Psi + 14 Psi / N
    assert gb[3] == pytest.approx(1.875)           # P_os+g+p:   16 Psi / N
    off = model_states(psi, n, 2, offload=True)
    assert off["optimizer"] == 0 and off["weights"] == 2 * psi and off["grads"] == 2 * psi / n
    assert model_states(psi, n, 3, offload=True)["weights"] == 0        # stage 3 offloads the bf16 weights too


def test_lora_keeps_the_frozen_weights_and_trains_only_the_adapters():
    psi, t = 1e9, 1e6
    s = model_states(psi, 8, 2, trainable=t)
    assert s["weights"] == 2 * psi + 2 * t and s["grads"] == pytest.approx(2 * t / 8) and s["optimizer"] == 12 * t / 8
    small = Arch(hidden=8, layers=2, heads=2, kv_heads=1, intermediate=16, vocab=10)   # kv dim 4
    # per layer, r (in + out) per matrix: q, o (8+8), k, v (8+4), gate, up (8+16), down (16+8)
    assert small.lora_params(2) == 2 * 2 * (16 * 2 + 12 * 2 + 24 * 2 + 24)


def test_preset_parameter_counts_and_kv_cache_per_token():
    for name, billions in (("llama2-7b", 6.74), ("llama2-13b", 13.02), ("llama2-70b", 68.98)):
        assert PRESETS[name].params() / 1e9 == pytest.approx(billions, rel=0.005)
    assert PRESETS["llama2-70b"].kv_bytes_per_token() == 2 * 80 * 8 * 128 * 2      # GQA: 8 KV heads
    assert PRESETS["llama2-7b"].kv_bytes_per_token() == 2 * 32 * 32 * 128 * 2


def test_activations_with_and_without_checkpointing():
    a = PRESETS["llama2-7b"]
    s, b, h, i, L, V = 2048, 1, 4096, 11008, 32, 32000
    T = 1024                                      # the response positions, where the LM head runs
    layer = (24 * h + 8 * i) * s * b              # an HF decoder layer's saved tensors, bf16 (measured on a GPU)
    assert activations(a, s, b, False) == layer * L
    assert activations(a, s, b, True) == 2 * s * b * h * L + layer
    assert activations(a, s, b, True, T) - activations(a, s, b, True) == 18 * T * b * V
    assert activations(a, s, b, True, T, entropy_in_graph=True) - activations(a, s, b, True, T) == 8 * T * b * V


def _tiny_layout(extra=()):
    return load_config(None, ["models.policy=p", "data.prompts=x", "plan.policy_arch=llama2-7b",
                              "data.max_prompt_tokens=1024", "generation.max_new_tokens=1024", "generation.n=1",
                              "generation.prompts_per_step=8", "ppo.minibatch_size=8", "policy.num_ranks=2",
                              "policy.zero_stage=2", "policy.micro_batch_size=1", "critic.num_ranks=2",
                              "critic.micro_batch_size=1", "engine.max_model_len=2048", *extra])


def test_a_hand_checked_layout():
    plan = make_plan(_tiny_layout())
    psi = PRESETS["llama2-7b"].params()
    policy = next(r for r in plan.roles if r.role == "policy")
    s, T, h, i, L, V = 2048, 1024, 4096, 11008, 32, 32000
    # ZeRO-2 over 2 ranks, no checkpointing: the paper's states, then the backward phase (activations and logits,
    # the gradient bucket) over the step's 6 psi / 2, the allocator's share at stage 2, one CUDA context
    backward = (24 * h + 8 * i) * s * L + 18 * T * V + 2 * REDUCE_BUCKET
    allocated = 2 * psi + 14 * psi / 2 + max(backward, 6 * psi / 2)
    expected = allocated * (1 + SLACK[True][2]) + CUDA_CONTEXT
    assert policy.total == pytest.approx(expected)
    assert policy.per_gpu["optimizer_step"] == pytest.approx(6 * psi / 2) and "activations" not in policy.per_gpu
    engine = next(r for r in plan.roles if r.role == "engine")
    assert engine.per_gpu["weights"] == 2 * psi and engine.total == pytest.approx(0.5 * 80 * GiB)
    # every role on its own GPUs: 2 policy + 2 critic + 1 reference + 1 reward + 1 engine
    assert (plan.gpus, plan.nodes) == (7, 1)
    need = expected / GiB                                               # 7B at ZeRO-2 on 2 ranks: over 80 GiB
    assert plan.problems[0] == f"policy needs {need:.1f} GiB per GPU, over the 80.0 GiB it may use by {need - 80:.1f} GiB"
    four = ["policy.micro_batch_size=4"]                                # 4x the activations: the backward's peak
    big = next(r for r in make_plan(_tiny_layout(four)).roles if r.role == "policy")
    assert big.per_gpu["activations"] == pytest.approx(4 * (backward - 2 * REDUCE_BUCKET) + 2 * REDUCE_BUCKET)
    with_entropy = make_plan(_tiny_layout(four + ["ppo.entropy_coef=0.01"]))   # the bonus keeps its softmax
    grown = next(r for r in with_entropy.roles if r.role == "policy").total - big.total
    assert grown == pytest.approx(4 * 8 * T * V * (1 + SLACK[True][2]))
    stock = make_plan(_tiny_layout(["train.cuda_alloc_conf=null"]))     # PyTorch's default allocator reserves more
    assert next(r for r in stock.roles if r.role == "policy").total == pytest.approx(
        allocated * (1 + SLACK[False][2]) + CUDA_CONTEXT)


def test_a_judge_counts_its_own_engines():
    """A judge reward source adds the judge's engines: its weights and KV cache at its gpu_memory_utilization."""
    sets = ["reward.sources=[{kind: judge}]", "plan.judge_arch=llama2-13b", "judge.engine.num_ranks=2",
            "judge.engine.gpu_memory_utilization=0.9"]
    base, plan = make_plan(_tiny_layout()), make_plan(_tiny_layout(sets))
    judge = next(r for r in plan.roles if r.role == "judge")
    assert judge.per_gpu["weights"] == 2 * PRESETS["llama2-13b"].params()
    assert judge.gpus == 2 and judge.total == pytest.approx(0.9 * 80 * GiB) and plan.gpus == base.gpus + 2
    assert plan.problems == base.problems                               # on GPUs of its own, the judge fits


def test_a_distillation_teacher_is_planned_as_a_frozen_role_scoring_every_token():
    """models.teacher adds the teacher's ranks, counted as the reference is (weights, one layer's forward and the
    logits of the response tokens); ZeRO-3 shards its weights; with distill.only no reward role is planned."""
    sets = ["models.teacher=t", "plan.teacher_arch=llama2-13b", "teacher.num_ranks=2", "teacher.micro_batch_size=1"]
    base, plan = make_plan(_tiny_layout()), make_plan(_tiny_layout(sets))
    teacher = next(r for r in plan.roles if r.role == "teacher")
    psi = PRESETS["llama2-13b"].params(True)
    assert teacher.per_gpu["weights"] == 2 * psi and teacher.gpus == 2 and plan.gpus == base.gpus + 2
    assert teacher.per_gpu["activations"] > 6 * 1024 * PRESETS["llama2-13b"].vocab     # the logits of T tokens
    sharded = next(r for r in make_plan(_tiny_layout(sets + ["teacher.zero_stage=3"])).roles if r.role == "teacher")
    assert sharded.per_gpu["weights"] == pytest.approx(psi)                       # 2 psi / 2 ranks
    only = make_plan(_tiny_layout(sets + ["distill.only=true", "ppo.advantage=grpo", "generation.n=2",
                                          "ppo.minibatch_size=16"]))
    assert {r.role for r in only.roles} == {"policy", "reference", "teacher", "engine"}


def _measured(name):
    from benchmarks.gpu_check import planner_errors
    saved = json.loads((Path(__file__).parents[1] / "benchmarks" / "results" / name).read_text())
    return planner_errors(saved["results"], saved["meta"])


def test_the_planner_against_one_h200_set_on_0_5b_and_held_out_on_1_5b():
    """benchmarks/gpu_check.py's two runs (policy and critic, ZeRO 0/2/3 at one rank, checkpointing on and off):
    the planner's terms were set on the 0.5 B runs; on the 1.5 B ones the peak it predicts is within 1 % of the
    allocator's, and the device memory within 15 % under expandable segments (train.cuda_alloc_conf's default).
    Under PyTorch's default allocator the slack varies 5-45 %: the planner takes 0.5 B's largest, never under."""
    expandable = [e for e in _measured("gpu_check_h200_expandable_segments.json") if e["size"] == "1.5B"]
    stock = [e for e in _measured("gpu_check_h200_default_allocator.json") if e["size"] == "1.5B"]
    assert len(expandable) == len(stock) == 7
    for e in expandable + stock:
        assert abs(e["allocated_error"]) <= 1.0, e
    for e in expandable:
        assert abs(e["used_error"]) <= 15.0, e
    for e in stock:
        assert 0.0 <= e["used_error"] <= 30.0, e


def test_the_shipped_cluster_layouts_fit_and_70b_takes_four_nodes(capsys):
    nodes = {}
    for size in ("7b", "13b", "70b"):
        plan = make_plan(load_config(f"configs/llama2_{size}_ppo.yaml"))
        assert plan.fits, (size, plan.problems)
        assert all(peak <= 80 * GiB for _, _, peak in plan.gpu_groups)
        nodes[size] = plan.nodes
    assert nodes == {"7b": 1, "13b": 2, "70b": 4}
    assert plan_main(["--config", "configs/llama2_70b_ppo.yaml"]) == 0
    assert "32 GPUs on 4 node(s)" in capsys.readouterr().out


def test_a_layout_that_cannot_fit_is_refused_naming_the_role_and_the_overflow(capsys):
    args = ["--config", "configs/llama2_70b_ppo.yaml", "--set", "policy.offload=false"]
    assert plan_main(args) == 1
    out = capsys.readouterr().out
    assert "DOES NOT FIT: policy+reference needs" in out and "GiB per GPU, over the 80.0 GiB" in out
    plan = make_plan(load_config("configs/llama2_70b_ppo.yaml", ["placement.colocate=[[policy, reference, engine]]"]))
    assert any("engines_sleep" in p for p in plan.problems) and any("same GPU count" in p for p in plan.problems)


def test_placement_names_are_checked():
    with pytest.raises(ConfigError, match="placement.colocate"):
        load_config(None, ["placement.colocate=[[policy, refrence]]"])
    judge = ["reward.sources=[{kind: judge}]", "judge.model=j", "placement.colocate=[[reward, judge]]"]
    with pytest.raises(ConfigError, match=r"same num_ranks, got \{'reward': 1, 'judge': 2\}"):
        load_config(None, judge + ["judge.engine.num_ranks=2"]).check_ppo(paths=False)
    load_config(None, judge).check_ppo(paths=False)                   # one rank each: accepted
