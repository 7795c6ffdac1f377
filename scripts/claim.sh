#!/usr/bin/env bash
# Does distillation help? HDRec's claim measured on the review sets at hand: the main job (scripts/main.sh) under three
# set-ups, with every record distilled, the same budget and the same seeds:
#   hdrec    all four tasks; the LLM's ground-truth explanations and review summaries are the text targets (the paper)
#   pod      the review sentence is the explanation target, no review summaries (POD / RDRec without rationales)
#   ranking  the sequential and top-N tasks alone
# then mean ± std over seeds (scripts/compare.py --across for the ranking, scripts/repeat.py summary for the text) and
# paired tests between the set-ups: over users for NDCG@10, over test records for ROUGE-L against the review sentence.
#   bash scripts/claim.sh                                   # Gift_Cards, All_Beauty, Appliances x seeds 1,2,3
#   SETS="Gift_Cards:5" SEEDS=1 MINUTES=2 bash scripts/claim.sh
#   SETUPS="ranking pod hdrec" SEEDS="3 2 1" bash scripts/claim.sh     # a second process beside the first (2 cores)
# With Llama-3-8B-Instruct as the paper and a pretrained T5 on a GPU (every flag as in data/distill.py / pretrain.py):
#   DISTILL_ARGS="--ckpt_dir meta-llama/Meta-Llama-3-8B-Instruct --backend vllm --max_batch_size 64" \
#   TRAIN_ARGS=--cuda EVAL_ARGS=--cuda BACKBONE=t5-small MINUTES=60 bash scripts/claim.sh
# Every run resumes (main.sh's steps do); results land in $ROOT/{set}/{setup}/seed_{seed}/ (ROOT: checkpoint/claim).
set -euo pipefail
cd "$(dirname "$0")/.."
SETS=${SETS:-"Gift_Cards:5 All_Beauty:3 Appliances:3"}   # review file : k-core (what is left of each after 5-core)
SEEDS=${SEEDS:-"1 2 3"}
SETUPS=${SETUPS:-"hdrec pod ranking"}
ROOT=${ROOT:-checkpoint/claim}
export MINUTES=${MINUTES:-12} BACKBONE=${BACKBONE:-tiny} LIMIT=0
PY=${PYTHON:-python3}
declare -A SETUP=([hdrec]="1:1:1:3 llm" [pod]="1:1:0:3 review" [ranking]="0:1:0:3 review")

for set in $SETS; do
    name=$(echo "${set%%:*}" | tr 'A-Z' 'a-z')
    for setup in $SETUPS; do
        read -r ratio target <<< "${SETUP[$setup]}"
        for seed in $SEEDS; do
            ckpt=$ROOT/$name/$setup/seed_$seed log=$ROOT/$name.$setup.$seed.log
            [ -f "$ckpt/claim_done" ] && continue      # evaluated by an earlier call
            mkdir -p "$(dirname "$ckpt")"
            mkdir "$ckpt.claimed" 2>/dev/null || continue  # another process has it (a rerun after a crash: rm -r it)
            echo "== $name, $setup (ratio $ratio, explanation target $target), seed $seed: $log"
            REVIEWS=../shared/data/amazon2018/${set%%:*}_5.json.gz K=${set##*:} DATA=runs/claim/$name CKPT=$ckpt \
                RATIO=$ratio TARGET=$target SEED=$seed bash scripts/main.sh > "$log" 2>&1 \
                || { echo "failed: see $log"; rmdir "$ckpt.claimed"; exit 1; }
            touch "$ckpt/claim_done"
            rmdir "$ckpt.claimed"
        done
    done
done

names=$(for set in $SETS; do echo "${set%%:*}" | tr 'A-Z' 'a-z'; done)
has() { [[ " $SETUPS " == *" $1 "* ]]; }       # the summary covers the set-ups of this call
echo "# ranking: test NDCG@10 over all items, mean ± std over seeds, paired against the strongest rule"
$PY scripts/compare.py --across $(for name in $names; do for setup in $SETUPS; do
    echo $ROOT/$name/$setup/seed_*/results_seq.json; done; done)
for name in $names; do
    c=$ROOT/$name
    for setup in hdrec pod; do
        has $setup || continue
        echo; echo "# $name, $setup: explanations against the review sentence, mean ± std over seeds"
        $PY scripts/repeat.py summary $c/$setup/seed_*/results_exp.json
    done
    echo; echo "# $name: paired tests (A - B)"
    for pair in "hdrec pod" "hdrec ranking" "pod ranking"; do
        read -r a b <<< "$pair"; has $a && has $b || continue
        echo "## ranking, $a - $b"
        $PY scripts/repeat.py compare $c/$a/seed_*/results_seq.json --vs $c/$b/seed_*/results_seq.json
    done
    if has hdrec && has pod; then
        echo "## explanations, hdrec - pod"
        $PY scripts/repeat.py compare $c/hdrec/seed_*/results_exp.json --vs $c/pod/seed_*/results_exp.json --metric ROUGE-L
    fi
    for setup in hdrec pod; do
        has $setup || continue
        for rule in user_most_recent item_most_frequent most_frequent; do
            echo "## explanations, $setup - $rule"
            $PY scripts/repeat.py compare $c/$setup/seed_*/results_exp.json --vs_rule $rule --metric ROUGE-L
        done
    done
done
