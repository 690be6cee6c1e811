"""Labelers weighed by reliability (rlhf_ray/labelers.py), on hand-made labels whose answer is known."""
import math
import random

import pytest

from rlhf_ray.labelers import LabeledRanking, aggregate, agreement

PROMPTS, K = 30, 4


def honest(name: str, prompts=range(PROMPTS)) -> list[LabeledRanking]:
    """Answer 0 best, then 1, 2, 3: the truth of every prompt here."""
    return [LabeledRanking(g, name, tuple(range(K))) for g in prompts]


def shuffled(name: str, seed: int, prompts=range(PROMPTS)) -> list[LabeledRanking]:
    rng = random.Random(seed)
    return [LabeledRanking(g, name, tuple(rng.sample(range(K), K))) for g in prompts]


def test_agreement_counts_pairs_two_labelers_share():
    a = [LabeledRanking(0, "a", (0, 1, 2))]
    assert agreement(a + [LabeledRanking(0, "b", (0, 1, 2))]) == 1.0
    assert agreement(a + [LabeledRanking(0, "b", (2, 1, 0))]) == 0.0
    # (0, 1) and (0, 2) alike, (1, 2) reversed; c ranked only 0 and 2, above each other as a does
    assert agreement(a + [LabeledRanking(0, "b", (0, 2, 1))]) == pytest.approx(2 / 3)
    assert agreement(a + [LabeledRanking(0, "c", (0, 2))]) == 1.0
    assert math.isnan(agreement(a + [LabeledRanking(1, "b", (0, 1))]))     # no prompt in common


def test_a_labeler_who_shuffles_is_found_least_reliable_and_the_aggregate_is_the_truth():
    labels = honest("h1") + honest("h2") + honest("h3") + shuffled("careless", seed=0)
    agg = aggregate(labels)
    assert all(r == list(range(K)) for r in agg.rankings.values())
    assert min(agg.reliability, key=agg.reliability.get) == "careless"
    assert agg.reliability["careless"] < 0.6 < 0.95 < min(agg.reliability[h] for h in ("h1", "h2", "h3"))
    assert agg.with_aggregate["h1"] == 1.0 and agg.with_aggregate["careless"] < 0.75


def test_weighing_recovers_the_truth_where_the_unweighted_majority_cannot():
    """Every prompt: two honest labelers and three who shuffle. Unweighted, the shufflers outvote the honest pair
    on many answer pairs; weighed, the honest two agree with each other on every prompt and the shufflers with no
    one, which gives them away. (Reliability shows only in agreement: one honest labeler among shufflers could
    not be told from them, since every prompt's strengths can fit any one labeler.)"""
    labels = honest("h1") + honest("h2") + [lab for k in range(3) for lab in shuffled(f"s{k}", seed=k)]
    truth = list(range(K))

    def right(agg):
        return sum(r == truth for r in agg.rankings.values())
    weighed, plain = aggregate(labels), aggregate(labels, weigh=False)
    assert not plain.weighed and weighed.weighed
    assert right(weighed) == PROMPTS
    assert right(plain) < PROMPTS * 0.8, right(plain)
    assert min(weighed.reliability["h1"], weighed.reliability["h2"]) > 0.9 > 0.6 > max(
        weighed.reliability[f"s{k}"] for k in range(3))


def test_a_labeler_who_prefers_what_is_shown_first_loses_weight():
    """A biased labeler: the answers are shown in a random order, and this one puts the first shown on top."""
    rng = random.Random(3)
    labels = honest("h1") + honest("h2")
    for g in range(PROMPTS):
        shown = rng.sample(range(K), K)
        labels.append(LabeledRanking(g, "first", (shown[0], *[a for a in range(K) if a != shown[0]])))
    agg = aggregate(labels)
    assert min(agg.reliability, key=agg.reliability.get) == "first"
    assert all(r == list(range(K)) for r in agg.rankings.values())


def test_partial_labels_and_bad_rankings():
    labels = [LabeledRanking(0, "a", (2, 0)), LabeledRanking(0, "b", (2, 1, 0)), LabeledRanking(5, "a", (1, 0))]
    agg = aggregate(labels)
    assert agg.rankings == {0: [2, 1, 0], 5: [1, 0]}
    with pytest.raises(ValueError, match=r"labeler 'a' ranks an answer of prompt 0 twice: \[1, 1\]"):
        aggregate([LabeledRanking(0, "a", (1, 1))])
    with pytest.raises(ValueError, match="no rankings"):
        aggregate([])


WORDS = ["object", "function", "value", "type", "the", "a", "is", "and", "of", "it", "this", "runs", "fast"]


def pool_labels(pool, seed: int = 0, prompts: int = 60):
    """The tiny world's simulated labelers (rlhf_ray/tiny_world/gold.py) on synthetic answers of 4 to 30 words,
    some of them the gold reward's topic words: (labels, gold accuracy of an aggregate's rankings)."""
    from rlhf_ray.prefs import ranking_to_pairs
    from rlhf_ray.tiny_world.gold import gold_score
    rng = random.Random(seed)
    answers = [[" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 30))) for _ in range(K)]
               for _ in range(prompts)]
    labels = [LabeledRanking(g, lab.name, tuple(lab.rank(texts, rng))) for g, texts in enumerate(answers)
              for lab in pool]

    def gold_accuracy(agg):
        gold = [[gold_score(t) for t in texts] for texts in answers]
        pairs = [(g, a, b) for g, r in agg.rankings.items() for a, b in ranking_to_pairs(r) if gold[g][a] != gold[g][b]]
        return sum(gold[g][a] > gold[g][b] for g, a, b in pairs) / len(pairs)
    return labels, gold_accuracy


def test_a_pool_with_a_careless_labeler_weighed_against_gold():
    """Three honest labelers and one who orders 80 % of its rankings at random: it is estimated least reliable
    (near a coin's 0.5), and the weighed aggregate agrees with gold more often than the unweighted one."""
    from rlhf_ray.tiny_world.gold import SimulatedLabeler
    pool = [SimulatedLabeler(f"honest{i}", noise=0.5) for i in range(3)]
    pool.append(SimulatedLabeler("careless", noise=0.5, bias="careless", strength=0.8))
    labels, gold_accuracy = pool_labels(pool)
    weighed, plain = aggregate(labels), aggregate(labels, weigh=False)
    assert min(weighed.reliability, key=weighed.reliability.get) == "careless"
    assert weighed.reliability["careless"] < 0.65 < 0.85 < min(weighed.reliability[f"honest{i}"] for i in range(3))
    assert gold_accuracy(weighed) >= gold_accuracy(plain) + 0.02
    assert 0.5 < weighed.agreement < 0.95


def test_a_biased_labeler_is_found_unless_the_biased_agree_and_match_the_honest_in_number():
    """A labeler who prefers longer answers, among three honest ones, is the least reliable. Two of them among two
    honest ones agree with each other more than the honest (their bias is consistent, the honest ones' noise is
    not) and are trusted instead: reliability is agreement, as the module says, not truth."""
    from rlhf_ray.tiny_world.gold import SimulatedLabeler
    honest = [SimulatedLabeler(f"honest{i}", noise=0.5) for i in range(3)]
    longer = [SimulatedLabeler(f"longer{i}", noise=0.5, bias="length", strength=0.3) for i in range(2)]
    one = aggregate(pool_labels(honest + longer[:1])[0]).reliability
    assert min(one, key=one.get) == "longer0"
    two = aggregate(pool_labels(honest[:2] + longer)[0]).reliability
    assert min(two, key=two.get).startswith("honest") and min(two["longer0"], two["longer1"]) > 0.9


def test_the_pipelines_pool_ranks_every_row_and_reports_each_labeler():
    """rlhf_ray/tiny_world/gold.py pool_rankings, what the pipeline's label stage runs with pipeline.labelers:
    every row keeps each labeler's ranking and gets the aggregate as the ranking the reward model trains on."""
    from rlhf_ray.tiny_world.gold import SimulatedLabeler, pool_rankings, simulated_ranking
    rng = random.Random(1)
    rows = [{"prompt": f"p{g}", "responses": [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 30)))
                                              for _ in range(K)]} for g in range(40)]
    pool = [SimulatedLabeler(f"honest{i}", noise=0.3) for i in range(3)]
    pool.append(SimulatedLabeler("careless", noise=0.3, bias="careless", strength=1.0))
    report = pool_rankings(rows, pool, random.Random(2))
    assert all(sorted(r["ranking"]) == list(range(K)) and set(r["labels"]) == {p.name for p in pool} for r in rows)
    assert min(report["reliability"], key=report["reliability"].get) == "careless" and report["weighed"]
    assert set(report["with_aggregate"]) == set(report["reliability"]) and 0 < report["agreement"] < 1
    # an honest simulated labeler is the pipeline's single labeler: the same ranking from the same random state
    texts = rows[0]["responses"]
    assert SimulatedLabeler("h", noise=0.3).rank(texts, random.Random(7)) == simulated_ranking(texts, random.Random(7),
                                                                                               0.3)
