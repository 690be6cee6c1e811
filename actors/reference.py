"""The reference: the frozen starting policy, the anchor of the KL penalty."""
from __future__ import annotations

import ray
import torch

from actors.base import FrozenRole, busy
from rlhf_ray.batch import RolloutBatch
from rlhf_ray.models import Quant, load_causal_lm, response_logprobs


class Reference(FrozenRole):
    """A frozen causal LM scoring each sampled token. The reference loads models.reference (else the policy's
    starting weights) under the `reference` section; a subclass names another role and model (actors/teacher.py)."""
    role = "reference"

    def __init__(self, rank: int, world_size: int, cfg, device: str):
        section = getattr(cfg, self.role)
        super().__init__(rank, world_size, device, role=self.role, seed=cfg.run.seed,
                         threads=section.cpus_per_rank, cores=section.cpu_cores)
        self.cfg, self.section = cfg, section
        self._frozen(section, cfg.train.dtype, self._load_model)

    def model_dir(self) -> str:
        return self.cfg.models.reference or self.cfg.models.policy

    def _load_model(self) -> None:
        self._before_load()
        model = load_causal_lm(self.model_dir(), self.cfg.train.dtype, self.cfg.models.trust_remote_code, self.role,
                               self.cfg.train.attn_implementation, Quant.of(self.section, self.cfg.train.dtype))
        self.model = self._prepare(model)

    @busy
    def logprobs(self, batch: RolloutBatch) -> torch.Tensor:
        """This rank's shard of the model's response logprobs at the sampling temperature. [B/ranks, T]."""
        T, temp = batch.response_len, self.cfg.generation.temperature
        return self._forward_shard(
            batch, lambda mb: response_logprobs(self.model, mb.input_ids, mb.attention_mask, T, temp),
            self.section.micro_batch_size)


ReferenceActor = ray.remote(Reference)
