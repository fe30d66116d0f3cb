# Sourced by the run_*.sh scripts: `evaluate NAME MODEL DATA... FORMAT T [memoir-hf eval options...]`
# runs one evaluation into $RESULTS/NAME.json (its τ sweep beside it), checkpointing its memory every
# 50 edits under benchmarks/checkpoints/NAME so that a rerun resumes. A run whose JSON exists is
# skipped: delete the JSON to rerun it.
evaluate() {
  local name=$1 model=$2
  shift 2
  if [[ -f "$RESULTS/$name.json" ]]; then
    echo "$name: $RESULTS/$name.json exists, skipped (delete it to rerun)"
    return
  fi
  local data=()
  while [[ "$1" == *.json ]]; do data+=("$1"); shift; done
  local format=$1 edits=$2
  shift 2
  local plot=(--plot "$RESULTS/${name}_sweep.png")
  if [[ " $* " == *" ft-l "* ]]; then plot=(); fi  # FT-L has no routing, so no τ sweep
  memoir-hf eval --model "$model" --data "${data[@]}" --format "$format" --edits "$edits" --threads 2 \
    --checkpoint-dir "benchmarks/checkpoints/$name" --checkpoint-every 50 \
    --out "$RESULTS/$name.json" ${plot[@]+"${plot[@]}"} "$@"
}
