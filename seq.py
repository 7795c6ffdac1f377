"""Sequential (next-item) recommendation: beam search over item ids for every test user.

    python seq.py --data_dir ./data/beauty/ --cuda --batch_size 32 --checkpoint ./checkpoint/beauty/

--protocol clean (default): beams are constrained to valid item ids the user has not bought (a prefix trie).
--protocol paper: unconstrained beams and history not excluded, as the original code; an invalid id is a miss
(the original filled such gaps with random ids, which we do not do).
"""
import random
import time

import torch
from tqdm import tqdm

import tasks
from evaluation import (autocast, batches, decode_items, eval_users, item_trie, list_quality, load_run, parser,
                        print_table, reference_sequential, write_results)
from metrics import rank_of, ranking_metrics
from module import TrieConstraint
from transformers import LogitsProcessorList

p = parser("sequential recommendation: HR@{1,5,10}, NDCG@{5,10}")
p.add_argument("--num_beams", type=int, default=20)
p.add_argument("--top_k", type=int, default=10, help="length of each recommendation list")
args = p.parse_args()
started = time.time()

model, tokenizer, meta, ds, encoder, device = load_run(args)
users = eval_users(ds, args.users, args.seed)
trie = item_trie(tokenizer, encoder, ds)
max_len = max(len(path) for path in trie.paths.values())
rng = random.Random(args.seed)

lists = []
for chunk in tqdm(list(batches(users, args.batch_size)), desc="seq", dynamic_ncols=True):
    samples = [tasks.sequential_sample(ds, u, rng, "test") for u in chunk]
    batch = tasks.to_device(tasks.collate(tasks.encode_samples(encoder, samples), tasks.TASKS.index("sequential")),
                            device)
    constraint = []
    if args.protocol == "clean":
        banned = [trie.banned_children(ds.sequences[u][:-1]) for u in chunk]
        constraint = [TrieConstraint(trie, banned, args.num_beams, tokenizer.eos_token_id)]
    with autocast(device):
        out = model.generate(batch, num_beams=args.num_beams, num_return_sequences=args.top_k,
                             max_new_tokens=max_len, logits_processor=LogitsProcessorList(constraint))
    lists += decode_items(tokenizer, out, args.top_k)
seconds = time.time() - started

model_metrics = ranking_metrics(rank_of(ds.test_item(u), items) for u, items in zip(users, lists))
rows = {f"HDRec ({args.protocol})": model_metrics, **reference_sequential(ds, users, args.top_k)}
print_table(rows, f"sequential, {len(users)} users, item ids {meta.get('item_ids', 'published')}, "
                  f"{args.num_beams} beams, {len(users) / seconds:.1f} users/s")
quality = list_quality(lists, ds, users, ds.num_items)
print("top-k lists: " + ", ".join(f"{k} {v}" for k, v in quality.items()))
write_results(args, "seq", meta, ds, users, {**rows, "list_quality": quality, "users_per_second": len(users) / seconds},
              started)
