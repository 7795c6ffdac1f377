"""Keep the results files of runs in the repository, so that the tables in README.md and docs/RESULTS.md can be
regenerated, and new runs paired with old ones, on a machine that has none of the checkpoints.

    python scripts/keep_results.py checkpoint/toys_plateau_seeds/seed_2 checkpoint/sasrec/toys_b256

Each run folder's results files (results_*.json, every user's rank included: see results.py) are written, compact
and gzipped, to docs/runs/<the folder's path under checkpoint/>/<name>.json.gz; the weights stay where they are.
Every reader of results files (scripts/compare.py, scripts/repeat.py, scripts/results_table.py) takes the .json.gz
names as they are.
"""
import argparse
import gzip
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from results import read_results  # noqa: E402
from utils import UserError, atomic_write_bytes, report_user_errors  # noqa: E402


def kept_name(run, checkpoints):
    """docs/runs' folder for a run folder: its path under checkpoint/ (else its own name)."""
    run = run.resolve()
    try:
        return run.relative_to(checkpoints.resolve())
    except ValueError:
        return Path(run.name)


def keep(run, into, checkpoints):
    files = sorted(run.glob("results_*.json"))
    if not files:
        raise UserError(f"{run}: no results_*.json in it (run seq.py, topn.py or exp.py on it first)")
    for path in files:
        r = read_results(path)        # refuses what is not a results file of this version
        out = into / kept_name(run, checkpoints) / (path.name + ".gz")
        data = gzip.compress(json.dumps(r, separators=(",", ":"), ensure_ascii=False).encode("utf-8"), mtime=0)
        atomic_write_bytes(out, data)
        print(f"{path} -> {out} ({len(data) / 1024:.0f} KiB)")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="run folders holding results_*.json")
    parser.add_argument("--into", type=Path, default=ROOT / "docs" / "runs")
    parser.add_argument("--checkpoints", type=Path, default=ROOT / "checkpoint",
                        help="the folder whose layout docs/runs repeats")
    args = parser.parse_args(argv)
    for run in args.runs:
        if not run.is_dir():
            raise UserError(f"{run}: not a run folder")
        keep(run, args.into, args.checkpoints)


if __name__ == "__main__":
    report_user_errors()
    main()
