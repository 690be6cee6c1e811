"""The tiny-world pipeline end to end with small counts: every stage on the real actor machinery (Ray,
DeepSpeed ZeRO over 2 ranks, vLLM), each handing its HF checkpoint to the next (SFT -> reward model from K-way
rankings -> PPO, and DPO at ZeRO-3); SFT, the reward model and DPO learned on held-out data, PPO and DPO moved
away from SFT; summary, leaderboard, curves and gold monitor written. Slow."""
import json
import math
from dataclasses import asdict

import pytest
import torch

from launch.pipeline import rm_gold_accuracy, run_pipeline
from rlhf_ray.config import load_config
from rlhf_ray.models import load_causal_lm, load_scalar_model
from rlhf_ray.tiny_world.judge import TinyJudgeSpec, agreement_in_process, build_tiny_judge, unseen_answers

pytestmark = pytest.mark.slow

MONITOR_GOLD_BAR = 0.53
JUDGE_BARS = {"averaged": 0.72, "pointwise": 0.75}         # each bar: 3 sd under a measured mean (see the test)
JUDGE_CORPUS_BARS = {"averaged": 0.74, "pointwise": 0.79}   # likewise


def small_pipeline(tiny_world, tmp_path, extra=()):
    """configs/tiny_world.yaml at test size on a copy of the session's pretrained world."""
    world = str(tmp_path / "world")
    import shutil
    shutil.copytree(str(tiny_world["policy"]).rsplit("/", 1)[0], world)     # reuse the session's pretrained base
    return load_config("configs/tiny_world.yaml", [
        f"run.output_dir={tmp_path / 'run'}", f"pipeline.world_dir={world}", "logging.wandb.mode=offline",
        "pipeline.sft_examples=128", "pipeline.label_prompts=128", "pipeline.monitor_prompts=32", "pipeline.ppo_prompts=64",
        "pipeline.eval_prompts=16", "pipeline.best_of_n=[2,4]", "sft.epochs=1", "dpo.epochs=1",
        "dpo.trainer.zero_stage=3",
        "train.steps=3", "generation.prompts_per_step=8", "ppo.minibatch_size=16",
        "placement.share_process=[[engine, reference, reward]]", *extra])     # PPO: two processes fewer to start


def test_pipeline_small(tiny_world, tmp_path):
    cfg = small_pipeline(tiny_world, tmp_path)
    s = run_pipeline(cfg)
    run = tmp_path / "run"
    held = s["held_out"]
    assert held["sft"]["after"]["loss"] < held["sft"]["before"]["loss"]     # response-token loss fell
    # the reward model learned the rankings (128 labelled prompts: with 48 its held-out loss did not fall)
    assert held["rm"]["after"]["loss"] < held["rm"]["before"]["loss"] and held["rm"]["after"]["accuracy"] > 0.6, held
    # the monitor RM (32 labelled prompts) learned too: its own held-out split is 1 ranking at this size, too few to
    # say, so it is scored against gold on the RM's 128 prompts' answers (disjoint from its own). Measured 0.645 in
    # this test, and 0.567-0.667 (0.631 ± 0.040) retrained with 5 other seeds on the same rankings; the bar sits
    # 2.5 sd under that mean (chance is 0.5)
    monitor_acc = rm_gold_accuracy(run / "rm_monitor", run / "data" / "label_rankings.jsonl", cfg)
    assert monitor_acc > MONITOR_GOLD_BAR, monitor_acc
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


def test_pipeline_with_the_stand_in_judge_as_the_labeler(tiny_world, tmp_path):
    """pipeline.labels judge (RLAIF), as the first command runs it with --set pipeline.labels=judge: the world's
    stand-in judge built beside the world from no more gold-scored corpus answers than the labelers would rank
    (label_prompts x K = 1,024), saved as an HF directory and reused for the same recipe; its own engine started for
    the label stage, each prompt's K answers ranked from its pairwise verdicts in both orders, its agreement with gold
    reported; the RM learns the judge's rankings, and PPO, DPO and the evaluation run on them as on the labelers'."""
    cfg = small_pipeline(tiny_world, tmp_path, ["pipeline.labels=judge", "pipeline.monitor_prompts=0",
                                                "judge.max_pairs=8", "train.steps=1", "pipeline.eval_prompts=8",
                                                "pipeline.best_of_n=[2]"])
    s = run_pipeline(cfg)
    run, world = tmp_path / "run", tmp_path / "world"
    judge_dir = world / "judge"
    spec = TinyJudgeSpec(examples=128 * 8, seed=cfg.run.seed)
    assert s["labels"] == "judge" and "judge" in s["seconds"]
    assert json.loads((judge_dir / "judge_recipe.json").read_text())["spec"] == asdict(spec)
    stamp = (judge_dir / "model.safetensors").stat().st_mtime
    assert build_tiny_judge(str(world), cfg.judge_format(), spec) == str(judge_dir)      # the same recipe: reused
    assert (judge_dir / "model.safetensors").stat().st_mtime == stamp
    assert load_config(str(run / "config.yaml")).judge.model == str(judge_dir)          # what the label stage asked
    rankings = [json.loads(line) for line in (run / "data" / "label_rankings.jsonl").read_text().splitlines()]
    assert len(rankings) > 120 and all(r["judge_pairs"] == cfg.judge.max_pairs for r in rankings)   # (K distinct)
    j = s["judge_eval"]
    assert j["pairs"] == len(rankings) * cfg.judge.max_pairs and j["pairs_gold_differs"] > 0.6 * j["pairs"], j
    # The judge against gold, on the label stage's answers (the SFT policy's, which it never saw while learning; here
    # 8 pairs a prompt, the cycle through all 8 answers) and on corpus answers sharing no run of 4 words with its own.
    # Bars: 3 sd under the mean of 6 judges of this spec (seeds 0-5, one thread, 2026-12-06), each measured on one
    # such run's answers (all 28 pairs: averaged 0.795 ± 0.024, pointwise 0.819 ± 0.023; this seed's own judge in
    # the run 0.822 / 0.805 on 16 pairs a prompt) and on the
    # unseen corpus answers (about 64 requests x 28 pairs: averaged 0.801 ± 0.021, pointwise 0.834 ± 0.013; this
    # seed's 0.801 / 0.803). Chance is 0.5.
    assert j["pair_acc_averaged"] > JUDGE_BARS["averaged"] and j["pair_acc_pointwise"] > JUDGE_BARS["pointwise"], j
    unseen = agreement_in_process(judge_dir, cfg.judge_format(), *unseen_answers(spec, 800, 8, 12345))
    assert unseen["pairs_gold_differs"] > 1200, unseen
    assert (unseen["pair_acc_averaged"] > JUDGE_CORPUS_BARS["averaged"]
            and unseen["pair_acc_pointwise"] > JUDGE_CORPUS_BARS["pointwise"]), unseen
    held = s["held_out"]
    assert held["rm"]["after"]["loss"] < held["rm"]["before"]["loss"], held       # the RM learned the judge's order
    assert set(s["eval"]) == {"sft", "ppo", "dpo", "best_of_2"}
    assert s["eval"]["ppo"]["kl_to_sft"] > 0 and (run / "summary.md").is_file()
