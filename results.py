"""One results format for every model and task, written and read here only.

seq.py, topn.py, exp.py, hllm/main.py and scripts/sasrec_recbole.py write it; scripts/compare.py, scripts/repeat.py
and scripts/results_table.py read it. A file holds:
  format          FORMAT (files of older versions lack it and are refused: rerun the evaluation)
  task            seq (next item over all items), topn (among 100 candidates), exp / review (generated text)
  protocol        how the ranks were made (ranking.py: "full ranking, history excluded"; "paper": the original
                  code's beams, nothing excluded; "100 candidates")
  model           the model row's name in `results`; the other rows are the reference rules
  results         {row: {metric: value}}: the model and every rule, from the per-user ranks below
  list_length     null for a full ranking; L when the model only gave top-L lists (no figure past L is recorded)
  user_ids, ranks, reference_ranks   0-based rank of each user's held-out item (-1: past the model's list), for
                  paired tests without a rerun
  record_scores   text tasks: {row: {record_ids ("user:item"), ROUGE-1/2/L of each record}}, for paired tests
  details         task-specific extras (how personal the lists are, list quality, speed, features)
  rule_settings   each rule's setting and the validation figures that chose it
  training        minutes, best epoch / step, validations
  config, train_config, data_hashes, versions, seconds
"""
import time
from pathlib import Path

from dataset import read_json
from metrics import ranking_metrics
from utils import UserError, atomic_write_json, versions

FORMAT = "hdrec-results/2"
FULL_RANKING = "full ranking, history excluded"


def rank_rows(model, ranks, reference_ranks, list_length=None):
    """{row: metrics} of a model's ranks and of each rule's (rules rank every item)."""
    return {model: ranking_metrics(ranks, list_length), **{rule: ranking_metrics(r) for rule, r in
                                                          (reference_ranks or {}).items()}}


def write_results(path, *, task, protocol, model, ds, users, rows=None, ranks=None, reference_ranks=None,
                  list_length=None, details=None, rule_settings=None, item_ids="published", training=None,
                  config=None, train_config=None, started=None, **more):
    """Write one results file atomically; rows default to rank_rows(model, ranks, reference_ranks, list_length)."""
    if rows is None:
        rows = rank_rows(model, ranks, reference_ranks, list_length)
    # -1: not ranked (past the model's list; the rules rank every item)
    clip = (lambda rs, length=None: [-1 if r is None or r < 0 or (length and r >= length) else int(r) for r in rs])
    record = {"format": FORMAT, "task": task, "protocol": protocol, "model": model, "results": rows,
              "list_length": list_length, "users": len(users), "all_users": len(ds.sequences), "item_ids": item_ids,
              "details": details or {}, "rule_settings": rule_settings or {}, "training": training or {},
              "config": config or {}, "train_config": train_config, "data_hashes": ds.hashes,
              "versions": {**versions(), **more.pop("versions", {})},
              "seconds": time.time() - started if started else None, **more}
    if ranks is not None:
        record.update({"user_ids": list(users), "ranks": clip(ranks, list_length),
                       "reference_ranks": {rule: clip(r) for rule, r in (reference_ranks or {}).items()}})
    atomic_write_json(path, record)
    print(f"\nwritten {path}")
    return Path(path)


def read_results(path):
    """A results file of this format, or a one-line error saying what it is instead."""
    r = read_json(path)
    if not isinstance(r, dict) or "results" not in r and "format" not in r:
        raise UserError(f"{path}: not a results file")
    if r.get("format") != FORMAT:
        raise UserError(f"{path}: a results file of an older version (format {r.get('format', 'none')!r}, this "
                        f"version reads {FORMAT!r}); rerun the evaluation that wrote it (seq.py, topn.py, exp.py, "
                        "hllm/main.py, scripts/sasrec_recbole.py)")
    return r


def rule_rows(r):
    """{rule: metrics} of a results file (every row but the model's)."""
    return {name: row for name, row in r["results"].items() if name != r["model"]}


def print_table(rows, title):
    """rows: {name: {metric: value}} -> an aligned text table (a metric a row lacks shows as -)."""
    metrics = list(dict.fromkeys(m for row in rows.values() for m in row))
    width = max(len(n) for n in rows) + 2
    cols = [max(10, len(m) + 2) for m in metrics]
    print(f"\n{title}")
    print(" " * width + "".join(f"{m:>{c}}" for m, c in zip(metrics, cols)))
    for name, row in rows.items():
        print(f"{name:<{width}}" + "".join(f"{row[m]:>{c}.4f}" if isinstance(row.get(m), (int, float))
                                           else f"{'-':>{c}}" for m, c in zip(metrics, cols)))
