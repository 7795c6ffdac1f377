"""Loading and validating a P5-style dataset dir, and reading interaction logs (CSV / RecBole .inter).

A dataset dir needs only sequential.txt. datamaps.json (our ids -> original ids) is optional: without it ids stand
for themselves. negative.txt is read (or drawn and written once) only for top-N evaluation. explanation.json or
explanation_rationale.json, when present, hold the review records.

Leave-one-out split: for a user's sequence s, s[-1] is the test item, s[-2] the validation item, s[:-2] training.
"""
import csv
import gzip
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from utils import UserError, atomic_write_text, file_sha256

NUM_NEGATIVES = 99


class DataError(UserError, ValueError):
    """A problem in a user's data file; the message names the file and line."""


def _where(path, lineno):
    return f"{path}:{lineno}" if lineno else str(path)


def id_lines(path):
    """(line number, [int, ...]) for every non-blank line of a whitespace-separated id file."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file not found")
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                fields = raw.decode("utf-8").split()
            except UnicodeDecodeError:
                raise DataError(f"{_where(path, lineno)}: not UTF-8 text") from None
            if not fields:
                continue
            try:
                ids = [int(x) for x in fields]
            except ValueError:
                bad = next(x for x in fields if not x.lstrip("-").isdigit())
                raise DataError(f"{_where(path, lineno)}: non-integer id {bad!r}") from None
            if min(ids) < 1:
                raise DataError(f"{_where(path, lineno)}: ids start at 1, found {min(ids)}")
            yield lineno, ids


def read_json(path):
    """A JSON file, gzipped where the name ends in .gz (the results kept in docs/runs)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file not found")
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
        return json.loads(raw.decode("utf-8"))
    except (gzip.BadGzipFile, EOFError) as e:
        raise DataError(f"{path}: not a gzip file ({e})") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None


def read_yaml(path):
    """A YAML mapping (prompts, config overrides); a bad file names its line."""
    import yaml
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise DataError(f"{where}: not valid YAML ({getattr(e, 'problem', None) or e})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a mapping of names to values, found {type(data).__name__}")
    return data


# the columns of an interaction log, and the header names each may go by
INTERACTION_COLUMNS = {"user": ("user", "user_id"), "item": ("item", "item_id"), "timestamp": ("timestamp",)}


def _interaction_columns(where, header):
    """{column: index} from the header row at `where` (FILE:LINE); RecBole's `name:type` suffixes are dropped."""
    names = [h.split(":")[0].strip().lower() for h in header]
    cols = {}
    for column, aliases in INTERACTION_COLUMNS.items():
        found = [n for n in names if n in aliases]
        if not found:
            raise DataError(f"{where}: header has no {' or '.join(map(repr, aliases))} column "
                            f"(expected user,item,timestamp in any order)")
        if len(found) > 1:
            raise DataError(f"{where}: header names the {column} twice ({', '.join(found)})")
        cols[column] = names.index(found[0])
    return cols


def read_interactions(path):
    """(line number, user, item, timestamp) for every row of an interaction log: a CSV file with a header naming
    user, item and timestamp (user_id / item_id also do; any order, other columns ignored), or a RecBole atomic
    .inter file (tab-separated, header like user_id:token). Users and items stay strings; timestamps are floats."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    # .inter files are plain tab-separated text: a quote is part of a value there
    dialect = dict(delimiter="\t", quoting=csv.QUOTE_NONE) if path.suffix == ".inter" else dict(delimiter=",")
    with open(path, "rb") as f:
        rows = csv.reader(_utf8_lines(path, f), **dialect)
        try:
            header = next((row for row in rows if any(x.strip() for x in row)), None)
            if header is None:
                raise DataError(f"{path}: empty file (expected a header row naming user, item and timestamp)")
            cols = _interaction_columns(f"{path}:{rows.line_num}", header)
            for row in rows:
                lineno = rows.line_num
                if not any(x.strip() for x in row):
                    continue
                if len(row) != len(header):
                    raise DataError(f"{path}:{lineno}: {len(row)} columns, the header has {len(header)}")
                user, item, when = (row[cols[c]].strip() for c in ("user", "item", "timestamp"))
                for column, value in (("user", user), ("item", item), ("timestamp", when)):
                    if not value:
                        raise DataError(f"{path}:{lineno}: empty {column}")
                try:
                    ts = float(when)
                except ValueError:
                    ts = math.nan
                if not math.isfinite(ts):  # nan or inf would scramble the time order
                    raise DataError(f"{path}:{lineno}: timestamp {when!r} is not a number")
                yield lineno, user, item, ts
        except csv.Error as e:
            raise DataError(f"{path}:{rows.line_num}: {e}") from None


def _utf8_lines(path, f):
    """Decoded lines of a binary file; a bad byte names its line (a BOM, as spreadsheets write, is dropped)."""
    for lineno, raw in enumerate(f, 1):
        try:
            yield raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
        except UnicodeDecodeError:
            raise DataError(f"{path}:{lineno}: not UTF-8 text") from None


def load_sequences(path, id2user=None, id2item=None):
    """sequential.txt -> {user: [item, ...]} in file order, validated (against datamaps when given)."""
    path = Path(path)
    sequences = {}
    for lineno, ids in id_lines(path):
        user, items = ids[0], ids[1:]
        if user in sequences:
            raise DataError(f"{_where(path, lineno)}: user {user} appears twice")
        if len(items) < 3:
            raise DataError(f"{_where(path, lineno)}: user {user} has {len(items)} items; "
                            "leave-one-out needs at least 3 (train, validation, test)")
        if id2user is not None and user not in id2user:
            raise DataError(f"{_where(path, lineno)}: user {user} is not in datamaps.json")
        if id2item is not None:
            unknown = [i for i in items if i not in id2item]
            if unknown:
                raise DataError(f"{_where(path, lineno)}: item {unknown[0]} is not in datamaps.json")
        sequences[user] = items
    if not sequences:
        raise DataError(f"{path}: no sequences (empty file)")
    return sequences


def load_datamaps(path):
    """datamaps.json -> (id2user, id2item) with int keys; accepts id2* or the older user2id/item2id style."""
    maps = read_json(path)
    out = []
    for kind in ("user", "item"):
        if f"id2{kind}" in maps:
            table = {int(k): v for k, v in maps[f"id2{kind}"].items()}
        elif f"{kind}2id" in maps:
            table = {int(v): k for k, v in maps[f"{kind}2id"].items()}
        else:
            raise DataError(f"{path}: neither 'id2{kind}' nor '{kind}2id' found")
        out.append(table)
    return tuple(out)


def generate_negatives(sequences, num_items, n=NUM_NEGATIVES, seed=2022):
    """n distinct items per user that the user never bought, drawn from 1..num_items; deterministic in seed."""
    rng = np.random.default_rng(seed)
    negatives = {}
    for user in sorted(sequences):
        bought = set(sequences[user])
        if num_items - len(bought) < n:
            raise DataError(f"user {user}: only {num_items - len(bought)} unbought items, cannot draw {n} negatives")
        picked = []
        seen = set()
        while len(picked) < n:
            for x in rng.integers(1, num_items + 1, size=2 * n).tolist():
                if x not in bought and x not in seen:
                    seen.add(x)
                    picked.append(x)
                    if len(picked) == n:
                        break
        negatives[user] = picked
    return negatives


def write_negatives(path, negatives):
    lines = [" ".join(map(str, [user, *negatives[user]])) for user in sorted(negatives)]
    atomic_write_text(path, "\n".join(lines) + "\n")


def negatives_per_user(sequences, num_items):
    """99, or fewer when the catalogue is too small for every user to have 99 unbought items."""
    return min(NUM_NEGATIVES, num_items - max(len(set(s)) for s in sequences.values()))


def load_negatives(path, sequences, num_items, n=None):
    """negative.txt -> {user: [item, ...]}; every line must hold n negatives (default: negatives_per_user)."""
    path = Path(path)
    n = n or negatives_per_user(sequences, num_items)
    negatives = {}
    for lineno, ids in id_lines(path):
        user, negs = ids[0], ids[1:]
        if user not in sequences:
            raise DataError(f"{path}:{lineno}: user {user} is not in sequential.txt")
        if user in negatives:
            raise DataError(f"{path}:{lineno}: user {user} appears twice")
        if len(negs) != n:
            raise DataError(f"{path}:{lineno}: user {user} has {len(negs)} negatives, expected {n}")
        if len(set(negs)) != n:
            repeated = next(x for x in negs if negs.count(x) > 1)
            raise DataError(f"{path}:{lineno}: user {user} has negative {repeated} more than once")
        bad = [x for x in negs if not 1 <= x <= num_items]
        if bad:
            raise DataError(f"{path}:{lineno}: unknown item id {bad[0]} (items are 1..{num_items})")
        bought = set(sequences[user]) & set(negs)
        if bought:
            raise DataError(f"{path}:{lineno}: negative {min(bought)} was bought by user {user}")
        negatives[user] = negs
    missing = set(sequences) - set(negatives)
    if missing:
        raise DataError(f"{path}: no negatives for {len(missing)} users (e.g. user {min(missing)})")
    return negatives


def load_explanations(path, required=("user", "item", "explanation")):
    """explanation.json / explanation_rationale.json -> {split: [record, ...]}; every record must have `required`."""
    data = read_json(path)
    splits = {k: v for k, v in data.items() if k in ("train", "val", "test")}
    if not splits:
        raise DataError(f"{path}: no 'train', 'val' or 'test' list")
    for split, records in splits.items():
        if not isinstance(records, list):
            raise DataError(f"{path}: '{split}' is not a list")
        for i, rec in enumerate(records):
            if not isinstance(rec, dict):
                raise DataError(f"{path}: {split}[{i}] is not an object")
            for key in required:
                if key not in rec or rec[key] is None or rec[key] == "":
                    raise DataError(f"{path}: {split}[{i}] has no '{key}'")
    return splits


def random_item_permutation(num_items, seed):
    """new_id[old_id] for old ids 1..num_items (index 0 unused): a seeded permutation that hides the
    order-of-first-appearance leak of the published ids."""
    rng = np.random.default_rng(seed)
    return [0] + (rng.permutation(num_items) + 1).tolist()


@dataclass
class Dataset:
    """A loaded dataset dir, with items possibly renumbered by `item_map` (new = item_map[old])."""
    data_dir: Path
    sequences: dict            # user -> items in time order
    num_items: int
    negatives: dict            # user -> 99 test negatives
    id2user: dict
    id2item: dict
    item_map: list = None      # None for published ids
    hashes: dict = field(default_factory=dict)
    records: dict = None       # split -> user -> [review record], from explanation(_rationale).json when present
    records_file: str = None

    @property
    def users(self):
        return list(self.sequences)

    def train_items(self, user):
        return self.sequences[user][:-2]

    def val_item(self, user):
        return self.sequences[user][-2]

    def test_item(self, user):
        return self.sequences[user][-1]


def load_dataset(data_dir, negatives_seed=2022, log=print, negatives=True):
    """Load and validate a dataset dir. With negatives=True (top-N evaluation) negative.txt is read; when it is
    missing it is drawn once (seeded) and written beside the data. With negatives=False it is neither read nor
    written, so read-only dirs load as they are."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"{data_dir}: no such dataset folder (it needs sequential.txt)")
    seq_path, maps_path, neg_path = data_dir / "sequential.txt", data_dir / "datamaps.json", data_dir / "negative.txt"
    if maps_path.exists():
        id2user, id2item = load_datamaps(maps_path)
        sequences = load_sequences(seq_path, id2user, id2item)
        num_items = max(id2item)
    else:  # no datamaps: ids stand for themselves
        sequences = load_sequences(seq_path)
        num_items = max(i for s in sequences.values() for i in s)
        id2user, id2item = {u: str(u) for u in sequences}, {i: str(i) for i in range(1, num_items + 1)}
    hashes = {p.name: file_sha256(p) for p in (seq_path, maps_path) if p.exists()}
    test_negatives = {}
    if negatives:
        test_negatives = read_or_draw_negatives(neg_path, sequences, num_items, negatives_seed, log)
        hashes[neg_path.name] = file_sha256(neg_path)
    records, records_path = None, None
    for name in TEXT_FILES:
        if (data_dir / name).exists():
            records_path = data_dir / name
            records = group_records(load_explanations(records_path), sequences, num_items, records_path)
            hashes[name] = file_sha256(records_path)
            break
    return Dataset(data_dir, sequences, num_items, test_negatives, id2user, id2item, None, hashes, records,
                   records_path and records_path.name)


def read_or_draw_negatives(path, sequences, num_items, seed, log=print):
    """negative.txt, drawn (seeded) and written first when it is missing."""
    if not path.exists():
        # a small catalogue cannot give every user 99 unbought items: then all users get as many as the worst-off can
        n = negatives_per_user(sequences, num_items)
        if n < 1:
            raise DataError(f"{path.parent}: some user bought every item; no negatives can be drawn")
        log(f"{path} is missing: drawing {n} negatives per user with seed {seed} "
            "and writing it (it will be reused from now on)")
        if n < NUM_NEGATIVES:
            log(f"warning: only {num_items} items, so top-N ranks among {n + 1} candidates, not the paper's 100")
        write_negatives(path, generate_negatives(sequences, num_items, n=n, seed=seed))
    return load_negatives(path, sequences, num_items)


# the distilled file wins over the plain one: it holds the same records plus the LLM's rationales
TEXT_FILES = ("explanation_rationale.json", "explanation.json")


def group_records(splits, sequences, num_items, path):
    """{split: [record]} -> {split: {user: [record]}}, checking every user and item id."""
    grouped = {}
    for split, recs in splits.items():
        by_user = grouped.setdefault(split, {})
        for i, rec in enumerate(recs):
            try:
                user, item = int(rec["user"]), int(rec["item"])
            except (TypeError, ValueError):
                raise DataError(f"{path}: {split}[{i}] has a non-integer user or item id") from None
            if user not in sequences:
                raise DataError(f"{path}: {split}[{i}]: user {user} is not in sequential.txt")
            if not 1 <= item <= num_items:
                raise DataError(f"{path}: {split}[{i}]: item {item} is not in datamaps.json")
            by_user.setdefault(user, []).append({**rec, "user": user, "item": item})
    return grouped


def renumber_items(ds, item_map):
    """The same dataset with item ids renumbered: new id = item_map[old id]."""
    if item_map is None:
        return ds
    if len(item_map) != ds.num_items + 1 or sorted(item_map[1:]) != list(range(1, ds.num_items + 1)):
        raise DataError(f"the item id map does not fit {ds.data_dir}: it must permute 1..{ds.num_items}")
    sequences = {u: [item_map[i] for i in s] for u, s in ds.sequences.items()}
    negatives = {u: [item_map[i] for i in s] for u, s in ds.negatives.items()}
    id2item = {item_map[i]: asin for i, asin in ds.id2item.items()}
    records = ds.records and {split: {u: [{**r, "item": item_map[r["item"]]} for r in recs] for u, recs in by_user.items()}
                              for split, by_user in ds.records.items()}
    return Dataset(ds.data_dir, sequences, ds.num_items, negatives, ds.id2user, id2item, item_map, ds.hashes,
                   records, ds.records_file)


if __name__ == "__main__":  # quick summary: python dataset.py DATA_DIR
    from utils import report_user_errors
    report_user_errors()
    ds = load_dataset(sys.argv[1])
    lengths = [len(s) for s in ds.sequences.values()]
    print(f"{len(ds.sequences)} users, {ds.num_items} items, {sum(lengths)} interactions, "
          f"mean length {np.mean(lengths):.2f}")
