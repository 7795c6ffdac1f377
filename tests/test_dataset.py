"""dataset.py: loading a P5 dataset dir, every validation error, negatives, item renumbering."""
import json
import re

import pytest

from dataset import (NUM_NEGATIVES, DataError, generate_negatives, load_dataset, load_datamaps, load_sequences,
                     random_item_permutation, renumber_items, write_negatives)
from utils import file_sha256

from conftest import BEAUTY, quiet

NUM_ITEMS = 150   # synthetic datasets: enough unbought items for 99 negatives


def write_maps(d, users=5, items=NUM_ITEMS, old_style=False):
    if old_style:
        maps = {"user2id": {f"U{u}": str(u) for u in range(1, users + 1)},
                "item2id": {f"I{i}": str(i) for i in range(1, items + 1)}}
    else:
        maps = {"id2user": {str(u): f"U{u}" for u in range(1, users + 1)},
                "id2item": {str(i): f"I{i}" for i in range(1, items + 1)}}
    (d / "datamaps.json").write_text(json.dumps(maps), encoding="utf-8")


GOOD = ["1 1 2 3 4", "2 5 6 7"]   # two users; line 2 of the file is left blank on purpose


def write_seq(d, *lines):
    (d / "sequential.txt").write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return d / "sequential.txt"


def assert_error(exc_info, path, line=None, *words):
    msg = str(exc_info.value)
    assert str(path) in msg, msg
    if line is not None:
        assert f"{path}:{line}:" in msg, msg
    for w in words:
        assert w in msg, msg


# ---------------------------------------------------------------------------------------------------- loading

def test_small_slice_loads_with_leave_one_out_split(small_data_dir, small_ds):
    lines = (small_data_dir / "sequential.txt").read_text().split("\n")
    first = [int(x) for x in lines[0].split()]
    assert len(small_ds.users) == 300
    assert small_ds.users[0] == first[0]                     # file order kept
    u, seq = first[0], first[1:]
    assert small_ds.sequences[u] == seq
    assert small_ds.train_items(u) == seq[:-2]
    assert small_ds.val_item(u) == seq[-2]
    assert small_ds.test_item(u) == seq[-1]
    assert small_ds.num_items == 12101                      # the full beauty datamaps were copied
    assert small_ds.id2item[1] == "B004756YJA" and small_ds.id2user[1] == "A1YJEY40YUW4SE"
    assert small_ds.item_map is None
    assert small_ds.hashes == {name: file_sha256(small_data_dir / name)
                               for name in ("sequential.txt", "datamaps.json", "negative.txt")}


def test_datamaps_both_key_styles_give_the_same_maps(tmp_path):
    new, old = tmp_path / "new", tmp_path / "old"
    for d, style in ((new, False), (old, True)):
        d.mkdir()
        write_maps(d, old_style=style)
        write_seq(d, *GOOD)
    id2user, id2item = load_datamaps(new / "datamaps.json")
    assert id2user == {u: f"U{u}" for u in range(1, 6)}
    assert id2item[150] == "I150" and len(id2item) == NUM_ITEMS
    assert load_datamaps(old / "datamaps.json") == (id2user, id2item)
    ds_new, ds_old = load_dataset(new, log=quiet), load_dataset(old, log=quiet)
    assert ds_new.sequences == ds_old.sequences == {1: [1, 2, 3, 4], 2: [5, 6, 7]}
    assert ds_new.num_items == ds_old.num_items == NUM_ITEMS


def test_real_datamaps_old_key_style(tmp_path):
    """beauty's datamaps rewritten in the older user2id/item2id style load to the same tables."""
    maps = json.loads((BEAUTY / "datamaps.json").read_text())
    old = {"user2id": {v: k for k, v in maps["id2user"].items()}, "item2id": {v: k for k, v in maps["id2item"].items()}}
    (tmp_path / "datamaps.json").write_text(json.dumps(old))
    assert load_datamaps(tmp_path / "datamaps.json") == load_datamaps(BEAUTY / "datamaps.json")


def test_datamaps_errors(tmp_path):
    path = tmp_path / "datamaps.json"
    path.write_text('{\n  "id2user": {"1": "U1"},\n  "id2item": {"1": "I1",\n}\n')
    with pytest.raises(DataError) as e:
        load_datamaps(path)
    assert_error(e, path, 4, "not valid JSON")
    path.write_text(json.dumps({"id2user": {"1": "U1"}}))
    with pytest.raises(DataError) as e:
        load_datamaps(path)
    assert_error(e, path, None, "id2item", "item2id")
    with pytest.raises(DataError) as e:
        load_datamaps(tmp_path / "nope.json")
    assert_error(e, tmp_path / "nope.json", None, "not found")


# ---------------------------------------------------------------------------------------------------- sequential.txt errors

@pytest.mark.parametrize("bad, words", [
    ("3 8 9 x", ["non-integer id 'x'"]),
    ("3 8 9.5 10", ["non-integer id '9.5'"]),
    ("3 8 9 10,", ["non-integer id '10,'"]),
    ("0 8 9 10", ["ids start at 1"]),
    ("9 8 9 10", ["user 9 is not in datamaps.json"]),            # user id outside the datamaps
    ("3 8 151 10", ["item 151 is not in datamaps.json"]),       # item id outside the datamaps
    ("3 8 9", ["user 3 has 2 items", "at least 3"]),
    ("3", ["user 3 has 0 items"]),                              # a line with a user and nothing else
    ("1 8 9 10", ["user 1 appears twice"]),
])
def test_sequential_errors_name_file_and_line(tmp_path, bad, words):
    write_maps(tmp_path)
    path = write_seq(tmp_path, GOOD[0], "", GOOD[1], bad, "4 11 12 13")
    with pytest.raises(DataError) as e:
        load_dataset(tmp_path, log=quiet)
    assert_error(e, path, 4, *words)                            # the blank line 2 still counts
    assert not (tmp_path / "negative.txt").exists()             # nothing written for invalid data


def test_sequential_empty_and_missing(tmp_path):
    write_maps(tmp_path)
    path = write_seq(tmp_path, "", "  ", "")
    with pytest.raises(DataError) as e:
        load_dataset(tmp_path, log=quiet)
    assert_error(e, path, None, "empty")
    path.unlink()
    with pytest.raises(DataError) as e:
        load_dataset(tmp_path, log=quiet)
    assert_error(e, path, None, "not found")


def test_without_datamaps_ids_stand_for_themselves(tmp_path):
    path = write_seq(tmp_path, "3 2 9 4", "5 1 2 3")       # items 5..8 are never bought, 9 is the largest
    logged = []
    ds = load_dataset(tmp_path, log=logged.append, negatives=False)
    assert ds.sequences == {3: [2, 9, 4], 5: [1, 2, 3]} and ds.num_items == 9
    assert ds.id2user == {3: "3", 5: "5"} and ds.id2item == {i: str(i) for i in range(1, 10)}
    assert ds.negatives == {} and logged == [] and not (tmp_path / "negative.txt").exists()
    assert ds.hashes == {"sequential.txt": file_sha256(path)}
    # top-N: negatives are drawn from 1..9, the never-bought 5..8 included, and their file is hashed too
    ds = load_dataset(tmp_path, log=quiet)
    assert {u: len(n) for u, n in ds.negatives.items()} == {3: 6, 5: 6}
    assert set(ds.negatives[3]) == {1, 3, 5, 6, 7, 8} and set(ds.negatives[5]) == {4, 5, 6, 7, 8, 9}
    assert set(ds.hashes) == {"sequential.txt", "negative.txt"}


def test_without_negatives_a_read_only_dir_loads_as_it_is(tmp_path):
    """The shared beauty split has no negative.txt: with negatives=False nothing is drawn or written."""
    before = sorted(p.name for p in BEAUTY.iterdir())
    logged = []
    ds = load_dataset(BEAUTY, log=logged.append, negatives=False)
    assert sorted(p.name for p in BEAUTY.iterdir()) == before and logged == []
    assert len(ds.sequences) == 22363 and ds.num_items == 12101 and ds.negatives == {}
    assert ds.hashes == {name: file_sha256(BEAUTY / name) for name in ("sequential.txt", "datamaps.json")}
    # renumbering works without negatives
    perm = random_item_permutation(ds.num_items, seed=5)
    renumbered = renumber_items(ds, perm)
    assert renumbered.negatives == {} and renumbered.sequences[1] == [perm[i] for i in ds.sequences[1]]
    assert renumbered.id2item[perm[1]] == ds.id2item[1]


def test_load_sequences_without_datamaps_accepts_any_ids(tmp_path):
    path = write_seq(tmp_path, "7 1000 2000 3000")
    assert load_sequences(path) == {7: [1000, 2000, 3000]}


# ---------------------------------------------------------------------------------------------------- negative.txt errors

def negatives_dir(tmp_path):
    """users 1 and 2 of GOOD with a valid negative.txt: user 1 gets items 10..108, user 2 items 11..109."""
    write_maps(tmp_path)
    write_seq(tmp_path, *GOOD)
    negs = {1: list(range(10, 109)), 2: list(range(11, 110))}
    write_negatives(tmp_path / "negative.txt", negs)
    return negs


def test_valid_negative_file_is_read_as_is(tmp_path):
    negs = negatives_dir(tmp_path)
    assert load_dataset(tmp_path, log=quiet).negatives == negs


@pytest.mark.parametrize("line2, words", [
    ("2 " + " ".join(map(str, range(11, 109))), ["user 2 has 98 negatives, expected 99"]),          # wrong count
    ("2 " + " ".join(map(str, range(11, 111))), ["user 2 has 100 negatives, expected 99"]),
    ("2 5 " + " ".join(map(str, range(11, 109))), ["negative 5 was bought by user 2"]),           # bought item
    ("2 " + " ".join(map(str, range(11, 109))) + " 7", ["negative 7 was bought by user 2"]),        # the test item
    ("2 151 " + " ".join(map(str, range(11, 109))), ["unknown item id 151"]),                      # unknown item
    ("2 0 " + " ".join(map(str, range(11, 109))), [" 0"]),                                      # ids start at 1
    ("4 " + " ".join(map(str, range(11, 110))), ["user 4 is not in sequential.txt"]),              # unknown user
    ("1 " + " ".join(map(str, range(11, 110))), ["user 1 appears twice"]),
    ("2 x " + " ".join(map(str, range(11, 109))), ["non-integer id"]),
])
def test_negative_errors_name_file_and_line(tmp_path, line2, words):
    negatives_dir(tmp_path)
    path = tmp_path / "negative.txt"
    first = path.read_text().splitlines()[0]
    path.write_text(first + "\n" + line2 + "\n")
    with pytest.raises(DataError) as e:
        load_dataset(tmp_path, log=quiet)
    assert_error(e, path, 2, *words)


def test_negative_file_missing_a_user(tmp_path):
    negatives_dir(tmp_path)
    path = tmp_path / "negative.txt"
    path.write_text(path.read_text().splitlines()[0] + "\n")     # only user 1
    with pytest.raises(DataError) as e:
        load_dataset(tmp_path, log=quiet)
    assert_error(e, path, None, "no negatives for 1 users", "user 2")


def test_negative_file_with_too_few_negatives_everywhere_is_rejected(tmp_path):
    """150 items and at most 4 bought: 99 negatives per user are possible, so 98 everywhere is a wrong file
    (top-N would silently rank among 99 candidates instead of the protocol's 100)."""
    negatives_dir(tmp_path)
    path = tmp_path / "negative.txt"
    write_negatives(path, {1: list(range(10, 108)), 2: list(range(11, 109))})
    with pytest.raises(DataError) as e:
        load_dataset(tmp_path, log=quiet)
    assert_error(e, path, 1, "98 negatives")


def test_negative_line_with_a_repeated_item_is_rejected(tmp_path):
    negatives_dir(tmp_path)
    path = tmp_path / "negative.txt"
    first = path.read_text().splitlines()[0]
    path.write_text(first + "\n2 11 11 " + " ".join(map(str, range(13, 110))) + "\n")   # 99 ids, 98 distinct
    with pytest.raises(DataError) as e:
        load_dataset(tmp_path, log=quiet)
    assert_error(e, path, 2, "11")


# ---------------------------------------------------------------------------------------------------- negative generation

def test_generated_negatives_are_deterministic_distinct_and_never_bought(small_ds):
    a = generate_negatives(small_ds.sequences, small_ds.num_items, seed=2022)
    b = generate_negatives(small_ds.sequences, small_ds.num_items, seed=2022)
    c = generate_negatives(small_ds.sequences, small_ds.num_items, seed=7)
    assert a == b
    assert a != c
    assert set(a) == set(small_ds.sequences)
    for user, negs in a.items():
        assert len(negs) == NUM_NEGATIVES == len(set(negs))
        assert all(1 <= x <= small_ds.num_items for x in negs)
        assert not set(negs) & set(small_ds.sequences[user])
    assert small_ds.negatives == a          # the fixture's negative.txt was written with the default seed 2022


def test_generation_fails_clearly_when_too_few_items():
    with pytest.raises(DataError, match=r"user 1: only 97 unbought items, cannot draw 99"):
        generate_negatives({1: [1, 2, 3]}, num_items=100)


def test_negative_file_is_written_once_then_reused(copy_of_small):
    path = copy_of_small / "negative.txt"
    logged = []
    ds = load_dataset(copy_of_small, log=logged.append)
    assert path.exists()
    assert len(logged) == 1 and str(path) in logged[0] and "seed 2022" in logged[0]
    content, mtime = path.read_bytes(), path.stat().st_mtime_ns
    lines = content.decode().splitlines()
    assert len(lines) == 300
    first = min(ds.users)                                   # lines sorted by user
    assert [int(x) for x in lines[0].split()] == [first] + ds.negatives[first]

    logged.clear()
    again = load_dataset(copy_of_small, log=logged.append)
    assert logged == []
    assert path.read_bytes() == content and path.stat().st_mtime_ns == mtime
    assert again.negatives == ds.negatives

    # a different (valid) file is used as it is, never silently regenerated
    other = generate_negatives(ds.sequences, ds.num_items, seed=99)
    write_negatives(path, other)
    assert load_dataset(copy_of_small, log=logged.append).negatives == other
    assert logged == []


def test_generated_file_is_the_same_for_the_same_seed(copy_of_small, small_data_dir):
    load_dataset(copy_of_small, log=quiet)
    assert (copy_of_small / "negative.txt").read_bytes() == (small_data_dir / "negative.txt").read_bytes()


# ---------------------------------------------------------------------------------------------------- item renumbering

def test_random_item_permutation():
    perm = random_item_permutation(50, seed=3)
    assert perm[0] == 0 and len(perm) == 51
    assert sorted(perm[1:]) == list(range(1, 51))
    assert perm == random_item_permutation(50, seed=3)
    assert perm != random_item_permutation(50, seed=4)
    assert perm[1:] != list(range(1, 51))


def test_renumber_items_applies_the_map_everywhere(small_ds):
    before = {u: list(s) for u, s in small_ds.sequences.items()}
    perm = random_item_permutation(small_ds.num_items, seed=5)
    ds = renumber_items(small_ds, perm)
    assert ds.item_map == perm and ds.num_items == small_ds.num_items and ds.users == small_ds.users
    for u in small_ds.users:
        assert ds.sequences[u] == [perm[i] for i in small_ds.sequences[u]]
        assert ds.negatives[u] == [perm[i] for i in small_ds.negatives[u]]
        assert ds.test_item(u) == perm[small_ds.test_item(u)]
        assert not set(ds.negatives[u]) & set(ds.sequences[u])
    for old, asin in small_ds.id2item.items():
        assert ds.id2item[perm[old]] == asin
    assert small_ds.sequences == before                     # the original is not mutated
    assert renumber_items(small_ds, None) is small_ds
    # the inverse map brings everything back
    inverse = [0] * len(perm)
    for old, new in enumerate(perm):
        inverse[new] = old
    back = renumber_items(ds, inverse)
    assert back.sequences == small_ds.sequences and back.negatives == small_ds.negatives


@pytest.mark.parametrize("bad", ["short", "long", "duplicate", "zero_based"])
def test_renumber_items_rejects_a_map_that_does_not_fit(small_ds, bad):
    n = small_ds.num_items
    perm = random_item_permutation(n, seed=5)
    item_map = {"short": perm[:-1], "long": perm + [n + 1], "duplicate": perm[:-1] + [perm[1]],
                "zero_based": list(range(n + 1))[::-1]}[bad]
    with pytest.raises(DataError, match=re.escape(f"1..{n}")):
        renumber_items(small_ds, item_map)


def test_small_catalogue_gets_as_many_negatives_as_the_worst_off_user(tmp_path):
    write_maps(tmp_path, items=12)
    write_seq(tmp_path, "1 1 2 3 4", "2 5 6 7")         # user 1 bought 4 of 12 items: 8 negatives each
    logged = []
    ds = load_dataset(tmp_path, log=logged.append)
    assert {u: len(n) for u, n in ds.negatives.items()} == {1: 8, 2: 8}
    assert set(ds.negatives[1]) == set(range(5, 13))       # every unbought item
    assert any("8 negatives" in m for m in logged) and any("9 candidates" in m for m in logged)


def test_user_who_bought_everything_gives_a_clear_error(tmp_path):
    write_maps(tmp_path, items=4)
    write_seq(tmp_path, "1 1 2 3 4", "2 1 2 3")
    with pytest.raises(DataError, match="bought every item"):
        load_dataset(tmp_path, log=quiet)
