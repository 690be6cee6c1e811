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
    from rlhf_ray.tiny_world.world import TinySpec, build_tiny_world
    out = tmp_path_factory.mktemp("tiny")
    return build_tiny_world(out, TinySpec(pretrain_steps=120))


def tiny_overrides(world: dict, run_dir) -> list[str]:
    """The tiny PPO config, pointed at the test's world and run directory, sized for a quick test."""
    return [f"models.policy={world['policy']}", f"models.reward={world['reward']}", f"data.prompts={world['prompts']}",
            f"run.output_dir={run_dir}", "generation.prompts_per_step=8", "ppo.minibatch_size=8",
            "generation.max_new_tokens=16", "train.steps=3", "checkpoint.every=0",
            "placement.share_process=[[engine, reference, reward]]"]    # two processes fewer to start (actors/host.py)


# The hybrid layout (actors/host.py) for a synchronous one-rank policy: one worker process for the policy, the engine
# and the frozen roles, two fewer to start than tiny_overrides' layout (each ~5 CPU-s of imports on a 2-core box)
HYBRID = ["policy.num_ranks=1", "placement.share_process=[[policy, engine, reference, reward]]"]
# One step off-policy the engine samples beside the update, in a process of its own; the rest share one
OFF_POLICY_LAYOUT = ["policy.num_ranks=1", "placement.share_process=[[policy, reference, reward]]"]


SHARED_CLUSTER_CPUS = 16        # logical CPUs: room for every in-process test's layout (the actors share the cores)


@pytest.fixture
def ray_cluster():
    """The session's one local Ray cluster, started on first use and kept between tests: starting one costs ~6 s,
    and each in-process end-to-end test tears its own actors and placement groups down (train() does, and the
    tests that keep actors shut them down). It dies with the session (launch/reaper.py)."""
    import ray
    if not ray.is_initialized():
        from launch.common import start_ray
        from rlhf_ray.config import load_config
        start_ray(load_config(None, [f"ray.num_cpus={SHARED_CLUSTER_CPUS}"]))
    yield


@pytest.fixture(autouse=True)
def _shared_ray_for_slow_tests(request):
    """Slow tests run on the shared cluster, unless marked own_cluster (they start and stop their own: it is shut
    down before them and started again on next use); quick tests start none."""
    import ray
    if request.node.get_closest_marker("own_cluster"):
        if ray.is_initialized():
            ray.shutdown()
        yield
        if ray.is_initialized():
            ray.shutdown()
    elif request.node.get_closest_marker("slow"):
        request.getfixturevalue("ray_cluster")
        yield
    else:
        yield


class AccumulatingEngine:
    """DeepSpeed's contract with a training loop, as arithmetic: backward() scales the micro-batch loss by
    1 / gradient_accumulation_steps and accumulates; step() applies the optimizer once every
    gradient_accumulation_steps micro-batches (here: records the gradient and zeroes it)."""

    def __init__(self, model, gas: int):
        self.model, self.gas, self.micro_steps, self.skipped_steps, self.global_steps = model, gas, 0, 0, 0
        self.steps = []                  # the gradient (flat) at each optimizer step

    def gradient_accumulation_steps(self) -> int:
        return self.gas

    def train(self):
        self.model.train()

    def backward(self, loss):
        (loss / self.gas).backward()

    def step(self):
        self.micro_steps += 1
        if self.micro_steps % self.gas == 0:
            import torch                 # not at the top: the environment above must be set before torch loads
            self.steps.append(torch.cat([p.grad.flatten() for p in self.model.parameters() if p.grad is not None]))
            self.model.zero_grad()
            self.global_steps += 1
