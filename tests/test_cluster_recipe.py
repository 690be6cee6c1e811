"""The README's cluster recipe, run as written: the fenced bash block between the `cluster-recipe` markers, command
by command with bash, in a scratch copy of the repository (the files git would commit, as the working tree has
them), `.venv` linked to this venv and `assets/tiny` to the session's tiny world.

What differs from the README, each substitution checked: the head's ports (free loopback ports: other Ray
clusters on this machine hold the defaults), and how the head is started and stopped (with `--block` in the
background, stopped by its PID: `ray stop` would stop every Ray cluster of the user on the machine). The
environment differs in two ways: HOME is a scratch directory, so the token the recipe makes lands there and not in
the user's ~/.ray, PYTHONPATH names the scratch copy, since the venv's editable install points elsewhere, and
RLHF_RAY_CACHE names the user's rlhf-ray cache (rlhf_ray/cache.py), which the scratch HOME would hide."""
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from rlhf_ray.cache import cache_dir

pytestmark = [pytest.mark.slow, pytest.mark.own_cluster]     # its own head, by the README
REPO = Path(__file__).resolve().parents[1]
# The jobs as the head saw them, through the job SDK (run with the recipe's environment: its token).
LIST_JOBS = """import json, sys
from ray.job_submission import JobSubmissionClient
print(json.dumps([dict(id=j.submission_id, status=str(j.status), entrypoint=j.entrypoint, end=j.end_time)
                  for j in JobSubmissionClient(sys.argv[1]).list_jobs()]))"""
PORT_FLAGS = ("port", "dashboard-port", "ray-client-server-port", "dashboard-agent-listen-port",
              "dashboard-agent-grpc-port", "metrics-export-port", "runtime-env-agent-port", "node-manager-port",
              "object-manager-port")


def recipe() -> str:
    m = re.search(r"<!-- cluster-recipe:start -->\n```bash\n(.*?)```\n<!-- cluster-recipe:end -->",
                  (REPO / "docs" / "cluster.md").read_text(), re.S)
    assert m, "docs/cluster.md: no ```bash block between <!-- cluster-recipe:start --> and <!-- cluster-recipe:end -->"
    return m.group(1)


def free_ports(n: int) -> list[int]:
    """n distinct free loopback ports. Every socket stays bound until all are picked: binding one at a time and
    closing it lets the kernel hand the same port out twice (CI once gave the GCS and the dashboard one port)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def localise(script: str, ports: dict, work: Path) -> str:
    """The recipe on this test's ports and head. Each substitution must happen exactly as expected, so a README
    edit that would slip past it fails here instead."""
    flags = " ".join(f"--{k}={v}" for k, v in ports.items())
    head = (f"setsid ray start --head\\1 --block {flags} > {work}/head.log 2>&1 &\n"
            f"echo $! > {work}/head.pid\n"        # as `ray start` returns: once the head says it has started
            f"until grep -q 'Ray runtime started' {work}/head.log; do kill -0 $(cat {work}/head.pid); sleep 0.5; done")
    script, n_start = re.subn(r"^ray start --head([^#\n]*?)\s*(#.*)?$", head, script, flags=re.M)
    script, n_stop = re.subn(r"^ray stop\b.*$", "true  # ray stop: the test stops its own head, by PID", script,
                             flags=re.M)
    script, n_dash = re.subn(r"http://127\.0\.0\.1:8265\b", f"http://127.0.0.1:{ports['dashboard-port']}", script)
    assert (n_start, n_stop) == (1, 1) and n_dash >= 2, \
        f"README recipe changed: {n_start} `ray start --head` lines, {n_stop} `ray stop`, {n_dash} job addresses"
    assert "8265" not in script and "6379" not in script
    return script


def stop_head(pid: int) -> None:
    """This head only, never `ray stop`. SIGTERM to `ray start --block` alone: it drains the node and stops its
    processes in ~5 s, where signalling its whole group stops the GCS under the drain, which then waits 30 s."""
    try:
        os.kill(pid, signal.SIGTERM)
        for _ in range(120):
            os.killpg(pid, 0)                             # until every process of its group is gone
            time.sleep(0.5)
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def scratch_repo(dest: Path, world_dir: Path) -> Path:
    """What a fresh clone would hold with the working tree's changes committed, plus the venv and the tiny world."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           check=True, capture_output=True).stdout.decode().split("\0")
    for f in filter(None, files):
        if (REPO / f).is_file():                          # a tracked file deleted in the working tree is gone
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / f, dest / f)
    (dest / ".venv").symlink_to(sys.prefix)
    (dest / "assets").mkdir()
    (dest / "assets" / "tiny").symlink_to(world_dir)
    return dest


def test_readme_cluster_recipe_runs_as_written(tiny_world, tmp_path):
    script = recipe()
    steps = {int(s) for s in re.findall(r"train\.steps=(\d+)", script)}
    assert len(steps) == 1, "the recipe's jobs should be one short smoke run each (--set train.steps=N)"
    steps = steps.pop()
    ports = dict(zip(PORT_FLAGS, free_ports(len(PORT_FLAGS))))
    work = tmp_path / "work"
    work.mkdir()
    repo = scratch_repo(tmp_path / "repo", Path(tiny_world["policy"]).parent)
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_ADDRESS", "VIRTUAL_ENV")}
    env.update(HOME=str(home), PYTHONPATH=str(repo), RLHF_RAY_CACHE=str(cache_dir()))
    bash = subprocess.Popen(["bash", "-exo", "pipefail", "-c", localise(script, ports, work)], cwd=repo, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    limit = threading.Timer(900, os.killpg, (bash.pid, signal.SIGKILL))
    limit.start()
    out = []                                              # (time read, line): when each line reached this test
    try:
        for line in bash.stdout:
            out.append((time.time(), line.rstrip("\n")))
        rc = bash.wait()
        text = "\n".join(line for _, line in out)
        t0 = out[0][0] if out else 0
        (work / "recipe.log").write_text("\n".join(f"{t - t0:6.1f}s {line}" for t, line in out))
        shown = r"\+ (source|export|rlhf-ray|ray|setsid|ls|true)\b|step |submitted |job |done in"
        print("\n".join(f"{t - t0:6.1f}s {line[:150]}" for t, line in out if re.match(shown, line)))  # with -rA
        head_log = (work / "head.log").read_text()[-2000:] if (work / "head.log").exists() else ""
        assert rc == 0, f"the recipe failed (exit {rc}):\n{text[-6000:]}\nhead:\n{head_log}"
        jobs = json.loads(subprocess.run(
            [sys.executable, "-c", LIST_JOBS, f"http://127.0.0.1:{ports['dashboard-port']}"],
            env={**env, "RAY_AUTH_MODE": "token"}, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
    finally:
        limit.cancel()
        if (work / "head.pid").exists():
            stop_head(int((work / "head.pid").read_text()))

    # Both jobs ran the config's relative model and data paths, resolved against the scratch repository.
    assert len(jobs) == 2 and {j["status"] for j in jobs} == {"SUCCEEDED"}, jobs
    for j in jobs:
        assert f"run.base_dir={repo}" in j["entrypoint"].replace("'", "") and "models." not in j["entrypoint"] \
            and "data." not in j["entrypoint"], j["entrypoint"]

    # rlhf-ray submit streamed the logs: its step lines came in order, before its final status line, and the job's
    # first lines reached this test before the job ended. (Not the first step line: the steps take ~1 s and the job
    # ends a moment after, so on a loaded machine Ray's log tailing delivers them all after the end, as one chunk.)
    sub = next(i for i, (_, line) in enumerate(out) if line.startswith("submitted raysubmit_"))
    job_id = out[sub][1].split()[1].rstrip(":")
    end = next(i for i, (_, line) in enumerate(out) if line == f"job {job_id}: SUCCEEDED")
    step_at = [next(i for i in range(sub, end) if out[i][1].startswith(f"step {s}/{steps} "))
               for s in range(1, steps + 1)]
    assert step_at == sorted(step_at)
    job_end = next(j["end"] for j in jobs if j["id"] == job_id) / 1000
    connected = next(i for i in range(sub, end) if "Connected to Ray cluster" in out[i][1])   # the job's driver
    assert out[connected][0] < job_end - 5, (out[connected], job_end)
    # ... and the plain `ray job submit` streamed its job's too.
    assert any(line.startswith(f"step {steps}/{steps} ") for _, line in out[end:])

    # The outputs landed in the submitting directory, under runs/, as the README says.
    for run in ("tiny-grpo-submit", "tiny-grpo-job"):
        run_dir = repo / "runs" / run
        assert (run_dir / "metrics.jsonl").read_text().count("\n") == steps, run
        assert (run_dir / "checkpoints" / f"step_{steps:06d}").is_dir(), sorted((run_dir / "checkpoints").iterdir())
