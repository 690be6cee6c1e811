"""Rankings -> pairs, Bradley-Terry loss and fits (pure logic)."""
import math
import random

import pytest
import torch

from rlhf_ray.prefs import (bradley_terry_loss, elo_ratings, fit_bradley_terry, games_per_prompt, leaderboard,
                            pairwise_accuracy, ranking_from_scores, ranking_to_pairs, scores_to_pairs)


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


def test_games_pair_answers_by_index_and_drop_ties():
    golds = [[[3.0, 1.0, 2.0]],          # entry 0: three answers to the one prompt
             [[1.0, 1.0]],               # entry 1: two (answer j meets answer j, so its third is unmatched)
             [[0.0, 5.0, 9.0]]]
    assert games_per_prompt(golds) == [[(0, 1), (0, 2), (2, 0), (2, 0), (1, 2), (2, 1)]]   # 0-1's 2nd: a tie
    assert games_per_prompt(golds, apart={(0, 2)}) == [[(0, 1), (1, 2), (2, 1)]]


def _games(strengths, n_prompts, answers=4, seed=0):
    """Games per prompt between entries whose answers' gold is their strength plus unit Gaussian noise."""
    rng = random.Random(seed)
    golds = [[[s + rng.gauss(0.0, 1.0) for _ in range(answers)] for _ in range(n_prompts)] for s in strengths]
    return games_per_prompt(golds)


def test_leaderboard_ranks_a_dominant_entry_first_and_elo_agrees_with_bt():
    board = leaderboard(["weak", "mid", "strong"], _games([0.0, 0.5, 3.0], 64))
    assert [r["name"] for r in board] == ["strong", "mid", "weak"]
    assert [r["name"] for r in sorted(board, key=lambda r: -r["elo"])] == ["strong", "mid", "weak"]
    assert board[0]["win_rate"] > 0.9 and board[0]["games"] == 2 * 64 * 4
    assert sum(r["elo"] for r in board) / 3 == pytest.approx(1000.0)      # both scales: mean 1000
    assert sum(r["rating"] for r in board) / 3 == pytest.approx(1000.0)
    for r in board:                                          # converged Elo is the BT fit, within its noise
        assert r["elo"] == pytest.approx(r["rating"], abs=r["rating_sd"])
        assert r["rating_lo"] < r["rating"] < r["rating_hi"] and r["rating_sd"] > 0


def test_leaderboard_rates_symmetric_entries_equal():
    # a and b split their games; c beats each 2 games in 3: BT puts c ln 2 above them, 400 log10(2) Elo points
    games = [[(0, 1), (1, 0), (2, 0), (2, 1), (2, 0), (2, 1), (0, 2), (1, 2)]] * 50
    board = {r["name"]: r for r in leaderboard(["a", "b", "c"], games)}
    assert board["a"]["rating"] == pytest.approx(board["b"]["rating"], abs=1e-6)
    assert board["a"]["elo"] == pytest.approx(board["b"]["elo"], abs=5.0)    # Elo only up to the order of games
    assert board["c"]["rating"] - board["a"]["rating"] == pytest.approx(400 * math.log10(2), abs=1.0)
    assert board["c"]["elo"] - board["a"]["elo"] == pytest.approx(400 * math.log10(2), abs=5.0)
    assert board["a"]["win_rate"] == pytest.approx(2 / 5) and board["c"]["win_rate"] == pytest.approx(2 / 3)


def test_leaderboard_bootstrap_is_seeded_and_shrinks_with_more_prompts():
    names, games = ["a", "b", "c"], _games([0.0, 0.3, 0.6], 32)
    few = leaderboard(names, games, boot=50, seed=1)
    assert few == leaderboard(names, games, boot=50, seed=1) != leaderboard(names, games, boot=50, seed=2)
    many = leaderboard(names, _games([0.0, 0.3, 0.6], 256), boot=50, seed=1)
    sd = {r["name"]: r["rating_sd"] for r in few}
    assert all(r["rating_sd"] < sd[r["name"]] / 2 for r in many)          # 8x the prompts: ~1/2.8 the sd


def test_gold_and_noisy_labelers():
    import random
    from rlhf_ray.tiny_world.gold import gold_score, simulated_ranking
    assert gold_score("") == 0.0
    assert gold_score("The function returns an object.") == pytest.approx(10 * (2 + 0.5) / 5)
    answers = ["a b c d", "the class has a method", "functions objects methods classes"]
    assert simulated_ranking(answers, random.Random(0), noise=0.0) == [2, 1, 0]
    rng = random.Random(0)
    flips = sum(simulated_ranking(answers[:2], rng, noise=3.0) != [1, 0] for _ in range(200))
    assert 10 < flips < 100                        # noisy labelers sometimes disagree with gold


def test_kto_loss_on_hand_computed_values():
    """KTO (Ethayarajh et al. 2024, eq. 8) on three answers, worked by hand: r = log pi - log ref = (0.5, -0.2, 0);
    z0 = 0.1; beta 0.5; lambda_D 1, lambda_U 1.5; the second answer undesirable.
    v = (sigmoid(0.5 * 0.4), 1.5 sigmoid(0.5 * 0.3), sigmoid(0.5 * -0.1)); loss = mean(lambda - v)."""
    from rlhf_ray.prefs import kto_loss, kto_reference_point
    sig = lambda x: 1 / (1 + math.exp(-x))                                  # noqa: E731
    policy = torch.tensor([-1.0, -2.0, -3.0], requires_grad=True)
    ref = torch.tensor([-1.5, -1.8, -3.0])
    good = torch.tensor([True, False, True])
    loss, stats = kto_loss(policy, ref, good, torch.tensor(0.1), beta=0.5, desirable_weight=1.0, undesirable_weight=1.5)
    v = [sig(0.2), 1.5 * sig(0.15), sig(-0.05)]
    assert loss.item() == pytest.approx(((1 - v[0]) + (1.5 - v[1]) + (1 - v[2])) / 3, abs=1e-7)
    loss.backward()
    # d/dpolicy_i of (lambda - lambda sigmoid(beta * s (r_i - z0))) / 3 = -lambda beta s sigmoid' / 3, s = +1 or -1
    dsig = lambda x: sig(x) * (1 - sig(x))                                  # noqa: E731
    want = [-0.5 * dsig(0.2) / 3, 1.5 * 0.5 * dsig(0.15) / 3, -0.5 * dsig(-0.05) / 3]
    assert policy.grad.tolist() == pytest.approx(want, abs=1e-7)
    assert stats["reward_desirable"].item() == pytest.approx(0.5 * (0.5 + 0.0) / 2)
    assert stats["reward_undesirable"].item() == pytest.approx(0.5 * -0.2)
    # z0: the mean log-ratio on mismatched answers, clamped at 0, and no gradient through it
    z = kto_reference_point(torch.tensor([-2.0, -3.0]), torch.tensor([-2.5, -2.8]))
    assert z.item() == pytest.approx(0.15) and kto_reference_point(torch.tensor([-3.0]), torch.tensor([-2.0])) == 0
    zg = torch.tensor(0.3, requires_grad=True)
    assert not kto_loss(policy.detach(), ref, good, zg, beta=0.5)[0].requires_grad
