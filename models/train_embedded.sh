#!/usr/bin/env bash
# The embedded model's books-only recipe, end to end: train, build its bank, evaluate base beside bank.
#   bash models/train_embedded.sh SEED DATA_DIR OUT_DIR [STAGES]
# DATA_DIR holds the shared Gutenberg files (train-00/01.jsonl.xz, eval.jsonl.xz). STAGES is any of
# "train bank eval" (default: all three, in order). Run on a CUDA machine with mamba_ssm (the model card says
# how long it took). The bank build resumes where it stopped. TRAIN_FLAGS adds to or overrides the recipe's
# flags; TRAIN_DATA replaces its training text (extend.sources specs; default: the two Gutenberg shards);
# TRAIN_TIME_LIMIT=SECONDS stops training there with its state in OUT_DIR/training-state (exit status 75), and the
# same command continues it (a machine that runs a command for minutes at most). The
# shipped model (models/mamba-extend-default) is trained on books and other kinds of text: models/screen_domains.sh's
# train stage runs this script's training with its TRAIN_DATA and TRAIN_FLAGS, then a bank calibrated on every kind.
set -euo pipefail
train_flags=${TRAIN_FLAGS:-}
seed=$1 data=$2 out=$3 stages=${4:-train bank eval}
model=$out/model bank=$out/model/bank
for stage in $stages; do
  case $stage in
    train) python3 -m extend.train --tokenizer models/mamba-extend-default/tokenizer.json \
             --data ${TRAIN_DATA:-"$data"/train-00.jsonl.xz "$data"/train-01.jsonl.xz} --out "$model" --d-model 256 --n-layer 8 \
             --d-state 48 --length 512 --steps 6000 --batch-size 64 --answer-weight 3 --curriculum 0 \
             ${TRAIN_TIME_LIMIT:+--state-dir "$out/training-state" --time-limit "$TRAIN_TIME_LIMIT"} \
             $train_flags --seed "$seed" ;;
    bank) python3 -m extend.build_bank --model "$model" --buckets 1k,2k,4k,8k,16k,32k --task passkey --calibrator bp \
            --granularity channel --method a_spectrum --data "$data"/train-01.jsonl.xz --out "$bank" --seed "$seed" \
            --steps 150 --lr 0.05 --batch-size 8 --eval-samples 20 --ppl-weight 10 --ppl-slack 0.02 --no-progress \
            --resume ;;
    eval) python3 -m extend.evaluate --model "$model" --bank "$bank" --task passkey,ppl \
            --lengths 512,1k,2k,4k,8k,16k,32k --data "$data"/eval.jsonl.xz --samples 50 --batch-size 5 \
            --out "$out/eval" ;;
    *) echo "unknown stage $stage (train, bank, eval)" >&2; exit 2 ;;
  esac
done
