"""Padded tensor batches: what flows between the driver and the actors.

A batch is a plain `dict[str, torch.Tensor]` whose tensors share the first (sequence) dimension. The driver
puts it into the Ray object store once; every rank slices its own shard. No per-sample Python objects on
the hot path.
"""
from __future__ import annotations

import torch

Batch = dict[str, torch.Tensor]


def build_rollout_batch(prompt_ids: list[list[int]], response_ids: list[list[int]],
                        sample_logprobs: list[list[float]], pad_id: int) -> Batch:
    """Left-pad prompts to P, right-pad responses to T: input_ids [B, P+T], response_mask [B, T]."""
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
    return {"input_ids": input_ids, "attention_mask": attention_mask,
            "response_mask": response_mask, "sample_logprobs": logprobs}


def response_texts(tokenizer, batch: Batch) -> list[str]:
    """The responses of a rollout batch as text, special tokens dropped."""
    T = batch["response_mask"].size(1)
    responses = [row[m.bool()] for row, m in zip(batch["input_ids"][:, -T:], batch["response_mask"])]
    return tokenizer.batch_decode(responses, skip_special_tokens=True)


def first_rollouts(tokenizer, batch: Batch, k: int) -> list[dict]:
    """The first k rollouts as the policy saw them: the prompt's tokens (chat template included, padding
    dropped) and the response, decoded with special tokens kept."""
    T = batch["response_mask"].size(1)
    out = []
    for row, m, rm in zip(batch["input_ids"][:k], batch["attention_mask"][:k], batch["response_mask"][:k]):
        out.append({"prompt": tokenizer.decode(row[:-T][m[:-T].bool()]),
                    "response": tokenizer.decode(row[-T:][rm.bool()])})
    return out


def batch_size(batch: Batch) -> int:
    return next(iter(batch.values())).size(0)


def select(batch: Batch, index) -> Batch:
    return {k: v[index] for k, v in batch.items()}


def shard_bounds(n: int, rank: int, world_size: int) -> slice:
    """The contiguous slice of rank `rank` of n rows (sizes differ by at most one)."""
    return slice(rank * n // world_size, (rank + 1) * n // world_size)


def shard(batch: Batch, rank: int, world_size: int) -> Batch:
    return select(batch, shard_bounds(batch_size(batch), rank, world_size))


def shard_list(items: list, rank: int, world_size: int) -> list:
    return items[shard_bounds(len(items), rank, world_size)]


def chunks(batch: Batch, size: int) -> list[Batch]:
    n = batch_size(batch)
    return [select(batch, slice(i, min(i + size, n))) for i in range(0, n, size)]


def sort_by_length(batch: Batch) -> tuple[Batch, torch.Tensor]:
    """The rows ordered by real length (attention-mask sum), so that micro-batches cut from it hold rows of
    similar length and lose their padding columns when trimmed; and the inverse order, to put results back.
    A batch without an attention mask comes back as it is."""
    if "attention_mask" not in batch:
        return batch, torch.arange(batch_size(batch))
    order = torch.argsort(batch["attention_mask"].flatten(1).sum(-1), stable=True)   # [B, L] or [G, K, L]
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
