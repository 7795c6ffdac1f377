"""One text per item, for the models that read items as text: the T5's semantic item codes (item_codes.py) and the
HSFT item LLM (hllm/) both read item texts here, and neither family imports the other.

Item text, best first (`--item_text auto` picks the first that exists):
  meta       title / brand / tag / description from an item metadata file: Amazon meta_*.json(.gz) lines keyed by
             asin, or PixelRec information/<name>.csv (item_id,title,tag,description);
  titles     item_titles.json in the dataset dir ({item id: product title}, as ../shared/data/p5/{dataset}/ has);
             items it names no title for take their review text (summary) where they have one;
  rationale  the distilled item_attribution + item_audience of the item's reviews (explanation_rationale.json);
  summary    the item's review summaries: review_summary, else the raw `summary` field, else the review sentence.
Review-based text only uses reviews of training interactions: a user's validation and test reviews would leak the
answer into the item's text. Items left without text get their raw id as text (counted and reported).
"""
import ast
import csv
import gzip
import json
from collections import defaultdict
from pathlib import Path

from dataset import DataError, load_explanations, read_json
from utils import UserError

TEXT_SOURCES = ("auto", "meta", "titles", "rationale", "summary")
TITLES_FILE = "item_titles.json"
MAX_TEXT_CHARS = 2000  # item text is cut to a few hundred tokens later anyway


def _clean(value):
    if isinstance(value, list):
        value = " ".join(str(v) for v in value if v)
    return " ".join(str(value or "").split())


def _meta_text(fields):
    parts = [f"{label}: {_clean(fields.get(key))}." for key, label in
             (("title", "Title"), ("brand", "Brand"), ("tag", "Tag"), ("description", "Description"))
             if _clean(fields.get(key))]
    return " ".join(parts)[:MAX_TEXT_CHARS]


def read_item_meta(path):
    """{raw item key: text} from Amazon meta lines (JSON, or the 2014 dumps' Python literals) or a PixelRec
    information CSV."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file not found")
    texts = {}
    if path.suffix == ".csv":
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            if "item_id" not in (reader.fieldnames or []):
                raise DataError(f"{path}:1: header lacks item_id (expected item_id,title,tag,description)")
            for row in reader:
                texts[row["item_id"].strip()] = _meta_text(row)
        return texts
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                try:
                    record = ast.literal_eval(line)
                except (ValueError, SyntaxError):
                    raise DataError(f"{path}:{lineno}: neither JSON nor a Python literal") from None
            if "asin" not in record:
                raise DataError(f"{path}:{lineno}: no 'asin' field")
            texts[record["asin"]] = _meta_text(record)
    return texts


def _review_records(ds):
    """Review records of training interactions only, from explanation_rationale.json or explanation.json."""
    for name in ("explanation_rationale.json", "explanation.json"):
        path = Path(ds.data_dir) / name
        if path.exists():
            break
    else:
        return None, []
    held_out = {(u, ds.val_item(u)) for u in ds.sequences} | {(u, ds.test_item(u)) for u in ds.sequences}
    records = []
    for split in load_explanations(path, required=("user", "item")).values():
        for rec in split:
            try:
                key = (int(rec["user"]), int(rec["item"]))
            except (TypeError, ValueError):
                raise DataError(f"{path}: record {rec!r:.80} has a non-integer user or item") from None
            if key not in held_out:
                records.append(rec)
    return path, records


def _texts_from_reviews(records, fields):
    """Per item, its distinct review strings (first available field of `fields`, in order), joined."""
    per_item = defaultdict(dict)  # dict as an ordered set
    for rec in records:
        for group in fields:
            values = [_clean(rec.get(f)) for f in group if _clean(rec.get(f))]
            if values:
                for v in values:
                    per_item[int(rec["item"])][v] = None
                break
    return {item: " ".join(v)[:MAX_TEXT_CHARS] for item, v in per_item.items()}


RATIONALE_FIELDS = [("item_attribution", "item_audience")]
SUMMARY_FIELDS = [("review_summary",), ("summary",), ("explanation",)]


def read_titles(path, id2item):
    """item_titles.json -> {item id: title}; every key must be an item of datamaps.json, every title a non-empty
    string (the error names the file and the first bad id)."""
    titles = read_json(path)
    if not isinstance(titles, dict):
        raise DataError(f"{path}: expected a JSON object {{item id: title}}")
    out = {}
    for key, title in titles.items():
        try:
            item = int(key)
        except ValueError:
            raise DataError(f"{path}: item id {key!r} is not an integer") from None
        if item not in id2item:
            raise DataError(f"{path}: item {key} is not in datamaps.json (does the file belong to this dataset?)")
        if not isinstance(title, str) or not title.strip():
            raise DataError(f"{path}: item {key} has no title (expected a non-empty string)")
        out[item] = _clean(title)[:MAX_TEXT_CHARS]
    return out


def item_texts(ds, source="auto", item_meta=None, log=print):
    """{item id: text} for items 1..num_items, the source used, and how many items fell back to their raw id."""
    if source not in TEXT_SOURCES:
        raise UserError(f"--item_text must be one of {TEXT_SOURCES}, got {source!r}")
    if item_meta is None and getattr(ds, "kind", "p5") == "pixelrec":
        guess = Path(ds.data_dir) / "information" / f"{ds.name}.csv"
        item_meta = guess if guess.exists() else None
    texts = {}
    if source == "meta" or (source == "auto" and item_meta):
        if not item_meta:
            raise DataError("--item_text meta needs --item_meta FILE (Amazon meta_*.json(.gz) or PixelRec "
                            "information/<name>.csv)")
        by_key = read_item_meta(item_meta)
        texts = {i: by_key[str(raw)] for i, raw in ds.id2item.items() if by_key.get(str(raw))}
        source = "meta"
    elif source == "titles" or (source == "auto" and (Path(ds.data_dir) / TITLES_FILE).exists()):
        if getattr(ds, "item_map", None) is not None:
            raise ValueError("item titles are keyed by the dataset's own item ids: read them before renumbering")
        texts = read_titles(Path(ds.data_dir) / TITLES_FILE, ds.id2item)
        untitled = len([i for i in range(1, ds.num_items + 1) if i not in texts])
        reviews = _texts_from_reviews(_review_records(ds)[1], SUMMARY_FIELDS) if untitled else {}
        filled = {i: t for i, t in reviews.items() if i not in texts}
        texts.update(filled)
        if untitled:
            log(f"item text (titles): {untitled} of {ds.num_items} items have no title; {len(filled)} of them take "
                "their review text")
        source = "titles"
    else:
        path, records = _review_records(ds)
        if source in ("rationale", "auto"):
            texts = _texts_from_reviews(records, RATIONALE_FIELDS)
            if texts or source == "rationale":
                if not texts:
                    raise DataError(f"--item_text rationale: no item_attribution/item_audience in "
                                    f"{path or Path(ds.data_dir) / 'explanation_rationale.json'}")
                source = "rationale"
        if not texts:
            texts = _texts_from_reviews(records, SUMMARY_FIELDS)
            source = "summary"
            if not texts:
                log(f"no review text in {ds.data_dir} (explanation_rationale.json / explanation.json): "
                    "every item falls back to its raw id")
    fallback = [i for i in range(1, ds.num_items + 1) if i not in texts]
    for i in fallback:
        texts[i] = f"Item {ds.id2item.get(i, i)}."
    if fallback:
        log(f"item text ({source}): {len(fallback)} of {ds.num_items} items have none; using their raw id")
    return texts, source, len(fallback)
