"""benchmarks/gpu_check.py at toy sizes on CPU, so the GPU check cannot rot between lent GPUs: the same worker
code (the policy's and critic's own DeepSpeed init, scoring pass and PPO micro-batch loop, ZeRO stages forced at
one rank, no Ray), and the bf16-vs-fp32 step. Memory figures are CUDA-only and absent here."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from launch.common import trainer_env
from rlhf_ray.config import load_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_gpu_check_runs_its_matrix_at_toy_sizes_on_cpu(tmp_path):
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--tiny", "--device", "cpu",
                        "--parallel", "2", "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    results = json.loads((tmp_path / "gpu_check.json").read_text())["results"]
    train = [r for r in results if r["kind"] == "train"]
    assert [(r["role"], r["ds_stage"]) for r in train] == [("policy", 0), ("policy", 3), ("critic", 2)]
    assert [r["optimizer"] for r in train] == ["FP16_UnfusedOptimizer", "DeepSpeedZeroOptimizer_Stage3",
                                               "DeepSpeedZeroOptimizer"]        # bf16 at each stage, as DeepSpeed runs it
    for r in train:
        assert len(r["losses"]) == 4 and r["tokens_per_s"] > 0 and r["peak_allocated"] is None
    # the same weights, batch and seeds: ZeRO-3's partitioned step gives stage 0's losses
    assert train[1]["losses"] == pytest.approx(train[0]["losses"], abs=1e-3)
    compare = next(r for r in results if r["kind"] == "compare")
    assert compare["grad_cosine"] > 0.999 and compare["grad_rel_error"] < 0.05
    assert 0 < compare["logprob_max_abs_diff"] < 0.05
    assert "| tiny policy ZeRO-3 ckpt on micro 2 |" in (tmp_path / "gpu_check.md").read_text()


def test_trained_roles_get_the_allocator_setting_on_cuda_only():
    cfg = load_config(None, [])
    assert trainer_env(cfg, "cuda")["env_vars"]["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    assert "PYTORCH_CUDA_ALLOC_CONF" not in trainer_env(cfg, "cpu")["env_vars"]
    off = load_config(None, ["train.cuda_alloc_conf=null"])
    assert "PYTORCH_CUDA_ALLOC_CONF" not in trainer_env(off, "cuda")["env_vars"]
