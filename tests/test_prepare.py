"""data/prepare.py and data/features.py on small slices of the real Amazon 2018 dumps."""
import gzip
import json
import os
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from data.features import FeatureSelector
from data.prepare import k_core, parse_args, prepare, split_records
from dataset import DataError, load_dataset, load_explanations, read_interactions

ROOT = Path(__file__).resolve().parents[1]
AMAZON = ROOT.parent / "shared" / "data" / "amazon2018"
GIFT_CARDS = AMAZON / "Gift_Cards_5.json.gz"  # 83 items after 5-core and dropping variant copies (147 with them)


@pytest.fixture(scope="module")
def selector():
    return FeatureSelector()


def real_lines(n=None):
    with gzip.open(GIFT_CARDS, "rt", encoding="utf-8") as f:
        lines = f.read().splitlines()
    return lines[:n]


def write(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def run(selector, reviews, out, *flags):
    args = parse_args(["--reviews", str(reviews), "--out", str(out), *flags])
    return prepare(args, selector=selector, log=lambda *a: None)


def read_out(out):
    names = ("sequential.txt", "datamaps.json", "negative.txt", "explanation.json")
    return {name: (out / name).read_bytes() for name in names if (out / name).exists()}


@pytest.fixture(scope="module")
def full(selector, tmp_path_factory):
    """The whole Gift_Cards dump (6 lines have no reviewText), default settings (variant copies dropped)."""
    out = tmp_path_factory.mktemp("gift_cards")
    summary = run(selector, GIFT_CARDS, out, "--skip_bad")
    return out, summary


def kept_reviews(reviews):
    """Reference for the variant-copy rule, on the full text: of a user's reviews with the same time and the same
    text (whitespace collapsed, case folded), the first in the file; -> (kept reviews, copies on another item)."""
    first_item, kept, copies = {}, [], 0
    for r in reviews:
        if not isinstance(r.get("reviewText"), str) or not r["reviewText"].strip():
            continue
        key = (r["reviewerID"], r["unixReviewTime"], " ".join(r["reviewText"].split()).casefold())
        item = first_item.setdefault(key, r["asin"])
        if item != r["asin"]:
            copies += 1
            continue
        kept.append(r)
    return kept, copies


# ----------------------------------------------------------------------------- k-core, ids, loading


def test_k_core_is_iterated():
    # a chain that unravels one pass at a time (u3 and a go first, then u1 and c, then u2 and b), beside a 2x2 core
    chain = {("u1", "a"), ("u1", "b"), ("u2", "b"), ("u2", "c"), ("u3", "c")}
    core = {("u4", "x"), ("u4", "y"), ("u5", "x"), ("u5", "y")}
    kept, iterations = k_core(chain | core, 2)
    assert kept == core and iterations == 4  # 3 passes that drop pairs, 1 that finds nothing to drop
    kept, iterations = k_core(core, 2)
    assert kept == core and iterations == 1
    assert k_core(core, 3)[0] == set()


def test_output_loads_and_is_k_core(full):
    out, summary = full
    assert summary["negatives"].startswith("not written")  # 83 items: no user has 99 unbought ones
    logged = []
    ds = load_dataset(out, log=logged.append)  # draws as many negatives as the smallest catalogue share allows
    assert "negative.txt is missing" in logged[0] and "warning: only 83 items" in logged[1]
    assert len(ds.sequences) == summary["users"] == 188 and ds.num_items == summary["items"] == 83
    item_counts = Counter(i for s in ds.sequences.values() for i in s)
    assert min(len(s) for s in ds.sequences.values()) >= 5
    assert min(item_counts.values()) >= 5 and len(item_counts) == ds.num_items
    assert all(len(set(s)) == len(s) for s in ds.sequences.values())  # one interaction per user-item pair
    assert summary["bad_lines"]["missing_text"]["count"] == 6
    maps = json.loads((out / "datamaps.json").read_text())
    assert {v: k for k, v in maps["id2user"].items()} == maps["user2id"]
    assert {v: k for k, v in maps["id2item"].items()} == maps["item2id"]
    splits = load_explanations(out / "explanation.json", required=("user", "item", "explanation", "feature"))
    assert sum(map(len, splits.values())) == sum(summary["records"].values()) == 736
    summary_file = json.loads((out / "prepare_summary.json").read_text())
    assert summary_file["input"]["sha256"] and summary_file["interactions"] == sum(map(len, ds.sequences.values()))


def test_sequences_are_time_ordered_with_first_appearance_ids(full):
    out, _ = full
    maps = json.loads((out / "datamaps.json").read_text())
    reviews, _ = kept_reviews(json.loads(line) for line in real_lines())
    time_of = {}
    for r in reviews:  # earliest review of a pair is the one kept
        key = (r["reviewerID"], r["asin"])
        time_of[key] = min(time_of.get(key, r["unixReviewTime"]), r["unixReviewTime"])
    next_item = 1
    for line in (out / "sequential.txt").read_text().splitlines():
        user, *items = map(int, line.split())
        times = [time_of[maps["id2user"][str(user)], maps["id2item"][str(i)]] for i in items]
        assert times == sorted(times)
        for i in items:
            assert i <= next_item  # a new item always gets the next id
            next_item = max(next_item, i + 1)
    users = [int(line.split()[0]) for line in (out / "sequential.txt").read_text().splitlines()]
    assert users == list(range(1, len(users) + 1))
    first_line = {}
    for n, r in enumerate(reviews):
        first_line.setdefault(r["reviewerID"], n)
    order = [first_line[maps["id2user"][str(u)]] for u in users]
    assert order == sorted(order)  # users numbered by their first review in the file


@pytest.fixture(scope="module")
def slice_run(tmp_path_factory):
    """The first 1500 lines of Gift_Cards, prepared by the command line (plain file): (dir, input files)."""
    tmp = tmp_path_factory.mktemp("slice")
    lines = real_lines(1500)
    plain = write(tmp / "slice.json", lines)
    zipped = tmp / "slice.json.gz"
    zipped.write_bytes(gzip.compress(plain.read_bytes()))
    literal = write(tmp / "slice_2014.txt", [repr(json.loads(line)) for line in lines])  # 2014 dict-literal style
    # 3-core: without its variant copies the slice has no 5-core left
    cli = subprocess.run([sys.executable, "data/prepare.py", "--reviews", str(plain), "--out", str(tmp / "cli"),
                          "--skip_bad", "--k", "3"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert cli.returncode == 0, cli.stderr
    assert "3-core" in cli.stdout and "explanation records" in cli.stdout and "variant copies dropped 330" in cli.stdout
    return tmp / "cli", {"plain": plain, "gzip": zipped, "literal": literal}


def test_deterministic_gzip_plain_python_literals_and_cli(selector, slice_run, tmp_path):
    out, inputs = slice_run
    assert inputs["literal"].read_text().startswith("{'")
    run(selector, inputs["gzip"], tmp_path / "gz", "--skip_bad", "--k", "3")
    run(selector, inputs["literal"], tmp_path / "lit", "--skip_bad", "--k", "3")
    reference = read_out(out)
    assert set(reference) == {"sequential.txt", "datamaps.json", "explanation.json"}  # 52 items: no negatives
    assert read_out(tmp_path / "gz") == reference
    assert read_out(tmp_path / "lit") == reference
    summary = json.loads((out / "prepare_summary.json").read_text())
    assert summary["k_core"]["iterations"] > 2 and summary["negatives"].startswith("not written")
    assert summary["bad_lines"]["missing_text"]["first_lines"] == [1216, 1351, 1456]


def test_random_item_ids_are_a_seeded_permutation(selector, slice_run, tmp_path):
    out, inputs = slice_run
    run(selector, inputs["plain"], tmp_path / "r", "--skip_bad", "--k", "3", "--item_ids", "random", "--seed", "7")
    a, b = json.loads((out / "datamaps.json").read_text()), json.loads((tmp_path / "r" / "datamaps.json").read_text())
    assert sorted(map(int, b["id2item"])) == sorted(map(int, a["id2item"])) == list(range(1, len(a["id2item"]) + 1))
    assert a["id2item"] != b["id2item"] and a["id2user"] == b["id2user"]

    def as_asins(d, maps):
        return {maps["id2user"][line.split()[0]]: [maps["id2item"][i] for i in line.split()[1:]]
                for line in (d / "sequential.txt").read_text().splitlines()}
    assert as_asins(out, a) == as_asins(tmp_path / "r", b)  # same data, other numbers
    recs = json.loads((tmp_path / "r" / "explanation.json").read_text())
    orig = json.loads((out / "explanation.json").read_text())
    assert [(b["id2item"][str(r["item"])], r["explanation"]) for r in recs["test"]] == \
           [(a["id2item"][str(r["item"])], r["explanation"]) for r in orig["test"]]


# ----------------------------------------------------------------------------- bad input


BAD = {
    "not_json": '{"reviewerID": "A1", "asin": "B1", "reviewText": "nice',
    "missing_id": '{"asin": "B1", "reviewText": "Nice card.", "unixReviewTime": 1400000000}',
    "missing_text": '{"reviewerID": "A1", "asin": "B1", "summary": "ok", "unixReviewTime": 1400000000}',
    "empty_review": '{"reviewerID": "A1", "asin": "B1", "reviewText": "   ", "unixReviewTime": 1400000000}',
    "missing_time": '{"reviewerID": "A1", "asin": "B1", "reviewText": "Nice card."}',
}


@pytest.mark.parametrize("kind", sorted(BAD))
def test_bad_line_stops_the_run_with_its_line_number(kind, tmp_path):
    lines = real_lines(40)
    lines.insert(16, BAD[kind])  # line 17
    path = write(tmp_path / "reviews.json", lines)
    with pytest.raises(DataError) as e:
        run(None, path, tmp_path / "out")  # fails in the scan, before any NLP model is loaded
    msg = str(e.value)
    assert str(path) in msg and f"{kind}: 1 (line 17)" in msg and "--skip_bad" in msg
    assert not (tmp_path / "out").exists()


def test_skip_bad_counts_every_kind(selector, tmp_path):
    lines = real_lines(1000)
    where = {}
    for n, kind in enumerate(sorted(BAD)):
        lines.insert(100 * (n + 1), BAD[kind])
        where[kind] = 100 * (n + 1) + 1
    lines.insert(50, "")  # blank lines are ignored, not bad
    where = {k: v + 1 if v > 50 else v for k, v in where.items()}
    for kind in BAD:  # the file really has each bad line where we think
        assert lines[where[kind] - 1] == BAD[kind]
    summary = run(selector, write(tmp_path / "reviews.json", lines), tmp_path / "out", "--skip_bad", "--k", "3")
    assert {k: v["first_lines"] for k, v in summary["bad_lines"].items()} == {k: [v] for k, v in where.items()}
    assert summary["valid_reviews"] == 1000 and summary["lines"] == 1006
    assert (tmp_path / "out" / "sequential.txt").exists()


def test_gift_cards_real_missing_text_lines_are_reported(tmp_path):
    with pytest.raises(DataError, match=r"missing_text: 6 \(lines 1216, 1351, 1456, 1666, 1798, \.\.\.\)"):
        run(None, GIFT_CARDS, tmp_path / "out")


def test_nothing_left_after_k_core_is_an_error(tmp_path):
    path = write(tmp_path / "reviews.json", real_lines(300))
    with pytest.raises(DataError, match="nothing is left after the 5-core filter"):
        run(None, path, tmp_path / "out")


# ----------------------------------------------------------------------------- explanation records


def test_selector_picks_an_opinion_sentence_with_its_feature(selector):
    texts = [
        "I bought this for my wife last week. The scent is lovely and it lasts all day.",
        "Arrived on Tuesday. It was in a box.",                      # no opinion
        "I love it!",                                                # opinion, no feature
        "The packaging is nice. But the handle broke after two weeks of terrible use.",
        "Great product",
    ]
    picked = selector.select(texts)
    assert picked[0][:2] == ("The scent is lovely and it lasts all day", "scent")
    assert picked[1] is None and picked[2] is None
    assert picked[3][:2] == ("But the handle broke after two weeks of terrible use", "handle")  # stronger opinion
    assert picked[4][:2] == ("Great product", "product")


def test_records_come_from_their_own_review(full):
    out, summary = full
    maps = json.loads((out / "datamaps.json").read_text())
    texts = {}
    for r in map(json.loads, real_lines()):
        texts.setdefault((r["reviewerID"], r["asin"]), []).append(" ".join(r.get("reviewText", "").split()))
    splits = json.loads((out / "explanation.json").read_text())
    pairs = set()
    for records in splits.values():
        for rec in records:
            key = (maps["id2user"][str(rec["user"])], maps["id2item"][str(rec["item"])])
            assert any(rec["explanation"] in t for t in texts[key])
            assert rec["feature"].lower() in rec["explanation"].lower()
            assert isinstance(rec["summary"], str) and rec["rating"] in (1.0, 2.0, 3.0, 4.0, 5.0)
            pairs.add((rec["user"], rec["item"]))
    assert len(pairs) == sum(summary["records"].values())  # at most one record per review
    assert summary["reviews_without_record"] > 0  # e.g. "Great" has no feature


def test_loo_split_matches_sequential_leave_one_out(full):
    out, _ = full
    ds = load_dataset(out)
    splits = json.loads((out / "explanation.json").read_text())
    for rec in splits["test"]:
        assert rec["item"] == ds.test_item(rec["user"])
    for rec in splits["val"]:
        assert rec["item"] == ds.val_item(rec["user"])
    for rec in splits["train"]:
        assert rec["item"] in ds.train_items(rec["user"])
    test_pairs = {(r["user"], r["item"]) for r in splits["test"]}
    assert not test_pairs & {(r["user"], r["item"]) for r in splits["train"] + splits["val"]}


def test_random_split_is_8_1_1_of_the_same_records(selector, slice_run, tmp_path):
    out, inputs = slice_run
    loo = json.loads((out / "explanation.json").read_text())
    run(selector, inputs["plain"], tmp_path / "a", "--skip_bad", "--k", "3", "--split", "random", "--seed", "3")
    a = json.loads((tmp_path / "a" / "explanation.json").read_text())
    n = sum(map(len, a.values()))
    assert len(a["train"]) == int(0.8 * n) and len(a["val"]) == int(0.1 * n)
    key = lambda r: (r["user"], r["item"])  # noqa: E731
    assert sorted(map(key, sum(a.values(), []))) == sorted(map(key, sum(loo.values(), [])))
    assert set(map(key, a["test"])) != set(map(key, loo["test"]))
    assert not set(map(key, a["test"])) & set(map(key, a["train"]))


def test_random_split_is_seeded():
    sequences = {u: [(t, 10 * u + t, t) for t in range(1, 8)] for u in range(1, 21)}  # user -> (time, line, item)
    records = {line: {"user": u, "item": i} for u, s in sequences.items() for _, line, i in s}
    one, again, other = (split_records(records, sequences, "random", seed) for seed in (1, 1, 2))
    assert one == again and one != other
    assert [len(one[k]) for k in ("train", "val", "test")] == [112, 14, 14]
    loo = split_records(records, sequences, "loo", 1)
    assert all(r["item"] == 7 for r in loo["test"]) and all(r["item"] == 6 for r in loo["val"])


# ----------------------------------------------------------------------------- variant copies


def review(user, item, t, text):
    return json.dumps({"reviewerID": user, "asin": item, "unixReviewTime": t, "reviewText": text, "overall": 5.0})


def test_variant_copies_are_dropped_first_line_wins(selector, tmp_path):
    # four users review four items A..D (distinct texts, distinct times), plus copies of some reviews onto other
    # variants: a copy of a review has the same user, time and text (up to whitespace and case), another item
    lines = [review(u, i, 1000 * n + 10 * m, f"The {i} card from {u} is great, review {m}.")
             for n, u in enumerate(["U1", "U2", "U3", "U4"]) for m, i in enumerate("ABCD")]
    copies = [
        review("U1", "E", 0, "The A card from U1 is great, review 0."),        # copy of U1's A review
        review("U2", "E", 1000, "the a CARD   from U2 is great, review 0.  "),  # copy (case and spaces differ)
        review("U3", "E", 2000, "The A card from U3 is great, review 0."),      # copy
        review("U4", "E", 3000, "The A card from U4 is great, review 0."),      # copy
        review("U1", "A", 0, "The A card from U1 is great, review 0."),        # same item again: a repeat, no copy
    ]
    not_copies = [
        review("U1", "F", 5, "The A card from U1 is great, review 0."),        # another time
        review("U2", "F", 2000, "The A card from U3 is great, review 0."),      # another user's time and text
        review("U3", "F", 2000, "The A card from U3 is great, review 1."),      # another text
    ]
    early = review("U4", "G", 3010, "The B card from U4 is great, review 1.")  # before U4's B review in the file
    path = write(tmp_path / "reviews.json", [early] + lines + copies + not_copies)

    summary = run(selector, path, tmp_path / "out", "--k", "3")
    assert summary["variant_copies_dropped"] == 5  # E four times, and U4's B review (its copy on G came first)
    assert summary["duplicate_user_item_reviews"] == 1 and summary["valid_reviews"] == 25
    assert json.loads((tmp_path / "out" / "prepare_summary.json").read_text())["variant_copies_dropped"] == 5
    maps = json.loads((tmp_path / "out" / "datamaps.json").read_text())
    # E had only copies; F has 3 users; G is U4's only: dropped by the 3-core, and with it B (3 users left) stays
    assert sorted(maps["item2id"]) == ["A", "B", "C", "D", "F"]
    seqs = {maps["id2user"][line.split()[0]]: [maps["id2item"][i] for i in line.split()[1:]]
            for line in (tmp_path / "out" / "sequential.txt").read_text().splitlines()}
    # time ties (U3: A and F) go by file line
    assert seqs == {"U1": ["A", "F", "B", "C", "D"], "U2": ["A", "B", "C", "D", "F"],
                    "U3": ["A", "F", "B", "C", "D"], "U4": ["A", "C", "D"]}

    summary = run(selector, path, tmp_path / "keep", "--k", "3", "--keep_variant_copies")
    assert summary["variant_copies_dropped"] == 0 and summary["config"]["keep_variant_copies"] is True
    maps = json.loads((tmp_path / "keep" / "datamaps.json").read_text())
    assert sorted(maps["item2id"]) == ["A", "B", "C", "D", "E", "F"]
    assert summary["interactions"] == 4 * 4 + 4 + 3


def test_gift_cards_variant_copy_counts(full, slice_run, selector, tmp_path):
    reviews = [json.loads(line) for line in real_lines()]
    assert kept_reviews(reviews)[1] == 830  # the reference rule on the full text agrees with the hashed one
    out, summary = full
    assert summary["variant_copies_dropped"] == 830 and summary["duplicate_user_item_reviews"] == 7
    assert (summary["users"], summary["items"], summary["interactions"]) == (188, 83, 1158)
    # no user's sequence holds the same review twice
    maps = json.loads((out / "datamaps.json").read_text())
    text_of = {(r["reviewerID"], r["asin"]): (r["unixReviewTime"], " ".join(r["reviewText"].split()).casefold())
               for r in kept_reviews(reviews)[0]}
    for line in (out / "sequential.txt").read_text().splitlines():
        user, *items = line.split()
        texts = [text_of[maps["id2user"][user], maps["id2item"][i]] for i in items]
        assert len(set(texts)) == len(texts)

    sliced = json.loads((slice_run[0] / "prepare_summary.json").read_text())  # first 1500 lines, 3-core
    assert sliced["variant_copies_dropped"] == 330 == kept_reviews(reviews[:1500])[1]
    assert (sliced["users"], sliced["items"], sliced["interactions"]) == (210, 52, 842)
    kept = run(selector, slice_run[1]["plain"], tmp_path / "keep", "--skip_bad", "--k", "3", "--keep_variant_copies")
    assert kept["variant_copies_dropped"] == 0 and kept["interactions"] > sliced["interactions"]


# ----------------------------------------------------------------------------- --interactions


BEAUTY = ROOT.parent / "shared" / "data" / "p5" / "beauty"


def run_interactions(log_file, out, *flags):
    args = parse_args(["--interactions", str(log_file), "--out", str(out), *flags])
    return prepare(args, log=lambda *a: None)


def gift_card_rows():
    """(user, item, time) of the Gift_Cards reviews that --reviews keeps (text present, no variant copies), in
    file order: as an interaction log they must give the same dataset."""
    reviews, _ = kept_reviews(json.loads(line) for line in real_lines())
    return [(r["reviewerID"], r["asin"], r["unixReviewTime"]) for r in reviews]


@pytest.fixture
def python_cli():
    def cli(*argv):
        proc = subprocess.run([sys.executable, "data/prepare.py", *map(str, argv)], cwd=ROOT, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        return proc
    return cli


def test_interactions_csv_and_inter_give_what_the_reviews_give(full, python_cli, tmp_path):
    rows = gift_card_rows()
    # the header in another order, user_id/item_id names and an extra column
    csv_file = write(tmp_path / "gift.csv", ["timestamp,rating,item_id,user_id"] +
                     [f"{t},5.0,{i},{u}" for u, i, t in rows])
    inter = write(tmp_path / "gift.inter", ["user_id:token\titem_id:token\trating:float\ttimestamp:float"] +
                  [f"{u}\t{i}\t5.0\t{t}" for u, i, t in rows])
    cli = python_cli("--interactions", csv_file, "--out", tmp_path / "csv")
    assert "5-core" in cli.stdout and "users 188, items 83" in cli.stdout
    run_interactions(inter, tmp_path / "inter")
    reference = read_out(full[0])
    expected = {name: reference[name] for name in ("sequential.txt", "datamaps.json")}  # 83 items: no negatives
    assert read_out(tmp_path / "csv") == read_out(tmp_path / "inter") == expected
    summary = json.loads((tmp_path / "csv" / "prepare_summary.json").read_text())
    assert summary["rows"] == len(rows) and summary["duplicate_user_item_rows"] == 7
    assert (summary["users"], summary["items"], summary["interactions"]) == (188, 83, 1158)
    before = summary["before_k_core"]
    assert before["users"] > 188 and before["items"] > 83 and summary["k_core"]["k"] == 5  # the 5-core dropped some


def test_interactions_are_time_ordered_k_cored_and_numbered_like_p5(tmp_path):
    """The published beauty split (a 5-core, items numbered by first appearance) written as a log with each
    user's rows shuffled comes back as it was, with a valid negative.txt."""
    lines = (BEAUTY / "sequential.txt").read_text().splitlines()
    maps = json.loads((BEAUTY / "datamaps.json").read_text())
    rng = random.Random(0)
    rows = ["user,item,timestamp"]
    for line in lines:
        user, *items = line.split()
        events = [(maps["id2user"][user], maps["id2item"][i], 1_300_000_000 + 86_400 * t) for t, i in enumerate(items)]
        rng.shuffle(events)  # file order is not time order
        rows += [f"{u},{i},{t}" for u, i, t in events]
    summary = run_interactions(write(tmp_path / "beauty.csv", rows), tmp_path / "out")
    assert (tmp_path / "out" / "sequential.txt").read_text().splitlines() == lines
    out_maps = json.loads((tmp_path / "out" / "datamaps.json").read_text())
    assert out_maps["id2user"] == maps["id2user"] and out_maps["id2item"] == maps["id2item"]
    assert summary["negatives"] == "99 per user, seed 2022" and not (tmp_path / "out" / "explanation.json").exists()
    ds = load_dataset(tmp_path / "out", log=lambda *a: None)  # checks every negative: 99, distinct, never bought
    assert len(ds.negatives) == 22363 and ds.records is None


def test_k_core_applies_to_interactions(tmp_path):
    # u1..u3 buy a, b, c: a 3-core; u4 buys a, b, d: d has one buyer, and without it u4 has 2 items
    rows = ["user,item,timestamp"] + [f"{u},{i},{t}" for u in ("u1", "u2", "u3") for t, i in enumerate("abc")]
    rows += ["u4,a,1", "u4,b,2", "u4,d,3", "u1,a,9"]  # u1's second a: the earliest is kept
    summary = run_interactions(write(tmp_path / "log.csv", rows), tmp_path / "out", "--k", "3")
    assert (tmp_path / "out" / "sequential.txt").read_text() == "1 1 2 3\n2 1 2 3\n3 1 2 3\n"
    assert summary["before_k_core"] == {"users": 4, "items": 4, "interactions": 12}
    # pass 1 drops d, pass 2 u4 (left with a and b), pass 3 finds nothing more
    assert summary["duplicate_user_item_rows"] == 1 and summary["k_core"]["iterations"] == 3


@pytest.mark.parametrize("suffix, bad, words", [
    (".csv", ",B00ADR2LV6,1400000000", "empty user"),
    (".csv", "A1,,1400000000", "empty item"),
    (".csv", "A1,B00ADR2LV6,", "empty timestamp"),
    (".csv", "A1,B00ADR2LV6,yesterday", "timestamp 'yesterday' is not a number"),
    (".csv", "A1,B00ADR2LV6,nan", "timestamp 'nan' is not a number"),
    (".csv", "A1,B00ADR2LV6", "2 columns, the header has 3"),
    (".csv", "A1,B00ADR2LV6,1400000000,5", "4 columns, the header has 3"),
    (".csv", b"A1,B00\xff,1400000000", "not UTF-8 text"),
    (".inter", "A1\tB00ADR2LV6\tsoon", "timestamp 'soon' is not a number"),
    (".inter", "A1 B00ADR2LV6 1400000000", "1 columns, the header has 3"),  # spaces are not tabs
])
def test_bad_interaction_row_names_its_line(tmp_path, suffix, bad, words):
    sep = "," if suffix == ".csv" else "\t"
    rows = [sep.join(row) for row in [("user", "item", "timestamp")] +
            [(u, i, str(t)) for u, i, t in gift_card_rows()[:40]]]
    path = tmp_path / f"log{suffix}"
    text = "\n".join(rows[:16]).encode() + b"\n" + (bad if isinstance(bad, bytes) else bad.encode()) + b"\n"
    path.write_bytes(text + "\n".join(rows[16:]).encode() + b"\n")
    with pytest.raises(DataError) as e:
        run_interactions(path, tmp_path / "out")
    assert f"{path}:17: {words}" in str(e.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("content, words", [
    ("", ": empty file"),
    ("\n  \n", ": empty file"),
    ("user,item,timestamp\n", ": no interactions (only a header)"),
    ("user,item,time\nA1,B1,5\n", ":1: header has no 'timestamp' column"),
    ("\nitem,user_id\nB1,A1\n", ":2: header has no 'timestamp' column"),   # blank lines before it count
    ("user_id,item,user,timestamp\nA1,B1,A1,5\n", ":1: header names the user twice"),
])
def test_empty_file_and_bad_header(tmp_path, content, words):
    path = tmp_path / "log.csv"
    path.write_text(content)
    with pytest.raises(DataError) as e:
        run_interactions(path, tmp_path / "out")
    assert str(e.value).startswith(str(path) + words)


def test_interactions_csv_quoting_bom_and_inter_quotes(tmp_path):
    csv_file = tmp_path / "log.csv"
    csv_file.write_bytes('\ufeffitem,user,timestamp\n"Gift, card",A1,3\nB2,A1,1.5\n'.encode())  # a spreadsheet's BOM
    assert list(read_interactions(csv_file)) == [(2, "A1", "Gift, card", 3.0), (3, "A1", "B2", 1.5)]
    inter = tmp_path / "log.inter"
    inter.write_text('user_id:token\titem_id:token\ttimestamp:float\nA1\t"B1\t7\n')  # a quote is only a character
    assert list(read_interactions(inter)) == [(2, "A1", '"B1', 7.0)]


def test_interactions_flags():
    with pytest.raises(SystemExit):
        parse_args(["--interactions", "a.csv", "--reviews", "b.json"])
    with pytest.raises(SystemExit):
        parse_args(["--interactions", "a.csv", "--skip_bad"])
    with pytest.raises(SystemExit):
        parse_args([])
    assert parse_args(["--interactions", "x/ml-1m.inter"]).out.endswith("data/ml-1m")
