"""Stopping that waits for every task (pretrain.py): in a multi-task run each task has its own validation figure
(NDCG@10 for sequential, ROUGE-L of generated validation texts for the text tasks, the validation token loss for
top-N) and training stops when none has gained for
--endure_times validations; the top-level model stays the best by --stop_on and best_<task>/ keeps a task's own
best where it came at another validation; exp.py / topn.py read best_<task>/ where it exists; the per-task counts
survive a resume; a single-task run is as before. The logic on fake figures, then the scripts on real data."""
import json
import random
import shutil
import subprocess
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

import pretrain
import tasks
from dataset import load_dataset
from module import copy_checkpoint
from utils import EarlyStopping

from conftest import ROOT, make_slice, quiet
from test_text import copy_dir, gift_dir  # noqa: F401 (gift_dir: a fixture, 1500 real Gift_Cards reviews)

TASKS = ["explanation", "sequential", "topn"]


def progress_for(val_tasks, endure_times):
    return pretrain.Progress(1, 0, random.Random(0), EarlyStopping(endure_times), [],
                             task_stopping=pretrain.task_stoppers(val_tasks, endure_times))


# ---------------------------------------------------------------------------------------------------- the rule

def test_a_text_task_still_learning_keeps_the_run_going_past_the_ranking_tasks_stop():
    """NDCG@10 peaks at the 2nd validation, the explanation loss falls until the 6th: the old rule (stop on the
    sequential figure alone) stops at the 5th, the new one when the explanation loss too has gone 3 without gain."""
    ndcg = [.10, .12, .12, .11, .12, .11, .10, .10, .09, .09]
    explanation = [8.0, 7.5, 7.0, 6.5, 6.0, 5.9, 5.95, 6.0, 6.1, 6.2]
    topn = [5.0, 4.0, 4.1, 4.2, 4.3, 4.4, 4.5, 4.6, 4.7, 4.8]
    progress = progress_for(TASKS, endure_times=3)
    old_stop = new_stop = None
    for i, (n, e, t) in enumerate(zip(ndcg, explanation, topn), 1):
        top_gained, gained = pretrain.count_validation(progress, -n, {"explanation": e, "sequential": -n, "topn": t})
        assert top_gained == gained["sequential"]             # --stop_on ndcg: the sequential figure is the top's
        old_stop = old_stop or (progress.stopping.stop and i)
        new_stop = new_stop or (progress.stop and i)
    assert (old_stop, new_stop) == (5, 9)
    assert {t: s.endured for t, s in progress.task_stopping.items()} == {"explanation": 4, "sequential": 8, "topn": 8}


def test_a_task_that_has_stopped_gaining_stops_training_until_it_gains_again():
    """The next epoch's plan is drawn from --ratio with a 0 for every task whose own figure has gone --endure_times
    validations without gain, so the budget goes to the tasks still learning."""
    progress = progress_for(TASKS, endure_times=2)
    ratio = [1, 1, 0, 3]                                    # explanation : sequential : review : top-N
    figures = [(.10, 6.0, 3.0), (.09, 5.5, 3.1), (.08, 5.0, 3.2)]
    for n, e, t in figures:
        pretrain.count_validation(progress, -n, {"explanation": e, "sequential": -n, "topn": t})
    assert pretrain.training_ratio(ratio, progress) == [1, 0, 0, 0] and not progress.stop
    pretrain.count_validation(progress, -.11, {"explanation": 4.9, "sequential": -.11, "topn": 3.3})
    assert pretrain.training_ratio(ratio, progress) == [1, 1, 0, 0]           # sequential gained: it trains again
    single = progress_for(["sequential"], endure_times=1)
    for n in (.1, .09):
        pretrain.count_validation(single, -n, {})
    assert single.stop and pretrain.training_ratio([0, 1, 0, 0], single) == [0, 1, 0, 0]


def test_a_text_task_trains_while_its_loss_falls_though_its_texts_score_the_same():
    """Greedy texts can score ROUGE-L 0 for many validations while the model learns to write: a text task stops only
    when its ROUGE-L and its validation loss have both gone --endure_times validations without gain; its best model
    is the one with the best ROUGE-L."""
    progress = progress_for(TASKS, endure_times=2)
    progress.text_loss_stopping = pretrain.task_stoppers(TASKS, 2, only={"explanation": []})
    rouge_l, loss = [1.0, 1.0, 1.0, 1.0, 9.0, 8.0, 8.5, 8.9], [8.0, 7.0, 6.5, 6.0, 5.5, 5.6, 5.7, 5.8]
    done, kept = [], []
    for r, e in zip(rouge_l, loss):
        _, gained = pretrain.count_validation(progress, -.1, {"explanation": -r, "sequential": -.1, "topn": 3.0},
                                              {"explanation": e})
        done.append(pretrain.task_done(progress, "explanation"))
        kept.append(gained["explanation"])
    assert done == [False] * 6 + [True, True]       # both 2 without gain at the 7th
    assert kept == [True, False, False, False, True, False, False, False]
    assert progress.stop                                    # sequential and top-N had long stopped


def test_a_single_task_stops_on_its_one_figure():
    assert pretrain.task_stoppers(["sequential"], 3) == {}
    progress = progress_for(["sequential"], endure_times=2)
    for n in (.1, .09, .08):
        pretrain.count_validation(progress, -n, {})
    assert progress.stop and progress.stopping.endured == 2


def test_each_task_has_its_own_figure():
    losses, ranking = {"explanation": 6.0, "sequential": 7.0, "topn": 3.0}, {"HR@10": .2, "NDCG@10": .1}
    assert pretrain.task_figure("sequential", losses, ranking) == ("NDCG@10", .1)
    assert pretrain.task_figure("sequential", losses, {}) == ("loss", 7.0)        # no ranked users: its loss
    assert pretrain.task_figure("explanation", losses, ranking) == ("loss", 6.0)
    assert pretrain.task_figure("topn", losses, ranking) == ("loss", 3.0)
    texts = {"explanation": 23.5}                                                 # --val_texts: generated ROUGE-L
    assert pretrain.task_figure("explanation", losses, ranking, texts) == ("ROUGE-L", 23.5)
    assert pretrain.task_figure("topn", losses, ranking, texts) == ("loss", 3.0)
    # what the stopping counts minimise: a loss as it is, the figures that grow negated
    assert pretrain.lower_is_better({"sequential": ("NDCG@10", .1), "explanation": ("ROUGE-L", 23.5),
                                     "topn": ("loss", 3.0)}) == {"sequential": -.1, "explanation": -23.5, "topn": 3.0}


def test_stopping_counts_survive_the_state_json():
    progress = progress_for(TASKS, endure_times=3)
    pretrain.count_validation(progress, -.1, {"explanation": 6.0, "sequential": -.1, "topn": 3.0})
    pretrain.count_validation(progress, -.2, {"explanation": 6.5, "sequential": -.2, "topn": 2.0})
    saved = json.loads(json.dumps({t: [s.best, s.endured] for t, s in progress.task_stopping.items()}))
    resumed = pretrain.task_stoppers(TASKS, 3, saved)
    assert resumed == progress.task_stopping
    assert pretrain.task_stoppers(TASKS, 3, {"topn": [2.0, 1]})["explanation"] == EarlyStopping(3)  # an older state


# ---------------------------------------------------------------------------------------------------- the models kept

def test_each_tasks_best_model_is_kept(tiny_model, tokenizer, tmp_path):
    """Fake figures through count_validation and keep_best_models (what every validation runs), the weights marked
    with the validation's number: the top level holds the best by --stop_on (NDCG@10), best_<task>/ a task's best
    where it is not the top-level one, copied from the top level before that is replaced."""
    run = SimpleNamespace(rank=0, out=tmp_path, model=tiny_model, tokenizer=tokenizer, spm_model=None,
                          meta={"task_num": 4, "prompt_num": 3})
    progress = progress_for(TASKS, endure_times=5)

    def validation(number, ndcg, explanation, topn):
        with torch.no_grad():
            tiny_model.whole_word.weight.fill_(number)
        top_gained, gained = pretrain.count_validation(progress, -ndcg, {"explanation": explanation,
                                                                         "sequential": -ndcg, "topn": topn})
        pretrain.keep_best_models(run, progress, top_gained, gained, {"step": number})
        kept = {"top": tmp_path} | {p.name: p for p in tmp_path.glob("best_*")}
        for name, folder in kept.items():        # the weights and config.json of one validation, together
            weights = load_file(str(folder / "model.safetensors"))["whole_word.weight"]
            assert torch.all(weights == json.loads((folder / "config.json").read_text())["hdrec"]["best"]["step"])
        return {name: json.loads((folder / "config.json").read_text())["hdrec"]["best"]["step"]
                for name, folder in kept.items()}

    assert validation(1, .10, 8.0, 5.0) == {"top": 1}                                   # all gain: one model
    assert validation(2, .09, 7.0, 4.9) == {"top": 1, "best_explanation": 2, "best_topn": 2}
    assert validation(3, .12, 7.5, 4.8) == {"top": 3, "best_explanation": 2}            # topn gains with the top
    assert validation(4, .13, 7.6, 4.9) == {"top": 4, "best_explanation": 2, "best_topn": 3}   # 3 copied first
    assert validation(5, .14, 6.0, 4.0) == {"top": 5}
    assert not list(tmp_path.glob("*.tmp"))


# ---------------------------------------------------------------------------------------------------- the scripts

def run(python, env, script, *args, timeout=300):
    proc = subprocess.run([python, str(ROOT / script), *map(str, args)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout + proc.stderr


MULTI = ["--backbone", "tiny", "--ratio", "1:1:0:1", "--epochs", "1", "--batch_size", "32", "--val_users", "30",
         "--val_every", "4", "--endure_times", "2", "--seed", "1"]


@pytest.mark.slow
def test_multi_task_state_resumes_and_exp_reads_its_tasks_best(gift_dir, tmp_path, python, script_env):
    data, ck = copy_dir(gift_dir, tmp_path / "data"), tmp_path / "ck"
    train = ["pretrain.py", "--data_dir", data, "--checkpoint", ck, *MULTI]
    log = run(python, script_env, *train, "--max_minutes", "0.0001")                  # one step, one validation
    state_path = ck / "last" / "train_state.json"
    state = json.loads(state_path.read_text())
    record = json.loads((ck / "train_log.json").read_text())[-1]
    assert set(state["task_stopping"]) == set(record["tasks"]) == set(TASKS)
    expected = {"sequential": ("NDCG@10", record["val_ranking"]["NDCG@10"]),
                "explanation": ("ROUGE-L", record["val_texts"]["explanation"]), "topn": ("loss", record["val"]["topn"])}
    for task in TASKS:
        figure = record["tasks"][task]
        assert (figure["figure"], figure["value"]) == pytest.approx(expected[task]) and figure["without_gain"] == 0
        assert state["task_stopping"][task] == [figure["value"] if task == "topn" else -figure["value"], 0]
    assert set(record["val_texts"]) == {"explanation"} and 0 <= record["val_texts"]["explanation"] <= 100
    assert state["epoch_ratio"] == [1, 1, 0, 1]             # the plan of the epoch under way, for the resume
    assert state["text_loss_stopping"] == {"explanation": [record["val"]["explanation"], 0]}
    assert "validations without gain (stops when all reach 2): explanation ROUGE-L" in log

    # every task one validation without gain and a best it cannot beat: the next validation must stop the run,
    # which only the resumed per-task counts can do (the top-level count is 0 and would go on)
    state["task_stopping"] = {"explanation": [-100.0, 1], "sequential": [-1.0, 1], "topn": [0.0, 1]}
    state["text_loss_stopping"] = {"explanation": [0.0, 1]}
    state_path.write_text(json.dumps(state))
    log = run(python, script_env, *train)
    assert "resuming from" in log and "early stop" in log
    history = json.loads((ck / "train_log.json").read_text())
    assert [(h["epoch"], h["step"]) for h in history] == [(1, 1), (1, 5)]    # --val_every 4 steps after the last
    assert {t: (f["best"], f["without_gain"]) for t, f in history[-1]["tasks"].items()} == \
        {"explanation": (100.0, 2), "sequential": (1.0, 2), "topn": (0.0, 2)}
    assert "explanation ROUGE-L" in log and "this run has ended (early stop)" in run(python, script_env, *train)

    # exp.py reads best_explanation/ where it exists (here a copy marked in its config), topn.py the top level
    best = ck / "best_explanation"
    shutil.rmtree(best, ignore_errors=True)
    shutil.rmtree(ck / "best_topn", ignore_errors=True)
    copy_checkpoint(ck, best)
    config = json.loads((best / "config.json").read_text())
    config["hdrec"]["best"]["step"] = 12345
    (best / "config.json").write_text(json.dumps(config))
    out = run(python, script_env, "exp.py", "--data_dir", data, "--checkpoint", ck, "--users", "20")
    assert f"model: {best} (the explanation task's own best validation)" in out
    res = json.loads((ck / "results_exp.json").read_text())
    assert res["checkpoint_read"] == str(best) and res["training"]["best_step"] == 12345
    out = run(python, script_env, "topn.py", "--data_dir", data, "--checkpoint", ck, "--users", "20",
              "--sensitivity_users", "0")
    assert f"model: {ck} (the run's best model" in out
    res = json.loads((ck / "results_topn.json").read_text())
    assert res["checkpoint_read"] == str(ck) and res["training"]["best_step"] != 12345


@pytest.fixture(scope="module")
def data64(tmp_path_factory):
    d = make_slice(tmp_path_factory.mktemp("stop64"), 64, seed=1)
    load_dataset(d, log=quiet)
    return d


@pytest.mark.slow
def test_a_single_task_run_is_as_before(data64, tmp_path, python, script_env):
    """One figure (--stop_on's), no per-task records, no best_* folder (an earlier run's is removed)."""
    ck = tmp_path / "ck"
    (ck / "best_sequential").mkdir(parents=True)                 # left by an earlier run in the same folder
    log = run(python, script_env, "pretrain.py", "--data_dir", data64, "--checkpoint", ck, "--backbone", "tiny",
              "--ratio", "0:1:0:0", "--epochs", "1", "--batch_size", "16", "--val_every", "1", "--endure_times", "1",
              "--stop_on", "loss", "--seed", "1")
    assert not list(ck.glob("best_*")) and (ck / "model.safetensors").exists()
    history = json.loads((ck / "train_log.json").read_text())
    assert len(history) >= 2 and not any("tasks" in h for h in history)
    assert json.loads((ck / "last" / "train_state.json").read_text())["task_stopping"] == {}
    assert "/1 without gain" in log and "validations without gain" not in log


@pytest.mark.slow
def test_val_every_counts_steps_across_epochs(data64, tmp_path, python, script_env):
    """A small set's epoch is a few steps: --val_every spans epochs, and the last step of --epochs is validated."""
    ck = tmp_path / "ck"
    run(python, script_env, "pretrain.py", "--data_dir", data64, "--checkpoint", ck, "--backbone", "tiny",
        "--ratio", "0:1:0:0", "--epochs", "4", "--batch_size", "16", "--val_every", "6", "--endure_times", "9",
        "--stop_on", "loss", "--seed", "1")
    history = json.loads((ck / "train_log.json").read_text())
    steps = len(tasks.epoch_plan(load_dataset(data64, log=quiet), [0, 1, 0, 0], 16, seed=1, epoch=1))
    assert 1 < steps < 6                                        # so no epoch alone reaches a validation
    done = [(h["epoch"] - 1) * steps + h["step"] for h in history]
    assert done == list(range(6, 4 * steps, 6)) + ([4 * steps] if 4 * steps % 6 else [])
