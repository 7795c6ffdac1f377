#!/usr/bin/env bash
# The whole HDRec pipeline, offline, on a shared Amazon 2018 review dump:
#   prepare (raw reviews -> dataset dir) -> distill (SmolLM2, 5 stages) -> pretrain (from-scratch T5) -> evaluate.
# Every step resumes: rerun after an interruption and finished work is kept. Override any variable, e.g.
#   REVIEWS=path/to/Beauty_5.json.gz LIMIT=0 MINUTES=120 BACKBONE=small bash scripts/main.sh
set -euo pipefail
cd "$(dirname "$0")/.."
REVIEWS=${REVIEWS:-../shared/data/amazon2018/Gift_Cards_5.json.gz}
NAME=${NAME:-$(basename "$REVIEWS" | sed 's/_5\.json.*//; s/\.json.*//' | tr 'A-Z' 'a-z')}
DATA=${DATA:-runs/$NAME}
CKPT=${CKPT:-checkpoint/$NAME}
LIMIT=${LIMIT:-8}            # records per split the LLM distils (0: all; SmolLM2 on 2 CPU cores, constrained: ~9 records/s a stage, all 736 Gift_Cards records in 6.5 min)
MINUTES=${MINUTES:-12}       # training time budget
BACKBONE=${BACKBONE:-mini}   # tiny | mini | small (from scratch), or a pretrained T5 name/folder
K=${K:-5}                    # k-core of prepare (All_Beauty_5 needs 3 once review copies across variants are dropped)
SEED=${SEED:-1}
PY=${PYTHON:-python3}

[ -f "$DATA/sequential.txt" ] || $PY data/prepare.py --reviews "$REVIEWS" --out "$DATA" --k "$K" --skip_bad --seed "$SEED"
limit=(); [ "$LIMIT" = 0 ] || limit=(--limit "$LIMIT")
$PY data/distill.py --data_dir "$DATA" "${limit[@]}" --greedy --max_batch_size 16 \
    --seed "$SEED"
# the learn recipe with the multi-task settings of a small review set, as measured (docs/RESULTS.md): item embeddings
# from co-occurrence at T5's scale, small batches, no warm-up, a validation every 20 steps and 10 of them without gain
# in every task before stopping (the recipe's defaults are beauty's sequential ones)
$PY pretrain.py --data_dir "$DATA" --checkpoint "$CKPT" --backbone "$BACKBONE" --item_ids random --ratio 1:1:1:3 \
    --item_init cooc --output_scale t5 --embedding_std 0 --name_user yes --input_scale none --batch_size 32 --warmup_steps 0 --endure_times 10 \
    --max_minutes "$MINUTES" --val_every 20 --seed "$SEED"
for protocol in clean paper; do
    $PY seq.py --data_dir "$DATA" --checkpoint "$CKPT" --protocol $protocol --seed "$SEED"
    $PY topn.py --data_dir "$DATA" --checkpoint "$CKPT" --protocol $protocol --seed "$SEED"
done
$PY exp.py --data_dir "$DATA" --checkpoint "$CKPT" --seed "$SEED"
$PY exp.py --data_dir "$DATA" --checkpoint "$CKPT" --task review --seed "$SEED"
$PY scripts/results_table.py "$CKPT"
