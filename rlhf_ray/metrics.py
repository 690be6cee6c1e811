"""Per-step metrics: one JSON line per step in <run>/metrics.jsonl, mirrored to Weights & Biases.

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
        if resume_step is not None and self.path.is_file():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            tmp = self.path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            tmp.replace(self.path)
        self._f = self.path.open("a" if resume_step is not None else "w")
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
        if self.wandb_run is not None:
            self.wandb_run.log(clean, step=step)

    def close(self) -> None:
        self._f.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None
