"""The evaluation core: every model and every no-training rule is ranked here, by one protocol.

A model only gives scores for all items: a [users, num_items + 1] tensor, column 0 the padding id (never ranked).
`rank_targets` ranks each user's held-out item among all items with the user's earlier items excluded (the target
itself never is, so a repeat purchase can still be hit; the P5 splits hold none) and ties counting against the
target, so a model that scores everything alike gets no credit; metrics.ranking_metrics turns the ranks into HR@k /
NDCG@k. A model that only writes a top-k list (beam search) is scored by `list_scores`: its items in list order,
everything else below them.

Leave-one-out: validation = the training part as history, the second-last item as target; test = the training part
and the validation item as history, the last item as target.

The reference rules are defined here, once each. All are fitted on the training parts alone (as the models are
trained), and a rule with a setting has it chosen on validation NDCG@10 over all users, never on test:
  most_popular     items by how often they are bought in the training parts
  recent_popular   items by how often they end a training part (Amazon's popularity drifts in time)
  co_occurrence    items bought within 3 positions of the user's last 3 items (cooccurrence.py), popularity below
  item_knn         item-based kNN (Sarwar et al. 2001; Deshpande & Karypis 2004): cosine similarity of the items'
                   buyers, each item's K nearest neighbours kept, a user's history summed; K chosen on validation
  ease             EASE (Steck 2019): the closed-form item-item regression B = I - P diag(1/diag P), P = (X'X +
                   lambda I)^-1, a user's history times B; lambda chosen on validation
  max_history_plus_1  the next unseen ids after the largest id in the history: scores only where ids leak the order
                   of first appearance (the published P5 ids)
The rules are fitted and ranked on the dataset's own item ids, whatever ids a model sees (a rank names no item, and
ties between equal neighbours then fall the same way for every model), so a rule's ranks depend on sequential.txt
alone and are cached by its hash (cache/rules/, or $HDREC_CACHE/rules/).
"""
import json
import os
import random
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

from cooccurrence import RECENT, WINDOW, cooc_scores, cooccurrence
from dataset import renumber_items
from metrics import ranking_metrics
from utils import atomic_write_json

CACHE = Path(os.environ.get("HDREC_CACHE", Path(__file__).resolve().parent / "cache")) / "rules"
RULE_NAMES = ("most_popular", "recent_popular", "co_occurrence", "item_knn", "ease", "max_history_plus_1")
# the settings tried on validation (the first of equals wins)
GRIDS = {"item_knn": {"neighbours": [10, 50, 200, 500, 1000, 2000]},
         "ease": {"lambda": [20, 100, 500, 2000]}}
LEAK_RULES = ("max_history_plus_1",)          # depend on the ids: never cached, not a rule to beat
BATCH = 1024


# ---------------------------------------------------------------------------------------------------- ranking

def curve_users(users, n, seed):
    """The fixed seeded sample of n validation users whose ranking draws a learning curve, the same for every model
    trained with the same --seed (pretrain.py's and sasrec_recbole.py's --rank_users); all of them when n is 0 or at
    least their number."""
    return sorted(random.Random(f"{seed}-rank").sample(list(users), min(n, len(users)) if n else len(users)))


def eval_cases(ds, split, users=None):
    """(users, histories, targets) of a split ('val' or 'test') for `users` (default: all, in file order)."""
    users = list(ds.sequences) if users is None else list(users)
    if split == "val":
        return users, [ds.train_items(u) for u in users], [ds.val_item(u) for u in users]
    if split == "test":
        return users, [ds.sequences[u][:-1] for u in users], [ds.test_item(u) for u in users]
    raise ValueError(f"split must be val or test, got {split!r}")


def rankable(shape, histories, targets=None):
    """[users, num_items + 1] bool: the items each user's target is ranked among: not the padding column, not the
    user's earlier items (the target excepted)."""
    mask = torch.ones(shape, dtype=torch.bool)
    mask[:, 0] = False
    for row, history in enumerate(histories):
        masked = set(history) - ({targets[row]} if targets is not None else set())
        if masked:
            mask[row, list(masked)] = False
    return mask


def no_nan(scores):
    scores = scores.float()
    return scores.masked_fill(scores.isnan(), float("-inf"))


def rank_targets(scores, histories, targets):
    """The one ranking: 0-based rank of each target among items 1..N, its user's history excluded, ties against it
    (a NaN score ranks last)."""
    scores = no_nan(scores)
    target_scores = scores[torch.arange(len(targets)), torch.as_tensor(targets)]
    beaten_or_tied = (scores >= target_scores[:, None]) & rankable(scores.shape, histories, targets)
    return (beaten_or_tied.sum(1) - 1).tolist()


def top_lists(scores, histories, k=10):
    """Each user's top-k items (history excluded), None where nothing is left to rank."""
    scores = no_nan(scores).masked_fill(~rankable(scores.shape, histories), float("-inf"))
    values, index = scores.sort(dim=1, descending=True, stable=True)     # ties: the lower id first
    values, index = values[:, :min(k, scores.shape[1] - 1)], index[:, :min(k, scores.shape[1] - 1)]
    return [[i if v > float("-inf") else None for v, i in zip(vs, ix)]
            for vs, ix in zip(values.tolist(), index.tolist())]


def top_lists_batched(score_fn, histories, k=10, batch_size=BATCH):
    """top_lists over batches of users: score_fn(histories) -> their scores. All users' scores at once are users x
    items floats (a rule on sports: 35,598 x 18,357, 2.6 GB, and sorting copies them)."""
    lists = []
    for start in range(0, len(histories), batch_size):
        h = histories[start:start + batch_size]
        lists += top_lists(score_fn(h), h, k)
    return lists


def list_scores(lists, num_items):
    """Scores of a model that only gives top-k lists: its items in list order, all others below (-inf). A target
    past the list then ranks last; results record the list length so that no figure past it is read."""
    scores = torch.full((len(lists), num_items + 1), float("-inf"))
    for row, items in enumerate(lists):
        for position, item in enumerate(items):
            if item is not None and 1 <= item <= num_items:
                scores[row, item] = len(items) - position
    return scores


def candidate_scores(scores, candidates):
    """Scores restricted to each user's candidates (top-N among 100): all other items at -inf."""
    out = torch.full_like(scores, float("-inf"))
    for row, items in enumerate(candidates):
        out[row, items] = scores[row, items]
    return out


def rank_batched(score_fn, histories, targets, batch_size=BATCH):
    """rank_targets over batches of users: score_fn(histories) -> their scores."""
    ranks = []
    for start in range(0, len(targets), batch_size):
        h = histories[start:start + batch_size]
        ranks += rank_targets(score_fn(h), h, targets[start:start + batch_size])
    return ranks


# ---------------------------------------------------------------------------------------------------- the rules

def training_matrix(ds):
    """Users x (num_items + 1) binary matrix of the training parts."""
    rows, cols = [], []
    for r, u in enumerate(ds.sequences):
        items = sorted(set(ds.train_items(u)))
        rows += [r] * len(items)
        cols += items
    return sp.csr_matrix((np.ones(len(rows), dtype=np.float32), (rows, cols)),
                         shape=(len(ds.sequences), ds.num_items + 1))


def history_matrix(histories, num_items):
    rows = [r for r, h in enumerate(histories) for _ in set(h)]
    cols = [i for h in histories for i in set(h)]
    return sp.csr_matrix((np.ones(len(rows), dtype=np.float32), (rows, cols)), shape=(len(histories), num_items + 1))


def popularity(ds):
    counts = np.zeros(ds.num_items + 1, dtype=np.float64)
    for u in ds.sequences:
        np.add.at(counts, ds.train_items(u), 1)
    return counts


def constant_rule(counts):
    scores = torch.as_tensor(counts, dtype=torch.float32)
    return lambda histories: scores.expand(len(histories), -1).clone()


def most_popular(ds):
    return constant_rule(popularity(ds))


def recent_popular(ds):
    counts = np.zeros(ds.num_items + 1)
    np.add.at(counts, [ds.train_items(u)[-1] for u in ds.sequences if ds.train_items(u)], 1)
    pop = popularity(ds)
    return constant_rule(counts + pop / (pop.max() + 1))          # all-time popularity breaks ties


def co_occurrence(ds):
    counts = cooccurrence(ds)
    pop = popularity(ds)
    tie_break = torch.as_tensor(pop * 1e-3 / (pop.max() + 1), dtype=torch.float32)   # below any co-occurrence weight
    return lambda histories: torch.stack([torch.as_tensor(cooc_scores(counts, h), dtype=torch.float32)
                                          for h in histories]) + tie_break


def item_knn(ds, neighbours):
    x = training_matrix(ds)
    co = (x.T @ x).tocsr()
    co.setdiag(0)
    co.eliminate_zeros()
    norm = np.sqrt(np.asarray(x.sum(0)).ravel())
    norm[norm == 0] = 1
    sim = sp.diags(1 / norm) @ co @ sp.diags(1 / norm)
    sim = keep_top(sim.tocsr(), neighbours)
    return lambda histories: torch.as_tensor((history_matrix(histories, ds.num_items) @ sim).toarray())


def keep_top(m, k):
    """Each row's k largest entries of a sparse matrix."""
    m = m.tocsr()
    rows, cols, vals = [], [], []
    for r in range(m.shape[0]):
        start, end = m.indptr[r], m.indptr[r + 1]
        data, index = m.data[start:end], m.indices[start:end]
        if len(data) > k:
            keep = np.argpartition(-data, k - 1)[:k]
            data, index = data[keep], index[keep]
        rows += [r] * len(data)
        cols += index.tolist()
        vals += data.tolist()
    return sp.csr_matrix((vals, (rows, cols)), shape=m.shape, dtype=np.float32)


def ease(ds, lam):
    x = training_matrix(ds)
    # an item never bought in a training part has a zero column: its row and column of B are 0 whatever lambda is,
    # so the inversion runs over the bought items alone (all of them on beauty; a few thousand on a test slice)
    active = np.flatnonzero(np.asarray(x.sum(0)).ravel())
    x = x[:, active]
    gram = torch.as_tensor((x.T @ x).toarray())
    gram += lam * torch.eye(len(active))
    p = torch.linalg.inv(gram)
    b = -p / torch.diagonal(p)[None, :]
    b.fill_diagonal_(0)
    b = b.numpy()

    def scores(histories):
        out = torch.zeros(len(histories), ds.num_items + 1)
        out[:, active] = torch.as_tensor(history_matrix(histories, ds.num_items)[:, active] @ b)
        return out
    return scores


def max_history_plus_1(ds):
    items = torch.arange(ds.num_items + 1, dtype=torch.float32)

    def scores(histories):
        top = torch.tensor([max(h) if h else 0 for h in histories], dtype=torch.float32)[:, None]
        return torch.where(items[None, :] > top, ds.num_items + 1 - items[None, :], torch.tensor(float("-inf")))
    return scores


RULES = {"most_popular": most_popular, "recent_popular": recent_popular, "co_occurrence": co_occurrence,
         "item_knn": item_knn, "ease": ease, "max_history_plus_1": max_history_plus_1}
FIXED_SETTINGS = {"co_occurrence": {"window": WINDOW, "recent": RECENT}}


def fit_rule(ds, name, setting=None):
    """The rule as score_fn(histories) -> [len, num_items + 1] scores; setting: its one value (GRIDS)."""
    return RULES[name](ds, *([setting] if setting is not None else []))


def choose_setting(ds, name, log=print):
    """(best setting, {setting: validation NDCG@10}, the best setting's fitted scores) of a rule with a grid, over
    all validation users (ties: the earlier setting). The fit is returned so that it is not repeated (EASE on
    sports: 11 minutes a fit)."""
    (key, grid), = GRIDS[name].items()
    _, histories, targets = eval_cases(ds, "val")
    figures, best, best_fit = {}, None, None
    for value in grid:
        t0 = time.time()
        score_fn = fit_rule(ds, name, value)
        figures[value] = ranking_metrics(rank_batched(score_fn, histories, targets))["NDCG@10"]
        log(f"{name} {key} {value}: validation NDCG@10 {figures[value]:.4f} ({time.time() - t0:.0f} s)")
        if best is None or figures[value] > figures[best]:
            best, best_fit = value, score_fn
    return best, figures, best_fit


def cache_path(ds):
    return CACHE / f"{(ds.hashes.get('sequential.txt') or 'unhashed')[:16]}.json"


def cached_rules(ds):
    """The rules cache/rules/ holds for this data (with the grids of this version), fitted or not now."""
    path, data_hash = cache_path(ds), ds.hashes.get("sequential.txt")
    cached = json.loads(path.read_text()) if data_hash and path.exists() else {}
    rules = cached.get("rules", {}) if cached.get("sequential.txt") == data_hash else {}
    return {name: entry for name, entry in rules.items() if entry.get("grid") == GRIDS.get(name)}


def rule_cache(ds, log=print, names=None):
    """{rule: {setting, validation figures, val, test}} of every rule but the leak rule (or of `names`), for all
    users in file order: read from cache/rules/<hash of sequential.txt>.json, the rules missing there computed
    (EASE: 15 CPU minutes on beauty, once) and written."""
    data_hash, path = ds.hashes.get("sequential.txt"), cache_path(ds)
    rules = cached_rules(ds)
    todo = [name for name in (names or RULE_NAMES) if name not in LEAK_RULES and name not in rules]
    if not todo:
        return rules
    log(f"reference rules: fitting {', '.join(todo)} on the training parts of {ds.data_dir} (once; cached in {path})")
    if ds.item_map is not None:          # back to the dataset's own ids
        inverse = [0] * len(ds.item_map)
        for old, new in enumerate(ds.item_map):
            inverse[new] = old
        ds = renumber_items(ds, inverse)
    for name in todo:
        entry = {"grid": GRIDS.get(name), **FIXED_SETTINGS.get(name, {})}
        if name in GRIDS:
            setting, figures, score_fn = choose_setting(ds, name, log)
            entry.update({"setting": {next(iter(GRIDS[name])): setting},
                          "validation_NDCG@10": {str(k): v for k, v in figures.items()}})
        else:
            score_fn = fit_rule(ds, name)
        for split in ("val", "test"):
            _, histories, targets = eval_cases(ds, split)
            entry[split] = rank_batched(score_fn, histories, targets)
        rules[name] = entry
        if data_hash:                    # after every rule: an interrupted fit keeps what it finished
            atomic_write_json(path, {"sequential.txt": data_hash, "users": list(ds.sequences), "rules": rules})
    return rules


def rule_ranks(ds, users, split="test", names=None, log=print):
    """{rule: ranks of `users`' `split` targets}, every rule by its one definition (names: a subset)."""
    names = list(names or RULE_NAMES)
    cache = rule_cache(ds, log, names) if any(n not in LEAK_RULES for n in names) else {}
    index = {u: i for i, u in enumerate(ds.sequences)}
    out = {}
    for name in names:
        if name in LEAK_RULES:
            _, histories, targets = eval_cases(ds, split, users)
            out[name] = rank_batched(fit_rule(ds, name), histories, targets)
        else:
            out[name] = [cache[name][split][index[u]] for u in users]
    return out


def rule_settings(ds, log=print):
    """What each rule was run with (and the validation figures that chose it), for results files."""
    return {name: {k: v for k, v in entry.items() if k not in ("val", "test", "grid")}
            for name, entry in rule_cache(ds, log).items()}


def setting_of(ds, name, log=print):
    """The validation-chosen setting of a rule with a grid (None for the others)."""
    entry = rule_cache(ds, log)[name]
    return next(iter(entry["setting"].values())) if "setting" in entry else None


def rule_scores(ds, names, log=print):
    """{rule: score_fn} fitted with their chosen settings, for what ranks need not give: top-k lists, candidates."""
    return {name: fit_rule(ds, name, setting_of(ds, name, log) if name in GRIDS else None) for name in names}
