"""HSFT's scores for the evaluation core (ranking.py): the user LLM's vector of each history against every item's
vector (cosine), for all items at once; ranking.py ranks the held-out item with the history excluded."""
import torch
import torch.nn.functional as F

from metrics import ranking_metrics
from ranking import eval_cases, rank_targets
from utils import bf16_supported


def pad_right(seqs):
    longest = max(len(s) for s in seqs)
    ids = torch.zeros((len(seqs), longest), dtype=torch.long)
    for row, s in enumerate(seqs):
        ids[row, :len(s)] = torch.tensor(s)
    return ids


@torch.no_grad()
def evaluate_model(model, ds, split, batch_size=64, max_seq_len=20, device=torch.device("cpu"), bf16=None):
    """(metrics, ranks) of a UserLLM on one split, ranks in the order of ds.sequences. The user LLM runs under bf16
    autocast where the device has fast bf16 (as in training); scores are compared in float32."""
    bf16 = bf16_supported(device) if bf16 is None else bf16
    was_training = model.training
    model.eval()
    items = F.normalize(model.all_item_vectors(), dim=-1)  # [N + 1, d]
    _, histories, targets = eval_cases(ds, split)
    order = sorted(range(len(targets)), key=lambda i: len(histories[i]))  # similar lengths together: less padding
    ranks = [None] * len(targets)
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        ids = pad_right([histories[i][-max_seq_len:] for i in batch]).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            users = F.normalize(model.user_vectors(ids, (ids != 0).long()).float(), dim=-1)
        batch_ranks = rank_targets((users @ items.T).cpu(), [histories[i] for i in batch], [targets[i] for i in batch])
        for i, rank in zip(batch, batch_ranks):
            ranks[i] = rank
    model.train(was_training)
    return ranking_metrics(ranks), ranks
