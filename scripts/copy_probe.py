"""A generated text task whose answer is known: can the T5 copy the earlier text its prompt shows (--text_context)?

Writes a copy of a dataset dir in which every review record of a user carries the same sentence, drawn (seeded) from
the dataset's own sentences: the user's earlier text in the prompt is then exactly the text to write, so a model that
reads its context reaches ROUGE-L near 100 and one that does not stays near the most frequent sentence's score.

    python scripts/copy_probe.py --data_dir runs/claim/gift_cards --out runs/copy_probe --seed 1
    python pretrain.py --data_dir runs/copy_probe --checkpoint checkpoint/copy_probe --ratio 1:0:0:0 \\
        --explanation_target review --text_context user --stop_on loss --batch_size 32 --warmup_steps 0 \\
        --val_every 20 --endure_times 30 --epochs 1000 --max_minutes 4 --seed 1
"""
import argparse
import json
import random
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from utils import UserError, atomic_write_json, report_user_errors  # noqa: E402

report_user_errors()
p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
p.add_argument("--data_dir", type=Path, required=True, help="a dataset dir with explanation.json")
p.add_argument("--out", type=Path, required=True)
p.add_argument("--seed", type=int, default=1)
args = p.parse_args()

source = args.data_dir / "explanation.json"
if not source.exists():
    raise UserError(f"{source} is missing: the probe needs a dataset dir with review records (data/prepare.py)")
splits = json.loads(source.read_text(encoding="utf-8"))
pool = sorted({r["explanation"] for recs in splits.values() for r in recs if r.get("explanation")})
if not pool:
    raise UserError(f"{source}: no record has an explanation")
rng, sentence = random.Random(args.seed), {}
for recs in splits.values():
    for r in recs:
        r["explanation"] = sentence.setdefault(r["user"], rng.choice(pool))
args.out.mkdir(parents=True, exist_ok=True)
for name in ("sequential.txt", "datamaps.json", "negative.txt"):
    if (args.data_dir / name).exists():
        shutil.copyfile(args.data_dir / name, args.out / name)
atomic_write_json(args.out / "explanation.json", splits)
print(f"{args.out}: {sum(map(len, splits.values()))} records of {len(sentence)} users, one sentence per user "
      f"from {len(pool)} (seed {args.seed})")
