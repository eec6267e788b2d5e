"""Image-classification backbones: the offline ViT pretrained on Fashion-MNIST, and hub or local ViTs.

No pretrained vision backbone ships in any installed package, so the offline scenario uses a small ViT that
fltac pretrains once (``fltac pretrain-vit``, a few minutes on a 2-core CPU) on Fashion-MNIST and saves with
``save_pretrained`` (safetensors, never pickle) plus its image-processor config (size, mean, std) under
``<cache>/vit-fashion-mnist``. ``model_name: vit-fashion-mnist`` names it; a run that finds it missing
pretrains it first, printing what it does (same function, same seed, so the same weights).

LoRA targets: in transformers 5.x the ViT attention projections are ``q_proj`` / ``k_proj`` / ``v_proj``
(``vit.layers.<i>.attention.q_proj``), not 4.x's ``attention.attention.query`` / ``value``. The head is
``classifier``, which peft's ``SEQ_CLS`` task type trains through ``modules_to_save``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from fltac.data.hub import require_hub
from fltac.data.vision import (FASHION_MNIST_CLASSES, OFFLINE_CONFIG, ImageSpec, cache_root, fashion_mnist,
                               resize_uint8, to_channels)
from fltac.models.backbone import ModelLoadError, with_dropout

#: ``model_name`` of the offline backbone, and the folder it is cached in under the cache root.
OFFLINE_VIT = "vit-fashion-mnist"
#: The offline ViT's shape: 28x28 grey input, 7x7 patches (16 tokens + [CLS]), 4 layers of width 96.
OFFLINE_VIT_SHAPE = {"image_size": 28, "patch_size": 7, "num_channels": 1, "hidden_size": 96,
                     "num_hidden_layers": 4, "num_attention_heads": 4, "intermediate_size": 192}


def say(message: str) -> None:
    print(message, flush=True)


def offline_vit_dir(cache_dir: str | None) -> Path:
    return cache_root(cache_dir) / OFFLINE_VIT


def resolve_image_model(model_name: str, cache_dir: str | None) -> str:
    """The folder or hub id ``model_name`` stands for (``vit-fashion-mnist``: the cached offline ViT)."""
    return str(offline_vit_dir(cache_dir)) if model_name == OFFLINE_VIT else model_name


def image_spec(path: str, config) -> ImageSpec:
    """Input size, channels and patch size from the model config; mean and std from its image-processor config."""
    from transformers import AutoImageProcessor

    try:
        processor = AutoImageProcessor.from_pretrained(path, use_fast=False)
    except OSError as exc:
        raise ModelLoadError(f"model '{path}' has no image-processor config (preprocessor_config.json, which "
                             f"gives the input mean and std): {str(exc).splitlines()[0]}") from None
    channels = int(config.num_channels)
    mean, std = list(processor.image_mean), list(processor.image_std)
    if len(mean) == 1 and channels > 1:
        mean, std = mean * channels, std * channels
    if len(mean) != channels or len(std) != channels:
        raise ModelLoadError(f"model '{path}': image_mean/image_std have {len(mean)}/{len(std)} values for "
                             f"{channels} input channels")
    return ImageSpec(int(config.image_size), channels, int(config.patch_size), tuple(mean), tuple(std))


def load_image_backbone(model_name: str, cache_dir: str | None, n_outputs: int, dtype: torch.dtype,
                        attn_implementation: str, seed: int, dropout: float | None = None, scenario: str = "cifar"):
    """(image-classification model with a fresh ``n_outputs``-unit head seeded by ``seed``, its ImageSpec).

    ``vit-fashion-mnist`` is pretrained first if it is not cached yet. A hub id checks the hub at once
    (:func:`fltac.data.hub.require_hub`), naming the offline config when it is out of reach.
    """
    from transformers import AutoConfig, AutoModelForImageClassification
    from transformers.utils import logging as hf_logging

    path = resolve_image_model(model_name, cache_dir)
    if model_name == OFFLINE_VIT and not (Path(path) / "config.json").exists():
        say(f"offline ViT not found in {path}: pretraining it once on Fashion-MNIST "
            f"(the same as `fltac pretrain-vit`; a few minutes on 2 CPU cores)")
        pretrain_offline_vit(Path(path))
    require_hub(scenario, [path], OFFLINE_CONFIG)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.manual_seed(seed)
    try:
        config = with_dropout(AutoConfig.from_pretrained(path, num_labels=n_outputs), dropout)
        model, info = AutoModelForImageClassification.from_pretrained(
            path, config=config, dtype=dtype, attn_implementation=attn_implementation, ignore_mismatched_sizes=True,
            output_loading_info=True)
    except OSError as exc:
        raise ModelLoadError(f"cannot load image model '{model_name}' ({path}): {str(exc).splitlines()[0]}") from None
    check_backbone_loaded(model_name, model, info)
    return model, image_spec(path, model.config)


def check_backbone_loaded(model_name: str, model, info: dict) -> None:
    """Raise unless every backbone weight came from the checkpoint (only the head may be new) and the head
    has the run's width: LoRA on a silently re-initialised backbone would train, and mean nothing."""
    fresh = sorted(k for k in info.get("missing_keys", []) if not k.startswith("classifier."))
    if fresh:
        raise ModelLoadError(f"model '{model_name}': {len(fresh)} backbone weight(s) not in the checkpoint "
                             f"(e.g. {fresh[:3]}); its layer names do not match this transformers version")
    if model.classifier.out_features != model.config.num_labels:
        raise ModelLoadError(f"model '{model_name}': head has {model.classifier.out_features} units, "
                             f"expected {model.config.num_labels}")


# --- pretraining the offline ViT ---------------------------------------------------------------------------


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up to ``peak`` over ``warmup`` steps, then cosine decay to 0 at ``total``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _normalised(images: np.ndarray, spec: ImageSpec) -> torch.Tensor:
    x = torch.from_numpy(resize_uint8(to_channels(images, spec.channels), spec.size)).float().div_(255.0)
    return (x - spec.mean[0]) / spec.std[0]


@torch.inference_mode()
def accuracy(model, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000) -> float:
    model.eval()
    hits = sum(int((model(pixel_values=x[i: i + batch_size]).logits.argmax(-1) == y[i: i + batch_size]).sum())
               for i in range(0, len(y), batch_size))
    return hits / len(y)


def pretrain_offline_vit(out: Path, epochs: int = 3, batch_size: int = 128, lr: float = 2e-3,
                         weight_decay: float = 0.05, seed: int = 0, threads: int | None = 1, log=say) -> dict:
    """Train the offline ViT (:data:`OFFLINE_VIT_SHAPE`) on Fashion-MNIST's 60k training images, score it on
    the 10k test images, and save it in ``out`` (model + image-processor config + ``pretraining.json``).

    AdamW, linear warm-up over the first 5% of steps then cosine decay, no augmentation; pixels normalised
    by the training set's mean and std. ``threads``: torch CPU threads (None = torch's default). One by
    default: this ViT's matrices gain little from a second thread, and on a shared CPU a multi-threaded
    kernel stalls whenever one of its threads is descheduled (measured here, 2 cores shared with other
    jobs: 39 ms per LoRA step on one thread, 552 ms on two); the caller's setting is restored after.
    Returns the record written to ``pretraining.json``.
    """
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _pretrain(out, epochs, batch_size, lr, weight_decay, seed, log)
    finally:
        torch.set_num_threads(previous)


def _pretrain(out: Path, epochs: int, batch_size: int, lr: float, weight_decay: float, seed: int, log) -> dict:
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessorPil
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    start = time.perf_counter()
    train_x, train_y = fashion_mnist("train")
    test_x, test_y = fashion_mnist("test")
    mean, std = float(train_x.mean() / 255.0), float(train_x.std() / 255.0)
    spec = ImageSpec(OFFLINE_VIT_SHAPE["image_size"], 1, OFFLINE_VIT_SHAPE["patch_size"], (mean,), (std,))
    x, y = _normalised(train_x, spec), torch.from_numpy(train_y)
    xt, yt = _normalised(test_x, spec), torch.from_numpy(test_y)

    torch.manual_seed(seed)
    config = ViTConfig(**OFFLINE_VIT_SHAPE, num_labels=10, hidden_dropout_prob=0.0,
                       attention_probs_dropout_prob=0.0, id2label=dict(enumerate(FASHION_MNIST_CLASSES)),
                       label2id={n: i for i, n in enumerate(FASHION_MNIST_CLASSES)})
    model = ViTForImageClassification(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    rng = np.random.default_rng(seed)
    per_epoch = len(y) // batch_size
    total, warmup = epochs * per_epoch, max(1, (epochs * per_epoch) // 20)
    step = 0
    for epoch in range(epochs):
        model.train()
        order = torch.from_numpy(rng.permutation(len(y)))
        for i in range(per_epoch):
            rows = order[i * batch_size: (i + 1) * batch_size]
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, total, lr, warmup)
            loss = torch.nn.functional.cross_entropy(model(pixel_values=x[rows]).logits, y[rows])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
        log(f"pretrain-vit: epoch {epoch + 1}/{epochs}, last loss {loss.item():.3f}, "
            f"{time.perf_counter() - start:.0f} s")
    test_acc = accuracy(model, xt, yt)
    record = {"dataset": "Fashion-MNIST (Debian dataset-fashion-mnist)", "test_accuracy": round(test_acc, 4),
              "epochs": epochs, "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay, "seed": seed,
              "shape": OFFLINE_VIT_SHAPE, "mean": mean, "std": std, "torch_threads": torch.get_num_threads(),
              "seconds": round(time.perf_counter() - start, 1)}
    save_atomically(out, model, ViTImageProcessorPil(do_resize=True, size={"height": spec.size, "width": spec.size},
                                                  image_mean=[mean], image_std=[std]), record)
    log(f"pretrain-vit: Fashion-MNIST test accuracy {test_acc:.4f}; saved to {out} ({record['seconds']} s)")
    return record


def save_atomically(out: Path, model, processor, record: dict) -> None:
    """Write into a temporary sibling folder, then rename it to ``out``: a run never sees half a model."""
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)  # safetensors
    processor.save_pretrained(tmp)
    (tmp / "pretraining.json").write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    if out.exists():
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, out)
