"""Tokenised rows, tokenised once per run, and the batches built from them.

Every training row of every task lives in one :class:`TokenStore` (token ids padded to ``max_length``,
true lengths, its label's index in the shared output layer and its task's output slice), so a client's
data is just a list of row numbers, whatever mix of tasks it holds. A batch is cut to its longest row
(dynamic padding): short texts such as tweets do not pay for the long ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from fltac.data import token_cache
from fltac.data.tasks import LabelSpace, Task

#: Characters kept before tokenising: a token is never shorter than one character and words rarely
#: exceed 16 characters per token, so cutting at 16 x max_length characters keeps every token that
#: truncation would keep while sparing the tokenizer the tails of long documents.
CHARS_PER_TOKEN_BOUND = 16


@dataclass
class Batch:
    input_ids: torch.Tensor       # [B, T] int64
    attention_mask: torch.Tensor  # [B, T] int64
    labels: torch.Tensor          # [B] index in the shared output layer
    allowed: torch.Tensor         # [B, n_outputs] bool: the output units of each row's task
    token_type_ids: torch.Tensor | None = None  # [B, T] int64: segment of each token (text pairs), or None

    @property
    def n_tokens(self) -> int:
        return int(self.attention_mask.sum())

    def model_inputs(self) -> dict[str, torch.Tensor]:
        """The backbone's keyword arguments for this batch (every store's batch type has this method)."""
        inputs = {"input_ids": self.input_ids, "attention_mask": self.attention_mask}
        if self.token_type_ids is not None:
            inputs["token_type_ids"] = self.token_type_ids
        return inputs


@dataclass
class TokenStore:
    ids: np.ndarray        # [N, max_length] int32, padded with the pad id
    lengths: np.ndarray    # [N] int32
    labels: np.ndarray     # [N] int64, global output index
    task: np.ndarray       # [N] int64, task index
    pad_id: int
    space: LabelSpace
    type_ids: np.ndarray | None = None  # [N, max_length] int8 token types, only when some task has text pairs

    def __len__(self) -> int:
        return len(self.lengths)

    def batch(self, rows: np.ndarray) -> Batch:
        rows = np.asarray(rows)
        ids, mask = cut_to_longest(self.ids, self.lengths, rows)
        width = ids.shape[1]
        types = None if self.type_ids is None else torch.from_numpy(self.type_ids[rows, :width].astype(np.int64))
        return Batch(ids, mask.long(), torch.from_numpy(self.labels[rows]), task_units(self.space, self.task[rows]),
                     types)


def cut_to_longest(ids: np.ndarray, lengths: np.ndarray, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows ``rows`` of right-padded token ids, cut to their longest row (dynamic padding): int64 ids
    ``[B, W]`` and the bool mask of real tokens ``[B, W]``."""
    width = int(lengths[rows].max())
    ids_t = torch.from_numpy(ids[rows, :width].astype(np.int64))
    mask = torch.arange(width)[None, :] < torch.from_numpy(lengths[rows].astype(np.int64))[:, None]
    return ids_t, mask


def task_units(space: LabelSpace, task: np.ndarray) -> torch.Tensor:
    """[B, n_outputs] bool: True on the output units of each row's task."""
    offsets = np.asarray(space.offsets)[task]
    ends = offsets + np.asarray(space.sizes)[task]
    units = np.arange(space.n_outputs)[None, :]
    return torch.from_numpy((units >= offsets[:, None]) & (units < ends[:, None]))


def tokenize(tokenizer, texts: list, max_length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Token ids ``[N, max_length]`` (pad-filled), lengths, and token types (None for single texts).

    ``texts`` holds strings, or ``(text_a, text_b)`` pairs (GLUE's sentence-pair tasks), encoded as the
    tokenizer's pair (BERT: ``[CLS] a [SEP] b [SEP]``, types 0 then 1), the longer text truncated first.
    """
    if not texts:  # e.g. a client holding none of a task's rows (fltac.experiment.build_client)
        return np.zeros((0, max_length), dtype=np.int32), np.zeros(0, dtype=np.int32), None
    cut = max_length * CHARS_PER_TOKEN_BOUND
    pairs = isinstance(texts[0], (tuple, list))
    if pairs:
        enc = tokenizer([a[:cut] for a, _ in texts], [b[:cut] for _, b in texts], truncation="longest_first",
                        max_length=max_length, padding=False, return_token_type_ids=True)
    else:
        enc = tokenizer([t[:cut] for t in texts], truncation=True, max_length=max_length, padding=False)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = np.full((len(texts), max_length), pad, dtype=np.int32)
    types = np.zeros((len(texts), max_length), dtype=np.int8) if pairs else None
    lengths = np.zeros(len(texts), dtype=np.int32)
    for i, seq in enumerate(enc["input_ids"]):
        ids[i, : len(seq)] = seq
        lengths[i] = len(seq)
        if pairs:
            types[i, : len(seq)] = enc["token_type_ids"][i]
    return ids, lengths, types


def build_store(tokenizer, tasks: list[Task], space: LabelSpace, max_length: int, split: str,
                rows_per_task: list[np.ndarray] | None = None,
                cache: Path | None = None) -> tuple[TokenStore, list[np.ndarray]]:
    """Tokenise ``split`` ('train' or 'test') of every task into one store.

    Returns the store and, per task, the store row of each of that task's selected rows (all rows,
    or ``rows_per_task[t]``), so task-local indices (the partition's) map to store rows. ``cache``: a
    folder of tokenised texts keyed by their inputs (:mod:`fltac.data.token_cache`); None tokenises afresh.
    """
    all_ids, all_len, all_types, all_lab, all_task, index = [], [], [], [], [], []
    start = 0
    for t, task in enumerate(tasks):
        texts = task.train_texts if split == "train" else task.test_texts
        labels = task.train_labels if split == "train" else task.test_labels
        rows = np.arange(len(texts)) if rows_per_task is None else np.asarray(rows_per_task[t])
        ids, lengths, types = token_cache.cached(tokenize, tokenizer, [texts[i] for i in rows], max_length, cache,
                                                 salt=f"chars_per_token_bound={CHARS_PER_TOKEN_BOUND}")
        all_ids.append(ids)
        all_len.append(lengths)
        all_types.append(types)
        all_lab.append(labels[rows] + space.offsets[t])
        all_task.append(np.full(len(rows), t, dtype=np.int64))
        index.append(np.arange(start, start + len(rows)))
        start += len(rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    types = None
    if any(t is not None for t in all_types):  # single-text tasks beside pair tasks get type 0 everywhere
        types = np.concatenate([t if t is not None else np.zeros(i.shape, np.int8) for t, i in zip(all_types, all_ids)])
    store = TokenStore(np.concatenate(all_ids), np.concatenate(all_len), np.concatenate(all_lab),
                       np.concatenate(all_task), pad, space, types)
    return store, index


def sample_batches(rows: np.ndarray, steps: int, batch_size: int, rng: np.random.Generator) -> Iterator[np.ndarray]:
    """``steps`` batches of row ids: passes over ``rows`` in fresh random orders, restarted when exhausted.

    A pool smaller than ``batch_size`` gives batches of the whole pool.
    """
    rows = np.asarray(rows)
    size = min(batch_size, len(rows))
    order = rng.permutation(rows)
    pos = 0
    for _ in range(steps):
        if pos + size > len(order):
            order = np.concatenate([order[pos:], rng.permutation(rows)])
            pos = 0
        yield order[pos: pos + size]
        pos += size


def eval_rows(n_test: int, size: int, seed: int) -> np.ndarray:
    """A fixed seeded sample of test rows (sorted), never simply the first ``size``."""
    if size >= n_test:
        return np.arange(n_test)
    return np.sort(np.random.default_rng(seed).choice(n_test, size=size, replace=False))
