"""Multi-task training of the prompt-distilled T5 (POD / RDRec / HDRec).

    python pretrain.py --data_dir ./data/beauty/ --cuda --batch_size 64 --checkpoint ./checkpoint/beauty/
    torchrun --nproc_per_node 4 pretrain.py ...          # DistributedDataParallel, one process per GPU

Every --val_every steps (default: once an epoch) the validation loss of every task is measured; the best model is
saved to the checkpoint dir (safetensors + config.json + tokenizer/), and training stops after --endure_times
evaluations without improvement. The training state is saved atomically every --save_minutes, and a rerun with the
same --checkpoint resumes from it.
"""
import argparse
import json
import math
import os
import random
import shutil
import time
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from tqdm import tqdm

import tasks
from cooccurrence import cooccurrence, item_vectors
from dataset import load_dataset, renumber_items
from item_codes import CODE_SCHEMES, SCHEMES, item_codes, item_map_for, parse_branching
from evaluation import recommend_next, reference_sequential
from metrics import rank_of, ranking_metrics
from module import HDRec, SIZES, add_id_tokens, backward_batch, from_scratch_t5, init_item_embeddings, \
    load_checkpoint, load_pretrained, resolve_backbone, set_dropout, save_checkpoint, train_tokenizer
from utils import (UserError, atomic_write_json, bf16_supported, pick_device, progress_bar, report_user_errors,
                   seed_everything, versions)

report_user_errors()
parser = argparse.ArgumentParser(description="train HDRec (prompt-distilled T5) on a dataset dir")
parser.add_argument("--data_dir", required=True, help="dataset dir (sequential.txt, datamaps.json, ...)")
parser.add_argument("--checkpoint", default="./checkpoint/", help="output dir; an existing run there is resumed")
parser.add_argument("--cuda", action="store_true", help="use CUDA")
parser.add_argument("--backbone", default=None,
                    help=f"pretrained T5 (hub name or local folder) or a from-scratch size: {', '.join(SIZES)}")
parser.add_argument("--model_version", type=int, default=0, help="0-4: t5-small ... t5-11b (when no --backbone)")
parser.add_argument("--vocab_size", type=int, default=8000, help="upper bound for a from-scratch tokenizer")
parser.add_argument("--recipe", choices=["learn", "paper"], default="learn",
                    help="the defaults of the flags below: learn (the recipe that learns from the history, README) or "
                         "paper (POD / HDRec: pieces ids, history in the encoder, published ids, lr 5e-4, early stop "
                         "on the validation loss); flags given explicitly win")
parser.add_argument("--id_tokens", choices=["pieces", "atomic"], default="pieces",
                    help="pieces: user_N/item_N split into sub-word pieces marked by whole-word embeddings (P5, POD, "
                         "HDRec); atomic: every id word is one token of its own (a top-N input is ~3x shorter)")
parser.add_argument("--history", choices=tasks.HISTORY_PLACES, default="decoder",
                    help="where the sequential task reads the user's history: decoder (teacher-forced, every position "
                         "predicts its next item, as SASRec trains; needs --id_tokens atomic) or encoder (in the "
                         "prompt, one target per sample: P5 / POD / HDRec)")
parser.add_argument("--item_ids", choices=SCHEMES, default="random",
                    help="how items are named (item_codes.py): random (a seeded permutation), sequential (numbered by "
                         "first appearance in the training parts), collaborative / semantic (hierarchical codes from "
                         "the co-occurrence graph / the item text), or published (the dataset's ids, which leak the "
                         "order of first appearance)")
parser.add_argument("--code_branching", default="64,64",
                    help="collaborative / semantic codes: clusters per level (plus one last token per leaf item)")
parser.add_argument("--item_init", choices=["auto", "random", "cooc"], default="random",
                    help="cooc: item embeddings start from PPMI-SVD vectors of the items bought together in the "
                         "training parts (needs one token per item: --id_tokens atomic, a numbered --item_ids); "
                         "random: the backbone's initialisation (paper); auto: cooc where possible")
parser.add_argument("--task_num", type=int, default=4)
parser.add_argument("--prompt_num", type=int, default=3, help="learned prompt vectors per task")
parser.add_argument("--ratio", default="1:1:1:3", help="explanation:sequential:review:top-N samples per user")
parser.add_argument("--lr", type=float, default=5e-4)
parser.add_argument("--warmup_steps", type=int, default=0, help="linear learning-rate warm-up over this many steps")
parser.add_argument("--lr_decay", choices=["none", "linear"], default="none",
                    help="linear: the learning rate falls linearly to 0 at the end of --epochs (after the warm-up)")
parser.add_argument("--weight_decay", type=float, default=0.01,
                    help="AdamW's decoupled weight decay (torch's default, as POD), not applied to norm weights")
parser.add_argument("--dropout", type=float, default=0.1, help="the backbone's dropout rate (T5's: 0.1; --recipe learn: 0.3)")
parser.add_argument("--epochs", type=int, default=100)
parser.add_argument("--batch_size", type=int, default=64)
parser.add_argument("--endure_times", type=int, default=5, help="stop after this many validations without gain")
parser.add_argument("--negative_num", type=int, default=99, help="negatives per top-N training sample")
parser.add_argument("--exp_len", type=int, default=20, help="explanation length in tokens")
parser.add_argument("--explanation_target", choices=["auto", "llm", "review"], default="auto",
                    help="llm: the distilled groundtruth_explanation (HDRec); review: the review sentence (POD); "
                         "auto: llm where the record has it")
parser.add_argument("--val_every", type=int, default=0, help="validate every N steps (0: once an epoch)")
parser.add_argument("--val_users", type=int, default=0, help="validate on a seeded sample of N users (0: all)")
parser.add_argument("--rank_users", type=int, default=1000,
                    help="at every validation, rank all items for a fixed seeded sample of N validation users "
                         "(sequential task, clean protocol) and log HR@10 / NDCG@10 (0: off)")
parser.add_argument("--stop_on", choices=["ndcg", "loss"], default="ndcg",
                    help="what keeps the best model and stops early: validation NDCG@10 of the ranked users "
                         "(needs --rank_users and the sequential task) or the mean validation loss (paper)")
parser.add_argument("--max_minutes", type=float, default=0, help="stop training after this many minutes (0: no limit)")
parser.add_argument("--save_minutes", type=float, default=10, help="save the resumable state this often")
parser.add_argument("--no_bf16", action="store_true", help="train in fp32 even where bf16 autocast is available")
parser.add_argument("--gradient_checkpointing", action="store_true", help="trade compute for activation memory")
parser.add_argument("--micro_batch_tokens", type=int, default=-1,
                    help="accumulate each batch's gradient over micro-batches of at most this many padded input "
                         "tokens: same gradient, a fraction of the activation memory (-1: 2560 on CPU, whole batches "
                         "on GPU; 0: whole batches)")
parser.add_argument("--log_interval", type=int, default=200)
parser.add_argument("--seed", type=int, default=1)
# --recipe sets the defaults; what the command line says explicitly wins
RECIPES = {"learn": dict(id_tokens="atomic", history="decoder", item_ids="random", item_init="auto", lr=1e-3,
                         dropout=0.3, stop_on="ndcg"),
           "paper": dict(id_tokens="pieces", history="encoder", item_ids="published", item_init="random", lr=5e-4,
                         dropout=0.1, stop_on="loss")}
parser.set_defaults(**RECIPES[parser.parse_known_args()[0].recipe])
args = parser.parse_args()

# ---------------------------------------------------------------------------------------------------- setup
world = int(os.environ.get("WORLD_SIZE", 1))
rank = int(os.environ.get("RANK", 0))
if world > 1:
    dist.init_process_group("nccl" if args.cuda and torch.cuda.is_available() else "gloo")
is_main = rank == 0
device = pick_device(args.cuda)
if device.type == "cuda":
    torch.cuda.set_device(device)
use_bf16 = bf16_supported(device) and not args.no_bf16
seed_everything(args.seed)
ratio = [int(x) for x in args.ratio.split(":")]
if len(ratio) != len(tasks.TASKS) or min(ratio) < 0 or sum(ratio) == 0:
    raise UserError(f"--ratio needs {len(tasks.TASKS)} non-negative integers ({':'.join(tasks.TASKS)}), "
                    f"got {args.ratio!r}")
if args.item_init == "auto":
    args.item_init = "cooc" if args.id_tokens == "atomic" and args.item_ids not in CODE_SCHEMES else "random"
if args.item_ids in CODE_SCHEMES and (args.id_tokens != "atomic" or args.item_init == "cooc"):
    raise UserError(f"--item_ids {args.item_ids} gives every code level tokens of its own: it needs --id_tokens "
                    "atomic, and --item_init random (there is no one embedding row per item to start)")
if args.history == "decoder" and args.id_tokens != "atomic":
    raise UserError("--history decoder reads items one after another in the decoder: it needs --id_tokens atomic "
                    "(sub-word pieces of one id can be the start of another); the paper's setting is --history encoder")
if args.item_init == "cooc" and args.id_tokens != "atomic":
    raise UserError("--item_init cooc sets one embedding row per item: it needs --id_tokens atomic")
out = Path(args.checkpoint)
# The resumable state is one directory, out/last (weights, tokenizer, optimizer, counters), replaced as a unit:
# written to last.tmp, then last -> last.old, last.tmp -> last. A crash at any point leaves a complete state.
last, last_tmp, last_old = out / "last", out / "last.tmp", out / "last.old"
if is_main and not last.exists() and last_old.exists():
    last_old.rename(last)                          # the crash fell between the two renames
state_json, state_tensors = last / "train_state.json", last / "train_state.safetensors"
resuming = state_json.exists()


def log(msg):
    if is_main:
        tqdm.write(msg)


def barrier():
    if world > 1:
        dist.barrier()


def agreed(flag):
    """True on every rank when any rank says so (time checks differ slightly between processes)."""
    if world == 1:
        return bool(flag)
    t = torch.tensor([int(bool(flag))], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


# ---------------------------------------------------------------------------------------------------- data, model
ds = load_dataset(args.data_dir, log=log) if is_main else None
barrier()                       # rank 0 may have written negative.txt
ds = ds or load_dataset(args.data_dir, log=log)
codes = None
if resuming:
    state = json.loads(state_json.read_text())
    item_map = state["item_map"]
    log(f"resuming from {out} at epoch {state['epoch']} step {state['step']}")
else:
    item_map = item_map_for(args.item_ids, ds, args.seed)
    if args.item_ids in CODE_SCHEMES:      # built on the dataset's own ids (titles are keyed by them), then renumbered
        codes = item_codes(args.item_ids, ds, parse_branching(args.code_branching), args.seed, log)
        codes = {item_map[i]: c for i, c in codes.items()}
        log(f"{args.item_ids} codes: {len(set(c[:-1] for c in codes.values()))} leaves, "
            f"{max(len(c) for c in codes.values())} tokens an item")
ds = renumber_items(ds, item_map)
for task, share in zip(tasks.TASKS, ratio):
    if share and not tasks.trainable_users(ds, task):
        need = {"explanation": "explanation.json (data/prepare.py) or explanation_rationale.json",
                "review": "explanation_rationale.json with review_summary (data/distill.py)"}.get(task, "")
        raise UserError(f"--ratio gives the {task} task a share, but {args.data_dir} has no training data for it "
                        f"(needs {need}); give it a zero share, e.g. --ratio 0:1:0:3")
sample_opts = {"negative_num": args.negative_num, "explanation_target": args.explanation_target,
               "exp_len": args.exp_len, "history": args.history}

backbone = resolve_backbone(args.backbone, args.model_version)
spm_model = None
if resuming:
    model, tokenizer, meta = load_checkpoint(last, device)
    model.train()
    spm_path = last / "tokenizer" / "spm.model"
    spm_model = spm_path.read_bytes() if spm_path.exists() else None
elif backbone in SIZES:
    tok_dir = out / "tokenizer_build"
    if is_main:
        log(f"training a SentencePiece tokenizer on {args.data_dir} (vocab <= {args.vocab_size}, {args.id_tokens} ids)")
        atomic = args.id_tokens == "atomic"
        tokenizer, spm_model = train_tokenizer(tasks.tokenizer_corpus(ds, args.seed, ids=not atomic), args.vocab_size,
                                               tasks.id_words(ds, codes) if atomic else None)
        tokenizer.save_pretrained(tok_dir)
        (tok_dir / "spm.model").write_bytes(spm_model)
    barrier()
    if not is_main:
        from transformers import AutoTokenizer
        tokenizer, spm_model = AutoTokenizer.from_pretrained(tok_dir), (tok_dir / "spm.model").read_bytes()
    t5 = from_scratch_t5(backbone, tokenizer)
    model = HDRec(t5, args.task_num, args.prompt_num, args.seed)
else:
    t5, tokenizer = load_pretrained(backbone)
    if args.id_tokens == "atomic" and add_id_tokens(tokenizer, tasks.id_words(ds, codes)):
        t5.resize_token_embeddings(len(tokenizer))
    model = HDRec(t5, args.task_num, args.prompt_num, args.seed)
if not resuming:
    set_dropout(model.t5, args.dropout)
if not resuming and args.item_init == "cooc":
    # From scratch, at T5's own embedding scale (std 1): logits sharp enough to rank 12k items from the start, and
    # rows that large move little under AdamW, so the structure survives (at std d_model**-0.5 the popularity
    # gradient of the first minutes overwrites it). A pretrained backbone: at its embedding matrix's scale.
    vectors = item_vectors(cooccurrence(ds), model.t5.config.d_model, args.seed)
    n = init_item_embeddings(model.t5, tokenizer, vectors, std=1.0 if backbone in SIZES else None)
    log(f"item embeddings: {n} of {ds.num_items} items start from co-occurrence vectors")
model.to(device)
if args.gradient_checkpointing:
    model.t5.gradient_checkpointing_enable()
if device.type == "cpu" and world > 1:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
meta = meta if resuming else {
    "task_num": args.task_num, "prompt_num": args.prompt_num, "tasks": list(tasks.TASKS), "ratio": ratio,
    "backbone": backbone, "id_tokens": args.id_tokens, "history": args.history, "item_ids": args.item_ids, "item_map": item_map,
    "item_codes": codes and [list(codes[i]) for i in range(1, ds.num_items + 1)],
    "seed": args.seed, "data_dir": str(args.data_dir), "data_hashes": ds.hashes, "args": vars(args),
    "versions": versions()}
n_params = sum(p.numel() for p in model.parameters())
log(f"backbone {backbone}: {n_params / 1e6:.1f}M parameters, vocab {len(tokenizer)}, device {device}, "
    f"bf16 {'on' if use_bf16 else 'off'}, world {world}")

encoder = tasks.WordEncoder(tokenizer)
encoder.add(tasks.id_words(ds))
if meta.get("item_codes"):
    encoder.set_item_codes({i: c for i, c in enumerate(meta["item_codes"], 1)})
if args.history == "decoder" and not meta.get("item_codes"):   # one token an item: cross-entropy over items alone
    model.set_item_tokens(encoder.single_item_tokens(ds.num_items))
ddp_model = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
# no weight decay on the norm weights (1-d): decaying them towards 0 only fights the normalisation
params = [p for p in model.parameters() if p.requires_grad]
optimizer = torch.optim.AdamW([{"params": [p for p in params if p.dim() > 1], "weight_decay": args.weight_decay},
                               {"params": [p for p in params if p.dim() <= 1], "weight_decay": 0.0}], lr=args.lr)


def lr_at(step, steps_per_epoch):
    """The learning rate at global step `step` (0-based): warm-up, then constant or a linear fall to 0 at the end of
    --epochs. A function of the step alone, so a resumed run follows the same schedule."""
    factor = min(1.0, (step + 1) / args.warmup_steps) if args.warmup_steps else 1.0
    if args.lr_decay == "linear":
        total = args.epochs * steps_per_epoch
        factor *= max(0.0, (total - step) / max(1, total - args.warmup_steps)) if step >= args.warmup_steps else 1.0
    return args.lr * factor
autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16)
micro_batch_tokens = args.micro_batch_tokens if args.micro_batch_tokens >= 0 else \
    (2560 if device.type == "cpu" else 0)

# fixed validation batches: seeded users and samples, the same at every validation and across resumes
val_rng = random.Random(f"{args.seed}-val")
val_users = ds.users if not args.val_users else sorted(val_rng.sample(ds.users, min(args.val_users, len(ds.users))))
val_batches, val_tasks = [], []
for task, share in zip(tasks.TASKS, ratio):
    if share:
        able = set(tasks.trainable_users(ds, task, "val"))
        users = [u for u in val_users if u in able]
        if not users:
            log(f"no validation samples for the {task} task: its loss does not drive early stopping")
            continue
        val_tasks.append(task)
        users = users[rank::world]
        val_batches += [(task, tasks.make_batch(ds, encoder, task, users[i:i + args.batch_size], val_rng, "val",
                                                **sample_opts))
                        for i in range(0, len(users), args.batch_size)]
if not val_tasks:
    raise UserError(f"{args.data_dir}: no validation samples for any task with a share in --ratio {args.ratio}")
# the learning curve: the model's ranking of every item for a fixed sample of validation users
rank_users = []
if args.rank_users and "sequential" in val_tasks:
    able = tasks.trainable_users(ds, "sequential")
    rank_users = sorted(random.Random(f"{args.seed}-rank").sample(able, min(args.rank_users, len(able))))
# the reference rules on the same users, for the learning curve (popularity, co-occurrence: training parts only)
reference_ranking = {rule: figures for rule, figures in
                     reference_sequential(ds, rank_users, 10, "val").items() if rule != "max_history_plus_1"} \
    if rank_users and is_main else {}
if reference_ranking:
    log(f"validation ranking of {len(rank_users)} users, reference rules: " + ", ".join(
        f"{rule} HR@10 {f['HR@10']:.4f} NDCG@10 {f['NDCG@10']:.4f}" for rule, f in reference_ranking.items()))
if args.stop_on == "ndcg" and not rank_users:
    raise UserError("--stop_on ndcg needs ranked validation users: the sequential task in --ratio and --rank_users > 0 "
                    "(or use --stop_on loss)")


@torch.no_grad()
def validate():
    model.eval()
    sums = {t: torch.zeros(2, device=device) for t in val_tasks}
    for task, batch in val_batches:
        batch = tasks.to_device(batch, device)
        with autocast:
            loss = model(batch)
        n = (batch["labels"] != -100).sum()
        sums[task] += torch.stack([loss.float() * n, n.float()])
    model.train()
    losses = {}
    for task, s in sums.items():
        if world > 1:
            dist.all_reduce(s)
        losses[task] = (s[0] / s[1]).item()
    return losses


@torch.no_grad()
def validate_ranking():
    """HR@10 / NDCG@10 of the validation item when the model ranks every item for the fixed `rank_users` (every
    rank ranks them all: the figures then agree without communication)."""
    if not rank_users:
        return {}
    model.eval()
    lists = recommend_next(model, tokenizer, encoder, ds, rank_users, "clean", num_beams=20, top_k=10,
                           batch_size=64, seed=args.seed, progress=False, history=args.history, split="val")
    model.train()
    m = ranking_metrics(rank_of(ds.val_item(u), items) for u, items in zip(rank_users, lists))
    return {k: m[k] for k in ("HR@10", "NDCG@10")}


# ---------------------------------------------------------------------------------------------------- state
def save_state(epoch, step, rng, best, endured, history):
    """Everything needed to continue exactly here: weights (out/last), optimizer and RNG states, counters."""
    version, internal, gauss = rng.getstate()
    rng_states = [[version, list(internal), gauss]]
    if world > 1:
        rng_states = [None] * world
        dist.all_gather_object(rng_states, [version, list(internal), gauss])
    if not is_main:
        return
    shutil.rmtree(last_tmp, ignore_errors=True)
    save_checkpoint(model, tokenizer, last_tmp, meta, spm_model)
    tensors = {"torch_rng": torch.get_rng_state()}
    for i, s in optimizer.state_dict()["state"].items():
        for k, v in s.items():
            tensors[f"opt.{i}.{k}"] = v.detach().cpu().contiguous()
    save_file(tensors, str(last_tmp / state_tensors.name))
    atomic_write_json(last_tmp / state_json.name, {"epoch": epoch, "step": step, "rng": rng_states, "best": best,
                                                   "endured": endured, "history": history, "item_map": item_map,
                                                   "samples": samples, "train_sums": train_sums,
                                                   "minutes": minutes_before + (time.time() - t0) / 60})
    if last.exists():
        last.rename(last_old)
    last_tmp.rename(last)
    shutil.rmtree(last_old, ignore_errors=True)


def load_state():
    tensors = load_file(str(state_tensors))
    torch.set_rng_state(tensors.pop("torch_rng"))
    opt = optimizer.state_dict()
    opt["state"] = {}
    for key, v in tensors.items():
        _, i, k = key.split(".", 2)
        opt["state"].setdefault(int(i), {})[k] = v.to(device) if k != "step" else v
    optimizer.load_state_dict(opt)
    if len(state["rng"]) != world:
        raise UserError(f"{state_json} was written by {len(state['rng'])} processes; resume with the same number")
    version, internal, gauss = state["rng"][rank]
    rng = random.Random()
    rng.setstate((version, tuple(internal), gauss))
    return state["epoch"], state["step"], rng, state["best"], state["endured"], state["history"]


def plot_curve(history):
    """curve.png: validation and training loss per task, and (with --rank_users) validation HR@10 / NDCG@10 of the
    ranked users, against training minutes, beside the reference rules on the same users."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ranked = bool(history[0].get("val_ranking"))
    fig, axes = plt.subplots(1, 2 if ranked else 1, figsize=(12 if ranked else 7, 4), squeeze=False)
    x = [h["minutes"] for h in history]
    ax = axes[0][0]
    for task in history[0]["val"]:
        line, = ax.plot(x, [h["val"][task] for h in history], marker="o", label=f"val {task}")
        ax.plot(x, [h["train"].get(task, math.nan) for h in history], linestyle="--", color=line.get_color(),
                label=f"train {task}")
    ax.set_xlabel("training minutes")
    ax.set_ylabel("cross-entropy")
    ax.legend(fontsize=8)
    if ranked:
        ax = axes[0][1]
        for metric, style in (("HR@10", "-"), ("NDCG@10", "--")):
            ax.plot(x, [h["val_ranking"][metric] for h in history], marker="o", linestyle=style, color="black",
                            label=f"model {metric}")
            for (rule, figures), colour in zip(reference_ranking.items(), ("grey", "tab:orange", "tab:green")):
                ax.axhline(figures[metric], color=colour, linestyle=style, linewidth=1,
                           label=f"{rule} {metric}")
        ax.set_xlabel("training minutes")
        ax.set_title(f"validation ranking, {len(rank_users)} users", fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle(f"{Path(args.data_dir).name}: {backbone}, ratio {args.ratio}, history in the {args.history}, "
                 f"{args.item_ids} ids", fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "curve.png.tmp.png", dpi=100)
    plt.close(fig)
    (out / "curve.png.tmp.png").replace(out / "curve.png")


# ---------------------------------------------------------------------------------------------------- train
if is_main:
    out.mkdir(parents=True, exist_ok=True)
if resuming:
    start_epoch, start_step, rng, best, endured, history = load_state()
else:
    start_epoch, start_step, rng = 1, 0, random.Random(f"{args.seed}-train-{rank}")
    best, endured, history = math.inf, 0, []
t0 = time.time()
minutes_before = state.get("minutes", history[-1]["minutes"] if history else 0.0) if resuming else 0.0  # kept on resume
last_save = time.time()
if resuming and (endured >= args.endure_times or (args.max_minutes and minutes_before >= args.max_minutes)):
    log(f"{out}: this run has ended ({'early stop' if endured >= args.endure_times else 'time budget used'}); "
        "nothing to do (a larger --endure_times or --max_minutes goes on)")
    start_epoch = args.epochs + 1
# samples seen and the training loss since the last validation (a resumed run goes on counting both)
samples = state.get("samples", history[-1]["samples"] if history else 0) if resuming else 0
stop = False
train_sums = state.get("train_sums", {}) if resuming else {}
for epoch in range(start_epoch, args.epochs + 1):
    plan = tasks.epoch_plan(ds, ratio, args.batch_size, args.seed, epoch, rank, world)
    # every --val_every steps and at the epoch's end; a point less than half an interval before the end is dropped
    # (it would spend a validation, and a count of --endure_times, on a few more steps)
    val_points = {len(plan)}
    if args.val_every:
        val_points |= {s for s in range(args.val_every, len(plan), args.val_every) if len(plan) - s >= args.val_every / 2}
    bar = progress_bar(range(start_step, len(plan)), initial=start_step, total=len(plan), disable=not is_main,
                       desc=f"epoch {epoch}")
    for step in bar:
        task, users = plan[step]
        batch = tasks.to_device(tasks.make_batch(ds, encoder, task, users, rng, **sample_opts), device)
        optimizer.zero_grad(set_to_none=True)
        loss = backward_batch(ddp_model, batch, micro_batch_tokens, autocast, ddp_model.no_sync if world > 1 else None)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        for group in optimizer.param_groups:
            group["lr"] = lr_at((epoch - 1) * len(plan) + step, len(plan))
        optimizer.step()
        samples += len(users) * world
        s = train_sums.setdefault(task, [0.0, 0])
        s[0] += loss
        s[1] += 1
        if step % 10 == 0:
            bar.set_postfix(task=task, loss=f"{loss:.3f}")
        out_of_time = agreed(args.max_minutes and minutes_before + (time.time() - t0) / 60 >= args.max_minutes)
        if step + 1 in val_points or out_of_time:
            val = validate()
            total = sum(val.values()) / len(val)
            ranking = validate_ranking()
            minutes = minutes_before + (time.time() - t0) / 60
            record = {"epoch": epoch, "step": step + 1, "samples": samples, "minutes": minutes,
                      "train": {t: v[0] / v[1] for t, v in train_sums.items()}, "val": val, "val_mean": total,
                      "val_ranking": ranking}
            train_sums = {}
            history.append(record)
            score = -ranking["NDCG@10"] if args.stop_on == "ndcg" else total      # lower is better
            if score < best:
                best, endured = score, 0
                if is_main:
                    save_checkpoint(model, tokenizer, out, {**meta, "best": record}, spm_model)
            else:
                endured += 1
            record["reference_ranking"] = reference_ranking
            log(f"epoch {epoch} step {step + 1} ({record['minutes']:.1f} min): val loss "
                + " ".join(f"{t} {v:.4f}" for t, v in val.items()) + f" | mean {total:.4f}"
                + "".join(f" | {k} {v:.4f}" for k, v in ranking.items())
                + f" | best {args.stop_on} {abs(best):.4f}, {endured}/{args.endure_times} without gain")
            if is_main:
                atomic_write_json(out / "train_log.json", history)
                plot_curve(history)
            if endured >= args.endure_times or out_of_time:
                stop = True
                log("early stop" if not out_of_time else f"time budget of {args.max_minutes} min reached")
        if stop or agreed(time.time() - last_save >= args.save_minutes * 60):
            save_state(epoch, step + 1, rng, best, endured, history)
            last_save = time.time()
        if stop:
            break
    bar.close()
    start_step = 0
    if stop:
        break
    save_state(epoch + 1, 0, rng, best, endured, history)
    last_save = time.time()

log(f"done: best validation {'NDCG@10' if args.stop_on == 'ndcg' else 'loss'} {abs(best):.4f}; model in {out}")
if world > 1:
    dist.destroy_process_group()
