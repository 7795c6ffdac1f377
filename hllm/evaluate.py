"""Leave-one-out full ranking: every user's held-out item is ranked against all items, the user's earlier items
masked out (except the target itself, so a repeat purchase can still be hit). Ties count against the target.

validation: history = training part, target = the second-last item; test: history = training part + validation
item, target = the last item. Scores for a batch of users are one matrix product (user vectors @ item vectors).
"""
import numpy as np
import torch
import torch.nn.functional as F

from metrics import ranking_metrics
from utils import bf16_supported

KS = (5, 10, 20, 50)


def eval_cases(ds, split):
    """[(user, history, target)] for split 'val' or 'test'."""
    if split == "val":
        return [(u, ds.train_items(u), ds.val_item(u)) for u in ds.sequences]
    if split == "test":
        return [(u, ds.train_items(u) + [ds.val_item(u)], ds.test_item(u)) for u in ds.sequences]
    raise ValueError(f"split must be val or test, got {split!r}")


def rank_targets(scores, histories, targets):
    """0-based ranks of targets among items 1..N. scores: [B, N + 1] (column 0 = padding id, never ranked)."""
    scores = torch.nan_to_num(scores.float(), nan=float("-inf"))  # a NaN score ranks last, never first
    scores[:, 0] = float("-inf")
    for row, (history, target) in enumerate(zip(histories, targets)):
        masked = [i for i in set(history) if i != target]
        if masked:
            scores[row, masked] = float("-inf")
    target_scores = scores[torch.arange(len(targets)), torch.as_tensor(targets)]
    return ((scores >= target_scores[:, None]).sum(1) - 1).tolist()


def metrics_from_ranks(ranks):
    return ranking_metrics(ranks, ks=KS, ndcg_ks=KS, hr_name="Recall")


def pad_right(seqs):
    longest = max(len(s) for s in seqs)
    ids = torch.zeros((len(seqs), longest), dtype=torch.long)
    for row, s in enumerate(seqs):
        ids[row, :len(s)] = torch.tensor(s)
    return ids


@torch.no_grad()
def evaluate_model(model, ds, split, batch_size=64, max_seq_len=20, device=torch.device("cpu"), bf16=None):
    """Metrics and ranks of a UserLLM on one split. The user LLM runs under bf16 autocast where the device has
    fast bf16 (as in training); scores are compared in float32."""
    bf16 = bf16_supported(device) if bf16 is None else bf16
    was_training = model.training
    model.eval()
    items = F.normalize(model.all_item_vectors(), dim=-1)  # [N + 1, d]
    cases = eval_cases(ds, split)
    order = sorted(range(len(cases)), key=lambda i: len(cases[i][1]))  # similar lengths together: less padding
    ranks = [None] * len(cases)
    for start in range(0, len(order), batch_size):
        batch = [cases[i] for i in order[start:start + batch_size]]
        ids = pad_right([history[-max_seq_len:] for _, history, _ in batch]).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            users = F.normalize(model.user_vectors(ids, (ids != 0).long()).float(), dim=-1)
        batch_ranks = rank_targets((users @ items.T).cpu(), [h for _, h, _ in batch], [t for _, _, t in batch])
        for i, rank in zip(order[start:start + batch_size], batch_ranks):
            ranks[i] = rank
    model.train(was_training)
    return metrics_from_ranks(ranks), ranks


def evaluate_popularity(ds, split, batch_size=256):
    """Most-popular not-yet-bought items, popularity counted over the interactions known before the split."""
    cases = eval_cases(ds, split)
    counts = np.zeros(ds.num_items + 1)
    for _, history, _ in cases:
        np.add.at(counts, history, 1)
    counts = torch.as_tensor(counts, dtype=torch.float32)
    ranks = []
    for start in range(0, len(cases), batch_size):
        batch = cases[start:start + batch_size]
        ranks += rank_targets(counts.expand(len(batch), -1), [h for _, h, _ in batch], [t for _, _, t in batch])
    return metrics_from_ranks(ranks), ranks
