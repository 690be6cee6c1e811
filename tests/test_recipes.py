"""DAPO's and GSPO's pieces (docs/algorithms.md), on hand-computed values: asymmetric clipping, the sequence-level
ratio, the soft overlong penalty, truncated answers masked out of the loss, the group filter of dynamic sampling,
and the config rules that keep one key per choice."""
import math

import pytest
import torch

from rlhf_ray.algos import (AdvantageSettings, aggregation_count, compute_experience, groups_with_signal,
                            overlong_penalty, ppo_policy_loss, trainable_groups)
from rlhf_ray.batch import RolloutBatch
from rlhf_ray.config import ConfigError, load_config

BASE = ["models.policy=p", "models.reward=r", "data.prompts=d.jsonl"]


def test_clip_higher_bounds_each_side_with_its_own_epsilon():
    old, mask = torch.zeros(1, 2), torch.ones(1, 2)
    new = torch.tensor([[math.log(1.5), math.log(0.5)]])          # ratios 1.5 and 0.5
    # A > 0: 1.5 is clipped at 1 + 0.28 -> -1.28; 0.5 is not (the pessimistic max keeps -0.5)
    loss, st = ppo_policy_loss(new, old, torch.ones(1, 2), mask, clip=(0.2, 0.28))
    assert loss.item() == pytest.approx((-1.28 - 0.5) / 2)
    assert (st["clipfrac_high"].item(), st["clipfrac_low"].item()) == (0.5, 0.0)
    # A < 0: 0.5 is clipped at 1 - 0.2 -> 0.8; 1.5 is not -> 1.5
    loss, st = ppo_policy_loss(new, old, -torch.ones(1, 2), mask, clip=(0.2, 0.28))
    assert loss.item() == pytest.approx((1.5 + 0.8) / 2)
    assert (st["clipfrac_high"].item(), st["clipfrac_low"].item()) == (0.0, 0.5)
    # a symmetric pair is the old scalar clip, bit for bit
    lp, adv = torch.randn(3, 5), torch.randn(3, 5)
    ref = lp + 0.3 * torch.randn(3, 5)
    a, _ = ppo_policy_loss(ref, lp, adv, torch.ones(3, 5), clip=0.2)
    b, _ = ppo_policy_loss(ref, lp, adv, torch.ones(3, 5), clip=(0.2, 0.2))
    assert torch.equal(a, b)


def test_gspo_ratio_is_the_length_normalised_sequence_ratio_clipped_per_answer():
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    old = torch.zeros(2, 3)
    new = torch.tensor([[0.1, 0.3, 5.0], [0.0, 0.0, 0.0]], requires_grad=True)   # padding's 5.0 must not count
    adv = torch.tensor([[1.0, 1.0, 0.0], [-1.0, -1.0, -1.0]])
    loss, st = ppo_policy_loss(new, old, adv, mask, clip=(3e-4, 4e-4), agg="seq-mean-token-mean", level="sequence")
    # s_0 = exp(mean(0.1, 0.3)) = e^0.2, clipped to 1.0004 (A > 0); s_1 = 1, inside the range, loss +1
    assert loss.item() == pytest.approx((-1.0004 + 1.0) / 2, abs=1e-7)
    assert st["clipfrac"].item() == pytest.approx(0.5) and st["clipfrac_high"].item() == pytest.approx(0.5)
    loss.backward()
    # answer 0 is clipped: no gradient; answer 1: d(-A s)/d logp_t = s / |y| = 1/3, over 2 answers
    assert new.grad[0].tolist() == [0.0, 0.0, 0.0]
    assert new.grad[1].tolist() == pytest.approx([1 / 6] * 3)
    # unclipped (a wide range), the loss is -mean_i A_i s_i
    loss, _ = ppo_policy_loss(new.detach(), old, adv, mask, clip=(0.5, 0.5), agg="seq-mean-token-mean",
                              level="sequence")
    assert loss.item() == pytest.approx((-math.exp(0.2) + 1.0) / 2)
    with pytest.raises(ValueError, match="seq-mean-token-mean"):
        ppo_policy_loss(new, old, adv, mask, clip=0.2, agg="token-mean", level="sequence")


def test_gspo_exponent_is_clamped_so_bf16_stays_finite():
    mask = torch.ones(2, 4, dtype=torch.bfloat16)
    old = torch.zeros(2, 4, dtype=torch.bfloat16)
    new = torch.full((2, 4), 200.0, dtype=torch.bfloat16, requires_grad=True)     # exp(200) overflows bf16
    adv = torch.tensor([[-1.0] * 4, [1.0] * 4], dtype=torch.bfloat16)
    loss, st = ppo_policy_loss(new, old, adv, mask, clip=(3e-4, 4e-4), agg="seq-mean-token-mean", level="sequence")
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(new.grad).all()
    assert loss.item() == pytest.approx((math.exp(10.0) - 1.0004) / 2, rel=1e-2)   # A < 0 unclipped at e^10


def test_overlong_penalty_is_linear_over_the_buffer():
    lengths = torch.tensor([10, 15, 16, 18, 20])
    assert overlong_penalty(lengths, 20, 5, 1.0).tolist() == pytest.approx([0.0, 0.0, -0.2, -0.6, -1.0])
    assert overlong_penalty(lengths, 20, 5, 0.5).tolist() == pytest.approx([0.0, 0.0, -0.1, -0.3, -0.5])
    assert overlong_penalty(lengths, 20, 0, 1.0).tolist() == [0.0] * 5


def test_groups_with_signal_and_trainable_groups():
    assert groups_with_signal(torch.tensor([1.0, 1.0, 0.0, 1.0, 2.0, 2.0]), 2).tolist() == [False, True, False]
    assert trainable_groups(10, 8, 4, 16) == 8            # enough: the step's prompts_per_step
    assert trainable_groups(7, 8, 4, 16) == 4             # short: one whole minibatch of 4 groups
    assert trainable_groups(3, 8, 4, 16) == 0             # not one minibatch: no update


def test_masked_out_answers_carry_no_loss_but_keep_their_place_in_the_baseline():
    mask = torch.ones(4, 3)
    lp = torch.full((4, 3), -1.0)
    batch = RolloutBatch(torch.zeros(4, 5, dtype=torch.long), torch.ones(4, 5), mask, mask, lp.clone())
    scores = torch.tensor([1.0, 0.0, 1.0, 3.0])
    batch.finished = torch.tensor([False, True, True, True])         # row 0 cut at max_new_tokens
    full, _ = compute_experience(batch, lp, lp, None, scores, AdvantageSettings(estimator="grpo", n=2), kl_coef=0.0)
    masked, _ = compute_experience(batch, lp, lp, None, scores,
                                   AdvantageSettings(estimator="grpo", n=2, mask_truncated=True), kl_coef=0.0)
    assert torch.equal(full.advantages, masked.advantages)           # row 0 still sets row 1's baseline
    assert masked.loss_mask.sum(-1).tolist() == [0.0, 3.0, 3.0, 3.0]
    # the loss's denominators count what is left: tokens, or answers with a token; never 0
    assert aggregation_count(masked.loss_mask, "token-mean") == 9.0
    assert aggregation_count(masked.loss_mask, "seq-mean-token-mean") == 3.0
    assert aggregation_count(torch.zeros(2, 3), "token-mean") == aggregation_count(torch.zeros(2, 3),
                                                                                   "seq-mean-token-sum") == 1.0


def ppo_config(*sets):
    return load_config(None, BASE + list(sets)).check_ppo(paths=False)


def test_clip_keys_resolve_and_contradictions_are_refused():
    assert ppo_config().ppo.clip_bounds() == (0.2, 0.2)
    assert ppo_config("ppo.clip=0.1").ppo.clip_bounds() == (0.1, 0.1)
    assert ppo_config("ppo.clip_high=0.28").ppo.clip_bounds() == (0.2, 0.28)
    gspo = ["ppo.ratio_level=sequence", "ppo.advantage=grpo", "ppo.loss_agg=seq-mean-token-mean"]
    assert ppo_config(*gspo).ppo.clip_bounds() == (3e-4, 4e-4)
    for sets, needle in [
        (["ppo.clip=0.2", "ppo.clip_high=0.28"], "ppo.clip is the symmetric shorthand"),
        (["ppo.clip_low=1.5"], "ppo.clip_low must be <= 1"),
        (gspo[:2], "ppo.loss_agg must be seq-mean-token-mean"),
        (gspo + ["ppo.clip_high=0.28"], "ppo.ratio_level sequence clips with ppo.seq_clip_low"),
        (["ppo.ratio_level=sequence", "ppo.loss_agg=seq-mean-token-mean"], "not gae"),
        (["ppo.overlong_buffer=8", "ppo.missing_eos_penalty=1"], "ppo.missing_eos_penalty must be 0"),
        (["ppo.mask_truncated=true", "ppo.missing_eos_penalty=1"], "ppo.missing_eos_penalty must be 0"),
        (["ppo.overlong_buffer=32"], "ppo.overlong_buffer must be < generation.max_new_tokens (32)"),
        (["rollout.filter_groups=true"], "needs ppo.advantage grpo or rloo"),
        (["rollout.filter_groups=true", "ppo.advantage=grpo", "generation.n=4", "ppo.minibatch_size=6",
          "generation.prompts_per_step=3", "policy.micro_batch_size=2"], "ppo.minibatch_size must be a multiple of generation.n (4)"),
    ]:
        with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace(")", r"\)")):
            ppo_config(*sets)


def test_the_copy_tasks_rows_are_drawn_apart_and_demonstrations_label_the_answer_only():
    from rlhf_ray.tiny_world.copy_task import PROMPT, WORDS_PER_ROW, demonstration, problems, vocabulary
    from rlhf_ray.sft import IGNORE
    from rlhf_ray.tiny_world.world import train_tokenizer
    vocab = vocabulary()
    assert len(vocab) == len(set(vocab)) == 200 and all(len(w) >= 3 and w.isalpha() for w in vocab)
    sft = problems(100, 0)
    rl = problems(100, 1, {r["answer"] for r in sft})
    assert len({r["answer"] for r in sft + rl}) == 200
    row = rl[0]
    words = row["answer"].split()
    assert len(words) == len(set(words)) == WORDS_PER_ROW and set(words) <= set(vocab)
    assert row["prompt"] == PROMPT.format(words=row["answer"])
    tok = train_tokenizer(" ".join(vocab) + " Copy: Answer:\n\n" * 10, 400)
    ids, labels = demonstration(tok, row)
    prompt = tok(row["prompt"], add_special_tokens=False)["input_ids"]
    answer = tok(" " + row["answer"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert ids == prompt + answer and labels == [IGNORE] * len(prompt) + answer
