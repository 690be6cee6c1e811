"""`ray job submit` against a real head: started by the test on free loopback ports, stopped by its PID."""
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import tiny_overrides
from launch.submit import submit

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_tiny_job_via_ray_job_submit(tiny_world, tmp_path):
    # Every listener on a free port: another Ray instance on this machine (e.g. the one the end-to-end tests
    # started in this process) holds the defaults, and a dashboard agent that cannot bind its port disables
    # the job API ("No available agent to submit job").
    ports = {flag: free_port() for flag in ("port", "dashboard-port", "ray-client-server-port",
                                            "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                            "metrics-export-port", "runtime-env-agent-port", "node-manager-port",
                                            "object-manager-port")}
    dash = ports["dashboard-port"]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    ray_bin = str(Path(sys.executable).parent / "ray")
    head = subprocess.Popen(
        [ray_bin, "start", "--head", "--block", "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
         *[f"--{flag}={port}" for flag, port in ports.items()], "--num-cpus=8", "--disable-usage-stats"],
        env=env, stdout=open(tmp_path / "head.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        from ray.job_submission import JobSubmissionClient
        address = f"http://127.0.0.1:{dash}"
        deadline = time.time() + 120
        while True:                                           # wait for the job API to answer
            try:
                JobSubmissionClient(address).list_jobs()
                break
            except Exception:
                if time.time() > deadline or head.poll() is not None:
                    raise AssertionError("head did not come up:\n" + (tmp_path / "head.log").read_text()[-3000:])
                time.sleep(1)
        overrides = tiny_overrides(tiny_world, tmp_path / "run") + ["logging.wandb.mode=offline"]
        job_id, status, logs = submit(address, "configs/tiny_ppo.yaml", overrides, working_dir=str(REPO),
                                      python=sys.executable, timeout=600)
        assert status == "SUCCEEDED", logs[-4000:]
        for step in (1, 2, 3):
            assert f"step {step}/3" in logs
        assert (tmp_path / "run" / "metrics.jsonl").read_text().count("\n") == 3
    finally:
        os.killpg(head.pid, signal.SIGTERM)                   # this head only; never `ray stop`
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
