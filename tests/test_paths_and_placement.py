"""Quick, pure: relative paths against run.base_dir, and whether a layout can ever fit a fixed cluster's nodes."""
from pathlib import Path

from actors.group import node_shapes, room_left, unplaceable
from rlhf_ray.config import load_config, resolve_paths

PATH_KEYS = ["models.policy", "models.reference", "models.reward", "models.critic", "models.monitor",
             "models.tokenizer", "data.prompts", "sft.data", "sft.model", "sft.output", "rm.data", "rm.model",
             "rm.output", "dpo.data", "dpo.model", "dpo.output", "run.output_dir", "pipeline.world_dir"]


def value(cfg, key):
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


def test_relative_paths_resolve_against_base_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)                      # not the base: nothing may resolve against the cwd
    base = tmp_path / "submitted from"
    sets = [f"{k}=rel/{k}" for k in PATH_KEYS] + [
        f"run.base_dir={base}", "reward.sources=[{kind: model, path: rm}, {kind: function, path: 'm:f'}]"]
    cfg = resolve_paths(load_config(None, sets))
    for k in PATH_KEYS:
        assert value(cfg, k) == str(base / "rel" / k), k
    assert [s.path for s in cfg.reward.sources] == [str(base / "rm"), "m:f"]


def test_absolute_and_empty_paths_stay_and_null_base_is_the_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = resolve_paths(load_config(None, ["models.policy=/abs/policy", "data.prompts=../p.jsonl",
                                           "run.output_dir=runs/x"]))
    assert cfg.models.policy == "/abs/policy"
    assert cfg.models.reference is None and cfg.models.reward == "" and cfg.sft.output == ""
    assert cfg.data.prompts == str(tmp_path.parent / "p.jsonl")   # normalised, not just joined
    assert cfg.run.output_dir == str(tmp_path / "runs" / "x") and cfg.run.base_dir == str(tmp_path)
    assert Path(resolve_paths(cfg).run.output_dir) == tmp_path / "runs" / "x"   # a second pass changes nothing


CPU1 = {"CPU": 1.0}
GPU1 = {"CPU": 1.0, "GPU": 1.0}


def test_identical_bundles_are_counted_against_each_node():
    two_nodes = [{"CPU": 2.0}, {"CPU": 1.0}]
    assert unplaceable([CPU1] * 3, two_nodes) is None                  # 2 + 1 spread over the nodes (PACK)
    assert unplaceable([CPU1] * 4, two_nodes) == "room for 3 of 4"
    assert unplaceable([{"CPU": 1.5}] * 2, two_nodes) == "room for 1 of 2"   # totals suffice, no node holds two
    assert unplaceable([GPU1] * 2, [{"CPU": 64.0}]) == "room for 0 of 2"    # a resource no node has
    assert unplaceable([{"CPU": 0.1}] * 10, [{"CPU": 1.0}]) is None         # 1e-4 units, no float floor
    pinned = {"CPU": 1.0, "trainer": 0.001}                                 # a role's node_resource
    assert unplaceable([pinned], [{"CPU": 8.0}, {"CPU": 1.0, "trainer": 1.0}]) is None
    assert unplaceable([pinned] * 2, [{"CPU": 8.0}, {"CPU": 1.0, "trainer": 1.0}]) == "room for 1 of 2"


def test_strategies_and_mixed_bundles():
    nodes = [{"CPU": 2.0}, {"CPU": 2.0}]
    assert unplaceable([CPU1] * 2, nodes, "STRICT_PACK") is None
    assert unplaceable([CPU1] * 3, nodes, "STRICT_PACK").startswith("no single node holds all of them")
    assert unplaceable([CPU1] * 2, nodes, "STRICT_SPREAD") is None
    assert unplaceable([CPU1] * 3, nodes, "STRICT_SPREAD") == "room for 2 of 3"
    assert unplaceable([CPU1] * 3, nodes, "SPREAD") is None
    assert unplaceable([CPU1, GPU1], nodes) == "room for 0 of 1 x {'CPU': 1.0, 'GPU': 1.0}"


def test_node_shapes_names_what_the_nodes_have_of_what_was_asked():
    nodes = [{"CPU": 8.0, "memory": 1e9}, {"CPU": 8.0}, {"CPU": 2.0, "GPU": 1.0}]
    assert node_shapes(nodes, {"CPU", "GPU"}) == "1 node: {'CPU': 2.0, 'GPU': 1.0}; 2 nodes: {'CPU': 8.0, 'GPU': 0}"


def test_room_this_run_already_holds_never_frees():
    nodes = {"a": {"CPU": 2.0}, "b": {"CPU": 4.0, "GPU": 1.0}}
    left = room_left(nodes, [("a", {"CPU": 2.0}), ("b", {"CPU": 1.0, "GPU": 1.0})])
    assert left == [{"CPU": 0.0}, {"CPU": 3.0, "GPU": 0.0}] and nodes["a"] == {"CPU": 2.0}
    assert unplaceable([CPU1] * 3, left) is None and unplaceable([CPU1] * 4, left) == "room for 3 of 4"
