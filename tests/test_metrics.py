"""metrics.py: HR / NDCG with one relevant item per user, against hand-computed cases."""
import math

import pytest

from metrics import hit, ndcg, ranking_metrics


def test_hand_computed_ranks():
    # ranks [0, 3, None, 9, 12]: hits at k=1: {0}; k=5: {0, 3}; k=10: {0, 3, 9}; None and 12 are misses everywhere
    m = ranking_metrics([0, 3, None, 9, 12])
    assert list(m) == ["HR@1", "HR@5", "HR@10", "HR@20", "NDCG@5", "NDCG@10", "NDCG@20"]
    assert m["HR@20"] == pytest.approx(0.8)                                     # 12 is inside the top 20
    assert m["NDCG@20"] == pytest.approx((1 + 1 / math.log2(5) + 1 / math.log2(11) + 1 / math.log2(14)) / 5)
    assert m["HR@1"] == pytest.approx(0.2)
    assert m["HR@5"] == pytest.approx(0.4)
    assert m["HR@10"] == pytest.approx(0.6)
    assert m["NDCG@5"] == pytest.approx((1 + 1 / math.log2(5)) / 5)            # rank 0 -> 1/log2(2), rank 3 -> 1/log2(5)
    assert m["NDCG@10"] == pytest.approx((1 + 1 / math.log2(5) + 1 / math.log2(11)) / 5)
    assert m["NDCG@5"] == pytest.approx(0.286135, abs=1e-6)
    assert m["NDCG@10"] == pytest.approx(0.343948, abs=1e-6)


def test_single_user_cases():
    assert ranking_metrics([0]) == {"HR@1": 1.0, "HR@5": 1.0, "HR@10": 1.0, "HR@20": 1.0, "NDCG@5": 1.0,
                                    "NDCG@10": 1.0, "NDCG@20": 1.0}
    assert set(ranking_metrics([None]).values()) == {0.0} and ranking_metrics([-1]) == ranking_metrics([None])
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


def test_list_length_leaves_out_what_a_list_cannot_tell():
    m = ranking_metrics((r for r in [0, 2]), list_length=10)          # top-10 lists: nothing @20
    assert list(m) == ["HR@1", "HR@5", "HR@10", "NDCG@5", "NDCG@10"]
    assert m["NDCG@5"] == pytest.approx((1 + 0.5) / 2)
    with pytest.raises(ValueError):
        ranking_metrics([])
