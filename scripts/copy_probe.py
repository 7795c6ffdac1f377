"""A generated text task whose answer is known: can the T5 copy the earlier text its prompt shows (--text_context)?

Writes a copy of a dataset dir in which every review record of a user carries the same sentence, drawn (seeded) from
the dataset's own sentences: the user's earlier text in the prompt is then exactly the text to write, so a model that
reads its context can reach ROUGE-L near 100. So can one that learns each user id's sentence from the training
records; --checkpoint tells the two apart: it shows each test record another user's sentence and scores the model's
texts against the sentence shown and against the user's own.

    python scripts/copy_probe.py --data_dir runs/claim/gift_cards --out runs/copy_probe --seed 1
    python pretrain.py --data_dir runs/copy_probe --checkpoint checkpoint/copy_probe --ratio 1:0:0:0 \\
        --explanation_target review --text_context user --stop_on loss --batch_size 32 --warmup_steps 0 \\
        --val_every 20 --endure_times 30 --epochs 1000 --max_minutes 4 --seed 1
    python scripts/copy_probe.py --data_dir runs/copy_probe --checkpoint checkpoint/copy_probe --seed 1
"""
import argparse
import dataclasses
import json
import random
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from utils import UserError, atomic_write_json, report_user_errors  # noqa: E402

report_user_errors()
p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
p.add_argument("--data_dir", type=Path, required=True, help="a dataset dir with explanation.json (the probe's, with "
                                                             "--checkpoint)")
p.add_argument("--out", type=Path, help="where to write the probe's dataset dir")
p.add_argument("--checkpoint", type=Path, help="a model trained on the probe: check what it follows")
p.add_argument("--seed", type=int, default=1)
args = p.parse_args()
if bool(args.out) == bool(args.checkpoint):
    raise UserError("give --out (write the probe) or --checkpoint (check a model trained on it)")


def swapped_contexts(ds, seed):
    """The dataset with each user's training sentences replaced by another user's (a seeded shuffle), and the test
    records of users whose shown sentence is now not their own."""
    users = sorted(ds.records["train"])
    donors = users[:]
    random.Random(f"{seed}-swap").shuffle(donors)
    own = {u: ds.records["train"][u][0]["explanation"] for u in users}
    train = {u: [{**r, "explanation": own[d]} for r in ds.records["train"][u]] for u, d in zip(users, donors)}
    records = [r for recs in ds.records["test"].values() for r in recs
               if r["user"] in train and train[r["user"]][0]["explanation"] != r["explanation"]]
    return dataclasses.replace(ds, records={**ds.records, "train": train}), records


if args.checkpoint:
    import tasks
    from evaluation import generate_texts, load_run
    from metrics import rouge
    model, tokenizer, meta, ds, encoder, _ = load_run(SimpleNamespace(seed=args.seed, cuda=False,
                                                                       checkpoint=args.checkpoint,
                                                                       data_dir=args.data_dir))
    swapped, records = swapped_contexts(ds, args.seed)
    if not records:
        raise UserError(f"{args.data_dir}: no test record of a user with training records")
    trained = tasks.text_context_sources((meta.get("args") or {}).get("text_context"))    # the prompts it learnt
    generated = generate_texts(model, tokenizer, encoder, swapped, "explanation", records, "test",
                               explanation_target="review", text_context=trained, progress=False)
    shown = [tasks.context_texts("explanation", swapped, r, "test", "review", ("user",))["user"] for r in records]
    print(f"{len(records)} test records shown another user's sentence: the model's ROUGE-L against the sentence "
          f"shown {rouge(shown, generated)['ROUGE-L']:.2f}, against the user's own "
          f"{rouge([r['explanation'] for r in records], generated)['ROUGE-L']:.2f} (a model that reads its context "
          "follows the first)")
    sys.exit(0)

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
