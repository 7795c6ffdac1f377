"""End to end on slices of the real beauty split with the `tiny` model: pretrain.py -> seq.py -> topn.py -> results
JSON; leak-free item ids; bitwise reproducibility; resume after an interrupted run. Every script runs as a
subprocess (sys.executable), offline, with one CPU thread."""
import json
import shutil
import subprocess

import pytest
import torch
from safetensors.torch import load_file

from dataset import load_dataset, random_item_permutation, renumber_items
from evaluation import eval_users, rank_next
from metrics import ranking_metrics
from ranking import RULE_NAMES, candidate_scores, curve_users, eval_cases, rank_targets, rule_ranks, rule_scores
from tasks import WordEncoder, id_words, trainable_users
from module import load_checkpoint
from utils import file_sha256

from conftest import ROOT, make_slice, quiet

pytestmark = pytest.mark.slow

METRICS = ["HR@1", "HR@5", "HR@10", "HR@20", "NDCG@5", "NDCG@10", "NDCG@20"]
TRAIN = ["--backbone", "tiny", "--ratio", "0:1:0:1", "--batch_size", "32", "--val_users", "50", "--seed", "1"]


def run(python, env, script, *args, timeout=300):
    proc = subprocess.run([python, str(ROOT / script), *map(str, args)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout + proc.stderr


def tensors(path):
    return load_file(str(path))


def assert_same_tensors(a, b):
    a, b = tensors(a), tensors(b)
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def without_time(history):
    timings = ("minutes", "seconds_per_epoch", "samples_per_second")
    return [{k: v for k, v in h.items() if k not in timings} for h in history]


def check_metrics(row):
    assert list(row) in (METRICS, [m for m in METRICS if not m.endswith("@20")])     # top-10 lists: nothing @20
    assert all(0.0 <= v <= 1.0 for v in row.values())
    assert row["HR@1"] <= row["HR@5"] <= row["HR@10"] and row["NDCG@5"] <= row["NDCG@10"] <= row["HR@10"]


PROTOCOLS = {("seq", "clean"): "full ranking, history excluded", ("seq", "paper"): "paper",
             ("topn", "clean"): "100 candidates", ("topn", "paper"): "100 candidates, paper beams"}


def check_results(path, task, protocol, users, all_users, item_ids, data_dir):
    res = json.loads(path.read_text())
    assert res["format"] == "hdrec-results/2"
    assert res["task"] == task and res["protocol"] == PROTOCOLS[task, protocol]
    assert res["users"] == users and res["all_users"] == all_users and res["item_ids"] == item_ids
    assert res["config"]["protocol"] == protocol and res["config"]["data_dir"] == str(data_dir)
    assert res["train_config"]["ratio"] == "0:1:0:1" and res["backbone"] == "tiny"
    assert res["data_hashes"] == {n: file_sha256(data_dir / n) for n in ("sequential.txt", "datamaps.json",
                                                                         "negative.txt")}
    assert {"python", "torch", "transformers", "numpy", "machine"} <= set(res["versions"])
    assert "cores, bf16 " in res["versions"]["machine"]          # what a minutes budget ran on
    assert res["seconds"] > 0 and res["details"]["users_per_second"] > 0
    assert res["model"] == f"HDRec ({protocol})" and set(res["results"]) == {res["model"], *RULE_NAMES}
    for row in res["results"].values():
        check_metrics(row)
    assert ranking_metrics(res["ranks"], res["list_length"]) == pytest.approx(res["results"][res["model"]])
    assert set(res["rule_settings"]["ease"]["setting"]) == {"lambda"}
    return res


def reference_sequential(ds, users):
    return {rule: ranking_metrics(ranks) for rule, ranks in rule_ranks(ds, users, "test", log=quiet).items()}


def reference_topn(ds, users):
    """The rules on each user's 100 candidates, through the evaluation core's one ranking."""
    candidates = [[ds.test_item(u)] + ds.negatives[u] for u in users]
    _, histories, _ = eval_cases(ds, "test", users)
    nothing = [()] * len(users)
    return {rule: ranking_metrics(rank_targets(candidate_scores(score_fn(histories), candidates), nothing,
                                               [c[0] for c in candidates]))
            for rule, score_fn in rule_scores(ds, RULE_NAMES, log=quiet).items()}


# ---------------------------------------------------------------------------------------------------- published ids, 300 users

@pytest.fixture(scope="module")
def published(small_data_dir, tmp_path_factory, python, script_env):
    ckpt = tmp_path_factory.mktemp("run") / "beauty"
    log = run(python, script_env, "pretrain.py", "--data_dir", small_data_dir, "--checkpoint", ckpt, "--epochs", 1,
              "--recipe", "paper", *TRAIN)      # the paper's setting: published ids, history in the encoder
    return ckpt, log


def test_pretrain_writes_a_checkpoint(published, small_data_dir, small_ds):
    ckpt, log = published
    assert "resuming" not in log and "training a SentencePiece tokenizer" in log
    for name in ("model.safetensors", "config.json", "tokenizer", "tokenizer/spm.model", "train_log.json",
                 "curve.png", "last/train_state.json", "last/train_state.safetensors", "last/model.safetensors"):
        assert (ckpt / name).exists(), name
    assert not list(ckpt.rglob("*.tmp")) and not list(ckpt.rglob("*.tmp.png"))
    assert (ckpt / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    history = json.loads((ckpt / "train_log.json").read_text())
    assert [(h["epoch"], h["step"]) for h in history] == [(1, 20)]     # ceil(300/32) sequential + topn batches
    assert history[0]["samples"] == 600 and set(history[0]["val"]) == {"sequential", "topn"}
    assert history[0]["seconds_per_epoch"] > 0 and history[0]["samples_per_second"] > 0
    assert "s/epoch" in log and "samples/s" in log
    state = json.loads((ckpt / "last" / "train_state.json").read_text())
    assert (state["epoch"], state["step"], state["item_map"]) == (2, 0, None)

    meta = json.loads((ckpt / "config.json").read_text())["hdrec"]
    assert meta["item_ids"] == "published" and meta["item_map"] is None and meta["backbone"] == "tiny"
    assert meta["ratio"] == [0, 1, 0, 1] and meta["seed"] == 1
    assert meta["data_hashes"] == small_ds.hashes
    assert meta["best"]["val_mean"] == pytest.approx(history[0]["val_mean"])
    model, tokenizer, meta2 = load_checkpoint(ckpt)
    assert meta2 == meta and tokenizer.eos_token_id == 1


@pytest.mark.parametrize("protocol", ["clean", "paper"])
def test_seq(published, small_data_dir, small_ds, python, script_env, protocol):
    ckpt, _ = published
    log = run(python, script_env, "seq.py", "--data_dir", small_data_dir, "--checkpoint", ckpt, "--users", 40,
              "--protocol", protocol)
    assert "HR@10" in log and "warning" not in log
    path = ckpt / ("results_seq.json" if protocol == "clean" else "results_seq_paper.json")
    res = check_results(path, "seq", protocol, 40, 300, "published", small_data_dir)
    quality = res["details"]["list_quality"]
    assert set(quality) == {"lists_with_invalid_id", "lists_with_duplicate", "lists_with_bought_item"}
    assert all(0 <= v <= 40 for v in quality.values())
    if protocol == "clean":
        assert quality == {"lists_with_invalid_id": 0, "lists_with_duplicate": 0, "lists_with_bought_item": 0}
    # the reference rules are computed on the same users and ids
    users = eval_users(small_ds, 40, 1)
    expected = reference_sequential(small_ds, users)
    for rule in expected:
        assert res["results"][rule] == pytest.approx(expected[rule])


@pytest.mark.parametrize("protocol", ["clean", "paper"])
def test_topn(published, small_data_dir, small_ds, python, script_env, protocol):
    ckpt, _ = published
    run(python, script_env, "topn.py", "--data_dir", small_data_dir, "--checkpoint", ckpt, "--users", 40,
        "--protocol", protocol)
    path = ckpt / ("results_topn.json" if protocol == "clean" else "results_topn_paper.json")
    res = check_results(path, "topn", protocol, 40, 300, "published", small_data_dir)
    expected = reference_topn(small_ds, eval_users(small_ds, 40, 1))
    for rule in expected:
        assert res["results"][rule] == pytest.approx(expected[rule])


# ---------------------------------------------------------------------------------------------------- random ids, resume, reproducibility

@pytest.fixture(scope="module")
def data64(tmp_path_factory):
    """64 users (seed 1): max(history)+1 hits 6 of them under the published ids, none under random ids."""
    d = make_slice(tmp_path_factory.mktemp("beauty64"), 64, seed=1)
    load_dataset(d, log=quiet)
    return d


def train_random(python, env, data_dir, ckpt, *extra):
    return run(python, env, "pretrain.py", "--data_dir", data_dir, "--checkpoint", ckpt, "--epochs", 2,
               "--item_ids", "random", *TRAIN, *extra)


@pytest.fixture(scope="module")
def random_run(data64, tmp_path_factory, python, script_env):
    ckpt = tmp_path_factory.mktemp("random") / "a"
    return ckpt, train_random(python, script_env, data64, ckpt)


def test_random_item_ids_are_saved_and_applied(random_run, data64, python, script_env):
    ckpt, _ = random_run
    ds = load_dataset(data64, log=quiet)
    item_map = json.loads((ckpt / "config.json").read_text())["hdrec"]["item_map"]
    assert item_map == random_item_permutation(ds.num_items, 1)            # seeded by --seed
    assert item_map[0] == 0 and sorted(item_map[1:]) == list(range(1, ds.num_items + 1))
    assert json.loads((ckpt / "last" / "train_state.json").read_text())["item_map"] == item_map
    history = json.loads((ckpt / "train_log.json").read_text())
    assert [(h["epoch"], h["step"]) for h in history] == [(1, 4), (2, 4)]

    run(python, script_env, "seq.py", "--data_dir", data64, "--checkpoint", ckpt, "--batch_size", 64)
    res = check_results(ckpt / "results_seq.json", "seq", "clean", 64, 64, "random", data64)
    assert res["details"]["list_quality"] == {"lists_with_invalid_id": 0, "lists_with_duplicate": 0,
                                              "lists_with_bought_item": 0}
    users = eval_users(ds, 0, 1)
    leak_free = reference_sequential(renumber_items(ds, item_map), users)
    published = reference_sequential(ds, users)
    assert published["max_history_plus_1"]["HR@10"] > leak_free["max_history_plus_1"]["HR@10"]
    assert res["results"]["max_history_plus_1"] == pytest.approx(leak_free["max_history_plus_1"])
    assert res["results"]["max_history_plus_1"] != pytest.approx(published["max_history_plus_1"])
    assert res["results"]["most_popular"] == pytest.approx(leak_free["most_popular"])


def test_two_identical_runs_give_identical_weights(random_run, data64, tmp_path, python, script_env):
    ckpt, _ = random_run
    other = tmp_path / "b"
    train_random(python, script_env, data64, other)
    assert_same_tensors(ckpt / "model.safetensors", other / "model.safetensors")
    assert_same_tensors(ckpt / "last" / "model.safetensors", other / "last" / "model.safetensors")
    assert_same_tensors(ckpt / "last" / "train_state.safetensors", other / "last" / "train_state.safetensors")
    assert without_time(json.loads((ckpt / "train_log.json").read_text())) == \
        without_time(json.loads((other / "train_log.json").read_text()))
    assert (ckpt / "tokenizer" / "spm.model").read_bytes() == (other / "tokenizer" / "spm.model").read_bytes()


def test_seq_on_validation_ranks_the_users_that_did_not_choose_the_checkpoint(random_run, data64, tmp_path, python,
                                                                               script_env):
    """seq.py --split val: each user's validation item after the training part, for the users outside pretrain.py's
    --rank_users sample; on that sample the same ranking gives the best figure of the training log (one definition);
    no test figure is written; a run whose sample holds every user leaves nothing to compare on (an error)."""
    ckpt = tmp_path / "val"
    train_random(python, script_env, data64, ckpt, "--rank_users", "16")
    run(python, script_env, "seq.py", "--data_dir", data64, "--checkpoint", ckpt, "--batch_size", 64, "--split", "val",
        "--sensitivity_users", 8)
    res = json.loads((ckpt / "results_seq_val.json").read_text())
    assert not (ckpt / "results_seq.json").exists()
    model, tokenizer, meta = load_checkpoint(ckpt)
    ds = renumber_items(load_dataset(data64, log=quiet), meta["item_map"])
    chose = curve_users(trainable_users(ds, "sequential"), 16, 1)
    users = [u for u in ds.users if u not in chose]
    assert len(chose) == 16 and res["user_ids"] == users and res["details"]["users_left_out"] == 16
    assert res["details"]["split"] == "val" and res["model"] == "HDRec (clean), validation"
    assert res["reference_ranks"]["co_occurrence"] == rule_ranks(ds, users, "val", names=["co_occurrence"],
                                                                 log=quiet)["co_occurrence"]
    assert res["details"]["list_quality"]["lists_with_bought_item"] == 0     # bought: the training part
    encoder = WordEncoder(tokenizer)
    encoder.add(id_words(ds))
    ranks, _, _ = rank_next(model, tokenizer, encoder, ds, chose, split="val", history="decoder", name_user=False,
                            progress=False)
    best = max(h["val_ranking"]["NDCG@10"] for h in json.loads((ckpt / "train_log.json").read_text()))
    assert ranking_metrics(ranks)["NDCG@10"] == pytest.approx(best, abs=1e-6)

    proc = subprocess.run([python, str(ROOT / "seq.py"), "--data_dir", str(data64), "--checkpoint",
                           str(random_run[0]), "--split", "val"], cwd=ROOT, env=script_env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode != 0 and "every user of" in proc.stderr and "chose the checkpoint (64 users)" in proc.stderr


def test_resume_continues_where_it_stopped(random_run, data64, tmp_path, python, script_env):
    """Interrupted after its first step, then rerun: the run ends with the same weights as an uninterrupted one."""
    ckpt, _ = random_run
    resumed = tmp_path / "c"
    log = train_random(python, script_env, data64, resumed, "--max_minutes", "0.0001")
    assert "time budget" in log
    state = json.loads((resumed / "last" / "train_state.json").read_text())
    assert (state["epoch"], state["step"]) == (1, 1)
    assert not (resumed / "results_seq.json").exists()

    log = train_random(python, script_env, data64, resumed, "--max_minutes", "0.0001")    # the same budget: used up
    assert "this run has ended (time budget used); nothing to do" in log
    assert json.loads((resumed / "last" / "train_state.json").read_text())["step"] == 1

    log = train_random(python, script_env, data64, resumed)
    assert f"resuming from {resumed} at epoch 1 step 1" in log
    assert "training a SentencePiece tokenizer" not in log                  # the checkpoint's tokenizer is reused
    history = json.loads((resumed / "train_log.json").read_text())
    assert [(h["epoch"], h["step"]) for h in history] == [(1, 1), (1, 4), (2, 4)]
    reference = json.loads((ckpt / "train_log.json").read_text())
    assert [h["val"] for h in history[1:]] == [h["val"] for h in reference]
    assert [h["samples"] for h in history[1:]] == [h["samples"] for h in reference]
    state = json.loads((resumed / "last" / "train_state.json").read_text())
    assert (state["epoch"], state["step"]) == (3, 0)
    assert state["item_map"] == json.loads((ckpt / "last" / "train_state.json").read_text())["item_map"]
    assert_same_tensors(ckpt / "last" / "model.safetensors", resumed / "last" / "model.safetensors")
    assert_same_tensors(ckpt / "last" / "train_state.safetensors", resumed / "last" / "train_state.safetensors")


def test_plateau_halvings_survive_a_resume(data64, tmp_path, python, script_env):
    """--lr_decay plateau, a validation after every step: the rate halves after each validation without a gain in
    NDCG@10, and a run interrupted after its first step ends with the same rates and weights as an uninterrupted one."""
    plateau = ["--lr_decay", "plateau", "--lr_patience", "1", "--endure_times", "8", "--val_every", "1",
               "--ratio", "0:1:0:0"]                      # one task: NDCG@10 is the figure the rule counts
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    log = train_random(python, script_env, data64, whole, *plateau)
    history = json.loads((whole / "train_log.json").read_text())
    best, expected = -1.0, []
    for h in history:                                      # the rule, from the log's own figures
        gained = h["val_ranking"]["NDCG@10"] > best
        best = max(best, h["val_ranking"]["NDCG@10"])
        expected.append((expected[-1] if expected else 1e-3) * (1 if gained else 0.5))
    assert [h["lr"] for h in history] == pytest.approx(expected)
    assert min(expected) < 1e-3 and log.count("learning rate halved") == sum(a != b for a, b in zip([1e-3] + expected,
                                                                                                   expected))
    train_random(python, script_env, data64, resumed, *plateau, "--max_minutes", "0.0001")
    assert json.loads((resumed / "last" / "train_state.json").read_text())["step"] == 1
    train_random(python, script_env, data64, resumed, *plateau)
    assert without_time(json.loads((resumed / "train_log.json").read_text())) == without_time(history)
    assert_same_tensors(whole / "last" / "model.safetensors", resumed / "last" / "model.safetensors")


def test_resume_after_a_crash_between_state_files(random_run, data64, tmp_path, python, script_env):
    ckpt, _ = random_run
    crashed = tmp_path / "d"
    train_random(python, script_env, data64, crashed, "--max_minutes", "0.0001")          # state at step 1
    step1 = crashed / "step1"
    shutil.copytree(crashed / "last", step1)
    minutes = json.loads((crashed / "last" / "train_state.json").read_text())["minutes"]
    train_random(python, script_env, data64, crashed, "--max_minutes", minutes + 1e-6)    # state at step 2
    assert json.loads((crashed / "last" / "train_state.json").read_text())["step"] == 2
    # a kill in the middle of saving step 3: last.tmp half written (here: an older state), and the rename of
    # last -> last.old done but not last.tmp -> last. The complete step-2 state must win.
    (crashed / "last").rename(crashed / "last.old")
    step1.rename(crashed / "last.tmp")
    (crashed / "last.tmp" / "train_state.json").unlink()
    train_random(python, script_env, data64, crashed)
    assert_same_tensors(ckpt / "last" / "model.safetensors", crashed / "last" / "model.safetensors")


def test_atomic_id_tokens_end_to_end(data64, tmp_path, python, script_env):
    """--id_tokens atomic (with --item_init cooc, --dropout and --name_user no): each id is one token; the checkpoint
    says so; seq.py and topn.py run on it, and the clean protocol's lists are valid."""
    ckpt = tmp_path / "atomic"
    log = train_random(python, script_env, data64, ckpt, "--id_tokens", "atomic", "--item_init", "cooc",
                       "--dropout", "0.05", "--name_user", "no")
    assert "items start from co-occurrence vectors" in log
    model, tokenizer, meta = load_checkpoint(ckpt)
    ds = load_dataset(data64, log=quiet)
    assert meta["id_tokens"] == "atomic" and model.t5.config.vocab_size == len(tokenizer)
    assert meta["args"]["item_init"] == "cooc" and model.t5.config.dropout_rate == 0.05
    assert meta["name_user"] is False                      # seq.py reads it: its prompts leave the user out too
    words = [f"item_{i}" for i in range(1, ds.num_items + 1)] + [f"user_{u}" for u in ds.users]
    assert all(len(ids) == 1 for ids in tokenizer(words, add_special_tokens=False)["input_ids"])
    run(python, script_env, "seq.py", "--data_dir", data64, "--checkpoint", ckpt, "--batch_size", 64)
    res = check_results(ckpt / "results_seq.json", "seq", "clean", 64, 64, "random", data64)
    assert res["details"]["list_quality"] == {"lists_with_invalid_id": 0, "lists_with_duplicate": 0,
                                              "lists_with_bought_item": 0}
    run(python, script_env, "topn.py", "--data_dir", data64, "--checkpoint", ckpt, "--batch_size", 16)
    check_results(ckpt / "results_topn.json", "topn", "clean", 64, 64, "random", data64)


def test_item_init_cooc_needs_atomic_ids(data64, python, script_env):
    proc = subprocess.run([python, str(ROOT / "pretrain.py"), "--data_dir", str(data64), "--item_init", "cooc",
                           "--id_tokens", "pieces", "--history", "encoder", "--backbone", "tiny"], cwd=ROOT, env=script_env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "--item_init cooc" in proc.stderr and "--id_tokens atomic" in proc.stderr
