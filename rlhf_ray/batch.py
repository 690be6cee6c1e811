"""Padded tensor batches: what flows between the driver and the actors, each a type whose fields state their shapes.

    B   rows (sequences; a PPO rollout is prompt-major: the n samples of a prompt are consecutive)
    P   prompt columns, left-padded;  T   response columns, right-padded;  L = P + T
    S   reward sources;  G, K   rankings and the answers of each (supervised stages)

Every batch is a `TensorBatch`: tensor fields sharing the first (row) dimension, a field set to None being absent.
The driver puts one into the Ray object store once; every rank slices its own shard with `shard` and cuts
micro-batches with `chunks`. No per-sample Python objects on the hot path.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TypedDict, TypeVar

import torch

B = TypeVar("B", bound="TensorBatch")


class TensorBatch:
    """Base of every batch type (all dataclasses): row-wise selection and device moves over its present fields."""

    def fields(self) -> dict[str, torch.Tensor]:
        """The present (non-None) tensor fields, by name."""
        return {f.name: v for f in dataclasses.fields(self) if (v := getattr(self, f.name)) is not None}

    def map(self: B, fn) -> B:
        """A batch of the same type with fn applied to every present field."""
        return dataclasses.replace(self, **{k: fn(v) for k, v in self.fields().items()})

    def __len__(self) -> int:
        return next(iter(self.fields().values())).size(0)

    def to(self: B, device) -> B:
        return self.map(lambda t: t.to(device, non_blocking=True))


class Sample(TypedDict):
    """One sampled response, as an engine returns it (actors/engine.py `generate`)."""
    ids: list[int]                     # response token ids, the EOS included when one was generated
    logprobs: list[float]              # the sampling distribution's logprob of each id (temperature applied)
    finished: bool                     # ended on EOS (False: cut at max_new_tokens)
    version: int                       # the policy update whose weights sampled it (0: the starting weights)


class EpisodeSample(Sample):
    """One multi-turn episode, as an engine returns it (actors/engine.py `episodes`, rlhf_ray/env.py): a Sample
    whose ids interleave the model's turns and the environment's observations."""
    action: list[int]                  # per id: 1 where the model wrote it, 0 on an environment's observation
    token_rewards: list[float]         # per id: each turn's reward on its last action token, 0 elsewhere
    episode: dict                      # Episode.summary: turns, observation tokens, why it ended, the env's counts


class AgentSample(EpisodeSample):
    """One agent's episode through the gateway (rlhf_ray/agent.py Trajectory): its prompt is what the agent's first
    call rendered, not the data row's (empty when the agent never called: the row's rendered prompt stands in)."""
    prompt: list[int]


@dataclass
class RolloutBatch(TensorBatch):
    """One step's samples, padded: what the engines drew and what scoring and training read."""
    input_ids: torch.Tensor            # [B, L] long: prompt (left-padded to P), then response (right-padded to T)
    attention_mask: torch.Tensor       # [B, L] long: 1 on real tokens
    response_mask: torch.Tensor        # [B, T] float: 1 on the response's tokens (what is decoded and scored)
    action_mask: torch.Tensor          # [B, T] float: 1 on tokens the policy wrote, the only ones the loss, the KL
                                       #   and the advantages count. Single-turn rollouts: == response_mask; a
                                       #   multi-turn one has 0 on the observations an environment appended
    sample_logprobs: torch.Tensor      # [B, T] float: the engines' sampling logprobs (0 off the response)
    finished: torch.Tensor | None = None   # [B] bool: the response ended on EOS
    version: torch.Tensor | None = None    # [B] long: the policy update whose weights sampled each row
    token_rewards: torch.Tensor | None = None  # [B, T] float: multi-turn, each turn's environment reward on its
                                       #   last action token (unweighted); None for single-turn rollouts

    @property
    def response_len(self) -> int:     # T
        return self.response_mask.size(1)


@dataclass
class Experience(TensorBatch):
    """A rollout scored and with its advantages: what the policy and the critic train on (rlhf_ray/algos.py
    `compute_experience`)."""
    input_ids: torch.Tensor            # [B, L] long
    attention_mask: torch.Tensor       # [B, L] long
    loss_mask: torch.Tensor            # [B, T] float: the tokens every loss term counts: the rollout's action_mask,
                                       #   less whole rows that carry no loss (ppo.mask_truncated)
    old_logprobs: torch.Tensor         # [B, T] pi_old (the policy before this step's updates), sampling temperature
    ref_logprobs: torch.Tensor         # [B, T] the reference's, for the KL (in the reward, or as a loss term)
    advantages: torch.Tensor           # [B, T] per token (outcome estimators: the sequence's, on every token)
    values: torch.Tensor | None = None     # [B, T] the critic's V(s_t) at rollout time (GAE only)
    returns: torch.Tensor | None = None    # [B, T] value targets (GAE only)
    is_weights: torch.Tensor | None = None  # [B, T] off-policy correction per token (ppo.is_correction), no grad

    @property
    def response_len(self) -> int:     # T
        return self.loss_mask.size(1)


@dataclass
class RewardScores(TensorBatch):
    """The reward actor's scores of each sample (actors/reward.py)."""
    total: torch.Tensor                # [B] sum over sources of weight x score: what the RL optimises
    sources: torch.Tensor              # [B, S] each reward source's own score, in reward.sources order
    monitor: torch.Tensor | None = None    # [B] the held-out monitor reward model's score (never optimised)


@dataclass
class SFTBatch(TensorBatch):
    """Supervised fine-tuning examples (rlhf_ray/sft.py)."""
    input_ids: torch.Tensor            # [B, L] long, right-padded
    attention_mask: torch.Tensor       # [B, L] long
    labels: torch.Tensor               # [B, L] long: the token to predict, IGNORE outside the assistant's tokens


@dataclass
class RankingBatch(TensorBatch):
    """K-way rankings, one row per prompt (rlhf_ray/stage_data.py): the reward model's and DPO's data."""
    input_ids: torch.Tensor            # [G, K, L] long: prompt + answer + EOS, right-padded; missing answers empty
    attention_mask: torch.Tensor       # [G, K, L] long
    labels: torch.Tensor               # [G, K, L] long: the answer's tokens, IGNORE elsewhere
    pairs: torch.Tensor                # [G, K, K] float: 1 where answer a is preferred to answer b
    ref_logprobs: torch.Tensor | None = None   # [G, K] DPO: the reference's sequence logprob of each answer


@dataclass
class ThumbsBatch(TensorBatch):
    """Unpaired thumbs for KTO, one row per judged answer (rlhf_ray/stage_data.py): slot 0 is the prompt with its
    answer, slot 1 the same prompt with another prompt's answer (KTO's reference point: KL(pi || ref) estimated on
    answers the prompt did not ask for)."""
    input_ids: torch.Tensor            # [N, 2, L] long: prompt + answer + EOS, right-padded
    attention_mask: torch.Tensor       # [N, 2, L] long
    labels: torch.Tensor               # [N, 2, L] long: the answer's tokens, IGNORE elsewhere
    desirable: torch.Tensor            # [N] bool: thumb up
    ref_logprobs: torch.Tensor | None = None   # [N, 2] the reference's sequence logprob of each slot


def build_rollout_batch(prompt_ids: list[list[int]], response_ids: list[list[int]],
                        sample_logprobs: list[list[float]], pad_id: int) -> RolloutBatch:
    """Left-pad prompts to P, right-pad responses to T; a single-turn rollout: every response token is an action."""
    B = len(prompt_ids)
    P = max(len(p) for p in prompt_ids)
    T = max(1, max(len(r) for r in response_ids))
    input_ids = torch.full((B, P + T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((B, P + T), dtype=torch.long)
    response_mask = torch.zeros((B, T), dtype=torch.float32)
    logprobs = torch.zeros((B, T), dtype=torch.float32)
    for i, (p, r, lp) in enumerate(zip(prompt_ids, response_ids, sample_logprobs)):
        input_ids[i, P - len(p):P] = torch.tensor(p, dtype=torch.long)
        attention_mask[i, P - len(p):P] = 1
        if r:
            input_ids[i, P:P + len(r)] = torch.tensor(r, dtype=torch.long)
            attention_mask[i, P:P + len(r)] = 1
            response_mask[i, :len(r)] = 1.0
            logprobs[i, :len(r)] = torch.tensor(lp, dtype=torch.float32)
    return RolloutBatch(input_ids, attention_mask, response_mask, response_mask.clone(), logprobs)


def rollout_from_samples(prompt_ids: list[list[int]], samples: list[Sample], pad_id: int) -> RolloutBatch:
    """The padded batch of engine samples, each row's prompt given (prompt-major, one prompt per sample)."""
    batch = build_rollout_batch(prompt_ids, [s["ids"] for s in samples], [s["logprobs"] for s in samples], pad_id)
    batch.finished = torch.tensor([bool(s["finished"]) for s in samples])
    batch.version = torch.tensor([s["version"] for s in samples])
    return batch


def rollout_from_episodes(prompt_ids: list[list[int]], episodes: list[EpisodeSample], pad_id: int) -> RolloutBatch:
    """The padded batch of multi-turn episodes: as `rollout_from_samples`, and the action mask (0 on the
    observations) and the per-turn rewards from each episode."""
    batch = rollout_from_samples(prompt_ids, episodes, pad_id)
    batch.token_rewards = torch.zeros_like(batch.action_mask)
    for i, s in enumerate(episodes):
        n = len(s["ids"])
        batch.action_mask[i, :n] = torch.tensor(s["action"], dtype=torch.float32)
        batch.token_rewards[i, :n] = torch.tensor(s["token_rewards"], dtype=torch.float32)
    return batch


def response_texts(tokenizer, batch: RolloutBatch) -> list[str]:
    """The responses of a rollout batch as text, special tokens dropped."""
    T = batch.response_len
    responses = [row[m.bool()] for row, m in zip(batch.input_ids[:, -T:], batch.response_mask)]
    return tokenizer.batch_decode(responses, skip_special_tokens=True)


def first_rollouts(tokenizer, batch: RolloutBatch, k: int) -> list[dict]:
    """The first k rollouts as the policy saw them: the prompt's tokens (chat template included, padding
    dropped) and the response, decoded with special tokens kept."""
    T = batch.response_len
    out = []
    for row, m, rm in zip(batch.input_ids[:k], batch.attention_mask[:k], batch.response_mask[:k]):
        out.append({"prompt": tokenizer.decode(row[:-T][m[:-T].bool()]),
                    "response": tokenizer.decode(row[-T:][rm.bool()])})
    return out


def cat(parts: list[B]) -> B:
    """Batches of one type (e.g. each rank's results) joined along the rows."""
    first = parts[0]
    return dataclasses.replace(first, **{k: torch.cat([getattr(p, k) for p in parts]) for k in first.fields()})


def select(batch: B, index) -> B:
    return batch.map(lambda t: t[index])


def shard_bounds(n: int, rank: int, world_size: int) -> slice:
    """The contiguous slice of rank `rank` of n rows (sizes differ by at most one)."""
    return slice(rank * n // world_size, (rank + 1) * n // world_size)


def shard(batch: B, rank: int, world_size: int) -> B:
    return select(batch, shard_bounds(len(batch), rank, world_size))


def shard_list(items: list, rank: int, world_size: int) -> list:
    return items[shard_bounds(len(items), rank, world_size)]


def chunks(batch: B, size: int) -> list[B]:
    n = len(batch)
    return [select(batch, slice(i, min(i + size, n))) for i in range(0, n, size)]


def sort_by_length(batch: B) -> tuple[B, torch.Tensor]:
    """The rows ordered by real length (attention-mask sum), so that micro-batches cut from it hold rows of
    similar length and lose their padding columns when trimmed; and the inverse order, to put results back."""
    order = torch.argsort(batch.attention_mask.flatten(1).sum(-1), stable=True)   # [B, L] or [G, K, L]
    return select(batch, order), torch.argsort(order)


def split_round_robin(items: list, k: int) -> list[list]:
    """Deal items to k workers: worker i gets items i, i+k, i+2k, ..."""
    return [items[i::k] for i in range(k)]


def merge_round_robin(by_worker: list[list], n_items: int, n: int) -> list:
    """Inverse of `split_round_robin` when each item came back as n consecutive results (e.g. n samples per
    prompt): returns the n_items*n results in the original item order."""
    k = len(by_worker)
    out = [None] * (n_items * n)
    for w, results in enumerate(by_worker):
        for j, r in enumerate(results):
            out[(w + (j // n) * k) * n + j % n] = r
    return out
