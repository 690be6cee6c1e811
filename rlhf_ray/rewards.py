"""Rewards beyond a reward model: rule functions given as `module:function` and remote HTTP scorers, and the
weighted sum of several sources. The reward actor (actors/reward.py) runs them; nothing here knows Ray.

A text source scores a batch: fn(prompts: list[str], responses: list[str], **fields) -> list[float] (one per
response); prompts are the data rows' prompt strings as written (no chat template: a scorer sees the question,
not our rendering of it), responses are decoded with special tokens dropped, and `fields` are the prompt rows'
data.reward_keys (e.g. answer=[...]), one entry per response; a function gets those of them it names as
parameters (all of them if it takes **kwargs).
The HTTP protocol: POST {"prompts": [...], "responses": [...], <field>: [...]} as JSON; the answer is {"rewards": [...]} (or a
bare list) with one finite number per response. Requests are batched, time out, and are retried with
exponential backoff on connection errors, timeouts and 5xx answers; an answer that is not that shape is an
error naming the endpoint and what came back.
"""
from __future__ import annotations

import importlib
import json
import math
import os
import time
import urllib.error
import urllib.request
from typing import Callable

import torch

TextScorer = Callable[[list[str], list[str]], list[float]]


class RewardSourceError(RuntimeError):
    """A reward source that cannot be loaded or answered something unusable; one line naming it."""


def load_function(spec: str) -> TextScorer:
    """'package.module:function' -> the callable (the module must be importable where the reward actor runs)."""
    module_name, _, attr = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise RewardSourceError(f"reward function {spec!r}: cannot load it ({type(e).__name__}: {e})") from None
    if not callable(fn):
        raise RewardSourceError(f"reward function {spec!r}: {type(fn).__name__} is not callable")
    return fn


def check_scores(values, n: int, where: str) -> list[float]:
    if isinstance(values, dict):
        values = values.get("rewards")
    if isinstance(values, torch.Tensor):
        values = values.tolist()
    if not isinstance(values, (list, tuple)) or len(values) != n:
        raise RewardSourceError(f"{where}: expected {n} rewards, got {_snippet(values)}")
    out = []
    for i, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise RewardSourceError(f"{where}: reward {i} is {v!r}, not a finite number")
        out.append(float(v))
    return out


def _snippet(x, limit: int = 120) -> str:
    s = repr(x)
    return s if len(s) <= limit else s[:limit] + "..."


class HttpScorer:
    """A remote scorer: batched POSTs with a timeout, retries with backoff, and a bearer token from the
    environment (never logged)."""

    def __init__(self, url: str, batch_size: int = 64, timeout_s: float = 30.0, retries: int = 3,
                 auth_env: str | None = None, backoff_s: float = 0.5):
        self.url, self.batch_size, self.timeout_s, self.retries, self.backoff_s = url, batch_size, timeout_s, retries, backoff_s
        self.headers = {"Content-Type": "application/json"}
        if auth_env:
            token = os.environ.get(auth_env)
            if not token:
                raise RewardSourceError(f"reward http {url}: environment variable {auth_env} is not set")
            self.headers["Authorization"] = f"Bearer {token}"

    def __call__(self, prompts: list[str], responses: list[str], **fields) -> list[float]:
        out: list[float] = []
        for i in range(0, len(responses), self.batch_size):
            part = slice(i, i + self.batch_size)
            out += self._post({"prompts": prompts[part], "responses": responses[part],
                               **{k: v[part] for k, v in fields.items()}})
        return out

    def _post(self, payload: dict) -> list[float]:
        body = json.dumps(payload).encode()
        n = len(payload["responses"])
        last, attempts = "", 0
        for attempt in range(self.retries + 1):
            attempts += 1
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            req = urllib.request.Request(self.url, data=body, headers=self.headers, method="POST")
            try:
                with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                    raw = resp.read()
            except urllib.error.HTTPError as e:
                last = f"HTTP {e.code}"
                if e.code < 500:                      # the request itself is wrong: retrying will not help
                    break
                continue
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as e:
                last = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
                continue
            try:
                data = json.loads(raw)
            except ValueError:
                raise RewardSourceError(f"reward http {self.url}: answered non-JSON {_snippet(raw[:200])}") from None
            return check_scores(data, n, f"reward http {self.url}")
        raise RewardSourceError(f"reward http {self.url}: failed after {attempts} attempt(s) ({last})")


def text_scorer(kind: str, path: str, **http) -> TextScorer:
    if kind == "function":
        fn = load_function(path)
        accepts = _accepted_fields(fn)
        return lambda p, r, **fields: check_scores(
            fn(p, r, **{k: v for k, v in fields.items() if accepts is None or k in accepts}), len(r),
            f"reward function {path!r}")
    if kind == "http":
        return HttpScorer(path, **http)
    raise ValueError(f"not a text reward source: {kind}")


def _accepted_fields(fn) -> set[str] | None:
    """The keyword fields a rule function takes (None: all of them, it has **kwargs), so a rule that needs no
    row fields keeps the plain fn(prompts, responses) signature."""
    import inspect
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):                   # builtins without a signature: give them none
        return set()
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def combine(per_source: torch.Tensor, weights: list[float]) -> torch.Tensor:
    """[B, S] scores of S sources -> [B] weighted sum."""
    return per_source.float() @ torch.tensor(weights, dtype=torch.float32)
