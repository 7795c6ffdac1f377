"""Which items are bought together: co-occurrence counts over the training parts of the sequences (never a validation
or test item), a next-item reference rule built on them, and item vectors (PPMI + truncated SVD) that can start a
model's item embeddings (`pretrain.py --item_init cooc`)."""
import numpy as np
import scipy.sparse as sp

WINDOW = 3        # items at most this many positions apart in one user's purchases count as bought together
RECENT = 3        # the rule scores by the user's last RECENT items, each half as much as the one after it


def cooccurrence(ds, window=WINDOW):
    """Symmetric sparse (num_items + 1)^2 counts: every pair of items bought within `window` positions of each other
    in one user's training part, weighted 1 / distance."""
    rows, cols, vals = [], [], []
    for u in ds.users:
        s = np.asarray(ds.train_items(u))
        for d in range(1, window + 1):
            if len(s) > d:
                rows += [s[:-d], s[d:]]
                cols += [s[d:], s[:-d]]
                vals.append(np.full(2 * (len(s) - d), 1.0 / d))
    if not rows:
        return sp.csr_matrix((ds.num_items + 1, ds.num_items + 1))
    return sp.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
                         shape=(ds.num_items + 1, ds.num_items + 1))


def cooc_scores(counts, history, recent=RECENT):
    """Every item's score as the next purchase after `history`: its co-occurrence with the last `recent` items."""
    scores = np.zeros(counts.shape[0])
    for age, item in enumerate(reversed(history[-recent:])):
        row = counts.getrow(item)
        scores[row.indices] += row.data * 0.5 ** age
    return scores


def item_vectors(counts, dim, seed=1):
    """(num_items + 1, dim) float32 vectors, near for items bought together: the truncated SVD of the items' positive
    pointwise mutual information, U * sqrt(S) (Levy & Goldberg 2015; context counts smoothed by the power 0.75).
    Items never bought together with another get a zero row."""
    c = counts.tocoo()
    if c.nnz == 0:
        return np.zeros((counts.shape[0], dim), dtype=np.float32)
    row_sum = np.asarray(counts.sum(1)).ravel()
    context = row_sum ** 0.75
    pmi = np.log(c.data * context.sum() / (row_sum[c.row] * context[c.col]))
    keep = pmi > 0
    ppmi = sp.csr_matrix((pmi[keep], (c.row[keep], c.col[keep])), shape=counts.shape)
    # only the items with a positive-PMI partner take part: the rest would add exactly-zero singular values, whose
    # vectors no solver returns reproducibly
    linked = np.flatnonzero(np.diff(ppmi.indptr))
    vectors = np.zeros((counts.shape[0], dim), dtype=np.float32)
    if len(linked) < 2:
        return vectors
    sub = ppmi[linked][:, linked]
    k = min(dim, len(linked) - 1)
    if len(linked) <= 3000:                         # small: LAPACK's exact SVD
        u, s, _ = np.linalg.svd(sub.toarray())
        u, s = u[:, :k], s[:k]
    else:                                           # large: randomized SVD (Halko et al.), seeded
        from sklearn.utils.extmath import randomized_svd
        u, s, _ = randomized_svd(sub, k, n_iter=6, random_state=seed)
    s = np.where(s > 1e-6 * s.max(), s, 0.0)        # a zero singular value carries no direction
    u = u * np.sign(u[np.abs(u).argmax(0), np.arange(k)])    # each vector's sign fixed: its largest entry positive
    vectors[linked, :k] = u * np.sqrt(s)
    return vectors
