"""Small environments the end-to-end tests run multi-turn episodes with (env.cls "tests.episode_envs:...": the Ray
workers import it from the repository root, their working directory). Each is real user code for the environment
workers, not a stand-in for anything of ours."""
import time

from rlhf_ray.env import Environment, EnvStep

OBSERVATION = " ok."


class OneTurn(Environment):
    """Every episode ends after the model's first turn, with no reward: a single-turn rollout run through the
    multi-turn machinery (it must reproduce the plain single-turn run bit for bit)."""

    def step(self, text, token_ids):
        return EnvStep(done=True)


class Echo(Environment):
    """A turn ends on "." (env.turn_stop); the tool answers OBSERVATION and the model goes on, up to env.max_turns.
    Reward: 1 for each turn of at least 3 tokens. The prompt row's `tool` field picks how the tool behaves:
    "ok" (also when the row has none), "raise" (an exception on the first turn) or "hang" (its first turn sleeps 5 s,
    past env.timeout_s)."""

    def reset(self, row):
        self.tool = row.get("tool", "ok")
        return None

    def step(self, text, token_ids):
        if self.tool == "raise":
            raise RuntimeError("the tool crashed")
        if self.tool == "hang":
            time.sleep(5.0)
        return EnvStep(observation=OBSERVATION, reward=float(len(token_ids) >= 3), metrics={"tool_calls": 1})
