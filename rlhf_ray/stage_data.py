"""Tensors for the supervised stages, from normalised rows (rlhf_ray/formats.py). Pure; unit-tested.

Held-out splits are by prompt, so no prompt (and none of its K answers) is in both train and eval.
Preference pairs of one prompt share a weight 1/#pairs (InstructGPT: a prompt counts once, however many of
its C(K, 2) pairs there are), rescaled to mean 1.
"""
from __future__ import annotations

import math
import random

import torch

from rlhf_ray.batch import Batch
from rlhf_ray.data import DataError
from rlhf_ray.sft import IGNORE, collate_sft, prompt_ids, sft_example


def split_by_prompt(items: list, key, eval_fraction: float, seed: int) -> tuple[list, list]:
    keys = sorted({key(x) for x in items})
    if len(keys) < 2:
        raise DataError(f"only {len(keys)} distinct prompt(s): cannot hold any out for evaluation")
    random.Random(seed).shuffle(keys)
    held = set(keys[:min(len(keys) - 1, max(1, math.ceil(eval_fraction * len(keys))))])
    return [x for x in items if key(x) not in held], [x for x in items if key(x) in held]


def sft_prompt_key(example: dict) -> str:
    if "text" in example:
        return example["text"]
    return "\x00".join(m["content"] for m in example["messages"][:-1])


def sft_batch(tokenizer, examples: list[dict], max_len: int) -> Batch:
    return collate_sft([sft_example(tokenizer, e, max_len) for e in examples], tokenizer.pad_token_id)


def _pad(seqs: list[list[int]], value: int, length: int) -> torch.Tensor:
    return torch.tensor([s + [value] * (length - len(s)) for s in seqs], dtype=torch.long)


def pair_batch(tokenizer, prefs: list[tuple[str, list[str], list[tuple[int, int]]]], max_len: int) -> Batch:
    """Every (chosen, rejected) pair as right-padded chat sequences with response-only labels and weights."""
    chosen, rejected, weights = [], [], []
    for prompt, responses, pairs in prefs:
        p = prompt_ids(tokenizer, [{"role": "user", "content": prompt}])[-(max_len // 2):]
        resp = [(tokenizer(r, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id])[:max_len - len(p)]
                for r in responses]
        for a, b in pairs:
            chosen.append((p, resp[a]))
            rejected.append((p, resp[b]))
            weights.append(1.0 / len(pairs))
    L = max(len(p) + len(r) for p, r in chosen + rejected)
    out: Batch = {}
    for name, side in (("chosen", chosen), ("rejected", rejected)):
        ids = [p + r for p, r in side]
        out[f"{name}_input_ids"] = _pad(ids, tokenizer.pad_token_id, L)
        out[f"{name}_attention_mask"] = _pad([[1] * len(x) for x in ids], 0, L)
        out[f"{name}_labels"] = _pad([[IGNORE] * len(p) + r for p, r in side], IGNORE, L)
    w = torch.tensor(weights, dtype=torch.float32)
    out["weight"] = w / w.mean()
    return out


def trim_to_multiple(batch: Batch, k: int) -> Batch:
    """Drop the tail so every rank gets an equal shard (a ZeRO-3 forward is a collective)."""
    n = next(iter(batch.values())).size(0) // k * k
    return {key: v[:n] for key, v in batch.items()}
