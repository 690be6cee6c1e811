"""The critic: a scalar-head model predicting per-token values, trained with the clipped value loss under
DeepSpeed ZeRO. Initialised from `models.critic`, else the reward model (InstructGPT), else the policy.
Only the GAE estimator creates it."""
from __future__ import annotations

import ray
import torch

from actors.base import DeepSpeedRole, busy
from rlhf_ray.algos import aggregation_count, value_loss
from rlhf_ray.batch import Experience, RolloutBatch
from rlhf_ray.models import Quant, load_scalar_model, token_values


class Critic(DeepSpeedRole):
    def __init__(self, rank: int, world_size: int, cfg, device: str):
        super().__init__(rank, world_size, device, role="critic", seed=cfg.run.seed, threads=cfg.critic.cpus_per_rank,
                         cores=cfg.critic.cpu_cores)
        self.cfg = cfg

    def init_process_group(self, master_addr: str, master_port: int) -> None:
        super().init_process_group(master_addr, master_port)
        c = self.cfg
        path = c.critic_init()
        self._init_engine(lambda: load_scalar_model(path, c.train.dtype, c.models.trust_remote_code, "critic",
                                                    c.train.attn_implementation, Quant.of(c.critic, c.train.dtype)),
                          c.critic, c.ppo.minibatch_size, c.train.dtype, head="score")

    @busy
    def values(self, batch: RolloutBatch) -> torch.Tensor:
        """This rank's shard of V(s_t) per response position. [B/ranks, T]."""
        T = batch.response_len
        return self._forward_shard(
            batch, lambda mb: token_values(self.model, mb.input_ids, mb.attention_mask, T), self.micro)

    def _loss_count(self, minibatch: Experience) -> float:
        return aggregation_count(minibatch.loss_mask, self.cfg.ppo.loss_agg)

    @busy
    def train(self, exp: Experience, step: int, kl_coef: float = 0.0) -> dict:
        ppo = self.cfg.ppo
        T = exp.response_len

        def loss_fn(mb: Experience, den: float):
            v = token_values(self.model, mb.input_ids, mb.attention_mask, T)
            return value_loss(v, mb.values, mb.returns, mb.loss_mask, ppo.value_clip, ppo.loss_agg, den)

        return self._minibatch_updates(exp, ppo.epochs, ppo.minibatch_size, step, loss_fn)


CriticActor = ray.remote(Critic)
