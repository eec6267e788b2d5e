#!/bin/bash
# The five runs of docs/hafl.md on configs/hafl_20news.yaml, in parallel, one torch thread each.
#   scripts/hafl_runs.sh 42     # -> results/hafl/seed42/<run>/ (docs/hafl.md: seeds 42 and 7)
set -u
cd "$(dirname "$0")/.."
S=${1:-42}
C=configs/hafl_20news.yaml
OUT=results/hafl/seed$S
mkdir -p "$OUT"
run() { name=$1; shift; .venv/bin/fltac run --config $C --output_dir "$OUT/$name" --overwrite --seed "$S" \
          --override num_threads=1 "$@" > "$OUT/$name.log" 2>&1; }
run hetlora --method hetlora &
run hafl_truncate_zero_pad --method hafl --hafl_mode truncate --hafl_aggregation zero_pad &
run hafl_truncate_adaptive --method hafl --hafl_mode truncate --hafl_aggregation adaptive &
run hafl_freeze_zero_pad --method hafl --hafl_mode freeze --hafl_aggregation zero_pad &
run hafl_freeze_adaptive --method hafl --hafl_mode freeze --hafl_aggregation adaptive &
wait
