#!/usr/bin/env bash
# The paper's configuration on a GPU: pretrained t5-small, all four tasks, on beauty / sports / toys, with the
# published ids (comparable with the POD / RDRec / HDRec tables, id leak included) and leak-free random ids; and the
# same datasets with this project's recipe (--recipe learn) for comparison. Needs, per dataset, the P5 files in
# data/{dataset}/ (sequential.txt, datamaps.json; explanation.json and, after distillation,
# explanation_rationale.json for the text tasks) and the t5-small weights (hub name or a local folder in T5=...).
#   bash scripts/paper_gpu.sh                       # everything
#   DATASETS=beauty RECIPES=paper IDS=random bash scripts/paper_gpu.sh
# Every run resumes when restarted; results land in checkpoint/{dataset}_{recipe}_{ids}/results_*.json.
set -euo pipefail
cd "$(dirname "$0")/.."
DATASETS=${DATASETS:-"beauty sports toys"}
RECIPES=${RECIPES:-"paper learn"}
IDS=${IDS:-"published random"}
T5=${T5:-t5-small}
SEED=${SEED:-1}
NPROC=${NPROC:-1}                # GPUs: torchrun --nproc_per_node
PY=${PYTHON:-python3}

for ds in $DATASETS; do
    data=data/$ds
    [ -f "$data/sequential.txt" ] || { echo "skip $ds: no $data/sequential.txt (put the P5 files there)"; continue; }
    # the text tasks need their records: explanation (explanation.json) and review summary (distilled)
    if [ -f "$data/explanation_rationale.json" ]; then ratio=1:1:1:3
    elif [ -f "$data/explanation.json" ]; then ratio=1:1:0:3
    else ratio=0:1:0:3; fi
    for recipe in $RECIPES; do
        for ids in $IDS; do
            ckpt=checkpoint/${ds}_${recipe}_${ids}
            echo "== $ds, recipe $recipe, $ids ids, ratio $ratio -> $ckpt"
            torchrun --nproc_per_node "$NPROC" pretrain.py --data_dir "$data" --checkpoint "$ckpt" --cuda \
                --recipe "$recipe" --backbone "$T5" --item_ids "$ids" --ratio "$ratio" --batch_size 64 --seed "$SEED"
            for protocol in clean paper; do
                $PY seq.py --data_dir "$data" --checkpoint "$ckpt" --cuda --protocol $protocol --seed "$SEED"
                $PY topn.py --data_dir "$data" --checkpoint "$ckpt" --cuda --protocol $protocol --seed "$SEED"
            done
            [ "$ratio" = 0:1:0:3 ] || $PY exp.py --data_dir "$data" --checkpoint "$ckpt" --cuda --seed "$SEED"
            $PY scripts/results_table.py "$ckpt"
        done
    done
done
