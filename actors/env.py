"""Environment workers: the user's environments (rlhf_ray/env.py), one instance per episode, beside the engines.

An engine running multi-turn episodes (actors/engine.py `episodes`) sends each episode's turns here, one call per
episode and turn, and waits for them with env.timeout_s. A worker serves 64 calls at once on threads,
so one slow tool does not hold up the other episodes' calls. What a worker does not do: interrupt a Python
`step` that never returns (a thread cannot be killed). That episode ends as "timeout" at the engine; the call
keeps its thread until it returns. Tools that run code or can hang belong in a subprocess with a wall timeout
(rlhf_ray/sandbox.py), which is killed.

The worker decodes the model's turn (the environment sees text and ids) and tokenises the observation with the
policy's tokenizer, so the engine only ever handles token ids.
"""
from __future__ import annotations

import threading

import ray

from actors.base import RankActor, busy
from rlhf_ray.env import EnvError, checked_step, load_env_class
from rlhf_ray.models import load_tokenizer


def one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:200]}" if text else type(e).__name__


class EnvWorker(RankActor):
    def __init__(self, rank: int, world_size: int, cfg, device: str):
        super().__init__(rank, world_size, "cpu", role="env", seed=cfg.run.seed, threads=1)
        self.cls = load_env_class(cfg.env.cls)
        self.tokenizer = load_tokenizer(cfg.models.tokenizer or cfg.models.policy, cfg.models.trust_remote_code)
        self.live: dict[str, object] = {}          # episode key -> its environment
        self.lock = threading.Lock()

    def ready(self) -> bool:
        return super().ready()

    def _observation(self, text: str | None) -> list[int] | None:
        return None if text is None else self.tokenizer(text, add_special_tokens=False)["input_ids"]

    @busy
    def reset(self, key: str, row: dict) -> dict:
        """A new episode for the prompt row: {"obs": ids or None} or {"error": one line}."""
        try:
            env = self.cls()
            with self.lock:
                self.live[key] = env
            first = env.reset(row)
            if first is not None and not isinstance(first, str):
                raise EnvError(f"reset returned {type(first).__name__}, not str or None")
            return {"obs": self._observation(first)}
        except Exception as e:       # the user's code: any failure ends this episode, never the run
            return {"error": one_line(e)}

    @busy
    def step(self, key: str, ids: list[int]) -> dict:
        """The model's turn -> {"obs": ids or None, "reward", "done", "metrics"} or {"error": one line}."""
        try:
            with self.lock:
                env = self.live[key]
            out = checked_step(env.step(self.tokenizer.decode(ids, skip_special_tokens=True), list(ids)),
                               f"env {type(env).__name__}")
            return {"obs": None if out.done else self._observation(out.observation), "reward": float(out.reward),
                    "done": out.done, "metrics": {k: float(v) for k, v in out.metrics.items()}}
        except Exception as e:
            return {"error": one_line(e)}

    def close(self, keys: list[str]) -> int:
        """Drop these episodes' environments (also those whose calls timed out)."""
        with self.lock:
            for k in keys:
                env = self.live.pop(k, None)
                if env is not None and hasattr(env, "close"):
                    try:
                        env.close()
                    except Exception:
                        pass
        return len(keys)


# Calls served at once per worker, on threads: enough that a few hung environments leave room for the rest.
EnvWorkerActor = ray.remote(max_concurrency=64)(EnvWorker)
