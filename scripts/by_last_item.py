"""Where a model loses: test NDCG@10 of each results file (and of the rules in the first) by how often the user's
last history item occurs in the training parts. The test's last history item is the validation item, never seen by
the model as an input for that user; when it is rare, its embedding has had few updates.

    python scripts/by_last_item.py --data_dir data/beauty checkpoint/beauty_learn/results_seq.json \
        checkpoint/sasrec/beauty_b256/results_seq.json
"""
import argparse
import collections
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from compare import distinct_names  # noqa: E402
from dataset import load_dataset  # noqa: E402
from repeat import per_user  # noqa: E402
from results import read_results  # noqa: E402
from utils import report_user_errors  # noqa: E402

BINS = ((0, 1), (1, 5), (5, 20), (20, None))
RULES = ("co_occurrence", "ease")


def by_count(ds, figures, bins=BINS):
    """{bin label: (users, mean figure)} with users binned by the training count of their test history's last item."""
    count = collections.Counter(i for seq in ds.sequences.values() for i in seq[:-2])
    last = {u: count[ds.sequences[u][-2]] for u in figures}
    out = {}
    for lo, hi in bins:
        users = [u for u in figures if lo <= last[u] and (hi is None or last[u] < hi)]
        label = f"{lo}+" if hi is None else (f"{lo}" if hi == lo + 1 else f"{lo}-{hi - 1}")
        out[label] = (len(users), float(np.mean([figures[u] for u in users])) if users else float("nan"))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="+", type=Path)
    p.add_argument("--data_dir", required=True, type=Path, help="the dataset the files were evaluated on")
    p.add_argument("--metric", default="NDCG@10")
    args = p.parse_args(argv)
    ds = load_dataset(args.data_dir, log=lambda m: None)
    names = distinct_names([read_results(f) for f in args.files])
    rows = {name: by_count(ds, per_user(f, args.metric)) for name, f in zip(names, args.files)}
    first = read_results(args.files[0])
    rows.update({rule: by_count(ds, per_user(args.files[0], args.metric, rule)) for rule in RULES
                 if rule in first.get("reference_ranks", {})})
    labels = list(next(iter(rows.values())))
    print(f"test {args.metric} by the training count of the last history item (users per bin: "
          + ", ".join(f"{label}: {n}" for label, (n, _) in next(iter(rows.values())).items()) + ")")
    print("| model | " + " | ".join(labels) + " |\n|---|" + "---|" * len(labels))
    for name, row in rows.items():
        print(f"| {name} | " + " | ".join(f"{row[label][1]:.4f}" for label in labels) + " |")
    return rows


if __name__ == "__main__":
    report_user_errors()
    main()
