"""What this machine's CPU can do fast: native bf16 arithmetic or not (pure; reads /proc/cpuinfo).

On x86, bf16 matmuls run natively on CPUs with AMX (`amx_bf16`) or AVX-512 BF16 (`avx512_bf16`): on an AMD
EPYC with avx512_bf16 a 16.8 M-parameter PPO step took 5.2 s with `train.dtype: bfloat16` against 9.0 s in
float32 (2 cores, November 2026). Elsewhere PyTorch emulates bf16 through float32: on an AVX-512 Xeon without
either flag a 2048x512 by 512x1024 matmul took 85 ms in bf16 against 18 ms in float32 (one thread), so float32
is the faster choice there. benchmarks/vs_trl.py picks its recommended dtype with `native_bf16_cpu`.
"""
from __future__ import annotations

from pathlib import Path

NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The `flags` of /proc/cpuinfo (or of the given text); empty where there is none (not Linux, not x86)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def native_bf16_cpu(flags: set[str] | None = None) -> bool:
    flags = cpu_flags() if flags is None else flags
    return any(f in flags for f in NATIVE_BF16_FLAGS)
