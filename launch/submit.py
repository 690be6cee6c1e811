"""Submit a run to a Ray cluster: the equivalent of

    ray job submit --address URL --working-dir . -- python -m launch.ppo --config C --set ray.address=auto \
        --set run.base_dir=$PWD ...

through Ray's job SDK: the job's logs stream here as they come, and the final status is read through the SDK
(`ray job status` exits 0 even for a FAILED job), so the exit code is the job's: 0 SUCCEEDED, 1 FAILED or STOPPED.
The config's relative model, data and output paths resolve against the submitting directory (`run.base_dir`),
which must be readable on the cluster (the same machine, or shared storage).

    rlhf-ray submit --address http://127.0.0.1:8265 --config configs/tiny_ppo.yaml [--set k=v ...] [--no-wait]
"""
from __future__ import annotations

import argparse
import asyncio
import shlex
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
# Never uploaded with the working directory: the local virtualenv, run outputs, built models (the job reads those
# in the submitting directory, run.base_dir), W&B files, git's objects, caches.
EXCLUDES = [".venv", "runs", "assets", "wandb", ".git", "**/__pycache__", ".pytest_cache"]


def head_is_local(address: str) -> bool:
    """A loopback address: the head runs on this machine, so this interpreter's path exists there too."""
    host = urlparse(address if "://" in address else f"http://{address}").hostname or ""
    return host in ("localhost", "::1") or host.startswith("127.")


def entrypoint(config: str, overrides: list[str], python: str, base_dir: str) -> str:
    args = [python, "-m", "launch.ppo", "--config", config, "--set", "ray.address=auto",
            "--set", f"run.base_dir={base_dir}"]
    for o in overrides:                  # after ours: a user's own run.base_dir wins
        args += ["--set", o]
    return " ".join(shlex.quote(a) for a in args)


def follow(client, job_id: str, echo) -> str:
    """Echo the job's logs as they come until it ends; returns its final status, read through the SDK."""
    async def tail():
        async for chunk in client.tail_job_logs(job_id):
            echo(chunk)
    try:
        asyncio.run(tail())
    except RuntimeError as e:            # the stream broke off (e.g. the dashboard restarted); the job may run on
        echo(f"note: the log stream ended early ({e}); waiting for the job's status\n")
    status = str(client.get_job_status(job_id))
    while status not in TERMINAL:        # the stream closes as the job ends; its status can lag a moment
        time.sleep(2)
        status = str(client.get_job_status(job_id))
    return status


def submit(address: str, config: str, overrides: list[str], working_dir: str = ".", python: str | None = None,
           wait: bool = True, echo=lambda s: print(s, end="", flush=True)) -> tuple[str, str]:
    """Submit, and (wait) follow the job to its end; returns (job_id, status). python: the job's interpreter;
    None: this one when the head is on this machine, else the `python` on the head's PATH."""
    from ray.job_submission import JobSubmissionClient
    python = python or (sys.executable if head_is_local(address) else "python")
    command = entrypoint(config, overrides, python, str(Path.cwd()))
    client = JobSubmissionClient(address)
    runtime_env = {"working_dir": str(Path(working_dir).resolve()), "excludes": EXCLUDES}
    deadline = time.time() + 120
    while True:
        try:
            job_id = client.submit_job(entrypoint=command, runtime_env=runtime_env)
            break
        except RuntimeError as e:
            # A head that has just started answers the job API before its job agent is up.
            if "No available agent" not in str(e) or time.time() > deadline:
                raise
            time.sleep(2)
    echo(f"submitted {job_id}: {command}\n")
    if not wait:
        return job_id, str(client.get_job_status(job_id))
    return job_id, follow(client, job_id, echo)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="rlhf-ray submit", description=__doc__.splitlines()[0])
    ap.add_argument("--address", default="http://127.0.0.1:8265", help="the cluster's dashboard (job API) address")
    ap.add_argument("--config", required=True)
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--python", help="the job's interpreter (default: this one for a head on this machine, "
                                     "else `python` on the head's PATH)")
    ap.add_argument("--no-wait", action="store_true", help="return once submitted")
    args = ap.parse_args(argv)
    from ray.exceptions import AuthenticationError
    try:
        job_id, status = submit(args.address, args.config, args.overrides, python=args.python, wait=not args.no_wait)
    except AuthenticationError as e:
        print(f"error: {args.address}: {str(e).strip().splitlines()[0]} (a head with token auth needs "
              "RAY_AUTH_MODE=token here too; the token is read from ~/.ray/auth_token)", file=sys.stderr)
        return 1
    except (RuntimeError, ConnectionError) as e:
        print(f"error: {args.address}: {str(e).strip().splitlines()[0]}", file=sys.stderr)
        return 1
    if status in TERMINAL - {"SUCCEEDED"}:
        print(f"error: job {job_id}: {status}", file=sys.stderr)
        return 1
    print(f"job {job_id}: {status}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
