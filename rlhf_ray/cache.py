"""The user's rlhf-ray cache directory: what is worth keeping between runs on one machine (the measured dtype
choice, vLLM's model-inspection cache). $RLHF_RAY_CACHE, else ~/.cache/rlhf-ray."""
from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    return Path(os.environ.get("RLHF_RAY_CACHE") or Path.home() / ".cache" / "rlhf-ray")
