"""Tasks, prompt templates, samplers and the one batcher.

Every sample is a list of words (template words and id words such as `item_12`) plus a target text. Words are
tokenized once and cached, so building a batch is list concatenation: the token ids equal those of tokenizing the
whole sentence, because SentencePiece segments each whitespace-separated word on its own (tests pin this).
Batches are single-task, so a 40-token sequential batch is never padded to a 300-token top-N one.
"""
import random
import re
from typing import NamedTuple

import numpy as np
import torch

from dataset import DataError
from module import MAX_WHOLE_WORDS, item_word, user_word
from text_rules import retrieved_texts

# --ratio is given in this order (the seed's: explanation : sequential : review summary : top-N)
TASKS = ("explanation", "sequential", "review", "topn")
HISTORY_LEN = 20
# Where the sequential task puts the user's history:
#   encoder  the history is part of the prompt and one next item is the target (P5 / POD / HDRec);
#   decoder  the prompt names the user, the decoder reads the history itself (teacher-forced) and every position
#            predicts the item after it, as SASRec trains: ~7x more targets per beauty sample, and the last item's
#            embedding reaches the output through the residual stream instead of through cross-attention.
HISTORY_PLACES = ("encoder", "decoder")
NUM_CANDIDATES = 100
ID_WORD = re.compile(r"^(user|item)_\d+$")

# Several paraphrases per task in training, the first one at evaluation.
TEMPLATES = {
    "sequential": [
        "{user} has purchased {history} , predict the next item",
        "given the purchases of {user} : {history} , which item comes next ?",
        "{user} bought {history} in this order . what will the user buy next ?",
        "predict the next item for {user} after {history}",
    ],
    # --history decoder: the prompt names the user; the items follow in the decoder
    "sequential_decoder": [
        "{user} has purchased these items in this order",
        "the purchases of {user} , one after the other",
        "predict each next item {user} buys",
        "what {user} bought , in order",
    ],
    "topn": [
        "which item should be recommended to {user} among {candidates} ?",
        "pick the item {user} is most likely to buy from {candidates}",
        "from {candidates} choose one item for {user}",
    ],
    "explanation": [
        "explain why {user} bought {item}",
        "generate an explanation for {user} about {item}",
        "what does {user} say about {item} ?",
    ],
    "review": [
        "summarize the review of {user} on {item}",
        "write a one sentence summary of what {user} thinks of {item}",
    ],
}


class WordEncoder:
    """Tokenizes each distinct word once; turns a word list into input ids + whole-word ids."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.eos = tokenizer.eos_token_id
        self.pad = tokenizer.pad_token_id
        self.cache = {}

    def add(self, words):
        new = [w for w in dict.fromkeys(words) if w not in self.cache]
        if new:
            for w, ids in zip(new, self.tokenizer(new, add_special_tokens=False)["input_ids"]):
                self.cache[w] = ids

    def words(self, words):
        """input ids (ending in eos) and whole-word ids (1 for the first word, 2 for the second, ...)."""
        ids, wwids = [], []
        for n, w in enumerate(words, 1):
            piece = self.cache.get(w)
            if piece is None:
                self.add([w])
                piece = self.cache[w]
            ids.extend(piece)
            wwids.extend([min(n, MAX_WHOLE_WORDS - 1)] * len(piece))
        ids.append(self.eos)
        wwids.append(0)
        return ids, wwids

    def set_item_codes(self, codes):
        """--item_ids collaborative|semantic: the word item_N stands for its code's tokens (added to the tokenizer
        beforehand). codes: {item: code tuple}."""
        from item_codes import code_tokens
        for item, code in codes.items():
            self.cache[item_word(item)] = self.tokenizer.convert_tokens_to_ids(code_tokens(code))

    def item_of_tokens(self, num_items):
        """{token tuple: item} for items 1..num_items, to read generated ids back."""
        return {tuple(self.item_tokens(i)): i for i in range(1, num_items + 1)}

    def single_item_tokens(self, num_items):
        """The one token of each item 1..num_items (atomic ids), in item order; None when some item has several."""
        tokens = [self.item_tokens(i) for i in range(1, num_items + 1)]
        return [t[0] for t in tokens] if all(len(t) == 1 for t in tokens) else None

    def item_tokens(self, item):
        """An item id's tokens: its word's cached pieces."""
        word = item_word(item)
        if word not in self.cache:
            self.add([word])
        return self.cache[word]

    def item_target(self, item):
        """The decoder target of an item id: its tokens + eos."""
        return self.item_tokens(item) + [self.eos]

    def target(self, text, max_len=None):
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return (ids[:max_len] if max_len else ids) + [self.eos]


def fill(template, user=None, item=None, history=(), candidates=()):
    """A template's words with the slots filled; ids become words such as user_7, item_12."""
    words = []
    for w in template.split():
        if w == "{user}":
            if user is not None:                  # None: the prompt names no one (--name_user no)
                words.append(user_word(user))
        elif w == "{item}":
            words.append(item_word(item))
        elif w == "{history}":
            words.extend(item_word(i) for i in history)
        elif w == "{candidates}":
            words.extend(item_word(i) for i in candidates)
        else:
            words.append(w)
    return words


# ---------------------------------------------------------------------------------------------------- samplers
# A sampler returns (words, target_text). `rng` is a random.Random; evaluation samples use the first template.

def sample_negatives(rng, num_items, bought, n):
    out, seen = [], set()
    while len(out) < n:
        x = rng.randint(1, num_items)
        if x not in bought and x not in seen:
            seen.add(x)
            out.append(x)
    return out


class ItemSequence(NamedTuple):
    """A decoder target of item ids (--history decoder): the decoder reads `items` teacher-forced and the loss
    counts the last `scored` of them (None: every one). No eos: the sequence goes on after the last item."""
    items: list
    scored: int = None


def sequential_sample(ds, user, rng, split="train", history="encoder", name_user=True, **opts):
    """name_user=False: the prompt leaves the user's id out; the history alone says who it is (SASRec has no user
    embedding: one row per user, seen once an epoch, is a way to memorise the training items)."""
    seq = ds.sequences[user]
    named = user if name_user else None
    if history == "decoder":
        if split == "train":    # a window of up to HISTORY_LEN + 1 training items, every one of them a target
            train = seq[:-2]
            end = rng.randint(min(len(train), HISTORY_LEN + 1), len(train))
            window, template = train[max(0, end - HISTORY_LEN - 1):end], rng.choice(TEMPLATES["sequential_decoder"])
            return fill(template, user=named), ItemSequence(window)
        end = len(seq) - (2 if split == "val" else 1)
        window = seq[max(0, end - HISTORY_LEN):end + 1]
        return fill(TEMPLATES["sequential_decoder"][0], user=named), ItemSequence(window, scored=1)
    if split == "train":
        train = seq[:-2]
        t = rng.randrange(1, len(train))         # a random window of the training part
        history, target, template = train[max(0, t - HISTORY_LEN):t], train[t], rng.choice(TEMPLATES["sequential"])
    else:
        end = len(seq) - (2 if split == "val" else 1)
        history, target, template = seq[max(0, end - HISTORY_LEN):end], seq[end], TEMPLATES["sequential"][0]
    return fill(template, user=named, history=history), item_word(target)


def topn_candidates(ds, user, rng, split, negative_num=NUM_CANDIDATES - 1, position=None):
    """The positive first, then items the user never bought (the published negatives at test time). In training the
    positive is the item at `position` of the user's sequence, or a random training item."""
    seq = ds.sequences[user]
    if split == "test":
        return [seq[-1]] + ds.negatives[user]
    if split == "train":
        positive = seq[position] if position is not None else rng.choice(seq[:-2])
    else:
        positive = seq[-2]
    n = min(negative_num, len(ds.negatives[user]))   # a small catalogue has fewer (see dataset.load_dataset)
    return [positive] + sample_negatives(rng, ds.num_items, set(seq), n)


def topn_sample(ds, user, rng, split="train", candidates=None, negative_num=NUM_CANDIDATES - 1, history="encoder",
                **opts):
    """--history decoder: the decoder reads the history before the positive (unscored) and then the positive."""
    seq = ds.sequences[user]
    end = {"train": None, "val": len(seq) - 2, "test": len(seq) - 1}[split]
    if history == "decoder" and split == "train":
        end = rng.randrange(len(seq) - 2)           # a training position: the positive, after its own history
    if candidates is None:
        candidates = topn_candidates(ds, user, rng, split, negative_num, end if split == "train" else None)
    shown = list(candidates)
    rng.shuffle(shown)                            # a copy: the caller's list keeps the positive first
    template = rng.choice(TEMPLATES["topn"]) if split == "train" else TEMPLATES["topn"][0]
    words = fill(template, user=user, candidates=shown)
    if history == "decoder":
        return words, ItemSequence(seq[max(0, end - HISTORY_LEN):end] + [candidates[0]], scored=1)
    return words, item_word(candidates[0])


# The text tasks read review records (explanation.json, or explanation_rationale.json after distillation).
# Their unit is also the user: a user's sample is one of the user's records of that split, drawn at random.
TEXT_FIELDS = {"explanation": "explanation", "review": "review_summary"}


def explanation_text(record, explanation_target="auto"):
    """HDRec trains on the LLM's ground-truth explanation when the record has one (auto or llm), POD on the review's
    own sentence (review)."""
    if explanation_target == "llm" or (explanation_target == "auto" and record.get("groundtruth_explanation")):
        if not record.get("groundtruth_explanation"):
            raise DataError(f"record of user {record['user']}, item {record['item']} has no groundtruth_explanation; "
                            "run data/distill.py first or use --explanation_target review")
        return record["groundtruth_explanation"]
    return record["explanation"]


def user_records(ds, user, split, task):
    field = TEXT_FIELDS[task]
    return [r for r in (ds.records or {}).get(split, {}).get(user, ()) if r.get(field)]


def task_text(task, record, explanation_target="auto"):
    """The text a text task writes for a record."""
    return explanation_text(record, explanation_target) if task == "explanation" else record["review_summary"]


# --text_context: earlier texts of the same kind that the prompt may show the model, so that it can write in the
# user's own words and the item's (a user id seen in a few records cannot teach it either): what the text rules
# retrieve (text_rules.retrieved_texts), from the training records only, a training record's own text left out.
# Each is cut to CONTEXT_WORDS words.
TEXT_CONTEXTS = ("user", "item")
CONTEXT_WORDS = 20


def text_context_sources(flag):
    """--text_context as the samplers take it: a tuple of sources (none for "none", or a run older than the flag)."""
    return () if flag in (None, "none") else tuple(flag.split(","))


def context_texts(task, ds, record, split, explanation_target="auto", sources=TEXT_CONTEXTS):
    """{source: text} for the sources of --text_context that have a text for this record: texts of the kind the
    task writes (its --explanation_target for explanations)."""
    def text(r):
        return task_text(task, r, explanation_target) if r.get(TEXT_FIELDS[task]) else None
    return retrieved_texts(ds, record, text, sources, training=split == "train")


def context_words(contexts):
    words = []
    for source in TEXT_CONTEXTS:
        if source in contexts:
            words += [";", source, "wrote", ":"] + contexts[source].split()[:CONTEXT_WORDS]
    return words


def text_sample(task, ds, user, rng, split="train", record=None, explanation_target="auto", text_context=(), **opts):
    record = record or rng.choice(user_records(ds, user, split, task))
    template = rng.choice(TEMPLATES[task]) if split == "train" else TEMPLATES[task][0]
    words = fill(template, user=record["user"], item=record["item"])
    if text_context:
        words += context_words(context_texts(task, ds, record, split, explanation_target, text_context))
    return words, task_text(task, record, explanation_target)


SAMPLERS = {"sequential": sequential_sample, "topn": topn_sample,
            "explanation": lambda *a, **k: text_sample("explanation", *a, **k),
            "review": lambda *a, **k: text_sample("review", *a, **k)}


def trainable_users(ds, task, split="train"):
    """Users who can give a sample of `task` in `split`."""
    if task == "sequential":
        return [u for u in ds.users if len(ds.sequences[u]) >= 4 or split != "train"]   # a target needs a history
    if task == "topn":
        return ds.users
    return [u for u in ds.users if user_records(ds, u, split, task)]


# ---------------------------------------------------------------------------------------------------- batching

def collate(encoded, task_id):
    """encoded: list of (ids, wwids, target_ids[, decoder_ids]) -> padded tensors (labels padded with -100).
    decoder_ids, when samples have them, are the decoder's inputs (else T5 shifts the labels right)."""
    B = len(encoded)
    L = max(len(e[0]) for e in encoded)
    T = max(len(e[2]) for e in encoded)
    input_ids = torch.zeros(B, L, dtype=torch.long)
    whole_word_ids = torch.zeros(B, L, dtype=torch.long)
    attention_mask = torch.zeros(B, L, dtype=torch.long)
    labels = torch.full((B, T), -100, dtype=torch.long)
    decoder = len(encoded[0]) > 3
    decoder_input_ids = torch.zeros(B, T, dtype=torch.long) if decoder else None
    for b, (ids, ww, tgt, *dec) in enumerate(encoded):
        input_ids[b, :len(ids)] = torch.tensor(ids)
        whole_word_ids[b, :len(ww)] = torch.tensor(ww)
        attention_mask[b, :len(ids)] = 1
        labels[b, :len(tgt)] = torch.tensor(tgt)
        if decoder:
            decoder_input_ids[b, :len(dec[0])] = torch.tensor(dec[0])
    batch = {"input_ids": input_ids, "whole_word_ids": whole_word_ids, "attention_mask": attention_mask,
             "labels": labels, "task": torch.full((B,), task_id, dtype=torch.long)}
    if decoder:
        batch["decoder_input_ids"] = decoder_input_ids
    return batch


def encode_item_sequence(encoder, target):
    """An ItemSequence -> (labels, decoder inputs): the items' tokens, unscored ones -100 in the labels; the decoder
    reads the start token, then every item token but the last."""
    tokens = [t for i in target.items for t in encoder.item_tokens(i)]
    labels = list(tokens)
    if target.scored is not None:
        unscored = sum(len(encoder.item_tokens(i)) for i in target.items[:len(target.items) - target.scored])
        labels[:unscored] = [-100] * unscored
    return labels, [encoder.pad] + tokens[:-1]


def encode_samples(encoder, samples, target_len=None):
    out = []
    for words, target in samples:
        ids, ww = encoder.words(words)
        if isinstance(target, ItemSequence):
            out.append((ids, ww, *encode_item_sequence(encoder, target)))
        else:
            out.append((ids, ww, encoder.target(target, target_len)))
    return out


def epoch_plan(ds, ratio, batch_size, seed, epoch, rank=0, world=1):
    """The batches of one training epoch as (task, [users]) lists: each user contributes ratio[task] samples of
    every task, batches are single-task and shuffled; rank r of `world` takes every world-th batch."""
    rng = random.Random(f"{seed}-plan-{epoch}")
    batches = []
    for task, share in zip(TASKS, ratio):
        if share == 0:
            continue
        users = trainable_users(ds, task) * share
        rng.shuffle(users)
        batches += [(task, users[i:i + batch_size]) for i in range(0, len(users), batch_size)]
    rng.shuffle(batches)
    usable = len(batches) - len(batches) % world if world > 1 else len(batches)
    return batches[rank:usable:world]


def make_batch(ds, encoder, task, users, rng, split="train", exp_len=None, **opts):
    """One single-task batch; opts (negative_num, explanation_target) go to the sampler; text targets are cut to
    exp_len tokens."""
    samples = [SAMPLERS[task](ds, u, rng, split, **opts) for u in users]
    return collate(encode_samples(encoder, samples, exp_len if task in TEXT_FIELDS else None), TASKS.index(task))


def to_device(batch, device):
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def id_words(ds, codes=None):
    """Every word that becomes a token of its own with atomic ids: the items (or, with item codes, every code token)
    first, then the users."""
    if codes:
        from item_codes import code_tokens
        items = list(dict.fromkeys(t for i in sorted(codes) for t in code_tokens(codes[i])))
    else:
        items = [item_word(i) for i in range(1, ds.num_items + 1)]
    return items + [user_word(u) for u in ds.users]


def tokenizer_corpus(ds, seed=1, max_users=None, ids=True):
    """Text the from-scratch tokenizer learns from: every template filled for (a sample of) users, the training
    records' review text, every id word. ids=False leaves the id words out (they become tokens of their own)."""
    rng = random.Random(seed)
    users = ds.users if max_users is None else rng.sample(ds.users, min(max_users, len(ds.users)))

    def text(words):
        return " ".join(w for w in words if ids or not ID_WORD.match(w))
    for u in users:
        for task in ("sequential", "topn"):
            words, target = SAMPLERS[task](ds, u, rng, "val")
            yield text(words)
            if ids:
                yield target
    for recs in (ds.records or {}).get("train", {}).values():    # review text of training records only
        for r in recs:
            yield from (v for v in r.values() if isinstance(v, str))
    for tmpl in (t for ts in TEMPLATES.values() for t in ts):
        yield text(fill(tmpl, user=1, item=1, history=[1], candidates=[1]))
    if ids:
        items = np.arange(1, ds.num_items + 1)
        for chunk in np.array_split(items, max(1, len(items) // 100)):
            yield " ".join(item_word(i) for i in chunk)
