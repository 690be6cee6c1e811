"""The judge's verdicts as pure functions (rlhf_ray/judge.py), on hand-computed values. The engine side (the
labels' logprobs read from vLLM's next-token distribution, against HF) is checked in test_e2e_ppo.py."""
import math

import pytest

from rlhf_ray.judge import (JudgeError, JudgeFormat, PairVerdict, comparison_pairs, expected_score, label_ids,
                            pair_verdict, pairwise_text, pointwise_text, rank_answers)


def test_expected_score_renormalises_over_the_labels_and_reports_their_mass():
    # probabilities 0.1, 0.2, 0.3, 0.2, 0.1 on labels worth 1..5: mass 0.9, renormalised (1, 2, 3, 2, 1) / 9
    s = expected_score([math.log(p) for p in (0.1, 0.2, 0.3, 0.2, 0.1)], (1, 2, 3, 4, 5))
    assert s.score == pytest.approx((1 * 1 + 2 * 2 + 3 * 3 + 2 * 4 + 1 * 5) / 9) and s.mass == pytest.approx(0.9)
    s = expected_score([math.log(0.5), math.log(0.25)], (0.0, 1.0))     # 2/3, 1/3 after renormalising
    assert s.score == pytest.approx(1 / 3) and s.mass == pytest.approx(0.75)
    with pytest.raises(JudgeError, match="non-finite"):
        expected_score([float("-inf"), 0.0], (0.0, 1.0))


def test_a_pair_is_asked_in_both_orders_and_the_position_preference_cancels():
    # (a, b): P(" A") 0.6, P(" B") 0.2 -> a better 0.75; (b, a): " A" is b: 0.5, 0.3 -> a better 0.3 / 0.8
    v = pair_verdict([math.log(0.6), math.log(0.2)], [math.log(0.5), math.log(0.3)])
    assert (v.p_first, v.p_second) == pytest.approx((0.75, 0.375)) and v.p == pytest.approx(0.5625) and v.flipped
    # a judge that says "A" at 0.8 whatever it sees has no preference left once both orders are averaged
    biased = pair_verdict([math.log(0.8), math.log(0.2)], [math.log(0.8), math.log(0.2)])
    assert biased.p == pytest.approx(0.5) and biased.flipped
    steady = pair_verdict([math.log(0.9), math.log(0.1)], [math.log(0.2), math.log(0.8)])
    assert steady.p == pytest.approx(0.85) and not steady.flipped


def test_k_answers_ranked_from_soft_verdicts_recover_the_strengths():
    strengths = [1.0, 0.0, -1.0, 0.5]
    sig = lambda x: 1 / (1 + math.exp(-x))      # noqa: E731
    verdicts = {(i, j): PairVerdict(0, 0, sig(strengths[i] - strengths[j]), False)
                for i, j in comparison_pairs(4, None, seed=0)}
    r = rank_answers(4, verdicts)
    assert r.ranking == [0, 3, 1, 2]
    mean = sum(strengths) / 4
    assert r.strengths == pytest.approx([s - mean for s in strengths], abs=1e-2)   # (a small L2 pull toward 0)


def test_comparison_pairs_all_or_a_connected_seeded_subset():
    assert comparison_pairs(4, None, seed=0) == [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]
    assert comparison_pairs(4, 10, seed=0) == comparison_pairs(4, None, seed=0)
    assert comparison_pairs(4, 4, seed=0) == [(0, 1), (0, 3), (1, 2), (2, 3)]          # the cycle: all connected
    five = comparison_pairs(4, 5, seed=0)
    assert len(five) == 5 and set(comparison_pairs(4, 4, seed=0)) < set(five)
    assert five == comparison_pairs(4, 5, seed=0)                                      # seeded
    assert comparison_pairs(2, 1, seed=0) == [(0, 1)]
    with pytest.raises(JudgeError, match="judge.max_pairs: 3 comparisons cannot rank 4"):
        comparison_pairs(4, 3, seed=0)


class WordTokenizer:
    """A stand-in tokenizer (pure logic): one token per character, except the labels in `single`."""
    def __init__(self, single: dict[str, int]):
        self.single = single

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [self.single[text]] if text in self.single else [ord(c) for c in text]}


def test_labels_must_be_one_distinct_token_each_said_in_one_line_naming_the_key():
    tok = WordTokenizer({" 1": 7, " 2": 8, " A": 9, " B": 9})
    assert label_ids(tok, (" 1", " 2"), "judge.score_labels") == [7, 8]
    with pytest.raises(JudgeError, match=r"judge.score_labels: ' 10' is 3 tokens") as e:
        label_ids(tok, (" 1", " 10"), "judge.score_labels")
    assert "\n" not in str(e.value)
    with pytest.raises(JudgeError, match="judge.verdict_labels: labels .* share token ids"):
        label_ids(tok, (" A", " B"), "judge.verdict_labels")


def test_templates_are_checked_and_filled():
    fmt = JudgeFormat()
    assert pointwise_text(fmt, "Say hi", "hi").endswith("Request: Say hi\n\nAnswer: hi\n\nRating:")
    assert "Answer A: x\n\nAnswer B: y" in pairwise_text(fmt, "p", "x", "y")
    assert "Answer A: f({b})\n\nAnswer B: y" in pairwise_text(fmt, "{a}", "f({b})", "y")   # values kept verbatim
    with pytest.raises(JudgeError, match=r"judge.pointwise template: no \{response\} in it"):
        JudgeFormat(pointwise="Rate {prompt}")
    with pytest.raises(JudgeError, match="one value per label"):
        JudgeFormat(score_labels=(" 1", " 2"), score_values=(1.0,))


def test_agreement_with_gold_per_order_averaged_pointwise_and_the_flip_rate():
    from rlhf_ray.judge import agreement
    golds = [[3.0, 1.0, 1.0]]                        # answer 0 best; 1 and 2 tie (their pair is not decided)
    verdicts = [{(0, 1): pair_verdict([math.log(0.9), math.log(0.1)], [math.log(0.8), math.log(0.2)]),  # 0.9, 0.2
                 (0, 2): pair_verdict([math.log(0.7), math.log(0.3)], [math.log(0.4), math.log(0.6)]),  # 0.7, 0.6
                 (1, 2): pair_verdict([math.log(0.5), math.log(0.5)], [math.log(0.9), math.log(0.1)])}]
    a = agreement(golds, verdicts, [[2.0, 2.0, 1.0]])
    assert (a["pairs"], a["pairs_gold_differs"]) == (3, 2)
    # first order right on both decided pairs; second order wrong on (0, 1) (0.2 for a), right on (0, 2) (0.6);
    # averaged 0.55 and 0.65: both right; pointwise: (0, 1) tied (half), (0, 2) right
    assert (a["pair_acc_first"], a["pair_acc_second"], a["pair_acc_averaged"]) == pytest.approx((1.0, 0.5, 1.0))
    assert a["pair_acc_pointwise"] == pytest.approx(0.75)
    assert a["flip_rate"] == pytest.approx(1 / 3)      # only (0, 1) flipped; (1, 2) at 0.5 then 0.1 says "b" twice
    assert "pair_acc_pointwise" not in agreement(golds, verdicts)


def test_the_stand_in_judge_learns_from_corpus_answers_only_and_no_more_than_it_is_allowed():
    import random
    from rlhf_ray.tiny_world.gold import gold_score
    from rlhf_ray.tiny_world.world import corpus_text
    from rlhf_ray.tiny_world.judge import corpus_answers, pairwise_examples, pointwise_examples, quantile_values, two_hot
    assert quantile_values([0.0, 2.0, 0.0, 5.0]) == pytest.approx([1 / 6, 2 / 3, 1 / 6, 1.0])   # ties: mean rank
    assert two_hot(0.0, 5) == [1, 0, 0, 0, 0] and two_hot(1.0, 5) == [0, 0, 0, 0, 1]
    assert two_hot(0.6, 5) == pytest.approx([0, 0, 0.6, 0.4, 0])               # expectation 2.4 of 0..4
    rows = corpus_answers(200, seed=3)
    assert len(rows) == 200 and rows == corpus_answers(200, seed=3)          # seeded
    text = " ".join(corpus_text().split())
    assert all(p.startswith("Continue: ") and a in text for p, a in rows)   # answers are corpus text, verbatim
    fmt = JudgeFormat(pointwise="R: {prompt} A: {response} S:", pairwise="R: {prompt} A: {a} B: {b} V:",
                      score_labels=tuple("12345"))
    golds = [gold_score(a) for _, a in rows]
    point = pointwise_examples(fmt, rows, golds)
    assert len(point) == 200 and all(sum(t) == pytest.approx(1) for _, t in point)
    best = max(range(200), key=lambda i: golds[i])
    assert point[best][1][-1] > 0 and point[best][0] == f"R: {rows[best][0]} A: {rows[best][1]} S:"
    pairs = pairwise_examples(fmt, rows, golds, 50, random.Random(0))
    assert len(pairs) == 100
    for (q1, t1), (q2, t2) in zip(pairs[::2], pairs[1::2]):                  # each pair in both orders, targets swap
        assert t1 == t2[::-1] and t1 in ([1.0, 0.0], [0.0, 1.0]) and q1 != q2


def test_a_built_judge_is_reused_only_for_the_recipe_it_was_built_from():
    import json
    from rlhf_ray.tiny_world.judge import TinyJudgeSpec, judge_recipe
    fmt = JudgeFormat(score_labels=tuple("12345"))
    recipe = judge_recipe(TinyJudgeSpec(seed=1), fmt)
    assert json.loads(json.dumps(recipe)) == recipe                  # what judge_recipe.json reads back matches
    assert judge_recipe(TinyJudgeSpec(seed=2), fmt) != recipe
    other = JudgeFormat(score_labels=tuple("12345"), verdict_labels=("A", "B"))
    assert judge_recipe(TinyJudgeSpec(seed=1), other) != recipe


@pytest.mark.slow
def test_a_judge_under_its_validation_bar_is_built_again_from_another_seed_and_the_better_one_kept(tiny_world, tmp_path):
    """TinyJudgeSpec.min_val and restarts, at toy size (2 pretraining steps, one epoch): a bar no judge reaches makes
    the build start over once from seed + 1000, and the better of the two is kept and written."""
    import json
    import shutil
    from pathlib import Path
    from rlhf_ray.tiny_world.judge import TinyJudgeSpec, build_tiny_judge
    shutil.copytree(Path(tiny_world["policy"]), tmp_path / "policy")
    spec = TinyJudgeSpec(pretrain_steps=2, examples=100, epochs=1, min_val=1.01, restarts=1, seed=3)
    said: list[str] = []
    out = build_tiny_judge(tmp_path, JudgeFormat(score_labels=tuple("12345")), spec, log=said.append)
    assert sum("restarting from seed 1003" in line for line in said) == 1, said
    kept = [line for line in said if "judge: kept epoch 0 of seed" in line]
    assert len(kept) == 1 and ("seed 3:" in kept[0] or "seed 1003:" in kept[0]), said
    assert json.loads((Path(out) / "judge_recipe.json").read_text())["spec"]["seed"] == 3
    assert (Path(out) / "model.safetensors").is_file()
