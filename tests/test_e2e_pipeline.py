"""The tiny-world pipeline end to end with small counts: every stage on the real actor machinery (Ray,
DeepSpeed ZeRO over 2 ranks, vLLM), each handing its HF checkpoint to the next (SFT -> reward model from K-way
rankings -> PPO, and DPO at ZeRO-3), in two rounds, killed in the second and resumed; SFT, the reward model and DPO
learned on held-out data, PPO and DPO moved away from SFT; summary, leaderboard, curves and gold monitor written;
the two rounds labelled by people at the labelling page. One pass (pipeline.rounds 1, the first command's) runs in
the judge test, with KTO on thumbs beside DPO. Slow."""
import json
import math
import random
import threading
import time
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from launch.pipeline import rm_gold_accuracy, run_pipeline
from rlhf_ray.config import load_config
from rlhf_ray.label_store import LabelStore
from rlhf_ray.models import load_causal_lm, load_scalar_model
from rlhf_ray.tiny_world.judge import TinyJudgeSpec, agreement_in_process, build_tiny_judge, unseen_answers

pytestmark = pytest.mark.slow

MONITOR_GOLD_BAR = 0.53
JUDGE_BARS = {"averaged": 0.72, "pointwise": 0.75}         # each bar: 3 sd under a measured mean (see the test)
JUDGE_CORPUS_BARS = {"averaged": 0.74, "pointwise": 0.79}   # likewise
JUDGE_SEED = 1                                              # its judge passes validation at once (see the test)
# the judge test's trainers on one rank each (ZeRO over two ranks runs in the two-round test): fewer processes to
# start on a 2-core box that runs two tests at once
ONE_RANK = [f"{role}.num_ranks=1" for role in ("sft.trainer", "rm.trainer", "dpo.trainer", "kto.trainer", "policy")]
ONE_RANK += ["placement.share_process=[[policy, engine, reference, reward]]"]     # PPO in the hybrid layout


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


class People:
    """People at the labelling page the pipeline serves (pipeline.labels human): a thread of simulated labelers (two
    honest, one careless on half its rankings) who each take tasks through the page's own HTTP API (GET /api/next,
    POST /api/label, a bearer token each) and rank the answers in the order the page shows them. The page's address
    is taken from start_page as the pipeline starts it (again after a resume)."""

    def __init__(self, monkeypatch, db: Path):
        import launch.label_server as ls
        from rlhf_ray.label_store import LabelStore
        from rlhf_ray.tiny_world.gold import GOLDS, SimulatedLabeler
        store = LabelStore(db)
        gold = GOLDS["topic"]
        self.labelers = {lab.name: (lab, store.add_labeler(lab.name)) for lab in [
            SimulatedLabeler("a", 0.15, "none", 0.0, gold), SimulatedLabeler("b", 0.15, "none", 0.0, gold),
            SimulatedLabeler("careless", 0.15, "careless", 0.5, gold)]}
        self.url, self.stop, self.labelled, self.errors = None, threading.Event(), 0, []
        real = ls.start_page

        def start_page(store, host_port):
            page = real(store, host_port)
            self.url = page.url
            return page
        monkeypatch.setattr(ls, "start_page", start_page)
        self.thread = threading.Thread(target=self.work, daemon=True)
        self.thread.start()

    def work(self):
        import httpx
        rng = random.Random(0)
        client, url = None, None                    # one connection, kept (as a browser keeps one)
        while not self.stop.is_set():
            busy = False
            try:
                if self.url != url:
                    client, url = httpx.Client(base_url=self.url, timeout=10), self.url
                for lab, token in self.labelers.values():
                    if url is None:
                        break
                    h = {"Authorization": f"Bearer {token}"}
                    task = client.get("api/next", headers=h).json()["task"]
                    if task is not None:
                        order = lab.rank(task["answers"], rng)          # positions as shown, best first
                        r = client.post("api/label", headers=h,
                                        json={"task": task["task"], "tiers": [[p] for p in order]})
                        assert r.status_code == 200, r.text
                        self.labelled += 1
                        busy = True
            except httpx.TransportError:            # the page between a kill and a resume
                pass
            except Exception as e:                  # noqa: BLE001  (reported by the test)
                self.errors.append(repr(e))
                return
            if not busy:
                time.sleep(0.05)

    def close(self):
        self.stop.set()
        self.thread.join(10)


class Killed(Exception):
    """Stands for the driver dying mid-round (in process: the real SIGKILL of a PPO driver is test_e2e_faults')."""


def test_pipeline_in_two_rounds_labelled_by_people_at_the_page_killed_mid_round_and_resumed(tiny_world, tmp_path,
                                                                                            monkeypatch):
    """pipeline.rounds 2 with audits every step: round 2 labels the round-1 policy's answers (its own prompts, fewer by
    the audit rankings, which join the RM's data), retrains the RM from the SFT model on every ranking so far, and
    continues PPO from round 1's policy with the KL still to SFT; DPO goes on as iterative DPO (round 2 from round 1's
    model on its own policy's labels, the reference SFT). The driver dies in round 2's PPO after its first step was
    checkpointed; `--resume` keeps every finished stage (their files untouched) and continues that PPO from the
    checkpoint, its drift rule fed the audits logged before the kill; the rule is made to fire at the last step (any
    audit counts as a fall), so the last round keeps its policy of step 1, the last audit the RM passed
    (pipeline.keep_trusted); the evaluation plays every round's policy. The labels, the rounds' and the audits', are
    people's at the labelling page the pipeline serves (`People`): three rank every task, their rankings aggregated
    by reliability, one of them careless; the pipeline waits for them, and after the resume finds what it queued."""
    import launch.pipeline as lp
    db = tmp_path / "labels.sqlite"
    people = People(monkeypatch, db)
    cfg = small_pipeline(tiny_world, tmp_path, ["pipeline.rounds=2", "pipeline.round_labels=40",
                                                "pipeline.audit_prompts=4", "pipeline.audit_every=1",
                                                "train.steps=4", "checkpoint.every=1", "pipeline.labels=human",
                                                f"pipeline.label_db={db}", "pipeline.people_per_task=3",
                                                "pipeline.label_page=127.0.0.1:0"])
    real = lp.ppo_train

    def dies_in_round_2(cfg, **kw):
        if cfg.run.output_dir.endswith("ppo_r2"):
            watch = kw["watch"]
            seen = watch.observe

            def observe(step, scored, metrics):
                if step == 2:
                    raise Killed()
                return seen(step, scored, metrics)
            watch.observe = observe
        return real(cfg, **kw)

    monkeypatch.setattr(lp, "ppo_train", dies_in_round_2)
    with pytest.raises(Killed):
        run_pipeline(cfg)
    run = tmp_path / "run"
    state = json.loads((run / "pipeline_state.json").read_text())["done"]
    assert {"sft", "label", "label_monitor", "rm_monitor", "rm", "ppo", "dpo", "label_r2", "label_dpo_r2",
            "rm_r2"} == set(state)
    kept = {d: (run / d / "model.safetensors").stat().st_mtime for d in ("sft", "rm", "dpo", "rm_r2")}

    def drifts_in_round_2(cfg, **kw):
        if cfg.run.output_dir.endswith("ppo_r2"):
            kw["watch"].check.drop = -1.0          # the resumed step 2's audit against step 1's (replayed) fires
        return real(cfg, **kw)
    monkeypatch.setattr(lp, "ppo_train", drifts_in_round_2)
    s = run_pipeline(cfg, resume=True)
    assert {d: (run / d / "model.safetensors").stat().st_mtime for d in kept} == kept      # not redone
    r2 = [json.loads(line) for line in (run / "ppo_r2" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in r2] == [1, 2]                 # step 1 from before the kill, step 2 after the resume
    assert all("audit/accuracy" in r and 0 <= r["audit/accuracy"] <= 1 and "audit/gold_accuracy" in r for r in r2)
    rounds = s["rounds"]
    assert [x["round"] for x in rounds] == [1, 2] and [x["ppo_steps"] for x in rounds] == [2, 2]
    assert rounds[0]["kept"] is None and rounds[1]["kept"] == 1 and "drifted" in rounds[1]["stopped"]
    assert s["models"]["ppo"] == str(run / "ppo_r2" / "checkpoints" / "step_000001" / "policy")
    # rankings made: a prompt whose K answers are not all distinct is passed over (answer_sets), so up to the count
    assert 120 < rounds[0]["labels"] <= 128 and rounds[0]["audit_labels"] == 2 * 4     # 4 rankings an audit, 2 steps
    assert 28 < rounds[1]["labels"] <= 40 - 8 and 36 < rounds[1]["dpo_labels"] <= 40
    assert s["labels_used"] == {"ppo": rounds[0]["labels"] + 8 + rounds[1]["labels"] + 8,
                                "dpo": rounds[0]["labels"] + rounds[1]["dpo_labels"]}
    rm2 = [json.loads(line) for line in (run / "data" / "rm_r2_rankings.jsonl").read_text().splitlines()]
    assert len(rm2) == rounds[0]["labels"] + 8 + rounds[1]["labels"]          # scratch: every ranking so far
    assert sum(len(r["responses"]) == cfg.generation.n for r in rm2) == 8     # the audits' (n answers, not K)
    ppo2 = load_config(str(run / "ppo_r2" / "config.yaml"))
    assert ppo2.models.reference == s["models"]["sft"] and ppo2.models.policy == s["models"]["ppo_r1"]
    assert ppo2.models.reward == str(run / "rm_r2")
    dpo2 = s["held_out"]["dpo"]
    assert dpo2["before"]["loss"] != pytest.approx(math.log(2), abs=1e-3)     # round 1's model against SFT's
    assert "| round | labels (fresh + audit) |" in (run / "summary.md").read_text()
    pool = s["labeler_pool"]            # the careless labeler found from the labels alone, in the pipeline
    assert min(pool["reliability"], key=pool["reliability"].get) == "careless" and pool["weighed"], pool
    audits = [json.loads(line) for line in (run / "data" / "audit_r2_rankings.jsonl").read_text().splitlines()]
    assert audits and all(set(r["labels"]) == {"a", "b", "careless"} for r in audits)   # people audit too
    people.close()
    queue = LabelStore(db).progress()
    assert people.errors == [] and queue["done"] == queue["tasks"] and people.labelled == 3 * queue["tasks"], (
        people.errors, queue, people.labelled)
    assert_stages_learned(s, run, cfg)


def assert_stages_learned(s: dict, run, cfg):
    """Each stage learned and handed on: the one-pass pipeline's checks, on round 1's stages (and the last DPO)."""
    held = s["held_out"]
    assert held["sft"]["after"]["loss"] < held["sft"]["before"]["loss"]     # response-token loss fell
    rm1 = json.loads((run / "pipeline_state.json").read_text())["done"]["rm"]
    # the reward model learned the rankings: its held-out pairwise accuracy (about 19 rankings of 8, 500 pairs) over
    # 0.6 and over the untrained head's (its held-out loss at this size may rise as its margins grow: 0.69 -> 0.73
    # here, at accuracy 0.67)
    assert rm1["eval"]["accuracy"] > max(0.6, rm1["eval_before"]["accuracy"]), rm1
    # the monitor RM (32 labelled prompts) learned too: its own held-out split is 1 ranking at this size, too few to
    # say, so it is scored against gold on the RM's 128 prompts' answers (disjoint from its own). Measured 0.645 in
    # this test, and 0.567-0.667 (0.631 ± 0.040) retrained with 5 other seeds on the same rankings; the bar sits
    # 2.5 sd under that mean (chance is 0.5)
    monitor_acc = rm_gold_accuracy(run / "rm_monitor", run / "data" / "label_rankings.jsonl", cfg)
    assert monitor_acc > MONITOR_GOLD_BAR, monitor_acc
    with torch.no_grad():                                                   # a scalar head on the SFT backbone
        assert load_scalar_model(s["models"]["rm"])(input_ids=torch.tensor([[5, 6, 7]])).logits.shape == (1, 1)
    dpo1 = json.loads((run / "pipeline_state.json").read_text())["done"]["dpo"]
    assert dpo1["eval_before"]["loss"] == pytest.approx(math.log(2), abs=1e-5)   # policy == reference at first
    assert dpo1["eval"]["reward_margin"] > 0
    sft_w, dpo_w = (load_causal_lm(m).state_dict() for m in (s["models"]["sft"], s["models"]["dpo_r1"]))
    assert max((dpo_w[k] - v).abs().max().item() for k, v in sft_w.items()) > 1e-4     # ZeRO-3 DPO moved it
    assert set(s["eval"]) == {"sft", "ppo_r1", "ppo", "dpo_r1", "dpo", "best_of_2", "best_of_4"}
    for name, r in s["eval"].items():
        assert all(math.isfinite(v) for v in r.values()), (name, r)
    assert s["eval"]["ppo"]["kl_to_sft"] > 0 and s["eval"]["dpo"]["kl_to_sft"] > 0   # both moved away from SFT
    board = s["leaderboard"]                # every round's policy rated from gold-decided games, best first
    assert {r["name"] for r in board} == set(s["eval"]) and len(board) == len(s["eval"])
    assert [r["rating"] for r in board] == sorted((r["rating"] for r in board), reverse=True)
    assert sum(r["elo"] for r in board) / len(board) == pytest.approx(1000.0)    # Elo's updates are zero-sum
    for r in board:
        assert all(math.isfinite(r[k]) for k in ("rating", "rating_sd", "rating_lo", "rating_hi", "elo", "win_rate")), r
        assert r["games"] > 0 and r["rating_sd"] > 0 and r["rating_lo"] <= r["rating"] <= r["rating_hi"], r
    rows = [json.loads(line) for line in (run / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all("gold/mean" in r and "monitor/score_mean" in r for r in rows)   # beside the proxy
    samples = [json.loads(line) for line in (run / "ppo" / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 2 * cfg.logging.samples_per_step
    for r in samples:        # PPO samples from the chat-rendered prompt, exactly as SFT, the RM and evaluation do
        assert r["prompt"].startswith("<|user|>\nContinue: ") and r["prompt"].endswith("\n<|assistant|>\n"), r
    assert set(s["monitor"]) == {"monitor", "proxy"} and "monitor_mean" in s["eval"]["ppo"]
    assert (run / "summary.md").read_text().startswith("| policy |")
    assert "| entry | rating ± sd |" in (run / "summary.md").read_text()
    assert json.loads((run / "summary.json").read_text())["leaderboard"][0]["name"] == board[0]["name"]
    assert (run / "ppo_curves.png").stat().st_size > 10_000
    rankings = [json.loads(line) for line in (run / "data" / "label_rankings.jsonl").read_text().splitlines()]
    assert rankings and all(sorted(r["ranking"]) == list(range(cfg.pipeline.k)) for r in rankings)
    for stage in ("sft", "rm", "dpo", "rm_r2", "dpo_r2"):
        assert (run / stage / "model.safetensors").is_file()


def test_pipeline_with_the_stand_in_judge_as_the_labeler(tiny_world, tmp_path):
    """pipeline.labels judge (RLAIF), as the first command runs it with --set pipeline.labels=judge: the world's
    stand-in judge built beside the world from no more gold-scored corpus answers than the labelers would rank
    (label_prompts x K = 1,024), saved as an HF directory and reused for the same recipe; its own engine started for
    the label stage, each prompt's K answers ranked from its pairwise verdicts in both orders, its agreement with gold
    reported; the RM learns the judge's rankings, and PPO, DPO and the evaluation run on them as on the labelers'.
    KTO (pipeline.kto) trains beside DPO on simulated users' thumbs of the same answers and is evaluated with them."""
    cfg = small_pipeline(tiny_world, tmp_path, ["pipeline.labels=judge", "pipeline.monitor_prompts=0",
                                                "judge.max_pairs=8", "train.steps=1", "pipeline.eval_prompts=8",
                                                "pipeline.best_of_n=[2]", f"run.seed={JUDGE_SEED}", "pipeline.kto=true",
                                                *ONE_RANK])
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
    # such run's answers (all 28 pairs: averaged 0.795 ± 0.024, pointwise 0.819 ± 0.023) and on the unseen corpus
    # answers (about 64 requests x 28 pairs: averaged 0.801 ± 0.021, pointwise 0.834 ± 0.013). Chance is 0.5.
    # The test's seed: one whose judge passes its validation at once (a judge built twice costs ~70 s more). This
    # test at seeds 1, 2, 3, 7 (2026-12-06, its trainers then on two ranks; the judge built once, once, once,
    # twice): here 0.800 / 0.800, 0.765 / 0.818, 0.722 / 0.769, 0.768 / 0.797; unseen 0.803 / 0.839, 0.782 / 0.821,
    # 0.769 / 0.829, 0.774 / 0.769.
    assert j["pair_acc_averaged"] > JUDGE_BARS["averaged"] and j["pair_acc_pointwise"] > JUDGE_BARS["pointwise"], j
    unseen = agreement_in_process(judge_dir, cfg.judge_format(), *unseen_answers(spec, 800, 8, 12345))
    assert unseen["pairs_gold_differs"] > 1200, unseen
    assert (unseen["pair_acc_averaged"] > JUDGE_CORPUS_BARS["averaged"]
            and unseen["pair_acc_pointwise"] > JUDGE_CORPUS_BARS["pointwise"]), unseen
    held = s["held_out"]
    assert held["rm"]["after"]["loss"] < held["rm"]["before"]["loss"], held       # the RM learned the judge's order
    # KTO (pipeline.kto) on simulated users' thumbs of the label stage's answers: it learned them on held-out
    # prompts (the implicit reward of thumbs up above that of thumbs down, further apart than before)
    thumbs = [json.loads(line) for line in (run / "data" / "label_thumbs.jsonl").read_text().splitlines()]
    assert len(thumbs) == len(rankings) * cfg.pipeline.k and 0.3 < sum(t["label"] for t in thumbs) / len(thumbs) < 0.7
    k = held["kto"]
    assert k["after"]["loss"] < k["before"]["loss"] and (
        k["after"]["reward_desirable"] - k["after"]["reward_undesirable"]
        > k["before"]["reward_desirable"] - k["before"]["reward_undesirable"]), k
    assert set(s["eval"]) == {"sft", "ppo", "dpo", "kto", "best_of_2"}
    assert s["eval"]["ppo"]["kl_to_sft"] > 0 and (run / "summary.md").is_file()
