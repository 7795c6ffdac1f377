"""What seq.py, topn.py, exp.py and pretrain.py share about the T5: flags, loading a trained run with its data, the
model's scores and lists for ranking.py (the evaluation core), how personal its lists are, its results file."""
import argparse
import dataclasses
import json
import random
import sys
from pathlib import Path

import numpy as np
import torch

import tasks
from dataset import load_dataset, renumber_items
from metrics import rouge_per_text
from module import ItemTrie, TrieConstraint, load_checkpoint, parse_item, task_best_dir
from ranking import (RULE_NAMES, candidate_scores, curve_users, eval_cases, list_scores, rank_targets, rule_scores,
                     top_lists)
from results import write_results
from transformers import LogitsProcessorList
from utils import UserError, bf16_supported, pick_device, progress_bar, seed_everything


def parser(description, beams=False):
    """The flags every evaluation script takes; beams=True adds the ranking scripts' --protocol, --num_beams and
    --top_k."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--data_dir", required=True, help="dataset dir the checkpoint was trained on")
    p.add_argument("--checkpoint", required=True, help="the run's folder, written by pretrain.py")
    p.add_argument("--cuda", action="store_true")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--users", type=int, default=0, help="evaluate a seeded random sample of N users (0: all)")
    p.add_argument("--seed", type=int, default=1)
    if beams:
        p.add_argument("--protocol", choices=["paper", "clean"], default="clean",
                       help="clean: every item ranked by ranking.py, bought items excluded (beams constrained to "
                            "valid, not-yet-bought ids where the model writes lists); paper: unconstrained beams as "
                            "the original code, nothing excluded (an invalid id is a miss)")
        p.add_argument("--num_beams", type=int, default=20, help="beam search width (top-N: paper protocol only)")
        p.add_argument("--top_k", type=int, default=10,
                       help="length of each recommendation list (how personal the lists are; with beams, how far "
                            "the ranks reach: figures past it are not recorded)")
    return p


def task_checkpoint(checkpoint, task):
    """The folder `task`'s evaluation reads its model from, said on stdout: best_<task>/ where pretrain.py kept one
    (a multi-task run in which the task peaked at another validation than the top-level model), else the run's
    folder (the best model by --stop_on)."""
    own = task_best_dir(checkpoint, task)
    if (own / "model.safetensors").exists():
        print(f"model: {own} (the {task} task's own best validation)")
        return own
    print(f"model: {checkpoint} (the run's best model by its --stop_on figure)")
    return Path(checkpoint)


def load_run(args, model_dir=None):
    """The trained model, its tokenizer and metadata, and the dataset with the checkpoint's item ids. model_dir: the
    folder to read the model from (task_checkpoint), by default the run's folder, --checkpoint."""
    seed_everything(args.seed)
    device = pick_device(args.cuda)
    model, tokenizer, meta = load_checkpoint(model_dir or args.checkpoint, device)
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


def sequential_curve_users(ds, rank_users, seed):
    """pretrain.py's --rank_users sample of users able to give a sequential sample: their validation ranking draws
    the learning curve and chooses the checkpoint."""
    return curve_users(tasks.trainable_users(ds, "sequential"), rank_users, seed)


def checkpoint_curve_users(ds, meta):
    """The users whose validation ranking chose a checkpoint (pretrain.py's --rank_users sample, the same draw): on
    them the kept model's figure is the best of many validations, so a fair validation comparison leaves them out."""
    train_args = meta.get("args") or {}
    sequential_share = int(train_args.get("ratio", "0:0").split(":")[1])      # --ratio: explanation:sequential:...
    if not train_args.get("rank_users") or not sequential_share:
        return set()
    return set(sequential_curve_users(ds, train_args["rank_users"], train_args["seed"]))


def batches(items, size):
    for i in range(0, len(items), size):
        yield items[i:i + size]


# ---------------------------------------------------------------------------------------------------- lists

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


# ---------------------------------------------------------------------------------------------------- results

def training_summary(checkpoint, meta):
    """The checkpoint's training, for tables: the validation it was chosen at and the whole run's minutes."""
    log = Path(checkpoint) / "train_log.json"
    history = json.loads(log.read_text()) if log.exists() else []
    best = meta.get("best") or {}
    ranked = [h for h in history if h.get("val_ranking")]
    return {"best_epoch": best.get("epoch"), "best_step": best.get("step"), "minutes_at_best": best.get("minutes"),
            "minutes": history[-1]["minutes"] if history else None, "validations": len(history),
            # the learning curve (the ranked validation users) and the rules on the same users, for compare.py
            "log": [{"epoch": h["epoch"], "minutes": h["minutes"], "val_NDCG@10": h["val_ranking"]["NDCG@10"]}
                    for h in ranked],
            "val_rules": {rule: f["NDCG@10"] for rule, f in (ranked[0].get("reference_ranking") or {}).items()}
            if ranked else {}}


def write_run_results(args, task, meta, ds, users, started, suffix="", **fields):
    """results_{task}[_paper][suffix].json in the checkpoint dir, in the one results format (results.py)."""
    paper = getattr(args, "protocol", "clean") == "paper"
    path = Path(args.checkpoint) / f"results_{task}{'_paper' if paper else ''}{suffix}.json"
    return write_results(path, task=task, ds=ds, users=users, started=started,
                         item_ids=meta.get("item_ids", "published"),
                         training=training_summary(args.checkpoint, meta), config=vars(args),
                         train_config=meta.get("args"), backbone=meta.get("backbone"), **fields)


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
        history = eval_cases(ds, split, [u])[1][0][-tasks.HISTORY_LEN:]
        rows.append([encoder.pad] + [t for i in history for t in encoder.item_tokens(i)])
    P = max(len(r) for r in rows)
    ids = torch.full((len(rows), P), encoder.pad, dtype=torch.long)
    mask = torch.zeros(len(rows), P, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, P - len(r):] = torch.tensor(r)
        mask[b, P - len(r):] = 1
    return ids.to(device), mask.to(device)


def list_quality(lists, ds, users, num_items, split="test"):
    """How many top-k lists hold an invalid id, a duplicate, or an item the user already bought (before the `split`
    item)."""
    invalid = dup = bought = 0
    _, histories, _ = eval_cases(ds, split, users)
    for items, history in zip(lists, histories):
        valid = [i for i in items if i is not None and 1 <= i <= num_items]
        invalid += len(valid) < len(items)
        dup += len(set(valid)) < len(valid)
        bought += bool(set(valid) & set(history))
    return {"lists_with_invalid_id": invalid, "lists_with_duplicate": dup, "lists_with_bought_item": bought}


def full_ranking(history, encoder, ds, protocol="clean"):
    """True where the model scores every item in one pass: one-token item ids read in the decoder (the learn
    recipe), clean protocol. Otherwise (history in the encoder, item codes, the paper protocol) it writes beam lists."""
    return history == "decoder" and protocol == "clean" and encoder.single_item_tokens(ds.num_items) is not None


def rank_next(model, tokenizer, encoder, ds, users, protocol="clean", num_beams=20, top_k=10, batch_size=32, seed=1,
              progress=True, history="encoder", split="test", name_user=True):
    """(ranks, top-k lists, list length) of each user's `split` item (test, or val: the history then ends before
    the validation item), ranked by ranking.rank_targets. Full ranking where the model scores every item
    (list length None); else its beam lists (clean: constrained to valid, not-yet-bought ids; paper: unconstrained,
    nothing excluded), scored by ranking.list_scores (list length top_k). name_user: whether the prompt names the
    user (the run's --name_user)."""
    _, histories, targets = eval_cases(ds, split, users)
    if full_ranking(history, encoder, ds, protocol):
        ranks, lists = [], []
        for start in progress_bar(range(0, len(users), batch_size), desc="seq", disable=not progress):
            h, t = histories[start:start + batch_size], targets[start:start + batch_size]
            scores = next_item_scores(model, encoder, ds, users[start:start + batch_size], split, name_user)
            ranks += rank_targets(scores, h, t)
            lists += top_lists(scores, h, top_k)
        return ranks, lists, None
    lists = recommend_next(model, tokenizer, encoder, ds, users, protocol, num_beams, top_k, batch_size, seed,
                           progress, history, split, name_user=name_user)
    excluded = histories if protocol == "clean" else [()] * len(users)
    return rank_targets(list_scores(lists, ds.num_items), excluded, targets), lists, top_k


def recommend_next(model, tokenizer, encoder, ds, users, protocol="clean", num_beams=20, top_k=10, batch_size=32,
                   seed=1, progress=True, history="encoder", split="test", exclude_bought=True, name_user=True):
    """Top-k next-item lists (item ids, None for an invalid id) for each user's `split` step. history: where the
    model reads it (tasks.HISTORY_PLACES). exclude_bought=False: the clean protocol's valid ids, bought ones included
    (the model's raw preference, for the history-swap test)."""
    device = model.device
    _, histories, _ = eval_cases(ds, split, users)
    if full_ranking(history, encoder, ds, protocol):
        lists = []
        for start in progress_bar(range(0, len(users), batch_size), desc="seq", disable=not progress):
            scores = next_item_scores(model, encoder, ds, users[start:start + batch_size], split, name_user)
            excluded = histories[start:start + batch_size] if exclude_bought else [()] * len(scores)
            lists += top_lists(scores, excluded, top_k)
        return lists
    trie = item_trie(encoder, ds, eos=history == "encoder")
    max_len = max(len(path) for path in trie.paths.values())
    rng = random.Random(seed)
    item_of = encoder.item_of_tokens(ds.num_items)
    lists = []
    for start in progress_bar(range(0, len(users), batch_size), desc="seq", disable=not progress):
        chunk = users[start:start + batch_size]
        samples = [tasks.sequential_sample(ds, u, rng, split, history, name_user) for u in chunk]
        batch = tasks.to_device(tasks.collate(tasks.encode_samples(encoder, samples), tasks.TASKS.index("sequential")),
                                device)
        batch.pop("decoder_input_ids", None)
        kwargs, begin = {}, 1
        if history == "decoder":
            kwargs["decoder_input_ids"], kwargs["decoder_attention_mask"] = decoder_prefixes(encoder, ds, chunk, split,
                                                                                            device)
            begin = kwargs["decoder_input_ids"].shape[1]
        constraint = []
        if protocol == "clean":
            banned = [trie.banned_children(h if exclude_bought else ()) for h in histories[start:start + batch_size]]
            constraint = [TrieConstraint(trie, banned, num_beams, tokenizer.eos_token_id, begin)]
        with autocast(device):
            out = model.generate(batch, num_beams=num_beams, num_return_sequences=top_k, max_new_tokens=max_len,
                                 logits_processor=LogitsProcessorList(constraint), **kwargs)
        lists += decode_items(tokenizer, out[:, begin:] if history == "decoder" else out, top_k, item_of)
    return lists


def next_item_scores(model, encoder, ds, users, split="test", name_user=True):
    """--history decoder with one-token item ids: log p(item | user, history) of every item for each user, as a
    (len(users), num_items + 1) float tensor on the CPU (column 0, the padding id: -inf), for ranking.py."""
    device = model.device
    rng = random.Random(0)        # the evaluation template is fixed: nothing is drawn
    samples = [tasks.sequential_sample(ds, u, rng, split, "decoder", name_user) for u in users]
    batch = tasks.to_device(tasks.collate(tasks.encode_samples(encoder, samples), tasks.TASKS.index("sequential")),
                            device)
    batch.pop("decoder_input_ids")
    prefix, prefix_mask = decoder_prefixes(encoder, ds, users, split, device)
    with autocast(device):
        logp = model.next_token_logprobs(batch, prefix, prefix_mask)
    tokens = torch.tensor(encoder.single_item_tokens(ds.num_items), device=device)
    scores = logp[:, tokens].float().cpu()
    return torch.cat([torch.full((len(users), 1), float("-inf")), scores], dim=1)


def rank_topn(model, tokenizer, encoder, ds, users, protocol="clean", num_beams=20, top_k=10, batch_size=32, seed=1,
              progress=True, history="encoder", history_ds=None, rules=None):
    """Each user's test item among its 100 candidates, ranked by ranking.rank_targets over the candidates alone:
    {"ranks", "lists" (the model's top-k candidates), "list_length" (None; top_k for the paper protocol's beams),
    "reference_ranks" and "popular_lists" (the rules on the same candidates; rules: {name: score_fn}, default every
    rule of ranking.py)}. history="decoder": the decoder reads the user's history before the candidate (from
    history_ds's sequences when given: a copy with swapped histories measures how much the lists depend on them)."""
    device = model.device
    rng = random.Random(seed)
    rules = rules if rules is not None else rule_scores(ds, RULE_NAMES)
    task_id = tasks.TASKS.index("topn")
    item_of = encoder.item_of_tokens(ds.num_items)
    item_len = max(len(tokens) for tokens in item_of)
    out = {"ranks": [], "lists": [], "reference_ranks": {}, "popular_lists": [],
           "list_length": top_k if protocol == "paper" else None}
    for start in progress_bar(range(0, len(users), batch_size), desc="topn", disable=not progress):
        chunk = users[start:start + batch_size]
        candidates = [tasks.topn_candidates(ds, u, rng, "test") for u in chunk]     # positive first
        targets, nothing = [c[0] for c in candidates], [()] * len(chunk)
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
                generated = model.generate(batch, num_beams=num_beams, num_return_sequences=top_k, **kwargs)
                if prefix:
                    generated = generated[:, prefix["decoder_prefix"].shape[1]:]
                lists = decode_items(tokenizer, generated, top_k, item_of)
                scores = list_scores(lists, ds.num_items)
            else:
                eos = history == "encoder"       # in the decoder an item is followed by the next one, not by eos
                labels = [[encoder.item_target(i) if eos else encoder.item_tokens(i) for i in c] for c in candidates]
                L = max(len(t) for c in labels for t in c)
                label_tensor = torch.full((len(chunk), len(candidates[0]), L), -100, dtype=torch.long)
                for b, c in enumerate(labels):
                    for j, t in enumerate(c):
                        label_tensor[b, j, :len(t)] = torch.tensor(t)
                candidate_logp = model.score_candidates(batch, label_tensor.to(device), **prefix).float().cpu()
                scores = torch.full((len(chunk), ds.num_items + 1), float("-inf"))
                for b, c in enumerate(candidates):
                    scores[b, c] = candidate_logp[b]
                lists = top_lists(scores, nothing, top_k)
        out["ranks"] += rank_targets(scores, nothing, targets)
        out["lists"] += lists
        _, histories, _ = eval_cases(ds, "test", chunk)
        for name, score_fn in rules.items():
            rule = candidate_scores(score_fn(histories), candidates)
            out["reference_ranks"].setdefault(name, []).extend(rank_targets(rule, nothing, targets))
            if name == "most_popular":
                out["popular_lists"] += top_lists(rule, nothing, top_k)
    return out


def generate_texts(model, tokenizer, encoder, ds, task, records, split="test", batch_size=32, num_beams=1,
                   max_new_tokens=20, explanation_target="auto", text_context=(), mbr_samples=0, progress=True,
                   **extra):
    """The model's text for each review record of `task` (explanation, review) in `split`, ending at eos; the prompts
    show the run's text_context (tasks.context_texts); extra: generate()'s decoding flags (min_new_tokens,
    no_repeat_ngram_size, ...). mbr_samples > 0: of the num_beams beams, the one mbr_pick prefers against that many
    texts sampled from the model. exp.py and pretrain.py's validation."""
    device, texts, task_id = next(model.parameters()).device, [], tasks.TASKS.index(task)
    beams = num_beams if mbr_samples else 1
    for chunk in progress_bar(list(batches(records, batch_size)), desc=task, disable=not progress):
        samples = [tasks.SAMPLERS[task](ds, r["user"], None, split, record=r, explanation_target=explanation_target,
                                        text_context=text_context) for r in chunk]
        batch = tasks.to_device(tasks.collate(tasks.encode_samples(encoder, samples), task_id), device)
        with autocast(device):
            out = model.generate(batch, num_beams=num_beams, num_return_sequences=beams,
                                 max_new_tokens=max_new_tokens, **extra)
            if mbr_samples:
                drawn = model.generate(batch, num_beams=1, num_return_sequences=mbr_samples, do_sample=True, top_k=0,
                                       max_new_tokens=max_new_tokens, **extra)
        decoded = [t.strip() for t in tokenizer.batch_decode(out, skip_special_tokens=True)]
        if mbr_samples:
            drawn = [t.strip() for t in tokenizer.batch_decode(drawn, skip_special_tokens=True)]
            decoded = [mbr_pick(decoded[i * beams:(i + 1) * beams], drawn[i * mbr_samples:(i + 1) * mbr_samples])
                       for i in range(len(chunk))]
        texts += decoded
    return texts


def mbr_pick(candidates, evidence):
    """Minimum Bayes-risk choice (Kumar & Byrne 2004; Freitag et al. 2022 with samples as the evidence): the candidate
    with the highest mean ROUGE-L F1 (metrics.py) against the evidence texts, the first on a tie. Beam search and
    greedy decoding pick the single most probable path, which on a small set is the one generic sentence most
    records share; the expected score of each beam under the model's own distribution picks per record."""
    pairs = [(e, c) for c in candidates for e in evidence]
    scores = rouge_per_text([e for e, _ in pairs], [c for _, c in pairs])["ROUGE-L"]
    totals = [sum(scores[i * len(evidence):(i + 1) * len(evidence)]) for i in range(len(candidates))]
    return candidates[totals.index(max(totals))]


def autocast(device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16_supported(device))
