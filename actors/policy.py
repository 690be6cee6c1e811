"""The policy: a causal LM trained with the clipped PPO surrogate under DeepSpeed ZeRO, one actor per rank."""
from __future__ import annotations

import ray
import torch

from actors.base import DeepSpeedRole, adapters_off, busy
from rlhf_ray.algos import aggregate, aggregation_count, kl_estimate, masked_mean, ppo_policy_loss
from rlhf_ray.batch import Experience, RolloutBatch
from rlhf_ray.models import Quant, load_causal_lm, response_logprobs


class Policy(DeepSpeedRole):
    def __init__(self, rank: int, world_size: int, cfg, device: str):
        super().__init__(rank, world_size, device, role="policy", seed=cfg.run.seed, threads=cfg.policy.cpus_per_rank,
                         cores=cfg.policy.cpu_cores)
        self.cfg = cfg

    def init_process_group(self, master_addr: str, master_port: int) -> None:
        super().init_process_group(master_addr, master_port)
        c = self.cfg
        self._init_engine(lambda: load_causal_lm(c.models.policy, c.train.dtype, c.models.trust_remote_code, "policy",
                                                 c.train.attn_implementation, Quant.of(c.policy, c.train.dtype)),
                          c.policy, c.ppo.minibatch_size, c.train.dtype)

    @busy
    def logprobs(self, batch: RolloutBatch) -> torch.Tensor:
        """This rank's shard of response logprobs at the sampling temperature (PPO's old logprobs). [B/ranks, T]."""
        return self._response_logprobs(batch)

    @busy
    def reference_logprobs(self, batch: RolloutBatch) -> torch.Tensor:
        """reference.from_policy_base: the reference's logprobs, from this rank's model with its adapters switched
        off, i.e. from the frozen base (models.policy, in policy.quantization's precision). [B/ranks, T]."""
        with adapters_off(self.model):
            return self._response_logprobs(batch)

    def _response_logprobs(self, batch: RolloutBatch) -> torch.Tensor:
        T, temp = batch.response_len, self.cfg.generation.temperature
        return self._forward_shard(
            batch, lambda mb: response_logprobs(self.model, mb.input_ids, mb.attention_mask, T, temp), self.micro)

    def _loss_count(self, minibatch: Experience) -> float:
        return aggregation_count(minibatch.loss_mask, self.cfg.ppo.loss_agg)

    @busy
    def train(self, exp: Experience, step: int, kl_coef: float = 0.0) -> dict:
        """PPO epochs: clipped (optionally dual-clipped) surrogate, minus the entropy bonus, plus beta * KL to the
        reference when ppo.kl_placement is 'loss'; every term reduced by ppo.loss_agg over the whole minibatch.

        Until the first optimizer step the weights are the rollout's policy. There, on the first minibatch,
        `logprob_diff_max` measures how far the given old logprobs (the engine's, with ppo.reuse_sample_logprobs)
        are from this model's, and `entropy` is logged: the rollout policy's entropy, computed outside the graph.
        Entropy enters the graph, on every micro-batch, only when the bonus needs it (ppo.entropy_coef > 0): a
        full-vocabulary softmax and its backward cost as much as the LM head itself on a small model."""
        ppo, temp = self.cfg.ppo, self.cfg.generation.temperature
        T = exp.response_len
        kl_in_loss = ppo.kl_placement == "loss"
        steps_before = self.engine.global_steps

        def loss_fn(mb: Experience, den: float):
            first = self.engine.global_steps == steps_before
            want = "grad" if ppo.entropy_coef else "detached" if first else None
            out = response_logprobs(self.model, mb.input_ids, mb.attention_mask, T, temp, entropy=want)
            lp, ent = out if want else (out, None)
            mask = mb.loss_mask
            loss, stats = ppo_policy_loss(lp, mb.old_logprobs, mb.advantages, mask, ppo.clip_bounds(),
                                          ppo.dual_clip, ppo.loss_agg, den, mb.is_weights, ppo.ratio_level)
            if ppo.entropy_coef:
                loss = loss - ppo.entropy_coef * aggregate(ent, mask, ppo.loss_agg, den)
            if kl_in_loss:
                kl = aggregate(kl_estimate(lp, mb.ref_logprobs, ppo.kl_estimator), mask, ppo.loss_agg, den)
                loss = loss + kl_coef * kl
                stats["kl_loss"] = kl.detach()
            if first:
                stats["logprob_diff_max"] = ((lp.detach() - mb.old_logprobs).abs() * mask).max()
                stats["entropy"] = masked_mean(ent, mask).detach()
            return loss, stats

        return self._minibatch_updates(exp, ppo.epochs, ppo.minibatch_size, step, loss_fn)

    def _send_buckets(self, bucket_bytes: int, send, keep_on_device: bool = False) -> dict:
        """Gather the weights bucket by bucket (collective under ZeRO-3, so every rank calls this); rank 0 hands
        each bucket to `send`, which returns once every engine has loaded it."""
        n_tensors, n_bytes = 0, 0
        for bucket in self._named_buckets(bucket_bytes, keep_on_device):
            if bucket is None:
                continue
            send(bucket)
            n_tensors += len(bucket)
            n_bytes += sum(t.numel() * t.element_size() for t in bucket.values())
        return {"tensors": n_tensors, "bytes": n_bytes}

    @busy
    def load_into(self, engine, bucket_bytes: int) -> dict:
        """In-place sync (the hybrid layout, actors/host.py): `engine` is an Engine object in this process. Each
        bucket goes to it as the tensors themselves, no packing or copy: below ZeRO-3 on the policy's device they are
        the live parameters, which the engine copies into its own layout (fused projections; on CPU, prepacked)
        before this returns. `staged` counts bytes copied on the way (none)."""
        out = self._send_buckets(bucket_bytes, engine.load_tensors)
        return {**out, "staged": 0}

    @busy
    def push_weights(self, engines: list, bucket_bytes: int) -> dict:
        """Object-store sync: each bucket packed into one flat buffer (actors/sync_group.py), put into Ray's object
        store once as a numpy array, which every engine on the node then reads without a copy."""
        from actors.sync_group import pack

        def send(bucket):
            meta, flat = pack(bucket)
            payload = ray.put(flat.numpy())
            ray.get([e.load_weights.remote(meta, payload) for e in engines])
        out = self._send_buckets(bucket_bytes, send)
        return {**out, "staged": 2 * out["bytes"]}          # the flat buffer, then its copy in the object store

    def host_sync_store(self, world_size: int) -> int:
        """Process-group sync: rank 0 hosts the group's store (held until the group opens); returns its port."""
        from actors.sync_group import host_store
        self._sync_store = host_store(self.node_ip(), world_size)
        return self._sync_store.port

    def open_sync_group(self, addr: str, port: int, world_size: int, backend: str) -> None:
        """Process-group sync: rank 0 is the group's broadcast root, on the store it hosts (`host_sync_store`)."""
        from actors.sync_group import open_group
        self._sync_group = open_group(self._sync_store, 0, world_size, backend)

    @busy
    def broadcast_weights(self, engines: list, bucket_bytes: int) -> dict:
        """Process-group sync: each bucket broadcast as one flat buffer to every engine worker."""
        from actors.sync_group import broadcast, pack

        def send(bucket):
            meta, flat = pack(bucket)
            refs = [e.receive_bucket.remote(meta) for e in engines]
            broadcast(self._sync_group, flat.to(self.device))
            ray.get(refs)
        out = self._send_buckets(bucket_bytes, send)
        return {**out, "staged": (1 + len(engines)) * out["bytes"]}   # the flat buffer, each engine's receive buffer

    @busy
    def share_weights_ipc(self, engines: list, bucket_bytes: int) -> dict:
        """CUDA IPC sync, for engines on this rank's GPU: each bucket's IPC handles; the tensors stay alive (on the
        GPU) until every engine has loaded them."""
        from torch.multiprocessing.reductions import reduce_tensor

        def send(bucket):
            meta = [(name, list(t.shape), str(t.dtype)) for name, t in bucket.items()]
            ray.get([e.receive_ipc_bucket.remote(meta, [reduce_tensor(t) for t in bucket.values()]) for e in engines])
        out = self._send_buckets(bucket_bytes, send, keep_on_device=True)
        return {**out, "staged": 0}                          # the engines read the policy's GPU tensors


PolicyActor = ray.remote(Policy)
