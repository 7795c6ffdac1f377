"""How items are named to the model (`pretrain.py --item_ids`).

    published      the dataset's own numbers (P5: numbered in order of first appearance, so "the next unseen id"
                   is often the answer: a leak)
    random         a seeded permutation of the numbers: no order at all
    sequential     numbered in order of first appearance in the *training* parts only (Hua et al. 2023): items
                   bought near each other get near numbers, validation and test items play no part
    collaborative  a short hierarchical code from spectral clustering of the training co-occurrence graph (k-means on
                   its spectral embedding, level by level), one token a level, plus an independent last token that
                   tells apart the items of one leaf (after Hua et al.'s CID)
    semantic       the same code from the items' text: titles (item_titles.json) where the dataset has them, else
                   their training review text (TIGER's idea, with TF-IDF + SVD vectors instead of an RQ-VAE)

Numbered schemes give each item one id word `item_N`; code schemes give `item_N` a token sequence such as
<a_3> <b_17> <c_0>, built here and saved with the checkpoint. Their numbering (used by the reference rules and the
files) is the random permutation, so no rule can read the published order either.
"""
import numpy as np

from dataset import DataError, random_item_permutation
from item_text import item_texts
from utils import UserError

SCHEMES = ("published", "random", "sequential", "collaborative", "semantic")
CODE_SCHEMES = ("collaborative", "semantic")
LEVEL_NAMES = "abcdefgh"


def sequential_item_map(ds):
    """new_id[old_id]: items numbered by first appearance in the users' training parts (users in file order);
    items that never appear there (only ever a validation or test item) come after, in published order."""
    new = [0] * (ds.num_items + 1)
    n = 0
    for u in ds.users:
        for i in ds.train_items(u):
            if not new[i]:
                n += 1
                new[i] = n
    for i in range(1, ds.num_items + 1):
        if not new[i]:
            n += 1
            new[i] = n
    return new


def item_map_for(scheme, ds, seed):
    """The renumbering (new_id[old_id], or None) a scheme applies to the dataset's items."""
    if scheme not in SCHEMES:
        raise UserError(f"unknown --item_ids {scheme!r}; choose one of {', '.join(SCHEMES)}")
    if scheme == "published":
        return None
    if scheme == "sequential":
        return sequential_item_map(ds)
    return random_item_permutation(ds.num_items, seed)


def hierarchical_codes(vectors, branching, seed=1):
    """codes[i] = (c_1, ..., c_L, d) for every row of `vectors`: k-means (scikit-learn) splits the items into
    branching[0] clusters, each of those into branching[1], ...; d numbers the items that share a leaf (so every
    code is unique). Clusters smaller than their branching are split into as many clusters as they have items."""
    from sklearn.cluster import KMeans
    n = len(vectors)
    codes = [[] for _ in range(n)]
    groups = [np.arange(n)]
    for k in branching:
        next_groups = []
        for members in groups:
            parts = min(k, len(members))
            if parts > 1 and len(np.unique(vectors[members], axis=0)) >= parts:
                labels = KMeans(parts, n_init=1, random_state=seed).fit_predict(vectors[members])
            else:   # too few (distinct) items to split: one cluster each, in order
                labels = np.arange(len(members)) % parts
            for c in range(parts):
                sub = members[labels == c]
                for i in sub:
                    codes[i].append(c)
                if len(sub):
                    next_groups.append(sub)
        groups = next_groups
    for members in groups:
        for d, i in enumerate(members):
            codes[i].append(d)
    return [tuple(int(c) for c in code) for code in codes]


def code_tokens(code):
    """A code's token words: level l's value v is <a_v>, <b_v>, ... (each level its own tokens)."""
    return [f"<{LEVEL_NAMES[level]}_{v}>" for level, v in enumerate(code)]


def collaborative_vectors(ds, dim=32, seed=1):
    """A spectral embedding of the training co-occurrence graph: the truncated SVD of its positive-PMI adjacency
    (cooccurrence.item_vectors), rows normalised so that k-means groups items by direction, not by how often they
    were bought. (Laplacian eigenmaps put the many small components of a sparse purchase graph on a few axes and
    most items at the origin: one giant cluster.) Rows 0 and never-co-bought items stay zero."""
    from sklearn.preprocessing import normalize
    from cooccurrence import cooccurrence, item_vectors
    return normalize(item_vectors(cooccurrence(ds), dim, seed))


def semantic_vectors(texts, num_items, dim=64, seed=1):
    """TF-IDF of each item's text reduced by truncated SVD (latent semantic analysis, scikit-learn) and normalised;
    items without text stay zero."""
    from sklearn.decomposition import TruncatedSVD
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.preprocessing import normalize
    items = sorted(texts)
    tfidf = TfidfVectorizer(sublinear_tf=True, min_df=2, stop_words="english").fit_transform([texts[i] for i in items])
    k = max(1, min(dim, tfidf.shape[1] - 1, len(items) - 1))
    reduced = normalize(TruncatedSVD(k, random_state=seed).fit_transform(tfidf))
    vectors = np.zeros((num_items + 1, dim))
    vectors[items, :k] = reduced
    return vectors


def item_codes(scheme, ds, branching=(64, 64), seed=1, log=print):
    """{item: code tuple} for a code scheme, on `ds`'s own numbering."""
    if scheme == "collaborative":
        vectors = collaborative_vectors(ds, seed=seed)
    elif scheme == "semantic":
        texts, source, missing = item_texts(ds, "auto", log=log)
        log(f"semantic codes from {source} text ({missing} of {ds.num_items} items without text: they share a "
            f"code prefix)")
        # items without text got their raw id as text: leave them out, their rows stay zero
        texts = {i: t for i, t in texts.items() if t != f"Item {ds.id2item.get(i, i)}."}
        vectors = semantic_vectors(texts, ds.num_items, seed=seed)
    else:
        raise ValueError(f"{scheme!r} is not a code scheme ({', '.join(CODE_SCHEMES)})")
    codes = hierarchical_codes(vectors[1:], branching, seed)
    return {i: codes[i - 1] for i in range(1, ds.num_items + 1)}


def parse_branching(text):
    try:
        branching = tuple(int(x) for x in text.split(","))
    except ValueError:
        branching = ()
    if not branching or min(branching) < 2 or len(branching) >= len(LEVEL_NAMES):
        raise DataError(f"--code_branching must be comma-separated integers >= 2 (at most {len(LEVEL_NAMES) - 1} "
                        f"levels), got {text!r}")
    return branching
