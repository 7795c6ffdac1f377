"""Speed benchmark of the recommender: training samples/s, sequential and top-N evaluation users/s, peak memory.

    python bench.py --data_dir ../shared/data/p5/beauty --size small --ratio 1:1:1:3 --batch_size 64
    python bench.py --data_dir ../shared/data/p5/beauty --size mini --ratio 0:1:0:1 --phases train,seq,topn

Random-init weights (speed does not depend on training). Each phase runs in its own process, so the peak resident
memory printed is that phase's. Users are a seeded random sample (never the head of the file).
"""
import argparse
import json
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from utils import UserError, report_user_errors

report_user_errors()
p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
p.add_argument("--data_dir", required=True)
p.add_argument("--size", default="mini", help="from-scratch size (tiny, mini, small)")
p.add_argument("--ratio", default="1:1:1:3")
p.add_argument("--id_tokens", default="atomic", choices=["pieces", "atomic"], help="as pretrain.py")
p.add_argument("--history", default="decoder", choices=["encoder", "decoder"], help="as pretrain.py")
p.add_argument("--batch_size", type=int, default=64)
p.add_argument("--steps", type=int, default=12, help="timed training steps (after 2 warm-up steps)")
p.add_argument("--micro_batch_tokens", type=int, default=2560, help="as pretrain.py on CPU (0: whole batches)")
p.add_argument("--eval_users", type=int, default=256)
p.add_argument("--eval_batch_size", type=int, default=32)
p.add_argument("--protocol", default="clean", choices=["clean", "paper"])
p.add_argument("--phases", default="train,seq,topn")
p.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
p.add_argument("--seed", type=int, default=1)
p.add_argument("--_phase", help=argparse.SUPPRESS)
p.add_argument("--_work", help=argparse.SUPPRESS)
args = p.parse_args()
if args.history == "decoder" and args.id_tokens != "atomic":
    p.error("--history decoder needs --id_tokens atomic (as pretrain.py)")


def peak_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_phase(phase, work):
    import torch
    import tasks
    from dataset import load_dataset
    from evaluation import rank_next, rank_topn
    from module import HDRec, backward_batch, from_scratch_t5, train_tokenizer
    from transformers import AutoTokenizer
    from utils import bf16_supported, seed_everything

    if args.threads:
        torch.set_num_threads(args.threads)
    seed_everything(args.seed)
    ds = load_dataset(work / "data", log=lambda m: None)
    tok_dir = work / f"tokenizer_{args.id_tokens}"
    if not tok_dir.exists():
        atomic = args.id_tokens == "atomic"
        tokenizer, _ = train_tokenizer(tasks.tokenizer_corpus(ds, args.seed, ids=not atomic), 8000,
                                       tasks.id_words(ds) if atomic else None)
        tokenizer.save_pretrained(tok_dir)
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    model = HDRec(from_scratch_t5(args.size, tokenizer), seed=args.seed)
    encoder = tasks.WordEncoder(tokenizer)
    encoder.add(tasks.id_words(ds))
    if args.history == "decoder":
        model.set_item_tokens(encoder.single_item_tokens(ds.num_items))
    device = torch.device("cpu")
    use_bf16 = bf16_supported(device)
    base_mb = peak_mb()
    out = {"phase": phase, "size": args.size, "id_tokens": args.id_tokens, "history": args.history,
           "vocab": len(tokenizer),
           "params_M": sum(p.numel() for p in model.parameters()) / 1e6,
           "bf16": use_bf16, "threads": torch.get_num_threads()}
    rng = random.Random(args.seed)
    if phase == "train":
        ratio = [int(x) for x in args.ratio.split(":")]
        plan = tasks.epoch_plan(ds, ratio, args.batch_size, args.seed, 1)[:args.steps + 2]
        optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4)
        model.train()
        samples, tokens, start = 0, 0, None
        for step, (task, users) in enumerate(plan):
            if step == 2:
                start = time.time()
            batch = tasks.make_batch(ds, encoder, task, users, rng, history=args.history)
            optimizer.zero_grad()
            backward_batch(model, batch, args.micro_batch_tokens,
                           torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_bf16))
            optimizer.step()
            if step >= 2:
                samples += len(users)
                tokens += int(batch["attention_mask"].sum())
        seconds = time.time() - start
        out.update(samples_per_s=samples / seconds, input_tokens_per_sample=tokens / samples, steps=len(plan) - 2,
                   batch_size=args.batch_size, micro_batch_tokens=args.micro_batch_tokens, ratio=args.ratio)
    else:
        model.eval()
        users = sorted(random.Random(f"{args.seed}-bench").sample(ds.users, min(args.eval_users, len(ds.users))))
        start = time.time()
        if phase == "seq":
            rank_next(model, tokenizer, encoder, ds, users, args.protocol, batch_size=args.eval_batch_size,
                      seed=args.seed, progress=False, history=args.history)
        else:       # the model alone: no reference rules
            rank_topn(model, tokenizer, encoder, ds, users, args.protocol, batch_size=args.eval_batch_size,
                      seed=args.seed, progress=False, history=args.history, rules={})
        out.update(users_per_s=len(users) / (time.time() - start), users=len(users), protocol=args.protocol)
    out.update(peak_rss_mb=peak_mb(), rss_before_phase_mb=base_mb)
    print(json.dumps(out))


if args._phase:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    run_phase(args._phase, Path(args._work))
    sys.exit()

# the parent: check the data where the user keeps it, copy it (negative.txt may have to be written), then one child
# process per phase
from dataset import load_datamaps, load_sequences  # noqa: E402

load_sequences(Path(args.data_dir) / "sequential.txt", *load_datamaps(Path(args.data_dir) / "datamaps.json"))
with tempfile.TemporaryDirectory() as tmp:
    work = Path(tmp)
    shutil.copytree(args.data_dir, work / "data")
    for phase in args.phases.split(","):
        cmd = [sys.executable, __file__, *sys.argv[1:], "--_phase", phase, "--_work", str(work)]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode == 2:          # the child's one-line user error
            raise UserError(f"phase {phase}: " + res.stderr.strip().splitlines()[-1].removeprefix("error: "))
        if res.returncode:
            sys.exit(f"phase {phase} failed:\n{res.stderr[-3000:]}")
        r = json.loads(res.stdout.strip().splitlines()[-1])
        speed = f"{r['samples_per_s']:.2f} samples/s ({r['input_tokens_per_sample']:.0f} input tokens/sample)" \
            if phase == "train" else f"{r['users_per_s']:.2f} users/s ({r['protocol']})"
        print(f"{phase:>5}  {args.size}, {args.id_tokens} ids ({r['params_M']:.1f}M params, vocab {r['vocab']}, "
              f"bf16 {r['bf16']}, {r['threads']} threads): {speed}, peak RSS {r['peak_rss_mb'] / 1024:.2f} GB")
