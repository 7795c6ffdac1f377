"""kill -9 at random moments, then rerun: training, evaluation and distillation end exactly as an uninterrupted run
with the same seed, no finished step or record is lost, no finished record is redone, and no file is left
half-written. Real processes, real SIGKILL; the moments are drawn by a seeded RNG (printed on failure)."""
import json
import random
import signal
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from conftest import ROOT, make_slice, quiet
from data import distill
from dataset import load_dataset
from test_distill import fake_answer, make_dataset
from test_pipeline import TRAIN, assert_same_tensors, without_time

pytestmark = pytest.mark.slow


def start(python, env, *argv):
    return subprocess.Popen([python, *map(str, argv)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def finish(proc, timeout=300):
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-3000:]
    return out


def kill_when(proc, ready, delay, timeout=300):
    """SIGKILL `proc` `delay` seconds after ready() first holds; False when it ended before that."""
    deadline = time.time() + timeout
    while not ready():
        if proc.poll() is not None:
            return False
        assert time.time() < deadline, "the moment to kill never came"
        time.sleep(0.01)
    time.sleep(delay)
    if proc.poll() is not None:
        return False
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return True


def read_json_or_none(path):
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


@pytest.fixture(scope="module")
def data64(tmp_path_factory):
    d = make_slice(tmp_path_factory.mktemp("kill64"), 64, seed=1)
    load_dataset(d, log=quiet)
    return d


# ---------------------------------------------------------------------------------------------------- training

def test_training_killed_three_times_ends_as_an_uninterrupted_run(data64, tmp_path, python, script_env):
    train = ["pretrain.py", "--data_dir", data64, "--epochs", 2, "--item_ids", "random", "--save_minutes", 0, *TRAIN]
    reference = tmp_path / "reference"
    finish(start(python, script_env, *train, "--checkpoint", reference))

    killed = tmp_path / "killed"
    rng = random.Random(7)
    state = killed / "last" / "train_state.json"

    def steps_done():
        s = read_json_or_none(state)
        return -1 if s is None else (s["epoch"] - 1) * 4 + s["step"]

    kills, done_before = [], -1
    for target in (1, 3, 6):                          # 4 steps an epoch: in epoch 1, at its end, in epoch 2
        proc = start(python, script_env, *train, "--checkpoint", killed)
        delay = rng.uniform(0, 0.4)
        if kill_when(proc, lambda: steps_done() >= target, delay):
            kills.append((target, round(delay, 3), steps_done()))
            assert steps_done() >= done_before, "a saved step was lost"
            done_before = steps_done()
    assert len(kills) >= 2, f"the runs ended before they could be killed: {kills}"
    out = finish(start(python, script_env, *train, "--checkpoint", killed))
    assert "resuming from" in out, kills

    for name in ("model.safetensors", "last/model.safetensors", "last/train_state.safetensors"):
        assert_same_tensors(reference / name, killed / name)
    assert without_time(json.loads((reference / "train_log.json").read_text())) == \
        without_time(json.loads((killed / "train_log.json").read_text()))
    assert not list(killed.rglob("*.tmp")) and not (killed / "last.tmp").exists() and not (killed / "last.old").exists()


# ---------------------------------------------------------------------------------------------------- evaluation

def without_run_facts(results):
    return {k: v for k, v in results.items() if k not in ("seconds", "versions")} | \
        {"details": {k: v for k, v in results["details"].items() if k != "users_per_second"}}


def test_evaluation_killed_mid_run_leaves_no_partial_file_and_reruns_the_same(data64, tmp_path, python, script_env):
    ckpt = tmp_path / "ckpt"
    finish(start(python, script_env, "pretrain.py", "--data_dir", data64, "--checkpoint", ckpt, "--epochs", 1,
                 "--item_ids", "random", *TRAIN))
    seq = ["seq.py", "--data_dir", data64, "--checkpoint", ckpt, "--batch_size", 8, "--sensitivity_users", 16]
    results = ckpt / "results_seq.json"
    finish(start(python, script_env, *seq))
    expected = without_run_facts(json.loads(results.read_text()))
    before = results.read_bytes()
    rng = random.Random(11)
    for _ in range(3):                                # killed while ranking, or while writing the results
        proc = start(python, script_env, *seq)
        kill_when(proc, lambda: True, rng.uniform(2.0, 9.0))
        now = results.read_bytes()
        assert now == before or json.loads(now), "the results file is whole: the old one or a new one"
        before = now
    finish(start(python, script_env, *seq))
    assert without_run_facts(json.loads(results.read_text())) == expected
    assert not list(ckpt.glob("*.tmp"))


# ---------------------------------------------------------------------------------------------------- distillation

class FakeLLMServer:
    """An OpenAI-compatible server answering like test_distill's fake LLM, slowly, logging every prompt's hash."""

    def __init__(self, delay=0.05):
        self.requests, self.lock = [], threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def reply(self, obj):
                data = json.dumps(obj).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                try:
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):   # the client was killed
                    pass

            def do_GET(self):
                self.reply({"data": [{"id": "fake"}]})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                dialog = body["messages"]
                with server.lock:
                    server.requests.append(distill.prompt_hash(dialog, body.get("grammar")))
                time.sleep(delay)
                self.reply({"choices": [{"message": {"role": "assistant", "content": fake_answer(dialog)}}]})

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.http.server_address[1]}/v1"
        threading.Thread(target=self.http.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self):
        self.http.shutdown()
        self.http.server_close()


@pytest.fixture
def llm_server():
    s = FakeLLMServer()
    yield s
    s.close()


def written(data_dir):
    """Prompt hashes with an answer in the stage files (lines cut short by a kill are not answers)."""
    return {line["prompt"] for k in range(1, 6) for line in distill.read_stage(data_dir / "distill", k).values()}


def test_distillation_killed_three_times_loses_and_redoes_nothing(tmp_path, llm_server, python, script_env):
    argv = ["data/distill.py", "--backend", "openai", "--server_url", llm_server.url, "--max_batch_size", 4]
    reference = make_dataset(tmp_path / "reference")
    finish(start(python, script_env, *argv, "--data_dir", reference))
    expected = (reference / "explanation_rationale.json").read_bytes()
    all_prompts = set(llm_server.requests)
    assert len(llm_server.requests) == len(all_prompts), "an uninterrupted run asks for each prompt once"
    assert all_prompts == written(reference), "the server sees the prompts the stage files name"

    killed = make_dataset(tmp_path / "killed")
    llm_server.requests.clear()
    rng = random.Random(5)
    kills = []
    for target in (10, 45, 80):                       # answers on disk when the kill comes: stages 1, 2-3, 4
        proc = start(python, script_env, *argv, "--data_dir", killed)
        delay = rng.uniform(0, 0.3)
        if kill_when(proc, lambda: len(written(killed)) >= target, delay):
            done = written(killed)
            kills.append((target, round(delay, 3), len(done), len(llm_server.requests)))
            llm_server.requests.append(("kill", done))
            assert not (killed / "explanation_rationale.json").exists()
    assert len(kills) >= 2, f"the runs ended before they could be killed: {kills}"
    finish(start(python, script_env, *argv, "--data_dir", killed))
    assert (killed / "explanation_rationale.json").read_bytes() == expected, kills

    done, asked = set(), []
    for entry in llm_server.requests:
        if isinstance(entry, tuple):
            done = entry[1]
            continue
        assert entry not in done, f"a prompt answered and written before a kill was asked again ({kills})"
        asked.append(entry)
    assert set(asked) == all_prompts, "every prompt was answered"
    in_flight = len(asked) - len(all_prompts)           # asked, but killed before its batch was written
    assert in_flight <= 4 * len(kills), (in_flight, kills)
