#!/bin/bash
# The text5 runs of docs/algorithms.md: FL-TAC and FedIT over seeds 42, 43, 44, once per algorithm, each row
# changing one option of configs/text5.yaml (same rows, rounds and local steps in every row); then the table:
#   PYTHONPATH=src python benchmarks/algorithms_table.py FedAvg=results/text5_compare_bits Krum=results/alg/krum ...
#   bash benchmarks/algorithms_runs.sh [NAME ...]     (default: every row; PYTHON= the interpreter)
# The FedAvg row is the headline comparison (README): fltac compare ... --out results/text5_compare_bits.
# The DP rows go to results/dp/ (benchmarks/privacy_figure.py reads them there). A finished run is not rerun, an
# interrupted one resumes (fltac compare).
set -u
cd "$(dirname "$0")/.."
declare -A option=(
  [krum]="reliability.aggregation=krum" [multi_krum]="reliability.aggregation=multi_krum"
  [geometric_median]="reliability.aggregation=geometric_median" [median]="reliability.aggregation=median"
  [trimmed_mean]="reliability.aggregation=trimmed_mean" [fedavgm]="server.optimizer=fedavgm"
  [fedadam]="server.optimizer=fedadam" [fedyogi]="server.optimizer=fedyogi" [fedadagrad]="server.optimizer=fedadagrad"
  [prox]="train.prox_mu=0.01" [ffa]="lora.freeze_A=true"
  [dp_eps1]="privacy.mode=local privacy.target_epsilon=1" [dp_eps4]="privacy.mode=local privacy.target_epsilon=4"
  [dp_eps8]="privacy.mode=local privacy.target_epsilon=8")
declare -A out=([dp_eps1]=results/dp/local_eps1 [dp_eps4]=results/dp/local_eps4 [dp_eps8]=results/dp/local_eps8)
names=("$@")
[ ${#names[@]} -eq 0 ] && names=(krum multi_krum geometric_median median trimmed_mean fedavgm fedadam fedyogi fedadagrad
                                 prox ffa dp_eps1 dp_eps4 dp_eps8)
for name in "${names[@]}"; do
  [ -z "${option[$name]:-}" ] && { echo "unknown row '$name' (rows: ${!option[*]})" >&2; exit 2; }
  args=()
  for kv in ${option[$name]}; do args+=(--override "$kv"); done
  PYTHONPATH=$PWD/src "${PYTHON:-.venv/bin/python}" -m fltac compare --config configs/text5.yaml --methods fltac fedit \
    --seeds 42 43 44 "${args[@]}" --out "${out[$name]:-results/alg/$name}" --quiet
done
