"""What benchmark reports share: a table of one row per seed closed by mean ± sd, and writing the report out."""
from __future__ import annotations

import statistics
from pathlib import Path


def seed_table(rows: dict, columns: list[tuple[str, str, str]], mark=lambda key, row: "") -> list[str]:
    """Markdown lines: a header, one row per seed (each cell in its column's format, then mark(key, row)), and the
    mean ± sd of every column over the seeds (sd 0 for one seed)."""
    lines = ["| seed | " + " | ".join(h for _, h, _ in columns) + " |", "|" + "---|" * (len(columns) + 1)]
    for seed, r in rows.items():
        lines.append(f"| {seed} | " + " | ".join(fmt.format(r[k]) + mark(k, r) for k, _, fmt in columns) + " |")
    cells = []
    for k, _, fmt in columns:
        vals = [r[k] for r in rows.values()]
        sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
        cells.append(f"{fmt.format(statistics.mean(vals))} ± {fmt.format(sd).lstrip('+')}")
    return lines + ["| **mean ± sd** | " + " | ".join(cells) + " |"]


def publish(text: str, path: Path) -> None:
    """Write the report under the benchmark's run directory and print it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")
    print("\n" + text)
