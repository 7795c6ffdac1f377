"""Item caching: embed every item's text once with an item LLM and store the matrix as safetensors.

    python hllm/item_caching.py --data_dir DIR [--item_pretrain_dir M] --out FILE [--item_text auto] [--pooling last]

The item LLM reads `This item: "<text>" means in one word:"` and the item's vector is the last hidden state of the
final token (`--pooling last`: that token plays the part of HLLM's appended [ITEM] token, and this prompt makes an
untrained LM put the item's meaning there), or the mean over the text's tokens (`--pooling mean`).

The file holds `embeddings` [N, d] (float32) and `item_ids` [N] (int64): row r is the item `item_ids[r]`, in any
order. Its metadata (JSON strings) record the model, text source, pooling, data hashes and the raw item keys.
`load_item_cache` returns rows in the order the caller asks for and raises on anything it cannot align: a missing
item, ids of the wrong type (a str/int mismatch silently gives all-zero rows in public HLLM ports), duplicate ids,
all-zero or non-finite rows, or a cache made for another dataset.
"""
import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dataset import DataError
from hllm.data import load_interactions
from hllm.llm import load_base_model, load_tokenizer
from item_text import TEXT_SOURCES, item_texts
from utils import bf16_supported, pick_device, progress_bar, report_user_errors, seed_everything

FORMAT = "hdrec-hllm-item-cache/1"
PROMPT = 'This item: "{text}" means in one word:"'


def tokenize_items(tokenizer, texts, max_text_tokens):
    """Token ids of the prompt around each text, and the (start, end) span of the text's own tokens."""
    prefix, suffix = PROMPT.split("{text}")
    pre = tokenizer(prefix, add_special_tokens=True).input_ids  # BOS where the tokenizer uses one
    post = tokenizer(suffix, add_special_tokens=False).input_ids
    encoded = tokenizer(list(texts), add_special_tokens=False).input_ids
    ids, spans = [], []
    for text_ids in encoded:
        text_ids = text_ids[:max_text_tokens]
        ids.append(pre + text_ids + post)
        spans.append((len(pre), len(pre) + len(text_ids)))
    return ids, spans


@torch.no_grad()
def embed_texts(model, tokenizer, texts, pooling="last", batch_size=32, max_text_tokens=128, device=None,
                progress=True):
    """[len(texts), hidden] float32 item vectors. Texts are batched by length (less padding), results returned
    in input order."""
    if pooling not in ("last", "mean"):
        raise ValueError(f"--pooling must be last or mean, got {pooling!r}")
    device = device or next(model.parameters()).device
    ids, spans = tokenize_items(tokenizer, texts, max_text_tokens)
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    out = torch.empty(len(ids), model.config.hidden_size)
    use_bf16 = bf16_supported(device)
    model.eval()
    for start in progress_bar(range(0, len(order), batch_size), desc="embedding items", disable=not progress):
        batch = order[start:start + batch_size]
        longest = max(len(ids[i]) for i in batch)
        input_ids = torch.full((len(batch), longest), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(batch), longest), dtype=torch.long)
        pool = torch.zeros((len(batch), longest))
        for row, i in enumerate(batch):  # right padding: positions of real tokens don't move
            input_ids[row, :len(ids[i])] = torch.tensor(ids[i])
            mask[row, :len(ids[i])] = 1
            lo, hi = spans[i] if pooling == "mean" and spans[i][1] > spans[i][0] else (len(ids[i]) - 1, len(ids[i]))
            pool[row, lo:hi] = 1
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            hidden = model(input_ids=input_ids.to(device), attention_mask=mask.to(device)).last_hidden_state
        hidden = hidden.float().cpu()
        out[batch] = (hidden * pool[..., None]).sum(1) / pool.sum(1, keepdim=True)
    return out


def data_fingerprint(ds, texts):
    h = hashlib.sha256(json.dumps(ds.hashes, sort_keys=True).encode())
    for i in sorted(texts):
        h.update(f"{i}\t{texts[i]}\n".encode())
    return h.hexdigest()


def save_item_cache(path, embeddings, item_ids, metadata):
    """Atomic write of the cache; metadata values are stored as JSON strings."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    item_ids = torch.as_tensor(list(item_ids), dtype=torch.int64)
    if len(item_ids) != len(embeddings):
        raise ValueError(f"{len(embeddings)} embeddings for {len(item_ids)} item ids")
    meta = {"format": FORMAT, **{k: json.dumps(v) for k, v in metadata.items()}}
    tmp = path.with_name(path.name + ".tmp")
    save_file({"embeddings": embeddings.float().contiguous(), "item_ids": item_ids}, str(tmp), metadata=meta)
    os.replace(tmp, path)


def read_cache_metadata(path):
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != FORMAT:
        raise DataError(f"{path}: not an HSFT item cache (format tag {meta.get('format')!r}, expected {FORMAT!r})")
    return {k: (v if k == "format" else json.loads(v)) for k, v in meta.items()}


def load_item_cache(path, item_ids, id2item=None):
    """Rows of the cache for `item_ids`, in that order, as [len(item_ids), d] float32, plus the metadata.
    `id2item` (item id -> raw key such as an asin) also checks the cache was made for this dataset."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: item cache not found (make it with hllm/item_caching.py)")
    meta = read_cache_metadata(path)
    with safe_open(str(path), framework="pt") as f:
        embeddings, cached_ids = f.get_tensor("embeddings"), f.get_tensor("item_ids")
    if cached_ids.dtype not in (torch.int64, torch.int32) or cached_ids.ndim != 1:
        raise DataError(f"{path}: item_ids must be a 1-d integer tensor, found {cached_ids.dtype} {tuple(cached_ids.shape)}")
    if embeddings.ndim != 2 or len(embeddings) != len(cached_ids):
        raise DataError(f"{path}: {tuple(embeddings.shape)} embeddings for {len(cached_ids)} item ids")
    wanted = item_ids.tolist() if torch.is_tensor(item_ids) else list(item_ids)
    bad = [i for i in wanted if isinstance(i, bool) or not isinstance(i, (int, np.integer))]
    if bad:
        raise DataError(f"{path}: asked for item id {bad[0]!r} of type {type(bad[0]).__name__}; the cache is keyed "
                        "by integer item ids (a str/int mismatch would silently give all-zero rows)")
    row_of = {}
    for row, i in enumerate(cached_ids.tolist()):
        if i in row_of:
            raise DataError(f"{path}: item id {i} appears twice (rows {row_of[i]} and {row})")
        row_of[i] = row
    missing = [i for i in wanted if int(i) not in row_of]
    if missing:
        raise DataError(f"{path}: {len(missing)} of {len(wanted)} items are not in the cache (e.g. {missing[:5]}); "
                        "rebuild it for this dataset")
    rows = [row_of[int(i)] for i in wanted]
    raw_keys = meta.get("raw_ids")
    if id2item is not None and raw_keys is not None:
        wrong = [i for i, r in zip(wanted, rows) if str(id2item.get(int(i))) != str(raw_keys[r])]
        if wrong:
            i = wrong[0]
            raise DataError(f"{path}: item {i} is {raw_keys[row_of[int(i)]]!r} in the cache but {id2item.get(int(i))!r} "
                            f"in the dataset ({len(wrong)} such items): the cache was made for another dataset")
    out = embeddings[rows].float()
    if not torch.isfinite(out).all():
        raise DataError(f"{path}: non-finite values in the embeddings")
    zero = (out.abs().sum(1) == 0).nonzero().flatten().tolist()
    if zero:
        raise DataError(f"{path}: {len(zero)} all-zero rows (e.g. item {wanted[zero[0]]}): misaligned cache")
    return out, meta


def stale_cache_reason(path, ds, item_model=None, item_text="auto", item_meta=None, pooling="last",
                       max_text_tokens=128, log=print):
    """Why the cache at `path` does not hold these items' texts as embedded by this model and settings (its hash of
    the item texts, the model, pooling, text length), or None when it does. Texts are read again, not embedded."""
    meta = read_cache_metadata(path)
    texts, source, _ = item_texts(ds, item_text, item_meta, log=lambda *_: None)
    wanted = {"model": str(item_model or "default"), "pooling": pooling, "max_text_tokens": max_text_tokens,
              "text_source": source, "data_hash": data_fingerprint(ds, texts)}
    for key, value in wanted.items():
        if meta.get(key) != value:
            what = "the item texts or the data differ" if key == "data_hash" else f"{key} {meta.get(key)!r}, not {value!r}"
            return f"it was made with {what}"
    return None


def build_item_cache(ds, out, item_model=None, item_text="auto", item_meta=None, pooling="last", batch_size=32,
                     max_text_tokens=128, device=None, log=print):
    """Embed all items 1..num_items of `ds` and write the cache; returns its metadata."""
    device = device or torch.device("cpu")
    texts, source, fallbacks = item_texts(ds, item_text, item_meta, log)
    model, resolved = load_base_model(item_model)
    tokenizer = load_tokenizer(resolved)
    model.to(device)
    item_ids = list(range(1, ds.num_items + 1))
    start = time.time()
    embeddings = embed_texts(model, tokenizer, [texts[i] for i in item_ids], pooling, batch_size, max_text_tokens,
                             device)
    seconds = time.time() - start
    metadata = {"model": str(item_model or "default"), "model_path": resolved, "text_source": source,
                "item_meta": str(item_meta) if item_meta else None, "pooling": pooling, "prompt": PROMPT,
                "max_text_tokens": max_text_tokens, "data_dir": str(ds.data_dir), "data_hashes": ds.hashes,
                "data_hash": data_fingerprint(ds, texts), "num_items": ds.num_items,
                "items_without_text": fallbacks, "raw_ids": [str(ds.id2item.get(i, i)) for i in item_ids],
                "seconds": round(seconds, 2), "items_per_second": round(len(item_ids) / max(seconds, 1e-9), 2)}
    save_item_cache(out, embeddings, item_ids, metadata)
    log(f"cached {len(item_ids)} items ({source} text, {pooling} pooling, dim {embeddings.shape[1]}) in "
        f"{seconds:.1f}s = {metadata['items_per_second']} items/s -> {out}")
    return metadata


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data_dir", "--dataset", dest="data_dir", required=True,
                   help="P5-style dataset dir, or a PixelRec root (then also --name)")
    p.add_argument("--name", default=None, help="PixelRec dataset name (dataset/<name>.csv)")
    p.add_argument("--item_pretrain_dir", default=None, help="item LLM: folder, hub id or GGUF (default SmolLM2-135M)")
    p.add_argument("--out", required=True, help="cache file (.safetensors)")
    p.add_argument("--item_text", default="auto", choices=TEXT_SOURCES)
    p.add_argument("--item_meta", default=None, help="Amazon meta_*.json(.gz) or PixelRec information/<name>.csv")
    p.add_argument("--pooling", default="last", choices=("last", "mean"))
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--max_text_tokens", type=int, default=128)
    p.add_argument("--cuda", action="store_true")
    p.add_argument("--seed", type=int, default=2022)
    args = p.parse_args(argv)
    seed_everything(args.seed)
    ds = load_interactions(args.name or args.data_dir, args.data_dir if args.name else None)
    build_item_cache(ds, args.out, args.item_pretrain_dir, args.item_text, args.item_meta, args.pooling,
                     args.batch_size, args.max_text_tokens, pick_device(args.cuda))


if __name__ == "__main__":
    report_user_errors()
    main()
