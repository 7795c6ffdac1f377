"""Does the recommender learn from the history? A generated dataset whose next item is a fixed function of the last
one: a model that reads the history gets HR@10 near 1, one that returns popular items gets about 10/num_items.

The `tiny` model trains a fixed number of epochs (a fixed number of steps: not a timed test), from random item
embeddings (no co-occurrence start, so the network itself must learn the rule), then seq.py ranks every item for
every user; its results file must show the rule learnt and lists that follow the history.
"""
import json
import random
import subprocess

import pytest

NUM_ITEMS = 40
NUM_USERS = 400


CYCLE = random.Random(0).sample(range(1, NUM_ITEMS + 1), NUM_ITEMS)


def next_item(item):
    """The item after `item` on one seeded cycle through all items: no sequence shorter than the cycle repeats an
    item, so the clean protocol (which never recommends a bought item) can always hit."""
    return CYCLE[(CYCLE.index(item) + 1) % NUM_ITEMS]


def write_rule_dataset(path, seed=0):
    """Every user starts at a random item and follows next_item for 6-12 purchases."""
    rng = random.Random(seed)
    path.mkdir(parents=True, exist_ok=True)
    lines = []
    for u in range(1, NUM_USERS + 1):
        seq = [rng.randint(1, NUM_ITEMS)]
        for _ in range(rng.randint(5, 11)):
            seq.append(next_item(seq[-1]))
        lines.append(" ".join(map(str, [u] + seq)))
    (path / "sequential.txt").write_text("\n".join(lines) + "\n")
    maps = {"id2user": {str(u): f"U{u}" for u in range(1, NUM_USERS + 1)},
            "id2item": {str(i): f"I{i}" for i in range(1, NUM_ITEMS + 1)}}
    (path / "datamaps.json").write_text(json.dumps(maps))
    return path


def test_next_item_rule_is_one_cycle():
    item, seen = 1, set()
    while item not in seen:
        seen.add(item)
        item = next_item(item)
    assert item == 1 and len(seen) == NUM_ITEMS


@pytest.mark.slow
def test_tiny_model_learns_a_known_next_item_rule(tmp_path, python, script_env):
    data = write_rule_dataset(tmp_path / "rule")
    ckpt = tmp_path / "ckpt"
    train = subprocess.run(
        [python, "pretrain.py", "--data_dir", str(data), "--checkpoint", str(ckpt), "--backbone", "tiny",
         "--item_init", "random", "--ratio", "0:1:0:0", "--batch_size", "32", "--lr", "3e-3", "--epochs", "12",
         "--rank_users", "100", "--seed", "1"],
        env=script_env, capture_output=True, text=True, cwd=script_env["PYTHONPATH"])
    assert train.returncode == 0, train.stderr[-2000:]
    evaluate = subprocess.run(
        [python, "seq.py", "--data_dir", str(data), "--checkpoint", str(ckpt), "--sensitivity_users", "200",
         "--seed", "1"], env=script_env, capture_output=True, text=True, cwd=script_env["PYTHONPATH"])
    assert evaluate.returncode == 0, evaluate.stderr[-2000:]
    saved = json.loads((ckpt / "results_seq.json").read_text())
    results = saved["results"]
    model = results["HDRec (clean)"]
    assert model["HR@10"] >= 0.9, model
    assert model["HR@10"] > 3 * results["most_popular"]["HR@10"]
    # the lists follow the history: swapping two users' histories changes nearly every list
    assert saved["details"]["personalisation"]["HDRec (clean)"]["input_sensitivity"] >= 0.9
    assert "WARNING" not in evaluate.stdout
