"""SFT examples: the loss mask covers exactly the assistant's tokens; the loss ignores everything else."""
import math

import pytest
import torch

from rlhf_ray.prefs import dpo_loss
from rlhf_ray.sft import IGNORE, collate_sft, sft_example, sft_loss
from rlhf_ray.tiny import train_tokenizer


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer("the user asks a question and the assistant gives an answer. " * 40, vocab_size=400)


def test_mask_covers_only_assistant_turns(tok):
    ex = {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "a question"},
                       {"role": "assistant", "content": "an answer"}, {"role": "user", "content": "the question"},
                       {"role": "assistant", "content": "the answer"}]}
    ids, labels = sft_example(tok, ex, 512)
    assert len(ids) == len(labels)
    labelled = [t for t, l in zip(ids, labels) if l != IGNORE]
    text = tok.decode(labelled)
    assert "an answer" in text and "the answer" in text
    assert "question" not in text and "be brief" not in text and "<|user|>" not in text
    assert labelled[-1] == tok.eos_token_id or tok.eos_token_id in labelled   # the model learns to stop


def test_plain_text_trains_on_every_token(tok):
    ids, labels = sft_example(tok, {"text": "the answer"}, 512)
    assert ids == labels and ids[-1] == tok.eos_token_id


def test_loss_ignores_masked_positions():
    logits = torch.zeros(1, 4, 3)
    logits[0, 1, 2] = 5.0                                   # predicts token at position 2
    labels = torch.tensor([[IGNORE, IGNORE, 2, IGNORE]])
    loss, n = sft_loss(logits, labels)
    assert n.item() == 1
    assert loss.item() == pytest.approx(-math.log(math.exp(5) / (math.exp(5) + 2)))
    batch = collate_sft([([1, 2, 3], [IGNORE, 2, 3]), ([4], [4])], pad_id=0)
    assert batch["labels"].tolist() == [[IGNORE, 2, 3], [4, IGNORE, IGNORE]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_dpo_loss_values_and_reference_invariance():
    pc, pr = torch.tensor([-1.0, -2.0]), torch.tensor([-3.0, -1.0])
    rc, rr = torch.tensor([-2.0, -2.0]), torch.tensor([-2.0, -2.0])
    loss, st = dpo_loss(pc, pr, rc, rr, beta=0.5)
    z = torch.tensor([0.5 * (1.0 - (-1.0)), 0.5 * (0.0 - 1.0)])
    assert loss.item() == pytest.approx((-torch.nn.functional.logsigmoid(z)).mean().item())
    assert st["reward_acc"].item() == 0.5
    loss0, _ = dpo_loss(rc, rr, rc, rr, beta=0.5)         # policy == reference: log 2
    assert loss0.item() == pytest.approx(math.log(2))
