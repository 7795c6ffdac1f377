"""Top-N recommendation: rank each test user's held-out item among its 99 negatives (negative.txt).

    python topn.py --data_dir ./data/beauty/ --cuda --batch_size 32 --checkpoint ./checkpoint/beauty/

--protocol clean (default): all 100 candidates ranked by the model's sequence likelihood log p(item | prompt).
--protocol paper: 20 unconstrained beams as the original code; the item counts where it appears in the top 10.
"""
import time

from evaluation import (eval_users, input_sensitivity, load_run, parser, personalisation, print_table, rank_topn,
                        topn_popular_lists, write_results)
from metrics import ranking_metrics
from utils import report_user_errors

report_user_errors()
p = parser("top-N recommendation among 100 candidates: HR@{1,5,10}, NDCG@{5,10}", beams=True)
p.add_argument("--sensitivity_users", type=int, default=500,
               help="users whose history is swapped for the input-sensitivity figure (0: skip it)")
args = p.parse_args()
started = time.time()

model, tokenizer, meta, ds, encoder, device = load_run(args)
history = meta.get("history", "encoder")
users = eval_users(ds, args.users, args.seed)
t0 = time.time()
ranks, lists, reference_ranks = rank_topn(model, tokenizer, encoder, ds, users, args.protocol, args.num_beams,
                                          args.top_k, args.batch_size, args.seed, history=history)
speed = len(users) / (time.time() - t0)

model_name = f"HDRec ({args.protocol})"
rows = {model_name: ranking_metrics(ranks), **{rule: ranking_metrics(r) for rule, r in reference_ranks.items()}}
# the candidates differ between users, so distinct lists say little here; the overlap with the candidates' most
# popular and the share of lists that change when only the history is swapped (candidates kept) say more
personal = personalisation(lists, topn_popular_lists(ds, users, args.top_k), ds.num_items)
if args.sensitivity_users:
    personal["input_sensitivity"] = input_sensitivity(
        lambda d, us: rank_topn(model, tokenizer, encoder, ds, us, args.protocol, args.num_beams, args.top_k,
                                args.batch_size, args.seed, progress=False, history=history, history_ds=d)[1],
        ds, users, args.sensitivity_users, args.seed)
print_table(rows, f"top-N among 100 candidates, {len(users)} users, item ids {meta.get('item_ids', 'published')}, "
                  f"{speed:.1f} users/s")
print_table({model_name: personal}, "how personal the top-10 lists are")
if personal.get("input_sensitivity", 1) < 0.5:
    print("\nWARNING: the model's top-N lists barely depend on the user's history "
          f"({personal['input_sensitivity']:.1%} change when it is swapped)"
          + (": the paper's top-N prompt holds only the user id" if history == "encoder" else ""))
write_results(args, "topn", meta, ds, users, {**rows, "personalisation": personal, "users_per_second": speed}, started,
              ranks=ranks, reference_ranks=reference_ranks)
