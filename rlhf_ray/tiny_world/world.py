"""The tiny model world, built offline: a BPE tokenizer, a tiny causal LM briefly pretrained on real English
text that ships with Python itself (`pydoc_data.topics`, ~465k characters of documentation), a reward model
with a scalar head, and a prompt file. Everything is written as ordinary HF-format directories
(safetensors) that every actor opens with `from_pretrained`: nothing downstream special-cases "tiny".

    <out>/policy/         Qwen2ForCausalLM + tokenizer (the starting policy and the reference)
    <out>/reward/         Qwen2ForSequenceClassification (num_labels=1), backbone from the LM, seeded head
    <out>/prompts.jsonl   {"prompt": ...} rows cut from held-back documentation sentences
"""
from __future__ import annotations

import json
import random
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch

EOS = "<|endoftext|>"
PAD = "<|pad|>"


@dataclass
class TinySpec:
    vocab_size: int = 2048
    hidden_size: int = 128
    intermediate_size: int = 256
    num_layers: int = 2
    num_heads: int = 2              # head_dim 64: a size every vLLM CPU attention kernel supports
    max_position_embeddings: int = 512
    pretrain_steps: int = 300
    seq_len: int = 64
    batch_size: int = 16
    lr: float = 3e-3
    num_prompts: int = 512
    seed: int = 0


def corpus_text() -> str:
    from pydoc_data.topics import topics
    return "\n\n".join(topics[k] for k in sorted(topics))


def train_tokenizer(text: str, vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS, PAD],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(text.split("\n\n"), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, pad_token=PAD,
                                   model_max_length=512, padding_side="left")


def make_prompts(text: str, n: int, seed: int) -> list[str]:
    sents = [s.strip() for s in re.split(r"(?<=[.!?])\s+", text.replace("\n", " "))]
    sents = [s for s in sents if 6 <= len(s.split()) <= 30 and s[0].isupper() and "  " not in s]
    rng = random.Random(seed)
    rng.shuffle(sents)
    out = []
    for s in sents[:n]:
        words = s.split()
        out.append(" ".join(words[:rng.randint(3, 6)]))
    return out


def pretrain(model, ids: torch.Tensor, spec: TinySpec, log=print) -> float:
    g = torch.Generator().manual_seed(spec.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=spec.lr, total_steps=spec.pretrain_steps, pct_start=0.1)
    model.train()
    n_blocks = (ids.numel() - 1) // spec.seq_len
    blocks = ids[: n_blocks * spec.seq_len].view(n_blocks, spec.seq_len)
    loss_val = float("nan")
    for step in range(spec.pretrain_steps):
        idx = torch.randint(0, n_blocks, (spec.batch_size,), generator=g)
        x = blocks[idx]
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        loss_val = loss.item()
        if step % 100 == 0 or step == spec.pretrain_steps - 1:
            log(f"  pretrain step {step:4d}  loss {loss_val:.3f}")
    model.eval()
    return loss_val


def lm_config(tok, spec: TinySpec):
    """The Qwen2 config of a world model of `spec`'s size over tokenizer `tok` (tied embeddings, EOS = BOS)."""
    from transformers import Qwen2Config
    return Qwen2Config(vocab_size=len(tok), hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
                       num_hidden_layers=spec.num_layers, num_attention_heads=spec.num_heads,
                       num_key_value_heads=spec.num_heads, max_position_embeddings=spec.max_position_embeddings,
                       tie_word_embeddings=True, bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id,
                       pad_token_id=tok.pad_token_id, dtype="float32")


def save_lm(lm, tok, out: Path) -> None:
    """An HF directory: the model (its generation stopping at EOS) and its tokenizer beside it."""
    lm.generation_config.eos_token_id = tok.eos_token_id
    lm.generation_config.pad_token_id = tok.pad_token_id
    lm.save_pretrained(out)
    tok.save_pretrained(out)


def build_tiny_world(out: str | Path, spec: TinySpec | None = None, log=print) -> dict:
    """Build (or rebuild) the tiny world under `out`; returns the paths. Deterministic for a given spec."""
    from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen2ForSequenceClassification
    spec = spec or TinySpec()
    out = Path(out)
    t0 = time.time()
    torch.manual_seed(spec.seed)
    text = corpus_text()
    tok = train_tokenizer(text, spec.vocab_size)
    cfg = lm_config(tok, spec)
    lm = Qwen2ForCausalLM(cfg)
    ids = torch.tensor(tok.backend_tokenizer.encode(text.replace("\n\n", EOS)).ids, dtype=torch.long)
    log(f"tiny world: {sum(p.numel() for p in lm.parameters()) / 1e6:.2f} M params, "
        f"{len(tok)} tokens vocab, {ids.numel()} training tokens")
    with torch.enable_grad():
        final_loss = pretrain(lm, ids, spec, log)

    policy_dir, reward_dir = out / "policy", out / "reward"
    save_lm(lm, tok, policy_dir)

    # Reward model: the LM's backbone under a seeded scalar head (training it on preferences is the RM stage's job).
    rm = Qwen2ForSequenceClassification(Qwen2Config(**{**cfg.to_dict(), "id2label": {0: "score"}}))
    missing = rm.model.load_state_dict(lm.model.state_dict())
    assert not missing.missing_keys, missing
    with torch.no_grad():
        torch.nn.init.normal_(rm.score.weight, std=1.0 / spec.hidden_size ** 0.5)
    rm.save_pretrained(reward_dir)
    tok.save_pretrained(reward_dir)

    prompts = make_prompts(text, spec.num_prompts, spec.seed)
    with (out / "prompts.jsonl").open("w") as f:
        for p in prompts:
            f.write(json.dumps({"prompt": p}) + "\n")
    log(f"tiny world written to {out} in {time.time() - t0:.1f}s (final LM loss {final_loss:.3f}, "
        f"{len(prompts)} prompts)")
    return {"policy": str(policy_dir), "reward": str(reward_dir), "prompts": str(out / "prompts.jsonl")}


TEACHER_SPEC = TinySpec(hidden_size=256, intermediate_size=768, num_layers=3, num_heads=4, pretrain_steps=600)
"""A teacher for on-policy distillation: ~3.1 M parameters against the world's 0.6 M, pretrained twice as long."""


def build_teacher_base(world_policy: str | Path, out: str | Path, spec: TinySpec = TEACHER_SPEC, log=print,
                       text: str | None = None) -> str:
    """A larger causal LM pretrained on the same corpus (or on `text`) with the world's own tokenizer (loaded from
    `world_policy`, so teacher and student share every token id), written as an HF directory under `out`; returns
    its path."""
    from transformers import AutoTokenizer, Qwen2ForCausalLM
    t0 = time.time()
    torch.manual_seed(spec.seed)
    tok = AutoTokenizer.from_pretrained(str(world_policy))
    lm = Qwen2ForCausalLM(lm_config(tok, spec))
    ids = torch.tensor(tok.backend_tokenizer.encode((text or corpus_text()).replace("\n\n", EOS)).ids,
                       dtype=torch.long)
    with torch.enable_grad():
        loss = pretrain(lm, ids, spec, log)
    save_lm(lm, tok, Path(out))
    log(f"teacher base: {sum(p.numel() for p in lm.parameters()) / 1e6:.2f} M params, final LM loss {loss:.3f}, "
        f"written to {out} in {time.time() - t0:.1f}s")
    return str(out)
