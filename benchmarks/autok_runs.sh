#!/bin/bash
# The measurement runs of docs/fltac.md, "Unknown number of tasks": FL-TAC with server.n_clusters auto and
# with K given (the number of tasks), on text5 (5 tasks), its first three tasks, text7 (7 tasks) and text5
# with bbc joining in round 2; one run at a time, torch's default threads (as `fltac compare`); a finished
# run is not rerun, an interrupted one resumes. Results in results/autok/ (AUTOK_ROOT= another folder), then:
#   PYTHONPATH=src python benchmarks/autok_table.py --runs results/autok
#   bash benchmarks/autok_runs.sh [SEEDS...]      (default: 42 43 44; PYTHON= the interpreter, default .venv/bin/python)
set -u
cd "$(dirname "$0")/.."
root=${AUTOK_ROOT:-results/autok}
mkdir -p $root
one() {  # <set> <auto|given> <seed>
  local name=$1 mode=$2 seed=$3 args
  case $name in
    text5) args=(--config configs/text5.yaml);;
    text3) args=(--config configs/text5.yaml --override "data.tasks=[newsgroups,reuters,election]");;
    text7) args=(--config configs/text7.yaml);;
    late5) args=(--config configs/text5.yaml --override "data.task_start_round={bbc: 2}");;
  esac
  [ "$mode" = auto ] && args+=(--override server.n_clusters=auto)
  local out=$root/${name}_${mode}_s${seed}
  [ -f "$out/summary.json" ] && return  # finished: not rerun
  [ -d "$out" ] && args+=(--resume)     # interrupted: resumed
  echo "$(date +%T) start $out load $(cut -d' ' -f1-3 /proc/loadavg)" >> $root/progress.log
  PYTHONPATH=$PWD/src "${PYTHON:-.venv/bin/python}" -m fltac run "${args[@]}" --seed "$seed" \
    --output_dir "$out" --quiet >> "$out.log" 2>&1
  echo "$(date +%T) done $out rc $? load $(cut -d' ' -f1-3 /proc/loadavg)" >> $root/progress.log
}
export -f one
export root
seeds=("$@")
[ ${#seeds[@]} -eq 0 ] && seeds=(42 43 44)
for seed in "${seeds[@]}"; do
  for name in text5 text3 text7; do for mode in auto given; do echo "$name $mode $seed"; done; done
  for mode in auto given; do echo "late5 $mode $seed"; done
done | xargs -L 1 bash -c 'one "$@"' _
