"""What seq.py, topn.py and exp.py share: flags, loading a trained run with its data, reference rules, results."""
import argparse
import random
import sys
import time
from collections import Counter
from itertools import islice
from pathlib import Path

import numpy as np
import torch

import tasks
from cooccurrence import cooc_scores, cooccurrence
from dataset import load_dataset, renumber_items
from tqdm import tqdm
from transformers import LogitsProcessorList

from metrics import rank_by_score, rank_of, ranking_metrics
from module import ItemTrie, TrieConstraint, load_checkpoint, parse_item
from utils import atomic_write_json, bf16_supported, pick_device, seed_everything, versions


def parser(description, beams=False):
    """The flags every evaluation script takes; beams=True adds the ranking scripts' --num_beams and --top_k."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--data_dir", required=True, help="dataset dir the checkpoint was trained on")
    p.add_argument("--checkpoint", required=True, help="dir written by pretrain.py")
    p.add_argument("--cuda", action="store_true")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--protocol", choices=["paper", "clean"], default="clean",
                   help="paper: unconstrained beams as the original code (an invalid id is a miss); "
                        "clean: only valid, not-yet-bought items")
    p.add_argument("--users", type=int, default=0, help="evaluate a seeded random sample of N users (0: all)")
    p.add_argument("--seed", type=int, default=1)
    if beams:
        p.add_argument("--num_beams", type=int, default=20, help="beam search width (top-N: paper protocol only)")
        p.add_argument("--top_k", type=int, default=10, help="length of each generated recommendation list")
    return p


def load_run(args):
    """The trained model, its tokenizer and metadata, and the dataset with the checkpoint's item ids."""
    seed_everything(args.seed)
    device = pick_device(args.cuda)
    model, tokenizer, meta = load_checkpoint(args.checkpoint, device)
    ds = load_dataset(args.data_dir, log=lambda m: print(m, file=sys.stderr))
    changed = [f for f, h in meta.get("data_hashes", {}).items() if ds.hashes.get(f) != h]
    if changed:
        print(f"warning: {', '.join(changed)} in {args.data_dir} differ from the files the model was trained on",
              file=sys.stderr)
    ds = renumber_items(ds, meta.get("item_map"))
    encoder = tasks.WordEncoder(tokenizer)
    encoder.add(tasks.id_words(ds))
    return model, tokenizer, meta, ds, encoder, device


def eval_users(ds, n, seed):
    """All users, or a seeded random sample (never the head of the file: P5 files list users in id-creation order)."""
    if not n or n >= len(ds.users):
        return list(ds.users)
    return sorted(random.Random(f"{seed}-users").sample(ds.users, n))


def batches(items, size):
    for i in range(0, len(items), size):
        yield items[i:i + size]


# ---------------------------------------------------------------------------------------------------- reference rules
# No-training rules on the same split and ids, printed beside the model: most-popular (popularity counted on the
# training parts only); co-occurrence (items bought together with the user's last items in the training parts,
# cooccurrence.py), a much stronger rule on Amazon data; and "max(history)+1, +2, ...", which scores well only when
# ids leak the order of appearance.

def popularity(ds):
    return Counter(i for u in ds.users for i in ds.train_items(u))


def popular_next(ds, user, pop_order, k=10):
    bought = set(ds.sequences[user][:-1])
    return list(islice((i for i in pop_order if i not in bought), k))


def next_ids(ds, user, k=10):
    bought = set(ds.sequences[user][:-1])
    out, i = [], max(ds.sequences[user][:-1]) + 1
    while len(out) < k and i <= ds.num_items:
        if i not in bought:
            out.append(i)
        i += 1
    return out


def cooc_rule(ds, pop):
    """The co-occurrence rule as user -> every item's score. Popularity, scaled below the smallest co-occurrence
    weight, breaks ties: a user whose last items co-occur with nothing gets the most-popular list."""
    counts = cooccurrence(ds)
    tie_break = np.array([pop.get(i, 0) for i in range(ds.num_items + 1)], dtype=float)
    tie_break *= 1e-3 / (tie_break.max() + 1)
    return lambda user: cooc_scores(counts, ds.sequences[user][:-1]) + tie_break


def cooc_next(ds, user, cooc, k=10):
    scores = cooc(user)
    scores[0] = -np.inf
    scores[list(set(ds.sequences[user][:-1]))] = -np.inf
    return np.argsort(-scores, kind="stable")[:k].tolist()


def reference_sequential(ds, users, k=10):
    pop = popularity(ds)
    pop_order = [i for i, _ in pop.most_common()] + [i for i in range(1, ds.num_items + 1) if i not in pop]
    cooc = cooc_rule(ds, pop)
    return {
        "most_popular": ranking_metrics(rank_of(ds.test_item(u), popular_next(ds, u, pop_order, k)) for u in users),
        "co_occurrence": ranking_metrics(rank_of(ds.test_item(u), cooc_next(ds, u, cooc, k)) for u in users),
        "max_history_plus_1": ranking_metrics(rank_of(ds.test_item(u), next_ids(ds, u, k)) for u in users),
    }


def topn_reference_scores(ds, user, candidates, pop, cooc):
    """Scores of the reference rules for one user's candidates (higher = ranked first); cooc: cooc_rule(ds, pop)."""
    top = max(ds.sequences[user][:-1])
    item_scores = cooc(user)
    return {"most_popular": [pop.get(c, 0) for c in candidates],
            "co_occurrence": [float(item_scores[c]) for c in candidates],
            "max_history_plus_1": [(ds.num_items + 1 - c) if c > top else 0 for c in candidates]}


# ---------------------------------------------------------------------------------------------------- results

def print_table(rows, title):
    """rows: {name: {metric: value}} -> an aligned text table."""
    metrics = list(next(iter(rows.values())))
    width = max(len(n) for n in rows) + 2
    print(f"\n{title}")
    print(" " * width + "".join(f"{m:>10}" for m in metrics))
    for name, row in rows.items():
        print(f"{name:<{width}}" + "".join(f"{row[m]:>10.4f}" for m in metrics))


def write_results(args, name, meta, ds, users, results, started):
    path = Path(args.checkpoint) / f"results_{name}{'' if args.protocol == 'clean' else '_paper'}.json"
    atomic_write_json(path, {
        "task": name, "protocol": args.protocol, "users": len(users), "all_users": len(ds.users),
        "item_ids": meta.get("item_ids", "published"), "results": results, "seconds": time.time() - started,
        "config": vars(args), "train_config": meta.get("args"), "backbone": meta.get("backbone"),
        "data_hashes": ds.hashes, "versions": versions()})
    print(f"\nwritten {path}")
    return path


def decode_items(tokenizer, sequences, per_user):
    """Generated token ids -> per-user lists of item ids (None where the text is not a valid id)."""
    texts = tokenizer.batch_decode(sequences, skip_special_tokens=True)
    items = [parse_item(t) for t in texts]
    lists = [items[i:i + per_user] for i in range(0, len(items), per_user)]
    # a repeat (two token paths to one id, or a beam kept alive with nothing left to choose) holds no new item
    return [[item if item not in row[:k] else None for k, item in enumerate(row)] for row in lists]


def item_trie(encoder, ds):
    """The trie of every item's target tokens (its cached word pieces + eos)."""
    encoder.add([tasks.item_word(i) for i in range(1, ds.num_items + 1)])
    return ItemTrie({i: encoder.item_target(i) for i in range(1, ds.num_items + 1)})


def list_quality(lists, ds, users, num_items):
    """How many top-k lists hold an invalid id, a duplicate, or an item the user already bought."""
    invalid = dup = bought = 0
    for items, u in zip(lists, users):
        valid = [i for i in items if i is not None and 1 <= i <= num_items]
        invalid += len(valid) < len(items)
        dup += len(set(valid)) < len(valid)
        bought += bool(set(valid) & set(ds.sequences[u][:-1]))
    return {"lists_with_invalid_id": invalid, "lists_with_duplicate": dup, "lists_with_bought_item": bought}


def recommend_next(model, tokenizer, encoder, ds, users, protocol="clean", num_beams=20, top_k=10, batch_size=32,
                   seed=1, progress=True):
    """Top-k next-item lists (item ids, None for an invalid id) for each user's test step."""
    device = model.device
    trie = item_trie(encoder, ds)
    max_len = max(len(path) for path in trie.paths.values())
    rng = random.Random(seed)
    lists = []
    for chunk in tqdm(list(batches(users, batch_size)), desc="seq", dynamic_ncols=True, disable=not progress):
        samples = [tasks.sequential_sample(ds, u, rng, "test") for u in chunk]
        batch = tasks.to_device(tasks.collate(tasks.encode_samples(encoder, samples), tasks.TASKS.index("sequential")),
                                device)
        constraint = []
        if protocol == "clean":
            banned = [trie.banned_children(ds.sequences[u][:-1]) for u in chunk]
            constraint = [TrieConstraint(trie, banned, num_beams, tokenizer.eos_token_id)]
        with autocast(device):
            out = model.generate(batch, num_beams=num_beams, num_return_sequences=top_k, max_new_tokens=max_len,
                                 logits_processor=LogitsProcessorList(constraint))
        lists += decode_items(tokenizer, out, top_k)
    return lists


def rank_topn(model, tokenizer, encoder, ds, users, protocol="clean", num_beams=20, top_k=10, batch_size=32, seed=1,
              progress=True):
    """Rank of each user's test item among its 100 candidates (None: not in the generated top-k, paper protocol),
    and the ranks the reference rules give on the same candidates."""
    device = model.device
    rng = random.Random(seed)
    pop = popularity(ds)
    cooc = cooc_rule(ds, pop)
    task_id = tasks.TASKS.index("topn")
    ranks, reference_ranks = [], {}
    for chunk in tqdm(list(batches(users, batch_size)), desc="topn", dynamic_ncols=True, disable=not progress):
        candidates = [tasks.topn_candidates(ds, u, rng, "test") for u in chunk]     # positive first
        samples = [tasks.topn_sample(ds, u, rng, "test", c) for u, c in zip(chunk, candidates)]
        batch = tasks.to_device(tasks.collate(tasks.encode_samples(encoder, samples), task_id), device)
        with autocast(device):
            if protocol == "paper":
                out = model.generate(batch, num_beams=num_beams, num_return_sequences=top_k)
                ranks += [rank_of(c[0], items) for c, items in zip(candidates, decode_items(tokenizer, out, top_k))]
            else:
                labels = [[encoder.item_target(i) for i in c] for c in candidates]
                L = max(len(t) for c in labels for t in c)
                label_tensor = torch.full((len(chunk), len(candidates[0]), L), -100, dtype=torch.long)
                for b, c in enumerate(labels):
                    for j, t in enumerate(c):
                        label_tensor[b, j, :len(t)] = torch.tensor(t)
                scores = model.score_candidates(batch, label_tensor.to(device)).cpu()
                ranks += [rank_by_score(s.tolist(), 0) for s in scores]
        for u, c in zip(chunk, candidates):
            for rule, s in topn_reference_scores(ds, u, c, pop, cooc).items():
                reference_ranks.setdefault(rule, []).append(rank_by_score(s, 0))
    return ranks, reference_ranks


def autocast(device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16_supported(device))
