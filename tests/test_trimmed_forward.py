"""The trimmed forwards (all-padding columns dropped, LM head on response positions only) against the plain
padded computation: logprobs, entropies, values, sequence scores, the PPO and value losses, and every
parameter's gradient after one backward, within 1e-5."""
import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen2ForSequenceClassification

from rlhf_ray.algos import entropy_from_logits, logprobs_from_logits, ppo_policy_loss, value_loss
from rlhf_ray.batch import build_rollout_batch
from rlhf_ray.models import (position_ids_from_mask, response_logprobs, sequence_scores, token_values,
                             trim_padding)

CFG = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
           num_key_value_heads=2, pad_token_id=0)


def padded_batch(extra_left: int = 3, extra_right: int = 4):
    """Rows of different prompt and response lengths (one empty response), plus columns that are padding in
    every row on both sides, as a batch built for more rows than this one would leave."""
    g = torch.Generator().manual_seed(0)
    lens = [(5, 7), (2, 3), (4, 0), (6, 5)]
    prompts = [torch.randint(1, 97, (p,), generator=g).tolist() for p, _ in lens]
    responses = [torch.randint(1, 97, (r,), generator=g).tolist() for _, r in lens]
    b = build_rollout_batch(prompts, responses, [[0.0] * len(r) for r in responses], 0)
    ids, mask = b.input_ids, b.attention_mask
    B = ids.size(0)
    b.input_ids = torch.cat([torch.zeros(B, extra_left, dtype=torch.long), ids,
                             torch.zeros(B, extra_right, dtype=torch.long)], 1)
    b.attention_mask = torch.cat([torch.zeros(B, extra_left, dtype=torch.long), mask,
                                  torch.zeros(B, extra_right, dtype=torch.long)], 1)
    b.response_mask = b.action_mask = torch.cat([b.response_mask, torch.zeros(B, extra_right)], 1)
    b.sample_logprobs = torch.cat([b.sample_logprobs, torch.zeros(B, extra_right)], 1)
    return b


def padded_logprobs(model, ids, mask, T):
    """The reference: the whole padded batch through the model, logits at every column."""
    out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask), use_cache=False)
    logits = out.logits[:, -T - 1:-1].float()
    return logprobs_from_logits(logits, ids[:, -T:]), entropy_from_logits(logits)


def padded_values(model, ids, mask, T):
    hidden = model.model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask),
                         use_cache=False).last_hidden_state
    return model.score(hidden).squeeze(-1).float()[:, -T - 1:-1]


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_trim_drops_only_columns_that_are_padding_everywhere():
    b = padded_batch()
    T = b.response_mask.size(1)
    ids, mask, kept = trim_padding(b.input_ids, b.attention_mask, T)
    assert kept == 7 and ids.size(1) == 6 + 7                   # longest prompt 6, longest response 7
    assert mask.sum() == b.attention_mask.sum()             # no real token lost


def test_trimmed_policy_forward_matches_padded_logprobs_entropy_loss_and_grads():
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(**CFG))
    b = padded_batch()
    ids, mask, rmask = b.input_ids, b.attention_mask, b.response_mask
    T = rmask.size(1)
    old = torch.randn(rmask.shape) * 0.1 - 4.6
    adv = torch.randn(rmask.shape)

    def loss_of(lp, ent):
        loss, _ = ppo_policy_loss(lp, old, adv, rmask, 0.2, None, "token-mean", float(rmask.sum()))
        return loss - 0.01 * (ent * rmask).sum() / rmask.sum()

    ref_lp, ref_ent = padded_logprobs(model, ids, mask, T)
    ref_loss = loss_of(ref_lp, ref_ent)
    ref_loss.backward()
    ref_grads = grads(model)
    model.zero_grad()

    lp, ent = response_logprobs(model, ids, mask, T, entropy="grad")
    loss = loss_of(lp, ent)
    loss.backward()
    assert torch.allclose(lp * rmask, ref_lp * rmask, atol=1e-5)
    assert torch.allclose(ent * rmask, ref_ent * rmask, atol=1e-5)
    assert abs(loss.item() - ref_loss.item()) < 1e-5
    got = grads(model)
    assert got.keys() == ref_grads.keys()
    for name in got:
        assert torch.allclose(got[name], ref_grads[name], atol=1e-5), name


def test_detached_entropy_is_outside_the_graph_and_equal():
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(**CFG))
    b = padded_batch()
    T = b.response_mask.size(1)
    lp, ent = response_logprobs(model, b.input_ids, b.attention_mask, T, entropy="detached")
    _, ent_grad = response_logprobs(model, b.input_ids, b.attention_mask, T, entropy="grad")
    assert lp.requires_grad and not ent.requires_grad and ent_grad.requires_grad
    assert torch.allclose(ent, ent_grad.detach(), atol=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_trimmed_logprobs_at_temperature(temperature):
    torch.manual_seed(1)
    model = Qwen2ForCausalLM(Qwen2Config(**CFG)).eval()
    b = padded_batch(extra_left=0, extra_right=2)
    ids, mask, rmask = b.input_ids, b.attention_mask, b.response_mask
    T = rmask.size(1)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask), use_cache=False)
        ref = logprobs_from_logits(out.logits[:, -T - 1:-1].float() / temperature, ids[:, -T:])
        lp = response_logprobs(model, ids, mask, T, temperature)
    assert torch.allclose(lp * rmask, ref * rmask, atol=1e-5)
    assert (lp[:, -2:] == 0).all()                              # the trimmed columns come back as zeros


def test_trimmed_critic_values_value_loss_grads_and_reward_scores():
    torch.manual_seed(0)
    model = Qwen2ForSequenceClassification(Qwen2Config(**CFG, num_labels=1))
    b = padded_batch()
    ids, mask, rmask = b.input_ids, b.attention_mask, b.response_mask
    T = rmask.size(1)
    old_v, returns = torch.randn(rmask.shape) * 0.1, torch.randn(rmask.shape)

    ref_v = padded_values(model, ids, mask, T)
    ref_loss, _ = value_loss(ref_v, old_v, returns, rmask, 0.2, "token-mean", float(rmask.sum()))
    ref_loss.backward()
    ref_grads = grads(model)
    model.zero_grad()

    v = token_values(model, ids, mask, T)
    loss, _ = value_loss(v, old_v, returns, rmask, 0.2, "token-mean", float(rmask.sum()))
    loss.backward()
    assert torch.allclose(v * rmask, ref_v * rmask, atol=1e-5)
    assert abs(loss.item() - ref_loss.item()) < 1e-5
    for name, g in grads(model).items():
        assert torch.allclose(g, ref_grads[name], atol=1e-5), name

    with torch.no_grad():
        hidden = model.model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask),
                             use_cache=False).last_hidden_state
        all_scores = model.score(hidden).squeeze(-1)
        last = (mask * torch.arange(mask.size(1))).argmax(-1)
        assert torch.allclose(sequence_scores(model, ids, mask), all_scores[torch.arange(len(last)), last],
                              atol=1e-5)


def test_sort_by_length_round_trips():
    from rlhf_ray.batch import select, sort_by_length
    b = padded_batch()
    sorted_b, unsort = sort_by_length(b)
    lengths = sorted_b.attention_mask.sum(-1)
    assert (lengths[1:] >= lengths[:-1]).all()
    back = select(sorted_b, unsort)
    assert all(torch.equal(getattr(back, k), v) for k, v in b.fields().items())
