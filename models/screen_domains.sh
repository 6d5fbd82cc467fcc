#!/usr/bin/env bash
# Screens the bank across kinds of text, all stages side by side on one GPU. Domains: Gutenberg books, the
# Python documentation and standard library, Linux man pages and the passkey papers' filler, calibrated on
# (books: train-01; the others: their @train parts) and evaluated on text calibration never reads (books: the eval
# authors; the others: their @eval parts), plus the Debian Reference, which no calibration or training reads.
#   bash models/screen_domains.sh GUTENBERG_DIR DOMAINS_DIR OUT_DIR [STAGES]
# STAGES (default all):
#   transfer   extend.transfer on MODEL: an A-spectrum bank on every calibration source, and one without each
#   mixed      the per-channel bank calibrated on every source (transfer's `all` bank) alone, on every domain
#   shipped    MODEL's own bank on every domain
#   layer      a bank of one A scale per layer, calibrated on every source, on every domain
#   templates  the per-channel bank calibrated in three templates (line, inline, instructed)
#   train      new bases (seeds TRAIN_SEEDS) of the embedded recipe trained on books (weight 2) and the domains'
#              @train parts (1 each), passkeys in the line, inline, instructed and paraphrased templates, each
#              given the mixed per-channel bank and evaluated on every domain; then, for the seeds in
#              TRANSFER_SEEDS (default none), the transfer stage on that base, its mixed bank serving as `all`.
#              A base already in OUT_DIR/mixed-sSEED/model is not trained again, and TRAIN_ONLY=1 stops after
#              training: a GPU session can train, hand the models back, and a later one bank and evaluate them;
#              with TRAIN_TIME_LIMIT (models/train_embedded.sh) a seed stops training at the limit and the same
#              command continues it
# MODEL defaults to the shipped model; STEPS, SAMPLES, EVAL_SAMPLES, BUCKETS, LENGTHS and TRAIN_STEPS shrink a
# smoke run; TRANSFER_BUCKETS and TRANSFER_LENGTHS (default BUCKETS and LENGTHS) narrow the transfer experiment,
# e.g. to 4k, the 8x the bar asks of a domain left out; BANK_BUCKETS (default BUCKETS) widens the mixed
# banks; WIDER_BUCKETS (default none), the train stage's bank once it is evaluated (e.g. 1k,...,32k for a base
# that may ship: the evaluation comes back first). Each stage logs to OUT_DIR/STAGE.log.
set -uo pipefail
gut=$1 dom=$2 out=$3 stages=${4:-transfer shipped layer templates train}
model=${MODEL:-models/mamba-extend-default}
buckets=${BUCKETS:-1k,2k,4k,8k} lengths=${LENGTHS:-512,4k,8k} samples=${SAMPLES:-50}
docs=$dom/python-docs.jsonl.xz code=$dom/python-code.jsonl.xz man=$dom/manpages.jsonl.xz
calibration="books=$gut/train-01.jsonl.xz,docs=$docs@train,code=$code@train,man=$man@train,filler"
evaluation="books=$gut/eval.jsonl.xz,docs=$docs@eval,code=$code@eval,man=$man@eval"
evaluation+=",debian=$dom/debian-reference.jsonl.xz,filler"
templates=line,inline,instructed,reworded,quizzed,secret  # evaluated; no training or calibration asks in the last three
bank_flags="--task passkey --calibrator bp --method a_spectrum --steps ${STEPS:-150} --lr 0.05 --batch-size 8
  --eval-samples ${EVAL_SAMPLES:-20} --eval-batch-size 5 --ppl-weight 10 --ppl-slack 0.02 --no-progress"
user_threads=${OMP_NUM_THREADS:-}
mkdir -p "$out"

evaluate() {  # MODEL BANK OUT
  python3 -m extend.evaluate --model "$1" --bank "$2" --data "$evaluation" --templates "$templates" --task passkey,ppl \
    --lengths "$lengths" --samples "$samples" --batch-size 5 --out "$3"
}
transfer() {  # MODEL OUT SEED
  [[ -n $user_threads ]] || unset OMP_NUM_THREADS  # extend.jobs gives each of its jobs a share (a seed's is wider)
  python3 -m extend.transfer --model "$1" --calibration "$calibration" --evaluation "$evaluation" \
    --buckets "${TRANSFER_BUCKETS:-$buckets}" --lengths "${TRANSFER_LENGTHS:-$lengths}" --templates "$templates" \
    --samples "$samples" --jobs 6 --seed "$3" --out "$2" \
    -- $bank_flags --granularity channel
}
mixed_bank() {  # MODEL OUT [build_bank flags]
  python3 -m extend.build_bank --model "$1" --data "$calibration" --buckets "${BANK_BUCKETS:-$buckets}" \
    --out "$2" --resume $bank_flags "${@:3}"
}

for stage in $stages; do
  case $stage in
    transfer) transfer "$model" "$out/transfer" 0 ;;
    mixed) mixed_bank "$model" "$out/mixed/bank" --granularity channel && evaluate "$model" "$out/mixed/bank" \
             "$out/mixed/eval" ;;
    shipped) evaluate "$model" "$model/bank" "$out/shipped" ;;
    layer) mixed_bank "$model" "$out/layer/bank" --granularity layer && evaluate "$model" "$out/layer/bank" \
             "$out/layer/eval" ;;
    templates) mixed_bank "$model" "$out/templates/bank" --granularity channel --templates line,inline,instructed \
                 && evaluate "$model" "$out/templates/bank" "$out/templates/eval" ;;
    train)
      seeds=(${TRAIN_SEEDS:-0 1})  # side by side, each with its share of the cores (as extend.jobs gives)
      export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / ${#seeds[@]} > 0 ? $(nproc) / ${#seeds[@]} : 1 ))}
      for seed in "${seeds[@]}"; do
        run=$out/mixed-s$seed
        (if [[ ! -f $run/model/model.safetensors ]]; then
           TRAIN_DATA="books=$gut/train-00.jsonl.xz+$gut/train-01.jsonl.xz,docs=$docs@train,code=$code@train,man=$man@train" \
             TRAIN_FLAGS="--templates line,inline,instructed,paraphrased --mixture books=2 --steps ${TRAIN_STEPS:-6000} ${TRAIN_FLAGS:-}" \
             bash models/train_embedded.sh "$seed" "$gut" "$run" train
         fi \
         && [[ -z ${TRAIN_ONLY:-} ]] \
         && mixed_bank "$run/model" "$run/model/bank" --granularity channel --seed "$seed" \
         && evaluate "$run/model" "$run/model/bank" "$run/eval" \
         && if [[ -n ${WIDER_BUCKETS:-} ]]; then
              BANK_BUCKETS=$WIDER_BUCKETS mixed_bank "$run/model" "$run/model/bank" --granularity channel --seed "$seed"
            fi \
         && if [[ " ${TRANSFER_SEEDS:-} " == *" $seed "* ]]; then
              mkdir -p "$run/transfer/banks" && cp -r "$run/model/bank" "$run/transfer/banks/all" \
              && transfer "$run/model" "$run/transfer" "$seed"
            fi) > "$out/train-s$seed.log" 2>&1 &
      done
      wait ;;
    *) echo "unknown stage $stage" >&2; exit 2 ;;
  esac > "$out/$stage.log" 2>&1 &
done
wait
