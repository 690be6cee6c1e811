"""What every driver shares: joining or starting the Ray cluster, the actors' environment, rank statistics."""
from __future__ import annotations

import math
import os
import re

import ray

from actors.startup import ENV as STARTUP_GC
from launch.reaper import watch_local_cluster
from rlhf_ray.config import Config
from rlhf_ray.hardware import fastest_dtype


def start_ray(cfg: Config, extra_cpus: float = 0) -> None:
    """Join the cluster named by ray.address ("auto" under `ray job submit`), or start a fresh local one
    with logical CPUs for every role (plus `extra_cpus` for actors a driver keeps besides them), which dies
    with this process (launch/reaper.py).

    `address="local"` rather than None: with None, ray.init would silently join the latest `ray start`
    cluster on this machine instead of starting the embedded one.
    """
    if ray.is_initialized():
        return
    if cfg.ray.address:
        ray.init(address=cfg.ray.address, log_to_driver=True)
        return
    # Logical CPUs: on a small box the actors share the cores (their phases mostly take turns).
    num_cpus = cfg.ray.num_cpus or max(math.ceil(cfg.cpus_needed() + extra_cpus), os.cpu_count() or 1)
    # Ray prestarts idle workers for the first driver, one per logical CPU it can; rlhf-ray's actors each carry a
    # runtime_env of their own and never take one, so they only spend CPU (~0.5 s each) while the actors start
    os.environ.setdefault("RAY_prestart_worker_first_driver", "0")
    with watch_local_cluster():           # the cluster dies with this process, however it ends (not what it starts later)
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=cfg.ray.dashboard, dashboard_host="127.0.0.1",
                 log_to_driver=True)


def cluster_device(cfg: Config, gpus_per_rank: float) -> str:
    """Where a role runs: train.device when set, else CUDA exactly when the role asks for GPUs. Resolves
    `train.dtype: auto` in place, before any actor sees the config, and says what it picked and why in one line."""
    device = cfg.device_for(gpus_per_rank)
    if cfg.train.dtype == "auto":
        choice = fastest_dtype(device)
        cfg.train.dtype = choice.dtype
        print(choice.line(), flush=True)
    return device


def actor_env(device: str) -> dict:
    """Environment for every actor (merged into, not replacing, a submitted job's runtime_env)."""
    env = {"TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1", "TRANSFORMERS_VERBOSITY": "error",
           "HF_HUB_DISABLE_PROGRESS_BARS": "1", "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "ERROR"),
           "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"), "PYTHONWARNINGS": "ignore::FutureWarning"}
    if device == "cpu":
        env["DS_ACCELERATOR"] = "cpu"
    env[STARTUP_GC] = "off"            # actors/startup.py: no cyclic garbage collection until the actor is ready
    return env


def trainer_env(cfg: Config, device: str) -> dict:
    """runtime_env of a trained role's ranks (policy, critic, a supervised stage): the common actor environment,
    and on CUDA the caching allocator's settings (train.cuda_alloc_conf; read once, at the process's first CUDA
    allocation). Trained roles never share a process with a vLLM engine, whose sleep mode refuses expandable
    segments."""
    env = actor_env(device)
    if device == "cuda" and cfg.train.cuda_alloc_conf:
        env["PYTORCH_CUDA_ALLOC_CONF"] = cfg.train.cuda_alloc_conf
    return {"env_vars": env}


def mean_over_ranks(stats: list[dict]) -> dict:
    """Each rank reports means over its equal-sized shards; the group's figure is their mean (or, for a stat named
    *_max, their maximum)."""
    return {k: max(s[k] for s in stats) if k.endswith("_max") else sum(s[k] for s in stats) / len(stats)
            for k in stats[0]}


def engine_env(cfg: Config, device: str, run_dir: str) -> dict:
    """runtime_env of a generation engine: the common actor environment plus vLLM's own settings."""
    from actors.engine import engine_runtime_env
    return {"env_vars": {**actor_env(device), **engine_runtime_env(cfg, device, run_dir)["env_vars"]}}


class RunError(RuntimeError):
    """A run that stopped for a reason its message says in one line (e.g. a failed rollout, a diverged loss)."""


def cause_line(e: BaseException) -> str:
    """The root cause of an actor's exception, or of its death, in one line: its type and its message's last line
    (Ray's own rendering is a multi-line traceback per hop)."""
    while isinstance(e, ray.exceptions.RayTaskError) and isinstance(e.cause, BaseException) and e.cause is not e:
        e = e.cause
    if isinstance(e, ray.exceptions.RayActorError):
        text = " ".join(str(e).split())
        actor = re.search(r"class_name: (\w+)", text)
        return f"{type(e).__name__}: the actor{' ' + actor.group(1) if actor else ''} died"
    lines = str(e).strip().splitlines() or [""]
    # the cause itself: its message's first line; a Ray error that could not carry it: its traceback's last
    return f"{type(e).__name__}: {lines[-1] if isinstance(e, ray.exceptions.RayError) else lines[0]}"


def actor_error_line(e: ray.exceptions.RayError) -> str:
    """One line for an exception raised in an actor: the method that raised it, and its root cause."""
    where = getattr(e, "function_name", None) or re.search(r"ray::([\w.]+)\(", str(e))   # the re-raised kind has
    where = where.group(1) if isinstance(where, re.Match) else where                      # only its traceback
    return f"{where or 'an actor'} failed: {cause_line(e)}"


def run_cli(prog: str, description: str, run, argv: list[str] | None, resume_flag: bool = False):
    """Shared entry point: --config, repeatable --set, optional --resume; bad input -> one line, exit 2; a
    RunError -> one line, exit 1. `run(cfg, args)` returns the result, or this returns the exit code (an int)."""
    import argparse
    import sys
    from actors.group import PlacementError
    from rlhf_ray.config import ConfigError, load_config
    from rlhf_ray.data import DataError
    from rlhf_ray.agent import AgentError
    from rlhf_ray.env import EnvError
    from rlhf_ray.models import ModelLoadError
    from rlhf_ray.rewards import RewardSourceError
    ap = argparse.ArgumentParser(prog=prog, description=description)
    ap.add_argument("--config", required=True, help="YAML config (see configs/)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config value, e.g. --set ppo.kl_coef=0.1 (repeatable)")
    if resume_flag:
        ap.add_argument("--resume", nargs="?", const=True, default=False, choices=["auto"],
                        help="continue from the newest whole checkpoint (an error if there is none); "
                             "--resume auto: start fresh when there is none")
    args = ap.parse_args(argv)
    try:
        return run(load_config(args.config, args.overrides), args)
    except ray.exceptions.RayError as e:     # first: Ray re-raises an actor's exception as a subclass of both
        print(f"error: {actor_error_line(e)}", file=sys.stderr)
        return 1
    except (ConfigError, DataError, ModelLoadError, RewardSourceError, EnvError, AgentError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (RunError, PlacementError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
