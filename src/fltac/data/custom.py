"""The ``custom`` scenario: tasks defined in the config alone (``data.custom_tasks``), read from files or a hub.

Each :class:`~fltac.config.TaskSpec` names a source and its columns; adding a task is adding a YAML
entry. Everything a config can get wrong about its data is found here, before any model is loaded,
and raised as one :class:`~fltac.config.ConfigError` that starts with the task's name::

    task 'reviews': column 'stars' (label_column) not found in data/reviews.csv; columns there: text, rating

What is read, and how:

- **Sources.** ``.csv`` / ``.tsv`` (also ``.tab``; gzip/bz2/xz/zip compressed too), ``.jsonl`` (also
  ``.ndjson``, and ``.json`` holding lines or one array), ``.parquet``; a folder is every file of one
  such format inside it, in name order; ``format: hub`` goes through ``datasets.load_dataset(source,
  hub_config, split=hub_split)``, which also reads a local dataset folder.
- **Rows.** Every value is read as text. A row whose label (or prompt/response) is empty, or whose
  text columns are all empty, is dropped. ``text_columns`` are joined with a newline.
- **Labels.** The sorted distinct training values; a test label never seen in training is an error.
- **Test split.** ``test_source`` / ``hub_test_split``, or a seeded held-out ``test_fraction``
  (``data.test_fraction`` when the task gives none), stratified by label when every class has at
  least two rows, plain random otherwise.
- **Caps.** ``max_examples`` keeps a seeded sample of the training rows (after the test split).
- **Owners.** ``client_column`` values of the training rows go to :attr:`Task.train_owners`; the
  partition then follows them (:func:`fltac.data.partition.owner_clients`).

Generation tasks (``kind: generation``) are read and checked the same way, then refused with a
message saying their training is not implemented yet.
"""

from __future__ import annotations

import os
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
from sklearn.model_selection import train_test_split

from fltac.config import ConfigError, TaskSpec
from fltac.data.tasks import Task, label_to_ids

#: File extension -> format (compression suffixes are stripped first).
EXTENSIONS = {".csv": "csv", ".tsv": "tsv", ".tab": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl",
              ".parquet": "parquet", ".pq": "parquet"}
COMPRESSION = (".gz", ".bz2", ".xz", ".zip")
TEXT_JOIN = "\n"


class TaskDataError(ConfigError):
    """A custom task whose data does not fit its spec; the message starts with the task's name."""

    def __init__(self, task: str, message: str):
        super().__init__(f"task '{task}': {message}")


def custom_loaders(specs: list[TaskSpec]) -> dict[str, Callable[[float, int], Task]]:
    """``{task name: loader(test_fraction, split_seed)}`` in config order, as :data:`fltac.data.SCENARIOS` holds."""
    return {spec.name: partial(load_custom_task, spec) for spec in specs}


# ---- reading -------------------------------------------------------------------------------------

def file_format(path: Path) -> str | None:
    suffixes = [s.lower() for s in path.suffixes]
    while suffixes and suffixes[-1] in COMPRESSION:
        suffixes.pop()
    return EXTENSIONS.get(suffixes[-1]) if suffixes else None


def _files_of(spec: TaskSpec, path: Path, role: str) -> tuple[list[Path], str]:
    """The files behind a local source (one file, or a folder's files of one format) and their format."""
    if not path.exists():
        raise TaskDataError(spec.name, f"{role} '{path}' does not exist (relative paths are read from {os.getcwd()})")
    if path.is_file():
        fmt = spec.format or file_format(path)
        if fmt is None:
            raise TaskDataError(spec.name, f"cannot tell the format of '{path}' from its extension; set format: "
                                           f"csv, tsv, jsonl or parquet")
        return [path], fmt
    found = {}
    for f in sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")):
        fmt = file_format(f)
        if fmt is not None and (spec.format is None or fmt == spec.format):
            found.setdefault(fmt, []).append(f)
    if not found:
        want = spec.format or "csv, tsv, jsonl or parquet"
        raise TaskDataError(spec.name, f"folder '{path}' ({role}) holds no {want} files")
    if len(found) > 1:
        raise TaskDataError(spec.name, f"folder '{path}' ({role}) mixes formats {sorted(found)}; set format: to "
                                       f"choose one")
    (fmt, files), = found.items()
    return files, fmt


def _read_file(spec: TaskSpec, path: Path, fmt: str) -> pd.DataFrame:
    try:
        if fmt in ("csv", "tsv"):
            return pd.read_csv(path, sep="," if fmt == "csv" else "\t", dtype=str, keep_default_na=False)
        if fmt == "jsonl":
            try:
                return pd.read_json(path, lines=True, dtype=False)
            except ValueError:
                return pd.read_json(path, dtype=False)  # a .json file holding one array
        return pd.read_parquet(path)
    except Exception as exc:  # pandas raises many types for malformed files; report which file and why
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TaskDataError(spec.name, f"cannot read '{path}' as {fmt}: {first}") from None


def _read_hub(spec: TaskSpec, split: str) -> pd.DataFrame:
    try:
        import datasets
    except ImportError:
        raise TaskDataError(spec.name, "format: hub needs the 'datasets' package: pip install datasets") from None
    datasets.utils.logging.disable_progress_bar()
    datasets.utils.logging.set_verbosity_error()
    try:
        ds = datasets.load_dataset(spec.source, spec.hub_config, split=split)
    except Exception as exc:  # datasets raises many types (not found, no network, unknown split or config)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        hint = "" if Path(spec.source).exists() else " (no hub access here? point source at a local dataset folder)"
        raise TaskDataError(spec.name, f"cannot load hub dataset '{spec.source}' (config {spec.hub_config!r}, "
                                       f"split '{split}'): {first}{hint}") from None
    return ds.to_pandas()


def read_source(spec: TaskSpec, source: str, role: str = "source") -> tuple[pd.DataFrame, str]:
    """All rows of a local source (or, for ``format: hub``, of the split named by ``source``) and where from."""
    if spec.format == "hub":
        return _read_hub(spec, source), f"hub dataset '{spec.source}' split '{source}'"
    files, fmt = _files_of(spec, Path(source), role)
    frames = [_read_file(spec, f, fmt) for f in files]
    columns = list(frames[0].columns)
    for f, frame in zip(files[1:], frames[1:]):
        if list(frame.columns) != columns:
            raise TaskDataError(spec.name, f"'{f}' has columns {list(frame.columns)}, but '{files[0]}' has {columns}")
    where = f"'{source}'" if len(files) == 1 else f"'{source}' ({len(files)} files)"
    return pd.concat(frames, ignore_index=True), where


def _as_text(value) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return ""
    return str(value)


def _column(spec: TaskSpec, frame: pd.DataFrame, name: str, role: str, where: str) -> list[str]:
    if name not in frame.columns:
        raise TaskDataError(spec.name, f"column '{name}' ({role}) not found in {where}; columns there: "
                                       f"{', '.join(map(str, frame.columns)) or '(none)'}")
    return [_as_text(v).strip() for v in frame[name].tolist()]


def extract_rows(spec: TaskSpec, frame: pd.DataFrame, where: str, with_owner: bool) -> dict[str, list[str]]:
    """The task's columns as text (``x``, ``y``, optionally ``owner``), rows with an empty field dropped."""
    if spec.kind == "classification":
        parts = [_column(spec, frame, c, "text_columns", where) for c in spec.text_columns]
        x = [TEXT_JOIN.join(p for p in row if p) for row in zip(*parts)]
        y = _column(spec, frame, spec.label_column, "label_column", where)
    else:
        x = _column(spec, frame, spec.prompt_column, "prompt_column", where)
        y = _column(spec, frame, spec.response_column, "response_column", where)
    owner = _column(spec, frame, spec.client_column, "client_column", where) if with_owner else None
    keep = [i for i in range(len(x)) if x[i] and y[i]]
    rows = {"x": [x[i] for i in keep], "y": [y[i] for i in keep]}
    if owner is not None:
        empty = sum(1 for i in keep if not owner[i])
        if empty:
            raise TaskDataError(spec.name, f"client column '{spec.client_column}' is empty in {empty} row(s) of "
                                           f"{where}; every training row needs an owner")
        rows["owner"] = [owner[i] for i in keep]
    return rows


# ---- one task ------------------------------------------------------------------------------------

def _take(rows: dict[str, list[str]], idx) -> dict[str, list[str]]:
    return {k: [v[i] for i in idx] for k, v in rows.items()}


def _hold_out(spec: TaskSpec, rows: dict[str, list[str]], fraction: float, seed: int, where: str):
    n = len(rows["x"])
    if n < 2:
        raise TaskDataError(spec.name, f"the test split is empty: {where} has {n} usable row(s), too few to hold "
                                       f"out test_fraction {fraction}; give test_source or more rows")
    idx = np.arange(n)
    values, counts = np.unique(rows["y"], return_counts=True)
    n_test = int(np.ceil(fraction * n))
    stratifiable = counts.min() >= 2 and len(values) <= n_test <= n - len(values)  # sklearn's conditions
    stratify = rows["y"] if spec.kind == "classification" and stratifiable else None
    tr, te = train_test_split(idx, test_size=fraction, random_state=seed, stratify=stratify)
    return _take(rows, np.sort(tr)), _take(rows, np.sort(te))


def load_custom_task(spec: TaskSpec, test_fraction: float, split_seed: int) -> Task:
    """Read, check and split one custom task; every problem is a :class:`TaskDataError` naming the task."""
    owned = spec.client_column is not None
    frame, where = read_source(spec, spec.hub_split if spec.format == "hub" else spec.source)
    train = extract_rows(spec, frame, where, with_owner=owned)
    if not train["x"]:
        raise TaskDataError(spec.name, f"{where} has no usable rows ({len(frame)} read; rows with an empty text, "
                                       f"label, prompt or response are dropped)")
    test_from = spec.hub_test_split if spec.format == "hub" else spec.test_source
    if test_from is not None:
        test_frame, test_where = read_source(spec, test_from, role="test_source")
        test = extract_rows(spec, test_frame, test_where, with_owner=False)
        if not test["x"]:
            raise TaskDataError(spec.name, f"the test split is empty: {test_where} has no usable rows "
                                           f"({len(test_frame)} read)")
    else:
        fraction = spec.test_fraction if spec.test_fraction is not None else test_fraction
        train, test = _hold_out(spec, train, fraction, split_seed, where)
    if spec.max_examples is not None and len(train["x"]) > spec.max_examples:
        keep = np.sort(np.random.default_rng(split_seed).choice(len(train["x"]), spec.max_examples, replace=False))
        train = _take(train, keep)

    if spec.kind == "generation":
        raise TaskDataError(spec.name, f"kind: generation is read and checked ({len(train['x'])} train, "
                                       f"{len(test['x'])} test rows from {where}), but training generation tasks "
                                       f"is not implemented yet: only kind: classification tasks can run")
    labels, train_y = label_to_ids(train["y"])
    if len(labels) < 2:
        raise TaskDataError(spec.name, f"label column '{spec.label_column}' has a single class ({labels[0]!r}) in "
                                       f"the training rows of {where}; a classifier needs two or more")
    index = {name: i for i, name in enumerate(labels)}
    unseen = sorted(set(test["y"]) - set(index))
    if unseen:
        raise TaskDataError(spec.name, f"test label(s) {unseen[:5]}{'...' if len(unseen) > 5 else ''} of column "
                                       f"'{spec.label_column}' never occur in the training rows (classes: "
                                       f"{labels[:10]}{'...' if len(labels) > 10 else ''})")
    test_y = np.array([index[v] for v in test["y"]], dtype=np.int64)
    return Task(spec.name, labels, train["x"], train_y, test["x"], test_y, train.get("owner"))
