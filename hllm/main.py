"""HSFT main: fine-tune (or just evaluate) a user LLM over cached item embeddings, evaluated by full ranking.

Evaluate the un-tuned base (the seed's "Baseline" column):
    python hllm/main.py --dataset DIR --loss bce --use_item_cache True --item_cache_path items.safetensors \
        --user_pretrain_dir M --item_pretrain_dir M --val_only True
Fine-tune (LoRA by default; --use_qlora True for 4-bit QLoRA on CUDA; --use_lora False for full fine-tuning):
    python hllm/main.py --dataset DIR --loss bce --use_item_cache True --item_cache_path items.safetensors \
        --user_pretrain_dir M --use_qlora True

--dataset is a P5-style dataset dir (or a name under data/ or ../shared/data/p5), or with --data_dir ROOT a PixelRec
name (ROOT/dataset/<name>.csv, item text from ROOT/information/<name>.csv). Models default to SmolLM2-135M-Instruct.
A missing item cache is built first (hllm/item_caching.py). --config_file YAML files override defaults (the command
line overrides them). Writes to --out: the adapter or weights (safetensors), model_config.json, results.json.
"""
import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

import torch

from dataset import read_yaml
from hllm.data import load_interactions
from hllm.evaluate import evaluate_model, pad_right
from hllm.item_caching import build_item_cache, load_item_cache, stale_cache_reason
from hllm.model import (LOSSES, build_user_llm, load_user_llm, resolve_mode, save_user_llm,
                        trainable_parameters)
from item_text import TEXT_SOURCES
from ranking import rule_ranks, rule_settings
from results import FULL_RANKING, print_table, rank_rows, read_results, write_results
from utils import (EarlyStopping, UserError, atomic_write_json, bf16_supported, file_sha256, pick_device,
                   progress_bar, report_user_errors, seed_everything)

# names HLLM's YAML configs use for the same settings
YAML_ALIASES = {"learning_rate": "lr", "train_batch_size": "batch_size", "MAX_ITEM_LIST_LENGTH": "max_seq_len",
                "eval_batch_size": "eval_batch_size", "stopping_step": "endure_times"}


def str2bool(value):
    if isinstance(value, bool):
        return value
    if value.lower() in ("true", "1", "yes", "y"):
        return True
    if value.lower() in ("false", "0", "no", "n"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {value!r}")


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    flag = dict(type=str2bool, nargs="?", const=True)
    p.add_argument("--config_file", nargs="+", default=[], help="YAML files of overrides (later files win)")
    p.add_argument("--dataset", default=None, help="dataset dir or name (PixelRec: the name, with --data_dir ROOT)")
    p.add_argument("--data_dir", default=None)
    p.add_argument("--loss", default="nce", choices=sorted(LOSSES))
    p.add_argument("--use_item_cache", default=True, **flag, help="read item embeddings from --item_cache_path "
                   "(built there first when missing); False re-embeds the items now")
    p.add_argument("--item_cache_path", default=None, help="default: OUT/item_embeddings.safetensors")
    p.add_argument("--item_pretrain_dir", default=None, help="item LLM (folder, hub id or GGUF; default SmolLM2-135M)")
    p.add_argument("--user_pretrain_dir", default=None, help="user LLM (folder, hub id or GGUF; default SmolLM2-135M)")
    p.add_argument("--item_text", default="auto", choices=TEXT_SOURCES)
    p.add_argument("--item_meta", default=None, help="Amazon meta_*.json(.gz) or PixelRec information/<name>.csv")
    p.add_argument("--pooling", default="last", choices=("last", "mean"))
    p.add_argument("--max_text_tokens", type=int, default=128)
    p.add_argument("--val_only", default=False, **flag, help="evaluate the un-tuned base model, no training")
    p.add_argument("--use_lora", default=True, **flag)
    p.add_argument("--use_qlora", default=False, **flag, help="4-bit QLoRA (CUDA only; LoRA otherwise)")
    p.add_argument("--lora_r", type=int, default=8)
    p.add_argument("--lora_alpha", type=int, default=16)
    p.add_argument("--lora_dropout", type=float, default=0.05)
    p.add_argument("--checkpoint", default=None, help="evaluate a model saved by an earlier run (its --out dir)")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--weight_decay", type=float, default=0.01)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--eval_batch_size", type=int, default=64)
    p.add_argument("--max_seq_len", type=int, default=20, help="items of history the user LLM reads")
    p.add_argument("--num_negatives", type=int, default=256, help="sampled negatives per batch (plus in-batch)")
    p.add_argument("--endure_times", type=int, default=3,
                   help="stop after this many epochs without a better val NDCG@10 (HLLM's stopping_step)")
    p.add_argument("--max_steps", type=int, default=0, help="stop an epoch after this many steps (0: no limit)")
    p.add_argument("--out", default=None, help="output dir (default checkpoint/hllm/<dataset>)")
    p.add_argument("--cuda", action="store_true")
    p.add_argument("--seed", type=int, default=2022)
    return p


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.config_file:
        known = {a.dest for a in parser._actions}
        overrides, ignored = {}, []
        for path in args.config_file:
            for key, value in read_yaml(path).items():
                key = YAML_ALIASES.get(key, key)
                (overrides.__setitem__(key, value) if key in known else ignored.append(key))
        if ignored:
            print(f"--config_file: ignoring settings HSFT does not use: {', '.join(sorted(set(ignored)))}")
        parser.set_defaults(**overrides)
        args = parser.parse_args(argv)  # the command line still wins
    if not args.dataset and not args.data_dir:
        parser.error("give --dataset or --data_dir")
    return args


def training_sequences(ds, max_seq_len):
    """Each user's training part (last max_seq_len + 1 items): max_seq_len next-item predictions at most."""
    return [s[-(max_seq_len + 1):] for s in map(ds.train_items, ds.sequences) if len(s) >= 2]


def length_bucketed_batches(lengths, batch_size, generator, bucket_batches=50):
    """Shuffled batches of similar-length sequences (padding costs as much as real items on a CPU):
    shuffle, sort within buckets of `bucket_batches` batches, cut into batches, shuffle the batches."""
    order = torch.randperm(len(lengths), generator=generator).tolist()
    span = batch_size * bucket_batches
    batches = []
    for start in range(0, len(order), span):
        bucket = sorted(order[start:start + span], key=lambda i: lengths[i])
        batches += [bucket[i:i + batch_size] for i in range(0, len(bucket), batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]


def train(model, ds, args, device, out_dir, log=print):
    """Epochs of next-item training with early stopping on validation NDCG@10; the best model is saved."""
    sequences = training_sequences(ds, args.max_seq_len)
    if not sequences:
        raise UserError("no user has two or more training items: nothing to train on")
    optimizer = torch.optim.AdamW(trainable_parameters(model), lr=args.lr, weight_decay=args.weight_decay)
    generator = torch.Generator().manual_seed(args.seed)
    use_bf16 = bf16_supported(device)
    num_negatives = min(args.num_negatives, ds.num_items)
    history, stopping = [], EarlyStopping(args.endure_times)
    for epoch in range(1, args.epochs + 1):
        model.train()
        batches = length_bucketed_batches([len(s) for s in sequences], args.batch_size, generator)
        if args.max_steps:
            batches = batches[:args.max_steps]
        start, total, seen = time.time(), 0.0, 0
        for batch in (bar := progress_bar(batches, desc=f"epoch {epoch}", leave=False)):
            ids = pad_right([sequences[i] for i in batch]).to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                loss = model.loss(ids, args.loss, num_negatives, generator)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable_parameters(model), 1.0)
            optimizer.step()
            total += loss.item() * len(batch)
            seen += len(batch)
            bar.set_postfix(loss=f"{loss.item():.4f}")
        seconds = time.time() - start
        val, _ = evaluate_model(model, ds, "val", args.eval_batch_size, args.max_seq_len, device)
        row = {"epoch": epoch, "train_loss": total / seen, "seconds": round(seconds, 1),
               "sequences_per_second": round(seen / seconds, 2), "temperature": 1 / model.scale().item(),
               **{f"val_{k}": v for k, v in val.items()}}
        history.append(row)
        log(f"epoch {epoch}: loss {row['train_loss']:.4f}, val HR@10 {val['HR@10']:.4f} "
            f"NDCG@10 {val['NDCG@10']:.4f} ({seconds:.0f}s, {row['sequences_per_second']} seq/s)")
        if stopping.improved(-val["NDCG@10"]):
            save_user_llm(model, out_dir, model.mode, {"max_seq_len": args.max_seq_len, "loss": args.loss,
                                                        "epoch": epoch, "item_cache": str(args.item_cache_path),
                                                        "user_pretrain_dir": args.user_pretrain_dir})
        atomic_write_json(out_dir / "train_log.json", history)
        if stopping.stop:
            log(f"early stop: no better validation NDCG@10 for {stopping.endured} epochs")
            break
    return history


def main(argv=None):
    args = parse_args(argv)
    started = time.time()
    seed_everything(args.seed)
    device = pick_device(args.cuda)
    ds = load_interactions(args.dataset, args.data_dir)
    out_dir = Path(args.out or Path("checkpoint") / "hllm" / (ds.name or Path(ds.data_dir).name))
    out_dir.mkdir(parents=True, exist_ok=True)
    print(f"{ds.data_dir}: {len(ds.sequences)} users, {ds.num_items} items")

    # item embeddings: read the cache (built first when missing), or re-embed now
    cache = Path(args.item_cache_path or out_dir / "item_embeddings.safetensors")
    args.item_cache_path = str(cache)
    stale = None
    if args.use_item_cache and cache.exists():   # reused only if made from these item texts by this model
        stale = stale_cache_reason(cache, ds, args.item_pretrain_dir, args.item_text, args.item_meta, args.pooling,
                                   args.max_text_tokens)
        if stale:
            print(f"item cache {cache}: {stale}; embedding the items again")
    if not args.use_item_cache or not cache.exists() or stale:
        build_item_cache(ds, cache, args.item_pretrain_dir, args.item_text, args.item_meta, args.pooling,
                         max_text_tokens=args.max_text_tokens, device=device)
    item_ids = list(range(1, ds.num_items + 1))
    embeddings, cache_meta = load_item_cache(cache, item_ids, ds.id2item)
    item_table = torch.cat([torch.zeros(1, embeddings.shape[1]), embeddings])  # row 0 = padding
    print(f"item cache {cache}: {cache_meta['text_source']} text, {cache_meta['pooling']} pooling, "
          f"dim {embeddings.shape[1]}, item LLM {cache_meta['model']}")

    if args.checkpoint:
        model, _ = load_user_llm(args.checkpoint, item_table, device)
        mode, label = "checkpoint", f"HSFT checkpoint {Path(args.checkpoint).name}"
    else:
        mode = resolve_mode(args.use_lora, args.use_qlora, args.val_only)
        model = build_user_llm(args.user_pretrain_dir, item_table, mode, device, args.lora_r, args.lora_alpha,
                               args.lora_dropout)
        model.mode = mode
        label = "HSFT base (un-tuned)" if mode == "none" else f"HSFT fine-tuned ({mode}, {args.loss})"
    history = []
    if mode not in ("none", "checkpoint"):
        n_train = sum(p.numel() for p in trainable_parameters(model))
        print(f"fine-tuning: {mode}, {n_train:,} trainable parameters")
        history = train(model, ds, args, device, out_dir)
        model, _ = load_user_llm(out_dir, item_table, device)  # the best epoch
    figures, ranks = {}, {}
    for split in ("val", "test"):
        figures[split], ranks[split] = evaluate_model(model, ds, split, args.eval_batch_size, args.max_seq_len, device)
    users = list(ds.sequences)
    reference_ranks = rule_ranks(ds, users, "test")
    rows = rank_rows(label, ranks["test"], reference_ranks)
    print_table({f"{label}, validation": figures["val"], **rows},
                f"{ds.data_dir}: test, {len(users)} users, all items ranked, history excluded")
    name = "results_val_only.json" if mode == "none" else "results.json"
    write_results(out_dir / name, task="seq", protocol=FULL_RANKING, model=label, ds=ds, users=users, rows=rows,
                  ranks=ranks["test"], reference_ranks=reference_ranks, rule_settings=rule_settings(ds),
                  item_ids="item text", config=vars(args), started=started,
                  training={"minutes": sum(e.get("seconds", 0) for e in history) / 60, "log": history},
                  details={"mode": mode, "validation": figures["val"],
                           "item_cache": {**cache_meta, "raw_ids": None, "sha256": file_sha256(cache)}})
    return read_results(out_dir / name)


if __name__ == "__main__":
    report_user_errors()
    main()
