"""What every rank actor shares: identity, thread pinning, the process-group rendezvous, busy-time accounting,
and for trained roles the DeepSpeed ZeRO engine (init, PPO minibatch loop, gathered weights, HF save, exact
resume)."""
from __future__ import annotations

import functools
import math
import os
import sys
import time
from collections import defaultdict
from contextlib import contextmanager, nullcontext
from typing import Callable, Iterator

import torch

from actors.startup import startup_begins, startup_over
from rlhf_ray.batch import B, TensorBatch, chunks, select, shard, sort_by_length
from rlhf_ray.ds_config import deepspeed_config, inference_config
from rlhf_ray.metrics import process_started_at
from rlhf_ray.seeds import derive_seed


def memory_status() -> dict[str, int]:
    """This process's memory in bytes (Linux /proc/self/status): `rss` resident now, `peak` its high-water mark,
    `anon` the resident part that is not file pages (a safetensors file read through mmap counts in rss and peak
    while mapped, and is page cache the kernel may drop)."""
    keys = {"VmRSS": "rss", "VmHWM": "peak", "RssAnon": "anon"}
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            name, _, value = line.partition(":")
            if name in keys:
                out[keys[name]] = int(value.split()[0]) * 1024
    return out


def full_numel(p: torch.Tensor) -> int:
    """Elements of the whole parameter, also when ZeRO-3 holds only this rank's partition of it, or when bitsandbytes
    packs it (two 4-bit codes per byte)."""
    if is_quantized(p):
        return p.quant_state.shape.numel()
    return p.ds_numel if hasattr(p, "ds_numel") else p.numel()


def busy(method):
    """Count a work method's wall time toward its actor's busy time (time/busy/<role>), by method name. Only
    entry points the driver (or another actor) calls carry it, so no time counts twice."""
    @functools.wraps(method)
    def timed(self, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return method(self, *args, **kwargs)
        finally:
            self._busy[method.__name__] += time.perf_counter() - t0
    return timed


class RankActor:
    """One rank of a role. Subclasses are wrapped with `ray.remote` in their role module. `device` is where the
    driver placed the role ("cpu" or "cuda": Config.device_for). `cores` (the role's cpu_cores, one machine only)
    pins the process there with one thread per core. `role` and `seed` (run.seed) name this rank's random streams
    (rlhf_ray/seeds.py)."""

    def __init__(self, rank: int, world_size: int, device: str, *, role: str, seed: int, threads: float,
                 cores: list[int] | None = None):
        startup_begins()                # no cyclic garbage collection until `ready` (actors/startup.py)
        # start-up marks (wall-clock): the worker process's start, then here, the role's module imports done
        self._startup = {"process": process_started_at(), "imported": time.time()}
        self.rank, self.world_size, self.device, self.role, self.seed = rank, world_size, device, role, seed
        if cores:
            os.sched_setaffinity(0, cores)
            threads = len(cores)
        torch.set_num_threads(max(1, int(threads)))
        torch.manual_seed(derive_seed(seed, f"{role}/init", rank))     # e.g. a fresh value head's initialisation
        self._busy: defaultdict[str, float] = defaultdict(float)
        self._memory_idle = memory_status()  # this process before any model: the role's module imports only

    def memory(self) -> dict[str, dict[str, int]]:
        """This rank's process memory (memory_status), `idle` as it started (no model yet) and `now`: now's peak
        minus idle's rss is the most the role's models, optimizer and passes (and later imports) have held."""
        return {"idle": self._memory_idle, "now": memory_status()}

    def _mark(self, name: str) -> None:
        """A start-up mark: `name` done now (first time only)."""
        self._startup.setdefault(name, time.time())

    def startup_marks(self) -> dict[str, float]:
        """Wall-clock times of this rank's start-up phases, in order (see launch/ppo.py `startup_report`)."""
        return dict(self._startup)

    def take_busy(self) -> dict[str, float]:
        """Seconds spent in each work method since the last call."""
        spent, self._busy = dict(self._busy), defaultdict(float)
        return spent

    def node_ip(self) -> str:
        import ray
        return ray.util.get_node_ip_address()

    def placement(self) -> dict:
        """Where this rank runs: node, placement group, the GPUs Ray gave it, and its process."""
        import ray
        ctx = ray.get_runtime_context()
        return {"node": ctx.get_node_id(), "pg": ctx.get_placement_group_id(), "gpu_ids": ray.get_gpu_ids(),
                "pid": os.getpid()}

    def host_store(self, world_size: int) -> int:
        """As the group's rank 0: open its TCPStore on a port the OS picks and hold it; returns the port."""
        from actors.sync_group import host_store
        self._store = host_store(self.node_ip(), world_size)
        return self._store.port

    def init_process_group(self, master_addr: str, master_port: int) -> None:
        """Join the role's process group, whose store rank 0 hosts (`host_store`): gloo on CPU, NCCL on GPU. The
        group is made here on that store and DeepSpeed's comm layer adopts it (it does when torch.distributed is
        initialized), because DeepSpeed's own rendezvous binds MASTER_PORT late and can lose it to another process."""
        import torch.distributed as dist
        from actors.sync_group import join_store
        os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(master_port), RANK=str(self.rank),
                          WORLD_SIZE=str(self.world_size), LOCAL_RANK="0")
        import deepspeed
        if self.device == "cpu":
            # DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce op at init (~2 min) that ZeRO
            # training never uses. Patch the module object itself: `import deepspeed.comm.torch` would yield
            # the real torch package, because deepspeed.comm has an attribute named `torch`.
            import deepspeed.comm  # noqa: F401  (loads deepspeed.comm.torch)
            sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
        backend = "gloo" if self.device == "cpu" else "nccl"
        if not dist.is_initialized():          # one per process (benchmarks/gpu_check.py builds roles in one)
            store = self._store if self.rank == 0 else join_store(master_addr, master_port, self.world_size)
            dist.init_process_group(backend, store=store, rank=self.rank, world_size=self.world_size)
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False)
        self._mark("process_group")

    def ready(self) -> bool:
        """The driver's first call once every role is built (and its liveness probe after): the start-up is over."""
        self._mark("ready")
        startup_over()
        return True

    collective = False      # ZeRO-3: every forward gathers parameters from all ranks

    @torch.no_grad()
    def _forward_shard(self, batch: B, fn: Callable[[B], torch.Tensor], micro: int) -> torch.Tensor:
        """Run `fn` over this rank's shard in micro-batches. Under ZeRO-3 every rank must call this, and every
        rank runs the same number of forwards (a rank with a shorter shard repeats one and drops the result)."""
        part, unsort = sort_by_length(shard(batch, self.rank, self.world_size))   # similar lengths trim well
        filler = select(batch, slice(0, 1))
        empty = len(part) == 0                 # more ranks than rows: run one row for the shapes, return none
        mbs = [filler] if empty else chunks(part, micro)
        out = torch.cat([fn(mb.to(self.device)).cpu() for mb in mbs])
        if self.collective:
            n_max = math.ceil(math.ceil(len(batch) / self.world_size) / micro)
            for _ in range(n_max - len(mbs)):
                fn(filler.to(self.device))
        return out[:0] if empty else out[unsort]


class FrozenRole(RankActor):
    """A frozen model on one rank (reference, reward): data-parallel forward passes, no gradients. With
    zero_stage 3 the role's ranks form a process group and DeepSpeed partitions the weights over them at load
    time (no rank ever holds the whole model); every forward is then a collective."""

    def _frozen(self, role_cfg, dtype: str, load: Callable[[], None]) -> None:
        """Remember how to load; stage 0 loads now, stage 3 once the rank has joined its process group."""
        def load_and_mark():
            load()
            self._mark("model_loaded")
        self._role_cfg, self._dtype, self._load = role_cfg, dtype, load_and_mark
        if role_cfg.zero_stage != 3:
            load_and_mark()

    def init_process_group(self, master_addr: str, master_port: int) -> None:
        super().init_process_group(master_addr, master_port)
        self._load()

    def _prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        if self._role_cfg.zero_stage != 3:
            return model.to(self.device).eval().requires_grad_(False)
        import deepspeed
        engine, *_ = deepspeed.initialize(model=model, config=self._ds_config())
        self.collective = True
        self.device = engine.device
        return engine.module.eval().requires_grad_(False)

    def _ds_config(self) -> dict:
        return inference_config(self._role_cfg.micro_batch_size, self._dtype)

    def _before_load(self) -> None:
        """Call before from_pretrained: under ZeRO-3 the weights are then partitioned as they load (zero.Init)."""
        if self._role_cfg.zero_stage == 3:
            partition_at_load(self, self._ds_config())


class DeepSpeedRole(RankActor):
    """A model trained under DeepSpeed ZeRO on one rank of a group (policy, critic)."""

    def _init_engine(self, load_model: Callable[[], torch.nn.Module], role_cfg, minibatch_size: int, dtype: str,
                     head: str | None = None):
        """DeepSpeed around the loaded model; with role_cfg.lora.rank > 0 only LoRA adapters train (and `head`,
        a scalar model's freshly initialised value head, which gets no adapter)."""
        import deepspeed
        ds_cfg = deepspeed_config(role_cfg, minibatch_size, dtype, self.device)
        self.zero_stage = ds_cfg["zero_optimization"]["stage"]
        self.micro = ds_cfg["train_micro_batch_size_per_gpu"]
        if self.zero_stage == 3:
            partition_at_load(self, ds_cfg)
        # Fresh parameters (LoRA adapters, a value head) drawn from this rank's own stream, whatever else its process
        # built since __init__ seeded it (the hybrid layout builds frozen roles beside the policy: actors/host.py)
        torch.manual_seed(derive_seed(self.seed, f"{self.role}/init", self.rank))
        model = load_model()
        self._mark("model_loaded")
        if role_cfg.lora.rank > 0:
            model = add_lora(model, role_cfg.lora, head)
        if role_cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable()
            if role_cfg.lora.rank > 0:
                model.enable_input_require_grads()      # frozen embeddings: checkpointed blocks still get grads
        self.engine, *_ = deepspeed.initialize(
            model=model, model_parameters=[p for p in model.parameters() if p.requires_grad], config=ds_cfg)
        self.model = self.engine.module
        self.device = self.engine.device
        self.collective = self.zero_stage == 3
        self._mark("deepspeed_ready")

    # ------------------------------------------------------------------ epochs over minibatches (PPO, stages)
    def _minibatch_updates(self, exp: B, epochs: int, minibatch_size: int, step: int,
                           loss_fn: Callable[[B, float], tuple[torch.Tensor, dict]],
                           before: Callable[[B], None] | None = None) -> dict:
        """Epochs x shuffled minibatches; each rank takes its shard of each minibatch, in micro-batches.
        A trailing partial minibatch is dropped (every optimizer step sees `minibatch_size` sequences).
        loss_fn(micro, denominator) must divide its micro-batch's loss sum by `denominator`, the whole minibatch's
        count (`_loss_count`) over the number of micro-batch losses DeepSpeed averages (accumulation steps x
        ranks): the optimizer step's gradient is then exactly that of the minibatch's loss, however it is split.
        Its stats are averaged over micro-batches, except those named *_max, which are maxima. `before(minibatch)`,
        when given, runs on each whole minibatch first (a statistic of the minibatch the loss needs, e.g. KTO's z0).

        The shuffle is seeded identically on every rank so the ranks agree on each minibatch. A rank cuts its
        shard into micro-batches by length (the gradient is a sum over them, so their order is free). DeepSpeed
        averages gradients across ranks and accumulates over micro-batches; one optimizer step per minibatch.
        Randomness derives from (run seed, role, step, rank), so a resumed run repeats it.
        """
        t0, skipped = time.perf_counter(), self.engine.skipped_steps
        torch.manual_seed(derive_seed(self.seed, f"{self.role}/update", step, self.rank))   # e.g. LoRA dropout
        n = len(exp)
        losses_averaged = self.engine.gradient_accumulation_steps() * self.world_size
        stats: dict[str, list[float]] = defaultdict(list)
        self.engine.train()
        for epoch in range(epochs):
            order = torch.Generator().manual_seed(derive_seed(self.seed, f"{self.role}/order", step, epoch))
            for idx in torch.randperm(n, generator=order).split(minibatch_size):
                if len(idx) < minibatch_size:
                    break
                mb = select(exp, idx)
                if before is not None:
                    before(mb)
                denominator = self._loss_count(mb) / losses_averaged
                for micro in chunks(sort_by_length(shard(mb, self.rank, self.world_size))[0], self.micro):
                    loss, s = loss_fn(micro.to(self.device), denominator)
                    self.engine.backward(loss)
                    self.engine.step()
                    stats["loss"].append(loss.item())
                    for k, v in s.items():
                        stats[k].append(float(v))
        out = {k: max(v) if k.endswith("_max") else sum(v) / len(v) for k, v in stats.items()}
        out["update_seconds"] = time.perf_counter() - t0
        out["skipped_steps"] = self.engine.skipped_steps - skipped     # non-finite gradients (the guard stops on it)
        return out

    def _quantized(self) -> bool:
        """Loaded through bitsandbytes (a 4-bit base): transformers keeps the quantizer on the model."""
        return getattr(self.model, "hf_quantizer", None) is not None

    def parameter_counts(self) -> dict[str, int]:
        """Trainable and total parameters of this rank's model (ZeRO-3: the full counts, not the shard)."""
        params = list(self.model.parameters())
        return {"trainable": sum(full_numel(p) for p in params if p.requires_grad),
                "total": sum(full_numel(p) for p in params)}

    def _loss_count(self, minibatch: TensorBatch) -> float:
        """What the role's loss averages over in a whole minibatch (tokens, sequences, rankings): each role says."""
        raise NotImplementedError

    # ------------------------------------------------------------------ full weights, bucket by bucket
    def _named_buckets(self, bucket_bytes: int, keep_on_device: bool = False) -> Iterator[dict[str, torch.Tensor] | None]:
        """Yield the full (HF-named) weights in buckets of about `bucket_bytes`; rank 0 gets the tensors,
        other ranks None. Under ZeRO-3 each bucket is gathered as a collective (all ranks must iterate), so
        no rank ever materialises more than one bucket of the gathered model at a time."""
        import deepspeed
        bucket: list[tuple[str, list[torch.nn.Parameter], Callable]] = []
        size = 0

        def emit(items):
            params = [p for _, ps, _ in items for p in ps]
            gathered = (deepspeed.zero.GatheredParameters(params, modifier_rank=None)
                        if self.zero_stage == 3 else nullcontext())
            with gathered, torch.no_grad():
                if self.rank != 0:
                    return None
                return {n: own(fn().detach()) for n, _, fn in items}

        def own(t: torch.Tensor) -> torch.Tensor:
            """The tensor to hand out: on the host unless asked to stay on the device. Below ZeRO-3 it may be the
            live parameter (every consumer copies it before the next update); a ZeRO-3 gather's storage is
            released when the context exits, so that one is copied."""
            out = t if keep_on_device else t.cpu()
            return out.clone() if self.zero_stage == 3 and out.data_ptr() == t.data_ptr() else out

        for item in export_items(self.model):
            bucket.append(item)
            size += sum(full_numel(p) * p.element_size() for p in item[1])
            if size >= bucket_bytes:
                yield emit(bucket)
                bucket, size = [], 0
        if bucket:
            yield emit(bucket)

    def save_hf(self, path: str, tokenizer_dir: str | None = None) -> None:
        """Write an HF-format directory (safetensors) that `from_pretrained` opens. Collective under ZeRO-3."""
        state: dict[str, torch.Tensor] = {}
        for bucket in self._named_buckets(256 << 20):
            if bucket is not None:
                state.update(bucket)
        if self.rank == 0:
            bad = next((n for n, t in state.items() if not torch.isfinite(t).all()), None)
            if bad is not None:                 # never publish ruined weights (the divergence guard's last line)
                raise FloatingPointError(f"not saving {path}: weight {bad} holds NaN or inf")
            if self._quantized():
                save_unquantized(self.model, path, state)
            else:
                self.model.save_pretrained(path, state_dict=state)
            if tokenizer_dir is not None:
                from rlhf_ray.models import load_tokenizer
                load_tokenizer(tokenizer_dir).save_pretrained(path)

    def save_ds(self, path: str) -> None:
        """DeepSpeed's own checkpoint (partitioned weights, optimizer, scheduler) for an exact resume. A quantised
        base is left out: it is frozen and loads again bit for bit from its directory (quantising is
        deterministic), so the checkpoint holds the adapters, their optimizer states and the base's (small)
        quantisation buffers only."""
        self.engine.save_checkpoint(path, tag="ds", save_latest=False, exclude_frozen_parameters=self._quantized())

    def load_ds(self, path: str) -> None:
        load_path, _ = self.engine.load_checkpoint(path, tag="ds", load_optimizer_states=True,
                                                   load_lr_scheduler_states=True,
                                                   load_module_strict=not self._quantized())
        if load_path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint under {path}")


def save_unquantized(model, path: str, state: dict[str, torch.Tensor]) -> None:
    """An HF directory of the full-precision weights `state` for a model that computes with a quantised base:
    transformers' save_pretrained would write the live 4-bit layers and their quantization_config instead."""
    import copy
    from huggingface_hub import save_torch_state_dict
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = next(iter(state.values())).dtype
    config.save_pretrained(path)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(path)
    save_torch_state_dict({k: v.contiguous() for k, v in state.items()}, path, metadata={"format": "pt"})


def partition_at_load(actor, ds_cfg: dict) -> None:
    """ZeRO-3: make the next from_pretrained partition the weights as they load (zero.Init), so no rank ever holds
    the whole model. transformers reads the setting from a live HfDeepSpeedConfig: the actor keeps it."""
    from transformers.integrations import HfDeepSpeedConfig
    actor._hf_ds_config = HfDeepSpeedConfig(ds_cfg)


# ---------------------------------------------------------------------------------------------------- LoRA

def add_lora(model: torch.nn.Module, lora, head: str | None = None) -> torch.nn.Module:
    """Inject LoRA adapters (peft) into `model` in place and freeze everything else except `head`.
    Returns the same HF model object, so forward code and parameter names stay the model's own."""
    from peft import LoraConfig, inject_adapter_in_model
    targets = "all-linear" if list(lora.target_modules) == ["all-linear"] else list(lora.target_modules)
    cfg = LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets,
                     exclude_modules=[head] if head else None, bias="none")
    if targets == "all-linear":                 # peft resolves "all-linear" only through a PeftModel: do it here
        out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                 if isinstance(m, torch.nn.Linear) and m is not out and n.rsplit(".", 1)[-1] != head}
        cfg.target_modules = sorted(names)
    model.requires_grad_(False)
    model = inject_adapter_in_model(cfg, model)
    for name, p in model.named_parameters():
        if "lora_" in name or (head and name.split(".")[0] == head):
            p.requires_grad_(True)
    return model


@contextmanager
def adapters_off(model: torch.nn.Module):
    """Within: every LoRA layer computes with its base weight alone (reference.from_policy_base). The flag peft's
    own forward reads; unlike peft's enable_adapters it leaves requires_grad alone, which DeepSpeed's optimizer
    and gradient hooks were built around."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer) and not m.disable_adapters]
    for m in layers:
        m._disable_adapters = True
    try:
        yield
    finally:
        for m in layers:
            m._disable_adapters = False


def is_quantized(p: torch.Tensor) -> bool:
    """A bitsandbytes-packed weight (its data are 4-bit codes, not values)."""
    return type(p).__name__ == "Params4bit"


def dequantized(W: torch.Tensor) -> torch.Tensor:
    """A 4-bit weight's values in its compute dtype: NF4 codes times their block scales (the matrix bitsandbytes
    multiplies with). A weight repacked for the AVX-512 kernel is refused rather than misread (rlhf_ray/models.py
    one_4bit_layout says why it never should be)."""
    import bitsandbytes.functional as bnbf
    if getattr(W.quant_state, "packing_format_for_cpu", False):
        raise RuntimeError(f"a {tuple(W.quant_state.shape)} 4-bit weight was repacked for bitsandbytes' AVX-512 bf16 "
                           "kernel: its bytes are no longer NF4 codes (load models through rlhf_ray.models)")
    return bnbf.dequantize_4bit(W.data, W.quant_state)


def export_items(model: torch.nn.Module) -> Iterator[tuple[str, list[torch.nn.Parameter], Callable]]:
    """The model's full weights under their HF names, as (name, params to gather, compute): a LoRA layer's
    weight comes back merged, W + (alpha / r) B A, so engines and checkpoints need no adapter support. A 4-bit base
    weight is dequantised first and the merge done in float32, then cast to the model's dtype: the weights the
    policy computes with, not a re-rounded 4-bit merge."""
    merged: set[int] = set()
    dtype = model.get_input_embeddings().weight.dtype
    for mname, m in model.named_modules():
        if hasattr(m, "base_layer") and hasattr(m, "lora_A") and "default" in m.lora_A:
            W, A, B = m.base_layer.weight, m.lora_A["default"].weight, m.lora_B["default"].weight
            merged.update(map(id, (W, A, B)))
            if is_quantized(W):
                yield f"{mname}.weight", [W, A, B], lambda W=W, m=m: (
                    dequantized(W).float() + m.get_delta_weight("default").float()).to(dtype)
            else:
                yield f"{mname}.weight", [W, A, B], lambda W=W, m=m: W + m.get_delta_weight("default").to(W.dtype)
    for name, p in model.named_parameters():             # tied aliases appear once
        if id(p) not in merged:
            yield name.replace(".base_layer.", "."), [p], lambda p=p: dequantized(p).to(dtype) if is_quantized(p) else p
