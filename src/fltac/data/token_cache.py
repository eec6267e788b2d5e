"""Tokenised texts cached on disk, so a second run over the same data skips tokenisation.

An entry is keyed by a SHA-256 over everything the token ids depend on: a format version, the tokenizer
(its class, truncation side, pad id and its full serialised definition: vocabulary, normaliser,
pre-tokeniser, special tokens), ``max_length`` and every text exactly as it is handed to the tokenizer.
Any change to one of them gives another key, so a stale entry is never read; nothing is ever invalidated
in place. Entries are ``.npz`` files read with ``allow_pickle=False`` and written atomically; an unreadable
entry is tokenised afresh and rewritten.
"""

from __future__ import annotations

import hashlib
import io as _io
import json
import zipfile
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from fltac import io

#: Bumped whenever :func:`fltac.data.batches.tokenize` changes what it returns for the same inputs.
FORMAT_VERSION = 1

Tokenised = tuple[np.ndarray, np.ndarray, "np.ndarray | None"]


def tokenizer_fingerprint(tokenizer) -> bytes:
    """Bytes that change whenever ``tokenizer`` would encode some text differently."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    definition = backend.to_str() if backend is not None else json.dumps(
        {"vocab": tokenizer.get_vocab(), "init": {k: repr(v) for k, v in sorted(tokenizer.init_kwargs.items())}},
        sort_keys=True)
    head = [type(tokenizer).__name__, getattr(tokenizer, "truncation_side", ""), str(tokenizer.pad_token_id)]
    return "\x1f".join(head).encode() + b"\x1e" + definition.encode()


def cache_key(tokenizer, texts: Sequence, max_length: int, salt: str = "") -> str:
    """SHA-256 (hex) of the format version, ``salt`` (the caller's own settings), the tokenizer, ``max_length``
    and ``texts`` (strings or pairs)."""
    h = hashlib.sha256(f"fltac-tokens-v{FORMAT_VERSION}\x1f{salt}\x1f{max_length}\x1e".encode())
    h.update(hashlib.sha256(tokenizer_fingerprint(tokenizer)).digest())
    for text in texts:
        parts = text if isinstance(text, (tuple, list)) else (text,)
        for part in parts:
            data = part.encode("utf-8", "surrogatepass")
            h.update(len(data).to_bytes(8, "little"))
            h.update(data)
        h.update(b"\x1d" if len(parts) > 1 else b"\x1c")
    return h.hexdigest()


def _read(path: Path) -> Tokenised | None:
    try:
        with np.load(path, allow_pickle=False) as entry:
            types = entry["types"] if "types" in entry.files else None
            return entry["ids"], entry["lengths"], types
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None


def _write(path: Path, ids: np.ndarray, lengths: np.ndarray, types: np.ndarray | None) -> None:
    buffer = _io.BytesIO()
    arrays = {"ids": ids, "lengths": lengths, **({"types": types} if types is not None else {})}
    np.savez(buffer, **arrays)
    io.atomic_write_bytes(path, buffer.getvalue())


def cached(tokenize: Callable[[object, list, int], Tokenised], tokenizer, texts: list, max_length: int,
           folder: Path | None, salt: str = "") -> Tokenised:
    """``tokenize(tokenizer, texts, max_length)``, read from ``folder`` when an entry for the same inputs is
    there, else computed and stored. ``folder`` None: no cache. A folder that cannot be written only costs
    the cache (the result is returned all the same)."""
    if folder is None or not texts:
        return tokenize(tokenizer, texts, max_length)
    path = Path(folder) / f"{cache_key(tokenizer, texts, max_length, salt)}.npz"
    hit = _read(path) if path.is_file() else None
    if hit is not None:
        return hit
    ids, lengths, types = tokenize(tokenizer, texts, max_length)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _write(path, ids, lengths, types)
    except OSError:
        pass
    return ids, lengths, types
