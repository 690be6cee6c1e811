"""An actor process's start-up without Python's cyclic garbage collector.

Imports, model loads and an engine's build allocate millions of objects, and on CPython 3.11 every collection
walks all of them: a quarter of the time `from vllm import LLM` takes in a fresh process (benchmarks/README.md,
"Start-up"). Processes started for actors (launch/common.py `actor_env` sets RLHF_RAY_STARTUP_GC=off) turn the
collector off as their role is built and back on once the driver finds them ready, with what the start-up made
frozen (never walked again). A role built in a process of another kind (a test, benchmarks/gpu_check.py) leaves
the collector alone.
"""
from __future__ import annotations

import gc
import os

ENV = "RLHF_RAY_STARTUP_GC"


def startup_begins() -> None:
    if os.environ.get(ENV) == "off":
        gc.disable()


def startup_over() -> None:
    if not gc.isenabled():
        gc.freeze()
        gc.enable()
