"""Rankings -> pairs, Bradley-Terry loss and fits (pure logic)."""
import math

import pytest
import torch

from rlhf_ray.prefs import (bradley_terry_loss, elo_ratings, fit_bradley_terry, pairwise_accuracy,
                            ranking_from_scores, ranking_to_pairs, scores_to_pairs)


@pytest.mark.parametrize("k", [2, 4, 9])
def test_ranking_expands_to_all_pairs_consistent_with_the_order(k):
    ranking = list(reversed(range(k)))                 # best is the last index
    pairs = ranking_to_pairs(ranking)
    assert len(pairs) == k * (k - 1) // 2 == len(set(pairs))
    pos = {item: p for p, item in enumerate(ranking)}
    assert all(pos[w] < pos[lo] for w, lo in pairs)


def test_scores_to_ranking_and_pairs_skip_ties():
    scores = [0.1, 3.0, 0.1, -2.0]
    assert ranking_from_scores(scores) == [1, 0, 2, 3]
    pairs = scores_to_pairs(scores)
    assert (0, 2) not in pairs and (2, 0) not in pairs and len(pairs) == 5
    assert (1, 3) in pairs and (0, 3) in pairs


def test_bradley_terry_loss_values():
    c, r = torch.tensor([2.0, 0.0]), torch.tensor([0.0, 0.0])
    assert bradley_terry_loss(c, r).item() == pytest.approx((-math.log(1 / (1 + math.exp(-2))) + math.log(2)) / 2)
    w = torch.tensor([1.0, 0.0])
    assert bradley_terry_loss(c, r, weights=w).item() == pytest.approx(-math.log(1 / (1 + math.exp(-2))))
    assert pairwise_accuracy(c, r) == 0.5


def test_bt_fit_recovers_the_generating_order():
    torch.manual_seed(0)
    true = [1.5, 0.5, 0.0, -0.7, -1.3]
    pairs = []
    for _ in range(400):
        i, j = torch.randperm(5)[:2].tolist()
        p = 1 / (1 + math.exp(-(true[i] - true[j])))
        pairs.append((i, j) if torch.rand(()) < p else (j, i))
    fitted = fit_bradley_terry(5, pairs)
    assert ranking_from_scores(fitted) == [0, 1, 2, 3, 4]
    assert sum(fitted) == pytest.approx(0.0, abs=1e-6)
    assert fitted[0] - fitted[4] == pytest.approx(true[0] - true[4], abs=0.6)
    elo = elo_ratings(5, pairs)
    assert ranking_from_scores(elo) == [0, 1, 2, 3, 4]


def test_bt_fit_is_finite_for_an_undefeated_item():
    s = fit_bradley_terry(3, [(0, 1), (0, 2), (1, 2)])
    assert all(math.isfinite(x) for x in s) and s[0] > s[1] > s[2]


def test_gold_and_noisy_labelers():
    import random
    from rlhf_ray.gold import gold_score, simulated_ranking
    assert gold_score("") == 0.0
    assert gold_score("The function returns an object.") == pytest.approx(10 * (2 + 0.5) / 5)
    answers = ["a b c d", "the class has a method", "functions objects methods classes"]
    assert simulated_ranking(answers, random.Random(0), noise=0.0) == [2, 1, 0]
    rng = random.Random(0)
    flips = sum(simulated_ranking(answers[:2], rng, noise=3.0) != [1, 0] for _ in range(200))
    assert 10 < flips < 100                        # noisy labelers sometimes disagree with gold
