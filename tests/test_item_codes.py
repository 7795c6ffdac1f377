"""Item naming schemes (item_codes.py): training-part numbering, hierarchical codes from the co-occurrence graph and
from item titles, the titles file's checks, and codes saved with a checkpoint and read back at evaluation."""
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

import tasks
from dataset import DataError, Dataset
from item_text import item_texts, read_titles
from utils import UserError
from item_codes import (code_tokens, hierarchical_codes, item_codes, item_map_for, parse_branching,
                        sequential_item_map)

from conftest import ROOT, make_slice, quiet


def toy(sequences, num_items, data_dir="toy"):
    return Dataset(data_dir=Path(data_dir), sequences=sequences, num_items=num_items, negatives={}, id2user={},
                   id2item={i: f"A{i}" for i in range(1, num_items + 1)})


def test_sequential_numbering_reads_training_parts_only():
    # training parts: user 1 -> 5 3, user 2 -> 3 2 4; items 1 and 6 are only ever validation / test items
    ds = toy({1: [5, 3, 1, 6], 2: [3, 2, 4, 6, 1]}, 6)
    new = sequential_item_map(ds)
    assert [new[i] for i in (5, 3, 2, 4)] == [1, 2, 3, 4]
    assert [new[i] for i in (1, 6)] == [5, 6]                 # after every training item, in published order
    assert sorted(new[1:]) == list(range(1, 7))


def test_unknown_scheme_and_bad_branching_are_clear_errors():
    with pytest.raises(UserError, match="unknown --item_ids 'bogus'"):
        item_map_for("bogus", toy({1: [1, 2, 3]}, 3), 1)
    for bad in ("", "8,x", "1,4", "2,2,2,2,2,2,2,2"):
        with pytest.raises(DataError, match="--code_branching"):
            parse_branching(bad)
    assert parse_branching("64,32") == (64, 32)


def test_hierarchical_codes_are_unique_and_follow_the_vectors():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(4, 8)) * 10
    vectors = np.concatenate([c + rng.normal(size=(25, 8)) * 0.1 for c in centres])      # 4 tight groups of 25
    codes = hierarchical_codes(vectors, (4, 3), seed=1)
    assert len(set(codes)) == 100 and all(len(c) == 3 for c in codes)
    groups = [{c[0] for c in codes[g * 25:(g + 1) * 25]} for g in range(4)]
    assert all(len(g) == 1 for g in groups) and len(set.union(*groups)) == 4            # one top cluster each
    assert hierarchical_codes(vectors, (4, 3), seed=1) == codes                           # seeded
    assert code_tokens((3, 0, 12)) == ["<a_3>", "<b_0>", "<c_12>"]


def test_identical_vectors_still_get_unique_codes():
    codes = hierarchical_codes(np.zeros((7, 4)), (3,), seed=1)
    assert len(set(codes)) == 7


def test_collaborative_codes_group_items_bought_together():
    # 4 groups of 10 items; each user buys 6 items of one group: the groups are the graph's communities
    rng = np.random.default_rng(0)
    sequences = {u: [int(x) for x in rng.choice(10, 6, replace=False) + 1 + 10 * (u % 4)] for u in range(1, 201)}
    ds = toy(sequences, 40)
    codes = item_codes("collaborative", ds, (4, 2), seed=1)
    assert sorted(codes) == list(range(1, 41)) and len(set(codes.values())) == 40
    tops = [{codes[i][0] for i in range(1 + 10 * g, 11 + 10 * g)} for g in range(4)]
    assert all(len(t) == 1 for t in tops) and len(set.union(*tops)) == 4       # one top cluster a group


def test_semantic_codes_from_titles(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    titles = {"1": "red lipstick matte", "2": "red lipstick gloss", "3": "lipstick red velvet",
              "4": "shampoo for dry hair", "5": "dry hair shampoo", "6": "hair shampoo argan"}
    (d / "item_titles.json").write_text(json.dumps(titles))
    ds = toy({1: [1, 2, 3, 4, 5], 2: [4, 5, 6, 1, 2]}, 7, d)
    texts, source, missing = item_texts(ds, "auto", log=quiet)
    assert source == "titles" and missing == 1 and texts[4] == "shampoo for dry hair"
    codes = item_codes("semantic", ds, (2,), seed=1, log=quiet)
    assert codes[1][0] == codes[2][0] == codes[3][0] != codes[4][0] == codes[5][0] == codes[6][0]
    assert len(set(codes.values())) == 7


@pytest.mark.parametrize("content, message", [
    ('{"1": "a", "99": "b"}', "item 99 is not in datamaps.json"),
    ('{"x": "a"}', "item id 'x' is not an integer"),
    ('{"1": ""}', "item 1 has no title"),
    ('{"1": 5}', "item 1 has no title"),
    ('["a"]', "expected a JSON object"),
    ('{"1": "a",\n "2": }', "item_titles.json:2: not valid JSON"),
])
def test_titles_file_errors_name_the_file_and_the_id(tmp_path, content, message):
    path = tmp_path / "item_titles.json"
    path.write_text(content)
    with pytest.raises(DataError, match=message) as e:
        read_titles(path, {1: "A1", 2: "A2"})
    assert str(path) in str(e.value)


def test_code_words_become_the_items_tokens(small_ds, atomic_tokenizer):
    import copy
    from module import add_id_tokens
    atomic_tokenizer = copy.deepcopy(atomic_tokenizer)            # the fixture is shared: add tokens to a copy
    codes = {i: (i % 3, i % 5, i // 15) for i in range(1, small_ds.num_items + 1)}
    words = tasks.id_words(small_ds, codes)
    assert "<a_2>" in words and "item_1" not in words and words[-1] == tasks.user_word(small_ds.users[-1])
    add_id_tokens(atomic_tokenizer, words)
    encoder = tasks.WordEncoder(atomic_tokenizer)
    encoder.set_item_codes(codes)
    assert encoder.item_tokens(7) == atomic_tokenizer.convert_tokens_to_ids(["<a_1>", "<b_2>", "<c_0>"])
    ids, ww = encoder.words([tasks.user_word(small_ds.users[0]), "item_7", "item_8"])
    assert ids[1:4] == encoder.item_tokens(7) and ww[1:4] == [2, 2, 2] and ww[4:7] == [3, 3, 3]
    assert encoder.item_of_tokens(small_ds.num_items)[tuple(encoder.item_tokens(8))] == 8


@pytest.mark.slow
@pytest.mark.parametrize("scheme", ["sequential", "collaborative"])
def test_codes_are_saved_and_applied_at_evaluation(scheme, tmp_path, python, script_env):
    data = make_slice(tmp_path / "data", 64, seed=1)
    ckpt = tmp_path / "ckpt"
    common = ["--data_dir", str(data), "--checkpoint", str(ckpt)]
    train = subprocess.run([python, "pretrain.py", *common, "--backbone", "tiny", "--item_ids", scheme,
                            "--code_branching", "4,4", "--ratio", "0:1:0:1", "--epochs", "1", "--seed", "1"],
                           cwd=ROOT, env=script_env, capture_output=True, text=True)
    assert train.returncode == 0, train.stderr[-2000:]
    meta = json.loads((ckpt / "config.json").read_text())["hdrec"]
    assert meta["item_ids"] == scheme
    if scheme == "collaborative":
        assert len(meta["item_codes"]) == 12101 and len({tuple(c) for c in meta["item_codes"]}) == 12101
    else:
        assert meta["item_codes"] is None and sorted(meta["item_map"][1:]) == list(range(1, 12102))
    for script in ("seq.py", "topn.py"):
        proc = subprocess.run([python, script, *common, "--sensitivity_users", "20", "--seed", "1"], cwd=ROOT,
                              env=script_env, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-2000:]
    seq = json.loads((ckpt / "results_seq.json").read_text())
    assert seq["item_ids"] == scheme and seq["details"]["list_quality"] == {
        "lists_with_invalid_id": 0, "lists_with_duplicate": 0, "lists_with_bought_item": 0}
    assert len(seq["ranks"]) == 64


def test_item_ids_flag_errors(small_data_dir, tmp_path, python, script_env):
    common = [python, "pretrain.py", "--data_dir", str(small_data_dir), "--checkpoint", str(tmp_path / "c"),
              "--backbone", "tiny"]
    bad = subprocess.run(common + ["--item_ids", "bogus"], cwd=ROOT, env=script_env, capture_output=True, text=True)
    assert bad.returncode == 2 and "invalid choice: 'bogus'" in bad.stderr
    pieces = subprocess.run(common + ["--item_ids", "semantic", "--id_tokens", "pieces", "--history", "encoder"],
                            cwd=ROOT, env=script_env, capture_output=True, text=True)
    assert pieces.returncode == 2 and pieces.stderr.startswith("error: --item_ids semantic") and "needs --id_tokens atomic" in pieces.stderr
    assert "Traceback" not in pieces.stderr
