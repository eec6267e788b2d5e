"""Files a run writes: safetensors for tensors, JSON for everything else, never pickle.

Every write is atomic (temporary file in the same folder, fsync, rename), so a process killed at any
instant leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save


class RunFileError(ValueError):
    """A file fltac reads back (a run's JSON and jsonl files, an export's labels.json) that is missing,
    truncated or malformed, with the file and the reason in the message."""


class AdapterFileError(RunFileError):
    """An adapter or checkpoint file that cannot be used, with the file and the reason in the message."""


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def folder_problem(folder: str | Path) -> str | None:
    """Why files cannot be written into ``folder`` (made if missing), or None; checked before anything is
    written: a probe file is created and removed in the nearest existing folder (the only sure test)."""
    folder = Path(folder)
    try:
        if folder.exists() and not folder.is_dir():
            return f"{folder} is a file, not a folder"
        parent = folder
        while not parent.exists():
            parent = parent.parent
        if not parent.is_dir():
            return f"{folder} lies under {parent}, which is a file, not a folder"
        fd, probe = tempfile.mkstemp(dir=parent, prefix=".fltac-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        return f"{folder} is not writable ({exc.filename or folder}: {exc.strerror})"
    return None


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(path: str | Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def read_json(path: str | Path, keys: Iterable[str] | None = None) -> Any:
    """The JSON value in ``path``; with ``keys`` (``()`` for none), it must be an object holding each of them.

    A missing, unreadable, truncated or malformed file is a one-line :class:`RunFileError` naming it.
    """
    path = Path(path)
    if not path.is_file():
        raise RunFileError(f"{path}: no such file")
    try:
        value = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RunFileError(f"{path}: not valid JSON ({exc})") from None
    if keys is None:
        return value
    if not isinstance(value, dict):
        raise RunFileError(f"{path}: must hold a JSON object, not {type(value).__name__}")
    missing = [k for k in keys if k not in value]
    if missing:
        raise RunFileError(f"{path}: lacks key(s) {missing}")
    return value


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor]) -> None:
    """Write ``tensors`` (contiguous CPU copies) as one safetensors file, atomically.

    No ``__metadata__``: safetensors 0.8 writes its entries in arbitrary order, and the same tensors
    must give the same bytes (the resume contract compares files byte for byte).
    """
    flat = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    atomic_write_bytes(path, st_save(flat))


def load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a safetensors file; a missing, truncated or malformed file is a one-line AdapterFileError."""
    path = Path(path)
    if not path.is_file():
        raise AdapterFileError(f"{path}: no such file")
    try:
        return st_load(path.read_bytes())
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise AdapterFileError(f"{path}: not a valid safetensors file ({exc})") from None


def append_jsonl(path: str | Path, records: Iterable[dict]) -> None:
    """Append records, one JSON object per line, atomically: the file is rewritten whole (its lines,
    then the new ones) through :func:`atomic_write_bytes`, so a kill leaves the old file or the new
    one, never a torn last line. Files here are a run's logs (a few MB at most), so the copy is cheap."""
    lines = "".join(json.dumps(r, sort_keys=True) + "\n" for r in records)
    if not lines:
        return
    path = Path(path)
    old = path.read_bytes() if path.exists() else b""
    if old and not old.endswith(b"\n"):
        old += b"\n"
    atomic_write_bytes(path, old + lines.encode())


def read_jsonl(path: str | Path) -> list[dict]:
    """The records of a jsonl file ([] if there is none); a line that is not a JSON object (e.g. torn by a
    copy) is a one-line :class:`RunFileError` naming the file and the line."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    for i, line in enumerate(path.read_bytes().decode(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise RunFileError(f"{path}: line {i} is not valid JSON ({exc})") from None
        if not isinstance(rec, dict):
            raise RunFileError(f"{path}: line {i} is not a JSON object")
        records.append(rec)
    return records


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def sha256_lines(path: str | Path, keep: int) -> str:
    """Hex SHA-256 of the first ``keep`` non-empty lines of a jsonl file, as :func:`truncate_jsonl` keeps them."""
    path = Path(path)
    text = path.read_bytes().decode(errors="replace") if path.exists() else ""
    lines = [line for line in text.splitlines() if line.strip()][:keep]
    return hashlib.sha256("".join(line + "\n" for line in lines).encode()).hexdigest()


def check_recorded_files(folder: Path, digests: dict[str, str], line_counts: dict[str, int], recorder: Path) -> None:
    """Each ``folder/<rel>`` of ``digests`` must have the recorded SHA-256 (:func:`sha256_file`; for a jsonl
    log in ``line_counts``, :func:`sha256_lines` of its first lines); else a one-line RunFileError naming the
    file, the file that recorded it (``recorder``) and what to do."""
    for rel, digest in sorted(digests.items()):
        path = folder / rel
        if not path.is_file() and line_counts.get(rel) != 0:  # a log recorded with no lines may never be written
            problem = "is missing"
        elif (sha256_lines(path, line_counts[rel]) if rel in line_counts else sha256_file(path)) != digest:
            problem = "is damaged (its SHA-256 differs from the one recorded"
            problem += f" for its first {line_counts[rel]} lines)" if rel in line_counts else ")"
        else:
            continue
        raise RunFileError(f"{path} {problem}: {recorder} relies on it. Restore the file from a copy, or start "
                           f"the run again with --overwrite")


def truncate_jsonl(path: str | Path, keep: int) -> None:
    """Keep the first ``keep`` records of a jsonl file (used when resuming), atomically."""
    path = Path(path)
    if not path.exists():
        return
    lines = [line for line in path.read_text().splitlines() if line.strip()][:keep]
    atomic_write_bytes(path, "".join(line + "\n" for line in lines).encode())
