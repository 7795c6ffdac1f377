"""module.py / tasks.py: tokenizer, word cache, whole-word ids, item trie + TrieConstraint inside generate,
checkpoint round trip, candidate scoring, a pretrained backbone from a local folder."""
import json
import random

import pytest
import torch
from transformers import LogitsProcessorList, T5ForConditionalGeneration

import tasks
from evaluation import decode_items, recommend_next
from module import (SIZES, HDRec, ItemTrie, TrieConstraint, add_id_tokens, load_checkpoint, load_pretrained,
                    parse_item, resolve_backbone, save_checkpoint, t5_config_for, tokenizer_from_spm, train_tokenizer)
from utils import UserError


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Two OpenMP threads on this shared, overloaded 2-core machine make these tests ~5x slower; restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def sequential_batch(ds, encoder, users):
    rng = random.Random(0)
    samples = [tasks.sequential_sample(ds, u, rng, "test") for u in users]
    return tasks.collate(tasks.encode_samples(encoder, samples), tasks.TASKS.index("sequential"))


def filled_templates(ds, users):
    """Every template of every task, filled for a few real users (train history, shuffled candidates, an item)."""
    for u in users:
        seq = ds.sequences[u]
        for task, templates in tasks.TEMPLATES.items():
            for t in templates:
                yield tasks.fill(t, user=u, item=seq[-1], history=seq[-22:-2], candidates=[seq[-1]] + ds.negatives[u])


# ---------------------------------------------------------------------------------------------------- tokenizer

def test_trained_tokenizer(tokenizer, trained_tokenizer, small_ds):
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    assert 100 < len(tokenizer) <= 8000
    words = next(filled_templates(small_ds, small_ds.users[:1]))
    ids = tokenizer(" ".join(words))["input_ids"]
    assert ids[-1] == 1 and 2 not in ids                          # eos at the end, no unknown pieces
    for word in ("item_1", "item_12101", "user_22363", "item_7"):
        ids = tokenizer(word, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == word
        assert parse_item(tokenizer.decode(ids + [1], skip_special_tokens=True)) == (
            int(word[5:]) if word.startswith("item_") else None)
    # the SentencePiece model kept in the checkpoint rebuilds the same tokenizer
    again = tokenizer_from_spm(trained_tokenizer[1])
    assert again(" ".join(words))["input_ids"] == tokenizer(" ".join(words))["input_ids"]


def test_atomic_id_tokens(small_ds):
    """--id_tokens atomic: the tokenizer learns the text alone and every id word becomes exactly one token."""
    corpus = list(tasks.tokenizer_corpus(small_ds, seed=1, ids=False))
    assert corpus and not any(tasks.ID_WORD.match(w) for text in corpus for w in text.split())
    tokenizer, _ = train_tokenizer(corpus, 8000, tasks.id_words(small_ds))
    ids = tokenizer(tasks.id_words(small_ds), add_special_tokens=False)["input_ids"]
    assert all(len(x) == 1 for x in ids) and len({x[0] for x in ids}) == len(ids)
    assert len(tokenizer.tokenize("which item should be recommended to")) <= 8  # template words stay (nearly) whole
    assert tokenizer.tokenize("item_12") != tokenizer.tokenize("item_1") and len(tokenizer.tokenize("item_12")) == 1
    assert "item_1" not in tokenizer.tokenize("item_1x")                         # an id only as a whole word
    encoder = tasks.WordEncoder(tokenizer)
    for words in filled_templates(small_ds, small_ds.users[:3]):
        assert encoder.words(words)[0] == tokenizer(" ".join(words))["input_ids"]
    item = small_ds.num_items
    target = encoder.item_target(item)
    assert len(target) == 2 and parse_item(tokenizer.decode(target, skip_special_tokens=True)) == item


def test_word_cache_equals_tokenizing_the_whole_sentence(tokenizer, small_ds):
    """tasks.WordEncoder builds inputs from per-word token ids; they must equal tokenizing the sentence (+ eos)."""
    fresh = tasks.WordEncoder(tokenizer)          # an empty cache: words are added on first use
    n = 0
    for words in filled_templates(small_ds, small_ds.users[:4] + small_ds.users[-2:]):
        ids, wwids = fresh.words(words)
        assert ids == tokenizer(" ".join(words))["input_ids"], " ".join(words)
        assert ids[-1] == tokenizer.eos_token_id and len(wwids) == len(ids)
        n += 1
    assert n == 6 * sum(len(t) for t in tasks.TEMPLATES.values())
    for text in ("item_1234", "the user likes it , a lot ?"):
        assert fresh.target(text) == tokenizer(text)["input_ids"]
    assert fresh.target("a b c d e f", max_len=2) == tokenizer("a b c d e f", add_special_tokens=False)["input_ids"][:2] + [1]


def test_whole_word_ids(tokenizer, encoder, small_ds):
    words = ["user_12", "has", "purchased", "item_1234", "item_5", ","]
    ids, wwids = encoder.words(words)
    pieces = [tokenizer(w, add_special_tokens=False)["input_ids"] for w in words]
    assert max(len(p) for p in pieces) >= 2                        # some word spans several tokens
    expected = [n for n, p in enumerate(pieces, 1) for _ in p] + [0]  # word n -> n on all its tokens, eos -> 0
    assert wwids == expected
    # every token of one item_N shares one id, and ids increase by one per word
    start = sum(len(p) for p in pieces[:3])
    assert set(wwids[start:start + len(pieces[3])]) == {4}
    assert all(b - a in (0, 1) for a, b in zip(wwids[:-2], wwids[1:-1]))
    # padding: a shorter sample in the batch is padded with token 0, whole-word 0 and attention 0
    u1, u2 = small_ds.users[:2]
    batch = tasks.collate([(*encoder.words(words), [5, 1]), (*encoder.words(words[:2]), [1])], 1)
    short = len(encoder.words(words[:2])[0])
    assert batch["input_ids"].shape == (2, len(ids))
    assert batch["whole_word_ids"][1, short - 1] == 0 and batch["whole_word_ids"][1, short:].eq(0).all()
    assert batch["input_ids"][1, short:].eq(0).all() and batch["attention_mask"][1, short:].eq(0).all()
    assert batch["attention_mask"][0].eq(1).all()
    assert batch["labels"].tolist() == [[5, 1], [1, -100]]
    assert batch["task"].tolist() == [1, 1]


def test_parse_item():
    assert parse_item("item_12") == 12
    assert parse_item("  item_12101 ") == 12101
    for text in ("item_", "item_12 item_3", "user_12", "item_1a", "item 12", "", "item_-3"):
        assert parse_item(text) is None, text


# ---------------------------------------------------------------------------------------------------- trie

EOS = 1
PATHS = {12: (5, 7, EOS), 123: (5, 7, 9, EOS), 4: (5, 8, EOS), 30: (6, EOS)}   # item 12's path is a prefix of 123's


def test_item_trie_allowed():
    trie = ItemTrie(PATHS)
    assert sorted(trie.allowed(())) == [5, 6]
    assert sorted(trie.allowed((5,))) == [7, 8]
    assert sorted(trie.allowed((5, 7))) == [EOS, 9]                 # end item 12 here, or go on to 123
    assert trie.allowed((5, 7, 9)) == [EOS]
    assert trie.allowed((5, 7, EOS)) == [] and trie.allowed((3,)) == []
    assert trie.count[()] == 4 and trie.count[(5, 7)] == 2


@pytest.mark.parametrize("banned, expected", [
    ([12], {(): [5, 6], (5,): [7, 8], (5, 7): [9], (5, 7, 9): [EOS]}),           # the prefix item only
    ([123], {(): [5, 6], (5,): [7, 8], (5, 7): [EOS], (5, 7, 9): []}),          # the longer item only
    ([12, 123], {(): [5, 6], (5,): [8], (5, 7): []}),                           # both: the branch closes
    ([12, 123, 4], {(): [6], (5,): []}),
    ([12, 123, 4, 30], {(): []}),
    ([12, 12, 999], {(5,): [7, 8], (5, 7): [9]}),                               # repeats and unknown ids
    ([], {(): [5, 6], (5, 7): [EOS, 9]}),
])
def test_item_trie_allowed_with_banned_items(banned, expected):
    trie = ItemTrie(PATHS)
    closed = trie.banned_children(banned)
    for prefix, allowed in expected.items():
        assert sorted(trie.allowed(prefix, closed)) == allowed, prefix


def test_real_trie_has_prefix_items(item_trie, tokenizer, small_ds):
    """With the trained tokenizer item_12 is a strict prefix of item_1211 etc.; banning item_12 keeps those open."""
    paths = item_trie.paths
    assert len(paths) == small_ds.num_items and len(set(paths.values())) == small_ds.num_items
    assert all(p[-1] == tokenizer.eos_token_id for p in paths.values())
    stems = {p[:-1]: i for i, p in paths.items()}
    longer = [i for i, p in paths.items() if any(p[:k] in stems and stems[p[:k]] != i for k in range(1, len(p) - 1))]
    assert longer, "expected item ids whose token path extends another item's"
    item = longer[0]
    p = paths[item]
    k = next(k for k in range(1, len(p) - 1) if p[:k] in stems)
    short = stems[p[:k]]
    closed = item_trie.banned_children([short])
    assert tokenizer.eos_token_id not in item_trie.allowed(p[:k], closed)
    assert p[k] in item_trie.allowed(p[:k], closed)
    closed = item_trie.banned_children([item])
    assert tokenizer.eos_token_id in item_trie.allowed(p[:k], closed)


# ---------------------------------------------------------------------------------------------------- constrained generate

def generate_lists(model, tokenizer, batch, trie, banned, num_beams=20, top_k=10):
    max_len = max(len(p) for p in trie.paths.values())
    constraint = TrieConstraint(trie, banned, num_beams, tokenizer.eos_token_id)
    out = model.generate(batch, num_beams=num_beams, num_return_sequences=top_k, max_new_tokens=max_len,
                         logits_processor=LogitsProcessorList([constraint]))
    return out, decode_items(tokenizer, out, top_k)


def test_trie_constraint_in_generate(tiny_model, tokenizer, encoder, item_trie, small_ds, monkeypatch):
    users = small_ds.users[:3]
    batch = sequential_batch(small_ds, encoder, users)
    banned = [item_trie.banned_children(small_ds.sequences[u][:-1]) for u in users]
    out, lists = generate_lists(tiny_model, tokenizer, batch, item_trie, banned)
    assert out.shape[0] == 3 * 10
    for u, items in zip(users, lists):
        assert len(items) == 10
        assert all(i is not None and 1 <= i <= small_ds.num_items for i in items), items
        assert len(set(items)) == 10
        assert not set(items) & set(small_ds.sequences[u][:-1])

    # the same search without the constraint gives lists that are not all valid, distinct, unbought items
    free = tiny_model.generate(batch, num_beams=20, num_return_sequences=10,
                               max_new_tokens=max(len(p) for p in item_trie.paths.values()))
    free_lists = decode_items(tokenizer, free, 10)
    assert any(None in items or len(set(items)) < 10 for items in free_lists)

    # banning what the model ranks first for user 0 (as if bought) removes it and keeps the list full
    first = lists[0][0]
    again = [item_trie.banned_children(small_ds.sequences[users[0]][:-1] + [first])] + banned[1:]
    _, lists2 = generate_lists(tiny_model, tokenizer, batch, item_trie, again)
    assert first not in lists2[0] and len(set(lists2[0])) == 10 and None not in lists2[0]
    assert lists2[1:] == lists[1:]                                      # rows of other users are untouched

    # evaluation.recommend_next (what seq.py runs) gives the same lists, in the same precision (it runs under bf16
    # autocast where the CPU has bf16 units; near-tied beams may then swap)
    import contextlib
    import evaluation
    monkeypatch.setattr(evaluation, "autocast", lambda device: contextlib.nullcontext())
    assert recommend_next(tiny_model, tokenizer, encoder, small_ds, users, "clean", seed=0, progress=False) == lists


def test_beam_cache_changes_nothing_but_the_copies(tiny_model, encoder, item_trie, small_ds):
    """HDRec.generate's BeamCache skips reordering the cross-attention cache: the same beams and scores as
    transformers' own cache, constrained or not."""
    from transformers.cache_utils import DynamicCache, EncoderDecoderCache
    users = small_ds.users[:4]
    batch = sequential_batch(small_ds, encoder, users)
    banned = [item_trie.banned_children(small_ds.sequences[u][:-1]) for u in users]
    for processors in ([], [TrieConstraint(item_trie, banned, 8, encoder.eos)]):
        runs = [tiny_model.generate(batch, num_beams=8, num_return_sequences=5, max_new_tokens=5,
                                    logits_processor=LogitsProcessorList(processors), output_scores=True,
                                    return_dict_in_generate=True, **cache)
                for cache in ({}, {"past_key_values": EncoderDecoderCache(DynamicCache(), DynamicCache())})]
        assert torch.equal(runs[0].sequences, runs[1].sequences)
        assert torch.equal(runs[0].sequences_scores, runs[1].sequences_scores)


def test_trie_constraint_with_fewer_items_left_than_requested(tiny_model, tokenizer, encoder, small_ds):
    """A trie of 12 items where the user bought 10: exactly the 2 others come back, the rest are misses."""
    items = list(range(1, 13))
    trie = ItemTrie({i: encoder.target(tasks.item_word(i)) for i in items})
    user = small_ds.users[0]
    batch = sequential_batch(small_ds, encoder, [user])
    banned = [trie.banned_children(items[:10])]
    _, lists = generate_lists(tiny_model, tokenizer, batch, trie, banned, num_beams=4, top_k=4)
    valid = [i for i in lists[0] if i is not None]
    assert sorted(valid) == [11, 12]


# ---------------------------------------------------------------------------------------------------- checkpoints

def test_checkpoint_round_trip_is_bitwise(tiny_model, tokenizer, trained_tokenizer, encoder, item_trie, small_ds,
                                          tmp_path):
    meta = {"task_num": 4, "prompt_num": 3, "item_map": None, "backbone": "tiny", "note": "round trip"}
    save_checkpoint(tiny_model, tokenizer, tmp_path, meta, trained_tokenizer[1])
    for name in ("model.safetensors", "config.json", "tokenizer/spm.model"):
        assert (tmp_path / name).exists(), name
    assert not list(tmp_path.glob("*.tmp"))
    assert json.loads((tmp_path / "config.json").read_text())["hdrec"] == meta
    model, tok, meta2 = load_checkpoint(tmp_path)
    assert meta2 == meta and not model.training

    a, b = tiny_model.state_dict(), model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert model.whole_word.weight.abs().sum() > 0                        # the non-zero marking came back
    assert model.t5.lm_head.weight.data_ptr() == model.t5.shared.weight.data_ptr()   # still tied

    users = small_ds.users[:4]
    words = [w for w, _ in (tasks.sequential_sample(small_ds, u, random.Random(0), "test") for u in users)]
    assert [tok(" ".join(w))["input_ids"] for w in words] == [tokenizer(" ".join(w))["input_ids"] for w in words]
    reloaded_encoder = tasks.WordEncoder(tok)
    batch = sequential_batch(small_ds, encoder, users)
    assert torch.equal(sequential_batch(small_ds, reloaded_encoder, users)["input_ids"], batch["input_ids"])

    banned = [item_trie.banned_children(small_ds.sequences[u][:-1]) for u in users]
    out1, lists1 = generate_lists(tiny_model, tokenizer, batch, item_trie, banned)
    out2, lists2 = generate_lists(model, tok, batch, item_trie, banned)
    assert torch.equal(out1, out2) and lists1 == lists2
    free1 = tiny_model.generate(batch, num_beams=5, num_return_sequences=5, output_scores=True,
                                return_dict_in_generate=True)
    free2 = model.generate(batch, num_beams=5, num_return_sequences=5, output_scores=True, return_dict_in_generate=True)
    assert torch.equal(free1.sequences, free2.sequences) and torch.equal(free1.sequences_scores, free2.sequences_scores)
    with torch.no_grad():
        assert torch.equal(tiny_model(batch), model(batch))


def test_checkpoint_file_bytes_are_reproducible(tiny_model, tokenizer, tmp_path):
    saved = set()
    for n in range(6):
        save_checkpoint(tiny_model, tokenizer, tmp_path / str(n), {"task_num": 4, "prompt_num": 3})
        saved.add((tmp_path / str(n) / "model.safetensors").read_bytes())
    assert len(saved) == 1


def test_load_checkpoint_without_weights_says_how_to_make_one(tmp_path):
    with pytest.raises(UserError, match="no model.safetensors; train one with pretrain.py"):
        load_checkpoint(tmp_path)


# ---------------------------------------------------------------------------------------------------- scoring

def test_score_candidates_equals_a_manual_forward(tiny_model, tokenizer, encoder, small_ds):
    users = small_ds.users[:2]
    rng = random.Random(0)
    candidates = [tasks.topn_candidates(small_ds, u, rng, "test") for u in users]
    samples = [tasks.topn_sample(small_ds, u, rng, "test", c) for u, c in zip(users, candidates)]
    batch = tasks.collate(tasks.encode_samples(encoder, samples), tasks.TASKS.index("topn"))
    # three candidates each, of different token lengths, padded with -100
    chosen = [[1, 12, 12101], [7, 1211, candidates[1][0]]]
    labels = [[encoder.target(tasks.item_word(i)) for i in c] for c in chosen]
    L = max(len(t) for c in labels for t in c)
    assert len({len(t) for c in labels for t in c}) > 1
    label_tensor = torch.full((2, 3, L), -100, dtype=torch.long)
    for b, c in enumerate(labels):
        for j, t in enumerate(c):
            label_tensor[b, j, :len(t)] = torch.tensor(t)
    scores = tiny_model.score_candidates(batch, label_tensor)
    assert scores.shape == (2, 3) and (scores < 0).all()

    with torch.no_grad():
        for b in range(2):
            one = {k: v[b:b + 1] for k, v in batch.items()}
            n_real = int(one["attention_mask"].sum())
            one = {k: (v[:, :n_real] if v.dim() == 2 else v) for k, v in one.items()}     # drop the padding
            embeds, mask = tiny_model.encoder_inputs(one["input_ids"], one["whole_word_ids"], one["attention_mask"],
                                                     one["task"])
            for j, target in enumerate(labels[b]):
                decoder_in = torch.tensor([[tokenizer.pad_token_id] + target[:-1]])        # T5 starts from pad
                logits = tiny_model.t5(inputs_embeds=embeds, attention_mask=mask, decoder_input_ids=decoder_in).logits
                logp = torch.log_softmax(logits[0].double(), dim=-1)
                manual = sum(logp[t, tok].item() for t, tok in enumerate(target))
                assert scores[b, j].item() == pytest.approx(manual, abs=1e-4)
                # and the training loss of that single target is the same quantity, averaged per token
                loss = tiny_model({**one, "labels": torch.tensor([target])})
                assert -loss.item() * len(target) == pytest.approx(manual, abs=1e-4)


# ---------------------------------------------------------------------------------------------------- backbones

def test_sizes_and_backbone_names(tokenizer):
    config = t5_config_for("tiny", tokenizer)
    assert (config.d_model, config.num_layers, config.num_decoder_layers, config.vocab_size) == (64, 2, 2, len(tokenizer))
    assert config.decoder_start_token_id == tokenizer.pad_token_id == 0 and config.eos_token_id == 1
    assert set(SIZES) >= {"tiny", "mini", "small"}
    assert t5_config_for("small", tokenizer).d_model == 512 and t5_config_for("small", tokenizer).num_layers == 6
    with pytest.raises(UserError, match="unknown model size"):
        t5_config_for("huge", tokenizer)
    assert resolve_backbone("tiny") == "tiny"
    assert resolve_backbone(None, 0) == "t5-small" and resolve_backbone(None, 4) == "t5-11b"
    assert resolve_backbone("/some/folder", 3) == "/some/folder"
    with pytest.raises(UserError):
        resolve_backbone(None, 5)


def test_prompts_are_prepended_per_task(tiny_model, encoder, small_ds):
    batch = sequential_batch(small_ds, encoder, small_ds.users[:2])
    embeds, mask = tiny_model.encoder_inputs(batch["input_ids"], batch["whole_word_ids"], batch["attention_mask"],
                                             batch["task"])
    P, L = tiny_model.prompt_num, batch["input_ids"].shape[1]
    assert embeds.shape == (2, P + L, 64) and mask.shape == (2, P + L)
    assert torch.equal(embeds[0, :P], tiny_model.prompts[1]) and mask[:, :P].eq(1).all()
    assert torch.equal(embeds[:, P:], tiny_model.t5.shared(batch["input_ids"]) +
                       tiny_model.whole_word(batch["whole_word_ids"]))
    # another task's prompts (or other whole-word ids) change the encoder output
    other = {**batch, "task": torch.zeros_like(batch["task"])}
    with torch.no_grad():
        h1 = tiny_model.encode(batch)[0].last_hidden_state
        assert not torch.allclose(h1, tiny_model.encode(other)[0].last_hidden_state)
        shifted = {**batch, "whole_word_ids": torch.where(batch["whole_word_ids"] > 0, batch["whole_word_ids"] + 1, 0)}
        assert not torch.allclose(h1, tiny_model.encode(shifted)[0].last_hidden_state)


def test_pretrained_backbone_from_a_local_folder(tokenizer, encoder, small_ds, tmp_path):
    torch.manual_seed(3)
    t5 = T5ForConditionalGeneration(t5_config_for("tiny", tokenizer)).eval()
    folder = tmp_path / "my-t5"
    t5.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    loaded, tok = load_pretrained(str(folder))
    loaded.eval()
    a, b = t5.state_dict(), loaded.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    sentence = " ".join(next(filled_templates(small_ds, small_ds.users[:1])))
    assert tok(sentence)["input_ids"] == tokenizer(sentence)["input_ids"]
    # it drives an HDRec like a from-scratch backbone
    model = HDRec(loaded, task_num=4, prompt_num=3).eval()
    batch = sequential_batch(small_ds, tasks.WordEncoder(tok), small_ds.users[:2])
    with torch.no_grad():
        loss = model(batch)
    assert torch.isfinite(loss) and loss.item() > 0
    # --id_tokens atomic on a pretrained backbone (as pretrain.py): ids become tokens, the embeddings grow to match
    words = tasks.id_words(small_ds)
    assert add_id_tokens(tok, words) == len(words)
    loaded.resize_token_embeddings(len(tok))
    assert loaded.get_input_embeddings().weight.shape[0] == len(tok) == len(tokenizer) + len(words)
    assert all(len(ids) == 1 for ids in tok(words, add_special_tokens=False)["input_ids"])
    batch = sequential_batch(small_ds, tasks.WordEncoder(tok), small_ds.users[:2])
    with torch.no_grad():
        assert torch.isfinite(HDRec(loaded, task_num=4, prompt_num=3).eval()(batch))


def test_pretrained_backbone_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(UserError) as e:
        load_pretrained(str(tmp_path / "no-such-model"))
    assert "no-such-model" in str(e.value) and "--backbone" in str(e.value)


def test_micro_batches_give_the_full_batch_gradient(tokenizer, encoder, small_ds):
    """Accumulating over micro-batches (each trimmed to its own length) gives the whole batch's loss and gradient."""
    import contextlib
    from module import backward_batch, micro_batches, t5_config_for
    from transformers import T5ForConditionalGeneration
    torch.manual_seed(0)
    model = HDRec(T5ForConditionalGeneration(t5_config_for("tiny", tokenizer)), seed=0).eval()  # eval: no dropout
    users = small_ds.users[:7]
    batch = tasks.make_batch(small_ds, encoder, "sequential", users, random.Random(0), "val")
    # one long target, so the other micro-batches are trimmed (non-contiguous slices before micro_batches fixes them)
    batch["labels"] = torch.cat([batch["labels"], torch.full((7, 3), -100)], 1)
    batch["labels"][0, -3:] = batch["labels"][0, 0]
    grads, losses = [], []
    three = 3 * batch["input_ids"].shape[1]                   # a token budget of 3 padded samples
    assert [mb["input_ids"].shape[0] for mb in micro_batches(batch, three)] == [3, 3, 1]
    for micro in (0, three):
        model.zero_grad()
        losses.append(backward_batch(model, batch, micro, contextlib.nullcontext()))
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    assert len(grads[0]) == len(grads[1]) > 0
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_no_output_dropout_drops_the_inputs_but_not_the_output(tokenizer, tmp_path):
    """--output_dropout no: in training, the decoder's input embeddings are still dropped (so its output varies
    with the dropout mask), but its output is the final layer norm's, untouched; T5's own dropout zeroes about half
    of it. The choice survives a checkpoint round trip."""
    from module import InputOnlyDropout, no_output_dropout, save_checkpoint, set_dropout, t5_config_for
    torch.manual_seed(0)
    ids = torch.randint(5, len(tokenizer), (4, 6))

    def outputs(t5):
        """(the decoder's output, its final layer norm's output) of one training forward."""
        t5.train()
        normed = []
        hook = t5.decoder.final_layer_norm.register_forward_hook(lambda m, a, out: normed.append(out))
        out = t5.decoder(input_ids=ids).last_hidden_state
        hook.remove()
        return out, normed[0]

    t5 = T5ForConditionalGeneration(t5_config_for("tiny", tokenizer))
    set_dropout(t5, 0.5)
    out, normed = outputs(t5)
    assert ((out == 0) & (normed != 0)).float().mean() > 0.3        # T5's own: dropout after the final norm
    no_output_dropout(t5)
    out, normed = outputs(t5)
    assert torch.equal(out, normed)
    assert not torch.equal(out, outputs(t5)[0])                      # the input dropout still draws a mask
    save_checkpoint(HDRec(t5), tokenizer, tmp_path / "ck", {"task_num": 4, "prompt_num": 3})
    loaded, _, _ = load_checkpoint(tmp_path / "ck")
    assert isinstance(loaded.t5.decoder.dropout, InputOnlyDropout) and loaded.t5.decoder.dropout.p == 0.5
    out, normed = outputs(loaded.t5)
    assert torch.equal(out, normed)


def test_output_scale_is_one_switch_for_training_and_ranking(atomic_tokenizer, small_ds, tmp_path):
    """--output_scale: the training loss over the items (HDRec.forward) and T5's own logits (which generation and
    ranking read) scale the decoder's output the same way, d_model**-0.5 or (no_output_scale) not at all, and the
    choice survives a checkpoint round trip."""
    import random
    import tasks
    from module import no_output_scale, save_checkpoint, t5_config_for
    encoder = tasks.WordEncoder(atomic_tokenizer)
    items = encoder.single_item_tokens(small_ds.num_items)
    assert items is not None
    rng = random.Random(0)
    users = [u for u in small_ds.users if len(small_ds.sequences[u]) >= 5][:6]
    batch = tasks.collate(tasks.encode_samples(encoder, [tasks.sequential_sample(small_ds, u, rng, "train", "decoder")
                                                         for u in users]), tasks.TASKS.index("sequential"))
    torch.manual_seed(0)
    model = HDRec(T5ForConditionalGeneration(t5_config_for("tiny", atomic_tokenizer)))
    model.eval()

    def losses(model):
        """(HDRec's loss over the items, the same cross-entropy from T5's full logits)."""
        model.set_item_tokens(items)
        with torch.no_grad():
            ours = model(batch)
            embeds, mask = model.encoder_inputs(batch["input_ids"], batch["whole_word_ids"], batch["attention_mask"],
                                                batch["task"])
            logits = model.t5(inputs_embeds=embeds, attention_mask=mask,
                              decoder_input_ids=batch["decoder_input_ids"]).logits
        scored = batch["labels"] != -100
        target = model.item_index[batch["labels"][scored]]
        return ours, torch.nn.functional.cross_entropy(logits[scored][:, model.item_tokens], target)

    scaled, reference = losses(model)
    torch.testing.assert_close(scaled, reference)
    no_output_scale(model.t5)
    unscaled, reference = losses(model)
    torch.testing.assert_close(unscaled, reference)
    assert abs(unscaled - scaled) > 1e-3                             # the switch changed the logits
    save_checkpoint(model, atomic_tokenizer, tmp_path / "ck", {"task_num": 4, "prompt_num": 3})
    loaded, _, _ = load_checkpoint(tmp_path / "ck")
    loaded.eval()
    torch.testing.assert_close(losses(loaded)[0], unscaled)


def test_name_user_no_leaves_the_user_out_and_scores_follow_the_history_alone(atomic_tokenizer, small_ds):
    """--name_user no: no sequential prompt names the user (training, validation, test; history in the encoder or
    the decoder), so two users with the same history get the same scores; with the user named they differ."""
    import dataclasses
    import random
    import tasks
    from evaluation import next_item_scores
    from module import t5_config_for, user_word
    a, b = [u for u in small_ds.users if len(small_ds.sequences[u]) >= 5][:2]
    for split in ("train", "val", "test"):
        for history in tasks.HISTORY_PLACES:
            named, _ = tasks.sequential_sample(small_ds, a, random.Random(0), split, history)
            anonymous, _ = tasks.sequential_sample(small_ds, a, random.Random(0), split, history, name_user=False)
            assert user_word(a) in named and not any(w.startswith("user_") for w in anonymous)
    ds = dataclasses.replace(small_ds, sequences={**small_ds.sequences, b: list(small_ds.sequences[a])})
    encoder = tasks.WordEncoder(atomic_tokenizer)
    torch.manual_seed(0)
    model = HDRec(T5ForConditionalGeneration(t5_config_for("tiny", atomic_tokenizer)))
    with torch.no_grad():                                   # user rows far apart, so naming them shows
        model.t5.shared.weight.normal_(0.0, 1.0)
    model.eval()
    model.set_item_tokens(encoder.single_item_tokens(ds.num_items))
    same = next_item_scores(model, encoder, ds, [a, b], "test", name_user=False)
    torch.testing.assert_close(same[0], same[1])
    differ = next_item_scores(model, encoder, ds, [a, b], "test")
    assert not torch.allclose(differ[0, 1:], differ[1, 1:])


@pytest.mark.parametrize("how", ["sqrt_d", "norm"])
def test_input_scale_scales_what_enters_the_blocks_not_the_output_layer(atomic_tokenizer, small_ds, tmp_path, how):
    """--input_scale: token embeddings enter the encoder and decoder times d_model**0.5 (sqrt_d) or at unit RMS
    (norm); the tied output layer keeps the raw weights; setting it again does not scale twice; a checkpoint
    round trip rebuilds it (the same scores)."""
    import random
    import tasks
    from evaluation import next_item_scores
    from module import save_checkpoint, set_input_scale, t5_config_for
    torch.manual_seed(0)
    model = HDRec(T5ForConditionalGeneration(t5_config_for("tiny", atomic_tokenizer)))
    model.eval()
    t5, ids = model.t5, torch.tensor([[5, 9, 17]])
    raw = t5.shared.weight[ids].detach()
    encoder = tasks.WordEncoder(atomic_tokenizer)
    model.set_item_tokens(encoder.single_item_tokens(small_ds.num_items))
    users = [u for u in small_ds.users if len(small_ds.sequences[u]) >= 3][:4]
    before = next_item_scores(model, encoder, small_ds, users)
    set_input_scale(t5, how)
    set_input_scale(t5, how)                                          # twice: still once
    expected = raw * 64 ** 0.5 if how == "sqrt_d" else raw / raw.pow(2).mean(-1, keepdim=True).sqrt()
    for module in (t5.shared, t5.decoder.embed_tokens, t5.encoder.embed_tokens):
        torch.testing.assert_close(module(ids), expected, rtol=1e-4, atol=1e-5)
    assert torch.equal(t5.lm_head.weight[ids], raw)                   # the output layer reads the raw rows
    after = next_item_scores(model, encoder, small_ds, users)
    assert not torch.allclose(after[:, 1:], before[:, 1:])
    save_checkpoint(model, atomic_tokenizer, tmp_path / "ck", {"task_num": 4, "prompt_num": 3})
    loaded, _, _ = load_checkpoint(tmp_path / "ck")
    loaded.eval()
    loaded.set_item_tokens(encoder.single_item_tokens(small_ds.num_items))
    torch.testing.assert_close(next_item_scores(loaded, encoder, small_ds, users), after)
    set_input_scale(t5, "none")
    torch.testing.assert_close(next_item_scores(model, encoder, small_ds, users), before)


@pytest.mark.parametrize("history", ["decoder", "encoder"])
def test_label_smoothing_is_the_smoothed_cross_entropy_in_training_and_plain_in_evaluation(atomic_tokenizer, small_ds,
                                                                                           history):
    """--label_smoothing e: in training mode the loss is (1 - e) * NLL(target) + e * the mean NLL over every class
    (the items for the decoder's item sequences, the vocabulary for T5's own path), computed here by hand from the
    logits; in evaluation mode (validation losses) it is the plain cross-entropy."""
    from module import set_dropout, t5_config_for
    encoder = tasks.WordEncoder(atomic_tokenizer)
    rng = random.Random(0)
    users = [u for u in small_ds.users if len(small_ds.sequences[u]) >= 5][:6]
    batch = tasks.collate(tasks.encode_samples(encoder, [tasks.sequential_sample(small_ds, u, rng, "train", history)
                                                         for u in users]), tasks.TASKS.index("sequential"))
    torch.manual_seed(0)
    model = HDRec(T5ForConditionalGeneration(t5_config_for("tiny", atomic_tokenizer)))
    set_dropout(model.t5, 0.0)                           # training mode without randomness
    model.set_item_tokens(encoder.single_item_tokens(small_ds.num_items))
    with torch.no_grad():
        embeds, mask = model.encoder_inputs(batch["input_ids"], batch["whole_word_ids"], batch["attention_mask"],
                                            batch["task"])
        logits = model.t5(inputs_embeds=embeds, attention_mask=mask, labels=batch["labels"],
                          decoder_input_ids=batch.get("decoder_input_ids")).logits
    scored = batch["labels"] != -100
    if history == "decoder":
        classes, target = logits[scored][:, model.item_tokens], model.item_index[batch["labels"][scored]]
    else:
        classes, target = logits[scored], batch["labels"][scored]
    log_p = classes.float().log_softmax(-1)
    nll = -log_p[torch.arange(len(target)), target].mean()
    uniform = -log_p.mean(-1).mean()
    model.label_smoothing = 0.2
    for mode, expected in (("train", 0.8 * nll + 0.2 * uniform), ("eval", nll)):
        getattr(model, mode)()
        with torch.no_grad():
            torch.testing.assert_close(model(batch), expected, rtol=1e-4, atol=1e-4)
    assert abs(uniform - nll) > 1e-2             # the two expectations differ by > 2e-3, far beyond the tolerance
