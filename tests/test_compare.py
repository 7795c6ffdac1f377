"""scripts/compare.py: one table of every model on one split, from the results files, and its bar chart."""
import json
import math
import sys

import pytest

from conftest import ROOT
from utils import UserError

sys.path.insert(0, str(ROOT / "scripts"))
import compare  # noqa: E402

ROW = {"HR@1": .01, "HR@5": .04, "HR@10": .07, "NDCG@5": .03, "NDCG@10": .04}


def seq_file(path, hashes, protocol="clean"):
    path.write_text(json.dumps({
        "task": "seq", "protocol": protocol, "item_ids": "random", "backbone": "mini", "data_hashes": hashes,
        "train_config": {"recipe": "learn", "history": "decoder", "seed": 2}, "training": {"minutes": 17.9},
        "results": {"HDRec (clean)": ROW, "most_popular": {**ROW, "HR@10": .0115}, "recent_popular": ROW,
                    "co_occurrence": {**ROW, "HR@10": .076}, "max_history_plus_1": ROW, "list_quality": {}}}))
    return path


def hllm_file(path, hashes):
    path.write_text(json.dumps({
        "model": "fine-tuned (lora, nce)", "config": {"seed": 2022}, "data_hashes": hashes,
        "train_log": [{"seconds": 60}, {"seconds": 120}],
        "metrics": {"test": {"Recall@5": .02, "Recall@10": .05, "Recall@20": .08, "NDCG@5": .01, "NDCG@10": .02}},
        "popularity": {"test": {"Recall@5": .005, "Recall@10": .0115, "NDCG@5": .003, "NDCG@10": .005}}}))
    return path


def test_table_rows_minutes_and_best_marked(tmp_path, capsys):
    hashes = {"sequential.txt": "abc"}
    files = [seq_file(tmp_path / "seq.json", hashes), hllm_file(tmp_path / "hllm.json", hashes)]
    rows = compare.main([*map(str, files), "--plot", str(tmp_path / "c.png")])
    names = [name for name, *_ in rows]
    assert names == ["T5 mini (learn recipe, history in the decoder)", "HSFT fine-tuned (lora, nce)",
                     "most popular (no training)", "recent popular (no training)",
                     "co-occurrence, last 3 items (no training)"]
    assert rows[1][1]["minutes"] == 3.0 and rows[1][2]["HR@10"] == .05       # Recall@10 read as HR@10
    out = capsys.readouterr().out
    assert ("| T5 mini (learn recipe, history in the decoder) | 17.9 | random | full ranking, history excluded | 2 | "
            "**0.0400** | 0.0700 |  |") in out
    assert "| **0.0760** |" in out and "max_history" not in out
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"


def test_different_splits_or_protocols_are_refused(tmp_path):
    a = seq_file(tmp_path / "a.json", {"sequential.txt": "abc"})
    b = hllm_file(tmp_path / "b.json", {"sequential.txt": "xyz"})
    with pytest.raises(UserError, match="b.json: its sequential.txt differs"):
        compare.table([a, b])
    with pytest.raises(UserError, match="protocol 'paper'"):
        compare.table([seq_file(tmp_path / "p.json", {}, protocol="paper")])
    (tmp_path / "x.json").write_text(json.dumps({"task": "topn", "results": {}}))
    with pytest.raises(UserError, match="x.json: neither a seq.py nor"):
        compare.table([tmp_path / "x.json"])


def test_missing_cutoffs_come_from_ranks_and_models_are_paired(tmp_path, capsys):
    """A figure a file lacks is computed from its per-user ranks where its list is long enough (seq.py: top_k),
    and every model with per-user ranks is paired with most popular and with the other models."""
    hashes = {"sequential.txt": "abc"}
    users = [1, 2, 3, 4]
    t5 = json.loads(seq_file(tmp_path / "t5.json", hashes).read_text())
    t5.update(config={"top_k": 10}, user_ids=users, ranks=[0, 3, -1, 9],
              reference_ranks={"most_popular": [-1, -1, 5, -1]})
    (tmp_path / "t5.json").write_text(json.dumps(t5))
    sasrec = {"task": "seq", "protocol": "clean", "model": "SASRec (RecBole 1.2.1, CE)", "data_hashes": hashes,
              "config": {"seed": 3}, "results": {"SASRec": {"Recall@10": .5}}, "user_ids": users,
              "ranks": [0, 15, 30, 1], "reference_ranks": {"most_popular": [40, 40, 40, 40]}}
    (tmp_path / "sasrec.json").write_text(json.dumps(sasrec))
    rows = compare.main([str(tmp_path / "t5.json"), str(tmp_path / "sasrec.json")])
    t5_figs, sasrec_figs = rows[0][2], rows[1][2]
    assert "HR@20" not in t5_figs and "NDCG@20" not in t5_figs            # a top-10 list says nothing about @20
    assert t5_figs["HR@10"] == .07                                       # recorded figures are kept
    assert sasrec_figs["HR@10"] == .5 and sasrec_figs["HR@20"] == .75    # ranks 0, 15, 1 of 0, 15, 30, 1
    assert sasrec_figs["NDCG@20"] == pytest.approx((1 + 1 / math.log2(17) + 1 / math.log2(3)) / 4)
    assert rows[1][1]["protocol"] == "full ranking, history excluded"
    out = capsys.readouterr().out
    t5_ndcg = (1 + 1 / math.log2(5) + 0 + 1 / math.log2(11)) / 4
    sasrec_ndcg = (1 + 0 + 0 + 1 / math.log2(3)) / 4
    popular_ndcg = (1 / math.log2(7)) / 4                                # rank 5 for user 3 only
    assert f"| T5 mini (learn recipe, history in the decoder) | most popular | 4 | {t5_ndcg:.4f} | " \
           f"{popular_ndcg:.4f} |" in out
    assert f"| T5 mini (learn recipe, history in the decoder) | SASRec (RecBole 1.2.1, CE) | 4 | {t5_ndcg:.4f} | " \
           f"{sasrec_ndcg:.4f} | {t5_ndcg - sasrec_ndcg:+.4f} |" in out
    assert "| SASRec (RecBole 1.2.1, CE) | most popular | 4 |" in out
