"""Supervised stages on one DeepSpeed ZeRO rank: SFT and DPO train the policy's causal LM, the reward-model
stage trains a scalar head with the Bradley-Terry loss. Same rank group, same minibatch loop as PPO.

Batches (built in `rlhf_ray/stage_data.py`):
    sft   input_ids, attention_mask, labels (IGNORE outside the assistant's tokens)
    rm    {chosen,rejected}_{input_ids,attention_mask}, weight (1/#pairs of the prompt, mean 1)
    dpo   {chosen,rejected}_{input_ids,attention_mask,labels}, ref_{chosen,rejected} (sequence logprobs)
"""
from __future__ import annotations

import ray
import torch

from actors.base import DeepSpeedRole
from rlhf_ray.batch import Batch, chunks, shard
from rlhf_ray.models import load_causal_lm, load_scalar_model, position_ids_from_mask, sequence_scores
from rlhf_ray.prefs import bradley_terry_loss, dpo_loss
from rlhf_ray.sft import sft_loss, sequence_logprobs


class Supervised(DeepSpeedRole):
    def __init__(self, rank: int, world_size: int, stage, objective: str, dtype: str, device: str,
                 trust_remote_code: bool = False):
        super().__init__(rank, world_size, int(stage.trainer.cpus_per_rank), device)
        self.stage, self.objective, self.dtype, self.trust = stage, objective, dtype, trust_remote_code

    def init_process_group(self, master_addr: str, master_port: int) -> None:
        super().init_process_group(master_addr, master_port)
        st = self.stage
        if self.objective == "rm":
            load = lambda: load_scalar_model(st.model, self.dtype, self.trust, "rm.model")  # noqa: E731
        else:
            load = lambda: load_causal_lm(st.model, self.dtype, self.trust, f"{self.objective}.model")  # noqa: E731
        self._init_engine(load, st.trainer, st.batch_size, self.dtype)

    # ------------------------------------------------------------------ per-objective forward and loss
    def _logits(self, ids, mask):
        return self.model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask),
                          use_cache=False).logits

    def _pair_logprobs(self, mb: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        return (sequence_logprobs(self._logits(mb["chosen_input_ids"], mb["chosen_attention_mask"]), mb["chosen_labels"]),
                sequence_logprobs(self._logits(mb["rejected_input_ids"], mb["rejected_attention_mask"]),
                                  mb["rejected_labels"]))

    def _loss(self, mb: Batch) -> tuple[torch.Tensor, dict]:
        if self.objective == "sft":
            loss, n = sft_loss(self._logits(mb["input_ids"], mb["attention_mask"]), mb["labels"])
            return loss, {"tokens": n}
        if self.objective == "rm":
            c = sequence_scores(self.model, mb["chosen_input_ids"], mb["chosen_attention_mask"])
            r = sequence_scores(self.model, mb["rejected_input_ids"], mb["rejected_attention_mask"])
            loss = bradley_terry_loss(c, r, weights=mb["weight"])
            return loss, {"accuracy": (c > r).float().mean().detach(), "margin": (c - r).mean().detach()}
        pc, pr = self._pair_logprobs(mb)
        return dpo_loss(pc, pr, mb["ref_chosen"], mb["ref_rejected"], self.stage.beta)

    # ------------------------------------------------------------------ entry points (collective under ZeRO-3)
    def train(self, data: Batch, seed: int) -> dict:
        return self._minibatch_updates(data, 1, self.stage.batch_size, seed, self._loss)

    @torch.no_grad()
    def evaluate(self, data: Batch) -> dict:
        """Mean of the objective's loss and statistics over this rank's shard of `data` (equal shards)."""
        sums: dict[str, float] = {}
        batches = chunks(shard(data, self.rank, self.world_size), self.micro)
        for mb in batches:
            loss, stats = self._loss(self._to_device(mb))
            for k, v in {"loss": loss, **stats}.items():
                sums[k] = sums.get(k, 0.0) + float(v)
        return {k: v / len(batches) for k, v in sums.items()}

    @torch.no_grad()
    def pair_logprobs(self, data: Batch) -> torch.Tensor:
        """[n, 2] sequence logprobs of (chosen, rejected) for this rank's shard: before DPO's first step these
        are the reference's (the starting weights *are* the reference), so no second model is held."""
        return self._forward_shard(data, lambda mb: torch.stack(self._pair_logprobs(mb), dim=-1), self.micro)


SupervisedActor = ray.remote(Supervised)
