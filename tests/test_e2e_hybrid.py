"""The hybrid layout on the real stack (a local Ray cluster, DeepSpeed, the vLLM CPU engine): policy, engine,
reference and reward in one worker process, the engine loading the policy's parameters in place. It must run the
same GRPO as the separate processes do, bit for bit, through a killed process and a resume. Slow: it starts actors."""
import json
import os
import signal
import threading
import time

import pytest
import torch
from safetensors.torch import load_file

from launch import reaper
from launch.ppo import train
from rlhf_ray.config import load_config

pytestmark = pytest.mark.slow
ROLES = ("policy", "engine", "reference", "reward")


def grpo(world, run_dir, layout: list[str]):
    """configs/tiny_grpo.yaml at test sizes, every role on core 0 (one thread each in both layouts: the same kernels,
    so the same floats)."""
    return load_config("configs/tiny_grpo.yaml", [
        f"models.policy={world['policy']}", f"data.prompts={world['prompts']}", f"run.output_dir={run_dir}",
        "generation.prompts_per_step=8", "generation.max_new_tokens=16", "ppo.minibatch_size=16", "train.steps=6",
        "checkpoint.every=2", "checkpoint.keep=5", "logging.wandb.enabled=false",
        *(f"{r}.cpu_cores=[0]" for r in ROLES), *layout])


def final_state(run_dir):
    weights = load_file(str(run_dir / "checkpoints" / "step_000006" / "policy" / "model.safetensors"))
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return weights, [{k: v for k, v in r.items() if not k.startswith(("time/", "perf/", "fault/", "_"))} for r in rows]


class StopAfter:
    """A watch (launch/ppo.py Watch) that ends the run after `step`, checkpointed there: a run stopped and resumed."""

    def __init__(self, step: int):
        self.at, self.stop = step, None

    def observe(self, step, scored, metrics) -> dict:
        self.stop = "the test's stop" if step == self.at else None
        return {}


def kill_the_host_after(metrics, step: int, killed: list[int]) -> None:
    """Once `step` rows are logged, SIGKILL this test's hybrid process (the one ray::RoleHost below this process)."""
    deadline = time.time() + 600
    while time.time() < deadline:
        text = metrics.read_text() if metrics.exists() else ""
        if text.endswith("\n") and len(text.splitlines()) >= step:
            hosts = reaper.actor_processes(list(reaper.descendants(os.getpid())), "RoleHost")
            assert len(hosts) == 1, hosts
            os.kill(hosts[0], signal.SIGKILL)
            killed.append(hosts[0])
            return
        time.sleep(0.2)


def test_the_hybrid_process_runs_grpo_as_separate_processes_do_through_a_kill_and_a_resume(tiny_world, tmp_path,
                                                                                             capsys):
    """Separate processes (policy; reference+reward; engine; object-store sync) against the hybrid layout (one
    process, in-place sync) on the same seeds: 6 GRPO steps. The hybrid run's process is SIGKILLed after step 3
    (replaced and replayed from the step-2 checkpoint), the run stopped after step 4 and resumed to 6. Its weights
    and every metrics row (timings aside) equal the separate run's bit for bit; its syncs copied nothing on the
    way (perf/weight_sync_staged_mb 0) where the object store copied the weights twice."""
    separate = tmp_path / "separate"
    assert train(grpo(tiny_world, separate, ["placement.share_process=[[reference, reward]]"]))["steps"] == 6
    hybrid = tmp_path / "hybrid"
    cfg = grpo(tiny_world, hybrid, [])                        # tiny_grpo.yaml's own layout: the hybrid one
    assert cfg.placement.share_process == [list(ROLES)]
    killed: list[int] = []
    killer = threading.Thread(target=kill_the_host_after, args=(hybrid / "metrics.jsonl", 3, killed), daemon=True)
    killer.start()
    first = train(cfg, watch=StopAfter(4))
    killer.join(timeout=1)
    assert killed and first["steps"] == 4 and first["stopped"] == "the test's stop"
    out = capsys.readouterr().out
    assert "policy rank 0, reference rank 0, reward rank 0, engine rank 0 died" in out, out[-3000:]
    assert "replaying from step 3 (restart 1 of 3)" in out, out[-3000:]
    assert train(grpo(tiny_world, hybrid, []), resume=True)["steps"] == 6
    assert capsys.readouterr().out.count("resumed from") == 1
    (w_sep, rows_sep), (w_hyb, rows_hyb) = final_state(separate), final_state(hybrid)
    assert all(torch.equal(w_sep[k], w_hyb[k]) for k in w_sep) and w_sep.keys() == w_hyb.keys()
    assert [r["step"] for r in rows_hyb] == [1, 2, 3, 4, 5, 6] and rows_hyb == rows_sep
    assert rows_sep[-1]["kl/ref_per_seq"] > 0                 # the policy moved: the syncs carried something
    staged = [json.loads(line)["perf/weight_sync_staged_mb"] for line in (hybrid / "metrics.jsonl").read_text().splitlines()]
    loaded = [json.loads(line)["perf/weight_sync_mb"] for line in (separate / "metrics.jsonl").read_text().splitlines()]
    by_store = [json.loads(line)["perf/weight_sync_staged_mb"] for line in (separate / "metrics.jsonl").read_text().splitlines()]
    assert staged == [0.0] * 6 and by_store == [2 * b for b in loaded] and loaded[0] > 1


def test_a_qlora_policy_hands_its_engine_the_merged_weights_in_place(tiny_world, tmp_path):
    """The hybrid layout with a QLoRA policy (its 4-bit base, rank-8 adapters; the reference its own base, adapters
    off): after each in-place sync the engine samples with the weights the policy computes with (its dequantised base
    with the adapters merged), as an engine in its own process does (docs/qlora.md's bound)."""
    run_dir = tmp_path / "qlora"
    summary = train(grpo(tiny_world, run_dir, [
        "policy.quantization=nf4", "policy.lora.rank=8", "policy.lora.alpha=16", "policy.lr=1e-3",
        "reference.from_policy_base=true", "placement.share_process=[[policy, engine, reward]]", "train.steps=3",
        "checkpoint.every=0"]))
    assert summary["steps"] == 3
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(r["rollout/logprob_diff_max"] < 1e-3 and r["perf/weight_sync_staged_mb"] == 0 for r in rows), rows
    assert rows[-1]["kl/ref_per_seq"] > 0                     # the adapters moved, and the engine followed them
