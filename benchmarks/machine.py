"""What a benchmark report states about where it ran: the CPU model (`lscpu`) and the commit, marked when the
working tree differs from it."""
from __future__ import annotations

import platform
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return platform.processor() or "unknown CPU"


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout


def tree_changes(porcelain: str) -> tuple[int, int]:
    """(tracked files changed, untracked files) in `git status --porcelain` output. Ignored paths (.gitignore:
    runs/, .venv*, assets/ ...) are not listed there, so a benchmark's own outputs do not count."""
    lines = [line for line in porcelain.splitlines() if line.strip()]
    untracked = sum(line.startswith("??") for line in lines)
    return len(lines) - untracked, untracked


def git_commit() -> str:
    """The short commit, with "+dirty (N changed, M untracked)" when the working tree is not that commit: tracked
    files modified, staged, deleted or renamed, or untracked files git does not ignore (new code a run may import).
    "unknown" outside a git checkout."""
    try:
        commit = _git("rev-parse", "--short", "HEAD").strip()
        changed, untracked = tree_changes(_git("status", "--porcelain"))
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    if not (changed or untracked):
        return commit
    return f"{commit}+dirty ({changed} changed, {untracked} untracked)"
