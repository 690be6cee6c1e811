"""The tiny-world pipeline end to end with small counts: every stage on the real actor machinery (Ray,
DeepSpeed ZeRO over 2 ranks, vLLM), each handing its HF checkpoint to the next (SFT -> reward model from K-way
rankings -> PPO, and DPO at ZeRO-3); SFT, the reward model and DPO learned on held-out data, PPO and DPO moved
away from SFT; summary, leaderboard, curves and gold monitor written. Slow."""
import json
import math

import pytest
import torch

from launch.pipeline import run_pipeline
from rlhf_ray.config import load_config
from rlhf_ray.models import load_causal_lm, load_scalar_model

pytestmark = pytest.mark.slow


def test_pipeline_small(tiny_world, tmp_path):
    world = str(tmp_path / "world")
    import shutil
    shutil.copytree(str(tiny_world["policy"]).rsplit("/", 1)[0], world)     # reuse the session's pretrained base
    cfg = load_config("configs/tiny_world.yaml", [
        f"run.output_dir={tmp_path / 'run'}", f"pipeline.world_dir={world}", "logging.wandb.mode=offline",
        "pipeline.sft_examples=128", "pipeline.label_prompts=128", "pipeline.monitor_prompts=32", "pipeline.ppo_prompts=64",
        "pipeline.eval_prompts=16", "pipeline.best_of_n=[2,4]", "sft.epochs=1", "dpo.epochs=1",
        "dpo.trainer.zero_stage=3",
        "train.steps=3", "generation.prompts_per_step=8", "ppo.minibatch_size=16",
        "placement.share_process=[[engine, reference, reward]]"])     # PPO: two processes fewer to start
    s = run_pipeline(cfg)
    run = tmp_path / "run"
    held = s["held_out"]
    assert held["sft"]["after"]["loss"] < held["sft"]["before"]["loss"]     # response-token loss fell
    # the reward model learned the rankings (128 labelled prompts: with 48 its held-out loss did not fall)
    assert held["rm"]["after"]["loss"] < held["rm"]["before"]["loss"] and held["rm"]["after"]["accuracy"] > 0.6, held
    with torch.no_grad():                                                   # a scalar head on the SFT backbone
        assert load_scalar_model(s["models"]["rm"])(input_ids=torch.tensor([[5, 6, 7]])).logits.shape == (1, 1)
    assert held["dpo"]["before"]["loss"] == pytest.approx(math.log(2), abs=1e-5)   # policy == reference at first
    assert held["dpo"]["after"]["reward_margin"] > 0
    sft_w, dpo_w = (load_causal_lm(s["models"][m]).state_dict() for m in ("sft", "dpo"))
    assert max((dpo_w[k] - v).abs().max().item() for k, v in sft_w.items()) > 1e-4     # ZeRO-3 DPO moved it
    assert set(s["eval"]) == {"sft", "ppo", "dpo", "best_of_2", "best_of_4"}
    for name, r in s["eval"].items():
        assert all(math.isfinite(v) for v in r.values()), (name, r)
    assert s["eval"]["ppo"]["kl_to_sft"] > 0 and s["eval"]["dpo"]["kl_to_sft"] > 0   # both moved away from SFT
    board = s["leaderboard"]                          # every evaluated entry rated from gold-decided games, best first
    assert {r["name"] for r in board} == set(s["eval"]) and len(board) == len(s["eval"])
    assert [r["rating"] for r in board] == sorted((r["rating"] for r in board), reverse=True)
    assert sum(r["elo"] for r in board) / len(board) == pytest.approx(1000.0)    # Elo's updates are zero-sum
    for r in board:
        assert all(math.isfinite(r[k]) for k in ("rating", "rating_sd", "rating_lo", "rating_hi", "elo", "win_rate")), r
        assert r["games"] > 0 and r["rating_sd"] > 0 and r["rating_lo"] <= r["rating"] <= r["rating_hi"], r
    rows = [json.loads(line) for line in (run / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all("gold/mean" in r and "monitor/score_mean" in r for r in rows)   # beside the proxy
    samples = [json.loads(line) for line in (run / "ppo" / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 3 * cfg.logging.samples_per_step
    for r in samples:        # PPO samples from the chat-rendered prompt, exactly as SFT, the RM and evaluation do
        assert r["prompt"].startswith("<|user|>\nContinue: ") and r["prompt"].endswith("\n<|assistant|>\n"), r
    assert set(s["monitor"]) == {"monitor", "proxy"} and "monitor_mean" in s["eval"]["ppo"]
    assert (run / "summary.md").read_text().startswith("| policy |")
    assert "| entry | rating ± sd |" in (run / "summary.md").read_text()
    assert json.loads((run / "summary.json").read_text())["leaderboard"][0]["name"] == board[0]["name"]
    assert (run / "ppo_curves.png").stat().st_size > 10_000
    rankings = [json.loads(line) for line in (run / "data" / "label_rankings.jsonl").read_text().splitlines()]
    assert rankings and all(sorted(r["ranking"]) == list(range(cfg.pipeline.k)) for r in rankings)
    for stage in ("sft", "rm", "dpo"):
        assert (run / stage / "model.safetensors").is_file()
