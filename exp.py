"""Explanation generation (or review summaries): generate text for every test review record and score it.

    python exp.py --data_dir ./data/beauty/ --cuda --batch_size 32 --checkpoint ./checkpoint/beauty/

Scores BLEU-1/4 and ROUGE-1/2/L (F1, x100) against the review's own sentence (`explanation`, as POD/RDRec) and,
when the records carry it, against the LLM-written `groundtruth_explanation` (as HDRec) — two different references,
reported separately and not comparable with each other — plus the feature-level measures FMR, FCR and DIV.
Predictions go to predictions_exp.jsonl, metrics to results_exp.json in the checkpoint dir.
"""
import json
import time
from pathlib import Path

import tasks
from evaluation import autocast, batches, eval_users, load_run, parser, write_run_results
from metrics import feature_metrics, text_metrics
from results import print_table
from utils import UserError, atomic_write_text, progress_bar, report_user_errors

report_user_errors()
p = parser("explanation generation: BLEU, ROUGE, FMR, FCR, DIV")
p.add_argument("--task", choices=["explanation", "review"], default="explanation",
               help="review: score generated review summaries against review_summary")
p.add_argument("--num_beams", type=int, default=1)
p.add_argument("--num_beam_groups", type=int, default=1,
               help="diverse beam search; transformers 5 serves it from the hub (needs network)")
p.add_argument("--min_len", type=int, default=0, help="minimum generated tokens")
p.add_argument("--exp_len", type=int, default=20, help="maximum generated tokens")
args = p.parse_args()
started = time.time()

model, tokenizer, meta, ds, encoder, device = load_run(args)
if not ds.records or not ds.records.get("test"):
    raise UserError(f"{args.data_dir}: no test review records (explanation.json / explanation_rationale.json "
                    "with a 'test' list); make them with data/prepare.py")
users = set(eval_users(ds, args.users, args.seed))
records = [r for u, recs in ds.records["test"].items() if u in users for r in recs
           if r.get(tasks.TEXT_FIELDS[args.task])]
if not records:
    raise UserError(f"no test records with a '{tasks.TEXT_FIELDS[args.task]}' field in {ds.records_file}")
extra = {}
if args.num_beam_groups > 1:   # group beam search left transformers' core in v5; it is fetched from the hub
    extra = {"num_beam_groups": args.num_beam_groups, "diversity_penalty": 1.0,
             "custom_generate": "transformers-community/group-beam-search", "trust_remote_code": True}

generated = []
task_id = tasks.TASKS.index(args.task)
for chunk in progress_bar(list(batches(records, args.batch_size)), desc=args.task):
    samples = [tasks.SAMPLERS[args.task](ds, r["user"], None, "test", record=r, explanation_target="review")
               for r in chunk]
    batch = tasks.to_device(tasks.collate(tasks.encode_samples(encoder, samples), task_id), device)
    with autocast(device):
        out = model.generate(batch, num_beams=args.num_beams, num_return_sequences=1, max_new_tokens=args.exp_len,
                             min_new_tokens=args.min_len, **extra)
    generated += [t.strip() for t in tokenizer.batch_decode(out, skip_special_tokens=True)]
seconds = time.time() - started

rows = {}
if args.task == "review":
    rows["vs review_summary"] = text_metrics([r["review_summary"] for r in records], generated)
else:
    rows["vs review sentence"] = text_metrics([r["explanation"] for r in records], generated)
    llm = [(r["groundtruth_explanation"], g) for r, g in zip(records, generated) if r.get("groundtruth_explanation")]
    if llm:   # after a --limit trial distillation only some records carry it: scored on those, and said so
        name = "vs LLM explanation" + ("" if len(llm) == len(records) else f" ({len(llm)} records)")
        rows[name] = text_metrics(*map(list, zip(*llm)))
print_table(rows, f"{args.task}: {len(records)} test records, {len(records) / seconds:.1f} records/s")
details = {"records": len(records), "records_per_second": len(records) / seconds}
if args.task == "explanation" and all(r.get("feature") for r in records):
    vocab = {r["feature"] for recs in ds.records.values() for rs in recs.values() for r in rs if r.get("feature")}
    details["features"] = feature_metrics([r["feature"] for r in records], generated, vocab)
    print("features: " + ", ".join(f"{k} {v:.4f}" for k, v in details["features"].items()))

# items as the dataset's own files number them (the model may have seen them renumbered: --item_ids)
original = {new: old for old, new in enumerate(ds.item_map)} if ds.item_map else None
lines = [json.dumps({"user": r["user"], "item": original[r["item"]] if original else r["item"], "feature": r.get("feature"), "generated": g,
                     **{f: r[f] for f in ("explanation", "groundtruth_explanation", "review_summary") if r.get(f)}},
                    ensure_ascii=False) for r, g in zip(records, generated)]
pred_path = Path(args.checkpoint) / f"predictions_{'exp' if args.task == 'explanation' else 'review'}.jsonl"
atomic_write_text(pred_path, "\n".join(lines) + "\n")
print(f"predictions: {pred_path}")
rows = {f"HDRec ({name})": row for name, row in rows.items()}
write_run_results(args, "exp" if args.task == "explanation" else "review", meta, ds, sorted(users), started,
                  protocol="generated text", model=next(iter(rows)), rows=rows, details=details)
