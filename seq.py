"""Sequential (next-item) recommendation: every test user's next item, ranked over all items.

    python seq.py --data_dir ./data/beauty/ --cuda --batch_size 32 --checkpoint ./checkpoint/beauty/

--protocol clean (default): only valid item ids the user has not bought (beams constrained by a prefix trie; with
one-token ids read in the decoder, every item ranked by its likelihood in one pass, which is what the beams find).
--protocol paper: unconstrained beams and history not excluded, as the original code; an invalid id is a miss
(the original filled such gaps with random ids, which we do not do).
Beside the model: the no-training reference rules, and how personal the lists are (distinct lists, item coverage,
overlap with the most-popular list, and the share of lists that change when a user's history is swapped for another's).
"""
import time

from evaluation import (eval_users, input_sensitivity, list_quality, load_run, parser, personalisation,
                        personalisation_warning, print_table, recommend_next, reference_lists, write_results)
from metrics import rank_of, ranking_metrics
from utils import report_user_errors

report_user_errors()
p = parser("sequential recommendation: HR@{1,5,10}, NDCG@{5,10}", beams=True)
p.add_argument("--sensitivity_users", type=int, default=500,
               help="users whose history is swapped for the input-sensitivity figure (0: skip it)")
args = p.parse_args()
started = time.time()

model, tokenizer, meta, ds, encoder, device = load_run(args)
history = meta.get("history", "encoder")
users = eval_users(ds, args.users, args.seed)
t0 = time.time()
lists = recommend_next(model, tokenizer, encoder, ds, users, args.protocol, args.num_beams, args.top_k,
                       args.batch_size, args.seed, history=history)
speed = len(users) / (time.time() - t0)

references = reference_lists(ds, users, args.top_k)
model_name = f"HDRec ({args.protocol})"
all_lists = {model_name: lists, **references}
ranks = {name: [rank_of(ds.test_item(u), items) for u, items in zip(users, ls)] for name, ls in all_lists.items()}
rows = {name: ranking_metrics(r) for name, r in ranks.items()}
personal = {name: personalisation(ls, references["most_popular"], ds.num_items) for name, ls in all_lists.items()}
if args.sensitivity_users:
    # the model's own lists with nothing excluded, before and after the swap
    personal[model_name]["input_sensitivity"] = input_sensitivity(
        lambda d, us: recommend_next(model, tokenizer, encoder, d, us, "clean", args.num_beams, args.top_k,
                                     args.batch_size, args.seed, progress=False, history=history, exclude_bought=False),
        ds, users, args.sensitivity_users, args.seed)
print_table(rows, f"sequential, {len(users)} users, item ids {meta.get('item_ids', 'published')}, "
                  f"{args.num_beams} beams, {speed:.1f} users/s")
print_table(personal, "how personal the top-10 lists are")
warning = personalisation_warning(personal[model_name], personal["co_occurrence"])
if warning:
    print("\n" + warning)
quality = list_quality(lists, ds, users, ds.num_items)
print("top-k lists: " + ", ".join(f"{k} {v}" for k, v in quality.items()))
write_results(args, "seq", meta, ds, users, {**rows, "personalisation": personal, "list_quality": quality,
                                             "users_per_second": speed}, started,
              ranks=ranks[model_name], reference_ranks={n: r for n, r in ranks.items() if n != model_name})
