import os

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")      # local test clusters; real clusters keep token auth
os.environ.setdefault("RAY_DEDUP_LOGS", "1")


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory):
    """The offline tiny world (tokenizer, briefly pretrained LM, reward model, prompts), built once per session."""
    from rlhf_ray.tiny import TinySpec, build_tiny_world
    out = tmp_path_factory.mktemp("tiny")
    return build_tiny_world(out, TinySpec(pretrain_steps=120))


def tiny_overrides(world: dict, run_dir) -> list[str]:
    """The tiny PPO config, pointed at the test's world and run directory, sized for a quick test."""
    return [f"models.policy={world['policy']}", f"models.reward={world['reward']}", f"data.prompts={world['prompts']}",
            f"run.output_dir={run_dir}", "generation.prompts_per_step=8", "ppo.minibatch_size=8",
            "generation.max_new_tokens=16", "train.steps=3", "checkpoint.every=0"]


@pytest.fixture(autouse=True)
def _fresh_ray_per_test():
    """Each test that starts Ray gets its own local cluster, sized by its own config (start_ray reuses a running
    one, so a cluster sized for one test could leave the next one's actors waiting for CPUs)."""
    yield
    import ray
    if ray.is_initialized():
        ray.shutdown()
