"""Tokenised rows, tokenised once per run, and the batches built from them.

Every training row of every task lives in one :class:`TokenStore` (token ids padded to ``max_length``,
true lengths, its label's index in the shared output layer and its task's output slice), so a client's
data is just a list of row numbers, whatever mix of tasks it holds. A batch is cut to its longest row
(dynamic padding): short texts such as tweets do not pay for the long ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

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

    @property
    def n_tokens(self) -> int:
        return int(self.attention_mask.sum())

    def model_inputs(self) -> dict[str, torch.Tensor]:
        """The backbone's keyword arguments for this batch (every store's batch type has this method)."""
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask}


@dataclass
class TokenStore:
    ids: np.ndarray        # [N, max_length] int32, padded with the pad id
    lengths: np.ndarray    # [N] int32
    labels: np.ndarray     # [N] int64, global output index
    task: np.ndarray       # [N] int64, task index
    pad_id: int
    space: LabelSpace

    def __len__(self) -> int:
        return len(self.lengths)

    def batch(self, rows: np.ndarray) -> Batch:
        rows = np.asarray(rows)
        width = int(self.lengths[rows].max())
        ids = torch.from_numpy(self.ids[rows, :width].astype(np.int64))
        mask = (torch.arange(width)[None, :] < torch.from_numpy(self.lengths[rows].astype(np.int64))[:, None]).long()
        offsets = np.asarray(self.space.offsets)[self.task[rows]]
        ends = offsets + np.asarray(self.space.sizes)[self.task[rows]]
        units = np.arange(self.space.n_outputs)[None, :]
        allowed = torch.from_numpy((units >= offsets[:, None]) & (units < ends[:, None]))
        return Batch(ids, mask, torch.from_numpy(self.labels[rows]), allowed)


def tokenize(tokenizer, texts: list[str], max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """Token ids ``[N, max_length]`` (pad-filled) and lengths, truncating each text to ``max_length``."""
    if not texts:  # e.g. a client holding none of a task's rows (fltac.experiment.build_client)
        return np.zeros((0, max_length), dtype=np.int32), np.zeros(0, dtype=np.int32)
    cut = [t[: max_length * CHARS_PER_TOKEN_BOUND] for t in texts]
    enc = tokenizer(cut, truncation=True, max_length=max_length, padding=False)["input_ids"]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = np.full((len(enc), max_length), pad, dtype=np.int32)
    lengths = np.zeros(len(enc), dtype=np.int32)
    for i, seq in enumerate(enc):
        ids[i, : len(seq)] = seq
        lengths[i] = len(seq)
    return ids, lengths


def build_store(tokenizer, tasks: list[Task], space: LabelSpace, max_length: int, split: str,
                rows_per_task: list[np.ndarray] | None = None) -> tuple[TokenStore, list[np.ndarray]]:
    """Tokenise ``split`` ('train' or 'test') of every task into one store.

    Returns the store and, per task, the store row of each of that task's selected rows (all rows,
    or ``rows_per_task[t]``), so task-local indices (the partition's) map to store rows.
    """
    all_ids, all_len, all_lab, all_task, index = [], [], [], [], []
    start = 0
    for t, task in enumerate(tasks):
        texts = task.train_texts if split == "train" else task.test_texts
        labels = task.train_labels if split == "train" else task.test_labels
        rows = np.arange(len(texts)) if rows_per_task is None else np.asarray(rows_per_task[t])
        ids, lengths = tokenize(tokenizer, [texts[i] for i in rows], max_length)
        all_ids.append(ids)
        all_len.append(lengths)
        all_lab.append(labels[rows] + space.offsets[t])
        all_task.append(np.full(len(rows), t, dtype=np.int64))
        index.append(np.arange(start, start + len(rows)))
        start += len(rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    store = TokenStore(np.concatenate(all_ids), np.concatenate(all_len), np.concatenate(all_lab),
                       np.concatenate(all_task), pad, space)
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
