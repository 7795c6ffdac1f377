"""The SASRec baseline (scripts/sasrec_recbole.py) in RecBole's own venv: its split is checked user by user against
ours, and its results file is in the seq.py format that scripts/compare.py and repeat.py read.

The venv is made by scripts/setup_recbole.sh (which scripts/setup.sh runs); these tests fail, not skip, without it.
"""
import json
import subprocess
import sys

import pytest

from conftest import ROOT, make_slice

sys.path.insert(0, str(ROOT / "scripts"))
import compare  # noqa: E402

VENV_PYTHON = ROOT / ".venv-recbole" / "bin" / "python"


def venv_python():
    assert VENV_PYTHON.exists(), "no RecBole venv: run `bash scripts/setup_recbole.sh` (scripts/setup.sh runs it)"
    return str(VENV_PYTHON)


def test_split_check_finds_a_user_whose_split_differs(tmp_path, script_env):
    data = make_slice(tmp_path / "beauty", 120, seed=3)
    program = f"""
import sys
sys.path.insert(0, {str(ROOT)!r}); sys.path.insert(0, {str(ROOT / 'scripts')!r})
import argparse
from recbole.config import Config
from recbole.data import create_dataset, data_preparation
from dataset import load_dataset
import sasrec_recbole as s
ds = load_dataset({str(data)!r}, negatives=False)
s.write_atomic_file(ds, {str(tmp_path / 'rb')!r}, 'beauty')
args = argparse.Namespace(out={str(tmp_path / 'out')!r}, epochs=1, stopping_step=1, lr=1e-3, batch_size=256,
                          dropout=0.5, seed=1, cuda=False)
config = Config(model='SASRec', dataset='beauty', config_dict=s.recbole_config(args, {str(tmp_path / 'rb')!r}, 'beauty'))
_, valid, test = data_preparation(config, create_dataset(config))
checked, bad = s.check_split(ds, {{'val': valid.dataset, 'test': test.dataset}})
print('CLEAN', checked['val'], checked['test'], len(bad['val']), len(bad['test']))
user = next(u for u in sorted(ds.sequences)[7:] if ds.sequences[u][-1] != ds.sequences[u][-2])
items = ds.sequences[user]
items[-1], items[-2] = items[-2], items[-1]      # our test and validation items swapped for one user
checked, bad = s.check_split(ds, {{'val': valid.dataset, 'test': test.dataset}})
print('SWAPPED', user, bad['val'], bad['test'])
"""
    out = subprocess.run([venv_python(), "-c", program], env=script_env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = {line.split()[0]: line.split()[1:] for line in out.stdout.splitlines() if line.split()}
    assert lines["CLEAN"] == ["120", "120", "0", "0"]
    user = lines["SWAPPED"][0]
    assert "".join(lines["SWAPPED"][1:]) == f"['{user}']['{user}']"


@pytest.mark.slow
def test_sasrec_trains_and_writes_a_comparable_results_file(tmp_path, script_env):
    data = make_slice(tmp_path / "beauty", 200, seed=5)
    out_dir = tmp_path / "sasrec"
    run = subprocess.run([venv_python(), "scripts/sasrec_recbole.py", "--data_dir", str(data), "--out", str(out_dir),
                          "--epochs", "2", "--batch_size", "256", "--dropout", "0.3", "--rank_users", "50",
                          "--seed", "3"],
                         cwd=ROOT, env=script_env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "split check: RecBole's validation and test rows equal ours for all 200 users" in run.stdout
    r = json.loads((out_dir / "results_seq.json").read_text())
    assert r["task"] == "seq" and r["protocol"] == "full ranking, history excluded"
    assert r["model"].startswith("SASRec (RecBole 1.2.1")
    assert r["details"]["split_check"] == {"users": {"val": 200, "test": 200}, "mismatches": {"val": 0, "test": 0}}
    assert not list(out_dir.rglob("*.pth"))                  # RecBole saved no pickle: the best weights stay in memory
    log = r["training"]["log"]
    assert len(log) == 2 and r["training"]["best_epoch"] in (0, 1)
    # the kept epoch is the best by our protocol's validation NDCG@10 (50 seeded users), RecBole's figure beside it
    assert r["training"]["best_val_NDCG@10"] == max(e["val_NDCG@10"] for e in log)
    assert all(0 <= e["recbole_val_NDCG@10"] <= 1 and 0 < e["minutes"] for e in log)
    assert r["details"]["recbole_config"]["hidden_dropout_prob"] == 0.3

    # the figures are those of the per-user ranks, history excluded: no rank reaches past the unbought items
    from dataset import load_sequences
    from metrics import ranking_metrics
    sequences = load_sequences(data / "sequential.txt")
    assert len(r["ranks"]) == len(r["user_ids"]) == 200
    assert r["results"][r["model"]] == pytest.approx(ranking_metrics(r["ranks"]))
    for user, rank in zip(r["user_ids"], r["ranks"]):
        assert 0 <= rank < 12101 - (len(set(sequences[user])) - 1)
    assert len(r["reference_ranks"]["most_popular"]) == 200 and "ease" in r["rule_settings"]

    # compare.py puts it in the table
    rows = compare.table([out_dir / "results_seq.json"])
    assert rows[0][0] == r["model"] and rows[0][2]["NDCG@10"] == pytest.approx(r["results"][r["model"]]["NDCG@10"])
