"""The typed config: YAML in, overrides, one-line errors naming the key."""
import pytest

from rlhf_ray.config import Config, ConfigError, load_config

BASE = ["models.policy=p", "models.reward=r", "data.prompts=d.jsonl"]


def test_tiny_config_loads_with_types(tmp_path):
    cfg = load_config("configs/tiny_ppo.yaml")
    assert isinstance(cfg, Config)
    assert cfg.policy.num_ranks == 2 and cfg.policy.zero_stage == 2
    assert isinstance(cfg.policy.lr, float) and cfg.generation.n == 2


def test_set_overrides_nested_values_with_yaml_types():
    cfg = load_config("configs/tiny_ppo.yaml", ["ppo.kl_coef=0.1", "policy.zero_stage=3", "models.critic=null",
                                                "logging.wandb.mode=disabled"])
    assert cfg.ppo.kl_coef == 0.1 and cfg.policy.zero_stage == 3 and cfg.models.critic is None
    assert cfg.logging.wandb.mode == "disabled"


def test_int_widens_to_float_and_yaml11_exponents_are_floats():
    assert load_config(None, BASE + ["ppo.clip=1"]).ppo.clip == 1.0
    assert load_config(None, BASE + ["policy.lr=1e-4"]).policy.lr == 1e-4     # YAML 1.1 reads 1e-4 as a string


@pytest.mark.parametrize("override, needle", [
    ("ppo.cliip=0.1", "unknown key 'ppo.cliip'"),
    ("nosuch.x=1", "unknown key 'nosuch'"),
    ("ppo.clip=abc", "ppo.clip must be float"),
    ("policy.num_ranks=1.5", "policy.num_ranks must be int"),
    ("train.dtype=float16", "train.dtype must be one of"),
    ("data.shuffle=3", "data.shuffle must be true/false"),
    ("policy.zero_stage=4", "policy.zero_stage must be 0-3"),
    ("sft.trainer.zero_stage=4", "sft.trainer.zero_stage must be 0-3"),
    ("rm.trainer.betas=[0.9, 1.5]", "rm.trainer.betas must be two numbers in [0, 1)"),
    ("dpo.trainer.lr=0", "dpo.trainer.lr must be a finite number > 0"),
    ("ppo.gamma=0", "ppo.gamma must lie in (0, 1]"),
    ("ppo.lam=1.5", "ppo.lam must lie in (0, 1]"),
])
def test_bad_values_give_one_line_error_naming_the_key(override, needle):
    with pytest.raises(ConfigError) as e:
        load_config("configs/tiny_ppo.yaml", [override])
    msg = str(e.value)
    assert needle in msg and "\n" not in msg and "configs/tiny_ppo.yaml" in msg


def test_missing_file_and_required_fields(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="models.policy is required"):
        load_config(None, []).check_ppo()
    with pytest.raises(ConfigError, match="sft.data is required"):
        load_config(None, []).check_stage("sft")
    bad = tmp_path / "bad.yaml"
    bad.write_text("ppo: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_every_shipped_config_loads_and_grpo_needs_no_critic():
    from pathlib import Path
    for path in sorted(Path("configs").glob("*.yaml")):
        load_config(path)
    grpo = load_config("configs/tiny_grpo.yaml").check_ppo()
    assert not grpo.needs_critic() and [s.kind for s in grpo.reward_sources()] == ["function", "function"]


def test_layout_checks_for_colocated_engines_and_cuda_ipc():
    base = ["models.policy=p", "models.reward=r", "data.prompts=x"]
    gpu = ["policy.gpus_per_rank=1", "policy.num_ranks=1", "engine.gpus_per_rank=1"]
    with pytest.raises(ConfigError, match="placement.engines_sleep"):
        load_config(None, base + gpu + ["placement.colocate=[[policy, engine]]"]).check_ppo()
    with pytest.raises(ConfigError, match="cuda_ipc needs the engines on policy rank 0's GPU"):
        load_config(None, base + gpu + ["weight_sync.backend=cuda_ipc"]).check_ppo()
    ok = load_config(None, base + gpu + ["placement.colocate=[[policy, engine]]", "placement.engines_sleep=true",
                                         "weight_sync.backend=cuda_ipc"])
    assert ok.check_ppo() is ok
    with pytest.raises(ConfigError, match="same num_ranks"):
        load_config(None, base + ["placement.colocate=[[policy, reference]]", "policy.num_ranks=2"]).check_ppo()


def test_derive_goes_through_the_same_typed_validated_path_as_set():
    from rlhf_ray.config import derive
    base = load_config("configs/tiny_world.yaml")
    cfg = derive(base, {"models.policy": "sft", "models.monitor": None, "rm.trainer.lr": 1, "run.name": "x-ppo"})
    assert cfg.models.policy == "sft" and cfg.models.monitor is None and cfg.run.name == "x-ppo"
    assert isinstance(cfg.rm.trainer.lr, float) and cfg.rm.trainer.lr == 1.0          # int widened, as --set does
    assert base.models.policy == "" and base.run.name == "tiny-world"                  # the original is untouched
    for sets, needle in [({"rm.dta": "x"}, "unknown key 'rm.dta'"), ({"ppo.epochs": "two"}, "ppo.epochs must be int"),
                         ({"ppo.epochs": 0}, "ppo.epochs must be >= 1"), ({"run.seed.x": 1}, "'seed' is not a section")]:
        with pytest.raises(ConfigError, match=needle):
            derive(base, sets)


def test_each_command_is_refused_only_over_what_it_uses():
    """A PPO-only rule does not stop a supervised stage, and a stage's trainer split is checked before it starts
    (not inside DeepSpeed after the actors did)."""
    sets = BASE + ["sft.data=s.jsonl", "sft.model=m", "ppo.minibatch_size=7", "rollout.max_staleness=1"]
    cfg = load_config("configs/tiny_ppo.yaml", sets)                        # values fine on their own
    assert cfg.check_stage("sft").data == "s.jsonl"                         # an sft run goes ahead
    with pytest.raises(ConfigError, match="ppo.minibatch_size must divide generation.prompts_per_step"):
        cfg.check_ppo()
    for override, needle in [
            ("sft.trainer.micro_batch_size=5", "sft.trainer.micro_batch_size must divide the per-rank batch "
                                               "(sft.batch_size 16 / 2 ranks = 8), got 5"),
            ("sft.batch_size=15", "sft.batch_size must be a multiple of sft.trainer.num_ranks (2), got 15")]:
        bad = load_config("configs/tiny_ppo.yaml", BASE + ["sft.data=s.jsonl", "sft.model=m", "sft.batch_size=16",
                                                           "sft.trainer.num_ranks=2", override])
        with pytest.raises(ConfigError) as e:
            bad.check_stage("sft")
        assert str(e.value) == f"config: {needle}"
    with pytest.raises(ConfigError, match="dpo.trainer.micro_batch_size must divide"):  # the pipeline: every stage
        load_config("configs/tiny_world.yaml", ["dpo.trainer.micro_batch_size=3"]).check_pipeline()
    with pytest.raises(ConfigError, match="engine.max_model_len must hold"):
        load_config("configs/tiny_world.yaml", ["engine.max_model_len=40"]).check_pipeline()
    assert load_config("configs/tiny_world.yaml").check_pipeline()


@pytest.mark.parametrize("overrides, needle", [
    (["rollout.max_staleness=2"], "rollout.max_staleness must be 0 (synchronous) or 1"),
    (["rollout.max_staleness=1"], "ppo.is_correction must be tis or mask"),
    (["rollout.max_staleness=1", "ppo.is_correction=tis", "ppo.reuse_sample_logprobs=true"],
     "ppo.is_correction needs pi_old from the policy"),
    (["ppo.is_correction=mask", "ppo.reuse_sample_logprobs=true"], "ppo.is_correction needs pi_old"),
    (["ppo.is_cap=1"], "ppo.is_cap must be > 1"),
    (["engine.cpu_cores=[]"], "engine.cpu_cores must list core numbers"),
])
def test_async_rollout_and_importance_correction_settings_are_checked(overrides, needle):
    with pytest.raises(ConfigError) as e:
        load_config("configs/tiny_ppo.yaml", overrides).check_ppo()
    assert needle in str(e.value) and "\n" not in str(e.value)
    ok = load_config("configs/tiny_ppo.yaml", ["rollout.max_staleness=1", "ppo.is_correction=tis",
                                               "policy.cpu_cores=[1]"])
    assert ok.rollout.max_staleness == 1 and ok.policy.cpu_cores == [1]
    with pytest.raises(ConfigError, match="placement.engines_sleep"):
        load_config("configs/tiny_ppo.yaml", BASE + ["rollout.max_staleness=1", "ppo.is_correction=tis",
                                                     "placement.engines_sleep=true"]).check_ppo()


def test_resolve_paths_makes_every_local_model_path_absolute(tmp_path, monkeypatch):
    from rlhf_ray.config import resolve_paths
    (tmp_path / "rm_a").mkdir()
    (tmp_path / "prompts.jsonl").write_text("")
    monkeypatch.chdir(tmp_path)
    cfg = resolve_paths(load_config(None, ["models.policy=rm_a", "data.prompts=prompts.jsonl",
                                           "reward.sources=[{kind: model, path: rm_a}, {kind: function, path: 'm:f'}]"]))
    assert cfg.models.policy == str(tmp_path / "rm_a") and cfg.data.prompts == str(tmp_path / "prompts.jsonl")
    assert [s.path for s in cfg.reward.sources] == [str(tmp_path / "rm_a"), "m:f"]


@pytest.mark.parametrize("overrides, needle", [
    (["placement.share_process=[[reference, critic]]"],
     "lists groups of at least two of ['engine', 'policy', 'reference', 'reward', 'teacher']"),
    (["placement.share_process=[[policy, reference]]", "policy.num_ranks=2", "reference.num_ranks=2"],
     "the policy shares a process with one rank only (policy.num_ranks 1), got 2"),
    (["placement.share_process=[[reference]]"], "lists groups of at least two"),
    (["placement.share_process=[[reference, reward], [reward, engine]]"], "names a role twice: ['reward']"),
    (["placement.share_process=[[reference, reward]]", "reward.num_ranks=2"], "need the same number of ranks"),
    (["placement.share_process=[[reference, reward]]", "reference.zero_stage=3"], "reference.zero_stage 3 joins"),
    (["placement.share_process=[[reference, reward]]", "placement.colocate=[[policy, reference]]"],
     "leave it out of placement.colocate"),
    (["placement.share_process=[[engine, reward]]", "rollout.max_staleness=1", "ppo.is_correction=tis"],
     "must be synchronous"),
    (["placement.share_process=[[reference, reward]]", "reference.cpu_cores=[0]"], "need the same cpu_cores"),
])
def test_shared_processes_are_checked(overrides, needle):
    with pytest.raises(ConfigError) as e:
        load_config("configs/tiny_ppo.yaml", BASE + overrides).check_ppo()
    assert needle in str(e.value) and "\n" not in str(e.value) and str(e.value).startswith(
        "config: placement.share_process "), str(e.value)
    ok = load_config("configs/tiny_ppo.yaml", BASE + ["placement.share_process=[[engine, reference, reward]]"])
    assert ok.check_ppo().placement.share_process == [["engine", "reference", "reward"]]


def test_the_hybrid_layout_loads_weights_in_place_and_only_it_does():
    """The policy and the engine in one process (placement.share_process) resolve weight_sync.backend auto to
    in_process and refuse any other channel; in_process takes that layout; the policy may also share with the frozen
    roles alone (the engine apart, e.g. off-policy), where auto is the object store."""
    hybrid = BASE + ["placement.share_process=[[policy, engine, reference, reward]]", "policy.num_ranks=1"]
    assert load_config("configs/tiny_grpo.yaml", hybrid).check_ppo().weight_sync.backend == "in_process"
    with pytest.raises(ConfigError, match=r"^config: weight_sync.backend must be in_process \(or auto\) when the "
                                          r"policy and the engine share a process .*got object_store$"):
        load_config("configs/tiny_grpo.yaml", hybrid + ["weight_sync.backend=object_store"]).check_ppo()
    apart = BASE + ["placement.share_process=[[policy, reference, reward]]", "policy.num_ranks=1",
                    "rollout.max_staleness=1", "ppo.is_correction=tis"]
    with pytest.raises(ConfigError, match=r"^config: weight_sync.backend in_process needs the engine in the policy's"):
        load_config("configs/tiny_grpo.yaml", apart + ["weight_sync.backend=in_process"]).check_ppo()
    assert load_config("configs/tiny_grpo.yaml", apart).check_ppo().weight_sync.backend == "object_store"
    with pytest.raises(ConfigError, match="must be synchronous"):
        load_config("configs/tiny_grpo.yaml", hybrid + ["rollout.max_staleness=1", "ppo.is_correction=tis"]).check_ppo()
    assert load_config("configs/tiny_ppo.yaml", BASE).check_ppo().weight_sync.backend == "object_store"


@pytest.mark.parametrize("override, needle", [
    ("engine.num_engines=2", "'engine.num_engines' is now 'engine.num_ranks'"),
    ("judge.engine.cpus_per_engine=2", "'judge.engine.cpus_per_engine' is now 'judge.engine.cpus_per_rank'"),
    ("env.num_workers=2", "'env.num_workers' is now 'env.num_ranks'"),
    ("env.gpus_per_rank=1", "env environment workers take CPUs only"),
    ("judge.engine.num_ranks=0", "judge.engine.num_ranks must be >= 1"),
    ("reward.cpus_per_rank=-1", "reward.cpus_per_rank must be a finite number >= 0"),
    ("sft.trainer.gpus_per_rank=nan", "sft.trainer.gpus_per_rank must be a finite number >= 0"),
    ("engine.cpu_cores=[]", "engine.cpu_cores must list core numbers"),
])
def test_every_role_names_its_resources_one_way(override, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config(None, BASE + [override])


def test_the_cpus_a_run_needs_count_only_the_roles_it_has():
    grpo = load_config(None, BASE + ["ppo.advantage=grpo", "critic.cpus_per_rank=8", "env.cpus_per_rank=8",
                                     "judge.engine.cpus_per_rank=8", "policy.num_ranks=2", "engine.num_ranks=3"])
    assert grpo.cpus_needed() == 2 * 1.0 + 1.0 + 1.0 + 3 * 1.0            # policy, reference, reward, engines
    gae = load_config(None, BASE + ["critic.cpus_per_rank=8", "reference.from_policy_base=true"])
    assert gae.cpus_needed() == 1.0 + 8.0 + 1.0 + 1.0                     # policy, critic, reward, engine
    assert load_config(None, BASE + ["sft.trainer.num_ranks=16"]).cpus_needed() == 16.0


def test_a_labeler_pool_is_checked_with_the_pipeline():
    pool = "pipeline.labelers=[{name: a, noise: 0.2}, {name: b, bias: careless, strength: 0.5}]"
    cfg = load_config("configs/tiny_world.yaml", [pool]).check_pipeline()
    assert [(lab.name, lab.bias, lab.strength) for lab in cfg.pipeline.labelers] == [("a", "none", 0.0),
                                                                                     ("b", "careless", 0.5)]
    for sets, needle in [([pool, "pipeline.labels=judge"], "pipeline.labelers is a pool of simulated labelers"),
                         (["pipeline.labelers=[{name: a}, {name: a}]"], "needs a distinct, non-empty name"),
                         (["pipeline.labelers=[{name: a, bias: careless, strength: 2}]"], r"labelers\[a\] careless"),
                         (["pipeline.labelers=[{name: a, bias: lazy}]"], "bias")]:
        with pytest.raises(ConfigError, match=needle):
            load_config("configs/tiny_world.yaml", sets).check_pipeline()
