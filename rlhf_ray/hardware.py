"""Which floating-point format trains faster on this machine: decided by measuring, never by /proc/cpuinfo flags.

Flags do not decide speed. An Intel VM with `avx512_bf16` but no AMX ran a 2048x512 by 512x1024 matmul in 37 ms in
bf16 against 22 ms in fp32 (one thread); an AMD EPYC with the same flag ran a 16.8 M-parameter PPO step 1.7x faster
in bf16; an AMD EPYC without any AVX-512 took 2.5 s in bf16 against 40 ms in fp32 (November-December 2026). So
`train.dtype: auto` times that matmul in both formats on one thread, keeps the answer in a small cache keyed by CPU
model and torch version (~/.cache/rlhf-ray/dtype.json, or $RLHF_RAY_CACHE), and takes bf16 only where it is at least
BF16_MARGIN faster: bf16 costs precision (engine and trainer logprobs then differ by ~0.02 nats, README), so a near
tie goes to fp32. The first measurement costs ~0.5 s where bf16 is fast, one bf16 call (up to a few seconds) where
it is emulated. On CUDA, auto is bf16 where the GPU supports it.

The driver decides for the whole run (launch/common.py: cluster_device); on a cluster whose workers have another
CPU than the driver's node, set train.dtype explicitly.
"""
from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from rlhf_ray.cache import cache_dir

SHAPE = (2048, 512, 1024)          # (m, k, n): a layer's activations times a weight matrix, as a small model's step
BF16_MARGIN = 1.1                  # bf16 must be this much faster than fp32 to be chosen


def cache_path() -> Path:
    return cache_dir() / "dtype.json"


@dataclass
class DtypeChoice:
    dtype: str                     # "float32" or "bfloat16"
    fp32_ms: float | None          # the matmul's median time in each format, one thread (CPU only); bf16's is
    bf16_ms: float | None          # its first call's where that alone took over 5x fp32's
    how: str                       # "measured", "cached", "cuda"

    def line(self) -> str:
        if self.how == "cuda":
            return f"train.dtype auto: {self.dtype} (CUDA: bf16 where the GPU supports it)"
        m, k, n = SHAPE
        return (f"train.dtype auto: {self.dtype} ({m}x{k} by {k}x{n} matmul, one thread: fp32 {self.fp32_ms:.1f} ms, "
                f"bf16 {self.bf16_ms:.1f} ms, {self.how}; bf16 is chosen only when {BF16_MARGIN:g}x faster)")


def choose(fp32_ms: float, bf16_ms: float) -> str:
    return "bfloat16" if fp32_ms >= BF16_MARGIN * bf16_ms else "float32"


def cpu_model() -> str:
    """The cache key's CPU: model name, family and model, and the bf16 instruction flags. VMs name CPUs coarsely
    ("AMD EPYC" for a Zen 3 without AVX-512, where torch's bf16 matmul leaves oneDNN for a far slower path, and for
    a Zen 4 with AVX-512 bf16, where bf16 ran faster), so the name alone would hand one CPU's answer to the other.
    The flags only tell CPUs apart here; what is chosen is still measured."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if not key.strip():
                break                                   # the first processor's block is enough
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    if "model name" not in fields:
        return platform.processor() or platform.machine()
    flags = set(fields.get("flags", "").split())
    bf16 = [f for f in ("avx512_bf16", "amx_bf16") if f in flags]
    return (f"{fields['model name']} (family {fields.get('cpu family', '?')} model {fields.get('model', '?')}"
            + "".join(f", {f}" for f in bf16) + ")")


def matmul_ms(dtype, reps: int = 7, enough_ms: float = float("inf")) -> float:
    """Median milliseconds of one SHAPE matmul in `dtype` on one thread (the caller's thread count restored). A call
    past `enough_ms` ends the measurement with that call's time (an emulating CPU takes seconds per call)."""
    import torch
    m, k, n = SHAPE
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(m, k, generator=g).to(dtype), torch.randn(k, n, generator=g).to(dtype)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        times = []
        for _ in range(reps + 1):                      # the first call (kernel selection, caches) is not counted
            t0 = time.perf_counter()
            a @ b
            times.append((time.perf_counter() - t0) * 1e3)
            if times[-1] > enough_ms:
                return times[-1]
    finally:
        torch.set_num_threads(threads)
    times = sorted(times[1:])
    return times[len(times) // 2]


def fastest_dtype(device: str = "cpu", refresh: bool = False) -> DtypeChoice:
    """The format `train.dtype: auto` stands for here (see the module docstring)."""
    import torch
    if device == "cuda":
        ok = not torch.cuda.is_available() or torch.cuda.is_bf16_supported()   # a driver without a GPU: Ampere on
        return DtypeChoice("bfloat16" if ok else "float32", None, None, "cuda")  # (A100-class clusters) assumed
    key = f"{cpu_model()} | torch {torch.__version__}"
    path = cache_path()
    try:
        entries = json.loads(path.read_text())
    except (OSError, ValueError):
        entries = {}
    if key in entries and not refresh:
        return DtypeChoice(**{**entries[key], "how": "cached"})
    fp32 = matmul_ms(torch.float32)
    bf16 = matmul_ms(torch.bfloat16, enough_ms=5 * fp32)
    choice = DtypeChoice(choose(fp32, bf16), round(fp32, 2), round(bf16, 2), "measured")
    try:                                               # atomic: two drivers starting at once never read half a file
        path.parent.mkdir(parents=True, exist_ok=True)
        entries[key] = asdict(choice)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(entries, indent=1))
        tmp.replace(path)
    except OSError:
        pass                                           # a read-only home: measured again next time
    return choice
