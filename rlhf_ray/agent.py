"""Agents as people write them (agent.cls): the user's own agent loop, calling the policy through an OpenAI-compatible
endpoint during rollout, recorded token for token.

    async def solve(base_url: str, api_key: str, row: dict) -> float | None:     # agent.cls: "my_pkg.agents:solve"
        client = openai.AsyncOpenAI(base_url=base_url, api_key=api_key)
        messages = [{"role": "user", "content": row["prompt"]}]
        while True:
            reply = (await client.chat.completions.create(model="policy", messages=messages, tools=TOOLS)).choices[0]
            messages.append(reply.message.model_dump(exclude_none=True))
            if not reply.message.tool_calls:
                return float(row["answer"] in reply.message.content)     # or None: reward.sources score it
            for call in reply.message.tool_calls:
                messages.append({"role": "tool", "tool_call_id": call.id, "content": run_tool(call)})

One episode is one session of the gateway (actors/agent.py), its URL the agent's base_url. Its calls are stitched into
one trajectory here (`Trajectory`), never by re-tokenising text:

- The first call's prompt is rendered (chat: the chat template, `tools` included; completions: the text) and
  tokenised once: the trajectory's prompt.
- Each reply is the engine's own token ids and sampling logprobs (action 1), appended.
- A later call must extend what is recorded: its rendered prompt must start with the text the trajectory stands
  for (every earlier rendered prompt and the model's decoded turns). Only the new part (the tool results, a user
  turn, the next generation prompt) is tokenised, on its own, and appended with action 0, as an environment's
  observation is (rlhf_ray/env.py). A completions call with token ids must start with the recorded ids.
- A call that does not extend it is a mismatch, counted per episode: "edited" (the agent changed, dropped or
  forked earlier messages) or "rerendered" (the messages do extend, but the chat template renders earlier turns
  differently, e.g. one that strips an earlier turn's reasoning). The rule: the trajectory is cut there. What was
  recorded stays the episode's sample, and the episode's reward lands on its last recorded token. The call and
  any later ones are still answered, from the agent's prompt as rendered, but not recorded or trained on (counted
  as `untrained_calls`). Why not split the episode into several samples: a GRPO group is n samples of one prompt,
  and every estimator and minibatch here counts on that shape.

The tool-call format (agent.tool_format) says how a model's text carries tool calls: the stop strings that end a
call (one token each, like env.turn_stop), and `parse(text) -> (content, tool_calls)`. The chat template renders
them back; for the history to extend, it must render the parsed reply to the text the model wrote.
"""
from __future__ import annotations

import importlib
import inspect
import json
import math
from dataclasses import dataclass, field

from rlhf_ray.batch import AgentSample
from rlhf_ray.prompts import single_token_ids


class AgentError(RuntimeError):
    """An agent function or tool format that cannot be loaded; one line naming it."""


class BadRequest(ValueError):
    """A call the endpoint refuses: one line, answered with HTTP `status` (400; 410 for an episode that ended)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def load_agent(spec: str):
    """'package.module:function' -> the async agent function (importable where the agent workers run)."""
    module_name, _, attr = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as e:
        raise AgentError(f"agent.cls {spec!r}: cannot load it ({type(e).__name__}: {e})") from None
    if not inspect.iscoroutinefunction(fn):
        raise AgentError(f"agent.cls {spec!r}: not an async function (async def f(base_url, api_key, row))")
    return fn


def checked_reward(value) -> float | None:
    """An agent's return value: a finite number, or None (the reward sources score the trajectory)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise AgentError(f"returned {value!r}, not a finite number or None")
    return float(value)


class ToolFormat:
    """How the model's text carries tool calls. This base carries none: every reply is content."""
    stop: list[str] = []               # strings ending a turn that is a tool call (each one token of the tokenizer)

    def parse(self, text: str) -> tuple[str | None, list[dict]]:
        """The model's turn (special tokens dropped) -> (content, [{"name", "arguments": dict}])."""
        return text, []


def load_tool_format(spec: str) -> ToolFormat:
    if not spec:
        return ToolFormat()
    module_name, _, attr = spec.partition(":")
    try:
        cls = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as e:
        raise AgentError(f"agent.tool_format {spec!r}: cannot load it ({type(e).__name__}: {e})") from None
    if not (isinstance(cls, type) and callable(getattr(cls, "parse", None))):
        raise AgentError(f"agent.tool_format {spec!r}: not a class with parse(text)")
    return cls()


# ---------------------------------------------------------------------------------------------- requests
@dataclass
class Call:
    """One call to the endpoint, checked: what to render and how to sample."""
    kind: str                          # "chat" or "completion"
    messages: list[dict] | None        # chat: the conversation, tool-call arguments as dicts (what templates read)
    tools: list[dict] | None           # chat: the request's tools, handed to the chat template
    prompt: str | list[int] | None     # completion: text, or token ids
    max_tokens: int | None
    stop: list[str]
    asked_sampling: bool               # the call asked for its own temperature or top_p (the run's are used)
    logprobs: bool = False             # return each sampled token's logprob (the engine's, as recorded)


ROLES = {"system", "developer", "user", "assistant", "tool"}


def _content(value, where: str) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                                       for p in value):
        return "".join(p["text"] for p in value)
    raise BadRequest(f"{where}.content: must be a string or a list of text parts")


def _message(m, i: int) -> dict:
    where = f"messages[{i}]"
    if not isinstance(m, dict):
        raise BadRequest(f"{where}: must be an object")
    role = m.get("role")
    if role not in ROLES:
        raise BadRequest(f"{where}.role: must be one of {sorted(ROLES)}, got {role!r}")
    out = {"role": role, "content": _content(m.get("content"), where)}
    calls = m.get("tool_calls") or []
    if role == "assistant" and calls:
        if not isinstance(calls, list):
            raise BadRequest(f"{where}.tool_calls: must be a list")
        out["tool_calls"] = []
        for j, c in enumerate(calls):
            fn = c.get("function") if isinstance(c, dict) else None
            if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                raise BadRequest(f"{where}.tool_calls[{j}]: needs function.name")
            args = fn.get("arguments", {})
            if isinstance(args, str):
                try:
                    args = json.loads(args) if args.strip() else {}
                except json.JSONDecodeError:
                    raise BadRequest(f"{where}.tool_calls[{j}].function.arguments: not JSON") from None
            out["tool_calls"].append({"id": c.get("id", ""), "type": "function",
                                      "function": {"name": fn["name"], "arguments": args}})
    for k in ("tool_call_id", "name"):
        if isinstance(m.get(k), str):
            out[k] = m[k]
    return out


def _stops(value) -> list[str]:
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise BadRequest("stop: must be a string or a list of non-empty strings")
    return stops


def parse_call(body, kind: str) -> Call:
    """A request body (parsed JSON) -> a Call, or a one-line BadRequest naming the field."""
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    if body.get("stream"):
        raise BadRequest("stream: streaming is not supported; call without it")
    if body.get("n", 1) != 1:
        raise BadRequest("n: must be 1 (one trajectory per session)")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1):
        raise BadRequest(f"max_tokens: must be a positive integer, got {max_tokens!r}")
    asked = any(body.get(k) is not None for k in ("temperature", "top_p"))
    top = body.get("top_logprobs") if kind == "chat" else body.get("logprobs")
    if top is not None and (isinstance(top, bool) or top != 0):
        raise BadRequest(f"{'top_logprobs' if kind == 'chat' else 'logprobs'}: only the sampled token's logprob is "
                         f"returned (0 or none), got {top!r}")
    logprobs = bool(body.get("logprobs")) if kind == "chat" else body.get("logprobs") == 0
    if kind == "chat":
        msgs = body.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise BadRequest("messages: must be a non-empty list")
        tools = body.get("tools")
        if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
            raise BadRequest("tools: must be a list of objects")
        return Call("chat", [_message(m, i) for i, m in enumerate(msgs)], tools, None, max_tokens,
                    _stops(body.get("stop")), asked, logprobs)
    prompt = body.get("prompt")
    if not (isinstance(prompt, str) and prompt) and not (
            isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)):
        raise BadRequest("prompt: must be a non-empty string or a list of token ids")
    return Call("completion", None, None, prompt, max_tokens, _stops(body.get("stop")), asked, logprobs)


def same_history(sent: list[dict], recorded: list[dict]) -> bool:
    """Do the messages an agent sent begin with the recorded conversation (roles, text, tool calls' names and
    arguments; ids aside)?"""
    def key(m):
        return (m["role"], m.get("content") or "",
                [(c["function"]["name"], c["function"]["arguments"]) for c in m.get("tool_calls", [])])
    return len(sent) >= len(recorded) and all(key(a) == key(b) for a, b in zip(sent, recorded))


# ---------------------------------------------------------------------------------------------- trajectories
@dataclass
class Trajectory:
    """One episode's calls, stitched token for token (the module's docstring says how)."""
    budget: int                        # response tokens (turns and appended messages): generation.max_new_tokens
    prompt: list[int] = field(default_factory=list)      # [P] the first call's rendered prompt
    ids: list[int] = field(default_factory=list)         # [T] the model's turns and what the calls appended
    logprobs: list[float] = field(default_factory=list)  # [T] the engine's sampling logprobs; 0 on appended tokens
    action: list[int] = field(default_factory=list)      # [T] 1 where the model wrote the token
    text: str = ""                     # what prompt + ids stand for: the next call's rendered prompt must start so
    messages: list[dict] | None = None  # chat: the conversation recorded, the model's replies as parsed
    turns: int = 0                     # calls recorded
    cut: str | None = None             # why recording stopped: "edited" or "rerendered"
    untrained_calls: int = 0           # calls answered after the cut
    version: int = 0                   # the policy update whose weights sampled the turns
    length_refused: bool = False       # a call found the budget spent (answered empty, cut for length)

    @property
    def started(self) -> bool:
        return bool(self.prompt)

    @property
    def room(self) -> int:
        return self.budget - len(self.ids)

    def begin(self, prompt_ids: list[int], text: str, messages: list[dict] | None) -> None:
        self.prompt, self.text, self.messages = list(prompt_ids), text, messages

    def mismatch(self, text: str | None, ids: list[int] | None, messages: list[dict] | None) -> str | None:
        """Does a call's rendered prompt (text, or token ids) extend what is recorded? None, or the mismatch."""
        if ids is not None:
            return None if ids[:len(self.prompt) + len(self.ids)] == self.prompt + self.ids else "edited"
        if text.startswith(self.text):
            return None
        if messages is not None and self.messages is not None and same_history(messages, self.messages):
            return "rerendered"
        return "edited"

    def append(self, ids: list[int], text: str, messages: list[dict] | None) -> None:
        """What a call added past the recorded history (its ids, tokenised on their own), as action 0."""
        self.ids += ids
        self.logprobs += [0.0] * len(ids)
        self.action += [0] * len(ids)
        self.text, self.messages = text, messages

    def add_turn(self, ids: list[int], logprobs: list[float], text: str, reply: dict | None, version: int) -> None:
        """The model's turn: the engine's ids and logprobs, its decoded text (special tokens kept), and the reply
        as the agent will send it back (chat)."""
        self.ids += ids
        self.logprobs += logprobs
        self.action += [1] * len(ids)
        self.text += text
        if self.messages is not None and reply is not None:
            self.messages = self.messages + [reply]
        self.turns += 1
        self.version = max(self.version, version)

    def context(self) -> list[int]:
        return self.prompt + self.ids

    def sample(self, reward: float, ended: str, error: str | None, metrics: dict[str, float]) -> AgentSample:
        """The episode as the rollout takes it (rlhf_ray/batch.py): `reward` on its last action token."""
        token_rewards = [0.0] * len(self.ids)
        last = max((i for i, a in enumerate(self.action) if a), default=None)
        if last is not None:
            token_rewards[last] = reward
        observed = len(self.ids) - sum(self.action)
        summary = {"turns": self.turns, "observation_tokens": observed, "action_tokens": sum(self.action),
                   "ended": ended, "error": error, "reward": reward if last is not None else 0.0,
                   "metrics": {"untrained_calls": float(self.untrained_calls),
                               "cut_edited": float(self.cut == "edited"),
                               "cut_rerendered": float(self.cut == "rerendered"), **metrics}}
        return AgentSample(ids=list(self.ids), logprobs=list(self.logprobs), finished=ended == "done",
                             version=self.version, action=list(self.action), token_rewards=token_rewards,
                             episode=summary, prompt=list(self.prompt))


def unreachable(host: str, gateway_ip: str, worker_ips: list[str]) -> str | None:
    """Why agent workers cannot reach a gateway bound to a loopback `host` (one on another node), or None."""
    if host not in ("127.0.0.1", "localhost", "::1"):
        return None
    far = [i for i, ip in enumerate(worker_ips) if ip != gateway_ip]
    if not far:
        return None
    return (f"agent.host {host}: agent worker {far[0]} runs on node {worker_ips[far[0]]} and the gateway on "
            f"{gateway_ip}, which it cannot reach on loopback; set agent.host: 0.0.0.0, or pin both to one node with "
            "agent.node_resource")


def one_token_stops(tokenizer, strings: list[str], where: str) -> list[int]:
    """A call's (or the tool format's) stop strings as token ids, each one token (rlhf_ray/prompts.py); a
    BadRequest otherwise."""
    try:
        return single_token_ids(tokenizer, strings, where)
    except ValueError as e:
        raise BadRequest(str(e)) from None


# ---------------------------------------------------------------------------------------------- responses
def token_logprobs(tokens: list[str], logprobs: list[float], kind: str) -> dict:
    """The sampled tokens' logprobs in the response's shape (chat or completion); no alternatives."""
    if kind == "chat":
        return {"content": [{"token": t, "logprob": lp, "bytes": list(t.encode()), "top_logprobs": []}
                            for t, lp in zip(tokens, logprobs)], "refusal": None}
    offsets = [sum(len(t) for t in tokens[:i]) for i in range(len(tokens))]
    return {"tokens": tokens, "token_logprobs": logprobs, "top_logprobs": None, "text_offset": offsets}


def chat_response(call_id: str, model: str, content: str | None, tool_calls: list[dict], finish: str,
                  prompt_tokens: int, completion_tokens: int, created: int, logprobs: dict | None = None) -> dict:
    """An OpenAI chat.completion object."""
    calls = [{"id": f"call_{call_id}_{i}", "type": "function",
              "function": {"name": c["name"], "arguments": json.dumps(c["arguments"])}}
             for i, c in enumerate(tool_calls)]
    message = {"role": "assistant", "content": content, **({"tool_calls": calls} if calls else {})}
    return {"id": f"chatcmpl-{call_id}", "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": message, "finish_reason": finish, "logprobs": logprobs}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens}}


def completion_response(call_id: str, model: str, text: str, finish: str, prompt_tokens: int,
                        completion_tokens: int, created: int, logprobs: dict | None = None) -> dict:
    """An OpenAI text_completion object."""
    return {"id": f"cmpl-{call_id}", "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": logprobs}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens}}


def reply_message(content: str | None, tool_calls: list[dict]) -> dict:
    """The reply as the recorded conversation holds it (what `same_history` compares the agent's copy with)."""
    m = {"role": "assistant", "content": content or ""}
    if tool_calls:
        m["tool_calls"] = [{"id": "", "type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}}
                           for c in tool_calls]
    return m
