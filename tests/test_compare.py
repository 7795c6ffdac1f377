"""scripts/compare.py: one table of every model on one split, from the results files, and its bar chart."""
import json
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
    assert "| T5 mini (learn recipe, history in the decoder) | 17.9 | random | 2 | **0.0400** | 0.0700 |" in out
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
