"""Every model on one dataset in one table: the results files of runs on the same split and protocol (full ranking
over all items, the user's history excluded), as a markdown table and a bar chart.

    python scripts/compare.py checkpoint/beauty/results_seq.json checkpoint/hllm/beauty/results.json \
        --plot compare_beauty.png

Reads what seq.py (`--protocol clean`) and hllm/main.py write (another model's results can join in the seq.py
format: "task": "seq", "protocol": "clean", "model": its name, "results": {name: metrics}). Each row says its training
minutes, item ids and seed; the reference rules (most popular, recent popular, co-occurrence) come from the first
seq.py file. Files whose data hashes differ were run on different splits: that is an error, not a footnote.
HR@k and Recall@k are the same figure with one held-out item. A figure the file does not record is computed from its
per-user ranks where the ranked list reaches that far (seq.py writes top-`--top_k` lists, HSFT and SASRec full
rankings). Below the table, paired tests over users (scripts/repeat.py: t-test and Wilcoxon on per-user NDCG@10):
every model against most popular and against each other model.
"""
import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dataset import read_json  # noqa: E402
from repeat import is_hsft, paired_test, per_user, user_scores  # noqa: E402
from repeat import rows_of as result_rows  # noqa: E402  (scripts/repeat.py: the rows of a results file)
from utils import UserError, report_user_errors  # noqa: E402

METRICS = ["HR@5", "HR@10", "HR@20", "NDCG@5", "NDCG@10", "NDCG@20"]
PAIRED_METRIC = "NDCG@10"
PROTOCOL = "full ranking, history excluded"
RULES = ["most_popular", "recent_popular", "co_occurrence"]


def figures(row, ranks=None, list_length=None):
    """HR@k / NDCG@k of a metrics dict (Recall@k read as HR@k); the ones it lacks from per-user ranks (-1: not in
    the list) where the list is at least k long (list_length None: a full ranking)."""
    out = {}
    for m in METRICS:
        value = row.get(m, row.get(m.replace("HR@", "Recall@")))
        if value is None and ranks and (list_length is None or int(m.split("@")[1]) <= list_length):
            value = sum(user_scores(ranks, m)) / len(ranks)
        if value is not None:
            out[m] = float(value)
    return out


def model_row(path):
    """(name, details, figures) of a results file's model, its reference rules' figures, its data hashes."""
    r = read_json(path)
    if not isinstance(r, dict):
        raise UserError(f"{path}: not a results file")
    hsft = is_hsft(r)
    if not hsft and (r.get("task") != "seq" or not isinstance(r.get("results"), dict)):
        raise UserError(f"{path}: neither a seq.py nor an hllm/main.py results file")
    if not hsft and r.get("protocol") != "clean":
        raise UserError(f"{path}: protocol {r.get('protocol')!r}; the table compares full ranking with the history "
                        "excluded (seq.py --protocol clean)")
    rows = result_rows(r)
    list_length = None if hsft else (r.get("config") or {}).get("top_k")      # seq.py: top-k lists; others: full
    references = r.get("reference_ranks") or {}
    rules = {rule: figures(rows[rule], references.get(rule), list_length) for rule in RULES if rule in rows}
    model = next(name for name in rows if name not in RULES and name != "max_history_plus_1")
    if hsft:
        log = r.get("train_log") or []
        name = f"HSFT {model}"
        details = {"minutes": sum(e.get("seconds", 0) for e in log) / 60, "ids": "item text",
                   "seed": r.get("config", {}).get("seed")}
    else:
        train_cfg = r.get("train_config") or {}
        name = r.get("model") or (f"T5 {r.get('backbone', '')} ({train_cfg.get('recipe', '?')} recipe, "
                                  f"history in the {train_cfg.get('history', '?')})")
        details = {"minutes": (r.get("training") or {}).get("minutes"), "ids": r.get("item_ids"),
                   "seed": train_cfg.get("seed", r.get("config", {}).get("seed"))}
    details["protocol"] = PROTOCOL + (f", top-{list_length} lists" if list_length else "")
    details["per_user"] = "user_ids" in r and "ranks" in r
    return (name, details, figures(rows[model], r.get("ranks"), list_length)), rules, r.get("data_hashes")


def table(paths):
    rows, rules, hashes = [], {}, {}
    for path in paths:
        (name, details, figs), their_rules, data_hashes = model_row(path)
        rows.append((name, details, figs, path))
        for rule, figs in their_rules.items():
            rules.setdefault(rule, figs)
        if data_hashes:
            hashes[path] = data_hashes.get("sequential.txt") if isinstance(data_hashes, dict) else data_hashes
    if len(set(hashes.values())) > 1:
        first = next(iter(hashes))
        other = next(p for p, h in hashes.items() if h != hashes[first])
        raise UserError(f"{other}: its sequential.txt differs from {first}'s: the runs used different splits")
    rule_names = {"most_popular": "most popular (no training)", "recent_popular": "recent popular (no training)",
                  "co_occurrence": "co-occurrence, last 3 items (no training)"}
    for rule in RULES:
        if rule in rules:
            rows.append((rule_names[rule], {"minutes": 0.0, "ids": "any", "seed": None, "protocol": PROTOCOL},
                          rules[rule], None))
    return rows


def paired_tests(rows, metric=PAIRED_METRIC):
    """[(A, B, result)]: each model with per-user ranks against most popular (from its own file) and against each
    later model, paired over the users both evaluated."""
    models = [(name, path) for name, d, _, path in rows if path is not None and d.get("per_user")]
    out = []
    for i, (name, path) in enumerate(models):
        mine = per_user(path, metric)
        try:
            out.append((name, "most popular", paired_test(mine, per_user(path, metric, "most_popular"))))
        except UserError:
            pass  # a file without the rule's per-user ranks
        for other, other_path in models[i + 1:]:
            out.append((name, other, paired_test(mine, per_user(other_path, metric))))
    return out


def paired_markdown(tests, metric=PAIRED_METRIC):
    lines = [f"| {metric}: A | vs B | users | A | B | A - B | t-test p | Wilcoxon p |", "|---|---|---|---|---|---|---|---|"]
    for a, b, res in tests:
        lines.append(f"| {a} | {b} | {res['users']} | {res['mean_a']:.4f} | {res['mean_b']:.4f} | "
                     f"{res['difference']:+.4f} | {res['t_test_p']:.2g} | {res['wilcoxon_p']:.2g} |")
    return "\n".join(lines)


def markdown(rows):
    lines = ["| model | minutes | ids | protocol | seed | " + " | ".join(METRICS) + " |",
             "|---|---|---|---|---|" + "---|" * len(METRICS)]
    best = {m: max((figs.get(m, -1) for _, _, figs, _ in rows), default=None) for m in METRICS}
    for name, d, figs, _ in rows:
        cells = [(f"**{figs[m]:.4f}**" if figs[m] == best[m] else f"{figs[m]:.4f}") if m in figs else "" for m in METRICS]
        minutes = f"{d['minutes']:.1f}" if d.get("minutes") is not None else "?"
        lines.append(f"| {name} | {minutes} | {d.get('ids') or ''} | {d.get('protocol', '')} | "
                     f"{d.get('seed') if d.get('seed') is not None else ''} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows, out):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    shown = ["HR@10", "NDCG@10"]
    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(rows)), 4))
    for i, m in enumerate(shown):
        ax.bar(x + (i - 0.5) * 0.38, [figs.get(m, 0) for _, _, figs, _ in rows], 0.38, label=m)
    ax.set_xticks(x, [name for name, *_ in rows], rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("test figure (all users, all items)")
    ax.legend()
    fig.tight_layout()
    tmp = Path(str(out) + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="+", type=Path)
    p.add_argument("--plot", type=Path, default=None, help="bar chart (PNG) of HR@10 and NDCG@10")
    args = p.parse_args(argv)
    rows = table(args.files)
    text = markdown(rows)
    print(text)
    tests = paired_tests(rows)
    if tests:
        print("\npaired over users (per-user " + PAIRED_METRIC + "):\n" + paired_markdown(tests))
    if args.plot:
        plot(rows, args.plot)
        print(f"\nchart -> {args.plot}")
    return rows


if __name__ == "__main__":
    report_user_errors()
    main()
