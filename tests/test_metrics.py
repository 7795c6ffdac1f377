"""metrics.py: HR / NDCG with one relevant item per user, against hand-computed cases."""
import math

import pytest

from metrics import hit, ndcg, rank_by_score, rank_of, ranking_metrics


def test_hand_computed_ranks():
    # ranks [0, 3, None, 9, 12]: hits at k=1: {0}; k=5: {0, 3}; k=10: {0, 3, 9}; None and 12 are misses everywhere
    m = ranking_metrics([0, 3, None, 9, 12])
    assert list(m) == ["HR@1", "HR@5", "HR@10", "NDCG@5", "NDCG@10"]
    assert m["HR@1"] == pytest.approx(0.2)
    assert m["HR@5"] == pytest.approx(0.4)
    assert m["HR@10"] == pytest.approx(0.6)
    assert m["NDCG@5"] == pytest.approx((1 + 1 / math.log2(5)) / 5)            # rank 0 -> 1/log2(2), rank 3 -> 1/log2(5)
    assert m["NDCG@10"] == pytest.approx((1 + 1 / math.log2(5) + 1 / math.log2(11)) / 5)
    assert m["NDCG@5"] == pytest.approx(0.286135, abs=1e-6)
    assert m["NDCG@10"] == pytest.approx(0.343948, abs=1e-6)


def test_single_user_cases():
    assert ranking_metrics([0]) == {"HR@1": 1.0, "HR@5": 1.0, "HR@10": 1.0, "NDCG@5": 1.0, "NDCG@10": 1.0}
    assert ranking_metrics([None]) == {"HR@1": 0.0, "HR@5": 0.0, "HR@10": 0.0, "NDCG@5": 0.0, "NDCG@10": 0.0}
    m = ranking_metrics([1])                   # second place: HR@1 miss, NDCG = 1/log2(3)
    assert m["HR@1"] == 0.0 and m["HR@5"] == 1.0
    assert m["NDCG@5"] == pytest.approx(0.630930, abs=1e-6)
    m = ranking_metrics([4, 5])                # rank 4 is inside top 5, rank 5 is not
    assert m["HR@5"] == 0.5 and m["HR@10"] == 1.0
    assert m["NDCG@5"] == pytest.approx(1 / math.log2(6) / 2)
    assert m["NDCG@10"] == pytest.approx((1 / math.log2(6) + 1 / math.log2(7)) / 2)


def test_hit_and_ndcg_boundaries():
    assert hit(9, 10) == 1.0 and hit(10, 10) == 0.0 and hit(None, 10) == 0.0
    assert ndcg(9, 10) == pytest.approx(1 / math.log2(11)) and ndcg(10, 10) == 0.0 and ndcg(None, 5) == 0.0


def test_options_and_generators():
    m = ranking_metrics((r for r in [0, 2]), ks=(1, 3), ndcg_ks=(3,), hr_name="Recall")
    assert m == {"Recall@1": 0.5, "Recall@3": 1.0, "NDCG@3": pytest.approx((1 + 0.5) / 2)}
    with pytest.raises(ValueError):
        ranking_metrics([])


def test_rank_of():
    assert rank_of(7, [3, 7, 9]) == 1
    assert rank_of(3, [3, 7, 9]) == 0
    assert rank_of(4, [3, 7, 9]) is None
    assert rank_of(4, [None, None]) is None
    assert rank_of(9, (x for x in [1, 9])) == 1


def test_rank_by_score_is_pessimistic_on_ties():
    assert rank_by_score([0.9, 0.5, 0.1], 0) == 0
    assert rank_by_score([0.1, 0.5, 0.9], 0) == 2
    assert rank_by_score([0.5, 0.5, 0.1, 0.9], 0) == 2          # one tie and one better: behind both
    assert rank_by_score([0.5, 0.5, 0.1, 0.9], 1) == 2
    assert rank_by_score([0.0] * 100, 0) == 99                 # a constant scorer gets no credit
    assert ranking_metrics([rank_by_score([0.0] * 100, 0)])["HR@10"] == 0.0
    assert rank_by_score([-3.0, -1.0, -7.0, -2.0], 3) == 1     # log-likelihoods: higher is better
    assert rank_by_score([float("-inf"), -1.0], 0) == 1


def test_rank_by_score_nan_target_is_ranked_last():
    assert rank_by_score([float("nan"), 1.0, 2.0], 0) == 2
