"""Fault injection on the tiny world: kill things at random points and check the run ends as if nothing happened.

    .venv/bin/python benchmarks/faults.py [--driver-kills 10] [--actor-kills 3] [--seed 0]

First one undisturbed PPO run (configs/tiny_ppo.yaml, 8 steps, a checkpoint every 2), then, each trial a fresh run
of the same config:
  - driver: SIGKILL the driver at a random moment between its first step and its end, then `--resume auto` it
    to the end;
  - engine / reward / reference / policy rank: SIGKILL that actor's process at a random moment mid-run and let
    the driver recover on its own.
A trial passes when the final policy and critic weights equal the undisturbed run's bit for bit, metrics.jsonl
holds steps 1..8 once each with the undisturbed run's values (wall times aside), and 10 s after the run's end
(and after each driver kill) no process the trial started is left. It also counts the run's processes whose
environment no longer showed the cluster tag at the driver's last step (a process title written over it, as
Ray's agents' sometimes is): the watchdog reaps those by descent alone. Prints the table and writes
runs/bench-faults/faults.md. A benchmark, not a test: about an hour on 2 cores with the defaults.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.machine import cpu_model, git_commit  # noqa: E402
from benchmarks.tables import publish  # noqa: E402
from launch.reaper import TAG, actor_processes, cluster_processes, descendants, tagged  # noqa: E402

OUT = ROOT / "runs" / "bench-faults"
STEPS = 8
VAR = "FAULT_BENCH_TAG"
SETS = [f"train.steps={STEPS}", "checkpoint.every=2", "checkpoint.keep=10", "logging.wandb.enabled=false",
        "generation.prompts_per_step=8", "ppo.minibatch_size=8", "generation.max_new_tokens=16"]
ACTORS = {"engine": "Engine", "reward": "Reward", "reference": "Reference", "policy rank": "Policy"}


class Trial:
    """One driver process of the benchmark, its output read line by line with the time each line arrived."""

    def __init__(self, world: Path, run_dir: Path, tag: str, *args: str):
        sets = SETS + [f"models.policy={world / 'policy'}", f"models.reward={world / 'reward'}",
                       f"data.prompts={world / 'prompts.jsonl'}", f"run.output_dir={run_dir}"]
        cmd = [sys.executable, "-m", "launch.ppo", "--config", "configs/tiny_ppo.yaml", *args,
               *[a for s in sets for a in ("--set", s)]]
        env = {**os.environ, VAR: tag, "OMP_NUM_THREADS": "1", "RAY_AUTH_MODE": "disabled"}
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True)
        self.lines: list[str] = []
        self.family: dict[int, str] = {}      # processes seen below the driver (pid -> start time)
        self.untagged = 0

    def until(self, prefix: str | None) -> bool:
        """Read until a line starting with `prefix` (True), or the end of the output (False)."""
        for line in self.proc.stdout:
            self.lines.append(line)
            if line.startswith("step "):
                self.note_family()
            if prefix and line.startswith(prefix):
                return True
        self.proc.wait()
        return False

    def note_family(self) -> None:
        """Remember the processes below the driver, and how many of them have lost the cluster tag from their
        environment (a process title written over it): the watchdog finds those by descent only."""
        now = descendants(self.proc.pid)
        self.family.update(now)
        envs, titles = {}, {}
        for pid in now:
            try:
                envs[pid] = set(Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"))
                titles[pid] = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
        tags = {e for env in envs.values() for e in env if e.startswith(f"{TAG}=".encode())}
        self.untagged = sum(tags.isdisjoint(env) for pid, env in envs.items()
                            if b"launch.reaper" not in titles[pid])      # the watchdog goes without, by design

    def kill(self) -> None:
        self.note_family()
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()


def leftovers(trial: Trial, tag: str, wait_s: float = 10.0) -> list[str]:
    """Processes of the trial (tagged, or seen below its driver: a process title can overwrite the tag) still
    alive `wait_s` seconds from now (polling: most are gone within 3 s), each as its title and state
    (/proc/<pid>/stat), so a report says what outlived the driver."""
    def left():
        return cluster_processes(tag, trial.family, VAR)
    deadline = time.time() + wait_s
    while left() and time.time() < deadline:
        time.sleep(0.5)
    out = []
    for pid in left():
        try:
            title = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")[:60]
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        out.append(f"{title} ({state})")
    return out


def outcome(run_dir: Path) -> tuple[dict, list[dict]]:
    from safetensors.torch import load_file
    final = run_dir / "checkpoints" / f"step_{STEPS:06d}"
    weights = {m: load_file(str(final / m / "model.safetensors")) for m in ("policy", "critic")}
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return weights, [{k: v for k, v in r.items() if not k.startswith(("time/", "perf/", "fault/"))} for r in rows]


def same_as(ref, run_dir: Path) -> tuple[bool, bool]:
    """(weights bit-identical, metrics rows identical and complete) against the undisturbed run."""
    import torch
    try:
        weights, rows = outcome(run_dir)
    except (OSError, ValueError):
        return False, False
    ref_w, ref_rows = ref
    same_w = all(torch.equal(ref_w[m][k], weights[m][k]) for m in ref_w for k in ref_w[m])
    return same_w, rows == ref_rows


def random_moment(rng: random.Random, trial: Trial) -> None:
    """Let the run reach a random step (1..STEPS-1), then a random fraction of a second into the next one."""
    trial.until(f"step {rng.randint(1, STEPS - 1)}/")
    time.sleep(rng.uniform(0.0, 1.0))


def driver_kill(world: Path, ref, n: int, rng: random.Random) -> dict:
    tag, run_dir = uuid.uuid4().hex, OUT / f"driver{n}"
    t = Trial(world, run_dir, tag)
    random_moment(rng, t)
    t.kill()
    after_kill = leftovers(t, tag)
    last = next((line.split()[1] for line in reversed(t.lines) if line.startswith("step ")), "0/")
    resumed = Trial(world, run_dir, tag, "--resume", "auto")
    resumed.until(None)
    same_w, same_rows = same_as(ref, run_dir)
    return {"what": "driver", "killed after": f"step {last}", "exit": resumed.proc.returncode,
            "same weights": same_w, "same metrics": same_rows, "orphans": after_kill + leftovers(resumed, tag),
            "untagged": t.untagged + resumed.untagged}


def actor_kill(world: Path, ref, role: str, n: int, rng: random.Random) -> dict:
    tag, run_dir = uuid.uuid4().hex, OUT / f"{role.replace(' ', '_')}{n}"
    t = Trial(world, run_dir, tag)
    random_moment(rng, t)
    pids = actor_processes(tagged(tag, VAR), ACTORS[role])
    last = next((line.split()[1] for line in reversed(t.lines) if line.startswith("step ")), "0/")
    if pids:
        os.kill(rng.choice(pids), signal.SIGKILL)
    t.until(None)
    recovered = sum(" died (" in line and "replaying from step" in line for line in t.lines)
    same_w, same_rows = same_as(ref, run_dir)
    return {"what": role, "killed after": f"step {last}", "exit": t.proc.returncode, "recoveries": recovered,
            "same weights": same_w, "same metrics": same_rows, "orphans": leftovers(t, tag), "untagged": t.untagged}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--driver-kills", type=int, default=10)
    ap.add_argument("--actor-kills", type=int, default=3, help="kills of each of engine, reward, reference, policy")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    world = OUT / "world"
    if not (world / "prompts.jsonl").is_file():
        subprocess.run([sys.executable, "-m", "launch.cli", "tiny-world", "--out", str(world)], cwd=ROOT, check=True)
    t0 = time.time()
    ref_tag = uuid.uuid4().hex
    reference = Trial(world, OUT / "undisturbed", ref_tag)
    reference.until(None)
    if reference.proc.returncode != 0:
        raise SystemExit("the undisturbed run failed:\n" + "".join(reference.lines[-30:]))
    ref = outcome(OUT / "undisturbed")

    results = []
    for n in range(args.driver_kills):
        results.append(driver_kill(world, ref, n, rng))
        print(results[-1], flush=True)
    for role in ACTORS:
        for n in range(args.actor_kills):
            results.append(actor_kill(world, ref, role, n, rng))
            print(results[-1], flush=True)

    lines = [f"Fault injection, tiny world, {STEPS} PPO steps, checkpoint every 2 "
             f"({cpu_model()}, {os.cpu_count()} cores, {datetime.date.today()}, commit {git_commit()}, "
             f"{(time.time() - t0) / 60:.0f} min):", "",
             "| killed | trials | run finished | final weights bit-identical | metrics rows identical | "
             "orphan processes 10 s later | of the run's processes, without the cluster tag | killed after |",
             "|---|---|---|---|---|---|---|---|"]
    for what in ["driver", *ACTORS]:
        rs = [r for r in results if r["what"] == what]
        if not rs:
            continue
        lines.append(f"| {what} | {len(rs)} | {sum(r['exit'] == 0 for r in rs)}/{len(rs)} | "
                     f"{sum(r['same weights'] for r in rs)}/{len(rs)} | {sum(r['same metrics'] for r in rs)}/{len(rs)} | "
                     f"{sum(len(r['orphans']) for r in rs)} | {sum(r['untagged'] for r in rs)} | "
                     f"{', '.join(r['killed after'] for r in rs)} |")
    publish("\n".join(lines), OUT / "faults.md")


if __name__ == "__main__":
    main()
