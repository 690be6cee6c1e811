"""Generation engines: vLLM (the CPU build here, CUDA on a cluster) with an in-place weight-loading extension.

Environment for vLLM must exist before it is imported, so `engine_runtime_env` builds the actor's
runtime_env: KV-cache size on CPU (unset, vLLM sizes ~12 GiB), in-process engine core, thread binding, vLLM's
cache in the user's rlhf-ray cache (kept between runs) and its sockets inside the run directory.
"""
from __future__ import annotations

import gc
import os
import time
from pathlib import Path

import ray

from actors.base import RankActor, busy
from rlhf_ray.batch import EpisodeSample, Sample
from rlhf_ray.cache import cache_dir
from rlhf_ray.seeds import derive_seed


def engine_runtime_env(cfg, device: str, run_dir: str) -> dict:
    env = {
        # Shared by every run on the machine: vLLM inspects a model class in a fresh subprocess (its whole import,
        # ~15 s on 2 cores) unless this cache holds the answer (modelinfos/, keyed by the class's source hash).
        "VLLM_CACHE_ROOT": str((cache_dir() / "vllm").resolve()),
        "VLLM_RPC_BASE_PATH": str(Path(run_dir, ".vllm", "rpc").resolve()),
        "TOKENIZERS_PARALLELISM": "false",
    }
    if device == "cpu":
        env["VLLM_CPU_KVCACHE_SPACE"] = str(max(1, round(cfg.engine.kv_cache_gib)))
        cores = cfg.engine.cpu_cores
        env["VLLM_CPU_OMP_THREADS_BIND"] = (",".join(map(str, cores)) if cores else
                                            os.environ.get("VLLM_CPU_OMP_THREADS_BIND", f"0-{os.cpu_count() - 1}"))
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0" if cfg.engine.in_process else "1"
    if cfg.weight_sync.backend == "cuda_ipc":
        # CUDA IPC handles (torch classes, dtypes, handle bytes) reach the workers through collective_rpc, which
        # msgpack-encodes its arguments unless pickle is allowed for them. Only the policy, in this job, sends any.
        env["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"
    return {"env_vars": env}


def turn_seed(episode_seed: int, turn: int) -> int:
    """The sampling seed of a multi-turn episode's turn (an agent's call): the same through env.cls and the gateway."""
    return derive_seed(episode_seed, "turn", turn)


class Engine(RankActor):
    def __init__(self, rank: int, world_size: int, cfg, device: str):
        super().__init__(rank, world_size, device, role="engine", seed=cfg.run.seed, threads=cfg.engine.cpus_per_rank,
                         cores=cfg.engine.cpu_cores)
        self.version = 0          # the policy update whose weights this engine holds (0: models.policy)
        if self.device == "cpu" and cfg.rollout.max_staleness:
            # Off-policy, the engines generate the next step's rollout in the background, on cores the current
            # step's scoring may share: that scoring is what the step waits on, so generation takes only idle CPU
            # (its threads, vLLM's included, are created after this and inherit the policy).
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        from vllm import LLM
        self._mark("vllm_imported")
        e = cfg.engine
        for d in ("VLLM_CACHE_ROOT", "VLLM_RPC_BASE_PATH"):
            if os.environ.get(d):
                Path(os.environ[d]).mkdir(parents=True, exist_ok=True)
        kwargs = dict(
            model=cfg.models.policy, tokenizer=cfg.models.tokenizer or cfg.models.policy,
            dtype=cfg.train.dtype, enforce_eager=e.enforce_eager,
            seed=derive_seed(cfg.run.seed, "engine/init", rank),   # each call reseeds sampling (generate)
            max_model_len=e.max_model_len, tensor_parallel_size=e.tensor_parallel_size,
            trust_remote_code=cfg.models.trust_remote_code,
            worker_extension_cls="actors.vllm_ext.WeightSyncExtension",
            # logprobs of the distribution actually sampled (temperature applied), comparable to the policy's
            logprobs_mode="processed_logprobs",
        )
        self.sleeps = self.device == "cuda" and cfg.placement.engines_sleep   # vLLM has no sleep mode on CPU
        if self.device == "cpu" and cfg.needs_episodes():
            # Multi-turn turns are sampled with per-request seeds (`_sample`), so an episode's tokens do not depend
            # on which other calls share its batch. On CPU vLLM rewinds a request's generator after a chunked
            # prefill with set_offset, which a CPU generator lacks; whole prefills never need the rewind.
            kwargs["enable_chunked_prefill"] = False
        if self.device == "cuda":
            kwargs["gpu_memory_utilization"] = e.gpu_memory_utilization
            kwargs["enable_sleep_mode"] = self.sleeps
            if e.tensor_parallel_size > 1:
                kwargs["distributed_executor_backend"] = "ray"
        # vLLM's build calls gc.collect() five times; in a process holding torch, transformers and vLLM each call
        # walks every object they made (~0.4 s on CPU). Frozen, those are skipped: the collections see only what
        # the build itself allocates.
        gc.freeze()
        try:
            self.llm = LLM(**kwargs)
        finally:
            gc.unfreeze()
        self._mark("engine_built")
        # The first generate pays a one-time setup (~10 s on CPU); pay it here so step 1's timings are honest.
        from vllm import SamplingParams
        self.llm.generate([{"prompt_token_ids": [0]}], SamplingParams(max_tokens=2), use_tqdm=False)
        self._mark("warmed_up")

    def _sample(self, prompt_token_ids: list[list[int]], n: int, max_tokens: int | list[int], temperature: float,
                top_p: float, seed: int | list[int], stop_token_ids: list[int] | list[list[int]] | None = None) -> list:
        """vLLM's completions, n per prompt, prompt-major: (ids, logprobs, finish_reason, stop_reason) each.
        A list of max_tokens (of stop_token_ids lists) gives each prompt its own. An int seed seeds the whole call;
        a list gives each prompt its own seed (n must be 1): its tokens then depend on that seed alone, not on the
        other prompts of the call or on their order (multi-turn episodes and agents' calls, which arrive apart)."""
        from vllm import SamplingParams
        per_request = isinstance(seed, list)
        # Per-request seeds break the CPU build on chunked prefill (vLLM calls set_offset on a CPU generator:
        # "CPU Generator does not use offset"); those engines run without it (__init__). A call-wide seed on CPU
        # reseeds the workers' default generator instead, so each call's samples depend on its seed only, not on
        # what the engine sampled before.
        if self.device != "cuda" and not per_request:
            self.llm.collective_rpc("rlhf_reseed", args=(seed,))
        P = len(prompt_token_ids)
        tokens = max_tokens if isinstance(max_tokens, list) else [max_tokens] * P
        stops = (stop_token_ids if stop_token_ids and isinstance(stop_token_ids[0], list)
                 else [stop_token_ids] * P)
        seeds = seed if per_request else [seed if self.device == "cuda" else None] * P
        assert n == 1 or not per_request, "per-request seeds draw one sample per prompt"
        params = [SamplingParams(n=n, max_tokens=m, temperature=temperature, top_p=top_p, logprobs=0, seed=s,
                                 detokenize=False, **({"stop_token_ids": st} if st else {}))      # ids suffice
                  for m, st, s in zip(tokens, stops, seeds)]
        outs = self.llm.generate([{"prompt_token_ids": p} for p in prompt_token_ids], params, use_tqdm=False)
        return [(list(c.token_ids), [d[t].logprob for d, t in zip(c.logprobs, c.token_ids)], c.finish_reason,
                 c.stop_reason) for o in outs for c in o.outputs]

    @busy
    def generate(self, prompt_token_ids: list[list[int]], n: int, max_tokens: int, temperature: float,
                 top_p: float, seed: int) -> list[Sample]:
        """n samples per prompt, flattened prompt-major: len(prompts) * n of them, each stamped with the policy
        update whose weights sampled it."""
        return [Sample(ids=ids, logprobs=lps, finished=reason == "stop", version=self.version)
                for ids, lps, reason, _ in self._sample(prompt_token_ids, n, max_tokens, temperature, top_p, seed)]

    @busy
    def episodes(self, prompt_token_ids: list[list[int]], rows: list[dict], n: int, max_tokens: int,
                 temperature: float, top_p: float, seeds: list[int], env, stop_ids: list[int],
                 workers: list) -> list[EpisodeSample]:
        """n multi-turn episodes per prompt (rlhf_ray/env.py), prompt-major, token in, token out: generate a turn
        (until a stop token of env.turn_stop, EOS, or the turn's or episode's token budget), hand it to the
        episode's environment worker, append the observation's ids, go on, until the environment says done, EOS,
        env.max_turns or max_tokens (turns and observations together). `seeds`: one per episode (prompt-major); its
        turn t is sampled with derive_seed(seed, "turn", t) (`turn_seed`), whatever else the engine samples beside it,
        as an agent's calls through the gateway are (actors/agent.py). `env`: the env section; `stop_ids`: its
        turn_stop tokens; `workers`: the environment workers (episode i goes to worker i mod their number). Its
        busy time counts generation only, not the waits on the environments (theirs: time/busy/env)."""
        from rlhf_ray.env import Episode
        E, per_turn = len(prompt_token_ids) * n, env.max_turn_tokens or max_tokens
        eps = [Episode() for _ in range(E)]
        context = [list(prompt_token_ids[i // n]) for i in range(E)]
        keys = [f"{seeds[i]}/{i}" for i in range(E)]
        worker = [workers[i % len(workers)] for i in range(E)]

        def ask(calls: dict) -> dict:
            """{episode: ObjectRef} -> {episode: answer}, each within env.timeout_s of now; one that is late is
            {"timeout": True}, one whose worker died {"error": ...}."""
            t0 = time.perf_counter()
            refs = list(calls.values())
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=env.timeout_s)
            ready, out = set(ready), {}
            for i, ref in calls.items():
                try:
                    out[i] = ray.get(ref) if ref in ready else {"timeout": True}
                except ray.exceptions.RayActorError:
                    raise          # a dead worker fails the rollout: the driver replaces it and replays the step
                except ray.exceptions.RayError as e:
                    out[i] = {"error": f"environment worker failed: {type(e).__name__}"}
            self._busy["episodes"] -= time.perf_counter() - t0     # waiting on environments is not generating
            return out

        def failed(ep, answer: dict) -> bool:
            """An environment that raised, answered garbage or timed out ends its episode with env.error_reward."""
            if "error" in answer or "timeout" in answer:
                ep.ended = "timeout" if "timeout" in answer else "error"
                ep.error = answer.get("error")
                ep.reward_turn(env.error_reward)
                return True
            return False

        def observe(i: int, obs: list[int] | None) -> None:
            room = max_tokens - len(eps[i].ids)
            if obs:
                eps[i].add_observation(obs[:room])
                context[i] += obs[:room]
            if len(eps[i].ids) >= max_tokens:
                eps[i].ended = "length"

        for i, answer in ask({i: worker[i].reset.remote(keys[i], rows[i // n]) for i in range(E)}).items():
            if not failed(eps[i], answer):
                observe(i, answer["obs"])
        for turn in range(env.max_turns):
            live = [i for i in range(E) if eps[i].ended is None]
            if not live:
                break
            budget = [min(per_turn, max_tokens - len(eps[i].ids)) for i in live]
            drawn = self._sample([context[i] for i in live], 1, budget, temperature, top_p,
                                 [turn_seed(seeds[i], turn) for i in live], stop_ids)
            ended_by_model = {}
            for i, (ids, lps, reason, stop) in zip(live, drawn):
                eps[i].add_turn(ids, lps)
                context[i] += ids
                ended_by_model[i] = reason == "stop" and stop is None          # EOS: the model ended the episode
            for i, answer in ask({i: worker[i].step.remote(keys[i], d[0]) for i, d in zip(live, drawn)}).items():
                ep = eps[i]
                if failed(ep, answer):
                    continue
                ep.reward_turn(answer["reward"])
                for k, v in answer["metrics"].items():
                    ep.metrics[k] = ep.metrics.get(k, 0.0) + v
                if answer["done"] or ended_by_model[i]:
                    ep.ended = "done" if answer["done"] else "eos"
                    continue
                if turn == env.max_turns - 1:     # no turn follows: its observation would be read by nobody
                    ep.ended = "turns"
                    continue
                observe(i, answer["obs"])
        for w in workers:
            w.close.remote([k for k, ww in zip(keys, worker) if ww is w])
        return [EpisodeSample(ids=ep.ids, logprobs=ep.logprobs, finished=ep.ended in ("done", "eos"),
                              version=self.version, action=ep.action, token_rewards=ep.token_rewards(),
                              episode=ep.summary())
                for ep in eps]

    @busy
    def complete(self, prompt_token_ids: list[list[int]], max_tokens: list[int], stop_ids: list[list[int]],
                 seeds: list[int], temperature: float, top_p: float) -> tuple[int, list]:
        """Agents' calls, batched by the gateway (actors/agent.py), each with its own prompt, budget, stop tokens and
        seed (`turn_seed`): the version of the weights that sampled them, and per call (ids, logprobs,
        finish_reason, stop_reason)."""
        return self.version, self._sample(prompt_token_ids, 1, max_tokens, temperature, top_p, seeds, stop_ids)

    @busy
    def prompt_logprobs(self, token_ids: list[list[int]], starts: list[int]) -> list[list[float]]:
        """Temperature-1 logprobs the engine assigns to token_ids[i][starts[i]:] (verification, evaluation)."""
        from vllm import SamplingParams
        params = SamplingParams(max_tokens=1, temperature=1.0, prompt_logprobs=0, detokenize=False)
        outs = self.llm.generate([{"prompt_token_ids": t} for t in token_ids], params, use_tqdm=False)
        return [[o.prompt_logprobs[j][t[j]].logprob for j in range(s, len(t))]
                for o, t, s in zip(outs, token_ids, starts)]

    @busy
    def label_logprobs(self, prompt_token_ids: list[list[int]], label_ids: list[int]) -> list[list[float]]:
        """For each prompt, the logprob (over the whole vocabulary, temperature 1) of each label token at the next
        position: what a judge's verdict is read from (rlhf_ray/judge.py). One forward per prompt; the token it
        picks (greedily: no sampling state touched) is dropped."""
        from vllm import SamplingParams
        params = SamplingParams(max_tokens=1, temperature=0.0, logprob_token_ids=list(label_ids), detokenize=False)
        outs = self.llm.generate([{"prompt_token_ids": p} for p in prompt_token_ids], params, use_tqdm=False)
        return [[o.outputs[0].logprobs[0][t].logprob for t in label_ids] for o in outs]

    @busy
    def load_weights(self, meta: list, flat) -> int:
        """Load one packed bucket (actors/sync_group.py: meta + flat uint8 numpy array, read-only from the object
        store). An in-process engine core hands the workers a tensor over that memory (no copy); in vLLM's
        multiprocess mode tensors inside collective_rpc args would arrive as lists, so the workers get bytes."""
        if os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") == "0":
            import warnings

            import torch
            with warnings.catch_warnings():       # read-only: the workers copy it into their own parameters
                warnings.simplefilter("ignore", UserWarning)
                flat = torch.from_numpy(flat)
        else:
            flat = flat.tobytes()
        return sum(self.llm.collective_rpc("rlhf_load_weights", args=(meta, flat)))

    @busy
    def load_tensors(self, bucket: dict) -> int:
        """Load one bucket of HF-named tensors handed over in this process (the hybrid layout: the policy lives
        here too, actors/host.py). The in-process engine core passes them to its worker by reference."""
        return sum(self.llm.collective_rpc("rlhf_load_tensors", args=(list(bucket.items()),)))

    def open_sync_group(self, addr: str, port: int, first_rank: int, world_size: int, backend: str) -> list[int]:
        return self.llm.collective_rpc("rlhf_open_sync_group", args=(addr, port, first_rank, world_size, backend))

    @busy
    def receive_bucket(self, meta: list) -> int:
        return sum(self.llm.collective_rpc("rlhf_receive_bucket", args=(meta,)))

    def sleep(self) -> bool:
        """Free this engine's GPU memory for colocated trainers: weights to CPU, KV cache dropped (level 1).
        A no-op where there is no sleep mode (CPU: nothing on a GPU to free)."""
        if self.sleeps:
            self.llm.sleep(level=1)
        return self.sleeps

    def wake_up(self) -> bool:
        if self.sleeps:
            self.llm.wake_up()
        return self.sleeps

    @busy
    def receive_ipc_bucket(self, meta: list, handles: list) -> int:
        return sum(self.llm.collective_rpc("rlhf_receive_ipc_bucket", args=(meta, handles)))

    def weights_version(self) -> int:
        """The policy update whose weights this engine holds."""
        return self.version

    def weights_loaded(self, version: int) -> int:
        """After a sync: the weights of policy update `version` are in. Drops the prefix cache, whose KV entries
        were computed under the old weights (off by nats otherwise)."""
        self.llm.reset_prefix_cache()
        self.version = version
        return version


EngineActor = ray.remote(Engine)
