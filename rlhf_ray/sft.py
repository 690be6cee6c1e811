"""Supervised examples: loss on the assistant's tokens only (pure; unit-tested).

With the chat template (data.apply_chat_template), spans are found by rendering the conversation prefix by
prefix: the tokens an assistant turn adds between "everything before it, with the generation prompt" and
"everything up to and including it" are its loss tokens. A template that is not prefix-consistent is refused
rather than silently mis-masked. Without it, a single-turn example is the raw prompt (`render_prompt`, as PPO
renders it) followed by the answer and EOS.
"""
from __future__ import annotations

import torch

from rlhf_ray.batch import SFTBatch
from rlhf_ray.prompts import render_chat, render_prompt

IGNORE = -100


def sft_example(tokenizer, example: dict, max_len: int, chat: bool = True) -> tuple[list[int], list[int]]:
    """(input_ids, labels) with labels = IGNORE except on assistant tokens (or on all tokens for plain text).
    chat=False takes single-turn examples only: there is no raw rendering of a multi-turn conversation."""
    if "text" in example:
        ids = tokenizer(example["text"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids = ids[:max_len]
        return ids, list(ids)
    messages = example["messages"]
    if not chat:
        if [m["role"] for m in messages] != ["user", "assistant"]:
            raise ValueError("a multi-turn or system conversation needs data.apply_chat_template: true")
        prompt = render_prompt(tokenizer, messages[0]["content"], chat=False)
        answer = tokenizer(messages[1]["content"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        return (prompt + answer)[:max_len], ([IGNORE] * len(prompt) + answer)[:max_len]
    full = render_chat(tokenizer, messages, add_generation_prompt=False)
    labels = [IGNORE] * len(full)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = render_chat(tokenizer, messages[:i], add_generation_prompt=True)
        upto = render_chat(tokenizer, messages[:i + 1], add_generation_prompt=False)
        if full[:len(before)] != before or full[:len(upto)] != upto:
            raise ValueError("chat template is not prefix-consistent: cannot mask the prompt tokens reliably")
        labels[len(before):len(upto)] = full[len(before):len(upto)]
    return full[:max_len], labels[:max_len]


def collate_sft(examples: list[tuple[list[int], list[int]]], pad_id: int) -> SFTBatch:
    """Right-padded input_ids, attention_mask and labels (IGNORE on padding)."""
    L = max(len(ids) for ids, _ in examples)
    B = len(examples)
    input_ids = torch.full((B, L), pad_id, dtype=torch.long)
    labels = torch.full((B, L), IGNORE, dtype=torch.long)
    mask = torch.zeros((B, L), dtype=torch.long)
    for i, (ids, lab) in enumerate(examples):
        input_ids[i, :len(ids)] = torch.tensor(ids)
        labels[i, :len(lab)] = torch.tensor(lab)
        mask[i, :len(ids)] = 1
    return SFTBatch(input_ids, mask, labels)


def labelled_tokens(labels: torch.Tensor) -> torch.Tensor:
    """How many tokens the loss predicts: the labelled positions after the first (position t predicts t + 1)."""
    return (labels[:, 1:] != IGNORE).sum()


def sft_loss(logits: torch.Tensor, labels: torch.Tensor,
             denominator: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token cross-entropy summed over labelled positions, divided by `denominator` (default: their count,
    the token mean). Given the whole minibatch's count, micro-batches add up to the minibatch's token mean however
    it is cut, long examples and short ones alike. Returns (loss, number of tokens)."""
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    n = labelled_tokens(labels)
    loss = torch.nn.functional.cross_entropy(shift_logits.reshape(-1, shift_logits.size(-1)),
                                             shift_labels.reshape(-1), ignore_index=IGNORE, reduction="sum")
    return loss / (denominator if denominator is not None else n.clamp(min=1)), n


def sequence_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of next-token logprobs over labelled positions, per sequence: log pi(response | prompt). [B]."""
    from rlhf_ray.algos import logprobs_from_logits
    shift_labels = labels[:, 1:]
    mask = (shift_labels != IGNORE).float()
    lp = logprobs_from_logits(logits[:, :-1], shift_labels.clamp(min=0))
    return (lp * mask).sum(-1)
