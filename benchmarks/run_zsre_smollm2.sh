#!/usr/bin/env bash
# ZsRE on SmolLM2-135M: MEMOIR at T = 1, 10, 100 (and 1000 with RUN_1000=1), FT-L at T = 10, 100, and
# MEMOIR with the sparser mask (configs/smollm2-135m-sparse.yaml) at T = 100 with 30 and 60 steps.
# Each run checkpoints its memory under benchmarks/checkpoints/ and resumes if interrupted.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_WAIT_POLICY=PASSIVE
DATA=${MEMOIR_DATA_DIR:-../shared/data}/ZsRE/zsre_mend_edit.json
# Irrelevant samples as WISE uses them: loc prompts of ZsRE *train* records, none of them in the test set.
NEGATIVES=${MEMOIR_DATA_DIR:-../shared/data}/ZsRE/zsre_mend_train_first1000_loc_prompts.RECONSTRUCTED.json
RESULTS=benchmarks/results
T_MEMOIR="1 10 100${RUN_1000:+ 1000}"
for T in $T_MEMOIR; do
  memoir-hf eval --model smollm2 --data "$DATA" --format zsre --edits "$T" --config configs/smollm2-135m.yaml \
    --threads 2 --calibration-texts "$NEGATIVES" --checkpoint-dir "benchmarks/checkpoints/zsre_smollm2_memoir_T$T" --checkpoint-every 50 \
    --out "$RESULTS/zsre_smollm2_memoir_T$T.json" --plot "$RESULTS/zsre_smollm2_memoir_T${T}_sweep.png"
done
for T in 10 100; do
  memoir-hf eval --model smollm2 --data "$DATA" --format zsre --edits "$T" --config configs/smollm2-135m.yaml \
    --method ft-l --threads 2 --out "$RESULTS/zsre_smollm2_ftl_T$T.json"
done
# A sparser mask (k/d_ff = 0.1, step doubled): the lever against interference between edits.
for RUN in sparse:30 sparse60:60; do  # results name : max_steps
  NAME=zsre_smollm2_memoir_${RUN%:*}_T100
  MEMOIR_MAX_STEPS=${RUN#*:} memoir-hf eval --model smollm2 --data "$DATA" --format zsre --edits 100 \
    --config configs/smollm2-135m-sparse.yaml --threads 2 --calibration-texts "$NEGATIVES" \
    --checkpoint-dir "benchmarks/checkpoints/$NAME" --checkpoint-every 50 \
    --out "$RESULTS/$NAME.json" --plot "$RESULTS/${NAME}_sweep.png"
done
