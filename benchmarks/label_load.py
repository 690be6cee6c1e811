"""The labelling page under load: N people (threads, each its own HTTP client and token) label through the page's
HTTP API for a while against `rlhf-ray label-server serve` (its own process, as people would reach it), every
fifth label submitted twice (a double click). Then the store is read back: no label lost (every submit answered
`stored` is in the file), none doubled (one per task and person), and the request latencies' p50 / p95 / p99.

    .venv/bin/python benchmarks/label_load.py [--people 20] [--seconds 60] [--out benchmarks/results/label_load.json]

Loopback only: this measures the server and SQLite, not a network.
"""
from __future__ import annotations

import argparse
import json
import random
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.machine import cpu_model, git_commit  # noqa: E402
from rlhf_ray.label_store import LabelStore  # noqa: E402


def person(url: str, token: str, until: float, seed: int, out: dict) -> None:
    rng = random.Random(seed)
    h = {"Authorization": f"Bearer {token}"}
    with httpx.Client(base_url=url, headers=h, timeout=30) as c:
        while time.monotonic() < until:
            t0 = time.perf_counter()
            task = c.get("/api/next").json()["task"]
            out["latency"].append(time.perf_counter() - t0)
            if task is None:
                out["empty"] += 1
                time.sleep(0.05)
                continue
            k = len(task["answers"])
            body = {"task": task["task"], "tiers": [[p] for p in rng.sample(range(k), k)]}
            for attempt in range(2 if rng.random() < 0.2 else 1):
                t0 = time.perf_counter()
                r = c.post("/api/label", json=body)
                out["latency"].append(time.perf_counter() - t0)
                if r.status_code != 200:
                    out["errors"].append(f"{r.status_code} {r.text[:200]}")
                elif r.json()["stored"]:
                    out["stored"].append(task["task"])
                else:
                    out["duplicates"] += 1


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--people", type=int, default=20)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--tasks", type=int, default=20000)
    ap.add_argument("--wanted", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/results/label_load.json")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="label_load_"))
    db = tmp / "labels.sqlite"
    store = LabelStore(db)
    tokens = [store.add_labeler(f"p{i}") for i in range(args.people)]
    rng = random.Random(0)
    store.add_tasks("load", [{"prompt": f"prompt {i}", "responses": [f"answer {i}.{j} " * rng.randint(5, 40)
                                                                      for j in range(4)]} for i in range(args.tasks)],
                    wanted=args.wanted)
    server = subprocess.Popen([sys.executable, "-m", "launch.cli", "label-server", "serve", "--db", str(db),
                               "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        line = server.stdout.readline()
        m = re.search(r"http://127\.0\.0\.1:\d+", line)
        if not m:
            raise SystemExit(f"label_load: the server did not start: {line.strip()}")
        url = m.group(0)
        outs = [{"latency": [], "stored": [], "errors": [], "duplicates": 0, "empty": 0} for _ in tokens]
        until = time.monotonic() + args.seconds
        threads = [threading.Thread(target=person, args=(url, tok, until, i, outs[i])) for i, tok in enumerate(tokens)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
    finally:
        server.terminate()
        server.wait(30)
    labels = store.labels("load")
    keys = [(lab["task_id"], lab["labeler"]) for lab in labels]
    stored = sum(len(o["stored"]) for o in outs)
    lat = sorted(x for o in outs for x in o["latency"])
    q = lambda f: 1000 * lat[min(len(lat) - 1, int(f * len(lat)))]        # noqa: E731  (ms)
    over = sum(c > args.wanted for c in [sum(1 for t, _ in keys if t == task) for task in {t for t, _ in keys}])
    result = {"cpu": cpu_model(), "commit": git_commit(), "date": time.strftime("%Y-%m-%d"), "people": args.people,
              "seconds": wall,
              "wanted": args.wanted, "requests": len(lat), "labels_stored_answered": stored,
              "labels_in_store": len(labels), "lost": stored - len(labels), "doubled": len(keys) - len(set(keys)),
              "tasks_over_wanted": over, "duplicate_submits_answered_duplicate": sum(o["duplicates"] for o in outs),
              "errors": [e for o in outs for e in o["errors"]][:10], "labels_per_s": len(labels) / wall,
              "latency_ms": {"p50": q(0.50), "p95": q(0.95), "p99": q(0.99), "max": 1000 * lat[-1],
                             "mean": 1000 * statistics.fmean(lat)}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    if result["lost"] or result["doubled"] or result["errors"]:
        raise SystemExit("label_load: labels lost, doubled or refused (above)")


if __name__ == "__main__":
    main()
