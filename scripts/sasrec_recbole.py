"""SASRec, the standard sequential baseline, trained by RecBole 1.2.1 and evaluated under our protocol, so that it
sits in scripts/compare.py's table beside the T5 recommender and HSFT.

    bash scripts/setup_recbole.sh                    # RecBole in a venv of its own (.venv-recbole): it needs numpy<2
    .venv-recbole/bin/python scripts/sasrec_recbole.py --data_dir data/beauty --out checkpoint/sasrec/beauty \
        --max_minutes 30 --seed 1

1. Our sequences become a RecBole atomic file (`<name>.inter`: user, item, position as timestamp), nothing filtered.
2. RecBole trains SASRec with its defaults (2 layers, 2 heads, hidden 64, dropout .5, 50 items of history,
   cross-entropy over all items, lr .001, batch 2048; --lr, --batch_size and --dropout change them), its
   leave-one-out split (`LS: valid_and_test`, time order), validating every epoch; training stops early after
   --stopping_step epochs without a better RecBole validation, or once --max_minutes have passed. At every epoch the
   evaluation core also ranks the validation item of a seeded sample of --rank_users users under our protocol
   (history excluded; the sample pretrain.py's --rank_users draws with the same --seed), and the epoch with the best
   such NDCG@10 is kept, its weights in memory (RecBole's own checkpoint is a pickle, which this project never
   loads). That curve, against training minutes, is what `scripts/compare.py --curves` draws beside the T5's.
3. The split is checked user by user: RecBole's validation and test rows must have our target and our history (its
   last 50 items) for every user, or the script stops.
4. The best model scores every item for each of our test cases and the evaluation core (ranking.py) ranks the
   held-out item with the user's history excluded, as for every other model (RecBole's own full-sort evaluation of
   sequential models does not exclude the history). Written in the one results format (results.py) with per-user
   ranks, the reference rules beside it.
"""
import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from dataset import load_dataset  # noqa: E402
from metrics import ranking_metrics  # noqa: E402
from ranking import curve_users, eval_cases, rank_targets, rule_ranks, rule_settings  # noqa: E402
from results import FULL_RANKING, print_table, rank_rows, write_results  # noqa: E402
from utils import UserError, atomic_write_text, report_user_errors  # noqa: E402

MAX_LEN = 50  # RecBole's MAX_ITEM_LIST_LENGTH default


class OutOfTime(Exception):
    pass


def write_atomic_file(ds, folder, name):
    """<folder>/<name>/<name>.inter: one row per interaction, the item's position in the user's sequence as time."""
    rows = ["user_id:token\titem_id:token\ttimestamp:float"]
    for user, items in ds.sequences.items():
        rows += [f"{user}\t{item}\t{t}" for t, item in enumerate(items)]
    path = Path(folder) / name / f"{name}.inter"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "\n".join(rows) + "\n")
    return path


def recbole_config(args, data_root, name):
    return {
        "data_path": str(data_root), "dataset": name, "checkpoint_dir": str(Path(args.out) / "recbole_saved"),
        "USER_ID_FIELD": "user_id", "ITEM_ID_FIELD": "item_id", "TIME_FIELD": "timestamp",
        "load_col": {"inter": ["user_id", "item_id", "timestamp"]},
        "user_inter_num_interval": "[0,inf)", "item_inter_num_interval": "[0,inf)",
        "MAX_ITEM_LIST_LENGTH": MAX_LEN, "loss_type": "CE", "train_neg_sample_args": None,
        "eval_args": {"split": {"LS": "valid_and_test"}, "order": "TO", "group_by": "user", "mode": "full"},
        "metrics": ["Recall", "NDCG"], "topk": [10], "valid_metric": "NDCG@10",
        "epochs": args.epochs, "stopping_step": args.stopping_step, "learning_rate": args.lr,
        "train_batch_size": args.batch_size, "seed": args.seed,
        "hidden_dropout_prob": args.dropout, "attn_dropout_prob": args.dropout, "reproducibility": True,
        "use_gpu": args.cuda, "show_progress": False, "log_wandb": False,
    }


def check_split(ds, recbole_datasets):
    """Users whose RecBole validation / test row differs from ours (target, or the last MAX_LEN history items)."""
    mismatches, checked = {}, {}
    for split, rb in recbole_datasets.items():
        feat = rb.inter_feat
        item_token = rb.field2id_token["item_id"]
        user_token = rb.field2id_token["user_id"]
        ours = {str(u): (history[-MAX_LEN:], target) for u, history, target in zip(*eval_cases(ds, split))}
        seen, bad = set(), []
        for uid, seq, length, target in zip(feat["user_id"].tolist(), feat["item_id_list"].tolist(),
                                             feat["item_length"].tolist(), feat["item_id"].tolist()):
            user = str(user_token[uid])
            theirs = ([int(item_token[i]) for i in seq[:length]], int(item_token[target]))
            seen.add(user)
            if ours.get(user) != theirs:
                bad.append(user)
        bad += sorted(set(ours) - seen)  # a user RecBole dropped
        mismatches[split], checked[split] = bad, len(seen)
    return checked, mismatches


@torch.no_grad()
def split_ranks(model, ds, rb_dataset, device, split="test", users=None, batch_size=512):
    """Our `split` cases (of `users`, default all) scored by the RecBole model: (users, 0-based ranks over all items,
    history excluded: ranking.py)."""
    from recbole.data.interaction import Interaction
    token2id = rb_dataset.field2token_id["item_id"]
    # our item i -> RecBole's internal id; an item no interaction names is unknown to RecBole and ranks last
    known = [i for i in range(1, ds.num_items + 1) if str(i) in token2id]
    ours, theirs = torch.tensor(known), torch.tensor([token2id[str(i)] for i in known])
    to_internal = torch.zeros(ds.num_items + 1, dtype=torch.long)
    to_internal[ours] = theirs
    users, histories, targets = eval_cases(ds, split, users)
    model.eval()
    ranks = []
    for start in range(0, len(users), batch_size):
        batch = histories[start:start + batch_size]
        seqs = torch.zeros(len(batch), MAX_LEN, dtype=torch.long)
        lengths = torch.zeros(len(batch), dtype=torch.long)
        for row, history in enumerate(batch):
            h = history[-MAX_LEN:]
            seqs[row, :len(h)] = to_internal[torch.tensor(h)]   # RecBole's layout: left-aligned, zero-padded
            lengths[row] = len(h)
        inter = Interaction({"item_id_list": seqs, "item_length": lengths}).to(device)
        scores = torch.full((len(batch), ds.num_items + 1), float("-inf"))
        scores[:, ours] = model.full_sort_predict(inter).cpu()[:, theirs]
        ranks += rank_targets(scores, batch, targets[start:start + batch_size])
    return users, ranks


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data_dir", required=True, help="a P5-style dataset folder (sequential.txt, datamaps.json)")
    p.add_argument("--out", required=True, help="output folder: results_seq.json, RecBole's files and checkpoint")
    p.add_argument("--epochs", type=int, default=200)
    p.add_argument("--stopping_step", type=int, default=10, help="RecBole's early stopping (epochs)")
    p.add_argument("--max_minutes", type=float, default=30, help="training budget; the best epoch so far is kept")
    p.add_argument("--lr", type=float, default=0.001)
    p.add_argument("--batch_size", type=int, default=2048)
    p.add_argument("--dropout", type=float, default=0.5, help="RecBole's hidden and attention dropout")
    p.add_argument("--rank_users", type=int, default=1000,
                   help="validation users ranked by the evaluation core at every epoch (0: all)")
    p.add_argument("--cuda", action="store_true")
    p.add_argument("--seed", type=int, default=2020)
    args = p.parse_args(argv)
    try:
        import recbole
        from recbole.config import Config
        from recbole.data import create_dataset, data_preparation
        from recbole.model.sequential_recommender import SASRec
        from recbole.trainer import Trainer
        from recbole.utils import init_seed
    except ImportError as e:
        raise UserError(f"RecBole is not importable here ({e}); run this script with .venv-recbole/bin/python "
                        "after `bash scripts/setup_recbole.sh`") from None
    started = time.time()
    ds = load_dataset(args.data_dir, negatives=False)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    os.chdir(out)  # RecBole writes its tensorboard folder into the working directory
    name = Path(ds.data_dir).name
    write_atomic_file(ds, out / "recbole_data", name)

    config = Config(model="SASRec", dataset=name, config_dict=recbole_config(args, out / "recbole_data", name))
    init_seed(config["seed"], config["reproducibility"])
    dataset = create_dataset(config)
    train_data, valid_data, test_data = data_preparation(config, dataset)
    checked, mismatches = check_split(ds, {"val": valid_data.dataset, "test": test_data.dataset})
    for split, bad in mismatches.items():
        if bad:
            raise UserError(f"RecBole's {split} split differs from ours for {len(bad)} users (first: user {bad[0]}); "
                            "the figures would not be comparable")
    print(f"split check: RecBole's validation and test rows equal ours for all {checked['test']} users")

    model = SASRec(config, train_data.dataset).to(config["device"])
    trainer = Trainer(config, model)
    log, best_state = [], {}

    rank_users = curve_users(ds.users, args.rank_users, args.seed)   # pretrain.py's, so both curves rank the same users
    train_seconds, last = 0.0, time.time()

    def after_validation(epoch, score):
        nonlocal train_seconds, last
        train_seconds += time.time() - last        # training and RecBole's own validation; ours is not counted
        _, val_ranks = split_ranks(model, ds, train_data.dataset, config["device"], "val", rank_users)
        model.train()
        ours = ranking_metrics(val_ranks)["NDCG@10"]
        log.append({"epoch": epoch, "recbole_val_NDCG@10": float(score), "val_NDCG@10": ours,
                    "minutes": train_seconds / 60})
        print(f"epoch {epoch}: val NDCG@10 {ours:.4f} ({len(rank_users)} users, history excluded), RecBole's "
              f"{score:.4f} ({log[-1]['minutes']:.1f} min)", flush=True)
        if ours >= max(e["val_NDCG@10"] for e in log):       # the best so far: keep its weights (a copy in memory)
            best_state.update({k: v.detach().clone() for k, v in model.state_dict().items()})
        last = time.time()
        if log[-1]["minutes"] > args.max_minutes:
            raise OutOfTime

    try:
        trainer.fit(train_data, valid_data, saved=False, show_progress=False, callback_fn=after_validation)
        stopped = "early stopping" if log and len(log) < args.epochs else "epochs done"
    except OutOfTime:
        stopped = f"--max_minutes {args.max_minutes}"
    minutes = log[-1]["minutes"] if log else 0.0
    if not log:
        raise UserError("RecBole ran no validation: nothing to evaluate (raise --epochs or --max_minutes)")
    best = max(log, key=lambda e: e["val_NDCG@10"])
    model.load_state_dict(best_state)
    print(f"trained {minutes:.1f} min ({stopped}); best validation NDCG@10 {best['val_NDCG@10']:.4f} "
          f"at epoch {best['epoch']}")

    users, ranks = split_ranks(model, ds, train_data.dataset, config["device"])
    model_name = f"SASRec (RecBole {recbole.__version__}, CE)"
    reference_ranks = rule_ranks(ds, users, "test")
    rows = rank_rows(model_name, ranks, reference_ranks)
    print_table(rows, f"{ds.data_dir}: test, {len(users)} users, all items ranked, history excluded")
    write_results(out / "results_seq.json", task="seq", protocol=FULL_RANKING, model=model_name, ds=ds, users=users,
                  rows=rows, ranks=ranks, reference_ranks=reference_ranks, rule_settings=rule_settings(ds),
                  item_ids="P5 ids (RecBole tokens)", config=vars(args), started=started,
                  training={"minutes": minutes, "best_epoch": best["epoch"], "best_val_NDCG@10": best["val_NDCG@10"],
                            "stopped": stopped, "log": log},
                  details={"recbole_config": {k: config[k] for k in (
                      "n_layers", "n_heads", "hidden_size", "inner_size", "hidden_dropout_prob", "attn_dropout_prob",
                      "MAX_ITEM_LIST_LENGTH", "learning_rate", "train_batch_size", "loss_type")},
                      "split_check": {"users": checked, "mismatches": {s: len(b) for s, b in mismatches.items()}}},
                  versions={"recbole": recbole.__version__})


if __name__ == "__main__":
    report_user_errors()
    main()
