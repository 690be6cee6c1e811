"""Faults on the real stack (a local Ray cluster, DeepSpeed ranks, the vLLM engine), driven as a user drives it:
the `python -m launch.ppo` driver in its own process, killed with SIGKILL mid-run and resumed, with actors
killed under it, must end with the undisturbed run's weights and metrics bit for bit and leave no process behind;
a run whose loss diverges must stop with one line and publish no checkpoint. The fault run is multi-turn PPO with
GAE (an environment, tests/episode_envs.py Echo, on its own worker), so episodes with observations are what is
replayed, resumed and compared. Slow: each run starts a cluster."""
import json
import math
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import OFF_POLICY_LAYOUT, tiny_overrides
from launch import reaper
from launch.ppo import main as ppo_main
from rlhf_ray.models import Quant, load_causal_lm

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
QLORA_LOGPROB_GAP = 1e-3     # engine (vLLM, dequantised weights) against the 4-bit policy, fp32 (docs/qlora.md)


# Each episode: up to 3 turns ending on ".", the environment's " ok." between them; its per-turn rewards land on each
# turn's last token, where GAE takes them beside the reward model's score on the final one.
MULTI_TURN = ["env.cls=tests.episode_envs:Echo", "env.turn_stop=['.']", "env.max_turns=3", "env.max_turn_tokens=6",
              "reward.sources=[{kind: model}, {kind: env}]"]


def fault_run_sets(world, run_dir) -> list[str]:
    return tiny_overrides(world, run_dir) + ["train.steps=6", "checkpoint.every=2", "checkpoint.keep=5",
                                             "policy.zero_stage=3", "logging.wandb.enabled=false", *MULTI_TURN]


def driver(world, run_dir, tag, *args, config: str = "configs/tiny_ppo.yaml", sets=None) -> subprocess.Popen:
    sets = fault_run_sets(world, run_dir) if sets is None else sets
    cmd = [sys.executable, "-m", "launch.ppo", "--config", config, *args, *[a for s in sets for a in ("--set", s)]]
    env = {**os.environ, "FAULT_TEST_TAG": tag, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def run_until(proc, line_start: str | None, holding: str = "") -> list[str]:
    """Read the driver's output until a line starting with `line_start` and holding `holding` (None: until it exits).
    At each step line, note the processes below the driver (`proc.family`)."""
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("step "):
            proc.family = {**getattr(proc, "family", {}), **reaper.descendants(proc.pid)}
        if line_start and line.startswith(line_start) and holding in line:
            return lines
    proc.wait()
    return lines


def tagged(tag: str) -> list[int]:
    """Live processes started from a driver of this test (the tag is in every descendant's environment, unless a
    process title overwrote it: hence `proc.family` beside it)."""
    return reaper.tagged(tag, "FAULT_TEST_TAG")


def leftovers(proc, tag: str, wait_s: float = 10.0) -> list[bytes]:
    """Command lines of the processes a driver of this test started (tagged, or seen below the driver) that are
    still alive `wait_s` seconds from now (polled: most are gone within 3 s)."""
    def left():
        return reaper.cluster_processes(tag, getattr(proc, "family", {}), "FAULT_TEST_TAG")
    deadline = time.time() + wait_s
    while left() and time.time() < deadline:
        time.sleep(0.5)
    return [Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")[:120] for pid in left()]


def kill_and_count_leftovers(proc, tag: str) -> list[bytes]:
    proc.family = {**getattr(proc, "family", {}), **reaper.descendants(proc.pid)}
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return leftovers(proc, tag)


def final_state(run_dir: Path, models=("policy", "critic")):
    ck = run_dir / "checkpoints" / "step_000006"
    weights = {m: load_file(str(ck / m / "model.safetensors")) for m in models}
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return weights, [{k: v for k, v in r.items() if not k.startswith(("time/", "perf/", "_"))} for r in rows]


def actor_pids(tag: str, cls: str) -> list[int]:
    return reaper.actor_processes(tagged(tag), cls)


def uninterrupted(world, run_dir: Path):
    """The reference: the same run with nothing killed, driven in this process on the session's cluster (what is
    compared is the actors' work; the driver's own process is what the fault run kills)."""
    sets = fault_run_sets(world, run_dir)
    assert ppo_main(["--config", "configs/tiny_ppo.yaml", *[a for s in sets for a in ("--set", s)]]) == 0
    return final_state(run_dir)


def assert_same_run(ref, got):
    (ref_w, ref_rows), (w, rows) = ref, got
    for model in ("policy", "critic"):
        assert all(torch.equal(ref_w[model][k], w[model][k]) for k in ref_w[model]), model
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    drop = ("fault/actor_restarts",)
    assert [{k: v for k, v in r.items() if k not in drop} for r in rows] == \
        [{k: v for k, v in r.items() if k not in drop} for r in ref_rows]


def test_a_killed_driver_and_dead_actors_end_the_run_as_if_nothing_happened(tiny_world, tmp_path):
    """Three SIGKILLs of actors and one of the driver in one multi-turn run (ZeRO-3 policy on 2 ranks, an environment
    worker), then `--resume`: the final weights and metrics rows equal the undisturbed run's bit for bit, and no
    process outlives the driver by 10 s. Episodes are not checkpointed: a replayed or resumed step draws them again
    from its seed, and the environments are asked again.
    The run starts as a spot job restarts: `--resume auto` with no checkpoint yet (fresh). A driver killed before
    its first checkpoint is no other case for the reaper; resume_point's side of it is in test_bad_inputs.py."""
    reference = uninterrupted(tiny_world, tmp_path / "uninterrupted")
    tag, run_dir = uuid.uuid4().hex, tmp_path / "faults"
    proc = driver(tiny_world, run_dir, tag, "--resume", "auto")
    out = run_until(proc, "step 1/")
    assert any(line.startswith("--resume auto: no complete checkpoint") for line in out)     # starts fresh
    # engine, reference and reward share a process (tiny_overrides): killing it kills all three, replaced once
    os.kill(actor_pids(tag, "RoleHost")[0], signal.SIGKILL)         # no checkpoint yet: every role starts over
    out += run_until(proc, "step 3/")
    os.kill(actor_pids(tag, "Policy")[-1], signal.SIGKILL)          # one ZeRO-3 rank: its group is replaced whole
    out += run_until(proc, "step 4/")                               # (replayed from the step-2 checkpoint)
    os.kill(actor_pids(tag, "EnvWorker")[0], signal.SIGKILL)        # the environment worker: found by the next
    out += run_until(proc, "step ", holding="env rank 0 died")      # rollout that calls it (step 5's, or 6's)
    out += run_until(proc, "step 5/")                               # (replayed from the step-4 checkpoint)
    # at once: step 6 takes under a second and ends the run with its checkpoint (a 1 s wait here once let it finish)
    assert kill_and_count_leftovers(proc, tag) == []                # the driver, mid-step 6
    notes = [line for line in out if " died (" in line and "replaying from step" in line]
    assert len(notes) == 3 and "reference rank 0, reward rank 0, engine rank 0 died" in notes[0], notes
    assert "replaying from step 1 (restart 1 of 3)" in notes[0], notes
    assert "policy rank" in notes[1] and "replaying from step 3 (restart 2 of 3)" in notes[1], notes
    assert "replaced env, replaying from step 5 (restart 3 of 3)" in notes[2], notes
    proc = driver(tiny_world, run_dir, tag, "--resume")
    out = run_until(proc, None)
    assert any(line.startswith("resumed from") for line in out) and any(line.startswith("step 6/6") for line in out), \
        out[-20:]
    assert_same_run(reference, final_state(run_dir))
    assert leftovers(proc, tag) == []
    rows = reference[1]                             # the episodes had turns and observations, the reward both sources
    assert all(r["env/turns_mean"] > 1.5 and r["env/observation_tokens_mean"] > 0 for r in rows), rows
    assert all(r["env/errors"] == r["env/timeouts"] == 0 and r["env/tool_calls_mean"] > 1 for r in rows), rows


UNIFORM_ROWS = 24          # 3 steps x rollout.max_rounds 2 x 4 prompts: every group uniform, no update


# QLoRA: the policy's base frozen in NF4, LoRA adapters trained; the reference is that same base, adapters off
QLORA = ["policy.quantization=nf4", "policy.lora.rank=8", "policy.lora.alpha=16", "reference.from_policy_base=true"]


def dapo_sets(world, run_dir, prompts) -> list[str]:
    """configs/tiny_dapo.yaml one step off-policy with a QLoRA policy, on prompts whose first UNIFORM_ROWS rows score
    every answer alike (tests/reward_fns.py), in file order."""
    return tiny_overrides(world, run_dir) + QLORA + [
        *OFF_POLICY_LAYOUT, "rollout.max_staleness=1",
        "ppo.is_correction=tis", "generation.prompts_per_step=4", "generation.n=4", "ppo.minibatch_size=8",
        "policy.micro_batch_size=8", "rollout.max_rounds=2", "policy.lr=1e-3", "train.steps=6", "checkpoint.every=2",
        "checkpoint.keep=5", f"data.prompts={prompts}", "data.shuffle=false", "data.reward_keys=[mode]",
        "reward.sources=[{kind: function, path: 'tests.reward_fns:uniform_or_varied'}]", "logging.wandb.enabled=false"]


def test_off_policy_dapo_with_qlora_skips_uniform_steps_then_resumes_bit_identically_after_a_driver_kill(
        tiny_world, tmp_path):
    """DAPO (clip-higher, dynamic sampling, token-mean, overlong shaping) one step off-policy, the policy QLoRA (NF4
    base, LoRA adapters, the reference its own base with adapters off: no reference actor). For 3 steps every group
    is uniform: each step draws its 2 rounds, finds no signal, and goes on without an update (filter/skipped), its
    weights untouched; then groups differ and it trains. The engine samples with the dequantised base: its logprobs
    match the 4-bit policy's. The driver, SIGKILLed mid-step 5 and resumed from the step-4 checkpoint (which holds
    step 5's first round, drawn by update-3 weights), ends with the uninterrupted run's weights and rows bit for bit:
    the extra rounds come from the prompt stream and seeds deterministically, the 4-bit base reloads identically.
    The saved policy is a plain full-precision HF model (adapters merged into the dequantised base)."""
    prompts = tmp_path / "prompts.jsonl"
    rows = [json.loads(line)["prompt"] for line in open(tiny_world["prompts"])]
    prompts.write_text("".join(json.dumps({"prompt": p, "mode": "uniform" if i < UNIFORM_ROWS else "varied"}) + "\n"
                               for i, p in enumerate(rows)))
    config = "configs/tiny_dapo.yaml"
    ref_dir = tmp_path / "uninterrupted"
    assert ppo_main(["--config", config, *[a for s in dapo_sets(tiny_world, ref_dir, prompts) for a in ("--set", s)]]) == 0
    reference = final_state(ref_dir, ("policy",))
    ref_rows = reference[1]
    assert [r["filter/skipped"] for r in ref_rows] == [1, 1, 1, 0, 0, 0], ref_rows
    assert all(r["filter/rounds"] == 2 and r["filter/uniform_frac"] == 1 and "policy/loss" not in r
               for r in ref_rows[:3])
    assert all(r["filter/groups"] in (2, 4) and math.isfinite(r["policy/loss"]) and "policy/clipfrac_high" in r
               for r in ref_rows[3:])
    # Step 4 scored samples the engine drew with the weights pushed at the start (no update before it): the gap
    # between the engine's logprobs and the 4-bit policy's is numerics alone
    assert ref_rows[3]["rollout/logprob_diff_max"] < QLORA_LOGPROB_GAP, ref_rows[3]
    assert ref_rows[3]["kl/ref_per_seq"] == 0.0 and ref_rows[-1]["kl/ref_per_seq"] != 0.0
    start = dequantized_start(tiny_world["policy"])       # what the engine got at the start: B = 0, W dequantised
    idle = load_file(str(ref_dir / "checkpoints" / "step_000002" / "policy" / "model.safetensors"))
    assert set(idle) == set(start) and all(torch.equal(start[k], idle[k]) for k in start)   # no update yet
    final = reference[0]["policy"]
    assert not all(torch.equal(start[k], final[k]) for k in start)
    assert torch.equal(final["model.embed_tokens.weight"], start["model.embed_tokens.weight"])   # outside LoRA
    saved = ref_dir / "checkpoints" / "step_000006" / "policy"
    assert "quantization_config" not in json.loads((saved / "config.json").read_text())
    assert load_causal_lm(saved).model.layers[0].self_attn.q_proj.weight.dtype == torch.float32   # from_pretrained

    tag, run_dir = uuid.uuid4().hex, tmp_path / "killed"
    sets = dapo_sets(tiny_world, run_dir, prompts)
    proc = driver(tiny_world, run_dir, tag, config=config, sets=sets)
    out = run_until(proc, "step 4/")
    assert sum(line.startswith(f"step {s}/6  no update: 0 groups") for s in (1, 2, 3) for line in out) == 3, out
    time.sleep(1.0)
    assert kill_and_count_leftovers(proc, tag) == []                   # mid-step 5
    assert ppo_main(["--config", config, "--resume", *[a for s in sets for a in ("--set", s)]]) == 0
    got = final_state(run_dir, ("policy",))
    assert all(torch.equal(reference[0]["policy"][k], got[0]["policy"][k]) for k in reference[0]["policy"])
    assert got[1] == ref_rows


def dequantized_start(policy_dir: str) -> dict[str, torch.Tensor]:
    """The starting policy as the QLoRA run exports it before any update: NF4 base, dequantised."""
    from actors.base import export_items
    model = load_causal_lm(policy_dir, quant=Quant("nf4", True, "float32"))
    return {name: fn().detach().clone() for name, _, fn in export_items(model)}


def test_a_diverging_run_stops_with_one_line_and_publishes_no_checkpoint(tiny_world, tmp_path, capsys):
    run_dir = tmp_path / "diverged"
    sets = tiny_overrides(tiny_world, run_dir) + ["policy.lr=1e30", "train.steps=3", "checkpoint.every=1",
                                                  "ppo.advantage=grpo", "policy.num_ranks=1",
                                                  "logging.wandb.enabled=false"]
    code = ppo_main(["--config", "configs/tiny_ppo.yaml", *[a for s in sets for a in ("--set", s)]])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]   # (actors log too)
    assert code == 1 and len(errors) == 1, errors
    assert errors[0].startswith("error: step 1: ") and ("diverged" in errors[0] or "skipped" in errors[0]), errors[0]
    assert not any((run_dir / "checkpoints").glob("step_*"))
