"""The tiny world's copy task: a verifiable reward on which a briefly fine-tuned policy succeeds some of the time,
for the reasoning-RL recipes (GRPO, DAPO, GSPO) to raise.

    Copy: method object class type value\\nAnswer:      the prompt (raw text, no chat template)
     method object class type value<|endoftext|>        the answer, rewarded 1 when it holds the words in order

The words are drawn from the corpus's most frequent ones, so every one is a word the pretrained LM knows. A
short SFT on demonstrations (`train_copy_sft`) teaches the format and starts the copying, and stops once the
policy copies `target` of 50 rows it never trained on, at temperature 1: some groups then succeed, some fail, some are mixed,
which is the regime where dynamic sampling matters. The reward is `rlhf_ray.rule_rewards:contains_answer` (the
row's `answer` field).
"""
from __future__ import annotations

import random
import re
from collections import Counter
from pathlib import Path

import torch

from rlhf_ray.sft import IGNORE
from rlhf_ray.tiny_world.world import corpus_text
from rlhf_ray.tiny_world.tool_task import sft_until_success

PROMPT = "Copy: {words}\nAnswer:"
WORDS_PER_ROW = 5
VOCABULARY = 200          # the corpus's most frequent words of 3+ letters


def vocabulary(size: int = VOCABULARY) -> list[str]:
    counts = Counter(w for w in re.findall(r"[a-z]+", corpus_text()) if len(w) >= 3)
    return [w for w, _ in counts.most_common(size)]


def problems(n: int, seed: int, exclude: set | None = None, words: int = WORDS_PER_ROW) -> list[dict]:
    """n distinct prompt rows {"prompt", "answer"}: `words` distinct vocabulary words to copy, none of `exclude`'s
    answers."""
    vocab, rng = vocabulary(), random.Random(seed)
    seen, rows = set(exclude or ()), []
    while len(rows) < n:
        answer = " ".join(rng.sample(vocab, words))
        if answer in seen:
            continue
        seen.add(answer)
        rows.append({"prompt": PROMPT.format(words=answer), "answer": answer})
    return rows


def demonstration(tokenizer, row: dict) -> tuple[list[int], list[int]]:
    """(input_ids, labels): the prompt, then " <answer>" and EOS, labelled."""
    prompt = tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
    answer = tokenizer(" " + row["answer"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return prompt + answer, [IGNORE] * len(prompt) + answer


@torch.no_grad()
def success_rate(model, tok, rows: list[dict], seed: int = 0, max_new_tokens: int = 16) -> float:
    """The share of `rows` whose sampled answer (temperature 1, as the engines sample) holds the words, scored as
    contains_answer scores it."""
    from rlhf_ray.rule_rewards import contains_answer
    torch.manual_seed(seed)
    tok.padding_side = "left"
    enc = tok([r["prompt"] for r in rows], return_tensors="pt", padding=True, add_special_tokens=False)
    out = model.generate(**enc, do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=max_new_tokens,
                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    texts = tok.batch_decode(out[:, enc["input_ids"].size(1):], skip_special_tokens=True)
    return sum(contains_answer([], texts, [r["answer"] for r in rows])) / len(rows)


def evaluate(model_dir: str | Path, rows: list[dict], seed: int = 0) -> float:
    from rlhf_ray.models import load_causal_lm, load_tokenizer
    return success_rate(load_causal_lm(model_dir).eval(), load_tokenizer(model_dir), rows, seed)


def train_copy_sft(policy_dir: str | Path, out: str | Path, rows: list[dict], probe: list[dict],
                   target: float = 0.3, check_every: int = 10, max_steps: int = 2000, lr: float = 1e-3,
                   batch_size: int = 32, seed: int = 0, log=print) -> tuple[Path, int, float]:
    """The short SFT (`sft_until_success`) on demonstrations of `rows`, until the rows of `probe` (ones it does not
    train on: a policy copies the rows it saw about twice as often) are copied at `target`."""
    return sft_until_success(policy_dir, out, lambda tok: [demonstration(tok, r) for r in rows],
                             lambda model, tok: success_rate(model, tok, probe, seed),
                             target, check_every, max_steps, lr, batch_size, seed, log)


def build_copy_task(world: str | Path, out: str | Path, seed: int = 0, target: float = 0.3,
                    log=print) -> dict[str, Path]:
    """The task beside a tiny world, rows drawn apart: out/train.jsonl (2,000 prompts for RL), out/held_out.jsonl
    (200 for evaluation) and out/policy, the world's policy after `train_copy_sft` on 2,000 other rows, stopped
    once it copies `target` of 50 more (reused when already there). configs/tiny_dapo.yaml and tiny_gspo.yaml
    point here."""
    from rlhf_ray.tiny_world.tool_task import write_prompts
    out = Path(out)
    sft = problems(2000, seed)
    seen = {r["answer"] for r in sft}
    rl = problems(2000, seed + 1, seen)
    seen |= {r["answer"] for r in rl}
    held = problems(200, seed + 2, seen)
    probe = problems(50, seed + 3, seen | {r["answer"] for r in held})
    paths = {"train": write_prompts(out / "train.jsonl", rl), "held_out": write_prompts(out / "held_out.jsonl", held),
             "policy": out / "policy"}
    if not (paths["policy"] / "model.safetensors").is_file():
        _, steps, rate = train_copy_sft(Path(world) / "policy", paths["policy"], sft, probe, target, seed=seed,
                                        log=log)
        (paths["policy"] / "sft_steps.txt").write_text(f"{steps}\n")
        log(f"copy task written to {out}: SFT {steps} steps, {rate:.0%} of 50 unseen rows copied")
    return paths
