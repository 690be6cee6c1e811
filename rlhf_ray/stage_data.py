"""Tensors for the supervised stages, from normalised rows (rlhf_ray/formats.py). Pure; unit-tested.

Held-out splits are by prompt, so no prompt (and none of its K answers) is in both train and eval.
Preferences keep a prompt's K answers together, each run once, with its pairs as a K x K matrix; the pairs of
one prompt share a weight 1/#pairs (InstructGPT: a prompt counts once, however many of its C(K, 2) pairs
there are).
"""
from __future__ import annotations

import math
import random

import torch

from rlhf_ray.batch import RankingBatch, SFTBatch, TensorBatch, ThumbsBatch
from rlhf_ray.data import DataError
from rlhf_ray.prompts import render_prompt
from rlhf_ray.sft import IGNORE, collate_sft, sft_example


def split_by_prompt(items: list, key, eval_fraction: float, seed: int, source: str) -> tuple[list, list]:
    """(train, held-out) with no prompt in both; `source` (the data file) names the problem when there is one."""
    keys = sorted({key(x) for x in items})
    if len(keys) < 2:
        raise DataError(f"{source}: only {len(keys)} distinct prompt(s): cannot hold any out for evaluation")
    random.Random(seed).shuffle(keys)
    held = set(keys[:min(len(keys) - 1, max(1, math.ceil(eval_fraction * len(keys))))])
    return [x for x in items if key(x) not in held], [x for x in items if key(x) in held]


def sft_prompt_key(example: dict) -> str:
    if "text" in example:
        return example["text"]
    return "\x00".join(m["content"] for m in example["messages"][:-1])


def sft_batch(tokenizer, examples: list[dict], max_len: int, chat: bool) -> SFTBatch:
    return collate_sft([sft_example(tokenizer, e, max_len, chat) for e in examples], tokenizer.pad_token_id)


def _pad(seqs: list[list[int]], value: int, length: int) -> list[list[int]]:
    return [s + [value] * (length - len(s)) for s in seqs]


def ranking_batch(tokenizer, prefs: list[tuple[str, list[str], list[tuple[int, int]]]], max_len: int,
                  chat: bool) -> RankingBatch:
    """One row per prompt, each of its K answers tokenised once (InstructGPT: a ranking of K answers is one
    batch element whose C(K, 2) pairs share the K forward passes); the prompt rendered as PPO renders it, labels
    on the answer only. Prompts with fewer than K answers get all-padding rows that belong to no pair (and are
    never run).
    """
    p_ids, answers, pairs = [], [], []
    for prompt, responses, prs in prefs:
        p = render_prompt(tokenizer, prompt, chat, max_len // 2)
        p_ids.append(p)
        answers.append([(tokenizer(r, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id])
                        [:max_len - len(p)] for r in responses])
        pairs.append(prs)
    K = max(len(a) for a in answers)
    L = max(len(p) + len(r) for p, a in zip(p_ids, answers) for r in a)
    ids, mask, labels = [], [], []
    for p, a in zip(p_ids, answers):
        seqs = [p + r for r in a] + [[]] * (K - len(a))
        ids.append(_pad(seqs, tokenizer.pad_token_id, L))
        mask.append(_pad([[1] * len(x) for x in seqs], 0, L))
        labels.append(_pad([[IGNORE] * len(p) + r for r in a] + [[]] * (K - len(a)), IGNORE, L))
    pair_matrix = torch.zeros(len(prefs), K, K)
    for g, prs in enumerate(pairs):
        for a, b in prs:
            pair_matrix[g, a, b] = 1.0
    return RankingBatch(torch.tensor(ids), torch.tensor(mask), torch.tensor(labels), pair_matrix)


def kl_partners(prompts: list[str], seed: int) -> list[int]:
    """For each example, another example whose answer its prompt is paired with for KTO's reference point: one with
    a different prompt (thumbs often judge several answers of one prompt), drawn with a seeded generator."""
    rng = random.Random(seed)
    n = len(prompts)
    if len(set(prompts)) < 2:
        raise DataError("KTO needs answers to at least 2 different prompts (its reference point pairs a prompt "
                        "with another prompt's answer)")
    out = []
    for i in range(n):
        j = rng.randrange(n)
        while prompts[j] == prompts[i]:
            j = rng.randrange(n)
        out.append(j)
    return out


def thumbs_batch(tokenizer, thumbs: list[tuple[str, str, bool]], max_len: int, chat: bool, seed: int) -> ThumbsBatch:
    """One row per judged answer: [its prompt + its answer, its prompt + another prompt's answer (`kl_partners`)],
    tokenised as `ranking_batch` does; the thumb as `desirable`."""
    prompts = [render_prompt(tokenizer, x, chat, max_len // 2) for x, _, _ in thumbs]
    answers = [(tokenizer(y, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]) for _, y, _ in thumbs]
    partner = kl_partners([x for x, _, _ in thumbs], seed)
    rows = [[(p, answers[i][:max_len - len(p)]), (p, answers[partner[i]][:max_len - len(p)])]
            for i, p in enumerate(prompts)]
    L = max(len(p) + len(a) for row in rows for p, a in row)
    ids = [_pad([p + a for p, a in row], tokenizer.pad_token_id, L) for row in rows]
    mask = [_pad([[1] * (len(p) + len(a)) for p, a in row], 0, L) for row in rows]
    labels = [_pad([[IGNORE] * len(p) + a for p, a in row], IGNORE, L) for row in rows]
    return ThumbsBatch(torch.tensor(ids), torch.tensor(mask), torch.tensor(labels),
                       torch.tensor([good for _, _, good in thumbs], dtype=torch.bool))


def listed_pairs(values: torch.Tensor, pairs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(values of the preferred answers, values of the others, weights) over every listed pair of [G, K] values.
    Each prompt's pairs share weight 1/#pairs: the weights of a ranking sum to 1, so it counts once however many
    pairs it has, and the weights' total is the number of rankings with a pair (`ranked_prompts`)."""
    g, a, b = pairs.nonzero(as_tuple=True)
    w = 1.0 / pairs.sum((1, 2))[g]
    return values[g, a], values[g, b], w


def ranked_prompts(pairs: torch.Tensor) -> int:
    """Rankings of [G, K, K] pairs that express a preference at all (a ranking of ties has no pair)."""
    return int((pairs.sum((1, 2)) > 0).sum())


def trim_to_multiple(batch: TensorBatch, k: int):
    """Drop the tail so every rank gets an equal shard (a ZeRO-3 forward is a collective)."""
    return batch.map(lambda t: t[:len(batch) // k * k])
