"""Submit a run to a Ray cluster: the equivalent of

    ray job submit --address URL --working-dir . -- python -m launch.ppo --config C --set ray.address=auto ...

through Ray's job SDK, so the final status is read reliably (`ray job status` exits 0 even for a FAILED job).
Model and data paths in the config must be readable on the cluster (shared storage, or the same machine).

    rlhf-ray submit --address http://127.0.0.1:8265 --config configs/tiny_ppo.yaml [--set k=v ...] [--no-wait]
"""
from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
# Never uploaded with the working directory: the local virtualenv, run outputs, built models.
EXCLUDES = [".venv", "runs", "assets", "wandb", ".git", "**/__pycache__", ".pytest_cache"]


def submit(address: str, config: str, overrides: list[str], working_dir: str = ".", python: str = "python",
           wait: bool = True, timeout: float = 3600, echo=print) -> tuple[str, str, str]:
    """Submit and (optionally) follow the job; returns (job_id, status, logs)."""
    from ray.job_submission import JobSubmissionClient
    args = ["-m", "launch.ppo", "--config", config, "--set", "ray.address=auto"]
    for o in overrides:
        args += ["--set", o]
    entrypoint = " ".join(shlex.quote(a) for a in [python, *args])
    client = JobSubmissionClient(address)
    runtime_env = {"working_dir": str(Path(working_dir).resolve()), "excludes": EXCLUDES}
    deadline = time.time() + 120
    while True:
        try:
            job_id = client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env)
            break
        except RuntimeError as e:
            # A head that has just started answers the job API before its job agent is up.
            if "No available agent" not in str(e) or time.time() > deadline:
                raise
            time.sleep(2)
    echo(f"submitted {job_id}: {entrypoint}")
    if not wait:
        return job_id, str(client.get_job_status(job_id)), ""
    deadline = time.time() + timeout
    status = client.get_job_status(job_id)
    while str(status).split(".")[-1] not in TERMINAL and time.time() < deadline:
        time.sleep(2)
        status = client.get_job_status(job_id)
    status = str(status).split(".")[-1]
    return job_id, status, client.get_job_logs(job_id)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="rlhf-ray submit", description=__doc__.splitlines()[0])
    ap.add_argument("--address", default="http://127.0.0.1:8265", help="the cluster's dashboard (job API) address")
    ap.add_argument("--config", required=True)
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--no-wait", action="store_true", help="return once submitted")
    args = ap.parse_args(argv)
    job_id, status, logs = submit(args.address, args.config, args.overrides, wait=not args.no_wait)
    if logs:
        print(logs)
    print(f"job {job_id}: {status}")
    return 0 if status in ("SUCCEEDED", "PENDING", "RUNNING") else 1


if __name__ == "__main__":
    sys.exit(main())
