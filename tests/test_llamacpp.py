"""llama.cpp's own server (built by scripts/setup_llamacpp.sh) serving the shipped SmolLM2-135M GGUF: the whole
distillation pipeline through it on real review records, every answer in its stage's shape (the server's GBNF
grammar field), requests decoded in parallel slots; the server killed mid-stage and restarted, and the rerun loses
and repeats no record."""
import json
import signal
import time
from pathlib import Path

import pytest

from data import distill
from data.stages import STAGES, shape_regex
from llama.loaders import default_gguf
from llama.server import LocalServer
from test_distill import make_dataset
from test_kill import finish, start

pytestmark = pytest.mark.slow
RECORDS = 25   # make_dataset: 12 train, 6 val, 7 test real toys records


def stage_lines(data_dir, number):
    """The raw JSON lines of a stage file, in file order."""
    path = distill.stage_path(data_dir / "distill", number)
    return path.read_text(encoding="utf-8").splitlines() if path.exists() else []


def servers_running():
    """Process ids of llama-server processes serving the default model."""
    found = set()
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            argv = cmdline.read_bytes().split(b"\0")
        except OSError:          # the process ended meanwhile
            continue
        if argv[0].endswith(b"llama-server") and any(b"SmolLM2" in a for a in argv):
            found.add(cmdline.parent.name)
    return found


def test_pipeline_through_llamacpp_backend_every_answer_in_shape(tmp_path, python, script_env):
    data_dir = make_dataset(tmp_path / "toys")
    before = servers_running()
    out = finish(start(python, script_env, "data/distill.py", "--data_dir", data_dir, "--backend", "llamacpp",
                       "--max_batch_size", 4, "--greedy"))
    assert (data_dir / "explanation_rationale.json").exists(), out[-2000:]
    for stage in STAGES:
        lines = distill.read_stage(data_dir / "distill", stage.number)
        assert len(lines) == RECORDS
        for line in lines.values():
            assert line["fallback"] != distill.BACKEND_FAILURE, line
            assert shape_regex(stage).fullmatch(line["raw"].strip()), (stage.number, line["raw"])
    report = json.loads((data_dir / "distill_report.json").read_text())["stages"]
    assert report["stage 1 preference_attributes"]["user_preference"]["over_limit"] == 0
    assert servers_running() == before, "the server started by distill.py stops with it"


def test_server_killed_mid_stage_and_restarted_loses_and_repeats_no_record(tmp_path, python, script_env):
    data_dir = make_dataset(tmp_path / "toys")
    gguf = default_gguf()
    argv = ["data/distill.py", "--data_dir", data_dir, "--backend", "openai", "--max_batch_size", 4, "--greedy",
            "--server_retries", 1]
    first = LocalServer(gguf, parallel=4, ctx_per_slot=512, log_path=tmp_path / "server1.log")
    try:
        proc = start(python, script_env, *argv, "--server_url", first.url)
        deadline = time.time() + 300
        while len(stage_lines(data_dir, 2)) < 8:       # in the middle of stage 2
            assert proc.poll() is None and time.time() < deadline, "stage 2 never reached 8 records"
            time.sleep(0.02)
        first.process.send_signal(signal.SIGKILL)
        first.process.wait()
        slots = first.slots_used()
        out, _ = proc.communicate(timeout=300)     # the run gives up on the dead server, or ends with failures on file
    finally:
        first.close()
    assert len(slots) >= 2, f"requests were decoded in parallel slots, not one at a time: {slots}"
    assert "backend failure" in out, out[-2000:]

    kept = {n: stage_lines(data_dir, n) for n in range(1, 6)}
    finished = {n: {tuple(json.loads(row)["key"]) for row in rows
                    if json.loads(row)["fallback"] != distill.BACKEND_FAILURE} for n, rows in kept.items()}
    assert len(finished[1]) == RECORDS and 0 < len(finished[2]) < RECORDS, {n: len(f) for n, f in finished.items()}

    second = LocalServer(gguf, parallel=4, ctx_per_slot=512, log_path=tmp_path / "server2.log")
    try:
        finish(start(python, script_env, *argv, "--server_url", second.url))
    finally:
        second.close()
    for n in range(1, 6):
        rows = stage_lines(data_dir, n)
        assert rows[:len(kept[n])] == kept[n], f"stage {n}: lines on file before the kill were changed or lost"
        added = [tuple(json.loads(row)["key"]) for row in rows[len(kept[n]):]]
        assert not set(added) & finished[n], f"stage {n}: a record finished before the kill was generated again"
        assert len(added) == len(set(added)) == RECORDS - len(finished[n]), f"stage {n}: each missing record once"
        final = distill.read_stage(data_dir / "distill", n)
        assert all(line["fallback"] != distill.BACKEND_FAILURE for line in final.values()), n
    assert (data_dir / "explanation_rationale.json").exists()
