"""HSFT data: interaction sequences (each item's text is read by ../item_text.py).

Interactions come from a P5-style dataset dir (sequential.txt, datamaps.json optional; what data/prepare.py writes
too), read by dataset.load_dataset without negatives (full ranking uses none, so read-only dirs such as
../shared/data/p5/beauty load as they are), or from the PixelRec layout (ROOT/dataset/<name>.csv with
item_id,user_id,timestamp). Both become a `dataset.Dataset` (items numbered 1..num_items, leave-one-out split), so
the rest of hllm/ sees one type.
"""
from collections import defaultdict
from pathlib import Path

from dataset import Dataset, DataError, load_dataset, read_interactions
from utils import file_sha256

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def load_pixelrec(root, name, log=print):
    """PixelRec: ROOT/dataset/<name>.csv (item_id,user_id,timestamp). Items are numbered 1..N in order of first
    appearance; users with fewer than 3 interactions can't be split leave-one-out and are dropped (counted)."""
    path = Path(root) / "dataset" / f"{name}.csv"
    if not path.exists():
        raise DataError(f"{path}: file not found (PixelRec layout: ROOT/dataset/<name>.csv)")
    events = defaultdict(list)
    for lineno, user, item, ts in read_interactions(path):
        events[user].append((ts, lineno, item))
    if not events:
        raise DataError(f"{path}: no interactions")
    item2id, sequences, id2user, dropped = {}, {}, {}, 0
    for user, evs in events.items():
        evs.sort()  # time order; file order breaks ties
        if len(evs) < 3:
            dropped += 1
            continue
        uid = len(sequences) + 1
        id2user[uid] = user
        sequences[uid] = [item2id.setdefault(item, len(item2id) + 1) for _, _, item in evs]
    if dropped:
        log(f"{path}: dropped {dropped} users with fewer than 3 interactions")
    if not sequences:
        raise DataError(f"{path}: no user has 3 or more interactions")
    id2item = {i: raw for raw, i in item2id.items()}
    return Dataset(path.parent.parent, sequences, len(id2item), {}, id2user, id2item,
                   hashes={path.name: file_sha256(path)})


def resolve_dataset(dataset=None, data_dir=None):
    """(kind, location, name) from the seed's --dataset NAME_OR_DIR and an optional --data_dir.
    kind 'p5': a dir with sequential.txt; kind 'pixelrec': a root with dataset/<name>.csv."""
    candidates = []
    if data_dir:
        candidates.append(Path(data_dir))
    if dataset and Path(dataset).is_dir():
        candidates.append(Path(dataset))
    elif dataset:
        candidates += [Path("data") / dataset, SHARED_DATA / "p5" / dataset, Path(".")]  # ".": the seed's PixelRec root
    name = Path(dataset).name if dataset else None
    for where in candidates:
        if (where / "sequential.txt").exists():
            return "p5", where, name or where.name
        if name and (where / "dataset" / f"{name}.csv").exists():
            return "pixelrec", where, name
    if data_dir and not dataset:
        raise DataError(f"{Path(data_dir) / 'sequential.txt'}: file not found (--data_dir names no dataset)")
    raise DataError(f"dataset {dataset!r} not found: looked for sequential.txt or dataset/{name}.csv in "
                    f"{', '.join(map(str, candidates)) or 'nowhere (give --dataset or --data_dir)'}")


def load_interactions(dataset=None, data_dir=None, log=print):
    kind, where, name = resolve_dataset(dataset, data_dir)
    ds = load_dataset(where, log=log, negatives=False) if kind == "p5" else load_pixelrec(where, name, log)
    ds.kind, ds.name = kind, name
    return ds
