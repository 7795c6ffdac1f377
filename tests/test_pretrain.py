"""pretrain.py's flags, without training: the recipes fill in what the command line leaves out (and say so in
--help), the combinations that cannot work are one-line errors, the validation points and the learning-rate
schedule. Training itself: test_pipeline.py, test_kill.py, test_learning.py."""
import random

import pytest

import pretrain
from utils import EarlyStopping, UserError


def flags(*argv):
    return pretrain.resolve_recipe(pretrain.parse_args(["--data_dir", "d", *argv]))


@pytest.mark.parametrize("recipe", list(pretrain.RECIPES))
def test_a_recipe_sets_every_flag_it_names_unless_given(recipe):
    args = flags("--recipe", recipe)
    for flag, value in pretrain.RECIPES[recipe].items():
        assert getattr(args, flag) == value
    assert flags("--recipe", recipe, "--item_init", "auto").item_init == ("cooc" if recipe == "learn" else "random")
    pretrain.check_args(args)                                                # each recipe is consistent
    explicit = flags("--recipe", recipe, "--lr", "0.02", "--stop_on", "loss", "--dropout", "0")
    assert (explicit.lr, explicit.stop_on, explicit.dropout) == (0.02, "loss", 0.0)


def test_embedding_std_is_for_a_from_scratch_backbone():
    assert flags("--backbone", "mini").embedding_std == pretrain.RECIPES["learn"]["embedding_std"]
    assert flags("--backbone", "t5-small").embedding_std == 0.0           # the recipe's scale is not a pretrained's
    assert flags("--backbone", "t5-small", "--embedding_std", "0").embedding_std == 0.0
    pretrain.check_args(flags("--backbone", "t5-small", "--embedding_std", "0"))


def test_item_init_auto_is_random_where_items_are_not_one_token():
    assert flags("--item_ids", "collaborative", "--item_init", "auto").item_init == "random"
    assert flags("--recipe", "paper", "--item_init", "auto").item_init == "random"
    assert flags("--item_ids", "published", "--item_init", "auto").item_init == "cooc"


def test_help_says_what_each_recipe_gives(capsys):
    with pytest.raises(SystemExit):
        pretrain.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for flag in pretrain.RECIPES["learn"]:
        assert pretrain.by_recipe(flag) in text, flag


@pytest.mark.parametrize("argv, message", [
    (["--ratio", "1:2"], "--ratio needs 4 non-negative integers"),
    (["--ratio", "a:b:c:d"], "--ratio needs 4 non-negative integers"),
    (["--task_num", "3"], "--task_num must be 4"),
    (["--id_tokens", "pieces"], "--history decoder reads items one after another"),
    (["--recipe", "paper", "--item_init", "cooc"], "--item_init cooc sets one embedding row per item"),
    (["--item_ids", "semantic", "--item_init", "cooc"], "--item_ids semantic gives every code level"),
    (["--recipe", "paper", "--embedding_std", "0.02"], "--embedding_std sets a from-scratch backbone"),
    (["--lr_decay", "plateau", "--lr_patience", "0"], "--lr_patience counts validations .* at least 1, got 0"),
    (["--label_smoothing", "1"], r"--label_smoothing is the target's share .* in \[0, 1\), got 1.0"),
    (["--label_smoothing", "-0.1"], r"--label_smoothing .* got -0.1"),
])
def test_flags_that_cannot_work_are_user_errors(argv, message):
    with pytest.raises(UserError, match=message):
        pretrain.check_args(flags(*argv))


def test_validation_points_and_learning_rate_schedule():
    assert not pretrain.validation_due(7, False, 0) and pretrain.validation_due(7, True, 0)   # once an epoch
    assert pretrain.validation_due(4, False, 4) and not pretrain.validation_due(3, True, 4)   # across epochs
    assert pretrain.validation_due(3, True, 4, last=True)                                    # the end of --epochs
    args = flags("--lr", "1.0", "--warmup_steps", "2", "--lr_decay", "linear", "--epochs", "2")
    assert [pretrain.lr_at(s, 3, args) for s in range(6)] == pytest.approx([0.5, 1.0, 1.0, 0.75, 0.5, 0.25])
    assert [pretrain.lr_at(s, 3, args, lr_scale=0.5) for s in range(6)] == \
        pytest.approx([0.25, 0.5, 0.5, 0.375, 0.25, 0.125])


def test_plateau_halves_the_rate_after_every_lr_patience_validations_without_gain():
    """NDCG@10 by validation, patience 2, endure 10: halved after the 2nd and 4th validations without gain; a gain
    resets the count but keeps the lowered rate; the rate that a resumed run reads is the one the log shows."""
    args = flags("--lr_decay", "plateau", "--lr_patience", "2", "--endure_times", "10")
    pretrain.check_args(args)
    progress = pretrain.Progress(1, 0, random.Random(0), EarlyStopping(args.endure_times), [])
    scales = []
    for ndcg in [.05, .06, .06, .05, .06, .05, .07, .06, .06]:
        progress.stopping.improved(-ndcg)
        pretrain.lower_lr_on_plateau(args, progress)
        scales.append(progress.lr_scale)
    assert scales == [1, 1, 1, .5, .5, .25, .25, .25, .125]
    constant = flags("--lr_decay", "none", "--lr_patience", "2", "--endure_times", "10")    # never halves
    progress = pretrain.Progress(1, 0, random.Random(0), EarlyStopping(10, best=-.07, endured=4), [])
    assert not pretrain.lower_lr_on_plateau(constant, progress) and progress.lr_scale == 1
    assert flags().lr_decay == "plateau" and flags("--recipe", "paper").lr_decay == "none"
    assert [flags("--endure_times", n).lr_patience for n in ("10", "3", "2", "1")] == [3, 2, 1, 1]


def test_plateau_in_a_multi_task_run_waits_for_every_task():
    """Several tasks: the rate halves when no task has gained for --lr_patience validations (a text task gains in
    its ROUGE-L or its loss), the count that the stop waits for; a text task still learning keeps the rate."""
    args = flags("--lr_patience", "2", "--endure_times", "10")
    progress = pretrain.Progress(1, 0, random.Random(0), EarlyStopping(10), [],
                                 task_stopping=pretrain.task_stoppers(["explanation", "sequential"], 10),
                                 text_loss_stopping=pretrain.task_stoppers(["explanation", "sequential"], 10,
                                                                          only=["explanation"]))
    ndcg = [.10, .09, .09, .09, .09, .09]
    rouge = [20, 21, 20, 20, 20, 20]
    loss = [6.0, 5.9, 5.8, 5.9, 5.9, 5.9]          # the explanation loss gains until the 3rd validation
    scales = []
    for n, r, text_loss in zip(ndcg, rouge, loss):
        pretrain.count_validation(progress, -n, {"explanation": -r, "sequential": -n}, {"explanation": text_loss})
        pretrain.lower_lr_on_plateau(args, progress)
        scales.append(progress.lr_scale)
    assert pretrain.validations_without_gain(progress) == 3 and progress.stopping.endured == 5
    assert scales == [1, 1, 1, 1, .5, .5]
