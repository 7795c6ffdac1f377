"""scripts/repeat.py: mean ± std over seeds and paired tests over users, checked against hand-computed cases; and a
real two-seed run of the tiny model that resumes without redoing anything."""
import json
import math
import subprocess
import sys

import numpy as np
import pytest
from scipy import stats

from conftest import ROOT, make_slice, quiet
from dataset import load_dataset
from utils import UserError

sys.path.insert(0, str(ROOT / "scripts"))
import repeat  # noqa: E402


def results_file(path, seed, ranks, rule_ranks, users=None):
    """A results file written by the one writer (results.py)."""
    from pathlib import Path
    from dataset import Dataset
    from results import FULL_RANKING, write_results
    users = users or list(range(1, len(ranks) + 1))
    ds = Dataset(data_dir=Path("toy"), sequences={u: [1, 2, 3] for u in users}, num_items=20, negatives={},
                 id2user={}, id2item={}, hashes={"sequential.txt": "abc"})
    return write_results(path, task="seq", protocol=FULL_RANKING, model="HDRec (clean)", ds=ds, users=users,
                         ranks=ranks, reference_ranks={"co_occurrence": rule_ranks}, config={"seed": seed},
                         details={"list_quality": {"lists_with_invalid_id": 0}, "users_per_second": 3.0})


@pytest.fixture
def three_seeds(tmp_path):
    # 4 users; the rule is the same in every run (it has no seed)
    rule = [0, -1, 12, 3]
    runs = [[0, 1, -1, -1], [1, 1, 9, -1], [0, -1, -1, 2]]
    return [results_file(tmp_path / f"s{seed}.json", seed, r, rule) for seed, r in zip((1, 2, 3), runs)], runs, rule


def test_summary_is_mean_and_sample_std(three_seeds, capsys):
    files, runs, _ = three_seeds
    out = repeat.summary(files)["seq (full ranking, history excluded)"]
    # HR@10 per run: 2/4, 3/4, 2/4 -> mean 7/12, sample std sqrt(((1/12)^2 * 2 + (2/12)^2) / 2) = 0.1443...
    mean, std, n = out["HDRec (clean)"]["HR@10"]
    assert n == 3 and mean == pytest.approx(7 / 12) and std == pytest.approx(math.sqrt((2 * (1 / 12) ** 2 + (2 / 12) ** 2) / 2))
    # NDCG@10 of run 1: (1 + 1/log2(3)) / 4
    assert out["HDRec (clean)"]["NDCG@10"][0] == pytest.approx(np.mean([
        (1 + 1 / math.log2(3)) / 4, (2 / math.log2(3) + 1 / math.log2(11)) / 4, (1 + 1 / math.log2(4)) / 4]))
    assert out["co_occurrence"]["HR@10"][:2] == (pytest.approx(0.5), 0.0)
    table = capsys.readouterr().out
    assert "| HDRec (clean) | " in table and "0.5833 ± 0.1443" in table and "list_quality" not in table


def test_compare_averages_each_user_over_seeds_then_pairs(three_seeds):
    files, runs, rule = three_seeds
    res = repeat.compare(repeat_args(files, vs_rule="co_occurrence", metric="HR@10"))
    # per-user HR@10 averaged over seeds: user1 1, user2 2/3, user3 1/3, user4 1/3; the rule: 1, 0, 0, 1
    a, b = np.array([1, 2 / 3, 1 / 3, 1 / 3]), np.array([1.0, 0, 0, 1])
    assert res["users"] == 4 and res["mean_a"] == pytest.approx(a.mean()) and res["mean_b"] == pytest.approx(b.mean())
    d = a - b                                   # the paired t statistic by hand
    t = d.mean() / (d.std(ddof=1) / math.sqrt(len(d)))
    assert res["t_test_p"] == pytest.approx(2 * stats.t.sf(abs(t), len(d) - 1))
    assert res["wilcoxon_p"] == pytest.approx(stats.wilcoxon(a, b).pvalue)


def test_compare_two_configurations_on_shared_users_only(tmp_path):
    a = [results_file(tmp_path / "a.json", 1, [0, 0, 0, -1, 5], [0] * 5)]
    b = [results_file(tmp_path / "b.json", 1, [-1, 0, 3, -1], [0] * 4, users=[1, 2, 3, 9])]
    res = repeat.compare(repeat_args(a, vs=b, metric="HR@1"))
    assert res["users"] == 3 and res["mean_a"] == 1.0 and res["mean_b"] == pytest.approx(1 / 3)
    same = repeat.compare(repeat_args(a, vs=a))
    assert same["difference"] == 0 and same["t_test_p"] == 1.0 and same["wilcoxon_p"] == 1.0


def test_bad_input_is_a_user_error(tmp_path, three_seeds):
    files, _, _ = three_seeds
    with pytest.raises(UserError, match="no per-user ranks of 'nope'"):
        repeat.compare(repeat_args(files, vs_rule="nope"))
    with pytest.raises(UserError, match="--metric 'MRR'"):
        repeat.compare(repeat_args(files, vs_rule="co_occurrence", metric="MRR"))
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"task": "seq", "protocol": "clean", "results": {}}))
    with pytest.raises(UserError, match="old.json: a results file of an older version"):
        repeat.compare(repeat_args([old], vs_rule="co_occurrence"))
    with pytest.raises(UserError, match="--seed is set by repeat.py"):
        repeat.main(["run", "--out", str(tmp_path), "--", "--data_dir", "x", "--seed", "3"])
    with pytest.raises(UserError, match="--seeds '1,1'"):
        repeat.main(["run", "--seeds", "1,1", "--out", str(tmp_path), "--", "--data_dir", "x"])


def text_results_file(path, seed, model, rule, ids=("1:4", "2:7", "3:4")):
    """An exp results file with each record's ROUGE-L for the model and one rule, as exp.py writes it."""
    from pathlib import Path
    from dataset import Dataset
    from results import write_results
    ds = Dataset(data_dir=Path("toy"), sequences={1: [4, 5, 6]}, num_items=9, negatives={}, id2user={}, id2item={},
                 hashes={"explanation.json": "abc"})
    rows = {"HDRec (vs review sentence)": {"ROUGE-L": float(np.mean(model))},
            "user_most_recent (vs review sentence)": {"ROUGE-L": float(np.mean(rule))}}
    scores = {"HDRec (vs review sentence)": {"record_ids": list(ids), "ROUGE-L": model},
              "user_most_recent (vs review sentence)": {"record_ids": list(ids), "ROUGE-L": rule}}
    return write_results(path, task="exp", protocol="generated text", model="HDRec (vs review sentence)", ds=ds,
                         users=[1, 2, 3], rows=rows, config={"seed": seed}, record_scores=scores)


def test_text_files_pair_records_against_a_rule_and_another_run(tmp_path):
    a = [text_results_file(tmp_path / "a1.json", 1, [50.0, 0.0, 20.0], [40.0, 10.0, 10.0]),
         text_results_file(tmp_path / "a2.json", 2, [30.0, 10.0, 20.0], [40.0, 10.0, 10.0])]
    res = repeat.compare(repeat_args(a, vs_rule="user_most_recent", metric="ROUGE-L"))
    # records averaged over the two seeds: 40, 5, 20 against the rule's 40, 10, 10
    assert res["users"] == 3 and res["mean_a"] == pytest.approx(65 / 3) and res["mean_b"] == pytest.approx(20)
    assert res["t_test_p"] == pytest.approx(stats.ttest_rel([40, 5, 20], [40, 10, 10]).pvalue)
    # another configuration scored on two of the same records and one other: paired on the two shared
    b = [text_results_file(tmp_path / "b.json", 1, [10.0, 0.0, 0.0], [40.0, 10.0, 10.0], ids=("1:4", "2:7", "9:9"))]
    res = repeat.compare(repeat_args(a, vs=b, metric="ROUGE-L"))
    assert res["users"] == 2 and res["mean_a"] == pytest.approx(22.5) and res["mean_b"] == pytest.approx(5)
    with pytest.raises(UserError, match="no per-record scores of 'item_most_frequent"):
        repeat.compare(repeat_args(a, vs_rule="item_most_frequent", metric="ROUGE-L"))
    with pytest.raises(UserError, match="--metric 'NDCG@10': a text results file has ROUGE-L"):
        repeat.compare(repeat_args(a, vs_rule="user_most_recent"))


def repeat_args(files, vs=None, vs_rule=None, metric="NDCG@10"):
    import argparse
    return argparse.Namespace(files=files, vs=vs, vs_rule=vs_rule, metric=metric)


@pytest.mark.slow
def test_two_seeds_of_the_tiny_model_end_to_end(tmp_path, python, script_env):
    data = make_slice(tmp_path / "data", 64, seed=1)
    load_dataset(data, log=quiet)
    cmd = [python, "scripts/repeat.py", "run", "--seeds", "1,2", "--out", str(tmp_path / "runs"), "--eval", "seq",
           "--eval_args", "--sensitivity_users 8", "--", "--data_dir", str(data), "--backbone", "tiny",
           "--ratio", "0:1:0:0", "--epochs", "1", "--batch_size", "32", "--val_users", "20", "--rank_users", "20"]
    first = subprocess.run(cmd, cwd=ROOT, env=script_env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    files = [tmp_path / "runs" / f"seed_{s}" / "results_seq.json" for s in (1, 2)]
    assert [json.loads(f.read_text())["config"]["seed"] for f in files] == [1, 2]
    assert "seq (full ranking, history excluded), 2 runs (seeds 1, 2), users [64]" in first.stdout and " ± " in first.stdout
    again = subprocess.run(cmd, cwd=ROOT, env=script_env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and again.stdout.count("already evaluated") == 2
    compared = subprocess.run([python, "scripts/repeat.py", "compare", *map(str, files), "--vs_rule", "most_popular"],
                              cwd=ROOT, env=script_env, capture_output=True, text=True)
    assert compared.returncode == 0 and "paired over 64 users" in compared.stdout and "Wilcoxon p" in compared.stdout
