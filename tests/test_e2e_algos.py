"""The algorithm set end to end on the real actor machinery (Ray, DeepSpeed ZeRO over gloo, the vLLM CPU
engine): GRPO on rule, remote and LLM-judge rewards with no reward model and no critic; the adaptive KL
controller steering toward its target. (PPO with LoRA adapters runs in test_e2e_placement.py, in the colocated
layout's run.) Slow."""
import contextlib
import io
import json
import math
import os
import re
import signal
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import ray
import torch

from conftest import HYBRID, tiny_overrides
from launch import reaper
from launch.answers import Judge, Sampler
from launch.label import main as label_main
from launch.pipeline import label
from launch.rounds import JudgeLabels
from launch.ppo import train
from rlhf_ray.config import load_config
from rlhf_ray.judge import (comparison_pairs, expected_score, pair_verdict, pairwise_text, pointwise_text,
                             rank_answers)
from rlhf_ray.models import load_causal_lm, load_tokenizer
from rlhf_ray.tiny_world.gold import gold_score

pytestmark = pytest.mark.slow


def read_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def mean(xs):
    return sum(xs) / len(xs)


class LengthScorer(BaseHTTPRequestHandler):
    """A remote scorer on loopback: 0.1 per character of each response."""
    requests = 0

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        LengthScorer.requests += 1
        payload = json.dumps({"rewards": [0.1 * len(r) for r in body["responses"]]}).encode()
        self.send_response(200)
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


def kill_the_judge_after(metrics, step: int, seen: list[str]) -> None:
    """Once `step` rows are logged: keep them, then SIGKILL this test's judge engine, the one process titled
    ray::Engine below this process (the cluster is this pytest worker's; the policy's engine lives in a RoleHost)."""
    deadline = time.time() + 600
    while time.time() < deadline:
        text = metrics.read_text() if metrics.exists() else ""
        if text.endswith("\n") and len(text.splitlines()) >= step:
            seen.extend(text.splitlines()[:step])
            judges = reaper.actor_processes(list(reaper.descendants(os.getpid())), "Engine")
            assert len(judges) == 1, judges
            os.kill(judges[0], signal.SIGKILL)
            return
        time.sleep(0.2)


def strip_timing(row: dict) -> dict:
    return {k: v for k, v in row.items() if not k.startswith(("time/", "perf/", "fault/")) and k != "judge/answers_per_s"}


def test_grpo_on_rule_remote_and_judge_rewards_with_no_reward_model_and_no_critic(tiny_world, tmp_path):
    """Four sources weighted: a rule, an HTTP scorer, a rule reading a row field, and an LLM judge on an engine of
    its own (here the tiny policy's own base model asked to rate, pointwise: a wiring check, not a good judge). The
    loss is GSPO's (ppo.ratio_level sequence: one clipped ratio per answer), over 2 epochs of 2 minibatches.
    The judge's engine is killed after step 3: the run replaces it and, with no checkpoint yet, replays from step
    1, which must give the same rows as before the kill. Then the pipeline's label stage ranks K answers per prompt
    with the same judge engine, pairwise in both orders, as HF's verdicts would, and `rlhf-ray label` (judge
    engines of its own) ranks those answers the same."""
    srv = ThreadingHTTPServer(("127.0.0.1", 0), LengthScorer)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{srv.server_address[1]}/score"
    run_dir = tmp_path / "run"
    prompts = tmp_path / "prompts.jsonl"                               # rows with a reference answer each
    prompts.write_text("".join(json.dumps({"prompt": json.loads(line)["prompt"], "answer": "the"}) + "\n"
                               for line in open(tiny_world["prompts"])))
    sources = ('[{kind: function, path: "rlhf_ray.tiny_world.gold:tiny_gold", weight: 1.0},'
               f' {{kind: http, path: "{url}", weight: 0.1, batch_size: 16}},'
               ' {kind: function, path: "rlhf_ray.rule_rewards:contains_answer", weight: 0.2},'
               ' {kind: judge, weight: 0.05}]')
    cfg = load_config("configs/tiny_ppo.yaml", tiny_overrides(tiny_world, run_dir) + [
        "models.reward=", f"reward.sources={sources}", f"data.prompts={prompts}", "data.reward_keys=[answer]",
        "reward.num_ranks=2", "placement.share_process=[[engine, reference]]",   # the judge: the one ray::Engine
        "ppo.advantage=grpo", "generation.n=4", "generation.prompts_per_step=8", "ppo.minibatch_size=16",
        "ppo.kl_placement=loss", "ppo.kl_estimator=k3", "ppo.kl_coef=0.01", "ppo.loss_agg=seq-mean-token-mean",
        "ppo.ratio_level=sequence", "ppo.clip=null", "policy.lr=1e-3", "train.steps=12",
        f"judge.model={tiny_world['policy']}", "judge.score_labels=['1','2','3','4','5']", "judge.batch_size=8",
        "judge.max_pairs=5"])                                          # (the label stage's, below: 5 of 6 pairs)
    before: list[str] = []
    killer = threading.Thread(target=kill_the_judge_after, args=(run_dir / "metrics.jsonl", 3, before), daemon=True)
    killer.start()
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        summary = train(cfg, keep_actors=True)
    killer.join(timeout=1)
    actors = summary["actors"]
    try:
        assert actors.critic is None                                   # no critic actor was created
        died = [line for line in out.getvalue().splitlines() if " died (" in line]
        assert len(died) == 1 and ": judge rank 0 died (" in died[0] and "replaying from step 1 " in died[0], died
        failed_at = int(died[0].split(":")[0].split()[1])
        rows = read_metrics(run_dir)
        replayed = [json.loads(line) for line in before]
        assert [strip_timing(r) for r in rows[:3]] == [strip_timing(r) for r in replayed]   # as if nothing happened
        assert len(rows) == 12 and all("value/loss" not in r for r in rows)
        assert all(math.isfinite(r["policy/kl_loss"]) and r["policy/kl_loss"] >= 0 for r in rows)   # k3 >= 0
        assert max(r["rollout/logprob_diff_max"] for r in rows) < 1e-3
        # GSPO's clip (3e-4 / 4e-4 on the sequence ratio) acts from each step's second minibatch on
        assert all(math.isfinite(r["policy/loss"]) for r in rows) and max(r["policy/clipfrac"] for r in rows) > 0
        # every source scored in the reward actor's two ranks (16 responses each a step, one request each),
        # the row field reached the rule, and the sources were weighted
        # (steps 1 .. failed_at - 1 and failed_at's own request before its judge call, then all 12 again)
        assert LengthScorer.requests == 2 * failed_at + 12 * 2
        for r in rows:
            total = (r["reward/source0_function_mean"] + 0.1 * r["reward/source1_http_mean"]
                     + 0.2 * r["reward/source2_function_mean"] + 0.05 * r["reward/source3_judge_mean"])
            assert r["reward/score_mean"] == pytest.approx(total, rel=1e-4, abs=1e-5)
            # the judge scored all 32 answers a step (8 prompts x 4), in calls of 8, none failed; its expected
            # score lies within the labels' values, and some of its next-token mass sat on them
            assert (r["judge/answers"], r["judge/fallbacks"], r["judge/retries"]) == (32, 0, 0), r
            assert 1 <= r["reward/source3_judge_mean"] <= 5 and 0 < r["judge/label_mass_mean"] <= 1, r
            assert r["judge/answers_per_s"] > 0 and r["time/busy/judge"] > 0
        # the judge's engine holds the judge's own weights (never synced): its label logprobs are the HF model's
        judge, tok = load_causal_lm(tiny_world["policy"]), load_tokenizer(tiny_world["policy"])
        ids = tok("Rate: the cat sat", add_special_tokens=False)["input_ids"]
        labels = [tok(str(d), add_special_tokens=False)["input_ids"][0] for d in range(1, 6)]
        got = torch.tensor(ray.get(actors.judge.actors[0].label_logprobs.remote([ids], labels))[0])
        with torch.no_grad():
            want = torch.log_softmax(judge(torch.tensor([ids])).logits[0, -1], -1)[labels]
        assert (got - want).abs().max().item() < 1e-4, (got, want)

        # the label stage's judge on the same engine: K answers per prompt (sampled by the trained policy's engine)
        # ranked from pairwise verdicts asked in both orders; the strengths are what HF's verdicts give
        few = tmp_path / "label_prompts.jsonl"
        few.write_text("".join(open(tiny_world["prompts"]).readlines()[:4]))
        labelled = label(cfg, Sampler(actors.engines[0], tiny_world["policy"]), tok,
                         JudgeLabels(Judge(cfg, actors.judge.actors), gold_score), str(few),
                         tmp_path / "label_rankings.jsonl", 7)
        path, agreed = labelled["path"], labelled["report"]
        ranked = [json.loads(line) for line in open(path)]
        assert ranked and path.endswith("label_rankings.jsonl")
        fmt = cfg.judge_format()
        verdict_ids = [tok(v, add_special_tokens=False)["input_ids"][0] for v in fmt.verdict_labels]
        for r in ranked:
            k = len(r["responses"])
            assert sorted(r["ranking"]) == list(range(k)) and (k, r["judge_pairs"]) == (4, 5)
            assert r["ranking"] == sorted(range(k), key=lambda i: (-r["judge_strengths"][i], i))
            assert 0 <= r["judge_flips"] <= r["judge_pairs"]
        r = ranked[0]
        hf = {}
        for a, b in comparison_pairs(len(r["responses"]), 5, 7):      # the first row's: seed 7 + row 0
            lps = []
            for x, y in ((a, b), (b, a)):
                ids = tok(pairwise_text(fmt, r["prompt"], r["responses"][x], r["responses"][y]),
                          add_special_tokens=False)["input_ids"]
                with torch.no_grad():
                    lps.append(torch.log_softmax(judge(torch.tensor([ids])).logits[0, -1], -1)[verdict_ids].tolist())
            hf[(a, b)] = pair_verdict(*lps)
        assert rank_answers(len(r["responses"]), hf).strengths == pytest.approx(r["judge_strengths"], abs=1e-3)
        # each verdict kept in the row, both orders, as HF's
        assert [tuple(v[:2]) for v in r["judge_verdicts"]] == sorted(hf)
        for a, b, p_first, p_second in r["judge_verdicts"]:
            assert (p_first, p_second) == pytest.approx((hf[(a, b)].p_first, hf[(a, b)].p_second), abs=1e-3)
        # the judge against gold on these answers: counted over every compared pair, flips as the rows say
        assert agreed["pairs"] == sum(x["judge_pairs"] for x in ranked)
        assert agreed["flip_rate"] == pytest.approx(sum(x["judge_flips"] for x in ranked) / agreed["pairs"])
        # ... and its accuracies are the rows' verdicts against gold, recounted here by hand (the judge here is the
        # policy's base, no good judge: what is checked is the count, not a level)
        right, decided = {"first": 0.0, "second": 0.0, "averaged": 0.0}, 0
        for x in ranked:
            gold = [gold_score(a) for a in x["responses"]]
            for a, b, p_first, p_second in x["judge_verdicts"]:
                if gold[a] != gold[b]:
                    decided += 1
                    for key, p in (("first", p_first), ("second", p_second), ("averaged", (p_first + p_second) / 2)):
                        right[key] += 0.5 if p == 0.5 else float((p > 0.5) == (gold[a] > gold[b]))
        assert decided > 0 and agreed["pairs_gold_differs"] == decided, (agreed, decided)
        for key, n in right.items():
            assert agreed[f"pair_acc_{key}"] == pytest.approx(n / decided), (key, agreed)
        # pointwise: the judge's expected scores for the same answers, asked of the HF model (the engine's agree to
        # ~1e-4, so one near-tied pair may order the other way: one pair's worth of slack)
        score_ids = [tok(s, add_special_tokens=False)["input_ids"][0] for s in fmt.score_labels]
        point = 0.0
        for x in ranked:
            gold = [gold_score(a) for a in x["responses"]]
            with torch.no_grad():
                score = [expected_score(torch.log_softmax(judge(torch.tensor(
                    [tok(pointwise_text(fmt, x["prompt"], a), add_special_tokens=False)["input_ids"]])).logits[0, -1],
                    -1)[score_ids].tolist(), fmt.score_values).score for a in x["responses"]]
            for a, b, _, _ in x["judge_verdicts"]:
                if gold[a] != gold[b]:
                    d = score[a] - score[b]
                    point += 0.5 if d == 0 else float((d > 0) == (gold[a] > gold[b]))
        assert abs(agreed["pair_acc_pointwise"] - point / decided) <= 1 / decided + 1e-9, (agreed, point / decided)

        # `rlhf-ray label` on those answers, with judge engines of its own (on this cluster), ranks them the same
        sets = [f"label.responses={path}", f"label.output={tmp_path / 'cli' / 'ranked.jsonl'}", "run.seed=7",
                f"judge.model={tiny_world['policy']}", "judge.score_labels=['1','2','3','4','5']", "judge.max_pairs=5",
                "reward.sources=[]", f"models.policy={tiny_world['policy']}", "logging.wandb.enabled=false"]
        assert label_main(["--config", "configs/tiny_grpo.yaml", *[a for s in sets for a in ("--set", s)]]) == 0
        again = [json.loads(line) for line in open(tmp_path / "cli" / "ranked.jsonl")]
        assert [a["ranking"] for a in again] == [r["ranking"] for r in ranked]
        for a, r in zip(again, ranked):
            assert a["judge_strengths"] == pytest.approx(r["judge_strengths"], abs=1e-6)
        assert 0 < mean([r["reward/source2_function_mean"] for r in rows]) < 1
        first = mean([r["reward/source0_function_mean"] for r in rows[:3]])
        last = mean([r["reward/source0_function_mean"] for r in rows[-3:]])
        assert last > first + 0.3, (first, last)                       # the rule reward went up
    finally:
        actors.shutdown()
        srv.shutdown()


def test_adaptive_kl_controller_steers_the_kl_toward_its_target(tiny_world, tmp_path):
    run_dir = tmp_path / "run"
    target = 1.0
    cfg = load_config("configs/tiny_ppo.yaml", tiny_overrides(tiny_world, run_dir) + [
        "ppo.kl_coef=1.0", f"ppo.kl_target={target}", "ppo.kl_horizon=1", "policy.lr=3e-4", "train.steps=14",
        *HYBRID])
    train(cfg)
    rows = read_metrics(run_dir)
    kl, coef = [r["kl/ref_per_seq"] for r in rows], [r["kl/coef"] for r in rows]
    for i in range(len(rows) - 1):        # the controller lowers beta while the KL is under target, raises it above
        assert (coef[i + 1] < coef[i]) == (kl[i] < target)
    # steered toward the target: closer over the second half than at the start, and on target there on average
    # (16 samples a step make each step's KL noisy: a single late step can sit 80 % off the target)
    early, late = mean([abs(k - target) for k in kl[:3]]), mean([abs(k - target) for k in kl[-7:]])
    assert late < early and abs(mean(kl[-7:]) - target) < 0.5 * target, (kl, coef)


def test_on_policy_distillation_pulls_the_policy_toward_a_teacher_sharing_the_frozen_roles_process(tiny_world,
                                                                                                   tmp_path):
    """configs/tiny_distill.yaml: the teacher as the only signal (distill.only: no reward source, no reward actor).
    Here a model with the world's tokenizer that learnt twenty sentences of the corpus by heart, hosted in the
    engine's and the reference's process, scores every sampled token; the policy's reverse KL to it falls over the
    steps."""
    from rlhf_ray.tiny_world.world import TinySpec, build_teacher_base, corpus_text
    sentences = [s for s in re.split(r"(?<=[.!?])\s+", corpus_text()) if " object" in s][:20]
    teacher = build_teacher_base(tiny_world["policy"], tmp_path / "teacher", TinySpec(pretrain_steps=100, seed=7),
                                 log=lambda *_: None, text="\n\n".join(sentences))
    run_dir = tmp_path / "run"
    cfg = load_config("configs/tiny_distill.yaml", tiny_overrides(tiny_world, run_dir) + [   # as shipped, but for
        f"models.teacher={teacher}", "placement.share_process=[[policy, engine, reference, teacher]]",  # test sizes
        "ppo.minibatch_size=16", "train.steps=12"])
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        train(cfg)
    assert f"teacher: {teacher}, distill.coef 1.0, gamma 0.0 (the only signal)" in out.getvalue()
    rows = read_metrics(run_dir)
    assert len(rows) == 12
    for r in rows:
        assert r["reward/score_mean"] == 0 and "time/busy/reward" not in r       # no task reward, no reward actor
        assert r["time/busy/teacher"] > 0 and r["perf/teacher_tokens_per_s"] > 0 and 0 < r["perf/teacher_share"] < 1
        assert r["distill/reverse_kl_per_seq"] > r["distill/reverse_kl_per_token"] > 0
    kl = [r["distill/reverse_kl_per_token"] for r in rows]
    assert mean(kl[-3:]) < 0.8 * mean(kl[:2]), kl                     # the student moved toward the teacher
