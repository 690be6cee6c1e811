"""The reference: the frozen starting policy, the anchor of the KL penalty."""
from __future__ import annotations

import ray
import torch

from actors.base import FrozenRole, busy
from rlhf_ray.batch import RolloutBatch
from rlhf_ray.models import Quant, load_causal_lm, response_logprobs


class Reference(FrozenRole):
    def __init__(self, rank: int, world_size: int, cfg, device: str):
        super().__init__(rank, world_size, device, role="reference", seed=cfg.run.seed,
                         threads=cfg.reference.cpus_per_rank, cores=cfg.reference.cpu_cores)
        self.cfg = cfg
        self._frozen(cfg.reference, cfg.train.dtype, self._load_model)

    def _load_model(self) -> None:
        c = self.cfg.models
        self._before_load()
        model = load_causal_lm(c.reference or c.policy, self.cfg.train.dtype, c.trust_remote_code, "reference",
                               self.cfg.train.attn_implementation, Quant.of(self.cfg.reference, self.cfg.train.dtype))
        self.model = self._prepare(model)

    @busy
    def logprobs(self, batch: RolloutBatch) -> torch.Tensor:
        """This rank's shard of the reference's response logprobs at the sampling temperature. [B/ranks, T]."""
        T, temp = batch.response_len, self.cfg.generation.temperature
        return self._forward_shard(
            batch, lambda mb: response_logprobs(self.model, mb.input_ids, mb.attention_mask, T, temp),
            self.cfg.reference.micro_batch_size)


ReferenceActor = ray.remote(Reference)
