"""Every bad input is one line naming the file, row or key, found before any actor starts and before anything is
written to the output directory: config values out of range, damaged model directories, undecodable or empty
prompts, unloadable reward functions, an unusable output directory, `--resume` with nothing to resume, and
supervised data too small for one batch. Quick: nothing here starts Ray."""
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import ray

from launch.ppo import main as ppo_main
from launch.stages import main as stage_main
from rlhf_ray.config import ConfigError, load_config
from rlhf_ray.data import DataError, load_prompts, read_jsonl
from rlhf_ray.models import ModelLoadError, check_model_dir, load_tokenizer

from conftest import tiny_overrides

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("override, key", [
    ("policy.lr=0", "policy.lr"), ("policy.lr=-1e-5", "policy.lr"), ("policy.lr=.nan", "policy.lr"),
    ("critic.lr=.inf", "critic.lr"), ("ppo.minibatch_size=0", "ppo.minibatch_size"),
    ("policy.micro_batch_size=0", "policy.micro_batch_size"), ("generation.n=0", "generation.n"),
    ("generation.n=-2", "generation.n"), ("generation.max_new_tokens=0", "generation.max_new_tokens"),
    ("ppo.epochs=0", "ppo.epochs"), ("generation.prompts_per_step=0", "generation.prompts_per_step"),
    ("engine.num_ranks=0", "engine.num_ranks"), ("train.steps=0", "train.steps"),
    ("data.max_prompt_tokens=0", "data.max_prompt_tokens"), ("data.max_prompt_tokens=-100", "data.max_prompt_tokens"),
    ("generation.top_p=0", "generation.top_p"),
    ("ppo.kl_coef=-0.1", "ppo.kl_coef"), ("sft.batch_size=0", "sft.batch_size"),
    ("guard.patience=0", "guard.patience"), ("policy.betas=[0.9, 1.5]", "policy.betas"),
])
def test_out_of_range_config_values_are_one_line_errors_naming_the_key(override, key):
    with pytest.raises(ConfigError) as e:
        load_config("configs/tiny_ppo.yaml", [override])
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"config: {key} ") and "tiny_ppo.yaml" in msg, msg


def test_damaged_model_directories_are_named_with_the_file(tiny_world, tmp_path):
    good = tmp_path / "good"
    shutil.copytree(tiny_world["policy"], good)
    assert check_model_dir(good, "policy")["model_type"] == "qwen2"
    cases = {"truncated": lambda d: os.truncate(d / "model.safetensors", (d / "model.safetensors").stat().st_size // 2),
             "header": lambda d: (d / "model.safetensors").write_bytes(b"\xff" * 64),
             "json": lambda d: (d / "config.json").write_text("{not json"),
             "list": lambda d: (d / "config.json").write_text("[1, 2]")}
    expect = {"truncated": "model.safetensors is truncated", "header": "not a safetensors file",
              "json": "config.json is not valid JSON", "list": "config.json must hold a JSON object"}
    for name, damage in cases.items():
        d = tmp_path / name
        shutil.copytree(good, d)
        damage(d)
        with pytest.raises(ModelLoadError) as e:
            check_model_dir(d, "models.policy")
        assert "\n" not in str(e.value) and expect[name] in str(e.value) and str(d) in str(e.value), str(e.value)
    with pytest.raises(ModelLoadError, match="directory not found"):
        check_model_dir(tmp_path / "absent", "models.reward")


def test_prompt_files_that_are_not_utf8_or_hold_invisible_prompts_name_the_row(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_bytes(b'{"prompt": "fine"}\n{"prompt": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"p.jsonl:2: not valid UTF-8 \(byte 0xe9"):
        read_jsonl(f)
    f.write_text('{"prompt": "fine"}\n\n{"prompt": "\\u200b"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"p.jsonl:3: field 'prompt' must be a string with visible text"):
        load_prompts(f)


def ppo_cli(world, run_dir, *extra):
    return ppo_main(["--config", "configs/tiny_ppo.yaml",
                     *[a for o in tiny_overrides(world, run_dir) + list(extra) for a in ("--set", o)]])


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_ppo_refuses_bad_inputs_before_starting_anything_or_writing(tiny_world, tmp_path, capsys):
    policy = tmp_path / "policy"
    shutil.copytree(tiny_world["policy"], policy)
    os.truncate(policy / "model.safetensors", 1000)
    unparsable = tmp_path / "unparsable"                  # config.json "{": the tokenizer would read it first
    shutil.copytree(tiny_world["policy"], unparsable)
    (unparsable / "config.json").write_text("{")
    bad_prompts = tmp_path / "bad.jsonl"
    bad_prompts.write_bytes(b'{"prompt": "\xff\xfe"}\n')
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    other_tok = tmp_path / "other_tokenizer"           # a teacher whose tokenizer has the policy's size, other ids
    shutil.copytree(tiny_world["policy"], other_tok)
    from rlhf_ray.tiny_world.world import corpus_text, train_tokenizer
    train_tokenizer(corpus_text()[::-1], 2048).save_pretrained(other_tok)
    no_tok = tmp_path / "no_tokenizer"
    no_tok.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(os.path.join(tiny_world["policy"], f), no_tok / f)
    cases = [
        ([f"models.teacher={other_tok}"], 2, "models.teacher: its tokenizer (" + str(other_tok) + ") is not the "
         "policy's"),
        ([f"models.teacher={no_tok}"], 2, "models.teacher: no tokenizer to check against the policy's"),
        ([f"models.policy={policy}"], 2, "model.safetensors is truncated"),
        ([f"models.policy={unparsable}"], 2, "models.policy: " + str(unparsable / "config.json") + " is not valid JSON"),
        (["engine.max_model_len=40"], 2, "engine.max_model_len must hold data.max_prompt_tokens"),
        ([f"models.reward={tmp_path / 'no_reward'}"], 2, "directory not found"),
        (["engine.max_model_len=1024"], 2, "exceeds the policy's context of 512"),
        ([f"data.prompts={bad_prompts}"], 2, "bad.jsonl:1: not valid UTF-8"),
        (["reward.sources=[{kind: function, path: 'no_such_module:score'}]"], 2, "cannot load it"),
        ([f"run.output_dir={blocker}"], 2, "is a file, not a directory"),
        (["reward.sources=[{kind: judge}]"], 2, "judge.model is required by reward.sources[0] (kind judge)"),
        (["reward.sources=[{kind: judge}]", f"judge.model={tmp_path / 'no_judge'}"], 2, "directory not found"),
        (["reward.sources=[{kind: judge}]", f"judge.model={tiny_world['policy']}", "judge.pointwise='Rate {prompt}'"],
         2, "judge.pointwise template: no {response} in it"),
    ]
    for i, (sets, code, text) in enumerate(cases):
        run_dir = tmp_path / f"run{i}"
        assert ppo_cli(tiny_world, run_dir, *sets) == code, sets
        line = one_error_line(capsys)
        assert text in line, (sets, line)
        assert not (run_dir / "config.yaml").exists()      # nothing written
    # --resume with no checkpoint says so, and writes nothing; nothing above started Ray
    assert ppo_main(["--config", "configs/tiny_ppo.yaml", "--resume",
                     *[a for o in tiny_overrides(tiny_world, tmp_path / "nothing") for a in ("--set", o)]]) == 1
    assert "--resume: no complete checkpoint under" in one_error_line(capsys)
    assert not (tmp_path / "nothing" / "config.yaml").exists() and not ray.is_initialized()


def test_rlhf_ray_label_refuses_bad_inputs_in_one_line_before_starting_anything(tiny_world, tmp_path, capsys):
    from launch.label import main as label_main
    bad = tmp_path / "answers.jsonl"
    bad.write_text(json.dumps({"prompt": "p", "responses": ["a", "b"]}) + "\n"
                   + json.dumps({"prompt": "q", "responses": ["same", "same"]}) + "\n")
    judge = [f"judge.model={tiny_world['policy']}", "judge.score_labels=['1','2','3','4','5']"]
    cases = [
        ([f"label.responses={bad}"], "judge.model is required"),
        ([*judge], "label takes label.responses (answers to rank) or label.prompts"),
        ([*judge, f"label.responses={bad}", f"label.prompts={bad}"], "one of them"),
        ([*judge, f"label.responses={bad}"], "answers.jsonl:2: 'responses' must list two or more distinct"),
        ([*judge, f"label.responses={tmp_path / 'none.jsonl'}"], "none.jsonl: file not found"),
    ]
    for sets, text in cases:
        assert label_main(["--config", "configs/tiny_grpo.yaml", *[a for s in sets for a in ("--set", s)]]) == 2
        assert text in one_error_line(capsys), (sets, text)
    assert not ray.is_initialized()


def test_judge_labels_must_be_single_tokens_of_the_judges_tokenizer(tiny_world):
    """Checked beside the cluster's start, before any actor: the tiny tokenizer splits " 1" in two."""
    from rlhf_ray.preflight import judge_tokenizer
    sets = ["reward.sources=[{kind: judge}]", f"judge.model={tiny_world['policy']}"]
    with pytest.raises(ConfigError, match=r"judge.score_labels: ' 1' is 2 tokens for the judge's tokenizer"):
        judge_tokenizer(load_config("configs/tiny_grpo.yaml", sets))
    ok = load_config("configs/tiny_grpo.yaml", sets + ["judge.score_labels=['1','2','3','4','5']",
                                                      "judge.verdict_labels=[A, B]"])
    with pytest.raises(ConfigError, match=r"judge.verdict_labels: ' 1' is 2 tokens"):
        judge_tokenizer(load_config("configs/tiny_grpo.yaml", sets + ["judge.score_labels=['1','2','3','4','5']",
                                                                      "judge.verdict_labels=[' 1', B]"]))
    tok = judge_tokenizer(ok)                               # the judge's own tokenizer, each label one token of it
    assert tok.get_vocab() == load_tokenizer(tiny_world["policy"]).get_vocab()
    assert all(len(tok(s, add_special_tokens=False)["input_ids"]) == 1 for s in ["1", "2", "3", "4", "5", "A", "B"])


def test_a_read_only_output_dir_is_refused(tmp_path):
    """Refused for a user without write permission, and for root on a read-only mount. As root (CI), the first case
    runs in a child that drops to nobody (root writes through permission bits); the second mounts a read-only tmpfs
    where the machine lets root mount, as CI's does."""
    from rlhf_ray.preflight import output_dir
    top = Path(tempfile.mkdtemp(prefix="rlhf-ro-"))         # not under root's 0700 pytest directory: nobody reaches it
    try:
        top.chmod(0o755)
        ro = top / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        # a child that imports as itself, then (as root) becomes nobody, as a user without write permission is
        check = ("import os, sys; from rlhf_ray.preflight import output_dir\n"
                 "if os.geteuid() == 0: os.setgid(65534); os.setuid(65534)\n"
                 "try: output_dir(sys.argv[1])\nexcept Exception as e: print(e); sys.exit(3)")
        done = subprocess.run([sys.executable, "-c", check, str(ro)], capture_output=True, text=True, cwd=ROOT,
                              timeout=120)
        assert done.returncode == 3 and f"run.output_dir {ro} is not writable" in done.stdout, done
        if os.geteuid() == 0:
            mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(ro)],
                                     capture_output=True, text=True)
            if mounted.returncode != 0:
                pytest.skip(f"root cannot mount here: {mounted.stderr.strip()}")
            try:
                with pytest.raises(ConfigError, match=f"run.output_dir {ro} is not writable"):
                    output_dir(str(ro))
            finally:
                subprocess.run(["umount", str(ro)], check=True)
    finally:
        shutil.rmtree(top)


def test_supervised_data_too_small_or_empty_names_the_file(tiny_world, tmp_path, capsys):
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"q{i}", "output": f"a{i}"}) + "\n" for i in range(6)))
    sets = [f"sft.model={tiny_world['policy']}", f"sft.data={data}", "sft.batch_size=16",
            f"run.output_dir={tmp_path / 'run'}"]
    assert stage_main("sft", ["--config", "configs/tiny_ppo.yaml", *[a for o in sets for a in ("--set", o)]]) == 2
    line = one_error_line(capsys)
    assert str(data) in line and "fewer than one batch (sft.batch_size 16)" in line, line
    data.write_text("")
    assert stage_main("sft", ["--config", "configs/tiny_ppo.yaml", *[a for o in sets for a in ("--set", o)]]) == 2
    line = one_error_line(capsys)
    assert str(data) in line and "distinct prompt" in line, line
    assert not (tmp_path / "run" / "config.yaml").exists() and not ray.is_initialized()


def test_a_stage_trainer_split_deepspeed_would_refuse_is_one_line_before_anything_starts(tiny_world, tmp_path, capsys):
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"q{i}", "output": f"a{i}"}) + "\n" for i in range(64)))
    sets = [f"sft.model={tiny_world['policy']}", f"sft.data={data}", "sft.batch_size=16", "sft.trainer.num_ranks=2",
            "sft.trainer.micro_batch_size=5", f"run.output_dir={tmp_path / 'run'}", "ppo.minibatch_size=7"]
    assert stage_main("sft", ["--config", "configs/tiny_ppo.yaml", *[a for o in sets for a in ("--set", o)]]) == 2
    line = one_error_line(capsys)        # the stage's own rule, not the PPO key it does not use
    assert "sft.trainer.micro_batch_size must divide the per-rank batch" in line, line
    assert not (tmp_path / "run").exists() and not ray.is_initialized()


def test_resume_passes_over_a_checkpoint_whose_state_lacks_what_resume_needs(tmp_path, capsys):
    from launch.ppo import resume_point
    from rlhf_ray import checkpoint as ckpt
    root = ckpt.checkpoint_root(tmp_path)
    ckpt.begin(root, 4)
    whole = ckpt.commit(root, 4, {"step": 4, "data": {"epoch": 0, "pos": 8}})
    ckpt.begin(root, 8)
    ckpt.commit(root, 8, {"step": 8})                       # valid JSON, but no prompt-stream position
    assert resume_point(tmp_path, True) == whole
    out = capsys.readouterr().out.strip().splitlines()
    assert out == ["warning: checkpoint step_000008: state.json has no data: passed over for an older one"], out
    ckpt.begin(root, 12)
    ckpt.commit(root, 12, {"step": 12, "data": [0, 8]})
    assert resume_point(tmp_path, True) == whole
    assert "state.json: data is not a dict" in capsys.readouterr().out


def test_resume_auto_starts_fresh_without_a_checkpoint(tmp_path, capsys):
    """`--resume auto` (a spot job's restart, e.g. after its driver was killed before the first checkpoint) starts
    afresh where there is no whole checkpoint; plain `--resume` says so in one line."""
    from launch.common import RunError
    from launch.ppo import resume_point
    from rlhf_ray import checkpoint as ckpt
    assert resume_point(tmp_path, "auto") is None
    assert "--resume auto: no complete checkpoint under" in capsys.readouterr().out
    ckpt.begin(ckpt.checkpoint_root(tmp_path), 2)                   # begun, never committed: not whole
    assert resume_point(tmp_path, "auto") is None
    with pytest.raises(RunError, match="--resume: no complete checkpoint under"):
        resume_point(tmp_path, True)


def test_pipeline_with_no_published_ppo_checkpoint_says_so_in_one_line(tmp_path, capsys):
    """checkpoint.every 0 (as configs/tiny_world.yaml sets) and a last step the divergence guard held back: nothing
    trustworthy to evaluate. An earlier published checkpoint is evaluated instead, and the pipeline says which."""
    from launch.common import RunError
    from launch.pipeline import ppo_checkpoint_policy
    from rlhf_ray import checkpoint as ckpt
    cfg = load_config("configs/tiny_world.yaml")
    with pytest.raises(RunError) as e:
        ppo_checkpoint_policy({"checkpoint": None}, cfg, "start")
    assert "\n" not in str(e.value) and "PPO published no checkpoint to evaluate" in str(e.value)
    root = ckpt.checkpoint_root(tmp_path)
    ckpt.begin(root, 40)
    earlier = ckpt.commit(root, 40, {"step": 40, "data": {"epoch": 0, "pos": 0}})
    assert ppo_checkpoint_policy({"checkpoint": str(earlier), "steps": 45}, cfg, "start") == str(earlier / "policy")
    assert "going on from PPO's checkpoint of step 40" in capsys.readouterr().out
