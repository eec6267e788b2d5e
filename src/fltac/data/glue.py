"""The paper's GLUE scenario (FL-TAC, Table 1): SST-2, MRPC, QQP, QNLI, RTE from the hub (``nyu-mll/glue``).

| task | inputs                  | labels (0, 1)                 |
|------|-------------------------|-------------------------------|
| sst2 | sentence                | negative, positive            |
| mrpc | sentence1, sentence2    | not_equivalent, equivalent    |
| qqp  | question1, question2    | not_duplicate, duplicate      |
| qnli | question, sentence      | entailment, not_entailment    |
| rte  | sentence1, sentence2    | entailment, not_entailment    |

Train on ``train``, score on ``validation`` (GLUE's test labels are hidden). Pair tasks are encoded as
BERT pairs (``[CLS] a [SEP] b [SEP]`` with token types 0/1; see :func:`fltac.data.batches.tokenize`),
not as one joined text. ``data.source`` may name a local copy of the dataset repository (the same
``<config>/<split>-*.parquet`` layout and README configs as on the hub); that is what the tests load.
"""

from __future__ import annotations

from functools import partial
from typing import Callable

import numpy as np

from fltac.data.hub import HubUnavailable, require_hub, unavailable_message
from fltac.data.tasks import Task

GLUE_ID = "nyu-mll/glue"
OFFLINE_ALTERNATIVE = "configs/text5.yaml"
#: task -> (first text column, second text column or None, label names in label-id order)
GLUE_TASKS = {
    "sst2": ("sentence", None, ["negative", "positive"]),
    "mrpc": ("sentence1", "sentence2", ["not_equivalent", "equivalent"]),
    "qqp": ("question1", "question2", ["not_duplicate", "duplicate"]),
    "qnli": ("question", "sentence", ["entailment", "not_entailment"]),
    "rte": ("sentence1", "sentence2", ["entailment", "not_entailment"]),
}


def _inputs(rows, first: str, second: str | None) -> list:
    """Texts (single-sentence task) or (text_a, text_b) pairs, in row order."""
    if second is None:
        return list(rows[first])
    return list(zip(rows[first], rows[second]))


def load_glue_task(name: str, source: str, test_fraction: float = 0.2, split_seed: int = 0) -> Task:
    """One GLUE task: train split for training, validation split for testing (``test_fraction`` and
    ``split_seed`` are unused: GLUE has its own splits; they are accepted to fit the loader signature)."""
    import datasets

    first, second, labels = GLUE_TASKS[name]
    try:
        splits = datasets.load_dataset(source, name)
    except OSError as exc:  # datasets' not-found and connection errors
        if source == GLUE_ID:
            raise HubUnavailable(unavailable_message("glue", [source], OFFLINE_ALTERNATIVE,
                                                     f"loading it failed ({str(exc).splitlines()[0][:200]})")) from None
        raise
    train, test = splits["train"], splits["validation"]
    train_y = np.asarray(train["label"], dtype=np.int64)
    test_y = np.asarray(test["label"], dtype=np.int64)
    return Task(name, list(labels), _inputs(train, first, second), train_y, _inputs(test, first, second), test_y)


def glue_loaders(source: str | None) -> dict[str, Callable[..., Task]]:
    """{task -> loader(test_fraction, split_seed)} reading ``source`` (default: the hub's nyu-mll/glue)."""
    source = source or GLUE_ID
    require_hub("glue", [source], OFFLINE_ALTERNATIVE)
    return {name: partial(load_glue_task, name, source) for name in GLUE_TASKS}
