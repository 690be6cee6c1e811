"""Checkpoint layout and atomic publication.

    <output_dir>/checkpoints/step_000012/
        policy/        HF-format (config.json, model.safetensors, tokenizer files): opens with from_pretrained
        critic/        HF-format scalar-head model
        policy_ds/     DeepSpeed state (partitioned weights, optimizer, scheduler) for an exact resume
        critic_ds/
        files.json     every other file's size, to tell a whole checkpoint from a damaged one
        state.json     step, prompt-stream position, run seed, KL coefficient (written last)

A checkpoint is written under a hidden staging name and renamed into place only when complete, so a crash
mid-write never leaves a half-written `step_*` directory and never touches the previous checkpoint. A
checkpoint damaged afterwards (a truncated shard, an unreadable state.json) is passed over by `latest`, which
falls back to the newest whole one and says which it skipped and why.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

STATE_FILE = "state.json"
FILES = "files.json"
STATE_KEYS = {"step": int, "data": dict}     # what a resume cannot do without (the rest has defaults)


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
    sizes = {str(f.relative_to(staging)): f.stat().st_size for f in sorted(staging.rglob("*")) if f.is_file()}
    (staging / FILES).write_text(json.dumps(sizes, indent=0))
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


def latest(root: Path, skipped: list[str] | None = None, upto: int | None = None) -> Path | None:
    """The newest whole checkpoint (of a step <= `upto`, when given), or None. A newer one that is damaged is
    passed over, with one line on why appended to `skipped` (when given)."""
    if not root.is_dir():
        return None
    for p in sorted(root.glob("step_*"), reverse=True):
        if upto is not None and p > step_dir(root, upto):
            continue
        why = damage(p)
        if why is None:
            return p
        if skipped is not None and (p / STATE_FILE).exists():     # no state.json at all: never committed
            skipped.append(f"{p.name}: {why}")
    return None


def damage(ckpt: Path) -> str | None:
    """Why `ckpt` cannot be resumed from (one line), or None when it is whole: state.json readable, and every
    file listed in files.json present at its recorded size."""
    try:
        state = load_state(ckpt)
        if not isinstance(state, dict):
            return f"{STATE_FILE} is not a JSON object"
        for key, kind in STATE_KEYS.items():
            if not isinstance(state.get(key), kind):
                return f"{STATE_FILE} has no {key}" if key not in state else f"{STATE_FILE}: {key} is not a {kind.__name__}"
    except FileNotFoundError:
        return f"no {STATE_FILE} (never committed)"
    except (ValueError, OSError) as e:
        return f"{STATE_FILE} unreadable ({type(e).__name__})"
    listing = ckpt / FILES
    if not listing.is_file():            # written by a version that did not list files: trust state.json
        return None
    try:
        sizes = json.loads(listing.read_text())
    except (ValueError, OSError):
        return f"{FILES} unreadable"
    for name, size in sizes.items():
        f = ckpt / name
        if not f.is_file():
            return f"{name} missing"
        if f.stat().st_size != size:
            return f"{name} is {f.stat().st_size} bytes, {size} when written"
    return None


def load_state(ckpt: Path) -> dict:
    return json.loads((ckpt / STATE_FILE).read_text())


def prune(root: Path, keep: int) -> None:
    """Delete all but the newest `keep` complete checkpoints (keep <= 0 keeps all)."""
    if keep <= 0:
        return
    done = sorted(p for p in root.glob("step_*") if (p / STATE_FILE).is_file())
    for p in done[:-keep]:
        shutil.rmtree(p, ignore_errors=True)
