"""The process-wide random states (Python, NumPy, torch) as JSON and tensors, for checkpoints.

fltac derives every draw from (seed, round, client, key), so no result depends on these global
states; checkpoints still carry them, so a resumed process starts its next round in the very state
the uninterrupted one had. Python's and NumPy's states are lists of integers (JSON); torch's are
uint8 tensors (safetensors). Never pickle.
"""

from __future__ import annotations

import random

import numpy as np
import torch

TORCH_KEY = "rng/torch"
CUDA_KEY = "rng/cuda{}"


def capture() -> tuple[dict, dict[str, torch.Tensor]]:
    """(JSON-able Python and NumPy states, ``{name: uint8 tensor}`` torch states) of this process."""
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state(legacy=False)
    meta = {
        "python": {"version": version, "state": list(internal), "gauss_next": gauss},
        "numpy": {"bit_generator": np_state["bit_generator"],
                  "key": [int(x) for x in np_state["state"]["key"]], "pos": int(np_state["state"]["pos"]),
                  "has_gauss": int(np_state["has_gauss"]), "gauss": float(np_state["gauss"])},
    }
    tensors = {TORCH_KEY: torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors.update({CUDA_KEY.format(i): s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return meta, tensors


def restore(meta: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Set this process's random states to those :func:`capture` returned (absent parts are left alone)."""
    if "python" in meta:
        p = meta["python"]
        random.setstate((p["version"], tuple(p["state"]), p["gauss_next"]))
    if "numpy" in meta:
        n = meta["numpy"]
        np.random.set_state({"bit_generator": n["bit_generator"],
                             "state": {"key": np.array(n["key"], dtype=np.uint32), "pos": n["pos"]},
                             "has_gauss": n["has_gauss"], "gauss": n["gauss"]})
    if TORCH_KEY in tensors:
        torch.set_rng_state(tensors[TORCH_KEY])
    if torch.cuda.is_available():
        states = [tensors[CUDA_KEY.format(i)] for i in range(torch.cuda.device_count())
                  if CUDA_KEY.format(i) in tensors]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)
