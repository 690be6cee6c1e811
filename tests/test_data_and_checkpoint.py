"""Prompt data, padded batches, DeepSpeed config and atomic checkpoints (pure logic)."""
import json

import pytest

from rlhf_ray import checkpoint as ckpt
from rlhf_ray.batch import build_rollout_batch, chunks, shard
from rlhf_ray.config import load_config
from rlhf_ray.data import DataError, PromptStream, load_prompts
from rlhf_ray.ds_config import deepspeed_config

DATA = {"epoch": 0, "pos": 0}          # the prompt-stream position every PPO checkpoint carries


def test_prompts_load_and_malformed_rows_name_file_row_field(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "a"}\n\n{"prompt": "b"}\n')
    assert load_prompts(f) == ["a", "b"]
    for body, needle in [('{"prompt": "a"}\n{"text": "b"}\n', ":2: missing field 'prompt'"),
                         ('{"prompt": "a"}\n{oops\n', ":2: not valid JSON"),
                         ('{"prompt": 3}\n', ":1: field 'prompt' must be a string with visible text, got 3"),
                         ('[1]\n', ":1: expected a JSON object")]:
        f.write_text(body)
        with pytest.raises(DataError) as e:
            load_prompts(f)
        assert str(e.value).startswith(str(f)) and needle in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(DataError, match="file not found"):
        load_prompts(tmp_path / "missing.jsonl")


def test_prompt_stream_is_seeded_and_resumable():
    s = PromptStream([str(i) for i in range(10)], 4, seed=1)
    first = [s.next() for _ in range(2)]
    state = s.state()
    after = [s.next() for _ in range(3)]
    s2 = PromptStream([str(i) for i in range(10)], 4, seed=1)
    assert [s2.next() for _ in range(2)] == first
    s3 = PromptStream([str(i) for i in range(10)], 4, seed=1)
    s3.load_state(state)
    assert [s3.next() for _ in range(3)] == after


def test_rollout_batch_layout_left_pads_prompts_right_pads_responses():
    b = build_rollout_batch([[1, 2], [3]], [[7, 8, 9], [6]], [[-1.0, -2.0, -3.0], [-0.5]], pad_id=0)
    assert b.input_ids.tolist() == [[1, 2, 7, 8, 9], [0, 3, 6, 0, 0]]
    assert b.attention_mask.tolist() == [[1, 1, 1, 1, 1], [0, 1, 1, 0, 0]]
    assert b.response_mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert b.sample_logprobs[1].tolist() == [-0.5, 0, 0]
    assert b.action_mask.tolist() == b.response_mask.tolist()           # single-turn: every response token an action
    assert [len(x) for x in chunks(b, 1)] == [1, 1]
    assert shard(b, 1, 2).input_ids.tolist() == [[0, 3, 6, 0, 0]]


def test_deepspeed_config_batch_arithmetic_and_cpu_optimizer():
    cfg = load_config("configs/tiny_ppo.yaml", ["policy.micro_batch_size=4", "policy.zero_stage=3",
                                                "policy.offload=true"])
    ds = deepspeed_config(cfg.policy, cfg.ppo.minibatch_size, "float32", "cpu")
    assert ds["train_batch_size"] == 16 and ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["gradient_accumulation_steps"] == 2          # 16 / (2 ranks x 4)
    assert ds["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert ds["optimizer"]["params"]["torch_adam"] is False  # offload runs DeepSpeedCPUAdam
    ds2 = deepspeed_config(load_config("configs/tiny_ppo.yaml").policy, 16, "float32", "cpu")
    assert ds2["optimizer"]["params"]["torch_adam"] is True and "offload_param" not in ds2["zero_optimization"]
    gpu = deepspeed_config(load_config("configs/tiny_ppo.yaml").policy, 16, "bfloat16", "cuda")
    assert gpu["optimizer"]["params"]["torch_adam"] is True     # no FusedAdam JIT build on a GPU node either


def test_checkpoint_is_published_atomically_and_latest_skips_partial(tmp_path):
    root = tmp_path / "checkpoints"
    st = ckpt.begin(root, 1)
    (st / "policy").mkdir()
    ckpt.commit(root, 1, {"step": 1, "data": DATA})
    st2 = ckpt.begin(root, 2)                  # a crash here: step 2 never committed
    (st2 / "policy").mkdir()
    assert ckpt.latest(root).name == "step_000001"
    assert ckpt.load_state(ckpt.latest(root)) == {"step": 1, "data": DATA}
    ckpt.commit(root, 2, {"step": 2, "data": DATA})
    ckpt.begin(root, 2)                        # re-saving a step replaces it only on commit
    assert json.loads((root / "step_000002" / "state.json").read_text())["step"] == 2
    ckpt.commit(root, 2, {"step": 2, "data": DATA, "again": True})
    assert ckpt.load_state(ckpt.latest(root))["again"] is True
    ckpt.begin(root, 3)
    ckpt.commit(root, 3, {"step": 3, "data": DATA})
    ckpt.prune(root, keep=2)
    assert sorted(p.name for p in root.glob("step_*")) == ["step_000002", "step_000003"]


def test_latest_passes_over_a_damaged_checkpoint_and_says_why(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (2, 4):
        st = ckpt.begin(root, step)
        (st / "policy_ds").mkdir()
        (st / "policy_ds" / "shard.pt").write_bytes(b"x" * 1000)
        ckpt.commit(root, step, {"step": step, "data": DATA})
    assert ckpt.latest(root).name == "step_000004" and ckpt.damage(root / "step_000004") is None
    shard = root / "step_000004" / "policy_ds" / "shard.pt"
    damages = {"truncated": lambda: shard.write_bytes(b"x" * 10),
               "missing": lambda: shard.unlink(),
               "garbled": lambda: (root / "step_000004" / "state.json").write_text('{"step": 4'),
               "empty": lambda: (root / "step_000004" / "state.json").write_text(""),
               "no step": lambda: (root / "step_000004" / "state.json").write_text('{"data": {}}')}
    why = {"truncated": "policy_ds/shard.pt is 10 bytes, 1000 when written", "missing": "policy_ds/shard.pt missing",
           "garbled": "state.json unreadable (JSONDecodeError)", "empty": "state.json unreadable (JSONDecodeError)",
           "no step": "state.json has no step"}
    for name, damage in damages.items():
        st = ckpt.begin(root, 4)                  # a whole step 4 again
        (st / "policy_ds").mkdir()
        (st / "policy_ds" / "shard.pt").write_bytes(b"x" * 1000)
        ckpt.commit(root, 4, {"step": 4, "data": DATA})
        damage()
        skipped = []
        assert ckpt.latest(root, skipped).name == "step_000002", name
        assert skipped == [f"step_000004: {why[name]}"], (name, skipped)


def test_metrics_resume_drops_rows_after_the_checkpoint(tmp_path):
    from rlhf_ray.metrics import MetricsLogger
    cfg = load_config("configs/tiny_ppo.yaml", ["logging.wandb.enabled=false"])
    log = MetricsLogger(tmp_path, cfg, "t")
    for step in (1, 2, 3, 4):                      # steps 4 was logged, but the last checkpoint is step 3
        log.log(step, {"x": float(step)})
    log.close()
    log = MetricsLogger(tmp_path, cfg, "t", resume_step=3)
    log.log(4, {"x": 40.0})
    log.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["x"]) for r in rows] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0)]


def test_metrics_rewind_drops_rows_a_replay_will_log_again(tmp_path):
    from rlhf_ray.metrics import MetricsLogger
    cfg = load_config("configs/tiny_ppo.yaml", ["logging.wandb.enabled=false"])
    log = MetricsLogger(tmp_path, cfg, "t")
    for step in (1, 2, 3):
        log.log(step, {"x": float(step)})
        log.log_samples(step, [{"text": f"s{step}"}])
    log.rewind(1)                                  # an actor died in step 3; the newest checkpoint is step 1's
    for step in (2, 3):
        log.log(step, {"x": 10.0 * step})
        log.log_samples(step, [{"text": f"r{step}"}])
    log.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["x"]) for r in rows] == [(1, 1.0), (2, 20.0), (3, 30.0)]
    samples = [json.loads(line)["text"] for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert samples == ["s1", "r2", "r3"]


@pytest.mark.parametrize("n_items, k, n", [(7, 3, 2), (8, 2, 1), (2, 4, 3), (5, 1, 4)])
def test_round_robin_split_and_merge_restore_order(n_items, k, n):
    from rlhf_ray.batch import merge_round_robin, split_round_robin
    items = list(range(n_items))
    parts = split_round_robin(items, k)
    by_worker = [[(x, s) for x in part for s in range(n)] for part in parts if part]
    assert merge_round_robin(by_worker, n_items, n) == [(x, s) for x in items for s in range(n)]


def test_prompt_rows_carry_the_reward_keys(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "2+2?", "answer": "4"}\n{"prompt": "3+3?", "answer": "6"}\n')
    assert load_prompts(f, extra_keys=["answer"]) == [{"prompt": "2+2?", "answer": "4"}, {"prompt": "3+3?", "answer": "6"}]
    f.write_text('{"prompt": "2+2?", "answer": "4"}\n{"prompt": "3+3?"}\n')
    with pytest.raises(DataError, match=r"p.jsonl:2: missing field 'answer' \(listed in data.reward_keys\)"):
        load_prompts(f, extra_keys=["answer"])


def test_curve_agreement_correlates_per_step_means_and_finds_smoothed_peaks():
    from rlhf_ray.metrics import curve_agreement, moving_average
    assert moving_average([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]
    steps = list(range(1, 11))
    gold = [0, 1, 2, 3, 4, 5, 4, 3, 2, 1]                    # rises, peaks at step 6, falls: overoptimisation
    monitor = [g * 2 + 0.1 * (-1) ** s for g, s in zip(gold, steps)]   # tracks it, with step noise
    proxy = [float(s) for s in steps]                         # the optimised RM keeps rising
    m = curve_agreement(monitor, gold, steps, window=1)
    assert m["pearson"] > 0.99 and m["peak_step"] == 6 and m["reference_peak_step"] == 6
    p = curve_agreement(proxy, gold, steps, window=3)
    assert p["peak_step"] == 10 and p["reference_peak_step"] == 7 and p["pearson"] < 0.3


def test_best_of_n_curve_interpolates_from_the_origin_and_flags_extrapolation():
    from rlhf_ray.metrics import interpolate_from_origin
    pts = [(0.193, 0.5), (0.636, 0.9), (1.204, 1.3), (1.835, 1.7)]          # (KL, gain) of n = 2, 4, 8, 16
    assert interpolate_from_origin(0.0965, pts) == (pytest.approx(0.25), False)
    assert interpolate_from_origin(1.5195, pts) == (pytest.approx(1.5), False)
    y, extrapolated = interpolate_from_origin(2.15, pts)
    assert extrapolated and y == pytest.approx(1.7 + 0.4 * 0.315 / 0.631)


def test_best_of_n_picks_the_top_scored_sample_of_each_disjoint_group():
    import torch
    from rlhf_ray.metrics import best_of_n
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.2, 0.7, 0.3]])
    values = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]])
    v, s = best_of_n(scores, values, 2)                  # groups (0.1, 0.9), (0.5, 0.2), (0.7, 0.3)
    assert v.tolist() == [[2.0, 3.0, 5.0]] and s.tolist() == [pytest.approx([0.9, 0.5, 0.7])]
    v, s = best_of_n(scores, values, 4)                  # one group of 4; the last two samples are unused
    assert v.tolist() == [[2.0]] and s.tolist() == [[pytest.approx(0.9)]]
