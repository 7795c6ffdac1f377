"""The text tasks: metrics (BLEU, ROUGE, FMR/FCR/DIV) against hand-computed cases, review records in
dataset.load_dataset, the explanation / review-summary samplers of tasks.py, pretrain.py's check for the data a
--ratio needs, and exp.py end to end on the `tiny` model.

The dataset is the first 1500 lines of the real Gift_Cards dump, prepared by data/prepare.py (3-core: without its
variant copies the slice has no 5-core left): 210 users, 52 items, 521 review records."""
import dataclasses
import gzip
import json
import math
import random
import re
import shutil
import subprocess

import pytest

import tasks
from dataset import DataError, Dataset, load_dataset, random_item_permutation, renumber_items
from evaluation import autocast, eval_users, generate_texts, mbr_pick
from metrics import bleu, feature_metrics, rouge, rouge_per_text, text_metrics, text_scores
from text_rules import loops, text_rules, variety, variety_warning

from conftest import ROOT, SHARED_DATA, quiet

GIFT_CARDS = SHARED_DATA / "amazon2018" / "Gift_Cards_5.json.gz"


# ---------------------------------------------------------------------------------------------------- metrics
# Two references, two hypotheses (whitespace tokens):
#   r1 "the cat sat on the mat today" (7)    h1 "the cat sat on a mat" (6)
#   r2 "a dog runs in the park" (6)          h2 "a dog runs fast" (4)
# clipped n-gram matches / hypothesis n-grams, over the corpus:
#   1-grams: h1 5/6 (not "a"), h2 3/4 (not "fast")            -> 8/10
#   2-grams: h1 3/5 (the cat, cat sat, sat on), h2 2/3          -> 5/8
#   3-grams: h1 2/4, h2 1/2                                    -> 3/6
#   4-grams: h1 1/3 (the cat sat on), h2 0/1                   -> 1/4
# brevity penalty: hypothesis length 10 < reference length 13 -> exp(1 - 13/10) = exp(-0.3)
# BLEU-1 = BP * 0.8; BLEU-4 = BP * (0.8 * 0.625 * 0.5 * 0.25) ** (1/4) = BP * 0.5
REFS = ["the cat sat on the mat today", "a dog runs in the park"]
HYPS = ["the cat sat on a mat", "a dog runs fast"]


def test_corpus_bleu_with_brevity_penalty():
    assert bleu(REFS, HYPS, 1) == pytest.approx(100 * math.exp(-0.3) * 0.8)      # 59.27
    assert bleu(REFS, HYPS, 4) == pytest.approx(100 * math.exp(-0.3) * 0.5)      # 37.04
    # corpus-level, not the mean of sentence scores: h2 alone has no matching 4-gram (BLEU-4 0)
    assert bleu(REFS[1:], HYPS[1:], 4) == 0.0


def test_bleu_zero_precision_is_zero_without_smoothing():
    # 4-grams: "a dog runs fast" vs "a dog runs in the park" -> 0/1; unigrams 3/4; BP = exp(1 - 6/4)
    assert bleu(["a dog runs in the park"], ["a dog runs fast"], 4) == 0.0
    assert bleu(["a dog runs in the park"], ["a dog runs fast"], 1) == pytest.approx(100 * math.exp(-0.5) * 0.75)


def test_bleu_is_on_whitespace_tokens():
    assert bleu(["the  cat sat"], [" the cat\tsat "], 1) == pytest.approx(100.0)   # spacing does not matter
    assert bleu(["nice card."], ["nice card"], 1) == pytest.approx(50.0)           # "card." is one token


def test_rouge_f1_hand_computed():
    # rouge-score lowercases and keeps alphanumeric tokens: "The cat, on the mat!" -> the cat on the mat (5)
    # vs "the cat sat on the mat" (6): ROUGE-1 overlap 5 -> P 1, R 5/6, F 10/11; bigrams 3 of 4 vs 5 -> F 2/3;
    # LCS 5 -> F 10/11. The second pair shares nothing (0); the score is the mean over pairs, x100.
    got = rouge(["the cat sat on the mat", "good"], ["The cat, on the mat!", "bad"])
    assert got == pytest.approx({"ROUGE-1": 100 * 10 / 11 / 2, "ROUGE-2": 100 * 2 / 3 / 2,
                                 "ROUGE-L": 100 * 10 / 11 / 2})
    per_text = rouge_per_text(["the cat sat on the mat", "good"], ["The cat, on the mat!", "bad"])
    assert per_text["ROUGE-L"] == pytest.approx([100 * 10 / 11, 0.0])
    assert per_text["ROUGE-2"] == pytest.approx([100 * 2 / 3, 0.0])


def test_text_metrics_table():
    m = text_metrics(REFS, HYPS)
    assert list(m) == ["BLEU-1", "BLEU-4", "ROUGE-1", "ROUGE-2", "ROUGE-L"]
    assert m["BLEU-1"] == pytest.approx(100 * math.exp(-0.3) * 0.8)
    assert m["BLEU-4"] == pytest.approx(100 * math.exp(-0.3) * 0.5)
    # ROUGE-1: h1 vs r1: 5 of 6 / 7 -> F 10/13; h2 vs r2: 3 of 4 / 6 -> F 3/5
    assert m["ROUGE-1"] == pytest.approx(100 * (10 / 13 + 3 / 5) / 2)
    figures, per_text = text_scores(REFS, HYPS)                  # the same figures, and each text's ROUGE
    assert figures == m and per_text["ROUGE-1"] == pytest.approx([100 * 10 / 13, 100 * 3 / 5])
    with pytest.raises(ValueError):
        text_metrics(REFS, HYPS[:1])
    with pytest.raises(ValueError):
        text_metrics([], [])


def test_feature_metrics_hand_computed():
    vocab = {"scent", "color", "long lasting", "price"}
    features = ["scent", "Color", "price"]              # each record's own feature
    hyps = ["The Scent is long lasting",                 # {scent, long lasting}: own feature mentioned
            "nice color and scent",                      # {color, scent}: own feature mentioned
            "good value"]                                # {}: "price" missed
    m = feature_metrics(features, hyps, vocab)
    assert m["FMR"] == pytest.approx(2 / 3)
    assert m["FCR"] == pytest.approx(3 / 4)              # scent, long lasting, color of 4
    # DIV: mean overlap over the 3 pairs: |{1,2}| = 1 (scent), |{1,3}| = |{2,3}| = 0
    assert m["DIV"] == pytest.approx(1 / 3)
    # every explanation the same: overlap = its whole feature set for every pair
    assert feature_metrics(["scent"] * 3, ["scent and color"] * 3, vocab)["DIV"] == pytest.approx(2.0)
    assert feature_metrics(["scent"], ["scent"], vocab) == {"FMR": 1.0, "FCR": 0.25, "DIV": 0.0}  # no pairs


def test_feature_followed_by_punctuation_counts():
    m = feature_metrics(["scent", "card"], ["the scent, is lovely", "a nice card."], {"scent", "card"})
    assert m["FMR"] == 1.0 and m["FCR"] == 1.0


# ---------------------------------------------------------------------------------------------------- data

@pytest.fixture(scope="module")
def gift_dir(tmp_path_factory):
    """A dataset dir prepared from 1500 real Gift_Cards lines (read-only: copy it to change it)."""
    from data.features import FeatureSelector
    from data.prepare import parse_args, prepare
    tmp = tmp_path_factory.mktemp("gift_text")
    with gzip.open(GIFT_CARDS, "rt", encoding="utf-8") as f:
        lines = f.read().splitlines()[:1500]
    (tmp / "reviews.json").write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = tmp / "data"
    args = parse_args(["--reviews", str(tmp / "reviews.json"), "--out", str(out), "--k", "3", "--skip_bad"])
    prepare(args, selector=FeatureSelector(), log=quiet)
    load_dataset(out, log=quiet)  # writes negative.txt once (52 items: fewer than 99 per user)
    return out


def copy_dir(src, dst):
    shutil.copytree(src, dst)
    return dst


def with_rationale(src, dst):
    """A copy of a dataset dir with a hand-made explanation_rationale.json: every record of explanation.json plus
    groundtruth_explanation and review_summary."""
    dst = copy_dir(src, dst)
    splits = json.loads((dst / "explanation.json").read_text())
    for recs in splits.values():
        for r in recs:
            r["groundtruth_explanation"] = f"the user likes the {r['feature']} of this gift card"
            r["review_summary"] = f"a {'good' if (r['rating'] or 0) >= 4 else 'poor'} card with a nice {r['feature']}"
    (dst / "explanation_rationale.json").write_text(json.dumps(splits), encoding="utf-8")
    return dst


@pytest.fixture(scope="module")
def gift(gift_dir):
    return load_dataset(gift_dir, log=quiet)


@pytest.fixture(scope="module")
def gift_rationale(gift_dir, tmp_path_factory):
    return load_dataset(with_rationale(gift_dir, tmp_path_factory.mktemp("rat") / "data"), log=quiet)


def test_text_rules_retrieve_training_texts_by_hand():
    records = {"train": {1: [{"user": 1, "item": 5, "explanation": "a"}, {"user": 1, "item": 6, "explanation": "b"}],
                         2: [{"user": 2, "item": 5, "explanation": "c"}, {"user": 2, "item": 5, "explanation": "c"},
                             {"user": 2, "item": 7, "explanation": "b"}]},
               "test": {3: [{"user": 3, "item": 9, "explanation": "z"}]}}
    ds = Dataset(data_dir=None, sequences={}, num_items=9, negatives={}, id2user={}, id2item={}, records=records)
    rules = text_rules(ds, "explanation")
    # overall: b and c twice each, b first in file order; item 5: c twice, a once; user 1's last text: b
    assert rules["most_frequent"]({"user": 3, "item": 9}) == "b"
    assert rules["item_most_frequent"]({"user": 3, "item": 5}) == "c"
    assert rules["item_most_frequent"]({"user": 3, "item": 9}) == "b"          # no training text: the overall rule
    assert rules["user_most_recent"]({"user": 1, "item": 9}) == "b"
    assert rules["user_most_recent"]({"user": 3, "item": 9}) == "b"


def test_text_context_by_hand():
    a, b, c = ({"user": 1, "item": i, "explanation": t} for i, t in ((5, "a"), (6, "b"), (5, "c")))
    d = {"user": 2, "item": 5, "explanation": "d"}
    empty = {"user": 2, "item": 6, "explanation": ""}
    records = {"train": {1: [a, b, c], 2: [d, empty]}, "test": {1: [{"user": 1, "item": 5, "explanation": "z"}],
                                                                 3: [{"user": 3, "item": 9, "explanation": "y"}]}}
    ds = Dataset(data_dir=None, sequences={}, num_items=9, negatives={}, id2user={}, id2item={}, records=records)
    both = ("user", "item")
    # a training record: the user's text before it (after it for the first), the item's most frequent other text
    assert tasks.context_texts("explanation", ds, a, "train", sources=both) == {"user": "b", "item": "c"}
    assert tasks.context_texts("explanation", ds, b, "train", sources=both) == {"user": "a"}    # item 6: no other
    assert tasks.context_texts("explanation", ds, c, "train", sources=both) == {"user": "b", "item": "a"}
    assert tasks.context_texts("explanation", ds, empty, "train", sources=both) == {"user": "d", "item": "b"}
    # a test record: the user's last training text and the item's most frequent one (ties: first in file order)
    test = records["test"][1][0]
    assert tasks.context_texts("explanation", ds, test, "test", sources=both) == {"user": "c", "item": "a"}
    assert tasks.context_texts("explanation", ds, test, "test", sources=("item",)) == {"item": "a"}
    assert tasks.context_texts("explanation", ds, records["test"][3][0], "test", sources=both) == {}
    assert tasks.context_words({"item": "one two", "user": "x"}) == \
        [";", "user", "wrote", ":", "x", ";", "item", "wrote", ":", "one", "two"]
    assert tasks.text_context_sources("none") == () and tasks.text_context_sources(None) == ()
    assert tasks.text_context_sources("user,item") == both
    words, target = tasks.text_sample("explanation", ds, 1, None, "test", record=test, text_context=("user",))
    assert words[-5:] == [";", "user", "wrote", ":", "c"] and target == "z"


def test_text_context_of_a_test_record_is_what_the_rules_retrieve(gift_rationale):
    ds = gift_rationale
    for task, field in (("explanation", "explanation"), ("review", "review_summary")):
        rules, shown = text_rules(ds, field), 0
        for recs in ds.records["test"].values():
            for r in recs:
                context = tasks.context_texts(task, ds, r, "test", "review", ("user", "item"))
                if r["user"] in ds.records["train"]:
                    assert context["user"] == rules["user_most_recent"](r)
                    shown += 1
                if any(t["item"] == r["item"] for recs in ds.records["train"].values() for t in recs):
                    assert context["item"] == rules["item_most_frequent"](r)
        assert shown > 50


def test_mbr_pick_by_hand():
    # ROUGE-L F1 of "great gift card" against "great gift": LCS 2, P 2/3, R 1 -> .8; against "gift card" likewise;
    # "nice" shares no word with either: 0
    assert mbr_pick(["nice", "great gift card"], ["great gift", "gift card"]) == "great gift card"
    # the candidate that most of the evidence agrees with, wherever it stands; a tie goes to the first
    assert mbr_pick(["c d", "a b"], ["a b", "a b", "c d"]) == "a b"
    assert mbr_pick(["a b", "c d"], ["a b", "c d"]) == "a b"


def test_mbr_decoding_picks_each_records_beam_by_its_own_samples(gift_rationale, gift_encoder):
    import torch
    from transformers import T5ForConditionalGeneration
    from module import HDRec, t5_config_for
    ds, enc = gift_rationale, gift_encoder
    enc.add(tasks.id_words(ds))
    torch.manual_seed(0)
    model = HDRec(T5ForConditionalGeneration(t5_config_for("tiny", enc.tokenizer)), task_num=4, prompt_num=3,
                  seed=1).eval()
    records = [r for recs in ds.records["test"].values() for r in recs][:6]
    torch.manual_seed(3)
    got = generate_texts(model, enc.tokenizer, enc, ds, "explanation", records, batch_size=4, num_beams=3,
                         mbr_samples=5, max_new_tokens=8, progress=False)

    # the same draws by hand: per batch of 4 records, 3 beams and then 5 samples for each record
    def decode(ids):
        return [t.strip() for t in enc.tokenizer.batch_decode(ids, skip_special_tokens=True)]
    torch.manual_seed(3)
    expected, all_beams = [], []
    for chunk in (records[:4], records[4:]):
        samples = [tasks.SAMPLERS["explanation"](ds, r["user"], None, "test", record=r) for r in chunk]
        batch = tasks.collate(tasks.encode_samples(enc, samples), tasks.TASKS.index("explanation"))
        with autocast(torch.device("cpu")):
            beams = decode(model.generate(batch, num_beams=3, num_return_sequences=3, max_new_tokens=8))
            drawn = decode(model.generate(batch, num_beams=1, num_return_sequences=5, do_sample=True, top_k=0,
                                          max_new_tokens=8))
        for i in range(len(chunk)):
            all_beams.append(beams[3 * i:3 * i + 3])
            expected.append(mbr_pick(all_beams[-1], drawn[5 * i:5 * i + 5]))
    assert got == expected and all(text in mine for text, mine in zip(got, all_beams))
    # without samples: greedy decoding, one text per record
    assert len(generate_texts(model, enc.tokenizer, enc, ds, "explanation", records, num_beams=1, max_new_tokens=8,
                              progress=False)) == len(records)


def test_variety_and_its_warning():
    looped = ["g g g g", "g g g g", "g g g g", "a fine gift"]
    v = variety(looped)
    assert v == {"distinct": 0.5, "one_word_repeated": 0.75, "loops": 0.75, "most_frequent_share": 0.75}
    assert "WARNING: the generated texts barely vary" in variety_warning(v)
    assert variety_warning(variety(["a fine gift", "easy to use", "a fine gift", "works"])) is None   # half: not most
    # a loop inside a text, of words or of word pieces, is a loop; a word twice, or a piece three times, is not
    sub_word = ["This is a a andndndndnd", "This thehehehehe s", "it is a a a gift", "great great gift",
                "bananas", "a fine gift"]
    assert [loops(t) for t in sub_word] == [True, True, True, False, False, False]
    v = variety(sub_word)
    assert v["loops"] == 0.5 and v["one_word_repeated"] == 0 and variety_warning(v) is None
    assert "75.0% loop" in variety_warning(variety(sub_word[:3] + ["works"]))


def test_records_are_grouped_by_split_and_user(gift, gift_dir):
    raw = json.loads((gift_dir / "explanation.json").read_text())
    assert gift.records_file == "explanation.json" and "explanation.json" in gift.hashes
    assert set(gift.records) == {"train", "val", "test"}
    for split, recs in raw.items():
        grouped = gift.records[split]
        assert sum(map(len, grouped.values())) == len(recs) > 100
        assert all(r["user"] == u for u, rs in grouped.items() for r in rs)
        flat = [(r["user"], r["item"], r["explanation"]) for u in sorted(grouped) for r in grouped[u]]
        assert sorted(flat) == sorted((r["user"], r["item"], r["explanation"]) for r in recs)
    for u, (rec,) in gift.records["test"].items():  # leave-one-out split: one test record per user at most
        assert rec["item"] == gift.test_item(u)


def test_rationale_file_is_preferred(gift_rationale):
    assert gift_rationale.records_file == "explanation_rationale.json"
    assert "explanation_rationale.json" in gift_rationale.hashes and "explanation.json" not in gift_rationale.hashes
    recs = [r for by_user in gift_rationale.records.values() for rs in by_user.values() for r in rs]
    assert recs and all(r["groundtruth_explanation"].startswith("the user likes") for r in recs)


@pytest.mark.parametrize("split, index, field, value, message", [
    ("test", 2, "user", 9999, r"explanation.json: test\[2\]: user 9999 is not in sequential.txt"),
    ("val", 0, "item", 100000, r"explanation.json: val\[0\]: item 100000 is not in datamaps.json"),
    ("train", 1, "item", "x7", r"explanation.json: train\[1\] has a non-integer user or item id"),
])
def test_record_with_unknown_id_is_an_error(gift_dir, tmp_path, split, index, field, value, message):
    d = copy_dir(gift_dir, tmp_path / "data")
    splits = json.loads((d / "explanation.json").read_text())
    splits[split][index][field] = value
    (d / "explanation.json").write_text(json.dumps(splits))
    with pytest.raises(DataError, match=message) as e:
        load_dataset(d, log=quiet)
    assert str(d / "explanation.json") in str(e.value)


def test_renumber_items_maps_record_items(gift):
    perm = random_item_permutation(gift.num_items, seed=5)
    ds = renumber_items(gift, perm)
    for split, by_user in gift.records.items():
        for u, recs in by_user.items():
            assert [r["item"] for r in ds.records[split][u]] == [perm[r["item"]] for r in recs]
            assert [r["explanation"] for r in ds.records[split][u]] == [r["explanation"] for r in recs]
    assert all(r["item"] == ds.test_item(u) for u, (r,) in ds.records["test"].items())
    assert gift.records["test"][1][0]["item"] == gift.test_item(1)  # the original is left as it was


# ---------------------------------------------------------------------------------------------------- samplers

def test_explanation_text_choice():
    both = {"user": 1, "item": 2, "explanation": "review sentence", "groundtruth_explanation": "llm sentence"}
    plain = {"user": 1, "item": 3, "explanation": "review sentence"}
    assert tasks.explanation_text(both) == "llm sentence"                  # auto
    assert tasks.explanation_text(both, "llm") == "llm sentence"
    assert tasks.explanation_text(both, "review") == "review sentence"
    assert tasks.explanation_text(plain) == "review sentence"              # auto falls back to the review
    assert tasks.explanation_text(plain, "review") == "review sentence"
    with pytest.raises(ValueError, match="user 1, item 3 has no groundtruth_explanation"):
        tasks.explanation_text(plain, "llm")


def secret_copy(ds):
    """The dataset with every val/test record's texts replaced by marked ones."""
    records = {split: {u: [{**r, "explanation": f"secret {split} sentence", "review_summary": f"secret {split}",
                            "groundtruth_explanation": f"secret {split} llm"} if split != "train" else r
                           for r in recs] for u, recs in by_user.items()}
               for split, by_user in ds.records.items()}
    return dataclasses.replace(ds, records=records)


@pytest.mark.parametrize("task", ["explanation", "review"])
def test_training_samples_never_use_val_or_test_records(gift_rationale, task):
    ds = secret_copy(gift_rationale)
    rng = random.Random(0)
    users = tasks.trainable_users(ds, task)
    assert len(users) > 50
    train_pairs = {(u, r["item"]) for u, recs in ds.records["train"].items() for r in recs}
    for target in ("auto", "review"):
        for u in users * 3:     # nor the earlier texts its prompt shows (--text_context)
            words, text = tasks.SAMPLERS[task](ds, u, rng, "train", explanation_target=target,
                                               text_context=("user", "item"))
            assert not text.startswith("secret") and "secret" not in words
            item = int(next(w for w in words if w.startswith("item_")).split("_")[1])
            assert (u, item) in train_pairs and item in ds.train_items(u)
    for split in ("val", "test"):  # and evaluation samples come from their own split, their context from train
        shown = 0
        for u in tasks.trainable_users(ds, task, split):
            words, text = tasks.SAMPLERS[task](ds, u, rng, split, text_context=("user", "item"))
            assert text.startswith(f"secret {split}") and "secret" not in words
            shown += "wrote" in words
        assert shown > 0.8 * len(tasks.trainable_users(ds, task, split))
    # every batch of a training epoch
    for task_name, batch_users in tasks.epoch_plan(ds, [1, 0, 1, 0], 16, seed=1, epoch=1):
        assert set(batch_users) <= set(tasks.trainable_users(ds, task_name))


@pytest.fixture(scope="module")
def gift_encoder(gift_rationale):
    from module import train_tokenizer
    tokenizer, _ = train_tokenizer(tasks.tokenizer_corpus(gift_rationale, seed=1), vocab_size=8000)
    return tasks.WordEncoder(tokenizer)


def test_make_batch_cuts_text_targets(gift_rationale, gift_encoder):
    ds, enc = gift_rationale, gift_encoder
    users = tasks.trainable_users(ds, "explanation", "val")[:16]
    for task in ("explanation", "review"):
        batch = tasks.make_batch(ds, enc, task, users, random.Random(3), "val", exp_len=5,
                                 explanation_target="review")
        assert batch["task"].tolist() == [tasks.TASKS.index(task)] * len(users)
        for u, labels in zip(users, batch["labels"].tolist()):
            (rec,) = ds.records["val"][u]
            text = rec["explanation"] if task == "explanation" else rec["review_summary"]
            full = enc.tokenizer(text, add_special_tokens=False)["input_ids"]
            kept = [t for t in labels if t != -100]
            assert kept == full[:5] + [enc.eos]
        assert batch["labels"].shape[1] == 6 and max(
            len(enc.tokenizer(r["explanation"])["input_ids"]) for u in users for r in ds.records["val"][u]) > 6
    # id targets are never cut
    seq = tasks.make_batch(ds, enc, "sequential", users, random.Random(3), "val", exp_len=1)
    for u, labels in zip(users, seq["labels"].tolist()):
        assert [t for t in labels if t != -100] == enc.target(tasks.item_word(ds.val_item(u)))


# ---------------------------------------------------------------------------------------------------- scripts

def run(python, env, script, *args, ok=True, timeout=300):
    proc = subprocess.run([python, str(ROOT / script), *map(str, args)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)
    if ok:
        assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def test_copy_probe_makes_the_shown_text_the_answer(gift_dir, tmp_path, python, script_env):
    out = tmp_path / "probe"
    run(python, script_env, "scripts/copy_probe.py", "--data_dir", gift_dir, "--out", out, "--seed", "3")
    ds, original = load_dataset(out, log=quiet), load_dataset(gift_dir, log=quiet)
    pool = {r["explanation"] for by_user in original.records.values() for rs in by_user.values() for r in rs}
    per_user = {}
    for by_user in ds.records.values():
        for u, recs in by_user.items():
            per_user.setdefault(u, set()).update(r["explanation"] for r in recs)
    assert all(len(texts) == 1 for texts in per_user.values()) and set.union(*per_user.values()) <= pool
    assert len(set.union(*per_user.values())) > 0.5 * len(per_user)      # drawn per user, not one for all
    shown = [(tasks.context_texts("explanation", ds, r, "test", "review", ("user",)), r["explanation"])
             for recs in ds.records["test"].values() for r in recs]
    assert all(c["user"] == t for c, t in shown if c) and sum(1 for c, _ in shown if c) > 50
    assert "missing" in run(python, script_env, "scripts/copy_probe.py", "--data_dir", tmp_path, "--out",
                            tmp_path / "x", ok=False).stderr
    assert "give --out" in run(python, script_env, "scripts/copy_probe.py", "--data_dir", out, ok=False).stderr


@pytest.mark.slow
def test_copy_probe_checks_what_a_model_follows(gift_dir, tmp_path, python, script_env):
    out, ck = tmp_path / "probe", tmp_path / "ck"
    run(python, script_env, "scripts/copy_probe.py", "--data_dir", gift_dir, "--out", out)
    run(python, script_env, "pretrain.py", "--data_dir", out, "--checkpoint", ck, "--backbone", "tiny", "--ratio",
        "1:0:0:0", "--explanation_target", "review", "--text_context", "user", "--stop_on", "loss", "--epochs", "2",
        "--batch_size", "32", "--seed", "1")
    line = run(python, script_env, "scripts/copy_probe.py", "--data_dir", out, "--checkpoint", ck).stdout
    m = re.search(r"(\d+) test records shown another user's sentence: .* shown ([\d.]+), against the user's own "
                  r"([\d.]+)", line)
    assert m and int(m[1]) > 50 and all(0 <= float(v) <= 100 for v in m.groups()[1:])


def test_pretrain_refuses_a_text_share_without_records(copy_of_small, tmp_path, python, script_env):
    proc = run(python, script_env, "pretrain.py", "--data_dir", copy_of_small, "--checkpoint", tmp_path / "ck",
               "--backbone", "tiny", "--ratio", "1:1:1:3", ok=False, timeout=120)
    assert proc.returncode != 0
    assert "explanation task" in proc.stderr and "explanation.json" in proc.stderr
    assert not (tmp_path / "ck" / "model.safetensors").exists()


METRICS = ["BLEU-1", "BLEU-4", "ROUGE-1", "ROUGE-2", "ROUGE-L"]


def read_predictions(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.mark.slow
def test_exp_end_to_end(gift_dir, tmp_path, python, script_env):
    data, ck = copy_dir(gift_dir, tmp_path / "data"), tmp_path / "ck"
    run(python, script_env, "pretrain.py", "--data_dir", data, "--checkpoint", ck, "--backbone", "tiny",
        "--ratio", "1:1:0:1", "--epochs", "1", "--batch_size", "32", "--val_users", "30", "--text_context",
        "user,item", "--seed", "1")
    assert (ck / "model.safetensors").exists()

    # explanation.json only: scored against the review sentence
    out = run(python, script_env, "exp.py", "--data_dir", data, "--checkpoint", ck, "--users", "40").stdout
    assert "vs review sentence" in out and "vs LLM explanation" not in out
    ds = load_dataset(data, log=quiet)
    users = set(eval_users(ds, 40, seed=1))
    expected = [r for u, recs in ds.records["test"].items() if u in users for r in recs]
    preds = read_predictions(ck / "predictions_exp.jsonl")
    assert len(preds) == len(expected) > 10
    assert [(p["user"], p["item"], p["explanation"], p["feature"]) for p in preds] == \
           [(r["user"], r["item"], r["explanation"], r["feature"]) for r in expected]
    # the prompts showed the user's and the item's earlier texts (--text_context); the predictions say which
    assert [p["context"] for p in preds] == \
           [tasks.context_texts("explanation", ds, r, "test", "auto", ("user", "item")) for r in expected]
    assert sum(1 for p in preds if p["context"]) > 0.8 * len(preds)
    res = json.loads((ck / "results_exp.json").read_text())
    assert res["task"] == "exp" and res["users"] == 40 and res["all_users"] == len(ds.users)
    results = res["results"]
    assert res["format"] == "hdrec-results/2" and res["model"] == "HDRec (vs review sentence)"
    assert [k for k in results if k.startswith("HDRec")] == ["HDRec (vs review sentence)"] and list(results["HDRec (vs review sentence)"]) == METRICS
    # the text rules on the same records, scored the same way (a rule copies training sentences)
    rules = text_rules(ds, "explanation")
    for rule, answer in rules.items():
        assert results[f"{rule} (vs review sentence)"] == pytest.approx(
            text_metrics([p["explanation"] for p in preds], [answer(r) for r in expected]))
    assert set(res["details"]["variety"]) == {"HDRec", *rules}
    generated = [p["generated"] for p in preds]
    assert results["HDRec (vs review sentence)"] == pytest.approx(text_metrics([p["explanation"] for p in preds], generated))
    vocab = {r["feature"] for by_user in ds.records.values() for rs in by_user.values() for r in rs}
    assert res["details"]["features"] == pytest.approx(feature_metrics([p["feature"] for p in preds], generated, vocab))
    assert list(res["details"]["features"]) == ["FMR", "FCR", "DIV"]

    # validation records and MBR decoding, tagged: written beside the test figures, which stay as they were
    before = (ck / "results_exp.json").read_text()
    run(python, script_env, "exp.py", "--data_dir", data, "--checkpoint", ck, "--users", "40", "--split", "val",
        "--num_beams", "3", "--mbr_samples", "4", "--tag", "mbr")
    assert (ck / "results_exp.json").read_text() == before
    res = json.loads((ck / "results_exp_val_mbr.json").read_text())
    assert res["config"]["split"] == "val" and res["config"]["mbr_samples"] == 4 and res["config"]["num_beams"] == 3
    val = [r for u, recs in ds.records["val"].items() if u in users for r in recs]
    preds = read_predictions(ck / "predictions_exp_val_mbr.jsonl")
    assert [(p["user"], p["item"], p["explanation"]) for p in preds] == [(r["user"], r["item"], r["explanation"]) for r in val]
    assert [p["context"] for p in preds] == \
           [tasks.context_texts("explanation", ds, r, "val", "auto", ("user", "item")) for r in val]
    assert res["results"]["HDRec (vs review sentence)"] == pytest.approx(
        text_metrics([p["explanation"] for p in preds], [p["generated"] for p in preds]))

    # with explanation_rationale.json: both references, labelled; and the review-summary task
    rat = with_rationale(gift_dir, tmp_path / "rationale")
    out = run(python, script_env, "exp.py", "--data_dir", rat, "--checkpoint", ck, "--users", "40").stdout
    assert "vs review sentence" in out and "vs LLM explanation" in out
    results = json.loads((ck / "results_exp.json").read_text())["results"]
    assert [k for k in results if k.startswith("HDRec")] == ["HDRec (vs review sentence)", "HDRec (vs LLM explanation)"]
    preds = read_predictions(ck / "predictions_exp.jsonl")
    assert len(preds) == len(expected) and all(p["groundtruth_explanation"].startswith("the user likes") for p in preds)
    generated = [p["generated"] for p in preds]
    assert results["HDRec (vs LLM explanation)"] == pytest.approx(
        text_metrics([p["groundtruth_explanation"] for p in preds], generated))
    assert results["HDRec (vs review sentence)"] == pytest.approx(text_metrics([p["explanation"] for p in preds], generated))

    run(python, script_env, "exp.py", "--data_dir", rat, "--checkpoint", ck, "--users", "40", "--task", "review")
    res = json.loads((ck / "results_review.json").read_text())
    assert res["task"] == "review" and list(res["results"]["HDRec (vs review_summary)"]) == METRICS
    preds = read_predictions(ck / "predictions_review.jsonl")
    assert len(preds) == len(expected) and all(p["review_summary"].endswith(p["feature"]) for p in preds)
