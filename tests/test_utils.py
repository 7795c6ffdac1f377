"""utils.progress_bar away from a terminal: whole lines (no carriage-return redraws), at most one per 5% of the loop
and per `every_seconds`, the rate and ETA on each, the postfix shown without lines of its own."""
import re
import time

from utils import progress_bar


def test_progress_away_from_a_terminal_writes_few_plain_lines(capsys):
    bar = progress_bar(range(1000), desc="epoch 1", every_seconds=0)
    for i in bar:
        bar.set_postfix(loss=f"{i:.1f}")           # every step, as a training loop may: no line of its own
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert "\r" not in err and 2 <= len(lines) <= 22, lines
    assert lines[0].startswith("epoch 1:   0% 0/1000") and lines[-1].startswith("epoch 1: 100% 1000/1000")
    assert all(re.match(r"epoch 1: +\d+% \d+/1000 \[.*it/s", line) for line in lines)
    assert "loss=999.0" in lines[-1]


def test_progress_waits_for_its_interval(capsys):
    for _ in progress_bar(range(200), desc="scan", every_seconds=3600):
        time.sleep(0.001)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2 and lines[0].startswith("scan:   0%") and lines[1].startswith("scan: 100% 200/200")


def test_progress_without_a_total_counts(capsys):
    for _ in progress_bar(iter(range(50)), desc="lines", unit=" lines", every_seconds=0):
        pass
    lines = capsys.readouterr().err.splitlines()
    assert lines[-1].startswith("lines: 50 [") and "lines/s" in lines[-1] and len(lines) <= 52


def test_disabled_progress_writes_nothing(capsys):
    assert list(progress_bar(range(5), disable=True)) == list(range(5))
    assert capsys.readouterr().err == ""


def test_early_stopping_counts_validations_without_gain_and_survives_json():
    import json
    from utils import EarlyStopping
    stopping = EarlyStopping(endure_times=2)
    assert [stopping.improved(x) for x in (3.0, 2.0, 2.0)] == [True, True, False] and not stopping.stop
    assert stopping.improved(1.0) and stopping.endured == 0              # a gain starts the count again
    assert not stopping.improved(1.5) and not stopping.improved(1.0) and stopping.stop
    saved = json.loads(json.dumps({"best": EarlyStopping(2).best, "endured": 0}))      # inf before any validation
    resumed = EarlyStopping(3, saved["best"], saved["endured"])
    assert resumed.improved(1e9) and not resumed.stop
