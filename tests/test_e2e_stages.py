"""SFT -> reward model from K-way rankings -> DPO, each on a DeepSpeed ZeRO rank group (2 ranks), each
handing its HF checkpoint to the next. Real Ray, real DeepSpeed; nothing mocked. Slow (~1 minute)."""
import math

import pytest
import torch

from conftest import tiny_overrides
from launch.stages import run_stage
from rlhf_ray.config import load_config
from rlhf_ray.models import load_causal_lm, load_scalar_model
from stage_data_fixture import write_stage_data

pytestmark = pytest.mark.slow


def stage_cfg(world, tmp_path, name, data, model, extra=()):
    o = [f"{name}.data={data}", f"{name}.model={model}", f"{name}.trainer.num_ranks=2", f"{name}.batch_size=16",
         f"{name}.trainer.micro_batch_size=8", f"{name}.eval_fraction=0.2", "logging.wandb.enabled=false", *extra]
    return load_config("configs/tiny_ppo.yaml", tiny_overrides(world, tmp_path / "run") + o)


def test_sft_then_rm_then_dpo_hand_off_checkpoints(tiny_world, tmp_path):
    data = write_stage_data(tmp_path)
    sft = run_stage(stage_cfg(tiny_world, tmp_path, "sft", data["sft"], tiny_world["policy"],
                              ["sft.epochs=2", "sft.trainer.lr=1e-3"]), "sft")
    assert sft["eval"]["loss"] < sft["eval_before"]["loss"]          # held-out loss on response tokens fell
    sft_model = load_causal_lm(sft["model"])                          # an HF directory from_pretrained opens

    rm = run_stage(stage_cfg(tiny_world, tmp_path, "rm", data["rankings"], sft["model"],
                             ["rm.epochs=2", "rm.trainer.lr=1e-3"]), "rm")
    assert all(math.isfinite(v) for v in rm["eval"].values())
    reward_model = load_scalar_model(rm["model"])                     # a scalar head on the SFT backbone
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        assert reward_model(input_ids=ids).logits.shape == (1, 1)

    dpo = run_stage(stage_cfg(tiny_world, tmp_path, "dpo", data["rankings"], sft["model"],
                              ["dpo.epochs=1", "dpo.trainer.lr=5e-4", "dpo.trainer.zero_stage=3"]), "dpo")
    assert dpo["eval_before"]["loss"] == pytest.approx(math.log(2), abs=1e-5)   # policy == reference at the start
    assert dpo["eval"]["reward_margin"] > 0
    dpo_model = load_causal_lm(dpo["model"])
    moved = max((a - b).abs().max().item() for a, b in zip(dpo_model.state_dict().values(),
                                                           sft_model.state_dict().values()))
    assert moved > 1e-4
