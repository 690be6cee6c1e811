"""Per-step metrics: one JSON line per step in <run>/metrics.jsonl, mirrored to Weights & Biases; a few
rollouts per step, as the models saw them (chat template included), in <run>/samples.jsonl.

W&B runs offline unless the config says online; the API key, if any, comes only from the environment
(WANDB_API_KEY) and is never written or logged by us.
"""
from __future__ import annotations

import json
import os
from pathlib import Path


class MetricsLogger:
    def __init__(self, run_dir: str | Path, cfg, run_name: str, resume_step: int | None = None,
                 filename: str = "metrics.jsonl"):
        """resume_step: continue an existing file, dropping rows logged after that step's checkpoint."""
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / filename
        self.samples_path = self.path.with_name(filename.replace("metrics", "samples"))
        self._f = _open_rows(self.path, resume_step)
        self._samples = None
        self._resume_step = resume_step
        self._wandb_step = -1             # W&B takes each step once, in order: replayed steps are not resent
        self.wandb_run = None
        wb = cfg.logging.wandb
        if wb.enabled and wb.mode != "disabled":
            import wandb
            os.environ.setdefault("WANDB_SILENT", "true")
            self.wandb_run = wandb.init(project=wb.project, entity=wb.entity, name=run_name, mode=wb.mode,
                                        dir=str(self.run_dir), config=cfg.to_dict(), reinit="finish_previous")

    @property
    def wandb_dir(self) -> str | None:
        return self.wandb_run.dir.rsplit("/files", 1)[0] if self.wandb_run is not None else None

    def log(self, step: int, metrics: dict) -> None:
        clean = {k: (float(v) if isinstance(v, (int, float)) else v) for k, v in metrics.items()}
        self._f.write(json.dumps({"step": step, **clean}, allow_nan=True) + "\n")
        self._f.flush()
        if self.wandb_run is not None and step > self._wandb_step:
            self.wandb_run.log(clean, step=step)
            self._wandb_step = step

    def rewind(self, step: int) -> None:
        """Drop the rows logged after `step` (a run rolled back to that step's checkpoint replays them)."""
        self._f.close()
        self._f = _open_rows(self.path, step)
        if self._samples is not None:
            self._samples.close()
            self._samples = _open_rows(self.samples_path, step)

    def log_samples(self, step: int, rows: list[dict]) -> None:
        """A few rollouts of the step (e.g. prompt and response text, score), one JSON line each."""
        if self._samples is None:
            self._samples = _open_rows(self.samples_path, self._resume_step)
        self._samples.write("".join(json.dumps({"step": step, **r}) + "\n" for r in rows))
        self._samples.flush()

    def close(self) -> None:
        self._f.close()
        if self._samples is not None:
            self._samples.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None


def _open_rows(path: Path, resume_step: int | None):
    """A JSONL file of {"step": ...} rows to append to; on resume, rows logged after `resume_step` (past the
    checkpoint the run continues from) are dropped first."""
    if resume_step is not None and path.is_file():
        kept = [line for line in path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= resume_step]
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        tmp.replace(path)
    return path.open("a" if resume_step is not None else "w")


def process_started_at(pid: int | str = "self") -> float | None:
    """When a process started, as wall-clock time (Linux: /proc/<pid>/stat field 22 after boot, /proc/stat btime);
    None where /proc does not say."""
    try:
        ticks = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
        boot = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime"))
    except (OSError, ValueError, IndexError, StopIteration):
        return None
    return boot + ticks / os.sysconf("SC_CLK_TCK")


def moving_average(x: list[float], window: int) -> list[float]:
    """Trailing mean over up to `window` values (the first values average what there is so far)."""
    return [sum(x[max(0, i + 1 - window):i + 1]) / (i + 1 - max(0, i + 1 - window)) for i in range(len(x))]


def curve_agreement(series: list[float], reference: list[float], steps: list[int], window: int = 5) -> dict:
    """How well one per-step curve tracks another (e.g. a held-out monitor RM vs the gold reward):
    Pearson correlation of the per-step values, and each curve's peak step after a `window`-step moving
    average (noise in one step's batch mean would otherwise pick the peak)."""
    import statistics
    r = statistics.correlation(series, reference) if len(series) > 2 else float("nan")
    peak = lambda x: steps[max(range(len(x)), key=moving_average(x, window).__getitem__)]  # noqa: E731
    return {"pearson": r, "peak_step": peak(series), "reference_peak_step": peak(reference)}


def interpolate_from_origin(x: float, points: list[tuple[float, float]]) -> tuple[float, bool]:
    """y at `x` on the piecewise-linear curve through (0, 0) and `points` (e.g. best-of-n's (KL, gain), n = 1
    being (0, 0)); beyond the last point the last segment is extended. Returns (y, extrapolated)."""
    pts = [(0.0, 0.0)] + sorted(points)
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0), False
    (x0, y0), (x1, y1) = pts[-2], pts[-1]
    return y1 + (y1 - y0) * (x - x1) / (x1 - x0), True


def best_of_n(scores, values, n: int):
    """Best-of-n over each row's disjoint groups of n samples: [P, m] scores (what picks) and values (what is
    measured) -> ([P, m // n] values of each group's highest-scoring sample, [P, m // n] those scores). Every
    group is an independent best-of-n draw, so their mean estimates the same expectation as one group per
    row, with less noise."""
    groups = scores.size(1) // n
    s = scores[:, :groups * n].reshape(scores.size(0), groups, n)
    best = s.argmax(-1, keepdim=True)
    return values[:, :groups * n].reshape(s.shape).gather(-1, best).squeeze(-1), s.gather(-1, best).squeeze(-1)


def startup_report(driver: dict[str, float], actors: dict[str, dict[str, float]]) -> tuple[str, dict]:
    """Where a run's start-up went: `driver` marks (wall-clock, in order, from "start": the driver process's start,
    to "first_step": its first step's line) and each actor's marks (from "process": its worker's start, through
    "imported": its role's modules imported, to "ready"), all as seconds since the driver started. Returns one
    line for the console (the driver's phases, and the actor that was ready last, phase by phase) and the whole
    table (startup.json)."""
    t0 = driver["start"]

    def phases(marks: dict[str, float]) -> dict[str, float]:
        names = list(marks)
        return {b: marks[b] - marks[a] for a, b in zip(names, names[1:]) if marks[b] is not None and marks[a] is not None}

    table = {"driver": {k: v - t0 for k, v in driver.items()},
             **{name: {k: (v - t0 if v is not None else None) for k, v in m.items()} for name, m in actors.items()}}
    last = max(actors, key=lambda name: actors[name].get("ready") or 0.0)
    drv = ", ".join(f"{k} {v:.1f}" for k, v in phases(driver).items())
    act = ", ".join(f"{k} {v:.1f}" for k, v in phases(actors[last]).items())
    line = (f"start-up: {driver['first_step'] - t0:.1f} s to the first step ({drv}); last actor ready: {last}, "
            f"process started at {table[last]['process']:.1f} s ({act})")
    return line, table
