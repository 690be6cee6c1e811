"""vLLM worker extension: in-place weight loading for RLHF weight sync.

Loaded by vLLM inside each worker process (`LLM(worker_extension_cls="actors.vllm_ext.WeightSyncExtension")`),
so this module imports nothing of Ray or of our actors. Method names are prefixed to stay clear of the
Worker's own (`update_weights`, `reload_weights` exist there).

Two traps this handles:
- On CPU, vLLM repacks linear weights after the first load, and a second `model.load_weights` fails
  (`'Parameter' object has no attribute 'weight_loader'`). The worker's `reload_weights(...,
  is_checkpoint_format=True)` redoes the post-load processing and works on CPU and GPU.
- `reload_weights` rebuilds each layer's parameters separately, which unties tied weights (a tied `lm_head`
  keeps the old embedding: logprobs off by ~0.2 nats on the tiny model). We record which parameters are
  shared before the reload, re-tie them after, and redo the tied module's post-load processing (on CPU
  the LM head computes from a prepacked copy of its weight).
"""
from __future__ import annotations


def _eager_token_ranks() -> None:
    """On CPU, count each sampled token's rank among the vocabulary eagerly. vLLM torch.compiles that count (the
    `rank` its logprobs carry, which rlhf-ray never reads) to spare GPU memory a copy of the logits; on CPU the
    compile is what costs: 2-5 s (dynamo, an inductor build with a C++ compiler) at each engine process's first
    sampled logprob, for a [tokens, vocab] comparison that takes microseconds eagerly at these sizes."""
    import torch
    if torch.cuda.is_available():
        return
    import vllm.v1.sample.sampler as sampler

    def batched_count_greater_than(x: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        return (x >= values).sum(-1)
    sampler.batched_count_greater_than = batched_count_greater_than


_eager_token_ranks()


def _shared_parameters(model) -> list[tuple[str, str]]:
    """(alias, owner) pairs of parameter names that are the same tensor (e.g. lm_head.weight -> embed_tokens)."""
    owner_of: dict[int, str] = {}
    pairs = []
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in owner_of:
            pairs.append((name, owner_of[id(p)]))
        else:
            owner_of[id(p)] = name
    return pairs


def _retie(model, pairs: list[tuple[str, str]]) -> None:
    for alias, owner in pairs:
        mod_path, _, attr = alias.rpartition(".")
        module = model.get_submodule(mod_path)
        setattr(module, attr, model.get_parameter(owner))
        # The CPU build keeps a prepacked copy of linear weights (`cpu_linear`): rebuild it from the re-tied one.
        quant_method = getattr(module, "quant_method", None)
        if quant_method is not None and hasattr(quant_method, "process_weights_after_loading"):
            quant_method.process_weights_after_loading(module)


class WeightSyncExtension:
    def _rlhf_reload(self, weights: list) -> int:
        model = self.model_runner.get_model()
        if not hasattr(self, "_rlhf_tied"):
            self._rlhf_tied = _shared_parameters(model)
        self.reload_weights(weights_iterator=weights, is_checkpoint_format=True)
        _retie(self.model_runner.get_model(), self._rlhf_tied)
        return len(weights)

    def rlhf_reseed(self, seed: int) -> int:
        """Seed the worker's default torch generator, which samples every request that carries no seed of its
        own: a generate call then draws the same tokens whatever was generated before it."""
        import torch
        torch.manual_seed(seed)
        return seed

    def rlhf_load_weights(self, meta: list, flat) -> int:
        """Load one packed bucket of HF-named tensors (actors/sync_group.py); returns its tensor count. `flat` is
        a uint8 tensor, or bytes where vLLM runs its engine core in another process (tensors inside
        collective_rpc args arrive there as lists)."""
        import warnings

        import torch
        from actors.sync_group import unpack
        if not isinstance(flat, torch.Tensor):
            with warnings.catch_warnings():       # read-only bytes: reload copies them into the parameters
                warnings.simplefilter("ignore", UserWarning)
                flat = torch.frombuffer(flat, dtype=torch.uint8)
        return self._rlhf_reload(unpack(meta, flat))

    def rlhf_load_tensors(self, weights: list) -> int:
        """Load (name, tensor) pairs handed over in this process (the in-process backend): no unpacking."""
        return self._rlhf_reload(weights)

    # ---------------------------------------------------------------- the process-group backend
    def rlhf_open_sync_group(self, addr: str, port: int, first_rank: int, world_size: int, backend: str) -> int:
        """Join the policy's weight-sync group as rank first_rank + this worker's rank within its engine."""
        from actors.sync_group import join_store, open_group
        rank = first_rank + getattr(self, "rank", 0)
        self._rlhf_sync = open_group(join_store(addr, port, world_size), rank, world_size, backend)
        return rank

    def rlhf_receive_bucket(self, meta: list) -> int:
        """Receive one broadcast bucket from policy rank 0 and load it in place."""
        import torch
        from actors.sync_group import broadcast, nbytes, unpack
        device = "cuda" if torch.cuda.is_available() else "cpu"
        flat = torch.empty(nbytes(meta), dtype=torch.uint8, device=device)
        broadcast(self._rlhf_sync, flat)
        return self._rlhf_reload(unpack(meta, flat))

    # ---------------------------------------------------------------- the CUDA IPC backend (same GPU as the policy)
    def rlhf_receive_ipc_bucket(self, meta: list, handles: list) -> int:
        """Open the policy's CUDA tensors through their IPC handles (no copy through the host) and load them."""
        weights = [(name, rebuild(*args)) for (name, _, _), (rebuild, args) in zip(meta, handles)]
        return self._rlhf_reload(weights)
