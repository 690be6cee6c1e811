"""The closed loop's pure parts: the audit's accuracy and the drift rule (rlhf_ray/drift.py), the over-optimising
world's gold, the round plan and its config checks, `extends` in configs, and the pipeline's record of finished
stages (launch/rounds.py). The loop itself runs end to end in tests/test_e2e_pipeline.py."""
import json
import random

import pytest

from launch.common import RunError
from launch.rounds import Audit, Progress, SimulatedLabels, audit_rows, gold_accuracy
from rlhf_ray.config import ConfigError, load_config
from rlhf_ray.drift import DriftCheck, monitor_disagrees, pooled_audits, ranking_accuracy, trend
from rlhf_ray.tiny_world.gold import GOLDS, gold_no_repeats, gold_score


def test_ranking_accuracy_counts_every_pair_of_the_ranking():
    assert ranking_accuracy([3.0, 2.0, 1.0], [0, 1, 2]) == (3, 3)
    assert ranking_accuracy([3.0, 2.0, 1.0], [2, 1, 0]) == (0, 3)
    # best-first [0, 1, 2] is the pairs 0>1, 0>2, 1>2; scores 1, 3, 2 get only 1>2 right
    assert ranking_accuracy([1.0, 3.0, 2.0], [0, 1, 2]) == (1, 3)
    assert ranking_accuracy([1.0, 1.0], [0, 1]) == (0, 1)              # a tie has not agreed


def test_trend_and_the_monitor_rule():
    slope, t = trend([0.0, 1.0, 2.0, 3.0])
    assert slope == pytest.approx(1.0) and t == float("inf")
    rng = random.Random(0)
    up = [0.1 * i + rng.gauss(0, 0.05) for i in range(10)]
    down = [-0.1 * i + rng.gauss(0, 0.05) for i in range(10)]
    flat = [rng.gauss(0, 0.05) for _ in range(10)]
    assert monitor_disagrees(up, down, 10)
    assert not monitor_disagrees(up, up, 10)           # both rising: they agree
    assert not monitor_disagrees(up, flat, 10)         # noise is not a fall
    assert not monitor_disagrees(up[:5], down[:5], 10)     # too few steps to say


def test_drift_check_compares_the_latest_audits_with_the_rounds_first():
    check = DriftCheck(drop=0.1, audits=2)
    check.audit(5, 60, 96)
    check.audit(10, 66, 96)                                     # the round's start: 126 / 192 = 0.656
    assert check.baseline() == pytest.approx(126 / 192) and check.fired is None
    check.audit(15, 56, 96)                                     # (66 + 56) / 192 = 0.635: a fall of 0.02
    assert check.fired is None and check.trusted is None
    check.audit(20, 48, 96)                                     # (56 + 48) / 192 = 0.542: down 0.115
    assert check.fired and "0.54" in check.fired and "0.66" in check.fired
    assert check.trusted == 10                                  # the audit before the window that fell
    first = check.fired
    check.audit(25, 96, 96)
    assert check.fired == first and check.trusted == 10         # the first reason stays
    single = DriftCheck(drop=0.1, audits=1)                     # a short round compares single audits
    single.audit(5, 60, 96), single.audit(10, 48, 96)
    assert single.fired and single.trusted == 5
    low = DriftCheck(drop=0.1, audits=2)                        # a low accuracy from the start is no drift
    for i in range(6):
        low.audit(5 * i, 55, 96)
    assert low.fired is None
    mon = DriftCheck(drop=0.1, audits=1, monitor_span=6)
    for i in range(6):
        mon.step(float(i), -float(i))
    assert mon.fired and "monitor" in mon.fired and mon.trusted is None      # no audit to go back to


def test_the_drift_rule_pools_what_a_round_has_room_for():
    assert pooled_audits(2, 45, 5) == 2                         # 9 audits: 2 at the start, 2 at the latest
    assert pooled_audits(2, 15, 5) == 1 and pooled_audits(2, 3, 5) == 1 and pooled_audits(3, 60, 5) == 3


def test_gold_accuracy_over_groups():
    # two groups of 2: the first ordered as gold, the second against it; a tie in gold is not a pair
    assert gold_accuracy([2.0, 1.0, 1.0, 2.0], [1.0, 0.0, 1.0, 0.0], 2) == 0.5
    assert gold_accuracy([2.0, 1.0], [1.0, 1.0], 2) == 0.0


def test_the_over_optimising_gold_charges_repeats_and_short_answers():
    assert GOLDS["topic"] is gold_score
    ten = "the function returns an object of the class that is given"       # 11 words: 3 topic, 1 related
    assert gold_no_repeats(ten) == pytest.approx(gold_score(ten))           # no repeat, long enough: the same
    assert gold_no_repeats("the function.") == pytest.approx(10 * 1 / 10)   # a share of at least 10 words
    rep = "object object object object object object object object object object"
    assert gold_score(rep) == pytest.approx(10.0) and gold_no_repeats(rep) == pytest.approx(10 * (1 - 9) / 10)


def test_simulated_labels_rank_by_the_configured_gold():
    rows = [{"prompt": "p", "responses": ["object object object object", "the object and the class"]}]
    SimulatedLabels(0.0, gold_score).rank(rows, 0)
    assert rows[0]["ranking"] == [0, 1]                  # the topic gold likes the repeats
    SimulatedLabels(0.0, gold_no_repeats).rank(rows, 0)
    assert rows[0]["ranking"] == [1, 0]                  # the variant's people do not


def test_round_plan_and_checks():
    cfg = load_config("configs/tiny_world.yaml", ["pipeline.rounds=3", "train.steps=45"])
    assert cfg.round_plan() == [15, 15, 15]
    cfg = load_config("configs/tiny_world.yaml", ["pipeline.rounds=3", "train.steps=10"])
    assert cfg.round_plan() == [3, 3, 4]
    cfg = load_config("configs/tiny_world.yaml", ["pipeline.rounds=2", "pipeline.round_steps=30"])
    assert cfg.round_plan() == [30, 15]
    assert load_config("configs/tiny_world.yaml").round_plan() == [45]
    for sets, key in ((["pipeline.rounds=0"], "pipeline.rounds"),
                      (["pipeline.rounds=3", "train.steps=2"], "pipeline.round_steps"),
                      (["pipeline.rounds=2", "pipeline.audit_prompts=8", "pipeline.round_labels=8"],
                       "pipeline.round_labels"),
                      (["pipeline.refresh=on_drift", "pipeline.monitor_prompts=0"], "pipeline.refresh"),
                      (["pipeline.gold=topic_no_repeats", "pipeline.labels=judge"], "pipeline.gold")):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_config("configs/tiny_world.yaml", sets).check_pipeline()


def test_a_config_extends_another(tmp_path):
    cfg = load_config("configs/tiny_world_overopt.yaml")
    base = load_config("configs/tiny_world.yaml")
    assert cfg.pipeline.gold == "topic_no_repeats" and base.pipeline.gold == "topic"
    assert cfg.pipeline.k == base.pipeline.k and cfg.ppo.clip == base.ppo.clip     # the rest inherited
    assert cfg.ppo.kl_coef == 0.02 and cfg.ppo.kl_target is None                   # a section merged key by key
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(ConfigError, match="extends itself"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("extends: missing.yaml\n")
    with pytest.raises(ConfigError, match="missing.yaml.*extended by"):
        load_config(tmp_path / "c.yaml")


def test_audit_rows_keep_the_last_writing_of_a_step(tmp_path):
    path = tmp_path / "audit.jsonl"
    rows = [{"step": 3, "prompt": "a", "responses": ["x", "y"], "ranking": [0, 1]},
            {"step": 6, "prompt": "b", "responses": ["x", "y"], "ranking": [1, 0]},
            {"step": 3, "prompt": "a", "responses": ["x", "y"], "ranking": [0, 1]},     # a resumed run redid step 3
            {"step": 9, "prompt": "c", "responses": ["x", "y"], "ranking": [1, 0]}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert [r["prompt"] for r in audit_rows(path, 6)] == ["a", "b"]
    assert len(audit_rows(path, 9)) == 3 and audit_rows(tmp_path / "none.jsonl", 9) == []


def test_progress_keeps_finished_stages_and_refuses_another_config(tmp_path):
    calls = []
    p = Progress(tmp_path, {"a": 1}, resume=False)
    assert p.run("sft", lambda: calls.append(1) or {"model": "m"}) == {"model": "m"}
    again = Progress(tmp_path, {"a": 1}, resume=True)
    assert again.run("sft", lambda: calls.append(2) or {"model": "other"}) == {"model": "m"} and calls == [1]
    assert Progress(tmp_path, {"a": 1}, resume=False).done == {}          # not resuming: a fresh run
    with pytest.raises(RunError, match="pipeline_state.json.*another config.*sections differ: a"):
        Progress(tmp_path, {"a": 2}, resume=True)


@pytest.mark.parametrize("anchor", ["sft", "round"])
def test_a_later_rounds_ppo_keeps_its_kl_to_the_configured_anchor(monkeypatch, tmp_path, anchor):
    """launch/pipeline.py ppo_round's derived PPO config (the PPO run itself is faked: only the config is checked)."""
    import launch.pipeline as lp
    seen = []

    def fake_train(cfg, **kw):
        seen.append((cfg, kw))
        return {"run_dir": "r", "metrics": "m", "checkpoint": "c", "steps": cfg.train.steps, "stopped": None}
    monkeypatch.setattr(lp, "ppo_train", fake_train)
    cfg = load_config("configs/tiny_world.yaml", [f"pipeline.kl_anchor={anchor}", "pipeline.rounds=2"])
    quiet = Audit(None, None, tmp_path / "audit.jsonl", 0, 1, 4, 0, DriftCheck(0.1, 2), stop_on_drift=False)
    for r in (1, 2):
        lp.ppo_round(cfg, r, f"policy{r}", "sft", "rm", "mon", "prompts.jsonl", tmp_path, 7, quiet, None, True)
    (first, kw1), (second, _) = seen
    assert first.models.reference is None and first.models.policy == "policy1" and first.run.seed == cfg.run.seed
    assert second.models.reference == ("sft" if anchor == "sft" else None)     # None: the policy it starts from
    assert second.models.policy == "policy2" and second.run.seed == cfg.run.seed + 1 and second.train.steps == 7
    assert second.run.output_dir.endswith("ppo_r2") and kw1["resume"] == "auto" and kw1["watch"] is None


@pytest.mark.parametrize("first_ckpt, kept", [(5, 5), (10, 0)])
def test_the_last_round_keeps_its_policy_of_the_last_audit_the_rm_passed(tmp_path, monkeypatch, first_ckpt, kept):
    """pipeline.keep_trusted: the last round checkpoints at every audit; when the drift rule fires, the pipeline goes
    on from the newest checkpoint at or before the last trusted audit (none: the policy the round began from). The
    PPO run is faked: it writes the checkpoints a run would and feeds the audit's drift rule two audits, the second
    fallen (the rule's replay of a resumed round's log is exercised in tests/test_e2e_pipeline.py)."""
    import launch.pipeline as lp
    from rlhf_ray import checkpoint as ckpt
    seen = []

    def fake_train(cfg, **kw):
        seen.append(cfg)
        root = ckpt.checkpoint_root(cfg.run.output_dir)
        for step in range(first_ckpt, 11, cfg.checkpoint.every):
            ckpt.begin(root, step)
            ckpt.commit(root, step, {"step": step, "data": {}})
        watch = kw["watch"]
        watch.check.audit(5, 70, 96), watch.check.audit(10, 40, 96)
        watch.stop = f"the reward model drifted: {watch.check.fired}"
        return {"run_dir": cfg.run.output_dir, "metrics": "m", "checkpoint": str(ckpt.step_dir(root, 10)),
                "steps": 10, "stopped": watch.stop}
    monkeypatch.setattr(lp, "ppo_train", fake_train)
    cfg = load_config("configs/tiny_world_overopt.yaml", ["pipeline.rounds=2", "pipeline.drift_monitor=false"])
    audit = Audit(None, None, tmp_path / "audit.jsonl", 16, 5, 4, 0, DriftCheck(0.1, 1), stop_on_drift=True)
    out = lp.ppo_round(cfg, 2, "start", "sft", "rm", None, "prompts.jsonl", tmp_path, 15, audit, None, False,
                       keep_trusted=True)
    assert seen[0].checkpoint.every == 5 and seen[0].checkpoint.keep >= 3          # every audit, enough kept
    assert audit.check.trusted == 5 and out["kept"] == kept
    policy = lp.ppo_checkpoint_policy(out, cfg, "start")
    assert policy == (str(tmp_path / "ppo_r2" / "checkpoints" / "step_000005" / "policy") if kept else "start")
    plain = {**out, "kept": None, "checkpoint": str(tmp_path / "ppo_r2" / "checkpoints" / "step_000010")}
    assert lp.ppo_checkpoint_policy(plain, cfg, "start").endswith("step_000010/policy")    # keep_trusted off


@pytest.mark.parametrize("keep, refresh", [(True, "schedule"), (False, "schedule"), (True, "on_drift")])
def test_keep_trusted_reaches_the_last_round_and_only_it(tmp_path, monkeypatch, keep, refresh):
    """pipeline.keep_trusted and pipeline.refresh, through Stages.ppo: which rounds stop on drift, which keep their
    last trusted policy, and that the last round's drift rule leaves the monitor out (the PPO round is faked)."""
    import launch.pipeline as lp
    seen = {}

    def fake_round(cfg, r, *args):
        audit, keep_trusted = args[7], args[10]
        seen[r] = (audit.stop_on_drift, keep_trusted, audit.check.monitor_span, audit.check.audits)
        return {"run_dir": "r", "metrics": "m", "checkpoint": "c", "steps": 15, "stopped": None}
    monkeypatch.setattr(lp, "ppo_round", fake_round)
    cfg = load_config("configs/tiny_world_overopt.yaml", ["pipeline.rounds=3", f"pipeline.keep_trusted={keep}",
                                                           f"pipeline.refresh={refresh}", "pipeline.monitor_window=5"])
    st = lp.Stages(cfg, tmp_path, {"ppo": "p.jsonl"}, Progress(tmp_path, {}, False), None, None, None, "sft", "mon",
                   None, False, None, None)
    for r in (1, 2, 3):
        st.ppo(r, "policy", "rm", 15, last=r == 3)
    drifting = refresh == "on_drift"
    assert seen[1] == seen[2] == (drifting, False, 10, 1)         # 15 steps audited every 5: single audits
    assert seen[3] == (keep, keep, 0 if keep else 10, 1)


def test_human_labels_queue_wait_aggregate_and_find_their_batch_again(tmp_path):
    """HumanLabels: rows queued as ranking tasks, rank() waits until each has its people's labels (a thread labels
    them here, as the page would), one person's label taken as given (ties by answer index), several aggregated by
    reliability; a second rank() of the same rows (a resumed pipeline) queues nothing and reads the labels again,
    keeping the queued answers over redrawn ones; a wait past label_wait_s stops in one line."""
    import threading
    import time

    from launch.rounds import HumanLabels
    from rlhf_ray.label_store import LabelStore, shown_order
    store = LabelStore(tmp_path / "l.sqlite")
    rows = [{"prompt": "p0", "responses": ["a", "b", "c"]}, {"prompt": "p1", "responses": ["d", "e", "f"]}]

    def people(names, truth):
        """A thread in which each person ranks every task offered to them by `truth` (answer indices best first),
        'tie' tying its first two; it stops when told (the returned event)."""
        stop = threading.Event()

        def work():
            while not stop.is_set():
                offered = [(n, store.next_task(n)) for n in names]
                for n, t in offered:
                    if t is not None:
                        best = [shown_order(n, t["task"], 3).index(a) for a in truth(n)]
                        tiers = [[best[0], best[1]], [best[2]]] if n == "tie" else [[p] for p in best]
                        store.submit(n, t["task"], tiers=tiers)
                if all(t is None for _, t in offered):
                    time.sleep(0.01)
        th = threading.Thread(target=work, daemon=True)
        th.start()
        return stop, th

    def rank(source, rows, seed, names, truth):
        stop, th = people(names, truth)
        try:
            return source.rank(rows, seed)
        finally:
            stop.set()
            th.join(5)

    one = HumanLabels(store, wanted=1, weigh=True, wait_s=60, poll_s=0.01)
    report = rank(one, rows, 5, ["tie"], lambda n: [2, 0, 1])
    assert [r["ranking"] for r in rows] == [[0, 2, 1]] * 2          # tied 2 and 0: by index; then 1
    assert rows[0]["labels"] == {"tie": [[2, 0], [1]]} and report["people"] == 1
    three = HumanLabels(store, wanted=3, weigh=True, wait_s=60, poll_s=0.01)
    rows3 = [{"prompt": "q", "responses": ["x", "y", "z"]}]
    report = rank(three, rows3, 6, ["a", "b", "c"], lambda n: [1, 2, 0] if n != "c" else [0, 1, 2])
    assert rows3[0]["ranking"] == [1, 2, 0] and set(rows3[0]["labels"]) == {"a", "b", "c"} and report["weighed"]
    tasks = store.progress()["tasks"]
    again = [{"prompt": "p0", "responses": ["a", "b", "CHANGED"]}, {"prompt": "p1", "responses": ["d", "e", "f"]}]
    one.rank(again, seed=5)                                          # resumed: found, nothing queued, no wait
    assert store.progress()["tasks"] == tasks and again[0]["responses"] == ["a", "b", "c"]
    assert again[0]["ranking"] == [0, 2, 1]
    nobody = HumanLabels(store, wanted=1, weigh=True, wait_s=0.2, poll_s=0.01)
    with pytest.raises(RunError, match=r"labels: 1 of 1 tasks of batch seed7-1-\w+ still unlabelled after "
                                       r"pipeline.label_wait_s 0.2 s"):
        nobody.rank([{"prompt": "r", "responses": ["u", "v"]}], seed=7)


def test_the_pipeline_s_human_keys_reach_the_label_source(tmp_path):
    """pipeline.labels human: label_source builds HumanLabels with people_per_task, weigh_labelers and label_wait_s."""
    from launch.pipeline import label_source
    from launch.rounds import HumanLabels
    from rlhf_ray.label_store import LabelStore
    cfg = load_config("configs/tiny_world.yaml", ["pipeline.labels=human", "pipeline.people_per_task=3",
                                                  "pipeline.label_wait_s=12.5", "pipeline.weigh_labelers=false"])
    src = label_source(cfg, None, LabelStore(tmp_path / "l.sqlite"))
    assert isinstance(src, HumanLabels) and (src.wanted, src.wait_s, src.weigh) == (3, 12.5, False)
    with pytest.raises(ConfigError, match="pipeline.kto"):
        load_config("configs/tiny_world.yaml", ["pipeline.labels=human", "pipeline.kto=true"]).check_pipeline()
