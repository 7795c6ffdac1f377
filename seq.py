"""Sequential (next-item) recommendation: every test user's next item, ranked over all items.

    python seq.py --data_dir ./data/beauty/ --cuda --batch_size 32 --checkpoint ./checkpoint/beauty/

--protocol clean (default): the evaluation core (ranking.py) ranks the held-out item over all items, the user's
bought items excluded: from the model's score of every item where it gives one (one-token ids read in the decoder,
the learn recipe), else from its beam lists constrained to valid, not-yet-bought ids (ranks past --top_k are not
recorded). --protocol paper: unconstrained beams, nothing excluded, as the original code; an invalid id is a miss
(the original filled such gaps with random ids, which we do not do).
Beside the model: every reference rule of ranking.py on the same users, and how personal the lists are (distinct
lists, item coverage, overlap with the most-popular list, and the share of lists that change when a user's history
is swapped for another's).
"""
import time

from evaluation import (checkpoint_curve_users, eval_users, input_sensitivity, list_quality, load_run, parser, personalisation,
                        personalisation_warning, rank_next, recommend_next, write_run_results)
from ranking import eval_cases, rule_ranks, rule_scores, rule_settings, top_lists_batched
from results import FULL_RANKING, print_table, rank_rows
from utils import UserError, report_user_errors

report_user_errors()
p = parser("sequential recommendation: HR@{1,5,10,20}, NDCG@{5,10,20}", beams=True)
p.add_argument("--sensitivity_users", type=int, default=500,
               help="users whose history is swapped for the input-sensitivity figure (0: skip it)")
p.add_argument("--split", choices=["test", "val"], default="test",
               help="val: each user's validation item (history: the training part), for comparing runs without "
                    "reading test; ranks the users whose ranking did not choose the checkpoint (all but pretrain.py's "
                    "--rank_users sample, on which the kept model is the best of many validations) and writes "
                    "results_seq_val.json")
args = p.parse_args()
started = time.time()

model, tokenizer, meta, ds, encoder, device = load_run(args)
history, name_user = meta.get("history", "encoder"), meta.get("name_user", True)
users = eval_users(ds, args.users, args.seed)
chose_checkpoint = checkpoint_curve_users(ds, meta) if args.split == "val" else set()
users = [u for u in users if u not in chose_checkpoint]
if not users:
    raise UserError(f"seq.py --split val: every user of {args.data_dir} was in the ranking that chose the checkpoint "
                    f"({len(chose_checkpoint)} users): nothing is left to compare runs on")
t0 = time.time()
ranks, lists, list_length = rank_next(model, tokenizer, encoder, ds, users, args.protocol, args.num_beams,
                                      args.top_k, args.batch_size, args.seed, history=history, split=args.split,
                                      name_user=name_user)
speed = len(users) / (time.time() - t0)

model_name = f"HDRec ({args.protocol})" + (", validation" if args.split == "val" else "")
reference_ranks = rule_ranks(ds, users, args.split)
rows = rank_rows(model_name, ranks, reference_ranks, list_length)
# how personal the lists are: the model's and the history-free / history-driven rules' (cheap to list)
_, histories, _ = eval_cases(ds, args.split, users)
rule_lists = {name: top_lists_batched(score_fn, histories, args.top_k) for name, score_fn in
              rule_scores(ds, ("most_popular", "recent_popular", "co_occurrence")).items()}
personal = {name: personalisation(ls, rule_lists["most_popular"], ds.num_items)
            for name, ls in {model_name: lists, **rule_lists}.items()}
if args.sensitivity_users:
    # the model's own lists with nothing excluded, before and after the swap
    personal[model_name]["input_sensitivity"] = input_sensitivity(
        lambda d, us: recommend_next(model, tokenizer, encoder, d, us, "clean", args.num_beams, args.top_k,
                                     args.batch_size, args.seed, progress=False, history=history, split=args.split,
                                     exclude_bought=False, name_user=name_user),
        ds, users, args.sensitivity_users, args.seed)
print_table(rows, f"sequential, {args.split}, {len(users)} users"
                  + (f" (not the {len(chose_checkpoint)} that chose the checkpoint)" if chose_checkpoint else "")
                  + f", item ids {meta.get('item_ids', 'published')}, "
                  + (f"{args.num_beams} beams, top-{list_length} lists, " if list_length else "all items ranked, ")
                  + f"{speed:.1f} users/s")
print_table(personal, f"how personal the top-{args.top_k} lists are")
warning = personalisation_warning(personal[model_name], personal["co_occurrence"])
if warning:
    print("\n" + warning)
quality = list_quality(lists, ds, users, ds.num_items, args.split)
print("top-k lists: " + ", ".join(f"{k} {v}" for k, v in quality.items()))
write_run_results(args, "seq", meta, ds, users, started, protocol=FULL_RANKING if args.protocol == "clean" else "paper",
                  model=model_name, rows=rows, ranks=ranks, reference_ranks=reference_ranks, list_length=list_length,
                  rule_settings=rule_settings(ds), suffix="_val" if args.split == "val" else "",
                  details={"personalisation": personal, "list_quality": quality, "users_per_second": speed,
                           "split": args.split, "users_left_out": len(chose_checkpoint)})
