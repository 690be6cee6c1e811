"""Environments for multi-turn rollouts: what a user writes to let the policy act, observe and act again.

    class Calculator(Environment):                 # registered as env.cls: "my_pkg.tools:Calculator"
        def reset(self, row):                      # the prompt row (its JSONL fields); the first observation
            self.answer = row["answer"]            # appended after the prompt, or None
            return None
        def step(self, text, token_ids):           # the model's last turn, decoded and as the engine's ids
            if "<call>" in text: return EnvStep(observation=str(eval_expr(text)))     # appended, then it goes on
            return EnvStep(reward=float(text.strip() == self.answer), done=True)

One instance per episode, created by an environment worker (actors/env.py) beside the engines. The rollout stays
token in, token out: the engine's own ids for the model's turns, the observation tokenised once and appended as
ids, never a chat history re-rendered between turns (that changes the tokens the policy is trained on). A sample's
`action_mask` is 1 on what the model wrote and 0 on observations; every loss term, the KL and the advantages count
its 1s only (rlhf_ray/algos.py).

Rewards: each turn's reward lands on that turn's last action token (GAE sees it there; the outcome estimators
get the episode's sum), times the weight of the `kind: env` reward source; other sources (a reward model, a
judge, a rule) score the whole response as before, at its last action token.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field


class EnvError(RuntimeError):
    """An environment class that cannot be loaded or used; one line naming it."""


@dataclass
class EnvStep:
    """What an environment answers to one turn."""
    observation: str | None = None     # appended to the sample as tokens, then the model goes on (None: nothing)
    reward: float = 0.0                # this turn's reward
    done: bool = False                 # the episode ends here (no observation is appended)
    metrics: dict[str, float] = field(default_factory=dict)   # counts to log (e.g. tool_calls, invalid_calls):
                                       # summed over the episode, logged as env/<name>_mean per step


class Environment:
    """Base of user environments: one instance per episode. Override `step`, and `reset` when the first
    observation or the episode's state comes from the prompt row."""

    def reset(self, row: dict) -> str | None:
        return None

    def step(self, text: str, token_ids: list[int]) -> EnvStep:
        raise NotImplementedError


def load_env_class(spec: str) -> type:
    """'package.module:Class' -> the class (importable where the environment workers run)."""
    module_name, _, attr = spec.partition(":")
    try:
        cls = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as e:
        raise EnvError(f"env.cls {spec!r}: cannot load it ({type(e).__name__}: {e})") from None
    if not isinstance(cls, type) or not callable(getattr(cls, "step", None)):
        raise EnvError(f"env.cls {spec!r}: not a class with a step(text, token_ids) method")
    return cls


def checked_step(out, where: str) -> EnvStep:
    """An environment's answer, checked: an EnvStep with a str-or-None observation, a finite reward, a bool done."""
    import math
    if not isinstance(out, EnvStep):
        raise EnvError(f"{where}: step returned {type(out).__name__}, not an EnvStep")
    if out.observation is not None and not isinstance(out.observation, str):
        raise EnvError(f"{where}: observation is {type(out.observation).__name__}, not str or None")
    if isinstance(out.reward, bool) or not isinstance(out.reward, (int, float)) or not math.isfinite(out.reward):
        raise EnvError(f"{where}: reward {out.reward!r} is not a finite number")
    if not isinstance(out.done, bool):
        raise EnvError(f"{where}: done is {type(out.done).__name__}, not bool")
    if not isinstance(out.metrics, dict) or not all(isinstance(k, str) and isinstance(v, (int, float))
                                                    and math.isfinite(v) for k, v in out.metrics.items()):
        raise EnvError(f"{where}: metrics must map names to finite numbers")
    return out


@dataclass
class Episode:
    """One sample's multi-turn response as it grows: the model's turns and the observations between them, token
    for token, and where each turn ended. `ended` says why it stopped: "done" (the environment said so), "eos",
    "turns" (env.max_turns), "length" (generation.max_new_tokens), "error" or "timeout" (the environment failed:
    the episode ends there with env.error_reward added to its last turn)."""
    ids: list[int] = field(default_factory=list)          # [T_i] response: turns and observations
    logprobs: list[float] = field(default_factory=list)   # [T_i] sampling logprobs; 0 on observations
    action: list[int] = field(default_factory=list)       # [T_i] 1 where the model wrote the token
    turn_ends: list[int] = field(default_factory=list)    # the index in ids of each turn's last token
    turn_rewards: list[float] = field(default_factory=list)   # each turn's reward, by turn
    turns: int = 0
    observation_tokens: int = 0
    ended: str | None = None
    error: str | None = None                              # the environment's failure, one line
    metrics: dict[str, float] = field(default_factory=dict)   # the environment's counts, summed over turns

    def add_turn(self, ids: list[int], logprobs: list[float]) -> None:
        self.ids += ids
        self.logprobs += logprobs
        self.action += [1] * len(ids)
        self.turn_ends.append(len(self.ids) - 1)
        self.turn_rewards.append(0.0)
        self.turns += 1

    def add_observation(self, ids: list[int]) -> None:
        self.ids += ids
        self.logprobs += [0.0] * len(ids)
        self.action += [0] * len(ids)
        self.observation_tokens += len(ids)

    def reward_turn(self, reward: float) -> None:
        """Add `reward` to the last turn's (an episode ended before its first turn has nowhere to put it)."""
        if self.turn_rewards:
            self.turn_rewards[-1] += reward

    def token_rewards(self) -> list[float]:
        """[T_i]: each turn's reward on its last action token, 0 elsewhere."""
        out = [0.0] * len(self.ids)
        for end, r in zip(self.turn_ends, self.turn_rewards):
            out[end] += r
        return out

    def summary(self) -> dict:
        """What the step's metrics count (launch/ppo.py): turns, tokens, why it ended, the environment's counts."""
        return {"turns": self.turns, "observation_tokens": self.observation_tokens,
                "action_tokens": sum(self.action), "ended": self.ended, "error": self.error,
                "reward": sum(self.turn_rewards), "metrics": dict(self.metrics)}


def env_stop_ids(tokenizer, strings: list[str]) -> list[int]:
    """env.turn_stop as token ids of the policy's tokenizer, each string one token (rlhf_ray/prompts.py)."""
    from rlhf_ray.prompts import single_token_ids
    try:
        return single_token_ids(tokenizer, strings, "env.turn_stop")
    except ValueError as e:
        raise EnvError(str(e)) from None


def episode_metrics(episodes: list[dict], prefix: str = "env") -> dict[str, float]:
    """One step's episodes (Episode.summary, or an agent's: rlhf_ray/agent.py) -> <prefix>/* metrics: means per
    episode, failures counted, and the share of episodes that ended each way."""
    n = max(len(episodes), 1)
    m = {f"{prefix}/{k}_mean": sum(e[k] for e in episodes) / n
         for k in ("turns", "action_tokens", "observation_tokens", "reward")}
    m[f"{prefix}/errors"] = sum(e["ended"] == "error" for e in episodes)
    m[f"{prefix}/timeouts"] = sum(e["ended"] == "timeout" for e in episodes)
    for why in ENDINGS:
        m[f"{prefix}/ended_{why}_frac"] = sum(e["ended"] == why for e in episodes) / n
    for k in sorted({k for e in episodes for k in e["metrics"]}):
        m[f"{prefix}/{k}_mean"] = sum(e["metrics"].get(k, 0.0) for e in episodes) / n
    return m


def failure_line(episodes: list[dict] | None, what: str) -> str | None:
    """One line on a step's failed episodes (ended "error" or "timeout"): how many, and the first one's error."""
    bad = [e for e in episodes or [] if e["ended"] in ("error", "timeout")]
    if not bad:
        return None
    errors = sum(e["ended"] == "error" for e in bad)
    first = next((e["error"] for e in bad if e.get("error")), None)
    counts = f"{errors} error{'s' * (errors != 1)}, {len(bad) - errors} timeout{'s' * (len(bad) - errors != 1)}"
    return (f"{len(bad)} of {len(episodes)} {what} episodes failed ({counts})"
            + (f"; the first: {first}" if first else ""))


ENDINGS = ("done", "eos", "turns", "length", "error", "timeout")
