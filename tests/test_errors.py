"""Every entry point, walked through a corpus of bad inputs: each ends with one line `error: ...` on stderr that
names the file (and line), flag or URL at fault, exit status 2 and no traceback; --debug shows the traceback; a real
bug keeps Python's traceback and status 1. The scripts run as processes of their own, offline, one thread (forked
from one that imported the heavy libraries once: tests/preloaded.py)."""
import gzip
import json
import re
import shutil
import subprocess

import pytest

from conftest import ROOT, make_slice

pytestmark = pytest.mark.slow


def run(python, env, *argv, timeout=300):
    return subprocess.run([python, *map(str, argv)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def work(tmp_path_factory, python, script_env):
    """A 40-user beauty slice, a tiny checkpoint trained on it for one step, and damaged copies of both."""
    root = tmp_path_factory.mktemp("errors")
    data = make_slice(root / "data", 40, seed=3)
    ckpt = root / "ckpt"
    proc = run(python, script_env, "pretrain.py", "--data_dir", data, "--checkpoint", ckpt, "--backbone", "tiny",
               "--ratio", "0:1:0:0", "--batch_size", 32, "--val_users", 10, "--rank_users", 10, "--max_minutes",
               "0.0001", "--seed", 1)
    assert proc.returncode == 0, proc.stderr[-2000:]

    def data_copy(name, **files):
        d = root / name
        shutil.copytree(data, d)
        for file, text in files.items():
            (d / file.replace("__", ".")).write_bytes(text if isinstance(text, bytes) else text.encode())
        return d

    def ckpt_copy(name, damage):
        c = root / name
        shutil.copytree(ckpt, c, ignore=shutil.ignore_patterns("last"))
        damage(c)
        return c

    lines = (data / "sequential.txt").read_text().splitlines()
    negatives = (data / "negative.txt").read_text().splitlines()
    w = {"root": root, "data": data, "ckpt": ckpt}
    w["bad_id"] = data_copy("bad_id", sequential__txt="\n".join(lines[:2] + ["7 12 x3 5"] + lines[3:]) + "\n")
    w["not_utf8"] = data_copy("not_utf8", sequential__txt=("\n".join(lines[:1]) + "\n").encode() + b"5 \xff\xfe 6\n")
    w["empty"] = data_copy("empty", sequential__txt="")
    w["bad_maps"] = data_copy("bad_maps", datamaps__json='{"user2id": {"A1": "1",\n  oops}\n')
    short = negatives[4].split()[:3]                  # line 5 keeps its user and two negatives
    w["bad_negatives"] = data_copy("bad_negatives", negative__txt="\n".join(negatives[:4] + [" ".join(short)] + negatives[5:]) + "\n")
    w["bad_titles"] = data_copy("bad_titles", item_titles__json=json.dumps({"1": "lipstick", "999999": "ghost"}))
    w["bad_config"] = ckpt_copy("bad_config", lambda c: (c / "config.json").write_text('{"t5": {\n'))
    w["cut_weights"] = ckpt_copy("cut_weights", lambda c: (c / "model.safetensors").write_bytes(
        (c / "model.safetensors").read_bytes()[:5000]))
    w["no_tokenizer"] = ckpt_copy("no_tokenizer", lambda c: shutil.rmtree(c / "tokenizer"))
    (root / "empty_dir").mkdir()
    (root / "bad_results").mkdir()
    (root / "bad_results" / "results_seq.json").write_text('{"task": "seq"')
    (root / "reviews.json").write_text('{"reviewerID": "A", "asin": "B", "overall": 5, "unixReviewTime": 1}\n'
                                       '{"reviewerID": "A", "asin": \n')
    (root / "log.csv").write_text("user,item,timestamp\nA,B,1\nA,C,soon\n")
    with gzip.open(root / "empty.json.gz", "wt") as f:
        f.write("")
    prompts = (ROOT / "data" / "prompts.yaml").read_text()
    (root / "prompts_unknown.yaml").write_text(prompts.replace('said "{explanation}"', 'said "{price}"', 1))
    (root / "prompts_broken.yaml").write_text("preference_attributes:\n  system: [unclosed\n  user: x\n")
    (root / "not_a_dataset").mkdir()
    (root / "config.yaml").write_text("epochs: 2\nlr: [1e-4\n")
    (root / "toys").mkdir()
    shutil.copy(ROOT.parent / "shared" / "data" / "p5" / "toys" / "explanation_sample.json",
                root / "toys" / "explanation.json")
    return w


def cases(w):
    """(entry point and its arguments, regex the one error line must match)."""
    r, data, ckpt = w["root"], w["data"], w["ckpt"]
    train = ["pretrain.py", "--checkpoint", r / "unused", "--backbone", "tiny", "--ratio", "0:1:0:0"]
    return [
        # training: data files, flags, the backbone
        ([*train, "--data_dir", r / "nowhere"], r"nowhere: no such dataset folder"),
        ([*train, "--data_dir", w["bad_id"]], r"bad_id/sequential.txt:3: non-integer id 'x3'"),
        ([*train, "--data_dir", w["not_utf8"]], r"not_utf8/sequential.txt:2: not UTF-8 text"),
        ([*train, "--data_dir", w["empty"]], r"empty/sequential.txt: no sequences \(empty file\)"),
        ([*train, "--data_dir", w["bad_maps"]], r"bad_maps/datamaps.json:2: not valid JSON"),
        ([*train, "--data_dir", data, "--ratio", "1:2"], r"--ratio needs 4 non-negative integers"),
        ([*train, "--data_dir", data, "--task_num", 3], r"--task_num must be 4, one prompt set per task"),
        ([*train, "--data_dir", data, "--ratio", "1:0:0:0"], r"--ratio gives the explanation task a share"),
        ([*train, "--data_dir", data, "--backbone", r / "no_t5"], r"could not load the pretrained T5 .*no_t5"),
        ([*train, "--data_dir", w["bad_titles"], "--item_ids", "semantic"], r"bad_titles/item_titles.json.*999999"),
        ([*train, "--data_dir", data, "--item_ids", "semantic", "--id_tokens", "pieces", "--history", "encoder"],
         r"--item_ids semantic .* needs --id_tokens atomic"),
        # evaluation: checkpoints and data
        (["seq.py", "--data_dir", data, "--checkpoint", r / "no_ckpt"], r"no_ckpt: no model.safetensors"),
        (["seq.py", "--data_dir", data, "--checkpoint", w["bad_config"]], r"bad_config/config.json:\d+: not valid JSON"),
        (["seq.py", "--data_dir", data, "--checkpoint", w["cut_weights"]],
         r"cut_weights/model.safetensors: cannot read the weights"),
        (["topn.py", "--data_dir", data, "--checkpoint", w["no_tokenizer"]],
         r"no_tokenizer/tokenizer: cannot load the checkpoint's tokenizer"),
        (["topn.py", "--data_dir", w["bad_negatives"], "--checkpoint", ckpt],
         r"bad_negatives/negative.txt:5: user \d+ has 2 negatives, expected 99"),
        (["exp.py", "--data_dir", data, "--checkpoint", ckpt], r"data: no test review records .*with a 'test' list"),
        (["exp.py", "--data_dir", data, "--checkpoint", ckpt, "--split", "val"],
         r"data: no val review records .*with a 'val' list"),
        (["exp.py", "--data_dir", data, "--checkpoint", ckpt, "--tag", "../x"], r"--tag '../x': letters, digits"),
        (["exp.py", "--data_dir", data, "--checkpoint", ckpt, "--mbr_samples", 8],
         r"--mbr_samples chooses among beams: give --num_beams 2 or more"),
        (["scripts/results_table.py", r / "empty_dir"], r"empty_dir: no results_\*.json yet"),
        (["scripts/results_table.py", r / "bad_results"], r"bad_results/results_seq.json:1: not valid JSON"),
        (["dataset.py", w["bad_id"]], r"bad_id/sequential.txt:3: non-integer id"),
        (["bench.py", "--data_dir", w["bad_maps"], "--steps", 1, "--phases", "seq"], r"bad_maps/datamaps.json:2: not valid JSON"),
        # data preparation and distillation
        (["data/prepare.py", "--reviews", r / "no_reviews.json", "--out", r / "p1"], r"no_reviews.json: file not found"),
        (["data/prepare.py", "--reviews", r / "reviews.json", "--out", r / "p2"], r"reviews.json: 2 bad lines .*line 2"),
        (["data/prepare.py", "--reviews", r / "empty.json.gz", "--out", r / "p3"], r"empty.json.gz: no valid reviews"),
        (["data/prepare.py", "--interactions", r / "log.csv", "--out", r / "p4"],
         r"log.csv:3: timestamp 'soon' is not a number"),
        (["data/distill.py", "--data_dir", r / "not_a_dataset"], r"not_a_dataset/explanation.json: not found"),
        (["data/distill.py", "--data_dir", r / "toys", "--prompts", r / "prompts_unknown.yaml"],
         r"prompts_unknown.yaml: prompt 'preference_attributes' \(user\) uses \['price'\]"),
        (["data/distill.py", "--data_dir", r / "toys", "--prompts", r / "prompts_broken.yaml"],
         r"prompts_broken.yaml:\d+: not valid YAML"),
        (["data/distill.py", "--data_dir", r / "toys", "--backend", "openai", "--server_url", "http://127.0.0.1:9/v1"],
         r"http://127.0.0.1:9/v1: cannot reach the server"),
        (["data/toys/distillation_toys.py", "--data_dir", r / "not_a_dataset"], r"not_a_dataset/explanation.json"),
        (["llama/example_chat_completion.py", "--ckpt_dir", r / "no_llm"], r"cannot load a model from .*no_llm"),
        (["bench_llm.py", "--data", r / "no_records.json"], r"no_records.json: file not found"),
        # HSFT
        (["hllm/main.py", "--data_dir", r / "nowhere"], r"nowhere/sequential.txt: file not found"),
        (["hllm/main.py", "--data_dir", data, "--config_file", r / "config.yaml"], r"config.yaml:\d+: not valid YAML"),
        (["hllm/bench.py", "--data_dir", r / "nowhere", "--item_cache", r / "cache.safetensors"],
         r"nowhere/sequential.txt: file not found"),
        (["scripts/repeat.py", "compare", r / "bad_results" / "results_seq.json", "--vs_rule", "co_occurrence"],
         r"bad_results/results_seq.json:1: not valid JSON"),
        (["scripts/compare.py", ckpt / "config.json"], r"config.json: not a results file"),
        (["hllm/item_caching.py", "--data_dir", w["bad_id"], "--out", r / "cache.safetensors"],
         r"bad_id/sequential.txt:3: non-integer id"),
    ]


def run_preloaded(python, env, argvs, out_dir):
    """Each command line in its own process, forked from one that imported torch and transformers once
    (tests/preloaded.py): [(exit status, stderr)]."""
    out_dir.mkdir()
    proc = subprocess.run([python, str(ROOT / "tests" / "preloaded.py"), str(out_dir)], cwd=ROOT, env=env,
                          input=json.dumps([[str(a) for a in argv] for argv in argvs]), capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return [(int((out_dir / f"{i}.status").read_text()), (out_dir / f"{i}.err").read_text())
            for i in range(len(argvs))]


def test_every_entry_point_fails_in_one_line(work, python, script_env):
    todo = cases(work)
    results = run_preloaded(python, script_env, [argv for argv, _ in todo], work["root"] / "preloaded")
    problems = []
    for (argv, pattern), (status, stderr) in zip(todo, results):
        lines = [line for line in stderr.splitlines() if line.strip()]
        last = lines[-1] if lines else ""
        if status != 2 or "Traceback" in stderr or not re.match(r"error: .*" + pattern, last):
            problems.append(f"{' '.join(map(str, argv[:1]))} ... -> status {status}, last line {last!r}\n"
                            f"{stderr[-1500:]}")
    assert not problems, f"{len(problems)} of {len(todo)} cases:\n" + "\n\n".join(problems)
    covered = {str(argv[0]) for argv, _ in todo}
    entry_points = {"pretrain.py", "seq.py", "topn.py", "exp.py", "bench.py", "bench_llm.py", "dataset.py",
                    "data/prepare.py", "data/distill.py", "data/toys/distillation_toys.py", "hllm/main.py",
                    "hllm/item_caching.py", "hllm/bench.py", "llama/example_chat_completion.py", "scripts/results_table.py",
                    "scripts/repeat.py", "scripts/compare.py"}
    assert entry_points <= covered


def test_debug_shows_the_traceback(work, python, script_env):
    proc = run(python, script_env, "seq.py", "--data_dir", work["data"], "--checkpoint", work["root"] / "no_ckpt",
               "--debug")
    assert proc.returncode == 2 and "Traceback" in proc.stderr and "UserError" in proc.stderr
    proc = run(python, {**script_env, "HDREC_DEBUG": "1"}, "dataset.py", work["bad_id"])
    assert proc.returncode == 2 and "Traceback" in proc.stderr and "DataError" in proc.stderr


def test_a_bug_still_crashes_loudly(python, script_env):
    proc = run(python, script_env, "-c", "import utils; utils.report_user_errors(); {}['bug']")
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "KeyError: 'bug'" in proc.stderr


def test_preloaded_runs_a_script_as_python_would(tmp_path, python, script_env):
    """The forked runner above gives the same status and stderr as a fresh interpreter: a user error, a bug, an
    explicit exit, a clean run that sees its own __name__, argv and folder."""
    script = tmp_path / "probe.py"
    script.write_text("import sys\nimport utils\nutils.report_user_errors()\nkind = sys.argv[1]\n"
                      "if kind == 'user': raise utils.UserError('probe.txt:3: bad line')\n"
                      "if kind == 'bug': {}['bug']\n"
                      "if kind == 'exit': sys.exit(3)\n"
                      "print(__name__, sys.argv[1:], sys.path[0] == __import__('os').path.dirname(__file__), "
                      "file=sys.stderr)\n")
    argvs = [[script, kind] for kind in ["user", "bug", "exit", "ok"]]
    forked = run_preloaded(python, script_env, argvs, tmp_path / "out")
    fresh = [run(python, script_env, *argv) for argv in argvs]
    assert [status for status, _ in forked] == [proc.returncode for proc in fresh] == [2, 1, 3, 0]
    assert forked[0][1] == fresh[0].stderr == "error: probe.txt:3: bad line\n"
    assert "Traceback" in forked[1][1] and forked[1][1].strip().endswith("KeyError: 'bug'")
    assert forked[3][1] == fresh[3].stderr == "__main__ ['ok'] True\n"
