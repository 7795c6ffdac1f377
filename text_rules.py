"""Reference rules for generated text (explanations, review summaries): retrieval from the training records, no
model, so that a text figure can be judged beside what copying an earlier text scores (as explanation generators are
compared with retrieval baselines). Each rule answers a test record with a text of the same field from the training
records:
  item_most_frequent   the most frequent training text of the record's item (the overall rule where it has none)
  user_most_recent     the user's last training text, in file order (the overall rule where the user has none)
  most_frequent        the most frequent training text overall
Ties between equally frequent texts go to the first in file order. Plus how varied a set of texts is: the share of
distinct texts, of texts that are one word repeated (a decoder that loops writes "g g g g ..."), and of texts that
loop anywhere: a word three times in a row ("a a a"), or a word piece of one to three letters four times in a row
inside a word (a sub-word decoder loops as "andndndnd", which is one word and no word repeated).
The same retrieval (`retrieved_texts`) is what --text_context shows the model in its prompt (tasks.py).
"""
import re
from collections import Counter

RULES = ("item_most_frequent", "user_most_recent", "most_frequent")
_BY_ITEM = {}       # id(training records) -> (those records, {item: [record]}): built once per dataset


def train_records_by_item(ds):
    train = (ds.records or {}).get("train", {})
    if id(train) not in _BY_ITEM:
        by_item = {}
        for recs in train.values():
            for r in recs:
                by_item.setdefault(r["item"], []).append(r)
        _BY_ITEM[id(train)] = (train, by_item)      # holding `train` keeps its id from being reused
    return _BY_ITEM[id(train)][1]


def retrieved_texts(ds, record, text, sources=("user", "item"), training=False):
    """{source: text} from the training records, for each source that has one: "user", the user's last text in file
    order; "item", the item's most frequent text (ties: the first in file order). text(r): a record's text, or None.
    training: `record` is a training record, left out: the user's text just before it (just after it for the user's
    first), the item's most frequent among its other records."""
    out = {}
    if "user" in sources:
        mine = (ds.records or {}).get("train", {}).get(record["user"], [])
        at = next((i for i, r in enumerate(mine) if r is record), None) if training else None
        if at is None:
            pick = [r for r in mine if text(r)][-1:]
        else:
            pick = [r for r in mine[:at] if text(r)][-1:] or [r for r in mine[at + 1:] if text(r)][:1]
        if pick:
            out["user"] = text(pick[0])
    if "item" in sources:
        counts = Counter(t for t in (text(r) for r in train_records_by_item(ds).get(record["item"], ())
                                     if r is not record) if t)
        if counts:
            out["item"] = counts.most_common(1)[0][0]
    return out


def text_rules(ds, field):
    """{rule: record -> text} over the training records' `field`; where the user or the item has no training text,
    the most frequent overall."""
    def text(r):
        return r.get(field) or None
    train = [r for recs in (ds.records or {}).get("train", {}).values() for r in recs if text(r)]
    overall = Counter(r[field] for r in train).most_common(1)
    overall = overall[0][0] if overall else ""
    return {"item_most_frequent": lambda r: retrieved_texts(ds, r, text, ("item",)).get("item", overall),
            "user_most_recent": lambda r: retrieved_texts(ds, r, text, ("user",)).get("user", overall),
            "most_frequent": lambda r: overall}


def one_word_repeated(text):
    words = text.split()
    return len(words) >= 2 and len(set(words)) == 1


LOOP = re.compile(r"\b(\w+)(?:\W+\1\b){2,}|([a-z]{1,3})\2{3,}")


def loops(text):
    return LOOP.search(text.lower()) is not None


def variety(texts):
    """Share of distinct texts, of texts that are one word repeated, of texts that loop, and of the most frequent
    text."""
    if not texts:
        return {"distinct": 0.0, "one_word_repeated": 0.0, "loops": 0.0, "most_frequent_share": 0.0}
    counts = Counter(texts)
    return {"distinct": len(counts) / len(texts),
            "one_word_repeated": sum(map(one_word_repeated, texts)) / len(texts),
            "loops": sum(map(loops, texts)) / len(texts),
            "most_frequent_share": counts.most_common(1)[0][1] / len(texts)}


def variety_warning(figures):
    """A loud line when most generated texts are the same text, one word repeated, or loop."""
    if figures["most_frequent_share"] > 0.5 or figures["one_word_repeated"] > 0.5 or figures["loops"] > 0.5:
        return (f"WARNING: the generated texts barely vary: {figures['distinct']:.1%} distinct, the most frequent one "
                f"is {figures['most_frequent_share']:.1%} of them, {figures['one_word_repeated']:.1%} repeat one word, "
                f"{figures['loops']:.1%} loop")
    return None
