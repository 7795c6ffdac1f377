"""Top-N recommendation: rank each test user's held-out item among its 99 negatives (negative.txt).

    python topn.py --data_dir ./data/beauty/ --cuda --batch_size 32 --checkpoint ./checkpoint/beauty/

--protocol clean (default): all 100 candidates ranked by the model's sequence likelihood log p(item | prompt).
--protocol paper: 20 unconstrained beams as the original code; the item counts where it appears in the top 10.
"""
import random
import time

import torch
from tqdm import tqdm

import tasks
from evaluation import (autocast, batches, decode_items, eval_users, load_run, parser, popularity, print_table,
                        topn_reference_scores, write_results)
from metrics import rank_by_score, rank_of, ranking_metrics

p = parser("top-N recommendation among 100 candidates: HR@{1,5,10}, NDCG@{5,10}")
p.add_argument("--num_beams", type=int, default=20, help="paper protocol only")
p.add_argument("--top_k", type=int, default=10, help="paper protocol only")
args = p.parse_args()
started = time.time()

model, tokenizer, meta, ds, encoder, device = load_run(args)
users = eval_users(ds, args.users, args.seed)
rng = random.Random(args.seed)
pop = popularity(ds)
task_id = tasks.TASKS.index("topn")

ranks, reference_ranks = [], {}
for chunk in tqdm(list(batches(users, args.batch_size)), desc="topn", dynamic_ncols=True):
    candidates = [tasks.topn_candidates(ds, u, rng, "test") for u in chunk]     # positive first
    samples = [tasks.topn_sample(ds, u, rng, "test", c) for u, c in zip(chunk, candidates)]
    batch = tasks.to_device(tasks.collate(tasks.encode_samples(encoder, samples), task_id), device)
    with autocast(device):
        if args.protocol == "paper":
            out = model.generate(batch, num_beams=args.num_beams, num_return_sequences=args.top_k)
            ranks += [rank_of(c[0], items) for c, items in zip(candidates, decode_items(tokenizer, out, args.top_k))]
        else:
            labels = [[encoder.target(tasks.item_word(i)) for i in c] for c in candidates]
            L = max(len(t) for c in labels for t in c)
            label_tensor = torch.full((len(chunk), len(candidates[0]), L), -100, dtype=torch.long)
            for b, c in enumerate(labels):
                for j, t in enumerate(c):
                    label_tensor[b, j, :len(t)] = torch.tensor(t)
            scores = model.score_candidates(batch, label_tensor.to(device)).cpu()
            ranks += [rank_by_score(s.tolist(), 0) for s in scores]
    for u, c in zip(chunk, candidates):
        for rule, s in topn_reference_scores(ds, u, c, pop).items():
            reference_ranks.setdefault(rule, []).append(rank_by_score(s, 0))
seconds = time.time() - started

rows = {f"HDRec ({args.protocol})": ranking_metrics(ranks),
        **{rule: ranking_metrics(r) for rule, r in reference_ranks.items()}}
print_table(rows, f"top-N among 100 candidates, {len(users)} users, item ids {meta.get('item_ids', 'published')}, "
                  f"{len(users) / seconds:.1f} users/s")
write_results(args, "topn", meta, ds, users, {**rows, "users_per_second": len(users) / seconds}, started)
