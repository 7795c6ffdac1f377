"""Hierarchical distillation: an LLM writes layered rationales for every review sentence of a dataset.

    python data/distill.py --data_dir data/toys [--ckpt_dir M] [--stages 1,3] [--limit N] [--greedy]
    torchrun --nproc_per_node 2 data/distill.py --data_dir data/toys ...      (records sharded across ranks)

Reads DIR/explanation.json ({"train": [...], "val": [...], "test": [...]}, records {user, item, explanation,
feature}) and runs the stages of data/stages.py in order, prompts from data/prompts.yaml. Each stage appends one
JSON line per finished record to DIR/distill/stage{k}.jsonl (DIR/distill/stage{k}.rank{r}.jsonl under torchrun):
the record's key [split, index], a hash of its prompt, the fields written, the raw answer and, when the answer
could not be used, the fallback reason. By default answers are generated under each stage's shape (`--constrained`:
the grammar data/stages.py derives from the stage row, e.g. `The user is <1-9 words>.`), so they parse by
construction; `--no-constrained` is the paper's free generation, read by the lenient parsers. A record is done when
its line exists for the same prompt (and the same constraint), so a killed run
resumes where it stopped; a record whose LLM call failed gets the paper's fallback now and is retried next run.
When all five stages are complete it writes DIR/explanation_rationale.json (each record + the six fields).
"""
import argparse
import hashlib
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: `import utils`, `from llama import Llama`

from tqdm import tqdm

import utils
from dataset import DataError, read_json
from data.quality import format_report, quality_report, report_path
from data.stages import (PRODUCER, STAGES, constrained_wording, fallback_fields, generation_budget, load_prompts,
                         parse_answer, render_dialog, shape_grammar, PROMPTS_FILE)
from llama.backends import GRAMMAR_FIELDS

BACKEND_FAILURE = "backend failure"
MAX_FAILED_BATCHES_IN_A_ROW = 5  # then the backend is down (or misconfigured): stop instead of burning the dataset


def parse_args(argv=None, default_data_dir=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", default=default_data_dir,
                   help="dataset dir holding explanation.json" + (f" (default: {default_data_dir})" if default_data_dir else ""))
    p.add_argument("--ckpt_dir", default=None, help="model: HF folder or hub id, GGUF file, Meta Llama 3 folder "
                                                    "(default: SmolLM2-135M-Instruct)")
    p.add_argument("--tokenizer_path", default=None, help="tokenizer.model of a Meta Llama 3 folder")
    p.add_argument("--backend", default="transformers", choices=["transformers", "vllm", "openai", "llamacpp"],
                   help="transformers: in-process, batched; vllm: GPUs; openai: a server at --server_url; llamacpp: "
                        "llama.cpp's server started here on the GGUF model with --max_batch_size parallel slots "
                        "(scripts/setup_llamacpp.sh builds it)")
    p.add_argument("--server_url", default=None, help="OpenAI-compatible server, for --backend openai")
    p.add_argument("--server_retries", type=int, default=4,
                   help="openai/llamacpp: attempts after the first for a request that fails (back-off 1, 2, 4 ... s)")
    p.add_argument("--model_name", default=None, help="model name to ask the server for")
    p.add_argument("--dtype", default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--max_seq_len", type=int, default=512)
    p.add_argument("--max_batch_size", type=int, default=6)
    p.add_argument("--max_gen_len", type=int, default=128,
                   help="tokens per answer; 0 = up to max_seq_len as in the paper (answers are one or two sentences)")
    p.add_argument("--constrained", action=argparse.BooleanOptionalAction, default=True,
                   help="generate each answer under its stage's shape (default); --no-constrained: free generation "
                        "as in the paper, answers read by the lenient parsers")
    p.add_argument("--grammar_field", default="grammar", choices=GRAMMAR_FIELDS,
                   help="--backend openai: the request field the server reads a GBNF grammar from (llama.cpp: "
                        "grammar; vLLM: guided_grammar before 0.10.2, structured_outputs since); none: the server "
                        "has none, answers are generated free")
    p.add_argument("--temperature", type=float, default=0.6)
    p.add_argument("--top_p", type=float, default=0.9)
    p.add_argument("--greedy", action="store_true", help="greedy decoding (temperature 0)")
    p.add_argument("--stages", default="1,2,3,4,5", help="comma-separated stage numbers, run in increasing order")
    p.add_argument("--limit", type=int, default=None, help="only the first N records of each split (trials)")
    p.add_argument("--skip_bad_records", action="store_true", help="skip (and count) records missing a field")
    p.add_argument("--prompts", default=str(PROMPTS_FILE), help="the prompts file")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--report", metavar="DATA_DIR", default=None,
                   help="print the quality report of an existing run (no model is loaded) and stop")
    args = p.parse_args(argv)
    if not args.data_dir and not args.report:
        p.error("the following arguments are required: --data_dir")
    try:
        args.stages = sorted({int(s) for s in str(args.stages).split(",") if s.strip()})
    except ValueError:
        p.error(f"--stages must be comma-separated numbers, got {args.stages!r}")
    if not args.stages or not set(args.stages) <= {s.number for s in STAGES}:
        p.error(f"--stages must name stages among 1..{len(STAGES)}, got {args.stages}")
    if args.greedy:
        args.temperature = 0.0
    if args.constrained and args.backend == "openai" and args.grammar_field == "none":
        print("--grammar_field none: the server is sent no grammar, so answers are generated free (--no-constrained)")
        args.constrained = False
    if args.constrained and args.max_gen_len:
        for stage in STAGES:
            if stage.number in args.stages and args.max_gen_len < generation_budget(stage):
                p.error(f"--max_gen_len {args.max_gen_len} is too short for stage {stage.number} '{stage.name}' under "
                        f"its shape (up to ~{generation_budget(stage)} tokens): raise it or use --no-constrained")
    return args


def stage_grammar(stage, constrained):
    return shape_grammar(stage) if constrained else None


# ----------------------------------------------------------------------------- input records

def load_records(path, limit=None):
    """({(split, index): record}, {split: count}, the file's other top-level entries) from explanation.json."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: not found (a dataset dir needs explanation.json, see data/prepare.py)")
    data = read_json(path)
    splits = {name: value for name, value in data.items() if isinstance(value, list)} if isinstance(data, dict) else {}
    if not splits:
        raise DataError(f'{path}: expected {{"train": [...], "val": [...], "test": [...]}}, found no list of records')
    records = {}
    for split, rows in splits.items():
        for index, record in enumerate(rows[:limit]):
            records[(split, index)] = record
    sizes = {split: min(len(rows), limit) if limit is not None else len(rows) for split, rows in splits.items()}
    extra = {name: value for name, value in data.items() if name not in splits}
    return records, sizes, extra


def check_records(records, stages, path, skip_bad):
    """Every record must hold, as non-empty text, each field its stages read from the record itself (the others
    come from earlier stages). Returns the records to run and how many were skipped."""
    needed = {}  # field -> first stage needing it
    for stage in stages:
        for field in stage.reads:
            if field not in PRODUCER:
                needed.setdefault(field, stage)
    good, bad = {}, []
    for key, record in records.items():
        problem = None
        for field, stage in needed.items():
            value = record.get(field) if isinstance(record, dict) else None
            if not isinstance(record, dict):
                problem = "is not a JSON object"
            elif value is None:
                problem = f"has no '{field}'"
            elif not isinstance(value, str) or not value.strip():
                problem = f"has an empty or non-text '{field}'"
            if problem:
                problem = f"{path}: record {key[0]}[{key[1]}] {problem} (needed by stage {stage.number} '{stage.name}')"
                break
        if problem is None:
            good[key] = record
        elif skip_bad:
            bad.append(problem)
        else:
            raise DataError(problem + "; fix the file or pass --skip_bad_records to skip such records")
    if bad:
        print(f"skipping {len(bad)} bad record(s); first: {bad[0]}", file=sys.stderr)
    return good, len(bad)


# ----------------------------------------------------------------------------- stage files

def stage_path(out_dir, number, rank=None):
    return Path(out_dir) / (f"stage{number}.jsonl" if rank is None else f"stage{number}.rank{rank}.jsonl")


def read_stage(out_dir, number):
    """{key: line} from stage{k}.jsonl and any rank shards; the last line for a key wins. A line cut short by a
    crash (only ever the last one of a file) is ignored, so its record is simply redone."""
    lines = {}
    paths = [stage_path(out_dir, number)] + sorted(Path(out_dir).glob(f"stage{number}.rank*.jsonl"))
    for path in paths:
        if not path.exists():
            continue
        with open(path, encoding="utf-8") as f:
            rows = f.read().split("\n")
        for lineno, row in enumerate(rows, 1):
            if not row.strip():
                continue
            try:
                line = json.loads(row)
                lines[tuple(line["key"])] = line
            except (json.JSONDecodeError, KeyError, TypeError):
                if lineno < len(rows) - 1 or row.endswith("}"):  # not a cut-off tail: say so
                    print(f"{path}, line {lineno}: unreadable, ignored (its record will be redone)", file=sys.stderr)
    return lines


def drop_cut_tail(path):
    """Truncate a last line left without its newline by a crash, so appended lines start on a line of their own."""
    if not path.exists() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as f:
        data = f.read()
        if not data.endswith(b"\n"):
            f.truncate(data.rfind(b"\n") + 1)


def merge_shards(out_dir, number, order):
    """Fold the rank shards of a stage into stage{k}.jsonl (one line per key, records in dataset order)."""
    shards = sorted(Path(out_dir).glob(f"stage{number}.rank*.jsonl"))
    if not shards:
        return
    lines = read_stage(out_dir, number)
    position = {key: i for i, key in enumerate(order)}
    keys = sorted(lines, key=lambda k: (position.get(k, len(position)), str(k)))
    utils.atomic_write_text(stage_path(out_dir, number),
                            "".join(json.dumps(lines[k], ensure_ascii=False) + "\n" for k in keys))
    for shard in shards:
        shard.unlink()


def prompt_hash(dialog, grammar=None):
    """Answers are keyed by what was asked: the dialog, and the grammar when the answer was constrained."""
    asked = dialog if grammar is None else {"dialog": dialog, "grammar": grammar}
    return hashlib.sha1(json.dumps(asked, ensure_ascii=False, sort_keys=True).encode("utf-8")).hexdigest()[:16]


# ----------------------------------------------------------------------------- running one stage

def behind(records, outputs, prompts, constrained=False):
    """{stage number: keys without a current answer}. An answer is current when it exists and answers the prompt
    made from the current answers of the stages before it (an earlier stage redone since makes it stale)."""
    stale = {}
    for stage in STAGES:
        producers = {PRODUCER[field].number for field in stage.reads if field in PRODUCER}
        stale[stage.number] = set()
        for key, record in records.items():
            line = outputs[stage.number].get(key)
            if line is None or any(key in stale[n] for n in producers):
                stale[stage.number].add(key)
            elif line["prompt"] != prompt_hash(render_dialog(prompts[stage.name], read_inputs(stage, key, record, outputs)),
                                               stage_grammar(stage, constrained)):
                stale[stage.number].add(key)
    return stale


def read_inputs(stage, key, record, outputs):
    """The fields a stage reads: the review sentence from the record, the rest from earlier stages' answers."""
    return {field: outputs[PRODUCER[field].number][key]["outputs"][field] if field in PRODUCER else record[field]
            for field in stage.reads}


def stage_inputs(stage, records, outputs, stale, out_dir):
    """{key: inputs} for every record; the earlier stages this one reads must hold a current answer for each."""
    for field in stage.reads:
        producer = PRODUCER.get(field)
        if producer and stale[producer.number]:
            missing = [key for key in records if key in stale[producer.number]]
            key = missing[0]
            raise utils.UserError(f"stage {stage.number} '{stage.name}' needs '{field}' from stage {producer.number} "
                                  f"'{producer.name}', but {stage_path(out_dir, producer.number)} has no current answer "
                                  f"for {len(missing)} of {len(records)} records (first: {key[0]}[{key[1]}]; missing, or "
                                  f"made before an earlier stage was redone); run stage {producer.number} first, e.g. "
                                  f"--stages {producer.number},{stage.number}")
    return {key: read_inputs(stage, key, record, outputs) for key, record in records.items()}


def answer(generator, dialogs, args, grammar=None):
    """(answers, errors), one of each per dialog. The backend has already retried what can be retried, so an exception
    here is final for this run. A ValueError is about the input (e.g. a prompt longer than max_seq_len): the batch is
    asked again one dialog at a time so that only the offending records fail; any other error fails the batch."""
    try:
        results = generator.chat_completion(dialogs, temperature=args.temperature, top_p=args.top_p,
                                            max_gen_len=args.max_gen_len or None, grammar=grammar)
        return [result["generation"]["content"] for result in results], [None] * len(dialogs)
    except ValueError as e:
        if len(dialogs) == 1:
            return [None], [f"{type(e).__name__}: {e}"]
        pairs = [answer(generator, [dialog], args, grammar) for dialog in dialogs]
        return [a[0] for a, _ in pairs], [e[0] for _, e in pairs]
    except Exception as e:
        return [None] * len(dialogs), [f"{type(e).__name__}: {e}"] * len(dialogs)


def run_stage(stage, records, outputs, stale, prompt, generator, out_dir, args, rank=0, world_size=1):
    """Answer every record of `records` not yet done for this stage; return this rank's counts."""
    start = time.time()
    inputs = stage_inputs(stage, records, outputs, stale, out_dir)
    done = read_stage(out_dir, stage.number)
    grammar = stage_grammar(stage, args.constrained)
    dialogs, shas = {}, {}
    for key in records:
        dialogs[key] = render_dialog(prompt, inputs[key])
        shas[key] = prompt_hash(dialogs[key], grammar)
    # answers already on file, for any record with the same prompt (a backend failure is no answer)
    known = {line["prompt"]: line["raw"] for line in done.values() if line.get("fallback") != BACKEND_FAILURE}
    pending = [key for key in records
               if not (key in done and done[key]["prompt"] == shas[key] and done[key].get("fallback") != BACKEND_FAILURE)]
    by_prompt = {}  # identical prompts are generated once
    for key in pending:
        by_prompt.setdefault(shas[key], []).append(key)
    mine = [sha for sha in by_prompt if int(sha, 16) % world_size == rank]
    reuse = [sha for sha in mine if sha in known]
    generate = sorted((sha for sha in mine if sha not in known), key=lambda sha: len(str(dialogs[by_prompt[sha][0]])))

    counts = Counter(records=len(records), already_done=len(records) - len(pending), unique_prompts=len(generate))
    fallbacks = Counter()
    path = stage_path(out_dir, stage.number, rank if world_size > 1 else None)
    path.parent.mkdir(parents=True, exist_ok=True)
    drop_cut_tail(path)

    def finish(f, sha, raw, error=None):
        rows = []
        for key in by_prompt[sha]:
            fields, reason = (None, BACKEND_FAILURE) if error is not None else parse_answer(stage, raw, dialogs[key])
            if fields is None:
                fields = fallback_fields(stage, inputs[key])
                fallbacks[reason] += 1
            line = {"key": list(key), "prompt": sha, "outputs": fields, "raw": raw, "fallback": reason}
            if error is not None:
                line["error"] = error
            rows.append(json.dumps(line, ensure_ascii=False) + "\n")
        f.write("".join(rows))
        return len(rows)

    n_records = sum(len(by_prompt[sha]) for sha in mine)
    bar = utils.progress_bar(total=n_records, unit="rec", desc=f"stage {stage.number} {stage.name}", disable=rank != 0,
                             smoothing=0.1)
    failed_in_a_row = 0
    with open(path, "a", encoding="utf-8") as f:
        for sha in reuse:
            counts["reused"] += finish(f, sha, known[sha])
        f.flush()
        bar.update(counts["reused"])
        for i in range(0, len(generate), args.max_batch_size):
            batch = generate[i:i + args.max_batch_size]
            answers, errors = answer(generator, [dialogs[by_prompt[sha][0]] for sha in batch], args, grammar)
            failed = [error for error in errors if error is not None]
            failed_in_a_row = failed_in_a_row + 1 if len(failed) == len(batch) else 0
            if failed:  # keep going: these records get the fallback now and are retried by the next run
                tqdm.write(f"stage {stage.number}: backend failure on {len(failed)} prompt(s): {failed[-1]}",
                           file=sys.stderr)
            n = sum(finish(f, sha, reply, error) for sha, reply, error in zip(batch, answers, errors))
            f.flush()
            os.fsync(f.fileno())  # a finished batch survives a crash
            counts["generated"] += n
            bar.update(n)
            if failed_in_a_row >= MAX_FAILED_BATCHES_IN_A_ROW:
                bar.close()
                raise utils.UserError(f"stage {stage.number}: the backend failed {failed_in_a_row} batches in a row "
                                      f"(last: {failed[-1]}); stopping. Finished records are saved: rerun to resume.")
    bar.close()
    counts["seconds"] = time.time() - start
    counts["fallbacks"] = fallbacks
    return counts


def print_summary(stage, counts, lines, keys, rank, world_size):
    """This run's counts, then (from the merged stage file) the fallbacks of all records of the selection."""
    who = f"[rank {rank}] " if world_size > 1 else ""
    rate = (counts["generated"] + counts["reused"]) / counts["seconds"] if counts["seconds"] > 0 else 0.0
    print(f"{who}stage {stage.number} {stage.name}: {counts['records']} records, {counts['already_done']} already "
          f"done, {counts['generated']} generated ({counts['unique_prompts']} distinct prompts), {counts['reused']} "
          f"reused an identical prompt's answer; {counts['seconds']:.1f} s, {rate:.2f} records/s")
    if counts["fallbacks"]:
        why = ", ".join(f"{reason} {n}" for reason, n in counts["fallbacks"].most_common())
        print(f"{who}  fallbacks this run: {sum(counts['fallbacks'].values())} ({why})")
    if lines is not None:
        total = Counter(lines[k].get("fallback") for k in keys if k in lines)
        answered = sum(total.values())
        taken = {reason: n for reason, n in total.items() if reason}
        why = ", ".join(f"{reason} {n}" for reason, n in sorted(taken.items(), key=lambda kv: -kv[1]))
        print(f"  on file: {answered}/{len(keys)} records, {sum(taken.values())} fallbacks"
              + (f" ({why})" if why else ""))
        if total.get(BACKEND_FAILURE):
            print(f"  {total[BACKEND_FAILURE]} record(s) hold a fallback after a backend failure: rerun to retry them")


# ----------------------------------------------------------------------------- the whole pipeline

def setup_distributed():
    """(rank, world size, barrier) from torchrun's environment; a gloo group is enough for barriers on CPU or GPU."""
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    if world_size == 1:
        return 0, 1, lambda: None
    import torch.distributed as dist
    if not dist.is_initialized():
        dist.init_process_group(backend="gloo")
        group = None
    else:  # the backend set up its own (e.g. nccl) group: barrier on a gloo one
        group = dist.new_group(backend="gloo")
    return rank, world_size, lambda: dist.barrier(group=group)


def write_rationale(data_dir, records, sizes, extra, outputs):
    """explanation_rationale.json: explanation.json's splits, each record plus the fields of all five stages.
    Records outside a --limit trial are kept as they are (no rationale fields), so training loses no review."""
    merged = dict(extra)
    for split in sizes:
        merged[split] = []
    for key, record in records.items():
        row = dict(record)
        for stage in STAGES:
            if key in outputs[stage.number]:
                row.update(outputs[stage.number][key]["outputs"])
        merged[key[0]].append(row)
    path = Path(data_dir) / "explanation_rationale.json"
    utils.atomic_write_json(path, merged)
    return path


def distill(args, generator, on_stage=None):
    """Run the selected stages over args.data_dir with `generator` (anything with Llama's chat_completion).
    on_stage(stage, counts) is called after each stage (bench_llm.py times them).
    Returns the path of explanation_rationale.json, or None when not every stage is complete yet."""
    data_dir = Path(args.data_dir)
    out_dir = data_dir / "distill"
    rank, world_size, barrier = setup_distributed()
    source = data_dir / "explanation.json"
    records, sizes, extra = load_records(source, args.limit)
    selected = [stage for stage in STAGES if stage.number in args.stages]
    # inputs of later stages come from earlier ones, so only the record's own fields are checked up front
    records, skipped = check_records(records, selected, source, args.skip_bad_records)
    prompts = load_prompts(args.prompts)
    if args.constrained:
        prompts = constrained_wording(prompts)
    order = list(records)
    if rank == 0:
        print(f"{source}: {len(records)} records ({', '.join(f'{s} {n}' for s, n in sizes.items())})"
              + (f", {skipped} skipped" if skipped else "") + (f", first {args.limit} per split" if args.limit else "")
              + (f"; {world_size} ranks" if world_size > 1 else ""))

    outputs = {stage.number: read_stage(out_dir, stage.number) for stage in STAGES}
    for stage in selected:
        stale = behind(records, outputs, prompts, args.constrained)
        counts = run_stage(stage, records, outputs, stale, prompts[stage.name], generator, out_dir, args, rank,
                           world_size)
        barrier()
        if rank == 0:
            merge_shards(out_dir, stage.number, order)
        barrier()
        outputs[stage.number] = read_stage(out_dir, stage.number)
        print_summary(stage, counts, outputs[stage.number] if rank == 0 else None, order, rank, world_size)
        if on_stage:
            on_stage(stage, counts)

    if rank != 0:
        return None
    write_report(data_dir, records, outputs, prompts, args.prompts)
    unfinished = {number: len(keys) for number, keys in
                  behind(records, outputs, prompts, args.constrained).items() if keys}
    if unfinished:
        print(f"no current answer yet for: {', '.join(f'stage {n} ({k} records)' for n, k in unfinished.items())}; "
              f"explanation_rationale.json not written (run --stages {','.join(map(str, unfinished))})")
        return None
    if args.limit:   # every record goes into the merged file; only the first N per split carry rationales
        all_records, sizes, extra = load_records(source)
        records = {key: records.get(key, record) for key, record in all_records.items()}
    path = write_rationale(data_dir, records, sizes, extra, outputs)
    print(f"wrote {path}" + (f" (trial: rationales for the first {args.limit} records per split)" if args.limit else ""))
    return path


def write_report(data_dir, records, outputs, prompts, prompts_file):
    """distill_report.json (data/quality.py) for the records of this run, printed as a table."""
    report = quality_report(outputs, records, prompts)
    path = report_path(data_dir)
    utils.atomic_write_json(path, {"data_dir": str(data_dir), "records": len(records), "prompts": str(prompts_file),
                                   "stages": report})
    print("\n" + format_report(report, f"quality of the answers on file ({len(records)} records) -> {path}"))
    return report


def show_report(data_dir, prompts_file):
    """--report: the table of an existing run, recomputed from its stage files (and written again)."""
    data_dir = Path(data_dir)
    records, _, _ = load_records(data_dir / "explanation.json")
    outputs = {stage.number: read_stage(data_dir / "distill", stage.number) for stage in STAGES}
    if not any(outputs.values()):
        raise DataError(f"{data_dir / 'distill'}: no stage answers yet (run data/distill.py --data_dir {data_dir})")
    records = {key: r for key, r in records.items() if any(key in lines for lines in outputs.values())}  # --limit runs
    return write_report(data_dir, records, outputs, load_prompts(prompts_file), prompts_file)


def main(argv=None, default_data_dir=None):
    args = parse_args(argv, default_data_dir)
    if args.report:
        return show_report(args.report, args.prompts)
    utils.seed_everything(args.seed)
    from llama import Llama  # imported here so the pipeline itself can be used (and tested) without a model
    server_kwargs = {"openai": {"grammar_field": args.grammar_field, "retries": args.server_retries},
                     "llamacpp": {"retries": args.server_retries}}.get(args.backend, {})
    generator = Llama.build(ckpt_dir=args.ckpt_dir, tokenizer_path=args.tokenizer_path, max_seq_len=args.max_seq_len,
                            max_batch_size=args.max_batch_size, backend=args.backend, server_url=args.server_url,
                            model_name=args.model_name, seed=args.seed, dtype=args.dtype, device=args.device,
                            **server_kwargs)
    distill(args, generator)


if __name__ == "__main__":
    utils.report_user_errors()
    main()
