"""What seq.py, topn.py and exp.py share: flags, loading a trained run with its data, reference rules, results."""
import argparse
import dataclasses
import json
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
from transformers import LogitsProcessorList

from metrics import rank_by_score, rank_of, ranking_metrics
from module import ItemTrie, TrieConstraint, load_checkpoint, parse_item
from utils import UserError, atomic_write_json, bf16_supported, pick_device, progress_bar, seed_everything, versions


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
    if meta.get("item_codes"):
        encoder.set_item_codes({i: c for i, c in enumerate(meta["item_codes"], 1)})
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


def history_before(ds, user, split="test"):
    """The user's items before the `split` item (test: all but the last; val: all but the last two)."""
    return ds.sequences[user][:-1] if split == "test" else ds.sequences[user][:-2]


def popular_next(ds, user, pop_order, k=10, split="test"):
    bought = set(history_before(ds, user, split))
    return list(islice((i for i in pop_order if i not in bought), k))


def next_ids(ds, user, k=10, split="test"):
    history = history_before(ds, user, split)
    bought = set(history)
    out, i = [], max(history) + 1
    while len(out) < k and i <= ds.num_items:
        if i not in bought:
            out.append(i)
        i += 1
    return out


def cooc_rule(ds, pop):
    """The co-occurrence rule as (user, split) -> every item's score. Popularity, scaled below the smallest
    co-occurrence weight, breaks ties: a user whose last items co-occur with nothing gets the most-popular list."""
    counts = cooccurrence(ds)
    tie_break = np.array([pop.get(i, 0) for i in range(ds.num_items + 1)], dtype=float)
    tie_break *= 1e-3 / (tie_break.max() + 1)
    return lambda user, split="test": cooc_scores(counts, history_before(ds, user, split)) + tie_break


def cooc_next(ds, user, cooc, k=10, split="test"):
    scores = cooc(user, split)
    scores[0] = -np.inf
    scores[list(set(history_before(ds, user, split)))] = -np.inf
    return np.argsort(-scores, kind="stable")[:k].tolist()


def recent_popularity(ds):
    """How often each item is the last item of a training part: Amazon's popularity drifts in time, and what was bought
    most recently is a stronger constant list than all-time popularity (beauty test HR@10 .0167 against .0115)."""
    return Counter(ds.train_items(u)[-1] for u in ds.users)


def popularity_order(ds, pop):
    """Items by descending count, then the never-counted ones by the all-time popularity."""
    rest = popularity(ds)
    return [i for i, _ in pop.most_common()] + sorted((i for i in range(1, ds.num_items + 1) if i not in pop),
                                                      key=lambda i: -rest.get(i, 0))


def reference_lists(ds, users, k=10, split="test"):
    """{rule: top-k lists} of the no-training rules for each user's `split` step (popularity and co-occurrence are
    always counted on the training parts)."""
    pop = popularity(ds)
    pop_order, recent_order = popularity_order(ds, pop), popularity_order(ds, recent_popularity(ds))
    cooc = cooc_rule(ds, pop)
    return {"most_popular": [popular_next(ds, u, pop_order, k, split) for u in users],
            "recent_popular": [popular_next(ds, u, recent_order, k, split) for u in users],
            "co_occurrence": [cooc_next(ds, u, cooc, k, split) for u in users],
            "max_history_plus_1": [next_ids(ds, u, k, split) for u in users]}


def reference_sequential(ds, users, k=10, split="test"):
    target = ds.test_item if split == "test" else ds.val_item
    return {rule: ranking_metrics(rank_of(target(u), items) for u, items in zip(users, lists))
            for rule, lists in reference_lists(ds, users, k, split).items()}


def personalisation(lists, popular_lists, num_items):
    """How much the top-k lists differ between users: the share of distinct lists, item coverage (share of the
    catalogue in at least one list) and the mean share of a list that is also in the user's most-popular list."""
    valid = [[i for i in items if i is not None] for items in lists]
    overlap = [len(set(a) & set(b)) / max(1, len(b)) for a, b in zip(valid, popular_lists)]
    return {"distinct_lists": len({tuple(v) for v in valid}) / len(valid),
            "item_coverage": len({i for v in valid for i in v}) / num_items,
            "overlap_with_most_popular": float(np.mean(overlap))}


def swapped_histories(ds, users, seed):
    """A copy of `ds` in which each of `users` has another of them's sequence (a seeded derangement)."""
    rng = random.Random(f"{seed}-swap")
    partner = list(users)
    while len(users) > 1 and any(a == b for a, b in zip(users, partner)):
        rng.shuffle(partner)
    sequences = dict(ds.sequences)
    sequences.update({u: ds.sequences[v] for u, v in zip(users, partner)})
    return dataclasses.replace(ds, sequences=sequences)


def input_sensitivity(rank_fn, ds, users, n=500, seed=1):
    """Share of a seeded sample of users whose top-k list changes when their history is replaced by another user's.
    rank_fn(ds, users) -> lists, with no bought items excluded (otherwise the lists would change through the
    exclusion alone, even for a model that ignores its input)."""
    sample = sorted(random.Random(f"{seed}-sensitivity").sample(users, min(n, len(users))))
    if len(sample) < 2:
        return float("nan")
    before = rank_fn(ds, sample)
    after = rank_fn(swapped_histories(ds, sample, seed), sample)
    return float(np.mean([a != b for a, b in zip(before, after)]))


def personalisation_warning(figures, history_rule=None):
    """A loud line when the model's lists barely depend on the user: fewer than half of them change when the
    history is swapped, or fewer distinct lists than half the share a history-driven rule (co-occurrence) makes on
    the same users (a small catalogue allows few distinct lists, so the share alone says little)."""
    sensitivity = figures.get("input_sensitivity", 1.0)
    floor = 0.5 * (history_rule or {}).get("distinct_lists", 1.0)
    if sensitivity < 0.5 or figures["distinct_lists"] < floor:
        return (f"WARNING: the model's lists barely depend on the user: {figures['distinct_lists']:.1%} distinct lists "
                f"(co-occurrence: {2 * floor:.1%}), {sensitivity:.1%} change when the history is swapped")
    return None


def recent_scores(ds, pop):
    """Item -> recent popularity, all-time popularity breaking its ties (for ranking candidates)."""
    scale = max(pop.values(), default=0) + 1
    recent = recent_popularity(ds)
    return {i: recent.get(i, 0) + pop.get(i, 0) / scale for i in range(1, ds.num_items + 1)}


def topn_reference_scores(ds, user, candidates, pop, cooc, recent=None):
    """Scores of the reference rules for one user's candidates (higher = ranked first); cooc: cooc_rule(ds, pop);
    recent: recent_scores(ds, pop)."""
    top = max(ds.sequences[user][:-1])
    item_scores = cooc(user)
    recent = recent or recent_scores(ds, pop)
    return {"most_popular": [pop.get(c, 0) for c in candidates],
            "recent_popular": [recent[c] for c in candidates],
            "co_occurrence": [float(item_scores[c]) for c in candidates],
            "max_history_plus_1": [(ds.num_items + 1 - c) if c > top else 0 for c in candidates]}


# ---------------------------------------------------------------------------------------------------- results

def print_table(rows, title):
    """rows: {name: {metric: value}} -> an aligned text table (a metric a row lacks shows as -)."""
    metrics = list(dict.fromkeys(m for row in rows.values() for m in row))
    width = max(len(n) for n in rows) + 2
    cols = [max(10, len(m) + 2) for m in metrics]
    print(f"\n{title}")
    print(" " * width + "".join(f"{m:>{c}}" for m, c in zip(metrics, cols)))
    for name, row in rows.items():
        print(f"{name:<{width}}" + "".join(f"{row[m]:>{c}.4f}" if m in row else f"{'-':>{c}}"
                                           for m, c in zip(metrics, cols)))


def training_summary(checkpoint, meta):
    """The checkpoint's training, for tables: the validation it was chosen at and the whole run's minutes."""
    log = Path(checkpoint) / "train_log.json"
    history = json.loads(log.read_text()) if log.exists() else []
    best = meta.get("best") or {}
    return {"best_epoch": best.get("epoch"), "best_step": best.get("step"), "minutes_at_best": best.get("minutes"),
            "minutes": history[-1]["minutes"] if history else None, "validations": len(history)}


def write_results(args, name, meta, ds, users, results, started, ranks=None, reference_ranks=None):
    """results_{name}[_paper].json in the checkpoint dir; ranks: the model's 0-based rank of each user's held-out
    item (-1: not in its list), in the order of `user_ids`, and reference_ranks the same for each reference rule,
    for paired comparisons (scripts/repeat.py compare) without a rerun."""
    path = Path(args.checkpoint) / f"results_{name}{'' if args.protocol == 'clean' else '_paper'}.json"
    per_user = {} if ranks is None else {"user_ids": list(users), "ranks": [-1 if r is None else r for r in ranks]}
    if reference_ranks:
        per_user["reference_ranks"] = {rule: [-1 if r is None else r for r in rs] for rule, rs in reference_ranks.items()}
    atomic_write_json(path, {
        "task": name, "protocol": args.protocol, "users": len(users), "all_users": len(ds.users),
        "item_ids": meta.get("item_ids", "published"), "results": results, "seconds": time.time() - started,
        "config": vars(args), "train_config": meta.get("args"), "backbone": meta.get("backbone"),
        "training": training_summary(args.checkpoint, meta),
        "data_hashes": ds.hashes, "versions": versions(), **per_user})
    print(f"\nwritten {path}")
    return path


def decode_items(tokenizer, sequences, per_user, item_of=None):
    """Generated token ids -> per-user lists of item ids (None where they are not a valid id). item_of: {token tuple:
    item} (WordEncoder.item_of_tokens) reads ids and codes directly; other token paths are read as text."""
    items = []
    for row in sequences.tolist():
        if tokenizer.eos_token_id in row:
            row = row[:row.index(tokenizer.eos_token_id)]
        tokens = tuple(t for t in row if t != tokenizer.pad_token_id)      # the decoder start token is pad
        item = (item_of or {}).get(tokens)
        items.append(item if item is not None else parse_item(tokenizer.decode(tokens, skip_special_tokens=True)))
    lists = [items[i:i + per_user] for i in range(0, len(items), per_user)]
    # a repeat (two token paths to one id, or a beam kept alive with nothing left to choose) holds no new item
    return [[item if item not in row[:k] else None for k, item in enumerate(row)] for row in lists]


def item_trie(encoder, ds, eos=True):
    """The trie of every item's target tokens: its cached word pieces + eos (eos=False: --history decoder, where an
    item is followed by the next item, so item token sequences must be prefix-free: one token, or codes of one
    length)."""
    encoder.add([tasks.item_word(i) for i in range(1, ds.num_items + 1)])
    paths = {i: encoder.item_target(i) if eos else encoder.item_tokens(i) for i in range(1, ds.num_items + 1)}
    trie = ItemTrie(paths)
    if not eos and any(trie.children.get(tuple(p)) for p in paths.values()):
        raise UserError("--history decoder needs item ids whose tokens are prefix-free (--id_tokens atomic, or "
                        "fixed-length codes); with sub-word pieces one id can be the start of another")
    return trie


def decoder_prefixes(encoder, ds, users, split, device):
    """--history decoder: each user's history before the `split` item as decoder input ([start] + item tokens),
    left-padded to one length (T5's relative positions make the padding invisible behind the mask)."""
    rows = []
    for u in users:
        history = history_before(ds, u, split)[-tasks.HISTORY_LEN:]
        rows.append([encoder.pad] + [t for i in history for t in encoder.item_tokens(i)])
    P = max(len(r) for r in rows)
    ids = torch.full((len(rows), P), encoder.pad, dtype=torch.long)
    mask = torch.zeros(len(rows), P, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, P - len(r):] = torch.tensor(r)
        mask[b, P - len(r):] = 1
    return ids.to(device), mask.to(device)


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
                   seed=1, progress=True, history="encoder", split="test", exclude_bought=True):
    """Top-k next-item lists (item ids, None for an invalid id) for each user's `split` step (test, or val: the
    history then ends before the validation item). history: where the model reads it (tasks.HISTORY_PLACES).
    exclude_bought=False: the clean protocol's valid ids, bought ones included (the model's raw preference)."""
    device = model.device
    trie = item_trie(encoder, ds, eos=history == "encoder")
    max_len = max(len(path) for path in trie.paths.values())
    if history == "decoder" and max_len == 1 and protocol == "clean":
        return rank_next_items(model, encoder, ds, users, top_k, batch_size, progress, split, exclude_bought)
    rng = random.Random(seed)
    item_of = encoder.item_of_tokens(ds.num_items)
    lists = []
    for chunk in progress_bar(list(batches(users, batch_size)), desc="seq", disable=not progress):
        samples = [tasks.sequential_sample(ds, u, rng, split, history) for u in chunk]
        batch = tasks.to_device(tasks.collate(tasks.encode_samples(encoder, samples), tasks.TASKS.index("sequential")),
                                device)
        batch.pop("decoder_input_ids", None)
        kwargs, start = {}, 1
        if history == "decoder":
            kwargs["decoder_input_ids"], kwargs["decoder_attention_mask"] = decoder_prefixes(encoder, ds, chunk, split,
                                                                                            device)
            start = kwargs["decoder_input_ids"].shape[1]
        constraint = []
        if protocol == "clean":
            banned = [trie.banned_children(history_before(ds, u, split) if exclude_bought else ()) for u in chunk]
            constraint = [TrieConstraint(trie, banned, num_beams, tokenizer.eos_token_id, start)]
        with autocast(device):
            out = model.generate(batch, num_beams=num_beams, num_return_sequences=top_k, max_new_tokens=max_len,
                                 logits_processor=LogitsProcessorList(constraint), **kwargs)
        lists += decode_items(tokenizer, out[:, start:] if history == "decoder" else out, top_k, item_of)
    return lists


def next_item_scores(model, encoder, ds, users, split="test"):
    """--history decoder with one-token item ids: log p(item | user, history) of every item (column i-1: item i)
    for each user, as a (len(users), num_items) tensor."""
    device = model.device
    rng = random.Random(0)        # the evaluation template is fixed: nothing is drawn
    samples = [tasks.sequential_sample(ds, u, rng, split, "decoder") for u in users]
    batch = tasks.to_device(tasks.collate(tasks.encode_samples(encoder, samples), tasks.TASKS.index("sequential")),
                            device)
    batch.pop("decoder_input_ids")
    prefix, prefix_mask = decoder_prefixes(encoder, ds, users, split, device)
    with autocast(device):
        logp = model.next_token_logprobs(batch, prefix, prefix_mask)
    tokens = torch.tensor(encoder.single_item_tokens(ds.num_items), device=device)
    return logp[:, tokens]


def rank_next_items(model, encoder, ds, users, top_k=10, batch_size=32, progress=True, split="test",
                    exclude_bought=True):
    """The clean protocol's top-k for one-token item ids read in the decoder: every item ranked by its likelihood,
    bought items (before the `split` item) excluded. Equals 20-beam search's top 10, in one decoder pass."""
    lists = []
    for chunk in progress_bar(list(batches(users, batch_size)), desc="seq", disable=not progress):
        scores = next_item_scores(model, encoder, ds, chunk, split)
        for b, u in enumerate(chunk):
            if exclude_bought:
                scores[b, [i - 1 for i in set(history_before(ds, u, split))]] = float("-inf")
        values, index = scores.topk(min(top_k, ds.num_items), dim=1)
        lists += [[i + 1 if v > float("-inf") else None for v, i in zip(vs, ix)]     # None: nothing left to rank
                  for vs, ix in zip(values.tolist(), index.tolist())]
    return lists


def rank_topn(model, tokenizer, encoder, ds, users, protocol="clean", num_beams=20, top_k=10, batch_size=32, seed=1,
              progress=True, history="encoder", history_ds=None):
    """Each user's test item among its 100 candidates: its rank (None: not in the generated top-k, paper protocol),
    the model's top-k candidates, and the ranks the reference rules give on the same candidates.
    history="decoder": the decoder reads the user's history before the candidate (from history_ds's sequences when
    given: a copy with swapped histories measures how much the lists depend on them; candidates stay the user's)."""
    device = model.device
    rng = random.Random(seed)
    pop = popularity(ds)
    recent = recent_scores(ds, pop)
    cooc = cooc_rule(ds, pop)
    task_id = tasks.TASKS.index("topn")
    item_of = encoder.item_of_tokens(ds.num_items)
    item_len = max(len(tokens) for tokens in item_of)
    ranks, lists, reference_ranks = [], [], {}
    for chunk in progress_bar(list(batches(users, batch_size)), desc="topn", disable=not progress):
        candidates = [tasks.topn_candidates(ds, u, rng, "test") for u in chunk]     # positive first
        samples = [tasks.topn_sample(ds, u, rng, "test", c) for u, c in zip(chunk, candidates)]
        batch = tasks.to_device(tasks.collate(tasks.encode_samples(encoder, samples), task_id), device)
        prefix = {}
        if history == "decoder":
            prefix = dict(zip(("decoder_prefix", "prefix_mask"),
                              decoder_prefixes(encoder, history_ds or ds, chunk, "test", device)))
        with autocast(device):
            if protocol == "paper":
                # in the decoder an item is followed by the next item, not by eos: generate one item's tokens
                kwargs = {"decoder_input_ids": prefix["decoder_prefix"],
                          "decoder_attention_mask": prefix["prefix_mask"], "max_new_tokens": item_len} if prefix else {}
                out = model.generate(batch, num_beams=num_beams, num_return_sequences=top_k, **kwargs)
                if prefix:
                    out = out[:, prefix["decoder_prefix"].shape[1]:]
                generated = decode_items(tokenizer, out, top_k, item_of)
                ranks += [rank_of(c[0], items) for c, items in zip(candidates, generated)]
                lists += generated
            else:
                eos = history == "encoder"       # in the decoder an item is followed by the next one, not by eos
                labels = [[encoder.item_target(i) if eos else encoder.item_tokens(i) for i in c] for c in candidates]
                L = max(len(t) for c in labels for t in c)
                label_tensor = torch.full((len(chunk), len(candidates[0]), L), -100, dtype=torch.long)
                for b, c in enumerate(labels):
                    for j, t in enumerate(c):
                        label_tensor[b, j, :len(t)] = torch.tensor(t)
                scores = model.score_candidates(batch, label_tensor.to(device), **prefix).cpu()
                ranks += [rank_by_score(s.tolist(), 0) for s in scores]
                order = scores.argsort(dim=1, descending=True, stable=True)[:, :top_k]
                lists += [[c[j] for j in row] for c, row in zip(candidates, order.tolist())]
        for u, c in zip(chunk, candidates):
            for rule, s in topn_reference_scores(ds, u, c, pop, cooc, recent).items():
                reference_ranks.setdefault(rule, []).append(rank_by_score(s, 0))
    return ranks, lists, reference_ranks


def topn_popular_lists(ds, users, top_k=10):
    """Each user's test candidates ordered by training popularity: the most-popular rule's top-N lists."""
    pop = popularity(ds)
    return [sorted([ds.test_item(u)] + ds.negatives[u], key=lambda i: -pop.get(i, 0))[:top_k] for u in users]


def autocast(device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16_supported(device))
