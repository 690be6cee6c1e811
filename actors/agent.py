"""Agents through an OpenAI-compatible endpoint (agent.cls; rlhf_ray/agent.py says how calls become trajectories).

    Gateway       one actor: the HTTP endpoint (/<session>/v1/chat/completions, /<session>/v1/completions,
                  /<session>/v1/models), a session per episode, and the batching of every session's calls onto
                  the engines (`Engine.complete`: each call with its own seed, budget and stop tokens)
    AgentWorker   agent.num_ranks of them: they run the user's async agent functions, up to 1,000 at once each, on
                  the worker's event loop (so one client, made once, can serve them all), each within agent.timeout_s.
                  An agent must not block the loop: blocking code belongs in asyncio.to_thread

A step's episodes (`Gateway.episodes`): open a session per episode, with its seed (`turn_seed(seed, t)` samples
its t-th call, as env.cls episodes are sampled) and its budget (generation.max_new_tokens); start each agent on a
worker with the session's base_url and the run's api key; wait for all of them (each bounded); close the sessions
and return their trajectories. A call to a closed session gets 410 and counts in agent/late_calls.

Failures, each one line and counted, the run going on: an agent that raises or returns something other than a
number or None ("error"), one past agent.timeout_s ("timeout"): agent.error_reward on its last recorded token. A
malformed call gets a 400 naming the field (agent/malformed_calls_mean); the agent sees it and may go on. A call
past the episode's token budget is answered with an empty reply cut for length, and the episode ends "length". A
wrong api key: 401. The endpoint binds agent.host (127.0.0.1 unless set), and answers only with the run's api key,
generated per run and never logged.
"""
from __future__ import annotations

import asyncio
import collections
import json
import secrets
import time

import ray

from actors.base import RankActor
from actors.engine import turn_seed
from rlhf_ray.agent import (AgentError, BadRequest, Trajectory, chat_response, checked_reward, completion_response,
                            load_agent, load_tool_format, one_token_stops, parse_call, reply_message,
                            token_logprobs)
from rlhf_ray.models import load_tokenizer
from rlhf_ray.prompts import DEFAULT_CHAT_TEMPLATE

MODEL_NAME = "policy"          # what /v1/models lists; any model name in a call is served by the policy
QUIET_S = 0.02                 # a batch waits for calls while they keep arriving this often ...
LINGER_S = 0.25                # ... at most this long after its first


def one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:200]}" if text else type(e).__name__


class Session:
    def __init__(self, seed: int, budget: int):
        self.seed, self.traj, self.calls = seed, Trajectory(budget), 0
        self.lock = asyncio.Lock()          # one call at a time: each must see the previous one's reply
        self.closed = False
        self.malformed = 0
        self.asked_sampling = 0


class Gateway(RankActor):
    def __init__(self, rank: int, world_size: int, cfg, device: str):
        super().__init__(rank, world_size, "cpu", role="gateway", seed=cfg.run.seed, threads=1)
        a = cfg.agent
        self.agent, self.gen = a, cfg.generation
        self.tokenizer = load_tokenizer(cfg.models.tokenizer or cfg.models.policy, cfg.models.trust_remote_code)
        self.template = (open(a.chat_template).read() if a.chat_template
                         else self.tokenizer.chat_template or DEFAULT_CHAT_TEMPLATE)
        self.format = load_tool_format(a.tool_format)
        self.format_stops = one_token_stops(self.tokenizer, self.format.stop, "agent.tool_format stop")
        self.max_model_len = cfg.engine.max_model_len
        self.api_key = secrets.token_urlsafe(24)
        self.sessions: dict[str, Session] = {}
        self.ended = collections.OrderedDict()     # recently closed sessions (a later call: 410, not 404)
        self.counters = collections.Counter()      # late_calls, unknown_sessions, unauthorized
        self.pending: list[tuple[dict, asyncio.Future]] = []
        self.wake: asyncio.Event | None = None     # set when calls are pending (made in the actor's event loop)
        self.dispatchers: list[asyncio.Task] = []
        self.engines: list = []
        self.inflight = 0                          # calls on the engines now
        self.url = None
        self.episodes_s = 0.0                      # the wall time of the episodes since take_busy

    # ------------------------------------------------------------------------------------------ lifecycle
    async def serve(self) -> str:
        """Start the endpoint (once); its base address, e.g. http://127.0.0.1:PORT."""
        if self.url:
            return self.url
        self.wake = self.wake or asyncio.Event()
        from aiohttp import web
        app = web.Application(client_max_size=16 * 2 ** 20)
        app.router.add_post("/{session}/v1/chat/completions", self._chat)
        app.router.add_post("/{session}/v1/completions", self._completion)
        app.router.add_get("/{session}/v1/models", self._models)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, self.agent.host, self.agent.port)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        host = self.agent.host if self.agent.host not in ("0.0.0.0", "::") else ray.util.get_node_ip_address()
        self.url = f"http://{host}:{port}"
        return self.url

    async def attach_engines(self, engines: list) -> int:
        """The engines the calls go to: at start and after any replacement. One dispatcher per engine."""
        for t in self.dispatchers:
            t.cancel()
        self.wake = self.wake or asyncio.Event()
        self.dispatchers = [asyncio.create_task(self._dispatch(e)) for e in engines]
        self.engines = list(engines)
        return len(engines)

    async def ready(self) -> bool:
        return True

    async def take_counters(self) -> dict[str, float]:
        out = {f"agent/{k}": float(v) for k, v in self.counters.items()}
        self.counters.clear()
        return out

    # ------------------------------------------------------------------------------------------ batching
    async def _generate(self, request: dict) -> tuple[int, tuple]:
        fut = asyncio.get_running_loop().create_future()
        self.pending.append((request, fut))
        self.wake.set()
        return await fut

    async def _dispatch(self, engine) -> None:
        """Take pending calls to this engine, one batch at a time. A batch goes as soon as every open session that
        is not already generating has a call waiting (agents answered together call again together); otherwise once
        no call has arrived for QUIET_S (an agent still running its tools), at most LINGER_S after the first. With
        several engines each takes its share of what waits."""
        loop = asyncio.get_running_loop()
        while True:
            await self.wake.wait()
            first, seen = loop.time(), -1
            while len(self.pending) < len(self.sessions) - self.inflight:
                if len(self.pending) == seen or loop.time() - first > LINGER_S:
                    break
                seen = len(self.pending)
                await asyncio.sleep(QUIET_S)
            share = -(-len(self.pending) // max(1, len(self.engines)))
            batch, self.pending = self.pending[:share], self.pending[share:]
            if not self.pending:
                self.wake.clear()
            if not batch:
                continue
            self.inflight += len(batch)
            reqs = [r for r, _ in batch]
            try:
                version, outs = await engine.complete.remote(
                    [r["context"] for r in reqs], [r["max_tokens"] for r in reqs], [r["stop"] for r in reqs],
                    [r["seed"] for r in reqs], self.gen.temperature, self.gen.top_p)
            except Exception as e:          # the engine failed (or died): these calls fail, the episode decides
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(e)
                continue
            finally:
                self.inflight -= len(batch)
            for (_, fut), out in zip(batch, outs):
                if not fut.done():
                    fut.set_result((version, out))

    # ------------------------------------------------------------------------------------------ HTTP
    def _error(self, status: int, message: str):
        from aiohttp import web
        kind = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                410: "invalid_request_error"}.get(status, "server_error")
        return web.json_response({"error": {"message": message, "type": kind, "code": status}}, status=status)

    def _authorized(self, request) -> bool:
        given = request.headers.get("Authorization", "")
        return secrets.compare_digest(given.encode(), f"Bearer {self.api_key}".encode())

    async def _models(self, request):
        from aiohttp import web
        if not self._authorized(request):
            return self._error(401, "wrong or missing api key")
        return web.json_response({"object": "list", "data": [{"id": MODEL_NAME, "object": "model", "created": 0,
                                                              "owned_by": "rlhf-ray"}]})

    async def _chat(self, request):
        return await self._handle(request, "chat")

    async def _completion(self, request):
        return await self._handle(request, "completion")

    async def _handle(self, request, kind: str):
        from aiohttp import web
        if not self._authorized(request):
            self.counters["unauthorized_calls"] += 1
            return self._error(401, "wrong or missing api key")
        key = request.match_info["session"]
        sess = self.sessions.get(key)
        if sess is None or sess.closed:
            if key in self.ended or (sess is not None and sess.closed):
                self.counters["late_calls"] += 1
                return self._error(410, f"session {key}: its episode has ended")
            self.counters["unknown_sessions"] += 1
            return self._error(404, f"session {key}: no such episode")
        try:
            body = json.loads(await request.read())
        except (json.JSONDecodeError, UnicodeDecodeError):
            sess.malformed += 1
            return self._error(400, "the body is not JSON")
        async with sess.lock:
            if sess.closed:
                self.counters["late_calls"] += 1
                return self._error(410, f"session {key}: its episode has ended")
            try:
                out = await self._serve_call(sess, key, body, kind)
            except BadRequest as e:
                sess.malformed += e.status == 400
                return self._error(e.status, str(e))
        return web.json_response(out)

    def _render(self, messages: list[dict], tools) -> str:
        try:
            return self.tokenizer.apply_chat_template(messages, tools=tools, tokenize=False,
                                                      add_generation_prompt=True, chat_template=self.template)
        except Exception as e:        # a template that cannot render these messages
            raise BadRequest(f"messages: the chat template cannot render them ({one_line(e)})") from None

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    async def _serve_call(self, sess: Session, key: str, body, kind: str) -> dict:
        call = parse_call(body, kind)
        traj = sess.traj
        stop = self.format_stops + one_token_stops(self.tokenizer, call.stop, "stop")
        text = ids = None
        if kind == "chat":
            text = self._render(call.messages, call.tools)
        elif isinstance(call.prompt, str):
            text = call.prompt
        else:
            ids = list(call.prompt)
        recorded = True
        if not traj.started:
            prompt = ids if ids is not None else self._ids(text)
            if len(prompt) >= self.max_model_len:
                raise BadRequest(f"the prompt ({len(prompt)} tokens) leaves no room within engine.max_model_len "
                                 f"({self.max_model_len})")
            traj.begin(prompt, text if text is not None else "", call.messages)
        elif traj.cut:
            recorded = False
        else:
            why = traj.mismatch(text, ids, call.messages)
            if why:
                traj.cut, recorded = why, False
            else:
                new = ids[len(traj.context()):] if ids is not None else self._ids(text[len(traj.text):])
                if len(new) >= traj.room:
                    # The budget is spent: kept up to it (as an environment's observation is), answered with an
                    # empty reply cut for length, which an agent takes as the end (the episode ends "length").
                    traj.append(new[:traj.room], traj.text, traj.messages)
                    traj.length_refused = True
                    return self._reply(kind, key, sess, body, [], len(traj.context()), "", "length")
                traj.append(new, text if text is not None else traj.text, call.messages)
        if recorded:
            context = traj.context()
            max_tokens = min(call.max_tokens or traj.room, traj.room)
        else:
            traj.untrained_calls += 1
            context = ids if ids is not None else self._ids(text)
            max_tokens = call.max_tokens or self.gen.max_new_tokens
        max_tokens = min(max_tokens, self.max_model_len - len(context))
        if max_tokens < 1:
            raise BadRequest(f"the prompt ({len(context)} tokens) leaves no room within engine.max_model_len "
                             f"({self.max_model_len})")
        sess.asked_sampling += call.asked_sampling
        seed = turn_seed(sess.seed, sess.calls)
        sess.calls += 1
        version, (out_ids, logprobs, reason, stop_reason) = await self._generate(
            {"context": context, "max_tokens": max_tokens, "stop": stop, "seed": seed})
        tail = context[-8:]          # decoded in context: a tokenizer may drop a leading space at the start
        before = self.tokenizer.decode(tail, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        turn_text = self.tokenizer.decode(tail + out_ids, skip_special_tokens=False,
                                          clean_up_tokenization_spaces=False)[len(before):]
        visible = self.tokenizer.decode(out_ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        content, tool_calls = self.format.parse(visible) if kind == "chat" else (visible, [])
        if sess.closed:                # the episode ended while this call was generating
            self.counters["late_calls"] += 1
            raise BadRequest(f"session {key}: its episode has ended", status=410)
        if recorded:
            traj.add_turn(out_ids, logprobs, turn_text, reply_message(content, tool_calls) if kind == "chat" else None,
                          version)
        finish = "length" if reason == "length" else "tool_calls" if tool_calls else "stop"
        lps = (token_logprobs([self.tokenizer.decode([t]) for t in out_ids], logprobs, kind) if call.logprobs
               else None)
        return self._reply(kind, key, sess, body, tool_calls, len(context), content if kind == "chat" else visible,
                           finish, len(out_ids), lps)

    def _reply(self, kind: str, key: str, sess: Session, body: dict, tool_calls: list, prompt_tokens: int,
               text: str | None, finish: str, completion_tokens: int = 0, logprobs: dict | None = None) -> dict:
        call_id, created, model = f"{key}-{sess.calls}", int(time.time()), body.get("model") or MODEL_NAME
        if kind == "chat":
            return chat_response(call_id, model, text, tool_calls, finish, prompt_tokens, completion_tokens, created,
                                 logprobs)
        return completion_response(call_id, model, text, finish, prompt_tokens, completion_tokens, created, logprobs)

    # ------------------------------------------------------------------------------------------ episodes
    async def open(self, seeds: list[int], version: int = 0) -> list[str]:
        """A session per seed; their keys (what the base_url carries). `version`: the engines' weights, which an
        episode whose agent never calls is stamped with."""
        keys = []
        for seed in seeds:
            key = secrets.token_hex(8)
            self.sessions[key] = Session(seed, self.gen.max_new_tokens)
            self.sessions[key].traj.version = version
            keys.append(key)
        return keys

    async def close(self, keys: list[str], results: list[dict], with_reward: bool) -> list:
        """Close the sessions and return their trajectories as samples (rlhf_ray/batch.py AgentSample), each
        with its agent's result: {"reward": x or None}, {"error": line} or {"timeout": True}."""
        return [await self.close_one(k, r, with_reward) for k, r in zip(keys, results)]

    async def close_one(self, key: str, res: dict, with_reward: bool):
        """One session closed as soon as its agent is done (a later call is late: 410), as a sample."""
        sess = self.sessions.pop(key)
        sess.closed = True
        try:                                # a call in flight finishes first (its turn is not recorded)
            await asyncio.wait_for(sess.lock.acquire(), self.agent.timeout_s)
            sess.lock.release()
        except asyncio.TimeoutError:
            pass
        self.ended[key] = True
        while len(self.ended) > 100_000:
            self.ended.popitem(last=False)
        reward, error, ended = 0.0, res.get("error"), None
        if "timeout" in res:
            ended = "timeout"
        elif error is None and with_reward and res.get("reward") is None:
            error = "AgentError: returned None, but reward.sources has a source of kind agent"
        if error is not None:
            ended = ended or "error"
        if ended:
            reward = self.agent.error_reward
        else:
            ended = "length" if sess.traj.length_refused else "done"
            reward = (res.get("reward") or 0.0) if with_reward else 0.0
        metrics = {"calls": float(sess.calls), "malformed_calls": float(sess.malformed),
                   "sampling_overridden": float(sess.asked_sampling)}
        return sess.traj.sample(reward, ended, error, metrics)

    async def episodes(self, rows: list[dict], seeds: list[int], workers: list, with_reward: bool,
                       timeout_s: float | None = None) -> list:
        """One agent episode per (row, seed), prompt-major: run them on the workers (episode i on worker i mod
        their number), each within `timeout_s` (None: agent.timeout_s), and return their samples. A dead worker
        fails the rollout (the driver replaces it and replays the step)."""
        t0 = time.perf_counter()
        base = await self.serve()
        keys = await self.open(seeds, await self.engines[0].weights_version.remote())
        timeout_s = timeout_s or self.agent.timeout_s
        bound = timeout_s + 5.0                     # the worker's own bound, and room for its answer

        async def run(i: int, key: str) -> dict:
            ref = workers[i % len(workers)].run.remote(f"{base}/{key}/v1", self.api_key, rows[i], timeout_s)
            try:
                res = await asyncio.wait_for(ref, bound)
            except asyncio.TimeoutError:
                res = {"timeout": True}
            except ray.exceptions.RayActorError:
                raise
            except ray.exceptions.RayError as e:
                res = {"error": f"agent worker failed: {type(e).__name__}"}
            return await self.close_one(key, res, with_reward)
        out = await asyncio.gather(*(run(i, k) for i, k in enumerate(keys)))
        self.episodes_s += time.perf_counter() - t0
        return out

    async def take_busy(self) -> dict[str, float]:
        """The episodes' wall time (the engines' time on the calls is theirs: time/busy/engine)."""
        out, self.episodes_s = {"episodes": self.episodes_s}, 0.0
        return out


class AgentWorker(RankActor):
    def __init__(self, rank: int, world_size: int, cfg, device: str):
        super().__init__(rank, world_size, "cpu", role="agent", seed=cfg.run.seed, threads=1)
        self.fn = load_agent(cfg.agent.cls)
        self.running, self.since = 0, 0.0

    async def ready(self) -> bool:
        return True

    async def run(self, base_url: str, api_key: str, row: dict, timeout_s: float) -> dict:
        """One agent episode on this worker's event loop, shared by its agents (a client made once can serve them
        all): {"reward": x or None}, {"error": one line} or {"timeout": True}."""
        self.running += 1                  # busy: the wall time with at least one agent running
        if self.running == 1:
            self.since = time.perf_counter()
        try:
            value = await asyncio.wait_for(self.fn(base_url=base_url, api_key=api_key, row=dict(row)), timeout_s)
            return {"reward": checked_reward(value)}
        except asyncio.TimeoutError:
            return {"timeout": True}
        except AgentError as e:
            return {"error": f"AgentError: {e}"}
        except Exception as e:      # the user's code: any failure ends this episode, never the run
            return {"error": one_line(e)}
        finally:
            self.running -= 1
            if self.running == 0:
                self._busy["agents"] += time.perf_counter() - self.since


GatewayActor = ray.remote(max_concurrency=1000)(Gateway)
# Agents run at once per worker, on its event loop.
AgentWorkerActor = ray.remote(max_concurrency=1000)(AgentWorker)
