"""Generation engines: vLLM (the CPU build here, CUDA on a cluster) with an in-place weight-loading extension.

Environment for vLLM must exist before it is imported, so `engine_runtime_env` builds the actor's
runtime_env: KV-cache size on CPU (unset, vLLM sizes ~12 GiB), in-process engine core, thread binding, vLLM's
cache in the user's rlhf-ray cache (kept between runs) and its sockets inside the run directory.
"""
from __future__ import annotations

import gc
import os
from pathlib import Path

import ray

from actors.base import RankActor, busy
from rlhf_ray.batch import Sample
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


class Engine(RankActor):
    def __init__(self, rank: int, world_size: int, cfg, device: str):
        super().__init__(rank, world_size, device, role="engine", seed=cfg.run.seed, threads=cfg.engine.cpus_per_engine,
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

    @busy
    def generate(self, prompt_token_ids: list[list[int]], n: int, max_tokens: int, temperature: float,
                 top_p: float, seed: int) -> list[Sample]:
        """n samples per prompt, flattened prompt-major: len(prompts) * n of them, each stamped with the policy
        update whose weights sampled it."""
        from vllm import SamplingParams
        # Per-request seeds break the CPU build on chunked prefill (vLLM calls set_offset on a CPU generator:
        # "CPU Generator does not use offset"); there the workers' default generator is reseeded per call
        # instead, so each call's samples depend on its seed only, not on what the engine sampled before.
        if self.device != "cuda":
            self.llm.collective_rpc("rlhf_reseed", args=(seed,))
        params = SamplingParams(n=n, max_tokens=max_tokens, temperature=temperature, top_p=top_p, logprobs=0,
                                seed=seed if self.device == "cuda" else None, detokenize=False)   # ids suffice
        outs = self.llm.generate([{"prompt_token_ids": p} for p in prompt_token_ids], params, use_tqdm=False)
        samples = []
        for o in outs:
            for c in o.outputs:
                ids = list(c.token_ids)
                samples.append(Sample(ids=ids, logprobs=[d[t].logprob for d, t in zip(c.logprobs, ids)],
                                      finished=c.finish_reason == "stop", version=self.version))
        return samples

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

    def weights_loaded(self, version: int) -> int:
        """After a sync: the weights of policy update `version` are in. Drops the prefix cache, whose KV entries
        were computed under the old weights (off by nats otherwise)."""
        self.llm.reset_prefix_cache()
        self.version = version
        return version


EngineActor = ray.remote(Engine)
