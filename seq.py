"""Sequential (next-item) recommendation: beam search over item ids for every test user.

    python seq.py --data_dir ./data/beauty/ --cuda --batch_size 32 --checkpoint ./checkpoint/beauty/

--protocol clean (default): beams are constrained to valid item ids the user has not bought (a prefix trie).
--protocol paper: unconstrained beams and history not excluded, as the original code; an invalid id is a miss
(the original filled such gaps with random ids, which we do not do).
"""
import time

from evaluation import (eval_users, list_quality, load_run, parser, print_table, recommend_next,
                        reference_sequential, write_results)
from metrics import rank_of, ranking_metrics

p = parser("sequential recommendation: HR@{1,5,10}, NDCG@{5,10}", beams=True)
args = p.parse_args()
started = time.time()

model, tokenizer, meta, ds, encoder, device = load_run(args)
users = eval_users(ds, args.users, args.seed)
t0 = time.time()
lists = recommend_next(model, tokenizer, encoder, ds, users, args.protocol, args.num_beams, args.top_k,
                       args.batch_size, args.seed)
speed = len(users) / (time.time() - t0)

rows = {f"HDRec ({args.protocol})": ranking_metrics(rank_of(ds.test_item(u), items) for u, items in zip(users, lists)),
        **reference_sequential(ds, users, args.top_k)}
print_table(rows, f"sequential, {len(users)} users, item ids {meta.get('item_ids', 'published')}, "
                  f"{args.num_beams} beams, {speed:.1f} users/s")
quality = list_quality(lists, ds, users, ds.num_items)
print("top-k lists: " + ", ".join(f"{k} {v}" for k, v in quality.items()))
write_results(args, "seq", meta, ds, users, {**rows, "list_quality": quality, "users_per_second": speed}, started)
