"""Print every results_*.json of a checkpoint dir as one table: python scripts/results_table.py CHECKPOINT_DIR"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root

from results import read_results  # noqa: E402
from utils import UserError, report_user_errors  # noqa: E402

report_user_errors()
if len(sys.argv) != 2:
    raise UserError("usage: python scripts/results_table.py CHECKPOINT_DIR")
ckpt = Path(sys.argv[1])
files = sorted(ckpt.glob("results_*.json"))
if not files:
    raise UserError(f"{ckpt}: no results_*.json yet (run seq.py, topn.py, exp.py)")
print(f"\nresults in {ckpt}")
for f in files:
    r = read_results(f)
    where = f"{r['task']} ({r['protocol']}, {r['users']} users, item ids {r['item_ids']})"
    results = r["results"]
    personal = r["details"].get("personalisation", {})
    if personal and not isinstance(next(iter(personal.values())), dict):      # top-N: the model's figures only
        personal = {next(iter(results)): personal}
    for name, row in results.items():
        if isinstance(row, dict):
            scale = 100 if r["task"] in ("seq", "topn") else 1
            cells = "  ".join(f"{k} {v * scale:6.2f}" for k, v in row.items())
            extra = "  ".join(f"{k.replace('_', ' ')} {v:.2f}" for k, v in personal.get(name, {}).items())
            print(f"{where:<48} {name:<26} {cells}" + (f"  | {extra}" if extra else ""))
print("(HR/NDCG x100; BLEU/ROUGE x100 by definition; FMR, FCR, DIV as fractions; after |: how personal the lists are, "
      "as shares: distinct lists, item coverage, overlap with the most-popular list, lists that change when the "
      "history is swapped)")
