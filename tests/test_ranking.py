"""ranking.py, the evaluation core: the one ranking, lists and candidates through it, every reference rule against a
hand-computed case, settings chosen on validation, and the rule cache (its ranks do not depend on the item ids)."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import ranking
from conftest import make_slice, quiet
from dataset import Dataset, load_dataset, random_item_permutation, renumber_items
from metrics import ranking_metrics


def toy(sequences, num_items, hashes=None):
    return Dataset(data_dir=Path("toy"), sequences=sequences, num_items=num_items, negatives={}, id2user={},
                   id2item={}, hashes=hashes or {})


def test_rank_targets_excludes_history_but_not_the_target_and_ties_count_against():
    scores = torch.tensor([[9.0, 0.9, 0.8, 0.7, 0.6, 0.5],     # col 0 = padding, never ranked
                           [0.0, 0.9, 0.8, 0.7, 0.6, 0.5],
                           [0.0, 0.5, 0.5, 0.5, 0.1, 0.2],
                           [0.0, 0.9, 0.8, 0.7, 0.6, 0.5]])
    histories = [[1, 2], [], [3], [1, 4]]
    targets = [4, 1, 1, 4]
    # user 1: 1, 2 excluded, 3 (0.8) above 4 -> 1; user 2: top -> 0; user 3: 3 excluded, tie with 2 counts -> 1;
    # user 4: its target 4 is in its history (a repeat) and stays rankable: behind 2 and 3 -> 2
    assert ranking.rank_targets(scores, histories, targets) == [1, 0, 1, 2]
    nan = torch.tensor([[0.0, float("nan"), 1.0, 2.0]])
    assert ranking.rank_targets(nan, [[]], [1]) == [2]          # a NaN score ranks last
    assert ranking.rank_targets(torch.zeros(1, 101), [[]], [7]) == [99]     # a constant scorer gets no credit


def test_top_lists_lists_and_candidates_go_through_the_same_ranking():
    scores = torch.tensor([[0.0, 0.1, 0.9, 0.5, 0.7]])
    assert ranking.top_lists(scores, [[2]], 3) == [[4, 3, 1]]
    assert ranking.top_lists(scores, [[1, 2, 3, 4]], 2) == [[None, None]]   # nothing left to rank
    lists = [[3, None, 1], [2, 4, 1]]
    as_scores = ranking.list_scores(lists, 4)
    # the target's place in the list (an invalid id takes no place); past the list: last
    assert ranking.rank_targets(as_scores, [[], []], [1, 4]) == [1, 1]
    assert ranking.rank_targets(as_scores, [[], []], [4, 3]) == [3, 3]
    only = ranking.candidate_scores(torch.tensor([[0.0, 5.0, 4.0, 3.0, 2.0]]), [[3, 4]])
    assert ranking.rank_targets(only, [[]], [4]) == [1] and ranking.rank_targets(only, [[]], [3]) == [0]


# users' training parts: 1: [1 2 3], 2: [2 3], 3: [1 3 4], 4: [4 5]
TOY = {1: [1, 2, 3, 4, 5], 2: [2, 3, 1, 4], 3: [1, 3, 4, 2, 5], 4: [4, 5, 1, 2]}


def test_popularity_rules_count_training_parts_only():
    ds = toy(TOY, 6)
    assert ranking.popularity(ds).tolist() == [0, 2, 2, 3, 2, 1, 0]
    scores = ranking.most_popular(ds)([[], [3]])
    assert ranking.top_lists(scores, [[], [3]], 2) == [[3, 1], [1, 2]]   # ties: stable order of the ids
    # recent popular: the last training items 3, 3, 4, 5; all-time popularity breaks the tie of 4 and 5
    recent = ranking.recent_popular(ds)([[]])
    assert ranking.rank_targets(recent, [[]], [3, ]) == [0]
    assert ranking.rank_targets(recent, [[]], [4]) == [1] and ranking.rank_targets(recent, [[]], [5]) == [2]


def test_ease_is_the_closed_form_of_steck_2019():
    ds = toy(TOY, 6)
    lam = 2.0
    x = np.zeros((4, 7))
    for r, u in enumerate(TOY):
        x[r, ds.train_items(u)] = 1
    p = np.linalg.inv(x.T @ x + lam * np.eye(7))                # every item, the never-bought ones included
    b = np.eye(7) - p / np.diag(p)[None, :]
    history = np.zeros(7)
    history[[1, 2]] = 1
    got = ranking.ease(ds, lam)([[1, 2]])[0].numpy()
    assert np.allclose(got, history @ b, atol=1e-5)
    assert got[6] == 0 and got[0] == 0                          # item 6 is never bought in a training part


def test_item_knn_sums_the_cosine_of_the_k_nearest_neighbours():
    ds = toy(TOY, 6)
    # buyers: 1 {u1, u3}, 2 {u1, u2}, 3 {u1, u2, u3}, 4 {u3, u4}, 5 {u4}
    cos = lambda a, b, common: common / math.sqrt(a * b)       # noqa: E731
    full = ranking.item_knn(ds, 10)([[3]])[0].numpy()           # history [3]: item 3's neighbours
    assert full[1] == pytest.approx(cos(3, 2, 2)) and full[2] == pytest.approx(cos(3, 2, 2))
    assert full[4] == pytest.approx(cos(3, 2, 1)) and full[5] == 0 and full[3] == 0
    one = ranking.item_knn(ds, 1)([[4]])[0].numpy()              # item 4's one nearest: 5 (cos 1/sqrt 2)
    assert one[5] == pytest.approx(cos(2, 1, 1)) and one[1] == 0 and one[3] == 0


def test_leak_rule_ranks_the_next_unseen_ids():
    ds = toy(TOY, 6)
    scores = ranking.max_history_plus_1(ds)([[1, 3], [5]])
    assert ranking.top_lists(scores, [[1, 3], [5]], 3) == [[4, 5, 6], [6, None, None]]


def test_top_lists_in_batches_are_the_lists_of_all_users_at_once():
    torch.manual_seed(0)
    scores = torch.randint(0, 5, (7, 9)).float()           # ties everywhere: the order must still agree
    histories = [[1], [], [2, 3], [8], [1, 2, 3, 4, 5, 6, 7, 8], [4], [6, 7]]
    calls = []

    def score_fn(h):            # the rows of the users asked for, in order
        calls.append(len(h))
        return scores[sum(calls[:-1]):sum(calls)]
    assert ranking.top_lists_batched(score_fn, histories, 4, batch_size=3) == ranking.top_lists(scores, histories, 4)
    assert calls == [3, 3, 1]


@pytest.fixture(scope="module")
def slice_ds(tmp_path_factory):
    d = make_slice(tmp_path_factory.mktemp("rules"), 200, seed=4)
    return load_dataset(d, log=quiet, negatives=False)


def test_settings_are_chosen_on_validation_and_cached(slice_ds, tmp_path, monkeypatch):
    monkeypatch.setattr(ranking, "CACHE", tmp_path / "rules")
    monkeypatch.setattr(ranking, "GRIDS", {"item_knn": {"neighbours": [1, 50]}, "ease": {"lambda": [1, 1000]}})
    users = list(slice_ds.sequences)
    fits, fit_rule = [], ranking.fit_rule
    monkeypatch.setattr(ranking, "fit_rule", lambda ds, name, setting=None: fits.append((name, setting)) or
                        fit_rule(ds, name, setting))
    ranks = ranking.rule_ranks(slice_ds, users, "test", log=quiet)
    assert set(ranks) == set(ranking.RULE_NAMES) and all(len(r) == len(users) for r in ranks.values())
    # each setting of a grid is fitted once: the chosen one's fit ranks the test items too (EASE: minutes a fit)
    assert sorted(f for f in fits if f[0] in ranking.GRIDS) == [("ease", 1), ("ease", 1000), ("item_knn", 1),
                                                                 ("item_knn", 50)]
    monkeypatch.setattr(ranking, "fit_rule", fit_rule)
    settings = ranking.rule_settings(slice_ds)
    for rule, key in (("item_knn", "neighbours"), ("ease", "lambda")):
        figures = settings[rule]["validation_NDCG@10"]
        assert set(figures) == {str(v) for v in ranking.GRIDS[rule][key]}
        chosen = settings[rule]["setting"][key]
        assert figures[str(chosen)] == max(figures.values())
        # the figure that chose it is the validation figure of the fitted rule, and the test ranks are that rule's
        _, histories, targets = ranking.eval_cases(slice_ds, "val")
        fitted = ranking.fit_rule(slice_ds, rule, chosen)
        assert ranking_metrics(ranking.rank_batched(fitted, histories, targets))["NDCG@10"] == figures[str(chosen)]
        _, histories, targets = ranking.eval_cases(slice_ds, "test")
        assert ranking.rank_batched(fitted, histories, targets) == ranks[rule]
    cached = json.loads(next((tmp_path / "rules").glob("*.json")).read_text())
    assert cached["sequential.txt"] == slice_ds.hashes["sequential.txt"]

    # a second run reads the cache (fitting again would fail here) ...
    monkeypatch.setattr(ranking, "fit_rule", lambda *a: pytest.fail("refitted a cached rule"))
    assert ranking.rule_ranks(slice_ds, users[:5], "val", names=["ease", "co_occurrence"], log=quiet) == \
        {rule: [cached["rules"][rule]["val"][i] for i in range(5)] for rule in ("ease", "co_occurrence")}


def test_rule_ranks_do_not_depend_on_the_item_ids(slice_ds, tmp_path, monkeypatch):
    monkeypatch.setattr(ranking, "GRIDS", {"item_knn": {"neighbours": [20]}, "ease": {"lambda": [100]}})
    users = list(slice_ds.sequences)
    monkeypatch.setattr(ranking, "CACHE", tmp_path / "a")
    published = ranking.rule_ranks(slice_ds, users, log=quiet)
    monkeypatch.setattr(ranking, "CACHE", tmp_path / "b")
    shuffled = renumber_items(slice_ds, random_item_permutation(slice_ds.num_items, 7))
    renumbered = ranking.rule_ranks(shuffled, users, log=quiet)
    for rule in ranking.RULE_NAMES:
        if rule in ranking.LEAK_RULES:
            assert published[rule] != renumbered[rule]         # the leak rule reads the ids: that is its point
        else:
            assert published[rule] == renumbered[rule], rule


def test_only_the_rules_asked_for_are_fitted(slice_ds, tmp_path, monkeypatch):
    monkeypatch.setattr(ranking, "CACHE", tmp_path / "rules")
    monkeypatch.setitem(ranking.RULES, "ease", lambda *a: pytest.fail("fitted EASE, which nobody asked for"))
    users = list(slice_ds.sequences)[:10]
    cheap = ranking.rule_ranks(slice_ds, users, "val", names=["most_popular", "co_occurrence"], log=quiet)
    assert set(cheap) == {"most_popular", "co_occurrence"}
    assert set(ranking.cached_rules(slice_ds)) == {"most_popular", "co_occurrence"}


def test_curve_users_are_one_seeded_sample_for_every_model():
    """pretrain.py and sasrec_recbole.py draw their learning curves on the same users for the same seed."""
    from ranking import curve_users
    users = list(range(1, 301))
    sample = curve_users(users, 50, 7)
    assert sample == sorted(sample) and len(set(sample)) == 50 and set(sample) <= set(users)
    assert curve_users(list(reversed(users))[::-1], 50, 7) == sample       # a copy of the list: the same sample
    assert curve_users(users, 50, 8) != sample
    assert curve_users(users, 0, 7) == curve_users(users, 1000, 7) == users
