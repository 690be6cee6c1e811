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
