"""The label queue (rlhf_ray/label_store.py) on hand-made labels: who sees what in which order, what is stored and
exported, ties, duplicates, leases, and the lead's report. SQLite files in tmp_path; no web."""
import json
import threading

import pytest

from rlhf_ray.formats import normalize_preference_row
from rlhf_ray.label_store import LabelError, LabelStore, shown_order, tiers_to_row

ROWS = [{"prompt": "p0", "responses": ["a0", "b0", "c0"], "id": "x"},
        {"prompt": "p1", "responses": ["a1", "b1", "c1"]}]


def test_shown_order_is_per_labeler_stable_and_mapped_back_on_submit(tmp_path):
    store = LabelStore(tmp_path / "l.sqlite")
    [t0, _] = store.add_tasks("b", ROWS)
    task = store.next_task("ann")
    order = shown_order("ann", t0, 3)
    assert task["task"] == t0 and task["answers"] == [ROWS[0]["responses"][i] for i in order]
    assert store.next_task("ann")["task"] == t0                 # a reload shows the same task, same order
    assert store.submit("ann", t0, tiers=[[2], [0], [1]])       # shown positions, best first
    [lab] = store.labels()
    assert lab["shown"] == order and lab["tiers"] == [[order[2]], [order[0]], [order[1]]]
    assert lab["meta"] == {"id": "x"}
    # another labeler, another order (for this task id some labeler must differ; these two do)
    assert {tuple(shown_order(n, t0, 3)) for n in ("ann", "bob", "cy", "dee")} != {tuple(order)}


def test_a_resubmitted_label_is_stored_once(tmp_path):
    store = LabelStore(tmp_path / "l.sqlite")
    [t0, _] = store.add_tasks("b", ROWS)
    assert store.submit("ann", t0, tiers=[[0], [1], [2]]) is True
    assert store.submit("ann", t0, tiers=[[2], [1], [0]]) is False      # the first label stands
    assert [lab["tiers"] for lab in store.labels()] == [[[shown_order("ann", t0, 3)[p]] for p in (0, 1, 2)]]


def test_malformed_labels_are_refused_in_one_line(tmp_path):
    store = LabelStore(tmp_path / "l.sqlite")
    [t0, _] = store.add_tasks("b", ROWS)
    [th] = store.add_tasks("b", [{"prompt": "p", "responses": ["only"]}], kind="thumbs")
    for kwargs, words in [({"tiers": [[0], [1]]}, "every answer position 0..2 exactly once"),
                          ({"tiers": [[0], [0, 1, 2]]}, "exactly once"),
                          ({"tiers": [[0], []]}, "non-empty"),
                          ({"thumb": True}, "takes tiers")]:
        with pytest.raises(LabelError, match=words):
            store.submit("ann", t0, **kwargs)
    with pytest.raises(LabelError, match="takes thumb"):
        store.submit("ann", th, tiers=[[0]])
    with pytest.raises(LabelError, match="task 999: no such task"):
        store.submit("ann", 999, tiers=[[0]])
    with pytest.raises(LabelError, match="row 0: needs 'prompt'"):
        store.add_tasks("b", [{"prompt": "p", "responses": ["just one"]}])
    assert store.labels() == []


def test_ties_export_as_scores_that_state_no_pair_between_tied_answers(tmp_path):
    assert tiers_to_row([[1], [0], [2]]) == {"ranking": [1, 0, 2]}
    assert tiers_to_row([[1], [0, 2]]) == {"scores": [1, 2, 1]}
    store = LabelStore(tmp_path / "l.sqlite")
    [t0, t1] = store.add_tasks("b", ROWS)
    o0, o1 = shown_order("ann", t0, 3), shown_order("ann", t1, 3)
    store.submit("ann", t0, tiers=[[0], [1], [2]])
    store.submit("ann", t1, tiers=[[0, 1], [2]])                 # the first two shown tied
    rankings = store.export("rankings")
    assert rankings[0]["ranking"] == o0 and "scores" not in rankings[0]
    _, _, pairs = normalize_preference_row(rankings[1], "export")           # what the RM / DPO stages read
    assert sorted(pairs) == sorted([(o1[0], o1[2]), (o1[1], o1[2])])
    exported = store.export("pairs")
    assert len(exported) == 3 + 2
    assert {(r["chosen"], r["rejected"]) for r in exported[3:]} == {(f"{'abc'[o1[0]]}1", f"{'abc'[o1[2]]}1"),
                                                                    (f"{'abc'[o1[1]]}1", f"{'abc'[o1[2]]}1")}
    assert all(r["labeler"] == "ann" and r["shown"] in (o0, o1) and r["time"] > 0 for r in rankings + exported)


def test_thumbs_each_answer_a_task_and_exported_for_kto(tmp_path):
    store = LabelStore(tmp_path / "l.sqlite")
    ids = store.add_tasks("t", [{"prompt": "p", "responses": ["good", "bad"]}], kind="thumbs")
    assert len(ids) == 2
    store.submit("ann", ids[0], thumb=True, reason="right")
    store.submit("ann", ids[1], thumb=False)
    assert [(r["completion"], r["label"], r["reason"]) for r in store.export("thumbs")] == [
        ("good", True, "right"), ("bad", False, "")]


def test_a_task_goes_to_as_many_labelers_as_it_wants_leases_included(tmp_path):
    store = LabelStore(tmp_path / "l.sqlite")
    [t0, t1] = store.add_tasks("b", ROWS, wanted=2)
    assert store.next_task("ann")["task"] == t0
    assert store.next_task("bob")["task"] == t0                 # wanted twice: a second labeler may hold it
    assert store.next_task("cy")["task"] == t1                  # two hold t0: cy gets the next
    store.submit("ann", t0, skip=True)                          # a skip frees the place, and is not asked again
    assert store.next_task("ann")["task"] == t1
    assert store.next_task("dee")["task"] == t0
    assert store.progress(batch="b") == {"tasks": 2, "done": 0}
    for who in ("bob", "dee"):
        store.submit(who, t0, tiers=[[0], [1], [2]])
    assert store.progress("ann", batch="b") == {"tasks": 2, "done": 1, "mine": 1}
    assert store.export("rankings", batch="b")[0]["labeler"] == "bob"    # skips are not exported


def test_tokens_name_their_labeler_and_a_new_token_revokes_the_old(tmp_path):
    store = LabelStore(tmp_path / "l.sqlite")
    old = store.add_labeler("ann")
    lead = store.add_labeler("lee", lead=True)
    assert store.who(old).name == "ann" and not store.who(old).lead and store.who(lead).lead
    assert store.who(None) is None and store.who("guess") is None
    new = store.add_labeler("ann")
    assert store.who(old) is None and store.who(new).name == "ann"
    assert old not in (tmp_path / "l.sqlite").read_bytes().decode("latin-1")       # only hashes are kept
    with pytest.raises(LabelError, match="letters, digits"):
        store.add_labeler("a b")


def test_the_report_finds_the_labeler_who_picks_the_first_shown(tmp_path):
    store = LabelStore(tmp_path / "l.sqlite")
    rows = [{"prompt": f"p{i}", "responses": [f"x{i}", f"y{i}", f"z{i}", f"w{i}"]} for i in range(40)]
    ids = store.add_tasks("b", rows, wanted=3)
    for t in ids:                                     # truth: answer 0 > 1 > 2 > 3
        for who in ("ann", "bob"):
            o = shown_order(who, t, 4)
            store.submit(who, t, tiers=[[o.index(a)] for a in range(4)], seconds=3.0)
        store.submit("lazy", t, tiers=[[0], [1], [2], [3]], seconds=1.0)      # as shown
    rep = store.report()
    assert rep["labelers"]["lazy"]["position_bias"] == pytest.approx(0.75)   # always first: 1 - 1/4
    assert abs(rep["labelers"]["ann"]["position_bias"]) < 0.3
    assert rep["labelers"]["lazy"]["reliability"] < 0.7 < rep["labelers"]["ann"]["reliability"]
    assert rep["labelers"]["ann"]["with_aggregate"] == 1.0 and rep["labelers"]["lazy"]["median_seconds"] == 1.0
    assert rep["progress"] == {"tasks": 40, "done": 40}


def test_writers_in_threads_lose_and_double_nothing(tmp_path):
    store = LabelStore(tmp_path / "l.sqlite")
    ids = store.add_tasks("b", [{"prompt": f"p{i}", "responses": ["a", "b"]} for i in range(30)], wanted=4)

    def work(name):
        s = LabelStore(tmp_path / "l.sqlite")
        while (t := s.next_task(name)) is not None:
            s.submit(name, t["task"], tiers=[[0], [1]])
            s.submit(name, t["task"], tiers=[[1], [0]])          # a double submit
    threads = [threading.Thread(target=work, args=(f"l{i}",)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    labels = store.labels()
    assert len(labels) == len({(x["task_id"], x["labeler"]) for x in labels})
    counts = [sum(x["task_id"] == t for x in labels) for t in ids]
    assert counts == [4] * 30 and json.dumps(store.progress()) == json.dumps({"tasks": 30, "done": 30})
