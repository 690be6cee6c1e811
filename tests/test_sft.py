"""SFT examples: the loss mask covers exactly the assistant's tokens; the loss ignores everything else."""
import math

import pytest
import torch

from rlhf_ray.prefs import dpo_loss
from rlhf_ray.sft import IGNORE, collate_sft, sft_example, sft_loss
from rlhf_ray.tiny_world.world import train_tokenizer


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
    assert batch.labels.tolist() == [[IGNORE, 2, 3], [4, IGNORE, IGNORE]]
    assert batch.attention_mask.tolist() == [[1, 1, 1], [1, 0, 0]]


def test_dpo_loss_values_and_reference_invariance():
    pc, pr = torch.tensor([-1.0, -2.0]), torch.tensor([-3.0, -1.0])
    rc, rr = torch.tensor([-2.0, -2.0]), torch.tensor([-2.0, -2.0])
    loss, st = dpo_loss(pc, pr, rc, rr, beta=0.5)
    z = torch.tensor([0.5 * (1.0 - (-1.0)), 0.5 * (0.0 - 1.0)])
    assert loss.item() == pytest.approx((-torch.nn.functional.logsigmoid(z)).mean().item())
    assert st["reward_acc"].item() == 0.5
    loss0, _ = dpo_loss(rc, rr, rc, rr, beta=0.5)         # policy == reference: log 2
    assert loss0.item() == pytest.approx(math.log(2))


def test_ranking_batch_keeps_a_prompts_answers_together_and_pads_short_groups(tok):
    from rlhf_ray.stage_data import ranking_batch
    prefs = [("Continue: the object", ["a class", "a value here", "types"], [(1, 0), (1, 2), (0, 2)]),
             ("Continue: a module", ["names", "a file"], [(0, 1)])]            # a pairwise row: K = 2
    b = ranking_batch(tok, prefs, max_len=64, chat=True)
    G, K, L = b.input_ids.shape
    assert (G, K) == (2, 3) and b.labels.shape == (G, K, L) and b.pairs.shape == (G, K, K)
    assert b.attention_mask[1, 2].sum() == 0                         # the padded answer slot is empty
    assert b.pairs.sum((1, 2)).tolist() == [3.0, 1.0] and b.pairs[0, 1, 0] == 1 and b.pairs[0, 0, 1] == 0
    for g, (_, answers, _) in enumerate(prefs):                         # labels: the answer (+ EOS) only
        for k, text in enumerate(answers):
            lab = b.labels[g, k]
            got = lab[lab != IGNORE].tolist()
            assert got == tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            n = int(b.attention_mask[g, k].sum())
            assert b.input_ids[g, k, n - len(got):n].tolist() == got       # right-padded: answer ends the row


def test_listed_pairs_forms_every_pair_from_per_answer_values_with_per_prompt_weights():
    from rlhf_ray.prefs import bradley_terry_loss
    from rlhf_ray.stage_data import listed_pairs
    values = torch.tensor([[3.0, 1.0, 2.0], [5.0, 4.0, 0.0]])
    pairs = torch.zeros(2, 3, 3)
    pairs[0, 0, 1] = pairs[0, 0, 2] = pairs[0, 2, 1] = 1                 # ranking 0 > 2 > 1
    pairs[1, 1, 0] = 1                                                    # a pair the values get wrong
    c, r, w = listed_pairs(values, pairs)
    assert sorted(zip(c.tolist(), r.tolist())) == [(2.0, 1.0), (3.0, 1.0), (3.0, 2.0), (4.0, 5.0)]
    assert w.tolist() == pytest.approx([1 / 3, 1 / 3, 1 / 3, 1.0])        # a prompt counts once
    from rlhf_ray.stage_data import ranked_prompts
    assert ranked_prompts(pairs) == 2
    # the same loss as averaging each prompt's pairs and then the prompts
    per_prompt = [-torch.nn.functional.logsigmoid(torch.tensor([2.0, 1.0, 1.0])).mean(),
                  -torch.nn.functional.logsigmoid(torch.tensor(-1.0))]
    assert bradley_terry_loss(c, r, weights=w).item() == pytest.approx(torch.stack(per_prompt).mean().item(), rel=1e-6)
