"""Ranking metrics with one relevant item per user (leave-one-out), as in P5/POD/RDRec/HDRec.

rank is the 0-based position of the relevant item in the ranked list, or None when it is absent (a miss).
HR@k = 1 if rank < k.  NDCG@k = 1 / log2(rank + 2) if rank < k (the ideal DCG is 1 with a single relevant item).
Recall@k equals HR@k here. Averages are over all evaluated users, misses included.
"""
import math

import numpy as np


def rank_of(target, ranked):
    """0-based position of target in a ranked list, None when absent."""
    try:
        return list(ranked).index(target)
    except ValueError:
        return None


def hit(rank, k):
    return float(rank is not None and rank < k)


def ndcg(rank, k):
    return 1.0 / math.log2(rank + 2) if rank is not None and rank < k else 0.0


def ranking_metrics(ranks, ks=(1, 5, 10), ndcg_ks=(5, 10), hr_name="HR"):
    """Mean HR@k and NDCG@k over users from their ranks."""
    ranks = list(ranks)
    if not ranks:
        raise ValueError("no users to evaluate")
    out = {f"{hr_name}@{k}": float(np.mean([hit(r, k) for r in ranks])) for k in ks}
    out.update({f"NDCG@{k}": float(np.mean([ndcg(r, k) for r in ranks])) for k in ndcg_ks})
    return out


def rank_by_score(scores, target_index):
    """Rank of candidate `target_index` when candidates are sorted by descending score; ties count against the
    target (pessimistic), so a model that scores everything equally gets no credit."""
    scores = np.asarray(scores, dtype=np.float64)
    return int((scores >= scores[target_index]).sum() - 1)
