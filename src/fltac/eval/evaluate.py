"""Accuracy of an adapter on one task: argmax over that task's slice of the shared output layer."""

from __future__ import annotations

import numpy as np
import torch

from fltac.data.batches import TokenStore
from fltac.models.adapters import AdapterModel


class Evaluator:
    """Scores adapter states on each task's fixed test sample; rows are sorted by length so batches pad little."""

    def __init__(self, model: AdapterModel, store: TokenStore, task_rows: list[np.ndarray], batch_size: int):
        self.model = model
        self.store = store
        self.batches = []
        for rows in task_rows:
            ordered = rows[np.argsort(store.lengths[rows], kind="stable")]
            self.batches.append([ordered[i: i + batch_size] for i in range(0, len(ordered), batch_size)])

    @torch.inference_mode()
    def predictions(self, state: dict[str, torch.Tensor], task: int) -> tuple[np.ndarray, np.ndarray]:
        """(predicted, true) global label indices on ``task``'s test sample."""
        self.model.load(state)
        self.model.model.eval()
        lo, hi = self.store.space.slice(task)
        preds, trues = [], []
        for rows in self.batches[task]:
            batch = self.store.batch(rows)
            logits = self.model.logits(**batch.model_inputs())
            preds.append(logits[:, lo:hi].argmax(-1).cpu().numpy() + lo)
            trues.append(batch.labels.numpy())
        return np.concatenate(preds), np.concatenate(trues)

    def majority_accuracy(self, task: int) -> float:
        """The accuracy of always predicting ``task``'s most frequent label of the test sample: the floor any
        adapter should beat."""
        labels = self.store.labels[np.concatenate(self.batches[task])]
        return float(np.bincount(labels).max() / len(labels))

    def accuracy(self, state: dict[str, torch.Tensor], task: int) -> float:
        pred, true = self.predictions(state, task)
        return float((pred == true).mean())

    #: The name of what :meth:`score` returns (the engine's eval records and summary use it as their key).
    metric = "accuracy"

    def score(self, state: dict[str, torch.Tensor], task: int) -> float:
        """The run's per-task metric (:attr:`metric`); a causal-LM run's evaluator returns its LM loss here."""
        return self.accuracy(state, task)
