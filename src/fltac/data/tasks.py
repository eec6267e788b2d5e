"""Tasks and the shared label space.

A :class:`Task` is one classification problem with its train and test texts. All tasks of a run share
one output layer: task ``i`` owns the contiguous slice ``[offset_i, offset_i + n_labels_i)`` of the
output units, so every adapter has the same shape and no two tasks share a unit.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Task:
    name: str
    labels: list[str]              # label names; local label j is labels[j]
    train_texts: list              # strings, or (text_a, text_b) pairs for sentence-pair tasks (GLUE), or
    #                                a uint8 image array [N, H, W(, 3)] for image tasks (fltac.data.vision)
    train_labels: np.ndarray       # local label ids, int64
    test_texts: list
    test_labels: np.ndarray
    #: Natural federated data: the owner (author, site, device) of each training row, or None for the
    #: Dirichlet split. See :func:`fltac.data.partition.partition_by_owner`.
    train_owners: list[str] | None = None

    def __post_init__(self):
        if len(self.labels) < 2:
            raise ValueError(f"task '{self.name}': needs at least 2 classes, found {self.labels}")
        if len(self.train_texts) != len(self.train_labels) or len(self.test_texts) != len(self.test_labels):
            raise ValueError(f"task '{self.name}': texts and labels differ in length")
        if len(self.test_texts) == 0:
            raise ValueError(f"task '{self.name}': the test split is empty")
        if self.train_owners is not None and len(self.train_owners) != len(self.train_texts):
            raise ValueError(f"task '{self.name}': train_owners and train_texts differ in length")


@dataclass(frozen=True)
class LabelSpace:
    """Where each task's labels sit in the one shared output layer."""

    names: tuple[str, ...]
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]

    @classmethod
    def of(cls, tasks: list[Task]) -> "LabelSpace":
        sizes = tuple(len(t.labels) for t in tasks)
        offsets = tuple(int(x) for x in np.concatenate([[0], np.cumsum(sizes)[:-1]]))
        return cls(tuple(t.name for t in tasks), offsets, sizes)

    @property
    def n_outputs(self) -> int:
        return sum(self.sizes)

    def slice(self, task_index: int) -> tuple[int, int]:
        lo = self.offsets[task_index]
        return lo, lo + self.sizes[task_index]


def label_to_ids(values: list[str]) -> tuple[list[str], np.ndarray]:
    """Sorted label names and the local id of each value."""
    names = sorted(set(values))
    index = {n: i for i, n in enumerate(names)}
    return names, np.array([index[v] for v in values], dtype=np.int64)
