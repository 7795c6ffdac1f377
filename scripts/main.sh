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
BACKBONE=${BACKBONE:-tiny}   # tiny | mini | small (from scratch), or a pretrained T5 name/folder
K=${K:-5}                    # k-core of prepare (All_Beauty_5 needs 3 once review copies across variants are dropped)
RATIO=${RATIO:-1:1:1:3}      # explanation : sequential : review summary : top-N samples per user (HDRec's four tasks)
TARGET=${TARGET:-auto}       # explanation target: auto/llm (HDRec: the LLM's explanation), review (POD: the review sentence)
SEED=${SEED:-1}
PY=${PYTHON:-python3}

[ -f "$DATA/sequential.txt" ] || $PY data/prepare.py --reviews "$REVIEWS" --out "$DATA" --k "$K" --skip_bad --seed "$SEED"
limit=(); [ "$LIMIT" = 0 ] || limit=(--limit "$LIMIT")
# DISTILL_ARGS / TRAIN_ARGS / EVAL_ARGS: more flags for distill.py / pretrain.py / the evaluations (e.g. --cuda)
read -ra distill_args <<< "${DISTILL_ARGS:-}"; read -ra train_args <<< "${TRAIN_ARGS:-}"; read -ra eval_args <<< "${EVAL_ARGS:-}"
# exp.py's decoding: greedy (the paper's) with no token pair written twice, chosen on validation over the review sets
# (docs/RESULTS.md §9: a model of a few hundred sentences otherwise loops, "andndndnd"); EXP_ARGS= for the paper's
read -ra exp_args <<< "${EXP_ARGS---no_repeat_ngram_size 2}"
$PY data/distill.py --data_dir "$DATA" "${limit[@]}" --greedy --max_batch_size 16 \
    --seed "$SEED" "${distill_args[@]}"
# the learn recipe (its defaults: random ids, inputs layer-normalised, std .02 embeddings) with the settings of a small
# review set, as measured (docs/RESULTS.md §9): batches of 32, no warm-up, a validation every 20 steps, and training
# until no task has gained for 10 validations (ranking: NDCG@10; text: the ROUGE-L of greedy validation texts, or
# its loss) or at the budget; --epochs only as a cap, since an epoch of a small set is a few steps; a constant
# learning rate, as measured (the recipe's plateau halving was chosen on the large sets' ranking)
$PY pretrain.py --data_dir "$DATA" --checkpoint "$CKPT" --backbone "$BACKBONE" --ratio "$RATIO" \
    --explanation_target "$TARGET" --batch_size 32 --warmup_steps 0 --val_every 20 --endure_times 10 --epochs 1000 \
    --lr_decay none --max_minutes "$MINUTES" --seed "$SEED" "${train_args[@]}"
for protocol in clean paper; do
    $PY seq.py --data_dir "$DATA" --checkpoint "$CKPT" --protocol $protocol --seed "$SEED" "${eval_args[@]}"
    $PY topn.py --data_dir "$DATA" --checkpoint "$CKPT" --protocol $protocol --seed "$SEED" "${eval_args[@]}"
done
IFS=: read -r exp_share _ review_share _ <<< "$RATIO"     # a text task that was not trained is not evaluated
[ "$exp_share" = 0 ] || $PY exp.py --data_dir "$DATA" --checkpoint "$CKPT" --seed "$SEED" "${exp_args[@]}" \
    "${eval_args[@]}"
[ "$review_share" = 0 ] || $PY exp.py --data_dir "$DATA" --checkpoint "$CKPT" --task review --seed "$SEED" \
    "${exp_args[@]}" "${eval_args[@]}"
$PY scripts/results_table.py "$CKPT"
