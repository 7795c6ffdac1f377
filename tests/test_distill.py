"""The distillation pipeline (data/stages.py, data/distill.py): parsers on a corpus of real-looking answers, stage
chaining, kill-and-resume, truncated lines, backend failures, sharding, and bad input. A fake deterministic
generator stands in for the LLM except in the tests at the end, which use the llama/ backend."""
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from data import distill
from dataset import DataError
from llama.server import free_port
from utils import UserError
from data.stages import (STAGES, generation_budget, load_prompts, parse_answer, parse_shaped, render_dialog,
                         shape_grammar, shape_regex, word_budget)

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
SAMPLE = SHARED / "p5" / "toys" / "explanation_sample.json"
CORPUS = json.loads((Path(__file__).parent / "data" / "parser_corpus.json").read_text(encoding="utf-8"))
FIELDS = ["user_preference", "item_attribution", "user_personality", "item_audience", "review_summary",
          "groundtruth_explanation"]


# ----------------------------------------------------------------------------- parsers

@pytest.mark.parametrize("case", CORPUS["cases"], ids=lambda c: f"stage{c['stage']}:{c['answer'][:40]!r}")
def test_parser_corpus(case):
    stage = STAGES[case["stage"] - 1]
    dialog = render_dialog(load_prompts()[stage.name], CORPUS["record"])
    fields, reason = parse_answer(stage, case["answer"], dialog)
    if "expect" in case:
        assert (fields, reason) == (case["expect"], None)
    else:
        assert (fields, reason) == (None, case["reject"])


def test_corpus_covers_every_stage_and_reason():
    for stage in STAGES:
        cases = [c for c in CORPUS["cases"] if c["stage"] == stage.number]
        assert sum("expect" in c for c in cases) >= 8 and sum("reject" in c for c in cases) >= 3
    reasons = {c["reject"] for c in CORPUS["cases"] if "reject" in c}
    assert reasons == {"empty answer", "refusal", "restatement of the prompt", "unparseable answer",
                       "no content (in shape)"}


def test_prompt_using_a_field_the_stage_does_not_read_is_refused(tmp_path):
    prompts = (REPO / "data" / "prompts.yaml").read_text()
    bad = tmp_path / "prompts.yaml"
    bad.write_text(prompts.replace('A user bought an item and said "{explanation}".\n    Use two sentences',
                                   'A user bought an item and said "{review_summary}".\n    Use two sentences'))
    with pytest.raises(ValueError, match=r"prompts.yaml: prompt 'preference_attributes' \(user\) uses \['review_summary'\]"):
        load_prompts(bad)


# ----------------------------------------------------------------------------- a fake LLM and a small dataset

class Killed(BaseException):
    """A crash (kill -9, Ctrl-C): not an Exception, so the pipeline does not treat it as a backend failure."""


def fake_answer(dialog):
    """A deterministic answer in the format each stage asks for; about 1 in 16 prompts gets garbage instead."""
    h = hashlib.sha1(json.dumps(dialog).encode()).hexdigest()
    system = dialog[0]["content"]
    if h[0] == "0":
        return "I cannot help with that."
    if "two extremely short" in system:
        return f"Sure! Here you go:\n1. The user prefers style {h[:6]}.\n2. The item's attributes are sturdy {h[6:12]}."
    if "personality" in system:
        return f"The user is careful and k{h[:5]}."
    if "audience" in system:
        return f"The item's audience is fans of {h[:6]}."
    if "Review summary" in system:
        return f"Review summary: a summary numbered {h[:8]}."
    return f"The user wanted item {h[:8]} badly."


class Fake:
    """Stands in for llama.Llama: records every dialog it answered; can crash or fail like a real backend."""

    def __init__(self, crash_after=None, fail_batches=(), too_long=None):
        self.answered = []               # dialogs answered, in order
        self.batches = 0
        self.crash_after = crash_after   # raise Killed once this many dialogs were answered
        self.fail_batches = set(fail_batches)  # batch numbers (from 0) that raise like a dead server
        self.too_long = too_long         # a dialog holding this text is refused like a prompt over max_seq_len

    def chat_completion(self, dialogs, temperature=0.6, top_p=0.9, max_gen_len=None, grammar=None):
        self.grammars = getattr(self, "grammars", []) + [grammar]
        batch, self.batches = self.batches, self.batches + 1
        if self.crash_after is not None and len(self.answered) + len(dialogs) > self.crash_after:
            raise Killed()
        if batch in self.fail_batches:
            raise TimeoutError("server did not answer in 60 s (after 3 retries)")
        if self.too_long and any(self.too_long in d[-1]["content"] for d in dialogs):
            raise ValueError("dialog 0 has 600 prompt tokens, leaving no room to generate within max_seq_len=512")
        self.answered += dialogs
        return [{"generation": {"role": "assistant", "content": fake_answer(d)}} for d in dialogs]


def make_dataset(path, n_val_duplicates=1):
    """A dataset dir from the real toys sample: 12 train, 6 val, 7 test records, one val sentence repeated."""
    sample = json.loads(SAMPLE.read_text())
    rows = sample["train"]
    data = {"source": sample["source"], "train": rows[:12], "val": [dict(r) for r in rows[12:18]], "test": rows[18:25]}
    for i in range(n_val_duplicates):
        data["val"][i]["explanation"] = data["train"][i]["explanation"]  # identical prompts: generated once
    path.mkdir(parents=True, exist_ok=True)
    (path / "explanation.json").write_text(json.dumps(data))
    return path


def run(data_dir, generator, *flags):
    args = distill.parse_args(["--data_dir", str(data_dir), "--max_batch_size", "4", *flags])
    return distill.distill(args, generator)


def distinct(dialogs):
    return sorted(json.dumps(d) for d in dialogs)


# ----------------------------------------------------------------------------- the pipeline

def test_stages_chain_and_identical_prompts_run_once(tmp_path, capsys):
    data_dir = make_dataset(tmp_path / "toys")
    fake = Fake()
    out = run(data_dir, fake)
    merged = json.loads(out.read_text())
    source = json.loads((data_dir / "explanation.json").read_text())
    assert merged["source"] == source["source"]
    for split in ("train", "val", "test"):
        assert [{k: r[k] for k in ("user", "item", "explanation", "feature")} for r in merged[split]] == source[split]
        for record in merged[split]:
            assert all(isinstance(record[f], str) and record[f] for f in FIELDS)
    # each stage's prompt holds the earlier stages' outputs for that record
    first = merged["train"][2]
    stage4 = [d for d in fake.answered if "Review summary" in d[0]["content"] and first["explanation"] in d[1]["content"]]
    assert len(stage4) == 1
    for field in ("user_preference", "item_attribution", "user_personality", "item_audience"):
        assert first[field] in stage4[0][1]["content"]
    assert first["groundtruth_explanation"] == re.sub(r"\.$", "", fake_answer(
        [d for d in fake.answered if "STRING" in d[0]["content"] and first["explanation"] in d[1]["content"]][0]))
    # 25 records, 24 distinct sentences: the repeated one is generated once per stage
    assert len(fake.answered) == 5 * 24 and len(set(map(json.dumps, fake.answered))) == 5 * 24
    assert merged["val"][0]["groundtruth_explanation"] == merged["train"][0]["groundtruth_explanation"]
    # the garbage answers fell back by the paper's rule, and the summary says so
    lines = distill.read_stage(data_dir / "distill", 1)
    fell_back = [k for k, line in lines.items() if line["fallback"]]
    assert fell_back, "the fake answers some prompts with garbage"
    for split, index in fell_back:
        record = merged[split][index]
        assert record["user_preference"] == record["item_attribution"] == record["explanation"]
    assert "fallbacks" in capsys.readouterr().out


def test_kill_and_resume_redoes_nothing_and_loses_nothing(tmp_path):
    reference = Fake()
    expected = run(make_dataset(tmp_path / "reference"), reference).read_bytes()

    data_dir = make_dataset(tmp_path / "killed")
    first = Fake(crash_after=2 * 24 + 5)  # dies during stage 3, in the middle of a batch
    with pytest.raises(Killed):
        run(data_dir, first)
    assert not (data_dir / "explanation_rationale.json").exists()
    second = Fake()
    out = run(data_dir, second)
    assert not set(map(json.dumps, first.answered)) & set(map(json.dumps, second.answered)), "nothing redone"
    assert distinct(first.answered + second.answered) == distinct(reference.answered), "nothing lost"
    assert out.read_bytes() == expected

    third = Fake()  # a finished run has nothing left to do
    run(data_dir, third)
    assert third.answered == []


def test_a_line_cut_short_by_a_crash_is_ignored_and_redone(tmp_path):
    data_dir = make_dataset(tmp_path / "toys")
    run(data_dir, Fake(), "--stages", "1")
    path = data_dir / "distill" / "stage1.jsonl"
    text = path.read_text()
    last = json.loads(text.splitlines()[-1])
    path.write_text(text[:-25])  # the last line loses its end and its newline
    assert tuple(last["key"]) not in distill.read_stage(data_dir / "distill", 1)
    again = Fake()
    run(data_dir, again, "--stages", "1")
    lines = path.read_text().splitlines()
    assert all(json.loads(line) for line in lines)  # the cut line was dropped, not glued to the next one
    assert len(lines) == 25 and len(again.answered) <= 1
    assert distill.read_stage(data_dir / "distill", 1)[tuple(last["key"])]["outputs"] == last["outputs"]


def test_backend_failure_falls_back_now_and_is_retried_next_run(tmp_path, capsys):
    expected = run(make_dataset(tmp_path / "reference"), Fake()).read_bytes()
    data_dir = make_dataset(tmp_path / "toys")
    out = run(data_dir, Fake(fail_batches={1}))  # the second batch of stage 1 times out
    lines = distill.read_stage(data_dir / "distill", 1)
    failed = [k for k, line in lines.items() if line["fallback"] == distill.BACKEND_FAILURE]
    assert 4 <= len(failed) <= 5 and all("TimeoutError" in lines[k]["error"] for k in failed)
    merged = json.loads(out.read_text())  # the run finished, with the paper's fallback for those records
    split, index = failed[0]
    assert merged[split][index]["user_preference"] == merged[split][index]["explanation"]
    assert "backend failure" in capsys.readouterr().out
    retry = Fake()
    assert run(data_dir, retry).read_bytes() == expected
    # stage 1 redid only the failed records, and the later stages only the records whose inputs changed
    stage1 = [d for d in retry.answered if "two extremely short" in d[0]["content"]]
    assert len(stage1) == len({json.dumps(d) for d in stage1}) <= len(failed)
    assert len(retry.answered) <= 4 * len(failed) + len(stage1)


def test_a_prompt_the_backend_refuses_fails_alone(tmp_path):
    data_dir = make_dataset(tmp_path / "toys")
    long_one = json.loads((data_dir / "explanation.json").read_text())["test"][4]["explanation"]
    run(data_dir, Fake(too_long=long_one))
    for stage in STAGES:
        lines = distill.read_stage(data_dir / "distill", stage.number)
        failed = sorted(k for k, line in lines.items() if line["fallback"] == distill.BACKEND_FAILURE)
        assert failed == [("test", 4)] and "max_seq_len" in lines[("test", 4)]["error"]


def test_backend_down_stops_the_run(tmp_path):
    data_dir = make_dataset(tmp_path / "toys")
    with pytest.raises(UserError, match="failed 5 batches in a row"):
        run(data_dir, Fake(fail_batches=range(100)))


def test_merge_of_rank_shards(tmp_path):
    out_dir = tmp_path / "distill"
    out_dir.mkdir()
    order = [("train", 0), ("train", 1), ("val", 0), ("test", 0)]

    def line(key, text):
        return json.dumps({"key": list(key), "prompt": "p", "outputs": {"review_summary": text}, "raw": text,
                           "fallback": None}) + "\n"

    (out_dir / "stage4.jsonl").write_text(line(("train", 1), "old answer"))
    (out_dir / "stage4.rank0.jsonl").write_text(line(("test", 0), "d") + line(("train", 0), "a"))
    (out_dir / "stage4.rank1.jsonl").write_text(line(("train", 1), "b") + line(("val", 0), "c")[:-9])  # cut by a crash
    distill.merge_shards(out_dir, 4, order)
    assert sorted(p.name for p in out_dir.iterdir()) == ["stage4.jsonl"]
    merged = [json.loads(row) for row in (out_dir / "stage4.jsonl").read_text().splitlines()]
    assert [(tuple(m["key"]), m["raw"]) for m in merged] == [(("train", 0), "a"), (("train", 1), "b"), (("test", 0), "d")]


def test_torchrun_style_sharding_matches_one_process(tmp_path):
    expected = run(make_dataset(tmp_path / "reference"), Fake()).read_bytes()
    data_dir = make_dataset(tmp_path / "sharded")
    code = (f"import sys; sys.path[:0] = [{str(REPO)!r}, {str(Path(__file__).parent)!r}]\n"
            "from test_distill import Fake, run\n"
            f"fake = Fake(); run({str(data_dir)!r}, fake); print('answered', len(fake.answered))\n")
    env = dict(os.environ, WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    ranks = [subprocess.Popen([sys.executable, "-c", code], env=dict(env, RANK=str(r), LOCAL_RANK=str(r)),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(2)]
    logs = [p.communicate(timeout=240)[0] for p in ranks]
    assert [p.returncode for p in ranks] == [0, 0], logs
    answered = [int(re.search(r"answered (\d+)", log).group(1)) for log in logs]
    assert sum(answered) == 5 * 24 and min(answered) > 0, answered  # split between the ranks, nothing twice
    assert (data_dir / "explanation_rationale.json").read_bytes() == expected
    assert sorted(p.name for p in (data_dir / "distill").iterdir()) == [f"stage{k}.jsonl" for k in range(1, 6)]


# ----------------------------------------------------------------------------- bad input

def test_record_missing_a_field_is_an_error_or_skipped_and_counted(tmp_path, capsys):
    data_dir = make_dataset(tmp_path / "toys")
    data = json.loads((data_dir / "explanation.json").read_text())
    del data["val"][3]["explanation"]
    data["test"][1]["explanation"] = "  "
    (data_dir / "explanation.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"explanation.json: record val\[3\] has no 'explanation' "
                                         r"\(needed by stage 1 'preference_attributes'\)"):
        run(data_dir, Fake())
    out = run(data_dir, Fake(), "--skip_bad_records")
    assert "skipping 2 bad record(s)" in capsys.readouterr().err
    merged = json.loads(out.read_text())
    assert [len(merged[s]) for s in ("train", "val", "test")] == [12, 5, 6]


def test_not_a_dataset_is_a_clear_error(tmp_path):
    (tmp_path / "explanation.json").write_text('{"train": [\n{"user": 1,}\n]}')
    with pytest.raises(ValueError, match=r"explanation.json:2: not valid JSON"):
        run(tmp_path, Fake())
    with pytest.raises(DataError, match="explanation.json: not found"):
        run(tmp_path / "nowhere", Fake())


def test_a_stage_without_its_inputs_is_a_clear_error(tmp_path):
    data_dir = make_dataset(tmp_path / "toys")
    run(data_dir, Fake(), "--stages", "1")
    with pytest.raises(UserError, match=r"stage 3 'audience' needs 'user_personality' from stage 2 'personality'.*"
                                           r"run stage 2 first, e\.g\. --stages 2,3"):
        run(data_dir, Fake(), "--stages", "3")
    fake = Fake()
    assert run(data_dir, fake, "--stages", "5") is None  # stage 5 reads only the sentence; stages 2-4 still missing
    assert len(fake.answered) == 24


def test_redoing_a_stage_makes_the_later_ones_stale(tmp_path, capsys):
    data_dir = make_dataset(tmp_path / "toys")
    run(data_dir, Fake())
    edited = tmp_path / "prompts.yaml"  # the user rewords stage 1's prompt: stage 1 is redone for every record
    edited.write_text((REPO / "data" / "prompts.yaml").read_text().replace("respectively.", "respectively, please."))
    redo = Fake()
    assert run(data_dir, redo, "--stages", "1", "--prompts", str(edited)) is None  # 2-4 now answer old prompts
    assert len(redo.answered) == 24
    assert "no current answer yet for: stage 2 (25 records), stage 3 (25 records), stage 4 (25 records)" \
        in capsys.readouterr().out
    with pytest.raises(UserError, match=r"stage 3 'audience' needs 'user_personality' from stage 2 'personality'"
                                           r".*made before an earlier stage was redone.*--stages 2,3"):
        run(data_dir, Fake(), "--stages", "3", "--prompts", str(edited))
    rest = Fake()
    assert run(data_dir, rest, "--prompts", str(edited)) is not None
    assert len(rest.answered) == 3 * 24  # stages 2-4 redone, stage 5 (reads only the sentence) kept


def test_limit_runs_a_trial_on_the_first_records(tmp_path, capsys):
    data_dir = make_dataset(tmp_path / "toys")
    fake = Fake()
    merged = json.loads(run(data_dir, fake, "--limit", "2", "--stages", "1,2,3,4,5").read_text())
    source = json.loads((data_dir / "explanation.json").read_text())
    assert [len(merged[s]) for s in ("train", "val", "test")] == [len(source[s]) for s in ("train", "val", "test")]
    for split in ("train", "val", "test"):   # every record kept; only the first 2 of each split carry rationales
        assert [all(f in r for f in FIELDS) for r in merged[split]] == [i < 2 for i in range(len(source[split]))]
        assert [r["explanation"] for r in merged[split]] == [r["explanation"] for r in source[split]]
    assert len(fake.answered) == 5 * 5  # val[0] repeats train[0]
    assert "trial" in capsys.readouterr().out


def test_scripts_run_from_anywhere_and_default_to_their_folder():
    scripts = [REPO / "data" / ds / f"distillation_{ds}.py" for ds in ("beauty", "sports", "toys")]
    scripts.append(REPO / "data" / "distill.py")
    # each script as `python script --help` would run it (own folder first on sys.path), in one interpreter
    code = ("import runpy, sys\n"
            f"for script in {[str(p) for p in scripts]!r}:\n"
            "    sys.argv, sys.path[0] = [script, '--help'], script.rsplit('/', 1)[0]\n"
            "    sys.modules.pop('data', None); sys.modules.pop('data.distill', None)\n"
            "    try: runpy.run_path(script, run_name='__main__')\n"
            "    except SystemExit as e: assert not e.code, e.code\n")
    shown = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", timeout=120)
    assert shown.returncode == 0, shown.stderr
    text = " ".join(shown.stdout.split())
    for script in scripts[:3]:
        assert f"(default: {script.parent})" in text
    args = distill.parse_args(["--data_dir", "x", "--greedy", "--stages", "3,1"])
    assert (args.temperature, args.top_p, args.stages, args.max_seq_len, args.max_batch_size) == (0.0, 0.9, [1, 3], 512, 6)
    assert distill.parse_args(["--data_dir", "x"]).temperature == 0.6


# ----------------------------------------------------------------------------- with the real llama/ backend

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """A randomly initialised 2-layer Llama with a byte-level BPE trained here on the sample sentences."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    folder = tmp_path_factory.mktemp("tiny_llama")
    texts = [r["explanation"] for r in json.loads(SAMPLE.read_text())["train"]]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer, bpe.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400, special_tokens=["<|im_start|>", "<|im_end|>", "<pad>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                        pad_token="<pad>")
    tokenizer.chat_template = CHATML
    config = LlamaConfig(vocab_size=bpe.get_vocab_size(), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_stages_chain_on_a_tiny_random_llama(tmp_path, tiny_llama, capsys):
    pytest.importorskip("llama")
    data_dir = make_dataset(tmp_path / "toys")
    argv = ["--data_dir", str(data_dir), "--ckpt_dir", str(tiny_llama), "--limit", "2", "--max_gen_len", "96", "--max_seq_len", "1024",
            "--max_batch_size", "3", "--seed", "3"]
    distill.main(argv)
    merged = json.loads((data_dir / "explanation_rationale.json").read_text())
    source = json.loads((data_dir / "explanation.json").read_text())
    assert [len(merged[s]) for s in ("train", "val", "test")] == [len(source[s]) for s in ("train", "val", "test")]
    in_shape = 0
    for stage in STAGES:
        lines = distill.read_stage(data_dir / "distill", stage.number)
        assert len(lines) == 6 and all(isinstance(line["raw"], str) and line["raw"] for line in lines.values())
        # a random model writes noise: every record still gets its fields, by the fallback rule where needed
        for (split, index), line in lines.items():
            record = merged[split][index]
            assert all(record[field] == value for field, value in line["outputs"].items())
            if line["fallback"]:
                assert set(line["outputs"].values()) == {record[stage.fallback]}
            opening = stage.shape[0].prefix + stage.shape[0].stem
            # generated under the stage's grammar: a random model writes the shape's opening (never by chance), and
            # the answer is in the shape unless the token limit cut it (max_seq_len 1024 leaves room for the noise
            # that earlier stages feed into stage 4's prompt)
            assert line["raw"].startswith(opening) or opening.startswith(line["raw"]), line["raw"]
            in_shape += parse_shaped(stage, line["raw"]) is not None
    assert in_shape >= 6, "some answers end inside --max_gen_len and are exactly in their stage's shape"
    assert "stage 5 groundtruth_explanation: 6 records" in capsys.readouterr().out
    distill.main(argv)  # a second run finds everything done
    assert "6 already done, 0 generated" in capsys.readouterr().out


@pytest.mark.slow
def test_short_real_run_with_the_default_smollm2(tmp_path, capsys):
    pytest.importorskip("llama")
    data_dir = tmp_path / "toys"
    data_dir.mkdir()
    shutil.copy(SAMPLE, data_dir / "explanation.json")  # only a "train" split, and a "source" note
    distill.main(["--data_dir", str(data_dir), "--limit", "3", "--greedy", "--max_batch_size", "3", "--max_gen_len", "96"])
    out = capsys.readouterr().out
    merged = json.loads((data_dir / "explanation_rationale.json").read_text())
    assert list(merged) == ["source", "train"] and len(merged["train"]) == 25
    for record in merged["train"][:3]:
        assert all(isinstance(record[f], str) and record[f].strip() for f in FIELDS)
    answered = [line for k in range(1, 6) for line in distill.read_stage(data_dir / "distill", k).values()]
    assert len(answered) == 15 and not any(line["fallback"] == distill.BACKEND_FAILURE for line in answered)
    assert sum(line["fallback"] is None for line in answered) >= 3, "SmolLM2 answers prompts in the asked format"
    print(out)


# ----------------------------------------------------------------------------- answer shapes, constrained generation

def shaped_answer(stage, n_words):
    """An answer in the stage's shape with n_words free words on every line."""
    return "\n".join(line.prefix + line.stem + " ".join(f"soft{i}" for i in range(n_words)) + "."
                      for line in stage.shape)


def test_each_stage_shape_gives_its_grammar_and_its_parser():
    """One statement per stage: the grammar (read by xgrammar here) and the regex accept the same answers, the
    answers it allows parse without a fallback and stay within the stage's word limit."""
    from xgrammar.testing import _is_grammar_accept_string as grammar_accepts
    for stage in STAGES:
        grammar, regex = shape_grammar(stage), shape_regex(stage)
        lo, hi = min(word_budget(line, stage.max_words) for line in stage.shape)
        longest, too_long = shaped_answer(stage, hi), shaped_answer(stage, hi + 1)
        dialog = [{"role": "user", "content": "A user bought an item and said 'nice'."}]
        for answer, ok in [(shaped_answer(stage, lo), True), (longest, True), (too_long, False),
                           (shaped_answer(stage, lo) + " More.", False), (longest.replace("soft1", "so.ft"), False),
                           (longest.replace("soft1", "[adjective]"), False), (longest.replace(" soft1", "  soft1"), False),
                           (longest.replace("soft1", "xxx"), False), (longest.replace("soft1", "xylo"), True),
                           (longest.replace(" soft1", "\u00a0soft1"), False),      # a no-break space is a space
                           (longest.replace(" soft1", "\u2028soft1"), False), (longest.replace("soft1", "sòft"), True),
                           (longest.replace(" soft1 ", " soft1, "), True), (longest.replace(" soft1 ", " of,and,and "), False)]:
            assert grammar_accepts(grammar, answer) is ok and bool(regex.fullmatch(answer)) is ok, (stage.name, answer)
            if ok:
                fields, reason = parse_answer(stage, answer, dialog)
                assert reason is None and set(fields) == set(stage.writes)
                assert all(len(v.split()) <= stage.max_words for v in fields.values()), fields
        assert generation_budget(stage) <= 128, "the default --max_gen_len fits every constrained answer"
    dialog = [{"role": "user", "content": "A user bought an item and said 'nice'."}]
    fields, _ = parse_answer(STAGES[0], shaped_answer(STAGES[0], 2), dialog)
    assert fields == {"user_preference": "The user prefers soft0 soft1.", "item_attribution":
                      "The item's attributes are soft0 soft1."}
    assert parse_answer(STAGES[3], "Review summary: A fine soft gift.", dialog)[0] == {"review_summary": "A fine soft gift"}
    assert parse_shaped(STAGES[1], "The user is xxx.") is None        # the template's placeholder is not in the shape
    # answers not in the shape (free generation) still go to the lenient parser
    assert parse_answer(STAGES[1], "Sure! The user is thrifty and practical!", dialog)[0] == {
        "user_personality": "The user is thrifty and practical."}


def test_constrained_is_the_default_and_each_choice_keys_its_own_answers(tmp_path, capsys):
    data_dir = make_dataset(tmp_path / "toys")
    fake = Fake()
    run(data_dir, fake)
    shapes = {shape_grammar(stage) for stage in STAGES}
    assert set(fake.grammars) == shapes and len(shapes) == 5           # every batch asked under its stage's grammar
    capsys.readouterr()
    free = Fake()
    run(data_dir, free, "--no-constrained")      # the paper's free generation: asked again, not read from the file
    assert set(free.grammars) == {None} and len(free.answered) == len(fake.answered)
    # the paper's wording shows the placeholder xxx; under a shape the grammar writes the stems, and `...` is shown
    template = [json.dumps(d) for d in free.answered if "xxx" in json.dumps(d)]
    assert template and not any("xxx" in json.dumps(d) for d in fake.answered)
    stage_1 = [t for t in template if "The user prefers xxx." in t]        # the later stages read other answers
    assert stage_1 and {t.replace("xxx.", "...") for t in stage_1} <= set(distinct(fake.answered))
    assert "0 already done" in capsys.readouterr().out
    again = Fake()
    run(data_dir, again, "--no-constrained")
    assert again.answered == []
    with pytest.raises(SystemExit):
        distill.parse_args(["--data_dir", str(data_dir), "--max_gen_len", "40"])
    assert "--max_gen_len 40 is too short for stage 1" in capsys.readouterr().err
    assert distill.parse_args(["--data_dir", "d", "--max_gen_len", "40", "--no-constrained"]).max_gen_len == 40
    args = distill.parse_args(["--data_dir", "d", "--backend", "openai", "--grammar_field", "none"])
    assert args.constrained is False and "answers are generated free" in capsys.readouterr().out


# ----------------------------------------------------------------------------- the quality report

def test_quality_figures_of_a_hand_made_stage():
    from data.quality import field_report
    stage = STAGES[4]                                       # groundtruth_explanation, limit 20 words
    records = {("train", i): {"explanation": text} for i, text in enumerate(
        ["great soft brush", "great soft brush", "nice color", "nice color", "cheap", "cheap"])}

    def line(value, fallback=None):
        return {"outputs": {"groundtruth_explanation": value}, "fallback": fallback}
    long = " ".join(["word"] * 25)
    lines = {("train", 0): line("The user wanted a soft brush for travel"),
             ("train", 1): line("Great, soft brush!"),                                  # the review again
             ("train", 2): line("You will serve as an assistant to help me explain"),  # the prompt again
             ("train", 3): line("nice color", fallback="refusal"),                      # the fallback: the review
             ("train", 4): line("The user likes xxx things"),                           # the template's xxx
             ("train", 5): line(long)}
    figures = field_report(stage, "groundtruth_explanation", lines, records, load_prompts()[stage.name])
    values = [lines[k]["outputs"]["groundtruth_explanation"] for k in sorted(lines)]
    tokens = [t for v in values for t in re.findall(r"[a-z0-9']+", v.lower())]
    assert figures["records"] == 6 and figures["fallbacks"] == 1 and figures["fallback_reasons"] == {"refusal": 1}
    assert (figures["copies_review"], figures["restates_prompt"], figures["template_words"]) == (1, 1, 1)
    assert figures["distinct_answers"] == 1.0 and figures["distinct_1"] == pytest.approx(len(set(tokens)) / len(tokens))
    assert figures["mean_words"] == pytest.approx((8 + 3 + 10 + 2 + 5 + 25) / 6) and figures["max_words"] == 25
    assert figures["over_limit"] == 1 and figures["word_limit"] == 20


def test_every_run_writes_a_report_and_report_reprints_it(tmp_path, capsys):
    data_dir = make_dataset(tmp_path / "toys")
    run(data_dir, Fake())
    report = json.loads((data_dir / "distill_report.json").read_text())
    assert report["records"] == 25 and list(report["stages"]) == [f"stage {s.number} {s.name}" for s in STAGES]
    stage1 = report["stages"]["stage 1 preference_attributes"]
    lines = distill.read_stage(data_dir / "distill", 1)
    assert set(stage1) == {"user_preference", "item_attribution"}
    assert stage1["user_preference"]["records"] == 25
    assert stage1["user_preference"]["fallbacks"] == sum(bool(line["fallback"]) for line in lines.values())
    printed = capsys.readouterr().out
    assert "quality of the answers on file (25 records)" in printed and "stage 5 groundtruth_explanation / " in printed
    (data_dir / "distill_report.json").unlink()
    distill.main(["--report", str(data_dir)])             # no model is loaded
    assert json.loads((data_dir / "distill_report.json").read_text()) == report
    assert "stage 1 preference_attributes / user_preference" in capsys.readouterr().out
    with pytest.raises(DataError, match="no stage answers yet"):
        distill.main(["--report", str(make_dataset(tmp_path / "fresh"))])
