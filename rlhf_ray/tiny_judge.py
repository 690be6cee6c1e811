"""The tiny world's stand-in LLM judge: a model that knows what the gold function wants from somewhere else.

No strong LLM ships here, and a judge whose knowledge came from the labelers' rankings would prove nothing. So the
stand-in learns the way a real judge did, before and apart from the run:
- **its own model**: a Qwen2 LM of the policy's shape (0.6 M parameters) from its own random initialisation,
  pretrained briefly on the corpus (the world's text, its "general knowledge"). A larger one (192 wide, 3 layers,
  1.5 M) judged no better in a pointwise-only trial (pair accuracy 0.84 against 0.86 on a base policy's samples) and
  took 2.5 times as long to build;
- **taught to judge corpus text, never a policy's sample**: requests and answers cut from the corpus' word stream
  (the request "Continue: " + five words, the answer a window of 4..18 words from elsewhere), each answer scored
  by the gold function, **at most `examples` of them** (the pipeline passes label_prompts x K: no more gold-scored
  answers than the simulated labelers' rankings hold), asked in the judge section's own templates:
  - pointwise: the answer's gold quantile among those examples, read as a value in [1, 5], is the target: a
    two-hot distribution over the neighbouring score labels (so the expected score can say 3.4, not only 3);
  - pairwise: two of those answers whose gold differs, shown in both orders, the better one's verdict label.
  The loss is cross-entropy on the label's next token only (the judge's reply), over its whole vocabulary.

What it can and cannot show: it tests what RLAIF does with an imperfect judge whose errors are not the labelers'
noise (it misreads answers unlike its training text, prefers a position, spreads its mass), through the very
engines and templates a real judge uses. It knows only gold: it cannot show a judge with values of its own, nor
failures that need language understanding (sycophancy, persuasion, length bias beyond what gold rewards).
"""
from __future__ import annotations

import json
import random
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from rlhf_ray.gold import gold_score
from rlhf_ray.judge import JudgeFormat, label_ids, pairwise_text, pointwise_text
from rlhf_ray.tiny import EOS, TinySpec, corpus_text, pretrain


@dataclass
class TinyJudgeSpec:
    hidden_size: int = 128
    intermediate_size: int = 256
    num_layers: int = 2
    num_heads: int = 2              # head_dim 64: a size every vLLM CPU attention kernel supports
    pretrain_steps: int = 100
    examples: int = 3072            # gold-scored answers it may learn from (the pipeline: label_prompts x K)
    pairs_per_epoch: float = 0.25   # pairs drawn afresh each epoch, per answer (each pair asked in both orders)
    epochs: int = 8
    batch_size: int = 32
    lr: float = 1e-3                # 3e-3 (the pretraining rate) left the pointwise judge at chance
    seed: int = 0


def corpus_answers(n: int, seed: int) -> list[tuple[str, str]]:
    """n (request, answer) pairs cut from the corpus: requests as the pipeline phrases them, answers windows of
    its word stream (not the request's own continuation: gold looks at the answer alone)."""
    words = corpus_text().replace("\n", " ").split()
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        i, j = rng.randrange(len(words) - 8), rng.randrange(len(words) - 20)
        out.append(("Continue: " + " ".join(words[i:i + 5]), " ".join(words[j:j + rng.randint(4, 18)])))
    return out


def quantile_values(golds: list[float]) -> list[float]:
    """Each gold as its mean rank among `golds`, mapped to [0, 1] (ties share a rank: equal gold, equal target)."""
    order = sorted(range(len(golds)), key=lambda i: golds[i])
    ranks = [0.0] * len(golds)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and golds[order[j + 1]] == golds[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 / max(len(golds) - 1, 1)
        i = j + 1
    return ranks


def two_hot(value: float, n: int) -> list[float]:
    """A distribution over n ordered labels whose expectation (label i worth i) is value * (n - 1)."""
    x = value * (n - 1)
    lo = min(int(x), n - 2)
    w = x - lo
    return [1.0 - w if i == lo else w if i == lo + 1 else 0.0 for i in range(n)]


def pointwise_examples(fmt: JudgeFormat, rows: list[tuple[str, str]],
                       golds: list[float]) -> list[tuple[str, list[float]]]:
    """(question, target over the score labels): each answer's gold quantile as a two-hot value in [1, n]."""
    n = len(fmt.score_labels)
    return [(pointwise_text(fmt, p, a), two_hot(q, n)) for (p, a), q in zip(rows, quantile_values(golds))]


def pairwise_examples(fmt: JudgeFormat, rows: list[tuple[str, str]], golds: list[float], n_pairs: int,
                      rng: random.Random) -> list[tuple[str, list[float]]]:
    """(question, target over the two verdict labels) for n_pairs pairs of answers whose gold differs, each pair
    asked in both orders (so no position can be right more often than the other)."""
    out = []
    while len(out) < 2 * n_pairs:
        i, j = rng.randrange(len(rows)), rng.randrange(len(rows))
        if golds[i] == golds[j]:
            continue
        a_better = golds[i] > golds[j]
        out.append((pairwise_text(fmt, rows[i][0], rows[i][1], rows[j][1]), [float(a_better), float(not a_better)]))
        out.append((pairwise_text(fmt, rows[i][0], rows[j][1], rows[i][1]), [float(not a_better), float(a_better)]))
    return out


def _label_loss(model, batch: list[list[int]], targets: torch.Tensor, label_ids: torch.Tensor,
                pad: int) -> torch.Tensor:
    """Cross-entropy of the next token after each question against its target distribution over `label_ids`
    (the whole vocabulary's softmax: mass elsewhere is wrong too). Only the last position reaches the LM head."""
    width = max(map(len, batch))
    ids = torch.full((len(batch), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, seq in enumerate(batch):                      # left-padded: every question ends at the last column
        ids[r, width - len(seq):], mask[r, width - len(seq):] = torch.tensor(seq), 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    hidden = model.model(input_ids=ids, attention_mask=mask, position_ids=pos).last_hidden_state[:, -1]
    logp = torch.log_softmax(model.lm_head(hidden).float(), -1)[:, label_ids]
    return -(targets * logp).sum(-1).mean()


def judge_recipe(spec: TinyJudgeSpec, fmt: JudgeFormat) -> dict:
    """What a built judge is reused for: its spec and format, as JSON reads them back (tuples as lists)."""
    return json.loads(json.dumps({"spec": asdict(spec), "format": asdict(fmt)}))


def build_tiny_judge(world_dir: str | Path, fmt: JudgeFormat, spec: TinyJudgeSpec | None = None,
                     out: str | Path | None = None, log=print) -> str:
    """Build the stand-in judge under `out` (default <world_dir>/judge) with the world's tokenizer; reuse it when
    one built from the same spec and format is there. Returns its HF directory."""
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM
    spec = spec or TinyJudgeSpec()
    out = Path(out or Path(world_dir) / "judge")
    recipe = judge_recipe(spec, fmt)
    made = out / "judge_recipe.json"
    if made.is_file() and json.loads(made.read_text()) == recipe:
        return str(out)
    t0 = time.time()
    tok = AutoTokenizer.from_pretrained(Path(world_dir) / "policy")
    score_ids = label_ids(tok, fmt.score_labels, "judge.score_labels")
    verdict_ids = label_ids(tok, fmt.verdict_labels, "judge.verdict_labels")
    torch.manual_seed(spec.seed + 7)
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
                      num_hidden_layers=spec.num_layers, num_attention_heads=spec.num_heads,
                      num_key_value_heads=spec.num_heads, max_position_embeddings=512, tie_word_embeddings=True,
                      bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      dtype="float32")
    lm = Qwen2ForCausalLM(cfg)
    text = corpus_text()
    ids = torch.tensor(tok.backend_tokenizer.encode(text.replace("\n\n", EOS)).ids, dtype=torch.long)
    log(f"tiny judge: {sum(p.numel() for p in lm.parameters()) / 1e6:.2f} M params; pretraining on the corpus")
    with torch.enable_grad():
        pretrain(lm, ids, TinySpec(pretrain_steps=spec.pretrain_steps, seed=spec.seed + 7, batch_size=16,
                                   seq_len=64, lr=3e-3), log)
        rows = corpus_answers(spec.examples, spec.seed)
        golds = [gold_score(a) for _, a in rows]
        point = pointwise_examples(fmt, rows, golds)
        opt = torch.optim.AdamW(lm.parameters(), lr=spec.lr, weight_decay=0.01)
        per_epoch = len(point) + 2 * int(spec.pairs_per_epoch * len(rows))
        steps = spec.epochs * ((per_epoch + spec.batch_size - 1) // spec.batch_size)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=spec.lr, total_steps=steps, pct_start=0.1)
        rng = random.Random(spec.seed + 2)
        lm.train()
        for epoch in range(spec.epochs):
            pairs = pairwise_examples(fmt, rows, golds, int(spec.pairs_per_epoch * len(rows)), rng)
            questions = [(q, t, score_ids) for q, t in point] + [(q, t, verdict_ids) for q, t in pairs]
            rng.shuffle(questions)
            total = 0.0
            for k in range(0, len(questions), spec.batch_size):
                batch = questions[k:k + spec.batch_size]
                for labels in (score_ids, verdict_ids):      # one kind at a time: their targets differ in width
                    part = [(q, t) for q, t, ls in batch if ls is labels]
                    if not part:
                        continue
                    loss = _label_loss(lm, [tok(q, add_special_tokens=False)["input_ids"] for q, _ in part],
                                       torch.tensor([t for _, t in part]), torch.tensor(labels),
                                       tok.pad_token_id) * len(part) / len(batch)
                    loss.backward()
                    total += loss.item() * len(batch)
                torch.nn.utils.clip_grad_norm_(lm.parameters(), 1.0)
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
            log(f"  judge epoch {epoch}: label loss {total / len(questions):.3f} over {len(questions)} questions")
    lm.eval()
    lm.generation_config.eos_token_id = tok.eos_token_id
    lm.generation_config.pad_token_id = tok.pad_token_id
    out.mkdir(parents=True, exist_ok=True)
    lm.save_pretrained(out)
    tok.save_pretrained(out)
    tmp = made.with_name(made.name + ".tmp")
    tmp.write_text(json.dumps(recipe))
    tmp.replace(made)                                     # the recipe last: a half-built judge is never reused
    log(f"tiny judge written to {out} in {time.time() - t0:.1f}s ({spec.examples} gold-scored corpus answers)")
    return str(out)
