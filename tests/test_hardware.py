"""train.dtype auto: the faster format by a cached matmul measurement, never by CPU flags."""
import json

import pytest
import torch

from rlhf_ray import hardware
from rlhf_ray.config import load_config


def test_bf16_only_when_clearly_faster():
    assert hardware.choose(fp32_ms=22.0, bf16_ms=37.0) == "float32"      # avx512_bf16, no AMX: slower in bf16
    assert hardware.choose(fp32_ms=40.0, bf16_ms=2500.0) == "float32"    # emulated
    assert hardware.choose(fp32_ms=20.0, bf16_ms=19.0) == "float32"      # a near tie keeps fp32's precision
    assert hardware.choose(fp32_ms=20.0, bf16_ms=10.0) == "bfloat16"


def test_measured_once_then_cached_per_cpu_and_torch(tmp_path, monkeypatch):
    monkeypatch.setenv("RLHF_RAY_CACHE", str(tmp_path))
    first = hardware.fastest_dtype("cpu")
    assert first.how == "measured" and first.fp32_ms > 0 and first.bf16_ms > 0
    assert first.dtype == hardware.choose(first.fp32_ms, first.bf16_ms)
    assert "train.dtype auto: " + first.dtype in first.line() and "fp32" in first.line()
    entries = json.loads((tmp_path / "dtype.json").read_text())
    assert list(entries) == [f"{hardware.cpu_model()} | torch {torch.__version__}"]
    again = hardware.fastest_dtype("cpu")
    assert (again.how, again.dtype, again.fp32_ms) == ("cached", first.dtype, first.fp32_ms)
    (tmp_path / "dtype.json").write_text("{not json")                   # a damaged cache: measured afresh
    monkeypatch.setattr(hardware, "matmul_ms", lambda dtype, **kw: 10.0 if dtype == torch.bfloat16 else 30.0)
    remeasured = hardware.fastest_dtype("cpu")
    assert (remeasured.how, remeasured.dtype) == ("measured", "bfloat16")


def test_config_takes_auto_and_the_driver_resolves_it(tmp_path, monkeypatch, capsys):
    from launch.common import cluster_device
    monkeypatch.setenv("RLHF_RAY_CACHE", str(tmp_path))
    monkeypatch.setattr(hardware, "matmul_ms", lambda dtype, **kw: 50.0 if dtype == torch.bfloat16 else 30.0)
    cfg = load_config("configs/tiny_ppo.yaml", ["train.dtype=auto", "train.device=cpu"])
    assert cluster_device(cfg, 0) == "cpu"
    assert cfg.train.dtype in ("float32", "bfloat16")
    assert capsys.readouterr().out.startswith(f"train.dtype auto: {cfg.train.dtype} (")
    with pytest.raises(Exception, match="train.dtype"):
        load_config("configs/tiny_ppo.yaml", ["train.dtype=float16"])
