"""HSFT throughput: item-caching items/s, training sequences/s, evaluation users/s (full ranking).

    python hllm/bench.py                                   # tiny random Llama models, synthetic data (seconds)
    python hllm/bench.py --item_llm default --user_llm default --items 64 --users 256   # SmolLM2-135M
    python hllm/bench.py --data_dir DIR --item_cache items.safetensors --item_llm default --user_llm default
        # a real dataset: its own item texts (--item_text), its users, all of them evaluated over all items

Prints item caching items/s, training sequences (users)/s in the mode main.py trains (bf16 autocast where the device
has it), evaluation users/s (full ranking of the held-out item, history excluded), and peak memory (the process's
peak resident set; on CUDA also the peak GPU memory). Figures depend on the machine and its load: compare runs on
the same machine, with nothing else running.
"""
import argparse
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

import torch

from dataset import Dataset
from hllm.data import load_interactions
from hllm.evaluate import evaluate_model, pad_right
from hllm.main import length_bucketed_batches
from hllm.item_caching import embed_texts, load_item_cache
from hllm.llm import load_base_model, load_tokenizer
from hllm.model import build_user_llm, trainable_parameters
from item_text import TEXT_SOURCES, item_texts
from utils import bf16_supported, pick_device, report_user_errors, seed_everything

WORDS = "soft red blue cream lotion shampoo hair skin nice cheap smell great face oil dry gentle".split()


def tiny_model(folder, hidden, layers, vocab):
    """A random Llama of the given size (and a word-level tokenizer over `vocab`), saved to `folder`."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    words = {w: i for i, w in enumerate(["<pad>", "<unk>", "<s>", "</s>", *vocab])}
    config = LlamaConfig(vocab_size=len(words), hidden_size=hidden, intermediate_size=4 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=512, pad_token_id=0, bos_token_id=2, eos_token_id=3)
    LlamaForCausalLM(config).save_pretrained(folder)
    tok = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(folder)
    return str(folder)


def synthetic_dataset(num_users, num_items, length, generator):
    sequences = {u: (torch.randperm(num_items, generator=generator)[:length] + 1).tolist()
                 for u in range(1, num_users + 1)}
    return Dataset(Path("synthetic"), sequences, num_items, {}, {u: f"U{u}" for u in sequences},
                   {i: f"I{i}" for i in range(1, num_items + 1)})


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--item_llm", default="tiny", help="'tiny' (random, made here), 'default' (SmolLM2-135M) or a path")
    p.add_argument("--user_llm", default="tiny")
    p.add_argument("--tiny_hidden", type=int, default=128)
    p.add_argument("--tiny_layers", type=int, default=4)
    p.add_argument("--data_dir", default=None, help="a real dataset (needs --item_cache); default synthetic")
    p.add_argument("--item_cache", default=None)
    p.add_argument("--items", type=int, default=256, help="items to embed (with --data_dir: a seeded sample of its items)")
    p.add_argument("--item_text", default="auto", choices=TEXT_SOURCES, help="with --data_dir: which item text")
    p.add_argument("--users", type=int, default=512, help="synthetic users")
    p.add_argument("--length", type=int, default=12, help="synthetic sequence length")
    p.add_argument("--text_words", type=int, default=48, help="words per synthetic item text")
    p.add_argument("--mode", default="lora", choices=("lora", "full"))
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--max_seq_len", type=int, default=20)
    p.add_argument("--cuda", action="store_true")
    p.add_argument("--seed", type=int, default=2022)
    args = p.parse_args()
    if args.data_dir and not args.item_cache:
        p.error("--data_dir needs --item_cache (the real items' embeddings, from hllm/item_caching.py)")
    ds = load_interactions(data_dir=args.data_dir) if args.data_dir else None   # bad data fails now, not after phase 1
    seed_everything(args.seed)
    device = pick_device(args.cuda)
    generator = torch.Generator().manual_seed(args.seed)
    tmp = tempfile.TemporaryDirectory()
    resolve = lambda name, sub: (tiny_model(Path(tmp.name) / sub, args.tiny_hidden, args.tiny_layers, WORDS)
                                 if name == "tiny" else None if name == "default" else name)
    print(f"device {device}, torch threads {torch.get_num_threads()}")

    # 1. item caching: embed synthetic item texts
    item_model, path = load_base_model(resolve(args.item_llm, "item"))
    item_model.to(device)
    tokenizer = load_tokenizer(path)
    if ds is not None:
        by_item, source, *_ = item_texts(ds, args.item_text)
        picked = random.Random(args.seed).sample(sorted(by_item), min(args.items, len(by_item)))
        texts = [by_item[i] for i in picked]
    else:
        texts = [" ".join(WORDS[j % len(WORDS)] for j in range(i, i + args.text_words)) for i in range(args.items)]
        source = f"synthetic, {args.text_words} words"
    embed_texts(item_model, tokenizer, texts[:8], device=device, progress=False)  # warm-up
    start = time.time()
    embeddings = embed_texts(item_model, tokenizer, texts, device=device, progress=False)
    seconds = time.time() - start
    words = sum(len(t.split()) for t in texts) / len(texts)
    print(f"item caching: {len(texts)} items ({source} text, {words:.0f} words on average) in {seconds:.2f}s = "
          f"{len(texts) / seconds:.1f} items/s ({Path(path).name}, dim {embeddings.shape[1]})")
    del item_model

    # 2. training and 3. evaluation of the user LLM
    if args.data_dir:
        embeddings, _ = load_item_cache(args.item_cache, list(range(1, ds.num_items + 1)), ds.id2item)
    else:
        ds = synthetic_dataset(args.users, args.items, args.length, generator)
    table = torch.cat([torch.zeros(1, embeddings.shape[1]), embeddings])
    model = build_user_llm(resolve(args.user_llm, "user"), table, args.mode, device)
    optimizer = torch.optim.AdamW(trainable_parameters(model), lr=1e-4)
    sequences = [ds.train_items(u)[-(args.max_seq_len + 1):] for u in ds.sequences]
    # shuffled batches of similar lengths, as hllm/main.py trains (padding costs as much as real items on a CPU)
    batches = [[sequences[i] for i in b] for b in
               length_bucketed_batches([len(s) for s in sequences], args.batch_size, generator)]
    use_bf16 = bf16_supported(device)
    seen, start = 0, None
    for step in range(args.steps + 1):  # step 0 is warm-up
        if step == 1:
            start = time.time()
        batch = batches[step % len(batches)]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            loss = model.loss(pad_right(batch).to(device), "nce", min(256, ds.num_items), generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        seen += len(batch) if step else 0
    seconds = time.time() - start
    print(f"training ({args.mode}{', bf16 autocast' if use_bf16 else ''}): {seen} sequences (users) in {seconds:.2f}s "
          f"= {seen / seconds:.1f} users/s (batch {args.batch_size}, {sum(p.numel() for p in trainable_parameters(model)):,} "
          f"trainable params; one epoch of {len(sequences)} users: ~{len(sequences) / (seen / seconds) / 60:.1f} min)")
    start = time.time()
    evaluate_model(model, ds, "test", 64, args.max_seq_len, device)
    seconds = time.time() - start
    print(f"evaluation: {len(ds.sequences)} users x {ds.num_items} items in {seconds:.2f}s = "
          f"{len(ds.sequences) / seconds:.1f} users/s")
    print(f"peak memory (resident set of this process): {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")
    if device.type == "cuda":
        print(f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")


if __name__ == "__main__":
    report_user_errors()
    main()
