"""Raw Amazon review dump (or an interaction log) -> dataset dir in the published P5 format.

    python data/prepare.py --reviews ../shared/data/amazon2018/All_Beauty_5.json.gz --out data/all_beauty
    python data/prepare.py --interactions ml-1m.inter --out data/ml-1m      # an interaction log, no review text

Input: an Amazon 5-core review file (2014 or 2018), one review a line, plain or gzip (detected from the bytes).
Lines are JSON; the 2014 "strict" dumps of some categories are Python dict literals, read with ast.literal_eval.
Keys used: reviewerID, asin, unixReviewTime, reviewText, summary (may be absent), overall (may be absent).

What it does, in two streaming passes over the file (memory grows with users, items and kept reviews, not lines):
1. scan: parse and check every line, keep (user, item) -> (time, line) for the earliest review of each pair.
   Variant copies: the 2018 dumps copy one review onto every variant of a product (same reviewerID, unixReviewTime
   and reviewText, another asin), which teaches a sequence model "next item = a variant of the last one". Of a user's
   reviews with the same time and the same normalized text (whitespace collapsed, case folded) only the first by file
   line is kept (a 64-bit hash of user, time and text is stored, not the text); --keep_variant_copies turns this off.
   A user reviewing the same item twice (a repeated line included) counts once; the earliest review (time, then line)
   is the one kept. Bad lines (not JSON, no reviewerID/asin, no reviewText, an empty reviewText, no unixReviewTime)
   are counted with their line numbers; unless --skip_bad, the run stops with a report of them. Whitespace-only lines
   are ignored.
2. k-core: drop users and items with fewer than --k interactions, repeated until nothing changes.
3. ids: users numbered from 1 in order of their first review in the file; items numbered from 1 in order of first
   appearance when walking users in id order and each user's reviews in time order (ties: file line order). This is
   how the published P5 items were numbered (in P5 beauty's sequential.txt every new item is the next id). It leaks the
   test item ("next unseen id"), so `--item_ids random` renumbers items by a permutation seeded with --seed.
4. sequential.txt (user, then items in time order), datamaps.json (id2user/id2item and user2id/item2id),
   negative.txt (99 never-bought items per user, dataset.generate_negatives with --seed).
5. explain: second pass over the kept reviews; data/features.py picks at most one sentence per review that states an
   opinion about a product feature, and the feature. Records {user, item, explanation, feature, summary, rating}.
   Split (--split loo, default): the record of a user's test item (last in time) -> test, of the validation item
   (second last) -> val, the rest -> train, so no test review is seen in training. --split random: seeded 8:1:1.
6. explanation.json {"train", "val", "test"} and prepare_summary.json (config, input sha256, counts).
All files are written atomically.

--interactions FILE instead of --reviews: an interaction log, either a CSV file whose header names user, item and
timestamp (user_id / item_id also do; any order; other columns ignored) or a RecBole atomic .inter file
(tab-separated, header like user_id:token item_id:token timestamp:float). Steps 1-4 as above (a repeated pair keeps
its earliest row; a bad row stops the run with its line number), then prepare_summary.json; no explanation.json,
since there is no text.
"""
import argparse
import ast
import gzip
import hashlib
import json
import resource
import sys
import time
from collections import Counter, OrderedDict, defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from dataset import (NUM_NEGATIVES, DataError, generate_negatives, random_item_permutation, read_interactions,
                     write_negatives)
from utils import atomic_write_json, atomic_write_text, file_sha256, progress_bar, report_user_errors

BAD_KINDS = ("not_json", "missing_id", "missing_text", "empty_review", "missing_time")
SHOW_LINES = 5       # line numbers reported per kind of bad line
CHUNK = 2048         # reviews handed to the sentence selector at once
CACHE_SIZE = 50_000  # identical review texts (common in 2018 dumps) are analysed once


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--reviews", help="review file: JSON lines, plain or .gz")
    source.add_argument("--interactions", help="interaction log instead: CSV with a user,item,timestamp header, or a "
                                               "RecBole .inter file (no explanation.json is written)")
    p.add_argument("--out", default=None, help="dataset dir (default: data/<name of the input file>)")
    p.add_argument("--k", type=int, default=5, help="k-core: keep users and items with at least k interactions")
    p.add_argument("--item_ids", choices=["first", "random"], default="first",
                   help="first: order of first appearance, as published; random: seeded permutation")
    p.add_argument("--split", choices=["loo", "random"], default="loo",
                   help="explanation records: loo = by the sequential leave-one-out; random = seeded 8:1:1")
    p.add_argument("--skip_bad", action="store_true", help="skip (and count) bad lines instead of stopping")
    p.add_argument("--keep_variant_copies", action="store_true",
                   help="keep a user's reviews that repeat the same text at the same time on other items "
                        "(by default only the first, by file line, is kept)")
    p.add_argument("--spacy_model", default=None,
                   help="spaCy pipeline name (default: en_core_web_sm, or its PyPI copy)")
    p.add_argument("--seed", type=int, default=2022, help="seed for negatives, random ids and the random split")
    args = p.parse_args(argv)
    if args.k < 3:
        p.error("--k must be at least 3: leave-one-out needs a training, a validation and a test item per user")
    if args.interactions and args.skip_bad:
        p.error("--skip_bad applies to --reviews only: a bad row of --interactions always stops the run")
    if args.out is None:
        args.out = str(Path(__file__).resolve().parent / dataset_name(args.reviews or args.interactions))
    return args


def dataset_name(path):
    """All_Beauty_5.json.gz -> all_beauty; reviews_Beauty_5.json -> beauty."""
    name = Path(path).name.split(".")[0]
    name = name.removeprefix("reviews_").removesuffix("_5")
    return name.lower()


# ----------------------------------------------------------------------------- reading


def read_lines(path):
    """(line number, raw bytes) for every line of a plain or gzip file."""
    with open(path, "rb") as f:
        gzipped = f.read(2) == b"\x1f\x8b"
    opener = gzip.open if gzipped else open
    with opener(path, "rb") as f:
        yield from enumerate(f, 1)


def parse_review(raw):
    """-> (review dict, None) or (None, kind of bad line)."""
    try:
        review = json.loads(raw)
    except ValueError:  # also UnicodeDecodeError
        try:
            review = ast.literal_eval(raw.decode("utf-8").strip())  # 2014 dumps: Python dict literals
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            return None, "not_json"
    if not isinstance(review, dict):
        return None, "not_json"
    user, item = review.get("reviewerID"), review.get("asin")
    if not (isinstance(user, str) and user.strip() and isinstance(item, str) and item.strip()):
        return None, "missing_id"
    text = review.get("reviewText")
    if not isinstance(text, str):
        return None, "missing_text"
    if not text.strip():
        return None, "empty_review"
    t = review.get("unixReviewTime")
    if isinstance(t, str) and t.strip().isdigit():
        t = int(t)
    if not isinstance(t, (int, float)) or isinstance(t, bool):
        return None, "missing_time"
    review["unixReviewTime"] = int(t)
    return review, None


def copy_key(review):
    """64-bit hash of (user, time, normalized text): equal for a review and its copies onto other variants."""
    text = " ".join(review["reviewText"].split()).casefold()
    data = f"{review['reviewerID']}\0{review['unixReviewTime']}\0{text}".encode()
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def keep_earliest(first, user_first_line, user, item, when):
    """Record one interaction at `when` = (time, line): a (user, item) pair keeps its earliest; True for a repeat."""
    repeat = (user, item) in first
    first[user, item] = min(first[user, item], when) if repeat else when
    user_first_line.setdefault(user, when[1])
    return repeat


def scan(path, keep_variant_copies=False):
    """Pass 1: earliest (time, line) of each (user, item), first line of each user, bad lines, counts."""
    first = {}             # (user, item) -> (time, line)
    user_first_line = {}   # user -> line of their first valid review
    kept_copy = {}         # copy_key -> item of the first review with that user, time and text
    bad = defaultdict(list)
    lines = reviews = duplicates = variant_copies = 0
    for lineno, raw in progress_bar(read_lines(path), desc="scan", unit=" lines"):
        lines = lineno
        if not raw.strip():
            continue
        review, kind = parse_review(raw)
        if kind:
            bad[kind].append(lineno)
            continue
        reviews += 1
        user, item = sys.intern(review["reviewerID"]), sys.intern(review["asin"])
        if not keep_variant_copies:
            original = kept_copy.setdefault(copy_key(review), item)
            if original != item:
                variant_copies += 1  # the same review again, on another variant: dropped
                continue
        duplicates += keep_earliest(first, user_first_line, user, item, (review["unixReviewTime"], lineno))
    counts = {"lines": lines, "valid_reviews": reviews, "duplicate_pairs": duplicates, "variant_copies": variant_copies}
    return first, user_first_line, dict(bad), counts


def scan_interactions(path):
    """Pass 1 for an interaction log: what `scan` returns for reviews, less the bad lines (a bad row is an error)."""
    first, user_first_line = {}, {}
    rows = duplicates = 0
    for lineno, user, item, t in read_interactions(path):
        rows += 1
        duplicates += keep_earliest(first, user_first_line, sys.intern(user), sys.intern(item), (t, lineno))
    if not first:
        raise DataError(f"{path}: no interactions (only a header)")
    return first, user_first_line, {"rows": rows, "duplicate_pairs": duplicates}


def bad_report(path, bad):
    parts = [f"{kind}: {len(bad[kind])} (line{'s' if len(bad[kind]) > 1 else ''} "
             f"{', '.join(map(str, bad[kind][:SHOW_LINES]))}{', ...' if len(bad[kind]) > SHOW_LINES else ''})"
             for kind in BAD_KINDS if kind in bad]
    return f"{path}: {sum(map(len, bad.values()))} bad lines — " + "; ".join(parts)


# ----------------------------------------------------------------------------- filtering and ids


def k_core(pairs, k):
    """Iterated k-core of a set of (user, item) pairs -> (kept pairs, iterations)."""
    pairs = set(pairs)
    for iteration in range(1, 10**9):
        users = Counter(u for u, _ in pairs)
        items = Counter(i for _, i in pairs)
        kept = {(u, i) for u, i in pairs if users[u] >= k and items[i] >= k}
        if len(kept) == len(pairs):
            return kept, iteration
        pairs = kept


def core_and_number(path, first, user_first_line, args):
    """k-core, then ids -> (counts before the k-core, k-core passes, user2id, item2id, sequences)."""
    before = {"users": len(user_first_line), "items": len({item for _, item in first}), "interactions": len(first)}
    kept, iterations = k_core(first, args.k)
    if not kept:
        raise DataError(f"{path}: nothing is left after the {args.k}-core filter ({len(first)} user-item pairs, "
                        f"{len(user_first_line)} users before it); try a smaller --k")
    return before, iterations, *number(first, kept, user_first_line, args.item_ids, args.seed)


def number(first, kept, user_first_line, item_ids, seed):
    """-> (user2id, item2id, sequences {uid: [(time, line, item id)]} in time order)."""
    by_user = defaultdict(list)
    for user, item in kept:
        by_user[user].append((*first[user, item], item))
    users = sorted(by_user, key=user_first_line.__getitem__)
    user2id = {user: uid for uid, user in enumerate(users, 1)}
    item2id, sequences = {}, {}
    for user in users:
        events = sorted(by_user[user])  # time, then file line: deterministic ties
        for _, _, item in events:
            item2id.setdefault(item, len(item2id) + 1)
        sequences[user2id[user]] = [(t, line, item2id[item]) for t, line, item in events]
    if item_ids == "random":
        perm = random_item_permutation(len(item2id), seed)
        item2id = {item: perm[iid] for item, iid in item2id.items()}
        sequences = {u: [(t, line, perm[iid]) for t, line, iid in s] for u, s in sequences.items()}
    return user2id, item2id, sequences


# ----------------------------------------------------------------------------- the dataset files


def write_dataset(out, user2id, item2id, sequences, seed, log=print):
    """sequential.txt, datamaps.json and negative.txt (when the catalogue allows 99 per user) -> a note on the
    negatives for the summary."""
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "sequential.txt", "".join(
        " ".join(map(str, [uid] + [iid for _, _, iid in events])) + "\n" for uid, events in sequences.items()))
    id2user = {str(uid): user for user, uid in user2id.items()}
    id2item = {str(iid): item for item, iid in sorted(item2id.items(), key=lambda kv: kv[1])}
    atomic_write_json(out / "datamaps.json", {
        "id2user": id2user, "id2item": id2item,
        "user2id": {user: uid for uid, user in id2user.items()},
        "item2id": {item: iid for iid, item in id2item.items()}})

    item_lists = {uid: [iid for _, _, iid in events] for uid, events in sequences.items()}
    try:
        write_negatives(out / "negative.txt", generate_negatives(item_lists, len(item2id), seed=seed))
        return f"{NUM_NEGATIVES} per user, seed {seed}"
    except DataError as e:  # too few items: leave no stale file behind
        (out / "negative.txt").unlink(missing_ok=True)
        log(f"warning: negative.txt not written: {e}")
        return f"not written: {e}"


# ----------------------------------------------------------------------------- explanation records


def explain(path, wanted, n_lines, selector):
    """Pass 2: {line: record} for the kept reviews whose text has an opinion sentence with a feature.
    `wanted` maps line -> (user id, item id)."""
    cache = OrderedDict()  # digest of review text -> selection, least recently used first
    records, pending = {}, []

    def flush():
        keys = [hashlib.blake2b(review["reviewText"].encode(), digest_size=16).digest() for _, review in pending]
        todo = list(dict.fromkeys(k for k in keys if k not in cache))
        texts = {k: review["reviewText"] for k, (_, review) in zip(keys, pending)}
        for k, picked in zip(todo, selector.select([texts[k] for k in todo])):
            cache[k] = picked
        for k, (lineno, review) in zip(keys, pending):
            cache.move_to_end(k)
            if cache[k] is not None:
                sentence, feature, _ = cache[k]
                user, item = wanted[lineno]
                summary = review.get("summary")
                rating = review.get("overall")
                records[lineno] = {"user": user, "item": item, "explanation": sentence, "feature": feature,
                                   "summary": summary.strip() if isinstance(summary, str) else "",
                                   "rating": float(rating) if isinstance(rating, (int, float)) else None}
        while len(cache) > CACHE_SIZE:
            cache.popitem(last=False)
        pending.clear()

    for lineno, raw in progress_bar(read_lines(path), desc="explain", unit=" lines", total=n_lines):
        if lineno in wanted:
            review, _ = parse_review(raw)
            pending.append((lineno, review))
            if len(pending) >= CHUNK:
                flush()
    flush()
    return records


def split_records(records, sequences, how, seed):
    """{line: record} -> {"train", "val", "test"}, each sorted by user then time."""
    where = {}  # line -> (user id, position in sequence, split by leave-one-out)
    for uid, events in sequences.items():
        for pos, (_, line, _) in enumerate(events):
            where[line] = (uid, pos, "test" if pos == len(events) - 1 else "val" if pos == len(events) - 2 else "train")
    lines = sorted(records, key=lambda line: where[line][:2])
    if how == "loo":
        split_of = {line: where[line][2] for line in lines}
    else:
        order = np.random.default_rng(seed).permutation(len(lines))
        n_train, n_val = int(0.8 * len(lines)), int(0.1 * len(lines))
        split_of = {lines[j]: "train" if r < n_train else "val" if r < n_train + n_val else "test"
                    for r, j in enumerate(order.tolist())}
    splits = {"train": [], "val": [], "test": []}
    for line in lines:
        splits[split_of[line]].append(records[line])
    return splits


# ----------------------------------------------------------------------------- main


def prepare(args, selector=None, log=print):
    """Run every step; returns the summary. `selector` (a data.features.FeatureSelector) may be passed to reuse one."""
    if args.interactions:
        return prepare_interactions(args, log)
    start = time.time()
    path, out = Path(args.reviews), Path(args.out)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    first, user_first_line, bad, counts = scan(path, args.keep_variant_copies)
    if bad and not args.skip_bad:
        raise DataError(bad_report(path, bad) + ". Fix the file, or pass --skip_bad to skip these lines.")
    if bad:
        log(bad_report(path, bad) + " (skipped: --skip_bad)")
    if not first:
        raise DataError(f"{path}: no valid reviews")
    before, iterations, user2id, item2id, sequences = core_and_number(path, first, user_first_line, args)
    del first, user_first_line
    negatives = write_dataset(out, user2id, item2id, sequences, args.seed, log)

    wanted = {line: (uid, iid) for uid, events in sequences.items() for _, line, iid in events}
    if selector is None:
        from data.features import FeatureSelector  # slow import (spaCy): only once the input passed the checks
        selector = FeatureSelector(args.spacy_model)
    records = explain(path, wanted, counts["lines"], selector)
    splits = split_records(records, sequences, args.split, args.seed)
    atomic_write_json(out / "explanation.json", splits)

    summary = {
        "input": {"path": str(path), "sha256": file_sha256(path)},
        "config": {k: v for k, v in vars(args).items() if k not in ("reviews", "interactions", "out")}
        | {"spacy_model": selector.model_name},
        "lines": counts["lines"],
        "valid_reviews": counts["valid_reviews"],
        "variant_copies_dropped": counts["variant_copies"],
        "duplicate_user_item_reviews": counts["duplicate_pairs"],
        "bad_lines": {kind: {"count": len(bad[kind]), "first_lines": bad[kind][:SHOW_LINES]}
                      for kind in BAD_KINDS if kind in bad},
        "before_k_core": before,
        "k_core": {"k": args.k, "iterations": iterations},
        "users": len(user2id),
        "items": len(item2id),
        "interactions": len(wanted),
        "negatives": negatives,
        "records": {split: len(recs) for split, recs in splits.items()},
        "reviews_without_record": len(wanted) - len(records),
        "run": {"seconds": round(time.time() - start, 1),
                "max_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)},
    }
    atomic_write_json(out / "prepare_summary.json", summary)
    return summary


def prepare_interactions(args, log=print):
    """--interactions: the dataset files from an interaction log (no text, so no explanation.json); the summary."""
    start = time.time()
    path, out = Path(args.interactions), Path(args.out)
    first, user_first_line, counts = scan_interactions(path)
    before, iterations, user2id, item2id, sequences = core_and_number(path, first, user_first_line, args)
    negatives = write_dataset(out, user2id, item2id, sequences, args.seed, log)
    summary = {
        "input": {"path": str(path), "sha256": file_sha256(path)},
        "config": {k: getattr(args, k) for k in ("k", "item_ids", "seed")},
        "rows": counts["rows"],
        "duplicate_user_item_rows": counts["duplicate_pairs"],
        "before_k_core": before,
        "k_core": {"k": args.k, "iterations": iterations},
        "users": len(user2id),
        "items": len(item2id),
        "interactions": sum(map(len, sequences.values())),
        "negatives": negatives,
        "run": {"seconds": round(time.time() - start, 1)},
    }
    atomic_write_json(out / "prepare_summary.json", summary)
    return summary


def main(argv=None):
    args = parse_args(argv)
    summary = prepare(args)
    if args.interactions:
        print(f"{args.interactions} -> {args.out}\n"
              f"  rows {summary['rows']}, repeated user-item rows {summary['duplicate_user_item_rows']}\n"
              f"  {args.k}-core ({summary['k_core']['iterations']} passes): users {summary['users']}, "
              f"items {summary['items']}, interactions {summary['interactions']}\n"
              f"  negatives: {summary['negatives']}")
        return
    bad = summary["bad_lines"]
    print(f"{args.reviews} -> {args.out}\n"
          f"  lines {summary['lines']}, valid reviews {summary['valid_reviews']}, "
          f"variant copies dropped {summary['variant_copies_dropped']}"
          + (" (--keep_variant_copies)" if args.keep_variant_copies else "") + ", "
          f"repeated user-item reviews {summary['duplicate_user_item_reviews']}, "
          f"skipped bad lines {sum(b['count'] for b in bad.values())}"
          + (" (" + ", ".join(f"{k} {b['count']}" for k, b in bad.items()) + ")" if bad else "") + "\n"
          f"  {args.k}-core ({summary['k_core']['iterations']} passes): users {summary['users']}, "
          f"items {summary['items']}, interactions {summary['interactions']}\n"
          f"  explanation records: train {summary['records']['train']}, val {summary['records']['val']}, "
          f"test {summary['records']['test']} (reviews without one: {summary['reviews_without_record']})\n"
          f"  negatives: {summary['negatives']}\n"
          f"  {summary['run']['seconds']} s, max RSS {summary['run']['max_rss_mb']} MB")


if __name__ == "__main__":
    report_user_errors()
    main()
