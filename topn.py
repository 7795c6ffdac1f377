"""Top-N recommendation: rank each test user's held-out item among its 99 negatives (negative.txt).

    python topn.py --data_dir ./data/beauty/ --cuda --batch_size 32 --checkpoint ./checkpoint/beauty/

--protocol clean (default): all 100 candidates scored by the model's sequence likelihood log p(item | prompt) and
ranked by the evaluation core (ranking.py), as every reference rule is on the same candidates.
--protocol paper: 20 unconstrained beams as the original code; the item counts where it appears in the top 10.
The model is the top-N task's own best (best_topn/ in the checkpoint dir, where pretrain.py kept one), else the
run's best model; the output and the results file (checkpoint_read) say which.
"""
import time

from evaluation import (eval_users, input_sensitivity, load_run, parser, personalisation, rank_topn, task_checkpoint,
                        write_run_results)
from ranking import RULE_NAMES, rule_scores, rule_settings
from results import print_table, rank_rows
from utils import report_user_errors

report_user_errors()
p = parser("top-N recommendation among 100 candidates: HR@{1,5,10,20}, NDCG@{5,10,20}", beams=True)
p.add_argument("--sensitivity_users", type=int, default=500,
               help="users whose history is swapped for the input-sensitivity figure (0: skip it)")
args = p.parse_args()
started = time.time()

model_dir = task_checkpoint(args.checkpoint, "topn")    # best_topn/ where pretrain.py kept the task's own best
model, tokenizer, meta, ds, encoder, device = load_run(args, model_dir)
history = meta.get("history", "encoder")
users = eval_users(ds, args.users, args.seed)
rules = rule_scores(ds, RULE_NAMES)
t0 = time.time()
topn = rank_topn(model, tokenizer, encoder, ds, users, args.protocol, args.num_beams, args.top_k, args.batch_size,
                 args.seed, history=history, rules=rules)
speed = len(users) / (time.time() - t0)

model_name = f"HDRec ({args.protocol})"
rows = rank_rows(model_name, topn["ranks"], topn["reference_ranks"], topn["list_length"])
# the candidates differ between users, so distinct lists say little here; the overlap with the candidates' most
# popular and the share of lists that change when only the history is swapped (candidates kept) say more
personal = personalisation(topn["lists"], topn["popular_lists"], ds.num_items)
if args.sensitivity_users:
    personal["input_sensitivity"] = input_sensitivity(
        lambda d, us: rank_topn(model, tokenizer, encoder, ds, us, args.protocol, args.num_beams, args.top_k,
                                args.batch_size, args.seed, progress=False, history=history, history_ds=d,
                                rules={})["lists"],
        ds, users, args.sensitivity_users, args.seed)
print_table(rows, f"top-N among 100 candidates, {len(users)} users, item ids {meta.get('item_ids', 'published')}, "
                  f"{speed:.1f} users/s")
print_table({model_name: personal}, "how personal the top-10 lists are")
if personal.get("input_sensitivity", 1) < 0.5:
    print("\nWARNING: the model's top-N lists barely depend on the user's history "
          f"({personal['input_sensitivity']:.1%} change when it is swapped)"
          + (": the paper's top-N prompt holds only the user id" if history == "encoder" else ""))
write_run_results(args, "topn", meta, ds, users, started, protocol="100 candidates" + (
                  ", paper beams" if args.protocol == "paper" else ""), model=model_name, rows=rows,
                  ranks=topn["ranks"], reference_ranks=topn["reference_ranks"], list_length=topn["list_length"],
                  rule_settings=rule_settings(ds), details={"personalisation": personal, "users_per_second": speed},
                  checkpoint_read=str(model_dir))
