"""Supervised stages on one DeepSpeed ZeRO rank: SFT, DPO and KTO train the policy's causal LM, the reward-model
stage trains a scalar head with the Bradley-Terry loss. Same rank group, same minibatch loop as PPO.

Batches (`rlhf_ray/batch.py`, built in `rlhf_ray/stage_data.py`): SFT trains on an `SFTBatch`; the reward model
and DPO on a `RankingBatch` of K-way rankings (DPO with the starting weights' sequence logprobs as ref_logprobs).
Each answer runs through the model once; all the C(K, 2) pairs of its ranking are formed from those K values.
KTO trains on a `ThumbsBatch` (each judged answer, and its prompt with another prompt's answer for the reference
point z0). Every loss is exact across micro-batches: SFT averages over the minibatch's labelled tokens, RM and DPO
over its rankings (each counting once), KTO over its answers with z0 estimated once per minibatch (before its
micro-batches: z0 is a minibatch statistic, so a micro-batch's own would change the loss with the split).
"""
from __future__ import annotations

import dataclasses

import ray
import torch

from actors.base import DeepSpeedRole
from rlhf_ray.batch import RankingBatch, SFTBatch, ThumbsBatch, chunks, shard
from rlhf_ray.models import load_causal_lm, load_scalar_model, position_ids_from_mask, sequence_scores
from rlhf_ray.prefs import bradley_terry_loss, dpo_loss, kto_loss, kto_reference_point
from rlhf_ray.sft import labelled_tokens, sequence_logprobs, sft_loss
from rlhf_ray.stage_data import listed_pairs, ranked_prompts


class Supervised(DeepSpeedRole):
    def __init__(self, rank: int, world_size: int, stage, objective: str, dtype: str, device: str, seed: int,
                 trust_remote_code: bool = False):
        super().__init__(rank, world_size, device, role=objective, seed=seed, threads=stage.trainer.cpus_per_rank)
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

    def _per_answer(self, mb: RankingBatch, fn) -> torch.Tensor:
        """fn(ids, mask, labels) -> [n] over the real answers of [G, K, L] groups, back as [G, K]."""
        G, K, _ = mb.input_ids.shape
        ids, mask, labels = (t.flatten(0, 1) for t in (mb.input_ids, mb.attention_mask, mb.labels))
        rows = mask.any(-1).nonzero(as_tuple=True)[0]
        L = int(mask.sum(-1).max())                      # right-padded: drop the columns nobody uses
        vals = fn(ids[rows, :L], mask[rows, :L], labels[rows, :L])
        return vals.new_zeros(G * K).index_put((rows,), vals).view(G, K)

    def _answer_logprobs(self, mb: RankingBatch) -> torch.Tensor:
        return self._per_answer(mb, lambda i, m, lab: sequence_logprobs(self._logits(i, m), lab))

    def _loss_count(self, minibatch: SFTBatch | RankingBatch | ThumbsBatch) -> float:
        """SFT: the labelled tokens; RM and DPO: the rankings with a pair; KTO: the judged answers."""
        if self.objective == "kto":
            return float(len(minibatch))
        return float(labelled_tokens(minibatch.labels)) if self.objective == "sft" else ranked_prompts(minibatch.pairs)

    @torch.no_grad()
    def _kto_z0(self, batch: ThumbsBatch) -> None:
        """KTO's reference point on `batch` under the current weights: every rank runs the whole batch (the same
        forwards on every rank, as ZeRO-3 needs; KL(pi || ref) from each prompt paired with another's answer)."""
        lp = torch.cat([self._answer_logprobs(mb.to(self.device))[:, 1].cpu() for mb in chunks(batch, self.micro)])
        self._z0 = kto_reference_point(lp, batch.ref_logprobs[:, 1])

    def _loss(self, mb: SFTBatch | RankingBatch, denominator: float | None = None) -> tuple[torch.Tensor, dict]:
        """The objective's loss on a micro-batch, divided by `denominator` (default: the micro-batch's own count,
        for evaluation)."""
        if self.objective == "sft":
            loss, n = sft_loss(self._logits(mb.input_ids, mb.attention_mask), mb.labels, denominator)
            return loss, {"tokens": n}
        if self.objective == "rm":
            scores = self._per_answer(mb, lambda i, m, _: sequence_scores(self.model, i, m))
            c, r, w = listed_pairs(scores, mb.pairs)
            loss = bradley_terry_loss(c, r, weights=w, denominator=denominator)
            return loss, {"accuracy": (c > r).float().mean().detach(), "margin": (c - r).mean().detach()}
        if self.objective == "kto":               # slot 0 only: the judged answers (slot 1 went into z0)
            own = dataclasses.replace(mb, input_ids=mb.input_ids[:, :1], attention_mask=mb.attention_mask[:, :1],
                                      labels=mb.labels[:, :1])
            lp, st = self._answer_logprobs(own)[:, 0], self.stage
            return kto_loss(lp, mb.ref_logprobs[:, 0], mb.desirable, self._z0.to(lp.device), st.beta,
                            st.desirable_weight, st.undesirable_weight, denominator)
        pc, pr, w = listed_pairs(self._answer_logprobs(mb), mb.pairs)
        rc, rr, _ = listed_pairs(mb.ref_logprobs, mb.pairs)
        return dpo_loss(pc, pr, rc, rr, self.stage.beta, weights=w, denominator=denominator)

    # ------------------------------------------------------------------ entry points (collective under ZeRO-3)
    def train(self, data: SFTBatch | RankingBatch | ThumbsBatch, epoch: int) -> dict:
        return self._minibatch_updates(data, 1, self.stage.batch_size, epoch, self._loss,
                                       before=self._kto_z0 if self.objective == "kto" else None)

    @torch.no_grad()
    def evaluate(self, data: SFTBatch | RankingBatch) -> dict:
        """Mean of the objective's loss and statistics over this rank's shard of `data` (equal shards)."""
        sums: dict[str, float] = {}
        if self.objective == "kto":
            self._kto_z0(data)
        batches = chunks(shard(data, self.rank, self.world_size), self.micro)
        for mb in batches:
            loss, stats = self._loss(mb.to(self.device))
            for k, v in {"loss": loss, **stats}.items():
                sums[k] = sums.get(k, 0.0) + float(v)
        return {k: v / len(batches) for k, v in sums.items()}

    @torch.no_grad()
    def answer_logprobs(self, data: RankingBatch) -> torch.Tensor:
        """[G, K] sequence logprobs of every answer in this rank's shard: before DPO's first step these are the
        reference's (the starting weights *are* the reference), so no second model is held."""
        return self._forward_shard(data, self._answer_logprobs, self.micro)


SupervisedActor = ray.remote(Supervised)
