"""scripts/compare.py: one table of every model on one split, from the results files, and its bar chart."""
import dataclasses
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT
from dataset import Dataset
from metrics import ranking_metrics
from results import FULL_RANKING, write_results
from utils import UserError

sys.path.insert(0, str(ROOT / "scripts"))
import compare  # noqa: E402

DS = Dataset(data_dir=Path("toy"), sequences={u: [1, 2, 3, 4] for u in (1, 2, 3, 4)}, num_items=60, negatives={},
             id2user={}, id2item={}, hashes={"sequential.txt": "abc"})
USERS = [1, 2, 3, 4]
RULES = {"most_popular": [40, 3, 40, 40], "recent_popular": [40, 40, 2, 40], "co_occurrence": [0, 5, 12, 40],
         "item_knn": [1, 40, 40, 40], "ease": [0, 1, 40, 9], "max_history_plus_1": [0, 0, 0, 0]}


def seq_file(path, ranks=(0, 3, -1, 9), list_length=10, hashes=None, protocol=FULL_RANKING, rules=RULES):
    """A seq.py results file of the T5, written by the one writer."""
    ds = dataclasses.replace(DS, hashes=hashes or DS.hashes)
    return write_results(path, task="seq", protocol=protocol, model="HDRec (clean)", ds=ds, users=USERS,
                         ranks=list(ranks), reference_ranks=rules, list_length=list_length, item_ids="random",
                         backbone="mini", train_config={"recipe": "learn", "history": "decoder", "seed": 2},
                         training={"minutes": 17.9})


def other_file(path, name, ranks, seed, minutes, hashes=None, rules=RULES):
    ds = dataclasses.replace(DS, hashes=hashes or DS.hashes)
    return write_results(path, task="seq", protocol=FULL_RANKING, model=name, ds=ds, users=USERS, ranks=list(ranks),
                         reference_ranks=rules, item_ids="item text", config={"seed": seed},
                         training={"minutes": minutes})


def test_table_rows_minutes_and_best_marked(tmp_path, capsys):
    files = [seq_file(tmp_path / "seq.json"), other_file(tmp_path / "hllm.json", "HSFT fine-tuned (lora, nce)",
                                                         [0, 15, 30, 1], 2022, 3.0)]
    rows = compare.main([*map(str, files), "--plot", str(tmp_path / "c.png")])
    names = [name for name, *_ in rows]
    assert names == ["T5 mini (learn recipe, history in the decoder)", "HSFT fine-tuned (lora, nce)",
                     "most popular (no training)", "recent popular (no training)",
                     "co-occurrence, last 3 items (no training)", "item kNN (no training)", "EASE (no training)"]
    assert rows[1][1]["minutes"] == 3.0 and rows[1][2]["HR@10"] == .5 and rows[1][2]["HR@20"] == .75
    assert rows[6][2] == {m: v for m, v in ranking_metrics(RULES["ease"]).items() if m in compare.METRICS}
    out = capsys.readouterr().out
    t5 = ranking_metrics([0, 3, None, 9], list_length=10)
    assert (f"| T5 mini (learn recipe, history in the decoder) | 17.9 | random | {FULL_RANKING}, top-10 lists | 2 | "
            f"**{t5['HR@5']:.4f}** | **{t5['HR@10']:.4f}** |  |") in out      # a top-10 list says nothing @20
    assert "max_history" not in out
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"


def test_different_splits_protocols_rules_and_old_files_are_refused(tmp_path):
    a = seq_file(tmp_path / "a.json")
    b = other_file(tmp_path / "b.json", "SASRec", [0, 1, 2, 3], 1, 5.0, hashes={"sequential.txt": "xyz"})
    with pytest.raises(UserError, match="b.json: its sequential.txt differs"):
        compare.table([a, b])
    with pytest.raises(UserError, match="protocol 'paper'"):
        compare.table([seq_file(tmp_path / "p.json", protocol="paper")])
    changed = other_file(tmp_path / "c.json", "SASRec", [0, 1, 2, 3], 1, 5.0,
                         rules={**RULES, "most_popular": [40, 40, 40, 40]})
    with pytest.raises(UserError, match="c.json: its most_popular figures differ from .*a.json"):
        compare.table([a, changed])
    val = write_results(tmp_path / "v.json", task="seq", protocol=FULL_RANKING, model="HDRec (clean), validation",
                        ds=DS, users=USERS, ranks=[0, 1, 2, 3], reference_ranks=RULES, item_ids="random",
                        details={"split": "val"})
    with pytest.raises(UserError, match="v.json ranks validation items .*a.json test items"):
        compare.table([a, val])
    rows = compare.table([val])                                  # a split on its own: said in every row
    assert all(details["protocol"].endswith("validation items") for _, details, *_ in rows)
    (tmp_path / "old.json").write_text(json.dumps({"task": "seq", "protocol": "clean", "results": {}}))
    with pytest.raises(UserError, match="old.json: a results file of an older version"):
        compare.table([tmp_path / "old.json"])


def test_models_are_paired_with_most_popular_the_strongest_rule_and_each_other(tmp_path, capsys):
    t5 = seq_file(tmp_path / "t5.json")
    sasrec = other_file(tmp_path / "sasrec.json", "SASRec (RecBole 1.2.1, CE)", [0, 15, 30, 1], 3, 5.0)
    compare.main([str(t5), str(sasrec)])
    out = capsys.readouterr().out
    t5_ndcg = (1 + 1 / math.log2(5) + 0 + 1 / math.log2(11)) / 4
    sasrec_ndcg = (1 + 0 + 0 + 1 / math.log2(3)) / 4
    popular_ndcg = (1 / math.log2(5)) / 4                               # rank 3 for user 2 only
    ease_ndcg = (1 + 1 / math.log2(3) + 0 + 1 / math.log2(11)) / 4       # the strongest rule on NDCG@10
    assert f"| T5 mini (learn recipe, history in the decoder) | most popular | 4 | {t5_ndcg:.4f} | " \
           f"{popular_ndcg:.4f} |" in out
    assert f"| T5 mini (learn recipe, history in the decoder) | EASE | 4 | {t5_ndcg:.4f} | {ease_ndcg:.4f} |" in out
    assert f"| T5 mini (learn recipe, history in the decoder) | SASRec (RecBole 1.2.1, CE) | 4 | {t5_ndcg:.4f} | " \
           f"{sasrec_ndcg:.4f} | {t5_ndcg - sasrec_ndcg:+.4f} |" in out
    assert "| SASRec (RecBole 1.2.1, CE) | most popular | 4 |" in out and "| co-occurrence" not in out.split("paired")[1]


def test_learning_curves_of_every_file_that_has_one(tmp_path):
    """--curves: one line per results file with a training log (minutes, validation NDCG@10), the rules of the
    first T5 log as horizontal lines (another seed ranks other users); a file without a log draws nothing."""
    t5_log = [{"epoch": 1, "minutes": 0.7, "val_NDCG@10": .031}, {"epoch": 2, "minutes": 1.4, "val_NDCG@10": .038}]
    sasrec_log = [{"epoch": 0, "minutes": 0.5, "val_NDCG@10": .012, "recbole_val_NDCG@10": .015}]
    ds = DS
    files = [write_results(tmp_path / "t5.json", task="seq", protocol=FULL_RANKING, model="HDRec (clean)", ds=ds,
                           users=USERS, ranks=[0, 3, 5, 9], reference_ranks=RULES, config={"seed": 1},
                           backbone="tiny", train_config={"recipe": "learn", "history": "decoder"},
                           training={"minutes": 1.4, "log": t5_log, "val_rules": {"co_occurrence": .06}}),
             other_file(tmp_path / "hllm.json", "HSFT", [0, 15, 30, 1], 2022, 3.0),
             write_results(tmp_path / "t5_seed2.json", task="seq", protocol=FULL_RANKING, model="HDRec (clean)",
                           ds=ds, users=USERS, ranks=[0, 3, 5, 9], reference_ranks=RULES, config={"seed": 2},
                           backbone="tiny", train_config={"recipe": "learn", "history": "decoder"},
                           training={"minutes": 0.7, "log": t5_log[:1], "val_rules": {"co_occurrence": .07}})]
    sasrec = write_results(tmp_path / "sasrec.json", task="seq", protocol=FULL_RANKING, model="SASRec", ds=ds,
                           users=USERS, ranks=[1, 2, 3, 4], reference_ranks=RULES, config={"seed": 1},
                           training={"minutes": 0.5, "log": sasrec_log})
    lines, rules = compare.curves([*files, sasrec], tmp_path / "curves.png")
    assert lines == {"T5 tiny (learn recipe, history in the decoder), seed 1": ([0.7, 1.4], [.031, .038]),
                     "T5 tiny (learn recipe, history in the decoder), seed 2": ([0.7], [.031]),
                     "SASRec, seed 1": ([0.5], [.012])}     # named as in the table: two T5s stay apart
    assert rules == {"co_occurrence": .06}                  # seed 1's users, not overwritten by seed 2's
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"


def test_across_datasets_and_seeds(tmp_path, capsys):
    """--across: one row per (dataset, model, settings), mean ± sample std over its seeds, the configuration with the
    best validation figure in bold, the paired test against the strongest rule over seed-averaged users; each
    dataset's rules once, with the setting validation chose; the same settings and seed twice is refused."""
    def run(name, dataset, seed, ranks, batch, val):
        ds = dataclasses.replace(DS, hashes={"sequential.txt": dataset})
        return write_results(tmp_path / f"{dataset}_{batch}_{seed}.json", task="seq", protocol=FULL_RANKING,
                             model="SASRec", ds=ds, users=USERS, ranks=ranks, reference_ranks=RULES,
                             config={"data_dir": f"data/{dataset}", "seed": seed, "batch_size": batch},
                             training={"minutes": 2.0 * seed, "log": [{"minutes": 1, "val_NDCG@10": val}]},
                             rule_settings={"ease": {"setting": {"lambda": 100},
                                                     "validation_NDCG@10": {"20": .01, "100": .02}}})
    files = [run("SASRec", "beauty", 1, [0, 0, 40, 40], 256, .05), run("SASRec", "beauty", 2, [0, 40, 40, 40], 256, .07),
             run("SASRec", "beauty", 1, [1, 1, 1, 1], 2048, .04), run("SASRec", "toys", 1, [0, 1, 2, 3], 256, .03)]
    rows = compare.main(["--across", *map(str, files)])
    out = capsys.readouterr().out
    assert [(r["dataset"], r["model"]) for r in rows][:3] == [("beauty", "SASRec (batch_size 256)"),
                                                              ("beauty", "SASRec (batch_size 2048)"),
                                                              ("beauty", "most popular (no training)")]
    b256 = rows[0]
    assert b256["seeds"] == [1, 2] and b256["NDCG@10"] == [.5, .25]
    ease = (1 + 1 / math.log2(3) + 0 + 1 / math.log2(11)) / 4             # the strongest rule on these users
    assert b256["strongest"] == "ease" and b256["versus"]["mean_b"] == pytest.approx(ease)
    assert b256["versus"]["mean_a"] == pytest.approx((1 + .5) / 4)         # each user averaged over the two seeds
    assert "| beauty | **SASRec (batch_size 256)** | 1, 2 | 3.0 | 0.0600 ± 0.0141 | 0.3750 ± 0.1768 | " \
           "0.3750 ± 0.1768 |" in out
    assert "| beauty | SASRec (batch_size 2048) | 1 |" in out                 # worse on validation: not bold
    assert "| toys | SASRec | 1 |" in out                                   # one configuration there: no settings
    assert "EASE (no training; lambda 100 (of 20, 100, on validation))" in out
    assert sum(r["model"].startswith("EASE") for r in rows) == 2              # once per dataset
    with pytest.raises(UserError, match="same settings and seed 1"):
        compare.across([files[0], files[0]])


def test_across_chooses_on_the_held_out_validation_users_where_every_run_has_them(tmp_path, capsys):
    """The bold row: the configuration with the best figure on the validation users that did not choose the
    checkpoint (results_seq_val.json beside results_seq.json) where every run of the family on the dataset has one;
    the best of the learning curves where any lacks it."""
    def run(folder, lr_decay, seed, curve, held_out=None):
        (tmp_path / folder).mkdir(exist_ok=True)
        common = dict(task="seq", protocol=FULL_RANKING, ds=DS, users=USERS, reference_ranks=RULES, item_ids="random",
                      backbone="tiny", train_config={"recipe": "learn", "history": "decoder", "seed": seed,
                                                     "lr_decay": lr_decay})
        path = write_results(tmp_path / folder / "results_seq.json", model="HDRec (clean)", ranks=[0, 3, 9, 40],
                             training={"minutes": 30.0, "log": [{"minutes": 1, "val_NDCG@10": curve}]}, **common)
        if held_out is not None:
            write_results(tmp_path / folder / "results_seq_val.json", model="HDRec (clean), validation",
                          ranks=[0, held_out, 40, 40], details={"split": "val"}, **common)
        return str(path)
    constant = [run("c1", "none", 1, .08, 5), run("c2", "none", 2, .07, 6)]
    plateau = [run("p1", "plateau", 1, .07, 0), run("p2", "plateau", 2, .06, 1)]
    compare.main(["--across", *constant, *plateau])
    out = capsys.readouterr().out
    held = [(1 + 1 / math.log2(h + 2)) / 4 for h in (0, 1, 5, 6)]           # NDCG@10 of ranks [0, h, 40, 40]
    assert f"| **T5 tiny (learn recipe, history in the decoder) (lr_decay plateau)** | 1, 2 | 30.0 | 0.0650 ± " \
           f"0.0071 / {np.mean(held[:2]):.4f} ± {np.std(held[:2], ddof=1):.4f} |" in out
    assert "| T5 tiny (learn recipe, history in the decoder) (lr_decay none) | 1, 2 |" in out
    (tmp_path / "p2" / "results_seq_val.json").unlink()                   # one run without: the curves decide
    compare.main(["--across", *constant, *plateau])
    out = capsys.readouterr().out
    assert "| **T5 tiny (learn recipe, history in the decoder) (lr_decay none)** | 1, 2 | 30.0 | 0.0750 ± " in out


def test_by_last_item_bins_users_by_the_training_count_of_their_last_history_item():
    """scripts/by_last_item.py: the test's last history item is seq[-2]; its count is over the training parts
    (seq[:-2] of every user)."""
    import by_last_item
    ds = dataclasses.replace(DS, sequences={1: [1, 2, 3, 9, 4], 2: [1, 2, 5, 6], 3: [2, 2, 7, 8], 4: [1, 3, 2, 9]})
    # training parts [1, 2, 3], [1, 2], [2, 2], [1, 3]: item 2 occurs 4 times; 9, 5 and 7 (users 1-3) never
    figures = {1: 1.0, 2: 0.5, 3: 0.0, 4: 0.25}
    out = by_last_item.by_count(ds, figures, bins=((0, 1), (1, 4), (4, None)))
    assert list(out) == ["0", "1-3", "4+"]
    assert out["0"] == (3, 0.5) and out["4+"] == (1, 0.25) and out["1-3"][0] == 0 and math.isnan(out["1-3"][1])


def test_two_runs_of_one_model_are_named_by_the_settings_they_differ_in(tmp_path):
    """Table rows, curves and by_last_item: two T5 runs are told apart by their differing flags; a flag missing from
    an older run counts as what that run did before the flag existed (name_user yes)."""
    def t5(path, **flags):
        return write_results(path, task="seq", protocol=FULL_RANKING, model="HDRec (clean)", ds=DS, users=USERS,
                             ranks=[0, 1, 2, 3], reference_ranks=RULES, backbone="tiny",
                             train_config={"recipe": "learn", "history": "decoder", "seed": 1, "dropout": 0.3, **flags})
    files = [t5(tmp_path / "a.json"), t5(tmp_path / "b.json", name_user="no"),
             t5(tmp_path / "c.json", name_user="no", dropout=0.5),
             t5(tmp_path / "d.json", name_user="no", dropout=0.5, val_texts=500, seed=2)]   # a validation sample size
    names = [name for name, *_ in compare.table(files)][:4]
    base = "T5 tiny (learn recipe, history in the decoder)"
    assert names == [f"{base} (dropout 0.3, name_user yes)", f"{base} (dropout 0.3, name_user no)",
                     f"{base} (dropout 0.5, name_user no)", f"{base} (dropout 0.5, name_user no)"]
    # a text-task flag is no setting of a run without text tasks, and one of a run with them
    seq_only = [t5(tmp_path / f"s{i}.json", ratio="0:1:0:0", seed=i, **flags)
                for i, flags in enumerate([{}, {"text_context": "user,item"}, {"exp_len": 30}])]
    assert len({name for name, *_ in compare.table(seq_only)[:3]}) == 1
    texts = [t5(tmp_path / f"t{i}.json", ratio="1:1:0:3", seed=i, **flags)
             for i, flags in enumerate([{}, {"text_context": "user,item"}])]
    assert [name for name, *_ in compare.table(texts)][:2] == [f"{base} (text_context none)",
                                                               f"{base} (text_context user,item)"]


def test_across_refuses_one_dataset_on_two_splits_or_two_rule_definitions(tmp_path):
    """--across checks each dataset's files as the one-dataset table does: one split, the rules ranked alike."""
    def run(name, seed, hashes=None, rules=RULES):
        ds = dataclasses.replace(DS, hashes=hashes or DS.hashes)
        return write_results(tmp_path / f"{name}_{seed}.json", task="seq", protocol=FULL_RANKING, model=name, ds=ds,
                             users=USERS, ranks=[0, 1, 2, 3], reference_ranks=rules,
                             config={"data_dir": "data/beauty", "seed": seed})
    with pytest.raises(UserError, match="its sequential.txt differs"):
        compare.across([run("SASRec", 1), run("GRU4Rec", 1, hashes={"sequential.txt": "xyz"})])
    with pytest.raises(UserError, match="its most_popular figures differ"):
        compare.across([run("SASRec", 2), run("GRU4Rec", 2, rules={**RULES, "most_popular": [40, 40, 40, 40]})])


def test_kept_results_read_back_as_the_originals(tmp_path, capsys):
    """scripts/keep_results.py writes a run's results files gzipped under docs/runs' layout; compare.py reads them
    (the held-out validation file beside included) to the same table; a broken or missing file is a one-line error."""
    import keep_results
    checkpoints = tmp_path / "checkpoint"
    run = checkpoints / "toys_seeds" / "seed_1"
    run.mkdir(parents=True)
    common = dict(task="seq", protocol=FULL_RANKING, ds=DS, users=USERS, reference_ranks=RULES, item_ids="random",
                  backbone="tiny", train_config={"recipe": "learn", "history": "decoder", "seed": 1})
    write_results(run / "results_seq.json", model="HDRec (clean)", ranks=[0, 3, 9, 40],
                  training={"minutes": 30.0, "log": [{"minutes": 1, "val_NDCG@10": .07}]}, **common)
    write_results(run / "results_seq_val.json", model="HDRec (clean), validation", ranks=[0, 2, 40, 40],
                  details={"split": "val"}, **common)
    (run / "model.safetensors").write_bytes(b"weights")                   # not kept
    keep_results.main([str(run), "--into", str(tmp_path / "runs"), "--checkpoints", str(checkpoints)])
    kept = tmp_path / "runs" / "toys_seeds" / "seed_1"
    assert sorted(p.name for p in kept.iterdir()) == ["results_seq.json.gz", "results_seq_val.json.gz"]
    capsys.readouterr()
    compare.main(["--across", str(run / "results_seq.json")])
    original = capsys.readouterr().out
    compare.main(["--across", str(kept / "results_seq.json.gz")])
    assert capsys.readouterr().out == original
    assert compare.held_out_validation(kept / "results_seq.json.gz") == pytest.approx((1 + 1 / math.log2(4)) / 4)
    (kept / "results_seq.json.gz").write_bytes(b"not gzip")
    with pytest.raises(UserError, match=r"results_seq\.json\.gz: not a gzip file"):
        compare.main(["--across", str(kept / "results_seq.json.gz")])
    with pytest.raises(UserError, match="no results_"):
        keep_results.main([str(tmp_path / "runs"), "--into", str(tmp_path / "runs2")])
