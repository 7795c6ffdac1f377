"""Co-occurrence counts, the co-occurrence reference rule and the PPMI-SVD item vectors of --item_init cooc."""
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import T5ForConditionalGeneration

from cooccurrence import cooc_scores, cooccurrence, item_vectors
from dataset import Dataset
from utils import UserError
from ranking import co_occurrence, top_lists
from module import init_item_embeddings, item_word, t5_config_for


def toy(sequences, num_items):
    return Dataset(data_dir=Path("toy"), sequences=sequences, num_items=num_items, negatives={}, id2user={},
                   id2item={})


# user 1's training part is 1 2 3 (4 is its validation item, 5 its test item); user 2's is 2 3 6
TOY = toy({1: [1, 2, 3, 4, 5], 2: [2, 3, 6, 7, 8]}, 9)


def test_counts_pairs_within_the_window_in_training_parts_only():
    counts = cooccurrence(TOY, window=2).toarray()
    expected = np.zeros((10, 10))
    for a, b, w in [(1, 2, 1), (2, 3, 1), (1, 3, 0.5),          # user 1: 1 2 3
                    (2, 3, 1), (3, 6, 1), (2, 6, 0.5)]:         # user 2: 2 3 6
        expected[a, b] += w
        expected[b, a] += w
    assert np.allclose(counts, expected)
    assert counts[:, [4, 5, 7, 8]].sum() == 0                   # validation and test items never count
    assert np.allclose(cooccurrence(TOY, window=1).toarray()[1, 3], 0)


def test_scores_weight_the_last_items_by_recency():
    counts = cooccurrence(TOY, window=2)
    # after history [1, 3]: 3 is the last item (weight 1), 1 the one before (weight 1/2)
    scores = cooc_scores(counts, [1, 3])
    assert scores[2] == pytest.approx(2 * 1 + 0.5 * 1)          # counts[3, 2] = 2, counts[1, 2] = 1
    assert scores[6] == pytest.approx(1) and scores[1] == pytest.approx(0.5 * 0 + 1 * 0.5)
    assert cooc_scores(counts, [1, 3], recent=1)[1] == pytest.approx(0.5)


def test_rule_excludes_bought_items_and_falls_back_to_popularity():
    ds = toy({1: [1, 2, 3, 4, 5], 2: [2, 3, 6, 7, 8], 3: [9, 9, 2, 1, 1], 4: [6, 6, 6, 1, 1]}, 9)
    rule = co_occurrence(ds)

    def cooc_next(user, k):
        history = ds.sequences[user][:-1]
        return top_lists(rule([history]), [history], k)[0]
    # user 1 bought 1 2 3 4; its last items 4, 3, 2 co-occur (in training parts) only with 1, 2, 3, 6
    assert cooc_next(1, k=3)[0] == 6
    # user 4's last item 1 co-occurs with 2 and 3 (2 is also popular: 3 users); the rest follows popularity
    top = cooc_next(4, k=5)
    assert top[:2] == [2, 3] and 1 not in top and 6 not in top
    assert top[2] == 9                                          # the most popular item left (bought twice)


def test_item_vectors_are_near_for_items_bought_together():
    # two groups of items that are only ever bought together: {1..5} and {6..10}; item 11 is never bought
    sequences = {}
    rng = np.random.default_rng(0)
    for u in range(60):
        group = [1, 2, 3, 4, 5] if u % 2 else [6, 7, 8, 9, 10]
        sequences[u + 1] = [int(x) for x in rng.permutation(group)] + [1, 1]
    ds = toy(sequences, 11)
    vectors = item_vectors(cooccurrence(ds), dim=4, seed=1)
    assert vectors.shape == (12, 4) and vectors.dtype == np.float32
    assert np.array_equal(vectors, item_vectors(cooccurrence(ds), dim=4, seed=1))        # seeded: reproducible
    assert not vectors[11].any() and not vectors[0].any()
    unit = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-9)
    cos = unit @ unit.T
    same = [cos[a, b] for a in range(1, 6) for b in range(1, 6) if a != b]
    across = [cos[a, b] for a in range(1, 6) for b in range(6, 11)]
    assert min(same) > 0.25 and max(np.abs(across)) < 0.05


def test_item_vectors_need_no_more_dimensions_than_the_data_has():
    vectors = item_vectors(cooccurrence(TOY), dim=64)           # 10 rows: the SVD gives at most 8 components
    assert vectors.shape == (10, 64) and not vectors[:, 8:].any()


def test_init_item_embeddings_sets_atomic_item_rows(small_ds, atomic_tokenizer, tokenizer):
    atomic = atomic_tokenizer
    torch.manual_seed(0)
    t5 = T5ForConditionalGeneration(t5_config_for("tiny", atomic))
    before = t5.shared.weight.detach().clone()
    vectors = np.zeros((small_ds.num_items + 1, 64), dtype=np.float32)
    vectors[[5, 9, 12]] = np.random.default_rng(0).normal(size=(3, 64))
    assert init_item_embeddings(t5, atomic, vectors) == 3
    rows = atomic.convert_tokens_to_ids([item_word(i) for i in (5, 9, 12)])
    after = t5.shared.weight.detach()
    scale = before.std() / torch.tensor(vectors[[5, 9, 12]]).std()
    assert torch.allclose(after[rows], torch.tensor(vectors[[5, 9, 12]]) * scale, atol=1e-6)
    untouched = torch.ones(len(after), dtype=torch.bool)
    untouched[rows] = False
    assert torch.equal(after[untouched], before[untouched])

    init_item_embeddings(t5, atomic, vectors, std=2.0)                       # pretrain.py's from-scratch scale: 1
    assert t5.shared.weight.detach()[rows].std().item() == pytest.approx(2.0, rel=1e-5)
    assert torch.equal(t5.shared.weight.detach()[untouched], before[untouched])
    with pytest.raises(UserError, match="--id_tokens atomic"):                # piece ids: no row per item
        init_item_embeddings(T5ForConditionalGeneration(t5_config_for("tiny", tokenizer)), tokenizer, vectors)
