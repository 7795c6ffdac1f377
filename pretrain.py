"""Multi-task training of the prompt-distilled T5 (POD / RDRec / HDRec).

    python pretrain.py --data_dir ./data/beauty/ --cuda --batch_size 64 --checkpoint ./checkpoint/beauty/
    torchrun --nproc_per_node 4 pretrain.py ...          # DistributedDataParallel, one process per GPU

Every --val_every steps (counted across epochs; default: once an epoch) the model is validated: the loss of every
task, and the ranking of every item for a fixed seeded sample of validation users (--rank_users). The best model is
kept in the checkpoint dir (safetensors + config.json + tokenizer/): by validation NDCG@10 of the ranked users by
default (--stop_on ndcg, the learn recipe), by the mean validation loss under --recipe paper; seq.py reads it.

A single-task run stops after --endure_times validations without gain in that figure. A multi-task run gives every
task a figure of its own: NDCG@10 of the ranked users for the sequential task (its loss when no user is ranked),
ROUGE-L of the greedy texts of a fixed seeded sample of validation records for the text tasks (explanation, review;
--val_texts: the token loss keeps falling while greedy decoding writes one likely sentence for everyone), the
validation token loss for top-N; it stops when NO task has gained for --endure_times validations (or at --max_minutes /
--epochs), and keeps each task's own best: a text task still learning must not be cut off by the ranking task, nor
the ranking model replaced by a later, overfitted one. So the top-level model stays the best by --stop_on, and a
task whose own best came at another validation has its model in best_<task>/ (same format), which exp.py (explanation,
review) and topn.py read where it exists.

The training state (per-task stopping counts included) is saved atomically every --save_minutes, and a rerun with the
same --checkpoint resumes from it.

Reading order: the flags and the recipes that set their defaults; the processes; building the data, the model and the
optimizer; validation; the training loop; saving and resuming; main(), which calls them in that order.
"""
import argparse
import json
import math
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from tqdm import tqdm

import tasks
from cooccurrence import cooccurrence, item_vectors
from dataset import load_dataset, renumber_items
from item_codes import CODE_SCHEMES, SCHEMES, item_codes, item_map_for, parse_branching
from evaluation import generate_texts, rank_next, sequential_curve_users
from metrics import ranking_metrics, rouge
from module import HDRec, SIZES, add_id_tokens, backward_batch, copy_checkpoint, from_scratch_t5, \
    INPUT_SCALES, init_item_embeddings, load_checkpoint, load_pretrained, no_output_dropout, no_output_scale, \
    output_scale, set_input_scale, \
    resolve_backbone, set_dropout, save_checkpoint, task_best_dir, train_tokenizer
from ranking import GRIDS, LEAK_RULES, RULE_NAMES, rule_ranks
from utils import (EarlyStopping, UserError, atomic_write_json, bf16_supported, pick_device, progress_bar,
                   report_user_errors, seed_everything, versions)

# The defaults of the flags below that --recipe sets (a flag given explicitly wins): learn, the recipe that learns
# from the history (README), or paper, the training setting of POD / HDRec.
# learn's settings were chosen on validation NDCG@10 of beauty's sequential task within a CPU hour (docs/RESULTS.md
# section 8: the runs and their figures): SASRec's size, initial scale and scoring; the main job (scripts/main.sh)
# sets its own multi-task ones.
RECIPES = {"learn": dict(backbone="tiny", id_tokens="atomic", history="decoder", item_ids="random", item_init="random",
                         embedding_std=0.02, output_scale="none", lr=1e-3, warmup_steps=100, batch_size=64,
                         dropout=0.3, output_dropout="no", stop_on="ndcg", rank_users=5000, endure_times=10,
                         name_user="no", input_scale="norm", lr_decay="plateau"),
           "paper": dict(backbone="t5-small", id_tokens="pieces", history="encoder", item_ids="published",
                         item_init="random", embedding_std=0.0, output_scale="t5", lr=5e-4, warmup_steps=0,
                         batch_size=64, dropout=0.1, output_dropout="yes", stop_on="loss", rank_users=1000,
                         endure_times=5, name_user="yes", input_scale="none", lr_decay="none")}
STATE_JSON, STATE_TENSORS = "train_state.json", "train_state.safetensors"   # in out/last, with the weights


# ---------------------------------------------------------------------------------------------------- flags

def by_recipe(flag):
    """The --help text of a flag that --recipe sets, from RECIPES."""
    return "default by --recipe: " + ", ".join(f"{settings[flag]} ({recipe})" for recipe, settings in RECIPES.items())


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="train HDRec (prompt-distilled T5) on a dataset dir")
    parser.add_argument("--data_dir", required=True, help="dataset dir (sequential.txt, datamaps.json, ...)")
    parser.add_argument("--checkpoint", default="./checkpoint/",
                        help="the run's folder: pretrain.py writes the best model there (model.safetensors, "
                             "config.json, tokenizer/), train_log.json, curve.png and the resumable state (last/); "
                             "seq.py, topn.py and exp.py read the model from it. An unfinished run there is resumed")
    parser.add_argument("--cuda", action="store_true", help="use CUDA")
    parser.add_argument("--backbone", default=None,
                        help=f"pretrained T5 (hub name or local folder) or a from-scratch size: {', '.join(SIZES)}; "
                             + by_recipe("backbone"))
    parser.add_argument("--model_version", type=int, default=None,
                        help="0-4: the pretrained t5-small ... t5-11b (the seed's flag; --backbone wins)")
    parser.add_argument("--vocab_size", type=int, default=8000, help="upper bound for a from-scratch tokenizer")
    parser.add_argument("--recipe", choices=list(RECIPES), default="learn",
                        help="the defaults of " + ", ".join(f"--{flag}" for flag in RECIPES["learn"]) + ": learn "
                             "(the recipe that learns from the history, README) or paper (POD / HDRec's training "
                             "setting); flags given explicitly win")
    parser.add_argument("--id_tokens", choices=["pieces", "atomic"], default=None,
                        help="pieces: user_N/item_N split into sub-word pieces marked by whole-word embeddings (P5, "
                             "POD, HDRec); atomic: every id word is one token of its own (a top-N input is ~3x "
                             f"shorter); {by_recipe('id_tokens')}")
    parser.add_argument("--history", choices=tasks.HISTORY_PLACES, default=None,
                        help="where the sequential task reads the user's history: decoder (teacher-forced, every "
                             "position predicts its next item, as SASRec trains; needs --id_tokens atomic) or encoder "
                             f"(in the prompt, one target per sample: P5 / POD / HDRec); {by_recipe('history')}")
    parser.add_argument("--name_user", choices=["yes", "no"], default=None,
                        help="whether the sequential task's prompt names the user (user_N, one embedding row per "
                             "user: P5 / POD / HDRec) or only the history says who it is (no: as SASRec, which has no "
                             f"user embedding); the other tasks always name the user; {by_recipe('name_user')}")
    parser.add_argument("--item_ids", choices=SCHEMES, default=None,
                        help="how items are named (item_codes.py): random (a seeded permutation), sequential "
                             "(numbered by first appearance in the training parts), collaborative / semantic "
                             "(hierarchical codes from the co-occurrence graph / the item text), or published (the "
                             f"dataset's ids, which leak the order of first appearance); {by_recipe('item_ids')}")
    parser.add_argument("--code_branching", default="64,64",
                        help="collaborative / semantic codes: clusters per level (plus one last token per leaf item)")
    parser.add_argument("--item_init", choices=["auto", "random", "cooc"], default=None,
                        help="cooc: item embeddings start from PPMI-SVD vectors of the items bought together in the "
                             "training parts (needs one token per item: --id_tokens atomic, a numbered --item_ids); "
                             "random: the backbone's initialisation; auto: cooc where possible; "
                             + by_recipe("item_init"))
    parser.add_argument("--task_num", type=int, default=len(tasks.TASKS),
                        help=f"learned prompts, one set per task: {len(tasks.TASKS)} ({', '.join(tasks.TASKS)}), the "
                             "only value the tasks and the evaluation scripts can use")
    parser.add_argument("--prompt_num", type=int, default=3, help="learned prompt vectors per task")
    parser.add_argument("--ratio", default="1:1:1:3", help="explanation:sequential:review:top-N samples per user")
    parser.add_argument("--lr", type=float, default=None, help=f"AdamW's learning rate; {by_recipe('lr')}")
    parser.add_argument("--warmup_steps", type=int, default=None,
                        help=f"linear learning-rate warm-up over this many steps; {by_recipe('warmup_steps')}")
    parser.add_argument("--lr_decay", choices=["none", "linear", "plateau"], default=None,
                        help="linear: the learning rate falls linearly to 0 at the end of --epochs (after the warm-up); "
                             "plateau: it halves after every --lr_patience validations in a row without gain (the "
                             "number of passes is not known in advance under a budget; chosen on validation, "
                             f"docs/RESULTS.md section 8); {by_recipe('lr_decay')}")
    parser.add_argument("--lr_patience", type=int, default=None,
                        help="--lr_decay plateau: validations without gain before each halving; below --endure_times, "
                             "the lowered rate gets validations of its own before the stop (default: 3, or "
                             "--endure_times - 1 where that is smaller)")
    parser.add_argument("--weight_decay", type=float, default=0.01,
                        help="AdamW's decoupled weight decay (torch's default, as POD), not applied to norm weights")
    parser.add_argument("--dropout", type=float, default=None,
                        help=f"the backbone's dropout rate (T5's own: 0.1); {by_recipe('dropout')}")
    parser.add_argument("--label_smoothing", type=float, default=0.0,
                        help="training loss: cross-entropy against a target that gives this share of its mass to "
                             "all classes evenly (items for the sequential task, tokens for text); validation losses "
                             "stay plain. For a model whose validation loss rises while its ranking improves "
                             "(over-confident on its first items, docs/RESULTS.md section 8)")
    parser.add_argument("--output_dropout", choices=["yes", "no"], default=None,
                        help="yes: T5's dropout after the decoder's final layer norm, right before the output layer; "
                             "no: none there (as SASRec; the input embeddings and every block keep theirs), which "
                             f"ranks better at every epoch measured (docs/RESULTS.md); {by_recipe('output_dropout')}")
    parser.add_argument("--output_scale", choices=["t5", "none"], default=None,
                        help="t5: the decoder's output is scaled by d_model**-0.5 before the tied output layer, as T5 "
                             "does; none: plain dot products with the embeddings, as SASRec scores items (for small "
                             "embeddings, --embedding_std); --item_init cooc vectors start at the std that gives "
                             f"logits of std ~1 either way; {by_recipe('output_scale')}")
    parser.add_argument("--input_scale", choices=INPUT_SCALES, default=None,
                        help="how token embeddings enter the blocks: none (T5), sqrt_d (times d_model**0.5, as the "
                             "Transformer and SASRec) or norm (each to unit RMS, as RecBole's SASRec normalises its "
                             "input); the tied output layer reads the raw embeddings either way; "
                             + by_recipe("input_scale"))
    parser.add_argument("--embedding_std", type=float, default=None,
                        help="a from-scratch backbone's embeddings (words, ids) start at this std (SASRec's: 0.02; "
                             "0: the backbone's own: d_model**-0.5 from scratch, the scale of T5's other weights; a "
                             f"pretrained one keeps its weights); {by_recipe('embedding_std')}")
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--batch_size", type=int, default=None, help=f"samples a step; {by_recipe('batch_size')}")
    parser.add_argument("--endure_times", type=int, default=None,
                        help="stop after this many validations without gain: in the --stop_on figure for a single "
                             "task; for several, when no task has gained for this many (each task's own figure: "
                             "NDCG@10 for sequential, the validation token loss for the text tasks and topn; "
                             "best_<task>/ keeps a task's best model where it is not the top-level one); "
                             + by_recipe("endure_times"))
    parser.add_argument("--negative_num", type=int, default=99, help="negatives per top-N training sample")
    parser.add_argument("--exp_len", type=int, default=20, help="explanation length in tokens")
    parser.add_argument("--explanation_target", choices=["auto", "llm", "review"], default="auto",
                        help="llm: the distilled groundtruth_explanation (HDRec); review: the review sentence (POD); "
                             "auto: llm where the record has it")
    parser.add_argument("--text_context", choices=["none", "user", "item", "user,item"], default="none",
                        help="the text tasks' prompts also show the user's last earlier text and/or the item's most "
                             "frequent one, from the training records (tasks.context_texts); off by default: on "
                             "Gift_Cards it made the explanations more varied but not closer to what users wrote "
                             "(docs/RESULTS.md section 9)")
    parser.add_argument("--val_every", type=int, default=0,
                        help="validate every N steps, counted across epochs (0: once an epoch)")
    parser.add_argument("--val_users", type=int, default=0, help="validate on a seeded sample of N users (0: all)")
    parser.add_argument("--val_texts", type=int, default=500,
                        help="at every validation, generate (greedy) the texts of a fixed seeded sample of N validation "
                             "records per text task; their ROUGE-L against the task's target is the task's figure for "
                             "stopping and its best model (0: the validation token loss instead)")
    parser.add_argument("--rank_users", type=int, default=None,
                        help="at every validation, rank all items for a fixed seeded sample of N validation users "
                             "(sequential task, clean protocol) and log HR@10 / NDCG@10 (0: off); "
                             + by_recipe("rank_users"))
    parser.add_argument("--stop_on", choices=["ndcg", "loss"], default=None,
                        help="what keeps the best model (the top-level one in --checkpoint) and, for a single "
                             "task, stops early: validation NDCG@10 of the ranked users (needs --rank_users and the "
                             f"sequential task) or the mean validation loss; {by_recipe('stop_on')}")
    parser.add_argument("--max_minutes", type=float, default=0,
                        help="stop training after this many minutes (0: no limit)")
    parser.add_argument("--save_minutes", type=float, default=10, help="save the resumable state this often")
    parser.add_argument("--no_bf16", action="store_true", help="train in fp32 even where bf16 autocast is available")
    parser.add_argument("--gradient_checkpointing", action="store_true", help="trade compute for activation memory")
    parser.add_argument("--micro_batch_tokens", type=int, default=-1,
                        help="accumulate each batch's gradient over micro-batches of at most this many padded input "
                             "tokens: same gradient, a fraction of the activation memory (-1: 2560 on CPU, whole "
                             "batches on GPU; 0: whole batches)")
    parser.add_argument("--log_interval", type=int, default=10, help="show the training loss every N steps")
    parser.add_argument("--seed", type=int, default=1)
    return parser.parse_args(argv)


def resolve_recipe(args):
    """Every flag left unset takes its --recipe's value (--model_version, the seed's way to name a pretrained
    backbone, counts as setting --backbone); then --item_init auto becomes what it means here."""
    if args.backbone is None and args.model_version is not None:
        args.backbone = resolve_backbone(None, args.model_version)
    explicit_std = args.embedding_std is not None
    for flag, value in RECIPES[args.recipe].items():
        if getattr(args, flag) is None:
            setattr(args, flag, value)
    if args.lr_patience is None:
        args.lr_patience = max(1, min(3, args.endure_times - 1))
    if args.backbone not in SIZES and not explicit_std:
        args.embedding_std = 0.0                       # the recipe's is for a from-scratch backbone
    if args.item_init == "auto":
        args.item_init = "cooc" if args.id_tokens == "atomic" and args.item_ids not in CODE_SCHEMES else "random"
    return args


def check_args(args):
    """The flags that cannot go together, each a one-line error; returns --ratio as integers."""
    try:
        ratio = [int(x) for x in args.ratio.split(":")]
    except ValueError:
        ratio = []
    if len(ratio) != len(tasks.TASKS) or min(ratio) < 0 or sum(ratio) == 0:
        raise UserError(f"--ratio needs {len(tasks.TASKS)} non-negative integers ({':'.join(tasks.TASKS)}), "
                        f"got {args.ratio!r}")
    if args.task_num != len(tasks.TASKS):
        raise UserError(f"--task_num must be {len(tasks.TASKS)}, one prompt set per task ({', '.join(tasks.TASKS)}); "
                        f"got {args.task_num}")
    if args.item_ids in CODE_SCHEMES and (args.id_tokens != "atomic" or args.item_init == "cooc"):
        raise UserError(f"--item_ids {args.item_ids} gives every code level tokens of its own: it needs --id_tokens "
                        "atomic, and --item_init random (there is no one embedding row per item to start)")
    if args.history == "decoder" and args.id_tokens != "atomic":
        raise UserError("--history decoder reads items one after another in the decoder: it needs --id_tokens "
                        "atomic (sub-word pieces of one id can be the start of another); the paper's setting is "
                        "--history encoder")
    if args.embedding_std and args.backbone not in SIZES:
        raise UserError(f"--embedding_std sets a from-scratch backbone's initial embeddings ({', '.join(SIZES)}); "
                        f"{args.backbone} is pretrained")
    if args.item_init == "cooc" and args.id_tokens != "atomic":
        raise UserError("--item_init cooc sets one embedding row per item: it needs --id_tokens atomic")
    if args.lr_decay == "plateau" and args.lr_patience < 1:
        raise UserError(f"--lr_patience counts validations without gain before each halving: at least 1, got "
                        f"{args.lr_patience}")
    if not 0.0 <= args.label_smoothing < 1.0:
        raise UserError(f"--label_smoothing is the target's share spread over all classes: in [0, 1), got "
                        f"{args.label_smoothing}")
    return ratio


# ---------------------------------------------------------------------------------------------------- processes

def start_processes(cuda):
    """(world, rank, device): torchrun starts one process per GPU (WORLD_SIZE, RANK), joined here for
    DistributedDataParallel; a plain run is a world of one."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    if world > 1:
        dist.init_process_group("nccl" if cuda and torch.cuda.is_available() else "gloo")
    device = pick_device(cuda)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return world, rank, device


def log(msg):
    if int(os.environ.get("RANK", 0)) == 0:     # one process speaks
        tqdm.write(msg)


def barrier():
    if dist.is_initialized():
        dist.barrier()


def agreed(flag, device):
    """True on every process when any says so (time checks differ slightly between processes)."""
    if not dist.is_initialized():
        return bool(flag)
    t = torch.tensor([int(bool(flag))], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


# ---------------------------------------------------------------------------------------------------- build

def read_saved_state(out):
    """The counters of the resumable state in out/last (None: a new run). That state is one directory (weights,
    tokenizer, optimizer, counters) replaced as a unit: written to last.tmp, then last -> last.old, last.tmp -> last.
    A crash at any point leaves a complete state."""
    last, last_old = out / "last", out / "last.old"
    if int(os.environ.get("RANK", 0)) == 0 and not last.exists() and last_old.exists():
        last_old.rename(last)                          # the crash fell between the two renames
    path = last / STATE_JSON
    return json.loads(path.read_text()) if path.exists() else None


def load_data(args, ratio, saved, is_main):
    """The dataset with its items named as this run names them (a resumed run keeps its names): (ds, item_map, item
    codes of a code scheme or None)."""
    ds = load_dataset(args.data_dir, log=log) if is_main else None
    barrier()                       # the main process may have written negative.txt
    ds = ds or load_dataset(args.data_dir, log=log)
    codes = None
    if saved:
        item_map = saved["item_map"]
        log(f"resuming from {Path(args.checkpoint)} at epoch {saved['epoch']} step {saved['step']}")
    else:
        item_map = item_map_for(args.item_ids, ds, args.seed)
        if args.item_ids in CODE_SCHEMES:  # built on the dataset's own ids (titles are keyed by them), then renumbered
            codes = item_codes(args.item_ids, ds, parse_branching(args.code_branching), args.seed, log)
            codes = {item_map[i]: c for i, c in codes.items()}
            log(f"{args.item_ids} codes: {len(set(c[:-1] for c in codes.values()))} leaves, "
                f"{max(len(c) for c in codes.values())} tokens an item")
    ds = renumber_items(ds, item_map)
    for task, share in zip(tasks.TASKS, ratio):
        if share and not tasks.trainable_users(ds, task):
            need = {"explanation": "explanation.json (data/prepare.py) or explanation_rationale.json",
                    "review": "explanation_rationale.json with review_summary (data/distill.py)"}.get(task, "")
            raise UserError(f"--ratio gives the {task} task a share, but {args.data_dir} has no training data for "
                            f"it (needs {need}); give it a zero share, e.g. --ratio 0:1:0:3")
    return ds, item_map, codes


def build_model(args, ds, codes, backbone, out, is_main):
    """A new HDRec on `backbone` (from scratch with a tokenizer trained on the data, or pretrained): (model,
    tokenizer, SentencePiece model bytes or None)."""
    spm_model = None
    if backbone in SIZES:
        tok_dir = out / "tokenizer_build"
        if is_main:
            log(f"training a SentencePiece tokenizer on {args.data_dir} (vocab <= {args.vocab_size}, "
                f"{args.id_tokens} ids)")
            atomic = args.id_tokens == "atomic"
            tokenizer, spm_model = train_tokenizer(tasks.tokenizer_corpus(ds, args.seed, ids=not atomic),
                                                   args.vocab_size, tasks.id_words(ds, codes) if atomic else None)
            tokenizer.save_pretrained(tok_dir)
            (tok_dir / "spm.model").write_bytes(spm_model)
        barrier()
        if not is_main:
            from transformers import AutoTokenizer
            tokenizer, spm_model = AutoTokenizer.from_pretrained(tok_dir), (tok_dir / "spm.model").read_bytes()
        t5 = from_scratch_t5(backbone, tokenizer, args.embedding_std)
    else:
        t5, tokenizer = load_pretrained(backbone)
        if args.id_tokens == "atomic" and add_id_tokens(tokenizer, tasks.id_words(ds, codes)):
            t5.resize_token_embeddings(len(tokenizer))
    model = HDRec(t5, len(tasks.TASKS), args.prompt_num, args.seed)
    set_dropout(model.t5, args.dropout)
    model.label_smoothing = args.label_smoothing
    if args.output_dropout == "no":
        no_output_dropout(model.t5)
    if args.output_scale == "none":
        no_output_scale(model.t5)
    set_input_scale(model.t5, args.input_scale)
    if args.item_init == "cooc":
        # From scratch, at the std that gives logits of std ~1 (T5's own embedding scale, std 1, under T5's output
        # scale): sharp enough to rank 12k items from the start, and rows that large move little under AdamW, so the
        # structure survives (much smaller, the popularity gradient of the first minutes overwrites it). A
        # pretrained backbone: at its embedding scale.
        vectors = item_vectors(cooccurrence(ds), model.t5.config.d_model, args.seed)
        n = init_item_embeddings(model.t5, tokenizer, vectors, std=cooc_std(model.t5.config) if backbone in SIZES
                                 else None)
        log(f"item embeddings: {n} of {ds.num_items} items start from co-occurrence vectors")
    return model, tokenizer, spm_model


def cooc_std(config):
    """The element std of co-occurrence item vectors whose dot products with a normalised decoder output (elements
    ~1) have std ~1 after the output scale: 1 under T5's d_model**-0.5, d_model**-0.5 without it."""
    return config.d_model ** -0.5 / output_scale(config)


def load_last_model(out, device):
    """The model of the resumable state: (model, tokenizer, SentencePiece model bytes or None, its meta)."""
    model, tokenizer, meta = load_checkpoint(out / "last", device)
    model.train()
    spm_path = out / "last" / "tokenizer" / "spm.model"
    return model, tokenizer, spm_path.read_bytes() if spm_path.exists() else None, meta


def run_meta(args, ds, ratio, backbone, item_map, codes):
    """config.json's "hdrec" part: what seq.py / topn.py / exp.py need to read the model, and how it was trained."""
    return {"task_num": len(tasks.TASKS), "prompt_num": args.prompt_num, "tasks": list(tasks.TASKS), "ratio": ratio,
            "backbone": backbone, "id_tokens": args.id_tokens, "history": args.history, "item_ids": args.item_ids,
            "name_user": args.name_user == "yes", "item_map": item_map,
            "item_codes": codes and [list(codes[i]) for i in range(1, ds.num_items + 1)],
            "seed": args.seed, "data_dir": str(args.data_dir), "data_hashes": ds.hashes, "args": vars(args),
            "versions": versions()}


def build_encoder(tokenizer, ds, meta):
    """Words (user and item ids, codes) to token ids, as the model reads them."""
    encoder = tasks.WordEncoder(tokenizer)
    encoder.add(tasks.id_words(ds))
    if meta.get("item_codes"):
        encoder.set_item_codes({i: c for i, c in enumerate(meta["item_codes"], 1)})
    return encoder


def build_optimizer(model, lr, weight_decay):
    # no weight decay on the norm weights (1-d): decaying them towards 0 only fights the normalisation
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW([{"params": [p for p in params if p.dim() > 1], "weight_decay": weight_decay},
                              {"params": [p for p in params if p.dim() <= 1], "weight_decay": 0.0}], lr=lr)


def lr_at(step, steps_per_epoch, args, lr_scale=1.0):
    """The learning rate at global step `step` (0-based): warm-up, then constant or a linear fall to 0 at the end of
    --epochs; times lr_scale, the plateau halvings so far (--lr_decay plateau). A function of the step and the saved
    halvings, so a resumed run follows the same schedule."""
    factor = min(1.0, (step + 1) / args.warmup_steps) if args.warmup_steps else 1.0
    factor *= lr_scale
    if args.lr_decay == "linear":
        total = args.epochs * steps_per_epoch
        factor *= max(0.0, (total - step) / max(1, total - args.warmup_steps)) if step >= args.warmup_steps else 1.0
    return args.lr * factor


def sample_options(args):
    return {"negative_num": args.negative_num, "explanation_target": args.explanation_target,
            "exp_len": args.exp_len, "history": args.history, "name_user": args.name_user == "yes",
            "text_context": tasks.text_context_sources(args.text_context)}


@dataclass
class Run:
    """What a training process works with, built once by main(); the weights and the optimizer change in place."""
    args: argparse.Namespace
    out: Path                       # --checkpoint
    world: int                      # processes (torchrun), 1 without
    rank: int
    device: torch.device
    autocast: torch.autocast        # bf16 where it pays off, else a no-op
    ratio: list                     # --ratio as integers
    ds: object                      # dataset.Dataset, items renamed by the run's item map
    encoder: tasks.WordEncoder
    model: HDRec
    tokenizer: object
    spm_model: bytes | None         # a from-scratch tokenizer's SentencePiece model, saved beside it (else None)
    meta: dict                      # config.json's "hdrec" part
    optimizer: torch.optim.Optimizer


# ---------------------------------------------------------------------------------------------------- validation

@dataclass
class Validation:
    """The fixed validation set: the same at every validation and across resumes."""
    batches: list                   # (task, batch): this process's share of the loss batches
    tasks: list                     # the tasks with validation samples
    rank_users: list                # users whose ranking of every item draws the learning curve
    reference: dict                 # the reference rules' HR@10 / NDCG@10 on those users (main process)
    texts: dict = field(default_factory=dict)   # text task -> (validation records to generate for, their targets)


def validation_batches(run):
    """Seeded users and samples: (batches of this process, tasks with validation samples)."""
    args, ds = run.args, run.ds
    val_rng = random.Random(f"{args.seed}-val")
    val_users = ds.users if not args.val_users else sorted(val_rng.sample(ds.users, min(args.val_users, len(ds.users))))
    batches, val_tasks = [], []
    for task, share in zip(tasks.TASKS, run.ratio):
        if share:
            able = set(tasks.trainable_users(ds, task, "val"))
            users = [u for u in val_users if u in able]
            if not users:
                log(f"no validation samples for the {task} task: its loss does not drive early stopping")
                continue
            val_tasks.append(task)
            users = users[run.rank::run.world]
            batches += [(task, tasks.make_batch(ds, run.encoder, task, users[i:i + args.batch_size], val_rng, "val",
                                                **sample_options(args)))
                        for i in range(0, len(users), args.batch_size)]
    if not val_tasks:
        raise UserError(f"{args.data_dir}: no validation samples for any task with a share in --ratio {args.ratio}")
    return batches, val_tasks


def reference_ranking(ds, users):
    """The reference rules of the evaluation core (ranking.py, fitted on the training parts) on the ranked users'
    validation items, for the curve: those without a setting to choose (EASE and item kNN would hold training up
    for minutes on a large catalogue; seq.py ranks them beside the model)."""
    names = [rule for rule in RULE_NAMES if rule not in LEAK_RULES and rule not in GRIDS]
    return {rule: ranking_metrics(ranks) for rule, ranks in rule_ranks(ds, users, "val", names, log).items()}


def validation_set(run):
    args = run.args
    batches, val_tasks = validation_batches(run)
    users = []              # ranked at every validation: a fixed seeded sample, with the sequential task
    if args.rank_users and "sequential" in val_tasks:
        users = sequential_curve_users(run.ds, args.rank_users, args.seed)
    if args.stop_on == "ndcg" and not users:
        raise UserError("--stop_on ndcg needs ranked validation users: the sequential task in --ratio and "
                        "--rank_users > 0 (or use --stop_on loss)")
    reference = reference_ranking(run.ds, users) if users and run.rank == 0 else {}
    if reference:
        log(f"validation ranking of {len(users)} users, reference rules: " + ", ".join(
            f"{rule} HR@10 {f['HR@10']:.4f} NDCG@10 {f['NDCG@10']:.4f}" for rule, f in reference.items()))
    return Validation(batches, val_tasks, users, reference, validation_records(run, val_tasks))


def validation_records(run, val_tasks):
    """{text task: (a fixed seeded sample of up to --val_texts validation records, the texts the task trains to write
    for them: --explanation_target for explanations)}, every process the same."""
    args, out = run.args, {}
    for task in (t for t in val_tasks if t in tasks.TEXT_FIELDS and args.val_texts):
        records = [r for u in sorted(run.ds.records.get("val", {})) for r in tasks.user_records(run.ds, u, "val", task)]
        if len(records) > args.val_texts:
            records = random.Random(f"{args.seed}-val-texts-{task}").sample(records, args.val_texts)
        out[task] = (records, [tasks.SAMPLERS[task](run.ds, r["user"], None, "val", record=r,
                                                    explanation_target=args.explanation_target)[1] for r in records])
    return out


@torch.no_grad()
def validate(run, val):
    """The mean token loss of every task on the validation batches (summed over all processes)."""
    run.model.eval()
    sums = {t: torch.zeros(2, device=run.device) for t in val.tasks}
    for task, batch in val.batches:
        batch = tasks.to_device(batch, run.device)
        with run.autocast:
            loss = run.model(batch)
        n = (batch["labels"] != -100).sum()
        sums[task] += torch.stack([loss.float() * n, n.float()])
    run.model.train()
    losses = {}
    for task, s in sums.items():
        if run.world > 1:
            dist.all_reduce(s)
        losses[task] = (s[0] / s[1]).item()
    return losses


@torch.no_grad()
def validate_ranking(run, users):
    """HR@10 / NDCG@10 of the validation item when the model ranks every item for `users` (every process ranks them
    all: the figures then agree without communication)."""
    if not users:
        return {}
    run.model.eval()
    ranks, _, list_length = rank_next(run.model, run.tokenizer, run.encoder, run.ds, users, "clean", num_beams=20,
                                      top_k=10, batch_size=64, seed=run.args.seed, progress=False,
                                      history=run.args.history, split="val",
                                      name_user=run.args.name_user == "yes")
    run.model.train()
    m = ranking_metrics(ranks, list_length)
    return {k: m[k] for k in ("HR@10", "NDCG@10")}


@torch.no_grad()
def validate_texts(run, val):
    """{text task: ROUGE-L (F1 x100) of the greedy texts of its validation records against the task's own targets}:
    what the text tasks are for, where the token loss keeps falling while greedy decoding writes the one most likely
    sentence for everyone."""
    run.model.eval()
    figures = {}
    for task, (records, targets) in val.texts.items():
        generated = generate_texts(run.model, run.tokenizer, run.encoder, run.ds, task, records, "val", 64,
                                   max_new_tokens=run.args.exp_len, explanation_target=run.args.explanation_target,
                                   text_context=tasks.text_context_sources(run.args.text_context), progress=False)
        figures[task] = rouge(targets, generated)["ROUGE-L"]
    run.model.train()
    return figures


def plot_curve(history, reference, n_users, path, title):
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
            for (rule, figures), colour in zip(reference.items(), ("grey", "tab:orange", "tab:green", "tab:red",
                                                                   "tab:purple")):
                ax.axhline(figures[metric], color=colour, linestyle=style, linewidth=1, label=f"{rule} {metric}")
        ax.set_xlabel("training minutes")
        ax.set_title(f"validation ranking, {n_users} users", fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)


# ---------------------------------------------------------------------------------------------------- train

@dataclass
class Progress:
    """Where training stands; with the weights and the optimizer, what out/last keeps for a resume."""
    epoch: int                      # the epoch and step to go on from
    step: int
    rng: random.Random              # this process's sampling RNG
    stopping: EarlyStopping         # the --stop_on figure: the top-level model (and a single task's stop)
    history: list                   # train_log.json: one record per validation
    samples: int = 0                # training samples seen, all processes together
    train_sums: dict = field(default_factory=dict)  # task -> [summed loss, steps] since the last validation
    minutes_before: float = 0.0     # trained by earlier processes of this run
    started: float = field(default_factory=time.time)
    task_stopping: dict = field(default_factory=dict)   # task -> its own EarlyStopping; empty for a single task
    text_loss_stopping: dict = field(default_factory=dict)  # text task -> EarlyStopping of its validation loss
    epoch_ratio: list = None        # the shares this epoch's plan was drawn with (training_ratio at its start)
    steps_since_val: int = 0        # training steps since the last validation (--val_every counts across epochs)
    lr_scale: float = 1.0           # --lr_decay plateau: 0.5 ** the halvings so far

    def minutes(self):
        return self.minutes_before + (time.time() - self.started) / 60

    @property
    def stop(self):
        """A single task stops on the --stop_on figure; several tasks when none has gained for --endure_times."""
        if self.task_stopping:
            return all(task_done(self, task) for task in self.task_stopping)
        return self.stopping.stop


def training_ratio(ratio, progress):
    """--ratio with a 0 for every task that has stopped gaining (its own figure, --endure_times validations): the rest
    of the budget goes to the tasks still learning, while the stopped task's best model is kept. A task whose figure
    gains again (the shared weights moved) trains again from the next epoch."""
    return [0 if task in progress.task_stopping and task_done(progress, task) else share
            for task, share in zip(tasks.TASKS, ratio)]


def task_done(progress, task):
    """A task has stopped gaining: its own figure, and for a text task its validation loss too (the greedy texts can
    sit still, or even score 0, while the model is still learning to write), has gone --endure_times validations
    without gain."""
    return progress.task_stopping[task].stop and (task not in progress.text_loss_stopping
                                                   or progress.text_loss_stopping[task].stop)


def task_stoppers(val_tasks, endure_times, saved=None, only=None):
    """{task: EarlyStopping} of a multi-task run, one for each task with validation samples ({} for a single task:
    its one figure is --stop_on's), or for those of them in `only`. saved: a resumed state's {task: [best, endured]}."""
    if len(val_tasks) < 2:
        return {}
    saved = saved or {}
    return {task: EarlyStopping(endure_times, *saved.get(task, (math.inf, 0))) for task in val_tasks
            if only is None or task in only}


def task_figure(task, losses, ranking, texts=None):
    """(name, value) of a task's own validation figure: NDCG@10 of the ranked users for the sequential task, ROUGE-L
    of the generated validation texts for a text task (--val_texts); the validation token loss otherwise (top-N, and
    where nothing is ranked or generated)."""
    if task == "sequential" and ranking:
        return "NDCG@10", ranking["NDCG@10"]
    if task in (texts or {}):
        return "ROUGE-L", texts[task]
    return "loss", losses[task]


def lower_is_better(figures):
    """{task: (name, value)} -> {task: value to minimise}: a loss as it is, NDCG@10 and ROUGE-L negated."""
    return {task: value if name == "loss" else -value for task, (name, value) in figures.items()}


def count_validation(progress, top_figure, figures, text_losses=None):
    """Count one validation in every EarlyStopping (figures: lower is better, {task: figure} for the tasks of
    progress.task_stopping; text_losses: {text task: validation loss} for progress.text_loss_stopping): (whether the
    --stop_on figure gained, {task: whether its figure gained})."""
    top_gained = progress.stopping.improved(top_figure)
    for task, stopping in progress.text_loss_stopping.items():
        stopping.improved(text_losses[task])
    return top_gained, {task: stopping.improved(figures[task]) for task, stopping in progress.task_stopping.items()}


def validations_without_gain(progress):
    """Validations in a row without a gain: in the --stop_on figure for a single task; for several, in any task's
    figure (a text task's loss counts too), the count that their stop waits for."""
    if not progress.task_stopping:
        return progress.stopping.endured
    return min(min(s.endured, progress.text_loss_stopping[task].endured) if task in progress.text_loss_stopping
               else s.endured for task, s in progress.task_stopping.items())


def lower_lr_on_plateau(args, progress):
    """--lr_decay plateau: halve progress.lr_scale after every --lr_patience validations in a row without gain (in
    every task, for several: a text task still learning keeps the rate), unless the run stops there; True when it
    did."""
    stalled = validations_without_gain(progress)
    if args.lr_decay != "plateau" or not stalled or stalled % args.lr_patience or progress.stop:
        return False
    progress.lr_scale /= 2
    return True


def keep_best_models(run, progress, top_gained, gained, record):
    """Save what this validation's gains call for (main process): the top-level model when the --stop_on figure
    gained; best_<task>/ when a task gained and the top level did not. What stays true: a task's best model is in
    best_<task>/, or (no such folder) it is the top-level one. So before the top-level model is replaced, each task
    whose best it holds gets a copy; a task that gains with it drops its folder."""
    if run.rank != 0:
        return
    meta = {**run.meta, "best": record}
    if top_gained:
        for task, stopping in progress.task_stopping.items():
            folder = task_best_dir(run.out, task)
            if not gained[task] and math.isfinite(stopping.best) and not folder.exists():
                copy_checkpoint(run.out, folder)
        save_checkpoint(run.model, run.tokenizer, run.out, meta, run.spm_model)
    for task in (t for t, g in gained.items() if g):
        if top_gained:
            shutil.rmtree(task_best_dir(run.out, task), ignore_errors=True)
        else:
            save_checkpoint(run.model, run.tokenizer, task_best_dir(run.out, task), meta, run.spm_model)


def stopping_line(args, progress, figures):
    """The validation log line's account of stopping: the --stop_on figure's best and, for several tasks, each task's
    figure and its validations without gain (figures: {task: (name, value)})."""
    best = f" | best {args.stop_on} {abs(progress.stopping.best):.4f}"
    if not progress.task_stopping:
        return best + f", {progress.stopping.endured}/{args.endure_times} without gain"
    return (best + f" (top-level model, {progress.stopping.endured} validations ago) | validations without gain "
            f"(stops when all reach {args.endure_times}): "
            + ", ".join(f"{task} {name} {value:.4f} {progress.task_stopping[task].endured}"
                        + (f" (loss {progress.text_loss_stopping[task].endured})"
                           if task in progress.text_loss_stopping else "")
                        for task, (name, value) in figures.items()))


def kept_line(out, progress):
    """Where each task's own best model is, for the last log line (nothing for a single task)."""
    return "".join(f"; {task}'s own best {abs(s.best):.4f} in "
                   + (f"{task_best_dir(out, task).name}/" if task_best_dir(out, task).exists() else "the top level")
                   for task, s in progress.task_stopping.items())


def validation_due(steps_since, epoch_done, val_every, last=False):
    """Whether a validation follows this step: once an epoch (--val_every 0), else every val_every steps counted
    across epochs, so that a small set whose epoch is a few steps is not validated after each of them; and always
    after the last step of --epochs."""
    return last or (steps_since >= val_every if val_every else epoch_done)


def validate_and_keep_best(run, progress, val, epoch, step, speed):
    """Validate, record (train_log.json, curve.png) and log; the model is saved when it is the best so far.
    speed: seconds_per_epoch and samples_per_second of the training steps since the last validation."""
    args = run.args
    losses = validate(run, val)
    mean = sum(losses.values()) / len(losses)
    ranking = validate_ranking(run, val.rank_users)
    texts = validate_texts(run, val)
    record = {"epoch": epoch, "step": step, "samples": progress.samples, "minutes": progress.minutes(), **speed,
              "train": {t: v[0] / v[1] for t, v in progress.train_sums.items()}, "val": losses, "val_mean": mean,
              "val_ranking": ranking, "val_texts": texts}
    progress.train_sums = {}
    progress.history.append(record)
    figures = {task: task_figure(task, losses, ranking, texts) for task in progress.task_stopping}
    top_gained, gained = count_validation(progress, -ranking["NDCG@10"] if args.stop_on == "ndcg" else mean,
                                          lower_is_better(figures), losses)
    if lower_lr_on_plateau(args, progress):
        log(f"no gain in the last {args.lr_patience} validations: learning rate halved to "
            f"{args.lr * progress.lr_scale:.2e}")
    record["lr"] = args.lr * progress.lr_scale      # the rate after this validation (before any warm-up / decay)
    if figures:
        record["tasks"] = {task: {"figure": name, "value": value, "best": abs(progress.task_stopping[task].best),
                                  "without_gain": progress.task_stopping[task].endured,
                                  **({"loss_without_gain": progress.text_loss_stopping[task].endured}
                                     if task in progress.text_loss_stopping else {})}
                           for task, (name, value) in figures.items()}
    keep_best_models(run, progress, top_gained, gained, record)
    record["reference_ranking"] = val.reference     # train_log.json's records carry them, config.json's does not
    log(f"epoch {epoch} step {step} ({record['minutes']:.1f} min, {record['seconds_per_epoch']:.0f} s/epoch, "
        f"{record['samples_per_second']:.0f} samples/s): val loss "
        + " ".join(f"{t} {v:.4f}" for t, v in losses.items()) + f" | mean {mean:.4f}"
        + "".join(f" | {k} {v:.4f}" for k, v in ranking.items())
        + "".join(f" | {t} ROUGE-L {v:.2f}" for t, v in texts.items()) + stopping_line(args, progress, figures))
    if run.rank == 0:
        atomic_write_json(run.out / "train_log.json", progress.history)
        plot_curve(progress.history, val.reference, len(val.rank_users), run.out / "curve.png",
                   f"{Path(args.data_dir).name}: {run.meta['backbone']}, ratio {args.ratio}, history in the "
                   f"{args.history}, {run.meta['item_ids']} ids")


def train(run, progress, val):
    """Single-task batches in the order of tasks.epoch_plan, from where `progress` stands to the end of --epochs,
    validating at the validation points; stops early after --endure_times validations without gain (in every task's
    figure, for several tasks), or at --max_minutes. The resumable state is saved every --save_minutes, at every
    epoch's end and at a stop."""
    args, model = run.args, run.model
    ddp_model = torch.nn.parallel.DistributedDataParallel(model) if run.world > 1 else model
    no_sync = ddp_model.no_sync if run.world > 1 else None
    micro_batch_tokens = args.micro_batch_tokens if args.micro_batch_tokens >= 0 else \
        (2560 if run.device.type == "cpu" else 0)
    last_save = time.time()
    trained_seconds, trained_steps, samples_before = 0.0, 0, progress.samples    # since the last validation
    while progress.epoch <= args.epochs:
        epoch = progress.epoch
        if progress.step == 0 or progress.epoch_ratio is None:   # mid-epoch (a resume): the plan it was drawn with
            progress.epoch_ratio = training_ratio(run.ratio, progress)
        plan = tasks.epoch_plan(run.ds, progress.epoch_ratio, args.batch_size, args.seed, epoch, run.rank, run.world)
        bar = progress_bar(range(progress.step, len(plan)), initial=progress.step, total=len(plan),
                           disable=run.rank != 0, desc=f"epoch {epoch}")
        stop = False
        for step in bar:
            started = time.perf_counter()
            task, users = plan[step]
            batch = tasks.to_device(tasks.make_batch(run.ds, run.encoder, task, users, progress.rng,
                                                     **sample_options(args)), run.device)
            run.optimizer.zero_grad(set_to_none=True)
            loss = backward_batch(ddp_model, batch, micro_batch_tokens, run.autocast, no_sync)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            for group in run.optimizer.param_groups:
                group["lr"] = lr_at((epoch - 1) * len(plan) + step, len(plan), args, progress.lr_scale)
            run.optimizer.step()
            progress.step = step + 1
            progress.steps_since_val += 1
            progress.samples += len(users) * run.world
            s = progress.train_sums.setdefault(task, [0.0, 0])
            s[0] += loss
            s[1] += 1
            trained_seconds += time.perf_counter() - started
            trained_steps += 1
            if step % max(1, args.log_interval) == 0:
                bar.set_postfix(task=task, loss=f"{loss:.3f}")
            out_of_time = agreed(args.max_minutes and progress.minutes() >= args.max_minutes, run.device)
            epoch_done = step + 1 == len(plan)
            last = epoch_done and epoch == args.epochs
            if validation_due(progress.steps_since_val, epoch_done, args.val_every, last) or out_of_time:
                speed = {"seconds_per_epoch": round(trained_seconds / trained_steps * len(plan), 1),
                         "samples_per_second": round((progress.samples - samples_before) / trained_seconds, 1)}
                validate_and_keep_best(run, progress, val, epoch, step + 1, speed)
                trained_seconds, trained_steps, samples_before = 0.0, 0, progress.samples
                progress.steps_since_val = 0
                if progress.stop or out_of_time:
                    stop = True
                    log("early stop" if not out_of_time else f"time budget of {args.max_minutes} min reached")
            if stop or agreed(time.time() - last_save >= args.save_minutes * 60, run.device):
                save_state(run, progress)
                last_save = time.time()
            if stop:
                break
        bar.close()
        if stop:
            return
        progress.epoch, progress.step = epoch + 1, 0
        save_state(run, progress)
        last_save = time.time()


# ---------------------------------------------------------------------------------------------------- save, resume

def save_state(run, progress):
    """Everything needed to go on exactly from progress.epoch, progress.step: weights, optimizer and RNG states,
    counters, written to out/last as a unit (see read_saved_state)."""
    version, internal, gauss = progress.rng.getstate()
    rng_states = [[version, list(internal), gauss]]
    if run.world > 1:
        rng_states = [None] * run.world
        dist.all_gather_object(rng_states, [version, list(internal), gauss])
    if run.rank != 0:
        return
    last, last_tmp, last_old = run.out / "last", run.out / "last.tmp", run.out / "last.old"
    shutil.rmtree(last_tmp, ignore_errors=True)
    save_checkpoint(run.model, run.tokenizer, last_tmp, run.meta, run.spm_model)
    tensors = {"torch_rng": torch.get_rng_state()}
    for i, s in run.optimizer.state_dict()["state"].items():
        for k, v in s.items():
            tensors[f"opt.{i}.{k}"] = v.detach().cpu().contiguous()
    save_file(tensors, str(last_tmp / STATE_TENSORS))
    atomic_write_json(last_tmp / STATE_JSON, {
        "epoch": progress.epoch, "step": progress.step, "rng": rng_states, "best": progress.stopping.best,
        "endured": progress.stopping.endured, "history": progress.history, "item_map": run.meta["item_map"],
        "task_stopping": {task: [s.best, s.endured] for task, s in progress.task_stopping.items()},
        "text_loss_stopping": {task: [s.best, s.endured] for task, s in progress.text_loss_stopping.items()},
        "samples": progress.samples, "train_sums": progress.train_sums, "minutes": progress.minutes(),
        "epoch_ratio": progress.epoch_ratio, "steps_since_val": progress.steps_since_val,
        "lr_scale": progress.lr_scale})
    if last.exists():
        last.rename(last_old)
    last_tmp.rename(last)
    shutil.rmtree(last_old, ignore_errors=True)


def load_state(run, saved, val_tasks, val_texts):
    """The optimizer and RNG states of out/last put back; the Progress to go on from. saved: its train_state.json;
    val_tasks: the tasks with validation samples (each with its own stopping counts, for several); val_texts: the
    text tasks whose generated texts are validated (each with a count of its loss too)."""
    tensors = load_file(str(run.out / "last" / STATE_TENSORS))
    torch.set_rng_state(tensors.pop("torch_rng"))
    opt = run.optimizer.state_dict()
    opt["state"] = {}
    for key, v in tensors.items():
        _, i, k = key.split(".", 2)
        opt["state"].setdefault(int(i), {})[k] = v.to(run.device) if k != "step" else v
    run.optimizer.load_state_dict(opt)
    if len(saved["rng"]) != run.world:
        raise UserError(f"{run.out / 'last' / STATE_JSON} was written by {len(saved['rng'])} processes; resume with "
                        "the same number")
    version, internal, gauss = saved["rng"][run.rank]
    rng = random.Random()
    rng.setstate((version, tuple(internal), gauss))
    history = saved["history"]
    # samples and the training loss since the last validation: a resumed run goes on counting both
    return Progress(saved["epoch"], saved["step"], rng, EarlyStopping(run.args.endure_times, saved["best"],
                                                                      saved["endured"]), history,
                    samples=saved.get("samples", history[-1]["samples"] if history else 0),
                    train_sums=saved.get("train_sums", {}),
                    minutes_before=saved.get("minutes", history[-1]["minutes"] if history else 0.0),
                    task_stopping=task_stoppers(val_tasks, run.args.endure_times, saved.get("task_stopping")),
                    text_loss_stopping=task_stoppers(val_tasks, run.args.endure_times, saved.get("text_loss_stopping"),
                                                     only=val_texts),
                    epoch_ratio=saved.get("epoch_ratio"), steps_since_val=saved.get("steps_since_val", 0),
                    lr_scale=saved.get("lr_scale", 1.0))


# ---------------------------------------------------------------------------------------------------- main

def remove_task_bests(out):
    """A new run in a used folder: an earlier run's best_<task>/ would be read as this run's by exp.py / topn.py."""
    for task in tasks.TASKS:
        folder = task_best_dir(out, task)
        if folder.exists():
            shutil.rmtree(folder)
            log(f"removed {folder}: an earlier run's")


def main():
    report_user_errors()
    args = resolve_recipe(parse_args())
    ratio = check_args(args)
    world, rank, device = start_processes(args.cuda)
    seed_everything(args.seed)
    out = Path(args.checkpoint)
    saved = read_saved_state(out)

    ds, item_map, codes = load_data(args, ratio, saved, rank == 0)
    if saved:
        model, tokenizer, spm_model, meta = load_last_model(out, device)
    else:
        backbone = args.backbone
        model, tokenizer, spm_model = build_model(args, ds, codes, backbone, out, rank == 0)
        meta = run_meta(args, ds, ratio, backbone, item_map, codes)
    model.to(device)
    if args.gradient_checkpointing:
        model.t5.gradient_checkpointing_enable()
    if device.type == "cpu" and world > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    use_bf16 = bf16_supported(device) and not args.no_bf16
    log(f"backbone {meta['backbone']}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, vocab "
        f"{len(tokenizer)}, device {device}, bf16 {'on' if use_bf16 else 'off'}, world {world}")
    encoder = build_encoder(tokenizer, ds, meta)
    if args.history == "decoder" and not meta.get("item_codes"):   # one token an item: cross-entropy over items alone
        model.set_item_tokens(encoder.single_item_tokens(ds.num_items))
    optimizer = build_optimizer(model, args.lr, args.weight_decay)
    run = Run(args, out, world, rank, device, torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16),
              ratio, ds, encoder, model, tokenizer, spm_model, meta, optimizer)

    val = validation_set(run)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        if not saved:
            remove_task_bests(out)
    if saved:
        progress = load_state(run, saved, val.tasks, val.texts)
    else:
        progress = Progress(1, 0, random.Random(f"{args.seed}-train-{rank}"), EarlyStopping(args.endure_times), [],
                            task_stopping=task_stoppers(val.tasks, args.endure_times),
                            text_loss_stopping=task_stoppers(val.tasks, args.endure_times, only=val.texts))
    if saved and (progress.stop or args.max_minutes and progress.minutes_before >= args.max_minutes):
        log(f"{out}: this run has ended ({'early stop' if progress.stop else 'time budget used'}); "
            "nothing to do (a larger --endure_times or --max_minutes goes on)")
    else:
        train(run, progress, val)
    log(f"done: best validation {'NDCG@10' if args.stop_on == 'ndcg' else 'loss'} {abs(progress.stopping.best):.4f}; "
        f"model in {out}" + kept_line(out, progress))
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
