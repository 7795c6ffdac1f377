"""Top-N recommendation: rank each test user's held-out item among its 99 negatives (negative.txt).

    python topn.py --data_dir ./data/beauty/ --cuda --batch_size 32 --checkpoint ./checkpoint/beauty/

--protocol clean (default): all 100 candidates ranked by the model's sequence likelihood log p(item | prompt).
--protocol paper: 20 unconstrained beams as the original code; the item counts where it appears in the top 10.
"""
import time

from evaluation import eval_users, load_run, parser, print_table, rank_topn, write_results
from metrics import ranking_metrics

p = parser("top-N recommendation among 100 candidates: HR@{1,5,10}, NDCG@{5,10}", beams=True)
args = p.parse_args()
started = time.time()

model, tokenizer, meta, ds, encoder, device = load_run(args)
users = eval_users(ds, args.users, args.seed)
t0 = time.time()
ranks, reference_ranks = rank_topn(model, tokenizer, encoder, ds, users, args.protocol, args.num_beams, args.top_k,
                                   args.batch_size, args.seed)
speed = len(users) / (time.time() - t0)

rows = {f"HDRec ({args.protocol})": ranking_metrics(ranks),
        **{rule: ranking_metrics(r) for rule, r in reference_ranks.items()}}
print_table(rows, f"top-N among 100 candidates, {len(users)} users, item ids {meta.get('item_ids', 'published')}, "
                  f"{speed:.1f} users/s")
write_results(args, "topn", meta, ds, users, {**rows, "users_per_second": speed}, started)
