"""Every model on one dataset in one table: results files of runs on the same split, all in the one results format
(results.py) and the one protocol (ranking.py: every item ranked, the user's history excluded), as a markdown table
and a bar chart.

    python scripts/compare.py checkpoint/beauty/results_seq.json checkpoint/hllm/beauty/results.json \
        checkpoint/sasrec/beauty/results_seq.json --plot compare_beauty.png

    # every dataset, every seed: one row per (dataset, model, settings), mean ± std over its seeds (the README's table)
    python scripts/compare.py --across checkpoint/*/results_seq.json checkpoint/sasrec/*/results_seq.json

Reads what seq.py (`--protocol clean`), hllm/main.py and scripts/sasrec_recbole.py write. Each row says its training
minutes, item ids and seed; the reference rules come from the files too (every file ranks them by the same
definitions; a rule whose figures differ between files that evaluated the same users is an error). Files whose data
hashes differ were run on different splits: that is an error, not a footnote. A model that only wrote top-k lists
has no figure past k (left blank). Below the table, paired tests over users (scripts/repeat.py: t-test and Wilcoxon
on per-user NDCG@10): every model against most popular and the strongest rule, and against each other model.
"""
import argparse
import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from repeat import averaged, mean_std, paired_test, per_user  # noqa: E402
import numpy as np  # noqa: E402

from results import FULL_RANKING, read_results, rule_rows  # noqa: E402
from utils import UserError, report_user_errors  # noqa: E402

METRICS = ["HR@5", "HR@10", "HR@20", "NDCG@5", "NDCG@10", "NDCG@20"]
PAIRED_METRIC = "NDCG@10"
RULE_NAMES = {"most_popular": "most popular", "recent_popular": "recent popular",
              "co_occurrence": "co-occurrence, last 3 items", "item_knn": "item kNN", "ease": "EASE"}


def model_name(r):
    """A results file's model as the table names it: the T5 (seq.py) by what was trained."""
    if not r.get("backbone"):
        return r["model"]
    train_cfg = r.get("train_config") or {}
    return f"T5 {r['backbone']} ({train_cfg.get('recipe', '?')} recipe, history in the {train_cfg.get('history', '?')})"


# what a run was given that does not change what it trains: its seed, its paths, its device
NOT_SETTINGS = {"seed", "checkpoint", "out", "data_dir", "cuda", "rank_users", "val_users", "val_texts", "save_minutes",
                "log_interval", "no_bf16", "gradient_checkpointing", "micro_batch_tokens"}


def dataset_name(r):
    cfg = r.get("config") or {}
    return Path(cfg["data_dir"]).name if cfg.get("data_dir") else (r.get("data_hashes") or {})["sequential.txt"][:8]


# pretrain.py flags added after some runs were made: what those runs did
FLAGS_BEFORE_THEY_EXISTED = {"name_user": "yes", "input_scale": "none", "text_context": "none"}
# flags only the text tasks read (explanation, review summary): no setting of a run that gave them no share
TEXT_TASK_FLAGS = {"text_context", "explanation_target", "exp_len"}


def trains_text(cfg):
    shares = str(cfg.get("ratio", "")).split(":")
    return len(shares) != 4 or float(shares[0]) > 0 or float(shares[2]) > 0


def settings(r):
    """The training settings of a results file's run (the T5's pretrain.py flags, or the baseline's own), seed and
    paths left out: runs with equal settings are seeds of one configuration."""
    cfg = r.get("train_config")
    cfg = {**FLAGS_BEFORE_THEY_EXISTED, **cfg} if cfg else r.get("config") or {}
    ignored = NOT_SETTINGS if trains_text(cfg) else NOT_SETTINGS | TEXT_TASK_FLAGS
    return {k: v for k, v in cfg.items() if k not in ignored}


def distinct_names(records):
    """Each results file's model_name, followed by the settings in which its run differs from the other files'
    runs of that name (seeds of one configuration share a name)."""
    names = [model_name(r) for r in records]
    out = []
    for r, name in zip(records, names):
        siblings, mine = [settings(o) for o, n in zip(records, names) if n == name], settings(r)
        differ = [f"{k} {mine.get(k)}" for k in sorted(set().union(*siblings))
                  if any(s.get(k) != mine.get(k) for s in siblings)]
        out.append(name + (f" ({', '.join(differ)})" if differ else ""))
    return out


def model_row(path):
    """(name, details, figures) of a results file's model, its rules' figures, the users it evaluated."""
    r = read_results(path)
    if r["task"] != "seq" or r["protocol"] != FULL_RANKING:
        raise UserError(f"{path}: task {r['task']!r}, protocol {r['protocol']!r}; the table compares next-item "
                        f"ranking by {FULL_RANKING} (seq.py --protocol clean, hllm/main.py, scripts/sasrec_recbole.py)")
    train_cfg = r.get("train_config") or {}
    name = model_name(r)
    split = (r.get("details") or {}).get("split", "test")      # seq.py --split val: validation items
    details = {"minutes": (r.get("training") or {}).get("minutes"), "ids": r.get("item_ids"),
               "seed": train_cfg.get("seed", (r.get("config") or {}).get("seed")),
               "protocol": FULL_RANKING + (f", top-{r['list_length']} lists" if r.get("list_length") else "")
                           + (", validation items" if split == "val" else ""),
               "per_user": "user_ids" in r, "split": split}
    figures = {m: v for m, v in r["results"][r["model"]].items() if m in METRICS}
    rules = {rule: {m: v for m, v in row.items() if m in METRICS} for rule, row in rule_rows(r).items()
             if rule in RULE_NAMES}
    return (name, details, figures), rules, r


def same_rule(a, b, rule):
    """Whether two results files rank `rule` alike: the same per-user ranks (figures may differ in the last bit
    between numpy versions), or the same figures where a file has no ranks."""
    ranks_a, ranks_b = (r.get("reference_ranks", {}).get(rule) for r in (a, b))
    if ranks_a is not None and ranks_b is not None:
        return ranks_a == ranks_b
    return all(math.isclose(a["results"][rule][m], b["results"][rule].get(m, math.nan), rel_tol=1e-9)
               for m in a["results"][rule])


def table(paths):
    rows, rules, hashes, records, rules_of = [], {}, {}, {}, {}
    for path in paths:
        (name, details, figs), rules_of[path], r = model_row(path)
        rows.append((name, details, figs, path))
        hashes[path] = (r.get("data_hashes") or {}).get("sequential.txt")
        records[path] = r
    splits = {path: details["split"] for _, details, _, path in rows}
    if len(set(splits.values())) > 1:
        val = next(p for p, s in splits.items() if s == "val")
        test = next(p for p, s in splits.items() if s != "val")
        raise UserError(f"{val} ranks validation items (seq.py --split val), {test} test items: compare each split "
                        "on its own")
    names = distinct_names([records[path] for *_, path in rows])     # two runs of one model: named by what differs
    rows = [(name, *row[1:]) for name, row in zip(names, rows)]
    for path, r in records.items():
        for rule, rule_figs in rules_of[path].items():
            seen = rules.setdefault(rule, (rule_figs, path))
            first = records[seen[1]]
            if first.get("user_ids") == r.get("user_ids") and not same_rule(first, r, rule):
                raise UserError(f"{path}: its {rule} figures differ from {seen[1]}'s on the same users: the files "
                                "were written by different rule definitions; rerun the older evaluation")
    if len(set(hashes.values())) > 1:
        first = next(iter(hashes))
        other = next(p for p, h in hashes.items() if h != hashes[first])
        raise UserError(f"{other}: its sequential.txt differs from {first}'s: the runs used different splits")
    for rule, label in RULE_NAMES.items():
        if rule in rules:
            protocol = FULL_RANKING + (", validation items" if "val" in splits.values() else "")
            rows.append((f"{label} (no training)",
                         {"minutes": 0.0, "ids": "any", "seed": None, "protocol": protocol}, rules[rule][0], None))
    return rows


def paired_tests(rows, metric=PAIRED_METRIC):
    """[(A, B, result)]: each model with per-user ranks against most popular and the strongest rule (from its own
    file), and against each later model, paired over the users both evaluated."""
    models = [(name, path) for name, d, _, path in rows if path is not None and d.get("per_user")]
    rule_figs = {name: figs.get(metric, -1) for name, d, figs, path in rows if path is None}
    strongest = max(rule_figs, key=rule_figs.get) if rule_figs else None
    out = []
    for i, (name, path) in enumerate(models):
        mine = per_user(path, metric)
        for rule, label in RULE_NAMES.items():
            if f"{label} (no training)" in ("most popular (no training)", strongest):
                out.append((name, label, paired_test(mine, per_user(path, metric, rule))))
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


def curves(paths, out):
    """Validation NDCG@10 against training minutes, one line per results file that carries its learning curve
    (training.log: pretrain.py's ranked users, or sasrec_recbole.py's same seeded sample), and the rules as
    horizontal lines (training.val_rules from the T5's log: those of the first file carrying them, since each seed
    ranks its own users). Returns ({label: (minutes, figures)}, rules).
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    lines, rules, rules_seed = {}, {}, None
    records = [read_results(path) for path in paths]
    for r, name in zip(records, distinct_names(records)):
        log = (r.get("training") or {}).get("log") or []
        if not log:
            continue
        seed = (r.get("config") or {}).get("seed")
        label = f"{name}, seed {seed}"
        lines[label] = ([e["minutes"] for e in log], [e["val_NDCG@10"] for e in log])
        ax.plot(*lines[label], marker=".", label=label)
        if not rules and r["training"].get("val_rules"):
            rules, rules_seed = dict(r["training"]["val_rules"]), seed
    for (rule, figure), colour in zip(sorted(rules.items(), key=lambda kv: -kv[1]),
                                      ("grey", "tab:orange", "tab:green", "tab:red", "tab:purple")):
        ax.axhline(figure, color=colour, linestyle="--", linewidth=1,
                   label=f"{RULE_NAMES.get(rule, rule)} (seed {rules_seed}'s users)")
    ax.set_xlabel("training minutes")
    ax.set_ylabel("validation NDCG@10")
    ax.legend(fontsize=7)
    fig.tight_layout()
    tmp = Path(str(out) + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(out)
    return lines, rules


# ---------------------------------------------------------------------------------------------------- across

def best_validation(r):
    """The best validation NDCG@10 of the run's learning curve (None without one): how its settings were chosen."""
    log = (r.get("training") or {}).get("log") or []
    figures = [e["val_NDCG@10"] for e in log if e.get("val_NDCG@10") is not None]
    return max(figures) if figures else None


def held_out_validation(path, metric=PAIRED_METRIC):
    """The run's `metric` on the validation users that did not choose its checkpoint (seq.py --split val, the file
    results_seq_val.json beside results_seq.json, or both .json.gz); None where there is none."""
    path = Path(path)
    if path.name not in ("results_seq.json", "results_seq.json.gz"):
        return None
    val = path.with_name(path.name.replace("results_seq", "results_seq_val"))
    if not val.exists():
        return None
    r = read_results(val)
    return r["results"][r["model"]][metric]


def all_held_out(row):
    """Whether every run of an --across row has its held-out validation figure."""
    return bool(row["held_out"]) and None not in row["held_out"]


def rule_setting(r, rule):
    """'lambda 100 of 20, 100, 500, 2000' for a rule chosen on validation; '' for a rule without a setting."""
    chosen = (r.get("rule_settings") or {}).get(rule) or {}
    if "setting" not in chosen:
        return ""
    tried = ", ".join(chosen.get("validation_NDCG@10", {}))
    return "; ".join(f"{k} {v}" for k, v in chosen["setting"].items()) + (f" (of {tried}, on validation)" if tried
                                                                          else "")


def across(paths, metric=PAIRED_METRIC):
    """Rows of every (dataset, model, settings) with its seeds' files; then each dataset's rules. A label names the
    settings in which a model's configurations on a dataset differ."""
    groups = {}
    for path in paths:
        (name, details, _), _, r = model_row(path)
        key = (dataset_name(r), name, json.dumps(settings(r), sort_keys=True))
        groups.setdefault(key, []).append((path, r, details))
    for (dataset, name, _), runs in groups.items():
        seeds = [d.get("seed") for _, _, d in runs]
        if len(set(seeds)) < len(seeds):
            raise UserError(f"{runs[0][0]}: two runs of {name} on {dataset} with the same settings and seed {seeds[0]}")
    rows = []
    for dataset in dict.fromkeys(k[0] for k in groups):
        keys = [k for k in groups if k[0] == dataset]
        table([p for k in keys for p, _, _ in groups[k]])   # one split, rules by one definition: table()'s checks
        labels = distinct_names([groups[k][0][1] for k in keys])
        for key, label in zip(keys, labels):
            name, runs = key[1], groups[key]
            files = [p for p, _, _ in runs]
            rules = {rule: averaged(files, metric, rule) for rule in RULE_NAMES
                     if all(rule in (r.get("reference_ranks") or {}) for _, r, _ in runs)}
            model = averaged(files, metric) if all("ranks" in r for _, r, _ in runs) else None
            strongest = max(rules, key=lambda k: sum(rules[k].values()) / len(rules[k])) if rules else None
            versus = paired_test(model, rules[strongest]) if model and strongest else None
            val = [best_validation(r) for _, r, _ in runs]
            rows.append({"dataset": dataset, "model": label,
                         "family": name, "seeds": sorted(d.get("seed") for _, _, d in runs),
                         "minutes": [d.get("minutes") for _, _, d in runs],
                         "HR@10": [r["results"][r["model"]]["HR@10"] for _, r, _ in runs],
                         metric: [r["results"][r["model"]][metric] for _, r, _ in runs],
                         "val": [v for v in val if v is not None], "strongest": strongest, "versus": versus,
                         "held_out": [held_out_validation(p, metric) for p in files]})
        first = groups[keys[0]][0][1]
        for rule, label in RULE_NAMES.items():
            if rule in first["results"]:
                setting = rule_setting(first, rule)
                rows.append({"dataset": dataset, "model": f"{label} (no training{'; ' + setting if setting else ''})",
                             "family": rule, "seeds": [], "minutes": [], "val": [], "versus": None, "held_out": [],
                             "HR@10": [first["results"][rule]["HR@10"]], metric: [first["results"][rule][metric]]})
    return rows


def across_markdown(rows, metric=PAIRED_METRIC):
    """The table: mean ± std over seeds; the model family's configuration with the best validation figure on a
    dataset in bold (the one its settings were chosen by): on the held-out validation users where every run of the
    family there has that figure, else the best of its learning curve; the paired test against the strongest rule."""
    families = {}
    for i, row in enumerate(rows):
        if row["val"] or row["held_out"]:
            families.setdefault((row["dataset"], row["family"]), []).append(i)
    chosen = {}
    for key, members in families.items():
        held_out = all(all_held_out(rows[i]) for i in members)
        figure = (lambda i: np.mean(rows[i]["held_out"])) if held_out else \
            (lambda i: np.mean(rows[i]["val"]) if rows[i]["val"] else -np.inf)
        chosen[key] = max(members, key=figure)
    lines = [f"| dataset | model | seeds | minutes | validation {metric}: curve best / held-out users | HR@10 | "
             f"{metric} | {metric} - strongest rule (t-test p) |", "|---|---|---|---|---|---|---|---|"]
    for i, row in enumerate(rows):
        minutes = [m for m in row["minutes"] if m is not None]
        v = row["versus"]
        configurations = sum(r["dataset"] == row["dataset"] and r["family"] == row["family"] for r in rows)
        name = f"**{row['model']}**" if configurations > 1 and chosen.get((row["dataset"], row["family"])) == i \
            else row["model"]
        lines.append(f"| {row['dataset']} | {name} | {', '.join(map(str, row['seeds'])) or '—'} | "
                     f"{f'{np.mean(minutes):.1f}' if minutes else '—'} | {mean_std(row['val'])}"
                     + (f" / {mean_std(row['held_out'])}" if all_held_out(row) else "")
                     + " | "
                     f"{mean_std(row['HR@10'])} | {mean_std(row[metric])} | "
                     + (f"{v['difference']:+.4f} vs {RULE_NAMES[row['strongest']]} ({v['t_test_p']:.2g})" if v
                        else "") + " |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="+", type=Path)
    p.add_argument("--plot", type=Path, default=None, help="bar chart (PNG) of HR@10 and NDCG@10")
    p.add_argument("--curves", type=Path, default=None,
                   help="learning curves (PNG): each model's validation NDCG@10 (all items ranked, history excluded, "
                        "the seeded --rank_users sample) against training minutes, the rules as horizontal lines")
    p.add_argument("--across", action="store_true",
                   help="files of several datasets and seeds: one row per dataset, model and settings, mean ± std "
                        "over seeds, the validation figure that chose the settings, the test against the strongest "
                        "rule")
    args = p.parse_args(argv)
    if args.across:
        rows = across(args.files)
        print(across_markdown(rows))
        return rows
    rows = table(args.files)
    text = markdown(rows)
    print(text)
    tests = paired_tests(rows)
    if tests:
        print("\npaired over users (per-user " + PAIRED_METRIC + "):\n" + paired_markdown(tests))
    if args.plot:
        plot(rows, args.plot)
        print(f"\nchart -> {args.plot}")
    if args.curves:
        curves(args.files, args.curves)
        print(f"learning curves -> {args.curves}")
    return rows


if __name__ == "__main__":
    report_user_errors()
    main()
