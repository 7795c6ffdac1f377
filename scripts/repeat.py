"""Figures with their spread: train and evaluate over several seeds, report mean ± standard deviation, and test
differences paired over users (scipy.stats: paired t-test and Wilcoxon signed-rank).

    # K seeds: pretrain.py with the flags after --, then the evaluations; each seed in OUT/seed_N, resumable
    python scripts/repeat.py run --seeds 1,2,3 --out checkpoint/beauty_seeds --eval seq,topn -- \
        --data_dir data/beauty --backbone mini --ratio 0:1:0:0 --epochs 4
    # mean ± std (sample standard deviation, n - 1) of every row of the results files, one table per task
    python scripts/repeat.py summary checkpoint/beauty_seeds/seed_*/results_seq.json
    # paired over users: two configurations (each side's per-user figure averaged over its seeds) ...
    python scripts/repeat.py compare A/seed_*/results_seq.json --vs B/seed_*/results_seq.json
    # ... or the model against a reference rule written in the same files
    python scripts/repeat.py compare checkpoint/beauty_seeds/seed_*/results_seq.json --vs_rule co_occurrence
    # generated text: paired over test records (each record's ROUGE, kept by exp.py)
    python scripts/repeat.py compare A/seed_*/results_exp.json --vs_rule user_most_recent --metric ROUGE-L

Every file is read in the one results format (results.py); the per-user figures come from its `user_ids` / `ranks`
/ `reference_ranks`, so nothing is rerun. HR@k and NDCG@k per user follow metrics.py (one held-out item,
NDCG = 1/log2(rank+2)).
"""
import argparse
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from metrics import hit, ndcg  # noqa: E402
from results import read_results  # noqa: E402
from utils import UserError, report_user_errors  # noqa: E402

EVAL_FILES = {"seq": "results_seq.json", "topn": "results_topn.json", "exp": "results_exp.json"}


# ---------------------------------------------------------------------------------------------------- run

def flag_value(argv, flag):
    for i, a in enumerate(argv):
        if a == flag and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


def run(args, train_args):
    data_dir = flag_value(train_args, "--data_dir")
    if data_dir is None:
        raise UserError("give pretrain.py's flags after --, --data_dir among them")
    for flag in ("--seed", "--checkpoint"):
        if flag_value(train_args, flag) is not None:
            raise UserError(f"{flag} is set by repeat.py for each seed; leave it out of the flags after --")
    evals = [e for e in args.eval.split(",") if e]
    unknown = [e for e in evals if e not in EVAL_FILES]
    if unknown:
        raise UserError(f"--eval {args.eval}: unknown evaluation {unknown[0]!r} (choose from {', '.join(EVAL_FILES)})")
    written = []
    for seed in parse_seeds(args.seeds):
        ckpt = Path(args.out) / f"seed_{seed}"
        step(["pretrain.py", *train_args, "--checkpoint", str(ckpt), "--seed", str(seed)])
        for name in evals:
            result = ckpt / EVAL_FILES[name]
            if result.exists() and result.stat().st_mtime > (ckpt / "model.safetensors").stat().st_mtime:
                print(f"{result}: already evaluated")
            else:
                step([f"{name}.py", "--data_dir", data_dir, "--checkpoint", str(ckpt), "--seed", str(seed),
                      *args.eval_args.split()])
            written.append(result)
    for name in evals:
        summary([p for p in written if p.name == EVAL_FILES[name]])


def step(cmd):
    print("+ python " + " ".join(cmd), flush=True)
    status = subprocess.call([sys.executable, *cmd], cwd=ROOT)
    if status:
        raise UserError(f"{cmd[0]} stopped with status {status} (its output is above); rerun to resume")


def parse_seeds(text):
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        seeds = []
    if not seeds or len(set(seeds)) < len(seeds):
        raise UserError(f"--seeds {text!r}: give distinct integers, e.g. 1,2,3")
    return seeds


# ---------------------------------------------------------------------------------------------------- summary

def rows_of(r):
    """{row name: {metric: value}} of one results file: the model's row first, then the rules'."""
    return {r["model"]: r["results"][r["model"]], **{n: row for n, row in r["results"].items() if n != r["model"]}}


def summary(paths):
    """Print mean ± std over the files of each (task, protocol) and return {group: {row: {metric: (mean, std, n)}}}."""
    groups = {}
    for path in paths:
        r = read_results(path)
        groups.setdefault((r["task"], r["protocol"]), []).append((path, r))
    out = {}
    for (task, protocol), files in groups.items():
        seeds = [r.get("config", {}).get("seed") for _, r in files]
        users = {r.get("users") for _, r in files}
        print(f"\n{task} ({protocol}), {len(files)} runs (seeds {', '.join(map(str, seeds))}), users {sorted(users)}")
        table = {}
        for _, r in files:
            for name, row in rows_of(r).items():
                for metric, value in row.items():
                    table.setdefault(name, {}).setdefault(metric, []).append(value)
        metrics = list(next(iter(table.values())))
        print("| | " + " | ".join(metrics) + " |\n|---|" + "---|" * len(metrics))
        for name, row in table.items():
            cells = [mean_std(row.get(m, [])) for m in metrics]
            print(f"| {name} | " + " | ".join(cells) + " |")
        out[f"{task} ({protocol})"] = {name: {m: (float(np.mean(v)), std(v), len(v)) for m, v in row.items()}
                                       for name, row in table.items()}
    return out


def std(values):
    return float(np.std(values, ddof=1)) if len(values) > 1 else float("nan")


def mean_std(values):
    if not values:
        return ""
    return f"{np.mean(values):.4f} ± {std(values):.4f}" if len(values) > 1 else f"{values[0]:.4f}"


# ---------------------------------------------------------------------------------------------------- compare

def per_user(path, metric, rule=None):
    """{user: the metric of that user} from a results file's model ranks, or a reference rule's; for generated text
    (exp, review) {"user:item": the record's ROUGE} of the model's row or the rule's beside it."""
    r = read_results(path)
    if r["task"] in ("exp", "review"):
        return per_record(path, r, metric, rule)
    if "user_ids" not in r or "ranks" not in r:
        raise UserError(f"{path}: no per-user ranks (a {r['task']} results file has none)")
    ranks = r["ranks"]
    if rule is not None:
        known = r.get("reference_ranks", {})
        if rule not in known:
            raise UserError(f"{path}: no per-user ranks of {rule!r} (there are: {', '.join(known) or 'none'})")
        ranks = known[rule]
    return dict(zip(r["user_ids"], user_scores(ranks, metric)))


def per_record(path, r, metric, rule=None):
    """The model's row is "HDRec (vs <reference>)"; a rule's is "<rule> (vs <reference>)", scored the same way."""
    row = r["model"] if rule is None else f"{rule} {r['model'].split(' ', 1)[1]}"
    scores = r.get("record_scores", {}).get(row)
    if scores is None:
        known = ", ".join(n.split(" ")[0] for n in r.get("record_scores", {}) if n != r["model"]) or "none"
        raise UserError(f"{path}: no per-record scores of {row!r} (rules there: {known}; files written before "
                        "exp.py kept them have none: rerun exp.py)")
    if metric not in scores:
        raise UserError(f"--metric {metric!r}: a text results file has {', '.join(k for k in scores if k != 'record_ids')}")
    return dict(zip(scores["record_ids"], scores[metric]))


def user_scores(ranks, metric):
    """Each user's HR@k / Recall@k / NDCG@k from their 0-based rank (None or -1: not in the list)."""
    try:
        kind, k = metric.split("@")
        score = {"HR": hit, "Recall": hit, "NDCG": ndcg}[kind]
        k = int(k)
    except (ValueError, KeyError):
        raise UserError(f"--metric {metric!r}: use HR@k, Recall@k or NDCG@k") from None
    return [score(None if rank is None or rank < 0 else rank, k) for rank in ranks]


def averaged(paths, metric, rule=None):
    """Per-user figure averaged over runs (seeds); only users every run evaluated."""
    runs = [per_user(p, metric, rule) for p in paths]
    users = sorted(set.intersection(*(set(r) for r in runs)))
    return {u: float(np.mean([r[u] for r in runs])) for u in users}


def paired_test(a, b):
    """Paired t-test and Wilcoxon signed-rank over the users both sides share."""
    from scipy import stats
    users = sorted(set(a) & set(b))
    if len(users) < 2:
        raise UserError("fewer than two users in common: the two sides evaluated different users")
    x, y = np.array([a[u] for u in users]), np.array([b[u] for u in users])
    differ = np.any(x != y)
    t_p = float(stats.ttest_rel(x, y).pvalue) if differ else 1.0
    w_p = float(stats.wilcoxon(x, y).pvalue) if differ else 1.0
    return {"users": len(users), "mean_a": float(x.mean()), "mean_b": float(y.mean()),
            "difference": float(x.mean() - y.mean()), "t_test_p": t_p, "wilcoxon_p": w_p}


def compare(args):
    a = averaged(args.files, args.metric)
    if args.vs_rule:
        b, b_name = averaged(args.files, args.metric, args.vs_rule), args.vs_rule
    elif args.vs:
        b, b_name = averaged(args.vs, args.metric), " ".join(map(str, args.vs))
    else:
        raise UserError("compare needs --vs FILES or --vs_rule RULE")
    res = paired_test(a, b)
    unit = "records" if args.metric.startswith("ROUGE") else "users"
    print(f"{args.metric}, paired over {res['users']} {unit} ({len(args.files)} runs on side A"
          + (f", {len(args.vs)} on side B" if args.vs else "") + ")")
    print(f"  A {' '.join(map(str, args.files))}: {res['mean_a']:.4f}\n  B {b_name}: {res['mean_b']:.4f}")
    print(f"  A - B = {res['difference']:+.4f}; paired t-test p = {res['t_test_p']:.2g}, "
          f"Wilcoxon p = {res['wilcoxon_p']:.2g}" + ("  (significant at 0.05)" if max(res["t_test_p"], res["wilcoxon_p"]) < 0.05 else ""))
    return res


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    train_args = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="train and evaluate over several seeds (pretrain.py flags after --)")
    r.add_argument("--seeds", default="1,2,3")
    r.add_argument("--out", required=True, help="one checkpoint dir per seed: OUT/seed_N")
    r.add_argument("--eval", default="seq", help="evaluations after training: seq, topn, exp (comma-separated)")
    r.add_argument("--eval_args", default="", help="extra flags for the evaluation scripts, e.g. '--users 2000'")
    s = sub.add_parser("summary", help="mean ± std of results files")
    s.add_argument("files", nargs="+", type=Path)
    c = sub.add_parser("compare", help="paired tests over users")
    c.add_argument("files", nargs="+", type=Path, help="side A: results files (one per seed)")
    c.add_argument("--vs", nargs="+", type=Path, help="side B: results files (one per seed)")
    c.add_argument("--vs_rule", help="side B: a reference rule in side A's files (e.g. co_occurrence)")
    c.add_argument("--metric", default="NDCG@10", help="HR@k, NDCG@k; for exp/review files ROUGE-1, ROUGE-2, "
                   "ROUGE-L (paired over records)")
    args = p.parse_args(argv)
    if args.command == "run":
        return run(args, train_args)
    if train_args:
        raise UserError(f"flags after -- are for `run` only, not `{args.command}`")
    return summary(args.files) if args.command == "summary" else compare(args)


if __name__ == "__main__":
    report_user_errors()
    main()
