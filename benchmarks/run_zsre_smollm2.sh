#!/usr/bin/env bash
# ZsRE on SmolLM2-135M: MEMOIR at T = 1, 10, 100 (and 1000 with RUN_1000=1), FT-L at T = 10, 100, and
# MEMOIR with the sparser mask (configs/smollm2-135m-sparse.yaml) at T = 100 with 30 and 60 steps, with
# the standardized fingerprint (configs/smollm2-135m-standardized.yaml) and with the protected write
# (configs/smollm2-135m-protect.yaml, and -0.05.yaml five times as strong) at T = 100.
# Each run checkpoints its memory under benchmarks/checkpoints/ and resumes if interrupted; a run whose
# results JSON exists is skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_WAIT_POLICY=PASSIVE
DATA=${MEMOIR_DATA_DIR:-../shared/data}/ZsRE/zsre_mend_edit.json
# Irrelevant samples as WISE uses them: loc prompts of ZsRE *train* records, none of them in the test set.
NEGATIVES=${MEMOIR_DATA_DIR:-../shared/data}/ZsRE/zsre_mend_train_first1000_loc_prompts.RECONSTRUCTED.json
RESULTS=benchmarks/results
source benchmarks/evaluate.sh

for T in 1 10 100${RUN_1000:+ 1000}; do
  evaluate "zsre_smollm2_memoir_T$T" smollm2 "$DATA" zsre "$T" --config configs/smollm2-135m.yaml \
    --calibration-texts "$NEGATIVES"
done
for T in 10 100; do
  evaluate "zsre_smollm2_ftl_T$T" smollm2 "$DATA" zsre "$T" --config configs/smollm2-135m.yaml --method ft-l
done
# A sparser mask (k/d_ff = 0.1, step doubled): the lever against interference between edits.
for RUN in sparse:30 sparse60:60; do  # results name : max_steps
  MEMOIR_MAX_STEPS=${RUN#*:} evaluate "zsre_smollm2_memoir_${RUN%:*}_T100" smollm2 "$DATA" zsre 100 \
    --config configs/smollm2-135m-sparse.yaml --calibration-texts "$NEGATIVES"
done
# The standardized fingerprint at the same k: fewer hub columns shared by every mask.
evaluate zsre_smollm2_memoir_standardized_T100 smollm2 "$DATA" zsre 100 \
  --config configs/smollm2-135m-standardized.yaml --calibration-texts "$NEGATIVES"
# The protected write: each edit's steps avoid what earlier edits' tokens read.
evaluate zsre_smollm2_memoir_protect_T100 smollm2 "$DATA" zsre 100 \
  --config configs/smollm2-135m-protect.yaml --calibration-texts "$NEGATIVES"
# Five times as strong, without weight decay: each edit has less room, the earlier edits lose less.
evaluate zsre_smollm2_memoir_protect05_nodecay_T100 smollm2 "$DATA" zsre 100 \
  --config configs/smollm2-135m-protect-0.05.yaml --calibration-texts "$NEGATIVES"
