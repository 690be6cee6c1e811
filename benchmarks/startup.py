"""Start-up: from `rlhf-ray ppo --config configs/tiny_grpo.yaml` to its first step's line, and where it goes.

    .venv/bin/python benchmarks/startup.py [--runs 3] [--config configs/tiny_grpo.yaml] [--set key=value ...]

One warm-up run (so that the measured runs are warm: bytecode compiled, files in the page cache), then --runs
runs, one after the other. Per run: the wall time from the command's start to its first step line; the driver's
and every actor's start-up phases (the run's startup.json: process start, imports, model load, DeepSpeed, vLLM
import, engine build); and the CPU seconds each process spent until that line (sampled from /proc every 0.1 s:
the box has two cores, so start-up is bounded by the sum of this work as much as by any one process). After each
run, the yardstick: `python -c "from vllm import LLM"` in a fresh process, timed. Prints the median run's table and
writes runs/bench-startup/startup.md. A benchmark, not a test.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.machine import cpu_model, git_commit  # noqa: E402
from benchmarks.tables import publish  # noqa: E402

OUT = ROOT / "runs" / "bench-startup"
TICK = os.sysconf("SC_CLK_TCK")


def processes() -> tuple[dict[int, list[int]], dict[int, tuple[str, float]]]:
    """Every process's children, and its title and CPU seconds so far."""
    kids, info = {}, {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            rest = (d / "stat").read_text().rsplit(")", 1)[1].split()
            argv = [a.decode(errors="replace") for a in (d / "cmdline").read_bytes().split(b"\0") if a]
        except (OSError, IndexError):
            continue
        if argv and argv[0].startswith("ray::"):              # an actor, titled ray::<Class>[.<method>]
            title = argv[0].split(".")[0].split()[0]
        elif argv and argv[0].endswith(("python", "python3")):  # python -m <module> / python <script>
            title = Path(argv[2] if argv[1:2] == ["-m"] and len(argv) > 2 else argv[1] if len(argv) > 1 else "python").name
        else:
            title = Path(argv[0]).name if argv else "?"
        kids.setdefault(int(rest[1]), []).append(int(d.name))
        info[int(d.name)] = (title, (int(rest[11]) + int(rest[12])) / TICK)
    return kids, info


def one_run(cmd: list[str], run_dir: Path) -> dict:
    """Run `cmd` until its first step line; the wall time, CPU seconds per process title, and startup.json."""
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled")})
    os.set_blocking(proc.stdout.fileno(), False)
    cpu, first, tail = {}, None, ""
    while first is None:
        if proc.poll() is not None:
            sys.exit(f"the run ended before its first step:\n{tail[-3000:]}{(proc.stdout.read() or b'').decode()}")
        kids, info = processes()
        todo = [proc.pid]
        while todo:                                   # every process below the command: Ray's, the actors'
            pid = todo.pop()
            todo += kids.get(pid, [])
            if pid in info:
                cpu[pid] = info[pid]
        chunk = (proc.stdout.read() or b"").decode(errors="replace")   # non-blocking: what is there
        tail = (tail + chunk)[-20000:]
        for line in tail.splitlines():
            if line.startswith("step 1/"):
                first = time.time() - t0
        time.sleep(0.1)
    while not (run_dir / "startup.json").is_file() and proc.poll() is None:    # written right after the line
        time.sleep(0.1)
    proc.kill()
    proc.wait()
    by_title: dict[str, float] = {}
    for title, seconds in cpu.values():
        by_title[title] = by_title.get(title, 0.0) + seconds
    return {"first_step": first, "cpu": by_title, "phases": json.loads((run_dir / "startup.json").read_text())}


def vllm_import() -> float:
    """Wall seconds of `python -c "from vllm import LLM"` in a fresh process (the yardstick: vLLM's import alone)."""
    t0 = time.time()
    subprocess.run([sys.executable, "-c", "from vllm import LLM"], cwd=ROOT, check=True, capture_output=True)
    return time.time() - t0


def report(runs: list[dict], imports: list[float], a) -> str:
    med = sorted(runs, key=lambda r: r["first_step"])[len(runs) // 2]
    walls = [r["first_step"] for r in runs]
    yardstick = statistics.median(imports)
    lines = [f"From `rlhf-ray ppo --config {a.config}` to its first step's line: median {statistics.median(walls):.1f} s "
             f"over {len(runs)} warm runs ({', '.join(f'{w:.1f}' for w in walls)} s), "
             f"**{statistics.median(walls) / yardstick:.2f}x** the wall time of `python -c \"from vllm import LLM\"` "
             f"in a fresh process, measured between the runs: median {yardstick:.1f} s "
             f"({', '.join(f'{w:.1f}' for w in imports)} s). The median run's phases, each "
             "as the time it ended (seconds since the driver process started):", "",
             "| process | started | phases |", "|---|---|---|"]
    for name, marks in med["phases"].items():
        begin = marks.get("process", marks.get("start")) or 0.0
        lines.append(f"| {name} | {begin:.1f} | "
                     + ", ".join(f"{k} {v:.1f}" for k, v in marks.items() if k not in ("process", "start") and v) + " |")
    cpu = sorted(((v, k) for k, v in med["cpu"].items()), reverse=True)
    lines += ["", "CPU seconds each process spent until the first step (same run):", "",
              "| process | CPU-s |", "|---|---|"] + [f"| {k} | {v:.1f} |" for v, k in cpu if v >= 0.2]
    lines += ["", f"All processes: {sum(v for v, _ in cpu):.1f} CPU-s in {med['first_step']:.1f} s on {os.cpu_count()} "
              f"cores. {cpu_model()}; {datetime.date.today().isoformat()}; commit {git_commit()}; overrides: "
              f"{', '.join(a.extra) or 'none'}."]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--config", default="configs/tiny_grpo.yaml")
    ap.add_argument("--set", dest="extra", action="append", default=[], help="more overrides")
    a = ap.parse_args()
    if not (ROOT / "assets" / "tiny" / "policy").is_dir():
        subprocess.run([sys.executable, "-m", "launch.cli", "tiny-world"], cwd=ROOT, check=True)
    run_dir = OUT / "run"
    cmd = [str(Path(sys.executable).parent / "rlhf-ray"), "ppo", "--config", a.config]
    for s in [f"run.output_dir={run_dir}", "train.steps=2", *a.extra]:        # W&B as the config has it (offline)
        cmd += ["--set", s]
    runs, imports = [], []
    for i in range(a.runs + 1):
        (run_dir / "startup.json").unlink(missing_ok=True)
        r = one_run(cmd, run_dir)
        print(f"{'warm-up' if i == 0 else f'run {i}'}: first step at {r['first_step']:.1f} s", flush=True)
        if i:
            runs.append(r)
            imports.append(vllm_import())
            print(f"  from vllm import LLM: {imports[-1]:.1f} s", flush=True)
    publish(report(runs, imports, a), OUT / "startup.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
