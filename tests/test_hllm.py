"""HSFT (hllm/): item cache alignment, losses, full-ranking metrics, LoRA round trip, readers, end to end.
Tiny random Llama models and a word-level tokenizer are made in tmp dirs; everything runs offline on CPU."""
import json
import math
from pathlib import Path

import pytest
import torch

from dataset import DataError
from hllm.data import load_interactions, load_pixelrec
from hllm.evaluate import evaluate_model
from hllm.item_caching import build_item_cache, load_item_cache, save_item_cache
from hllm.model import bce_loss, build_user_llm, load_user_llm, nce_loss, resolve_mode, save_user_llm
from item_text import item_texts, read_item_meta

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
WORDS = ("this item means in one word : \" . title brand tag description great soft shampoo hair cream red blue "
         "cheap nice smell lotion item_a item_b item_c item_d item_e five stars good bad").split()


def tiny_llama(folder, hidden=32, with_tokenizer=True, seed=0):
    """A 2-layer random Llama (and a word-level tokenizer) saved as a Hugging Face folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    torch.manual_seed(seed)
    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", "<s>", "</s>", *dict.fromkeys(WORDS)])}
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, pad_token_id=0, bos_token_id=2, eos_token_id=3)
    LlamaForCausalLM(config).save_pretrained(folder)
    if with_tokenizer:
        tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                                eos_token="</s>").save_pretrained(folder)
    return str(folder)


def write_p5_dir(folder, sequences, explanations=None):
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sequential.txt").write_text("".join(f"{u} {' '.join(map(str, s))}\n" for u, s in sequences.items()))
    items = sorted({i for s in sequences.values() for i in s})
    (folder / "datamaps.json").write_text(json.dumps({"id2user": {str(u): f"U{u}" for u in sequences},
                                                      "id2item": {str(i): f"item_{'abcde'[i - 1]}" for i in items}}))
    if explanations is not None:
        (folder / "explanation.json").write_text(json.dumps({"train": explanations, "val": [], "test": []}))
    return folder


SEQS = {1: [1, 2, 3, 4], 2: [2, 3, 4, 5], 3: [1, 3, 5, 2], 4: [5, 4, 1, 3], 5: [2, 1, 4, 5, 3]}
REVIEWS = [{"user": u, "item": i, "explanation": f"{w} {c}", "summary": "five stars"}
           for u, s in SEQS.items() for i, w, c in zip(s, ["great", "soft", "nice", "cheap", "good"],
                                                      ["shampoo", "cream", "lotion", "hair", "smell"])]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("hllm")
    return {"item_llm": tiny_llama(root / "item_llm", hidden=32, seed=1),
            "user_llm": tiny_llama(root / "user_llm", hidden=48, with_tokenizer=False, seed=2),
            "data": write_p5_dir(root / "data", SEQS, REVIEWS), "root": root}


# ----------------------------------------------------------------------------- item cache

def test_cache_rows_follow_requested_ids_not_file_order(tmp_path):
    emb = torch.arange(1, 13, dtype=torch.float32).reshape(4, 3)  # row r = item ids[r]
    ids = [3, 1, 4, 2]  # shuffled on disk
    save_item_cache(tmp_path / "c.safetensors", emb, ids, {"raw_ids": ["c", "a", "d", "b"]})
    out, meta = load_item_cache(tmp_path / "c.safetensors", [1, 2, 3, 4], {1: "a", 2: "b", 3: "c", 4: "d"})
    assert torch.equal(out, emb[[1, 3, 0, 2]])
    assert meta["raw_ids"] == ["c", "a", "d", "b"]
    out, _ = load_item_cache(tmp_path / "c.safetensors", torch.tensor([4, 3]))  # a tensor of ids works too
    assert torch.equal(out, emb[[2, 0]])


def test_cache_rejects_str_ids_missing_items_zero_rows_and_other_datasets(tmp_path):
    path = tmp_path / "c.safetensors"
    save_item_cache(path, torch.ones(3, 2), [1, 2, 3], {"raw_ids": ["a", "b", "c"]})
    with pytest.raises(DataError, match="type str"):
        load_item_cache(path, ["1", "2", "3"])  # the str/int mismatch that gives all-zero rows in public ports
    with pytest.raises(DataError, match="1 of 4 items are not in the cache"):
        load_item_cache(path, [1, 2, 3, 4])
    with pytest.raises(DataError, match="another dataset"):
        load_item_cache(path, [1, 2, 3], {1: "a", 2: "x", 3: "c"})
    save_item_cache(path, torch.tensor([[1.0, 2.0], [0.0, 0.0]]), [1, 2], {})
    with pytest.raises(DataError, match="all-zero"):
        load_item_cache(path, [1, 2])
    save_item_cache(path, torch.ones(2, 2), [1, 1], {})
    with pytest.raises(DataError, match="appears twice"):
        load_item_cache(path, [1])
    from safetensors.torch import save_file
    save_file({"embeddings": torch.ones(1, 2)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(DataError, match="not an HSFT item cache"):
        load_item_cache(tmp_path / "foreign.safetensors", [1])


def test_build_item_cache_and_reload(tiny, tmp_path):
    ds = load_interactions(str(tiny["data"]))
    meta = build_item_cache(ds, tmp_path / "items.safetensors", tiny["item_llm"], "summary", pooling="mean")
    assert meta["text_source"] == "summary" and meta["pooling"] == "mean" and meta["num_items"] == 5
    emb, meta2 = load_item_cache(tmp_path / "items.safetensors", [5, 4, 3, 2, 1], ds.id2item)
    assert emb.shape == (5, 32) and meta2["data_hash"] == meta["data_hash"]
    # the cached row of item 3 is what embedding its text alone gives (no batch / padding effects)
    from hllm.item_caching import embed_texts
    from hllm.llm import load_base_model, load_tokenizer
    texts, _, _ = item_texts(ds, "summary")
    model, path = load_base_model(tiny["item_llm"])
    alone = embed_texts(model, load_tokenizer(path), [texts[3]], "mean", progress=False)
    torch.testing.assert_close(emb[2], alone[0], rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- item text and readers

def test_item_text_sources_and_leave_one_out(tmp_path):
    ds = load_interactions(str(write_p5_dir(tmp_path / "d", SEQS, REVIEWS)))
    texts, source, fallback = item_texts(ds, "auto")  # no rationale file: review summaries
    assert source == "summary" and texts[1] == "five stars" and fallback == 0
    rationale = [{**r, "item_attribution": f"attr{r['user']}", "item_audience": f"aud{r['user']}"} for r in REVIEWS]
    (tmp_path / "d" / "explanation_rationale.json").write_text(json.dumps({"train": rationale}))
    texts, source, _ = item_texts(ds, "auto")
    # item 1 was bought by users 1, 3, 5 (training part) and 4 (its validation item: that review is left out)
    assert source == "rationale" and texts[1] == "attr1 aud1 attr3 aud3 attr5 aud5"
    with pytest.raises(DataError, match="needs --item_meta"):
        item_texts(ds, "meta")


def test_amazon_meta_reader(tmp_path):
    path = tmp_path / "meta.json"
    path.write_text(json.dumps({"asin": "A1", "title": "Red cream", "brand": "Acme", "description": ["Soft", "nice"]})
                    + "\n" + repr({"asin": "A2", "title": "Blue lotion"}) + "\n")  # 2014 dumps: Python literals
    texts = read_item_meta(path)
    assert texts == {"A1": "Title: Red cream. Brand: Acme. Description: Soft nice.", "A2": "Title: Blue lotion."}
    path.write_text('{"title": "no asin"}\n')
    with pytest.raises(DataError, match=r"meta.json:1: no 'asin'"):
        read_item_meta(path)


def test_pixelrec_reader(tmp_path):
    (tmp_path / "dataset").mkdir()
    (tmp_path / "information").mkdir()
    (tmp_path / "dataset" / "Tiny.csv").write_text(
        "item_id,user_id,timestamp\n"
        "i9,u1,30\ni7,u1,10\ni8,u1,20\n"     # u1 in time order: i7 i8 i9
        "i8,u2,5\ni9,u2,6\ni7,u2,7\ni6,u2,8\n"
        "i7,u3,1\ni8,u3,2\n")                # u3: only 2 interactions -> dropped
    (tmp_path / "information" / "Tiny.csv").write_text(
        "item_id,title,tag,description\ni6,Six,toy,A toy\ni7,Seven,book,\ni8,Eight,,An 8\ni9,Nine,game,Fun\n")
    ds = load_interactions("Tiny", tmp_path)
    assert ds.kind == "pixelrec" and ds.num_items == 4 and len(ds.sequences) == 2
    raw = [[ds.id2item[i] for i in s] for s in ds.sequences.values()]
    assert raw == [["i7", "i8", "i9"], ["i8", "i9", "i7", "i6"]]
    assert ds.id2item[ds.val_item(2)] == "i7" and ds.id2item[ds.test_item(2)] == "i6"
    texts, source, fallback = item_texts(ds)  # auto: information/<name>.csv is found
    assert source == "meta" and fallback == 0
    assert texts[1] == "Title: Seven. Tag: book." and texts[4] == "Title: Six. Tag: toy. Description: A toy."
    (tmp_path / "dataset" / "Bad.csv").write_text("item_id,user_id,timestamp\ni1,u1,yesterday\n")
    with pytest.raises(DataError, match=r"Bad.csv:2: timestamp 'yesterday'"):
        load_pixelrec(tmp_path, "Bad")


# ----------------------------------------------------------------------------- losses

def test_nce_loss_by_hand():
    user = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)  # float64: the loss is ~1e-5
    pos = torch.tensor([[1.0, 1.0], [0.0, 1.0]], dtype=torch.float64)
    pos_ids = torch.tensor([7, 8])
    negs = torch.tensor([[0.0, 1.0], [-3.0, 0.0]], dtype=torch.float64)
    neg_ids = torch.tensor([8, 9])  # row 2's positive (8) is also a negative: it must be left out there
    scale = 1 / 0.07
    c = 1 / math.sqrt(2)
    row1 = -math.log(math.exp(c * scale) / (math.exp(c * scale) + math.exp(0.0) + math.exp(-scale)))
    row2 = -math.log(math.exp(scale) / (math.exp(scale) + math.exp(0.0)))
    got = nce_loss(user, pos, pos_ids, negs, neg_ids, torch.tensor(scale, dtype=torch.float64))
    assert got.item() == pytest.approx((row1 + row2) / 2, rel=1e-9)


def test_bce_loss_by_hand():
    user = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    pos = torch.tensor([[1.0, 1.0], [0.0, 1.0]])
    negs = torch.tensor([[0.0, 1.0], [-3.0, 0.0]])
    c = 1 / math.sqrt(2)
    softplus = lambda x: math.log1p(math.exp(x))  # -log(1 - sigmoid(x)) = softplus(x)
    row1 = softplus(-c) + (softplus(0.0) + softplus(-1.0)) / 2
    row2 = softplus(-1.0) + softplus(0.0)  # its positive (8) is not its own negative
    got = bce_loss(user, pos, torch.tensor([7, 8]), negs, torch.tensor([8, 9]), torch.tensor(1.0))
    assert got.item() == pytest.approx((row1 + row2) / 2, rel=1e-6)


# ----------------------------------------------------------------------------- user LLM

def test_qlora_falls_back_on_cpu():
    messages = []
    assert resolve_mode(True, True, False, log=messages.append) == ("qlora" if torch.cuda.is_available() else "lora")
    assert torch.cuda.is_available() or "falling back to LoRA" in messages[0]
    assert resolve_mode(False, False, False) == "full" and resolve_mode(True, True, True) == "none"


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_save_reload_gives_identical_scores(tiny, tmp_path, mode):
    ds = load_interactions(str(tiny["data"]))
    torch.manual_seed(0)
    table = torch.cat([torch.zeros(1, 32), torch.randn(ds.num_items, 32)])
    model = build_user_llm(tiny["user_llm"], table, mode)
    trainable = [p for p in model.parameters() if p.requires_grad]
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    if mode == "lora":  # adapters, projection and temperature train; the base weights stay frozen
        assert any("lora_" in n for n in names)
        assert all("lora_" in n or n.startswith(("item_proj", "logit_scale")) for n in names)
    else:
        assert len(trainable) == len(list(model.parameters()))
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    ids = torch.tensor([[1, 2, 3, 4], [2, 3, 4, 0]])
    for _ in range(3):  # move the LoRA B matrices away from zero so the adapter matters
        loss = model.loss(ids, "nce", 4)
        opt.zero_grad()
        loss.backward()
        opt.step()
    before, ranks = evaluate_model(model, ds, "test")
    save_user_llm(model, tmp_path, mode, {"max_seq_len": 20})
    if mode == "lora":
        assert (tmp_path / "user_llm" / "adapter_model.safetensors").exists()
    reloaded, config = load_user_llm(tmp_path, table)
    after, ranks_after = evaluate_model(reloaded, ds, "test")
    assert config["mode"] == mode and ranks_after == ranks and after == before
    q = torch.tensor([[1, 2, 0], [3, 4, 5]])
    torch.testing.assert_close(reloaded.user_vectors(q, (q != 0).long()), model.eval().user_vectors(q, (q != 0).long()))


def test_training_lowers_the_loss(tiny):
    torch.manual_seed(0)
    table = torch.cat([torch.zeros(1, 32), torch.randn(5, 32)])
    model = build_user_llm(tiny["user_llm"], table, "lora")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.tensor([[1, 2, 3, 4, 5], [1, 2, 3, 4, 0]])
    losses = []
    for _ in range(30):
        loss = model.loss(ids, "bce", 5)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


# ----------------------------------------------------------------------------- end to end

@pytest.mark.slow
def test_end_to_end_cache_train_eval(tiny, tmp_path, capsys):
    from hllm import main as hllm_main
    cache = tmp_path / "items.safetensors"
    common = ["--dataset", str(tiny["data"]), "--loss", "bce", "--use_item_cache", "True",
              "--item_cache_path", str(cache), "--user_pretrain_dir", tiny["user_llm"],
              "--item_pretrain_dir", tiny["item_llm"], "--seed", "3"]
    base = hllm_main.main(common + ["--val_only", "True", "--out", str(tmp_path / "base")])
    assert cache.exists() and base["details"]["mode"] == "none"  # the missing cache was built first
    built = cache.stat().st_mtime_ns
    capsys.readouterr()
    hllm_main.main(common + ["--val_only", "True", "--out", str(tmp_path / "base")])
    assert cache.stat().st_mtime_ns == built and "embedding the items again" not in capsys.readouterr().out
    hllm_main.main(common + ["--val_only", "True", "--out", str(tmp_path / "other"), "--pooling", "mean"])
    assert "it was made with pooling 'last', not 'mean'; embedding the items again" in capsys.readouterr().out
    hllm_main.main(common + ["--val_only", "True", "--out", str(tmp_path / "other"), "--pooling", "mean",
                             "--max_text_tokens", "16"])
    assert "it was made with max_text_tokens 128, not 16" in capsys.readouterr().out
    hllm_main.main(common + ["--val_only", "True", "--out", str(tmp_path / "base")])   # back to the first settings
    assert "it was made with pooling 'mean', not 'last'" in capsys.readouterr().out
    config = tmp_path / "hllm.yaml"
    config.write_text("learning_rate: 0.01\nepochs: 1\nstopping_step: 2\nsome_hllm_setting: 3\n")
    report = hllm_main.main(common + ["--use_qlora", "True", "--config_file", str(config), "--batch_size", "2",
                                      "--out", str(tmp_path / "ft")])
    saved = json.loads((tmp_path / "ft" / "results.json").read_text())
    assert saved == report and saved["format"] == "hdrec-results/2"              # the one results format
    assert saved["details"]["mode"] == "lora" and saved["config"]["lr"] == 0.01 and saved["config"]["epochs"] == 1
    assert saved["config"]["endure_times"] == 2                                  # HLLM's stopping_step
    assert len(saved["training"]["log"]) == 1 and set(saved["details"]["validation"]) == {
        "HR@1", "HR@5", "HR@10", "HR@20", "NDCG@5", "NDCG@10", "NDCG@20"}
    model = saved["model"]
    assert model == "HSFT fine-tuned (lora, bce)" and saved["protocol"] == "full ranking, history excluded"
    assert saved["details"]["item_cache"]["text_source"] == "summary"
    assert (tmp_path / "ft" / "user_llm" / "adapter_model.safetensors").exists()
    assert saved["results"][model]["HR@20"] == 1.0  # 5 items: every target is within the top 20
    # every test user's rank, for paired tests without a rerun (scripts/repeat.py compare), and every rule's
    from metrics import ranking_metrics
    from ranking import RULE_NAMES
    assert len(saved["user_ids"]) == len(saved["ranks"]) == len(set(saved["user_ids"]))
    assert ranking_metrics(saved["ranks"]) == pytest.approx(saved["results"][model])
    assert set(saved["reference_ranks"]) == set(RULE_NAMES)
    for rule, ranks in saved["reference_ranks"].items():
        assert ranking_metrics(ranks) == pytest.approx(saved["results"][rule])
    again = hllm_main.main(common + ["--checkpoint", str(tmp_path / "ft"), "--out", str(tmp_path / "again")])
    assert again["results"]["HSFT checkpoint ft"] == saved["results"][model]
