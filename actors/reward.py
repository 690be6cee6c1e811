"""The reward model: a frozen scalar-head model scoring each whole (prompt, response) sequence."""
from __future__ import annotations

import ray
import torch

from actors.base import FrozenRole
from rlhf_ray.batch import Batch
from rlhf_ray.models import load_scalar_model, sequence_scores


class Reward(FrozenRole):
    def __init__(self, rank: int, world_size: int, cfg, device: str):
        super().__init__(rank, world_size, int(cfg.reward.cpus_per_rank), device)
        self.cfg = cfg
        self._set_model(load_scalar_model(cfg.models.reward, cfg.train.dtype, cfg.models.trust_remote_code, "reward"))

    def scores(self, batch: Batch) -> torch.Tensor:
        return self._forward_shard(
            batch, lambda mb: sequence_scores(self.model, mb["input_ids"], mb["attention_mask"]),
            self.cfg.reward.micro_batch_size)


RewardActor = ray.remote(Reward)
