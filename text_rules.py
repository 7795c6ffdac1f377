"""Reference rules for generated text (explanations, review summaries): retrieval from the training records, no
model, so that a text figure can be judged beside what copying an earlier text scores (as explanation generators are
compared with retrieval baselines). Each rule answers a test record with a text of the same field from the training
records:
  item_most_frequent   the most frequent training text of the record's item (the overall rule where it has none)
  user_most_recent     the user's last training text, in file order (the overall rule where the user has none)
  most_frequent        the most frequent training text overall
Ties between equally frequent texts go to the first in file order. Plus how varied a set of texts is: the share of
distinct texts and of texts that are one word repeated (a decoder that loops writes "g g g g ...").
"""
from collections import Counter

RULES = ("item_most_frequent", "user_most_recent", "most_frequent")


def text_rules(ds, field):
    """{rule: record -> text} over the training records' `field`."""
    train = [r for recs in (ds.records or {}).get("train", {}).values() for r in recs if r.get(field)]
    overall = Counter(r[field] for r in train).most_common(1)
    overall = overall[0][0] if overall else ""
    by_item, by_user = {}, {}
    for r in train:
        by_item.setdefault(r["item"], Counter())[r[field]] += 1
        by_user[r["user"]] = r[field]
    return {"item_most_frequent":
            lambda r: by_item[r["item"]].most_common(1)[0][0] if r["item"] in by_item else overall,
            "user_most_recent": lambda r: by_user.get(r["user"], overall),
            "most_frequent": lambda r: overall}


def one_word_repeated(text):
    words = text.split()
    return len(words) >= 2 and len(set(words)) == 1


def variety(texts):
    """Share of distinct texts, of texts that are one word repeated, and of the most frequent text."""
    if not texts:
        return {"distinct": 0.0, "one_word_repeated": 0.0, "most_frequent_share": 0.0}
    counts = Counter(texts)
    return {"distinct": len(counts) / len(texts),
            "one_word_repeated": sum(map(one_word_repeated, texts)) / len(texts),
            "most_frequent_share": counts.most_common(1)[0][1] / len(texts)}


def variety_warning(figures):
    """A loud line when most generated texts are the same text, or one word repeated."""
    if figures["most_frequent_share"] > 0.5 or figures["one_word_repeated"] > 0.5:
        return (f"WARNING: the generated texts barely vary: {figures['distinct']:.1%} distinct, the most frequent one "
                f"is {figures['most_frequent_share']:.1%} of them, {figures['one_word_repeated']:.1%} repeat one word")
    return None
