"""Checkpoint layout and atomic publication.

    <output_dir>/checkpoints/step_000012/
        policy/        HF-format (config.json, model.safetensors, tokenizer files): opens with from_pretrained
        critic/        HF-format scalar-head model
        policy_ds/     DeepSpeed state (partitioned weights, optimizer, scheduler) for an exact resume
        critic_ds/
        state.json     step, prompt-stream position, run seed, KL coefficient

A checkpoint is written under a hidden staging name and renamed into place only when complete, so a crash
mid-write never leaves a half-written `step_*` directory and never touches the previous checkpoint.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

STATE_FILE = "state.json"


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def step_dir(root: Path, step: int) -> Path:
    return root / f"step_{step:06d}"


def begin(root: Path, step: int) -> Path:
    """A fresh, empty staging directory for the checkpoint of `step`."""
    staging = root / f".step_{step:06d}.partial"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    return staging


def commit(root: Path, step: int, state: dict) -> Path:
    """Write state.json last, then publish the staging directory under its final name (atomic rename)."""
    staging = root / f".step_{step:06d}.partial"
    tmp = staging / (STATE_FILE + ".tmp")
    tmp.write_text(json.dumps(state, indent=1))
    tmp.replace(staging / STATE_FILE)
    return publish_dir(staging, step_dir(root, step))


def publish_dir(staging: Path, final: Path) -> Path:
    """Rename a complete `staging` directory to `final`; an existing `final` is swapped out, then deleted."""
    if final.exists():
        old = final.with_name(f".{final.name}.old")
        if old.exists():
            shutil.rmtree(old)
        final.replace(old)
        staging.replace(final)
        shutil.rmtree(old)
    else:
        staging.replace(final)
    return final


def latest(root: Path) -> Path | None:
    """The newest complete checkpoint (a `step_*` directory holding state.json), or None."""
    if not root.is_dir():
        return None
    done = sorted(p for p in root.glob("step_*") if (p / STATE_FILE).is_file())
    return done[-1] if done else None


def load_state(ckpt: Path) -> dict:
    return json.loads((ckpt / STATE_FILE).read_text())


def prune(root: Path, keep: int) -> None:
    """Delete all but the newest `keep` complete checkpoints (keep <= 0 keeps all)."""
    if keep <= 0:
        return
    done = sorted(p for p in root.glob("step_*") if (p / STATE_FILE).is_file())
    for p in done[:-keep]:
        shutil.rmtree(p, ignore_errors=True)
