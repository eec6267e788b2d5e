"""Local training: the one loop every method's clients run, and the plan of what each client trains.

A client never sees the server's strategy. It is handed a start adapter for each of its *jobs* and
returns the trained adapter with its sample count. What a job is depends only on how the method
organises a client's adapters (:func:`plan_jobs`):

- ``fltac``: one job per task the client holds (one adapter each), ``local_steps`` steps each;
- ``fedit`` (and ``hafl``, ``hetlora``, ``safedlora``, ``fedavg_full``): one job over all its tasks
  mixed (one shared adapter), ``local_steps x n_tasks`` steps, the same total as FL-TAC gives that client;
- ``centralized``: one pooled client, one job per task with ``local_steps x (clients holding it)``
  steps, the same total per task as the federated runs.

Jobs carry an opaque key (``a0``, ``a1``, ...): the server never learns which task a job trained.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from fltac.client.hooks import Hook
from fltac.config import TrainConfig
from fltac.data.batches import Batch, TokenStore, sample_batches
from fltac.models.adapters import AdapterModel


@dataclass(frozen=True)
class Job:
    client: int
    key: str                 # the client's own name for this adapter; opaque to the server
    tasks: tuple[int, ...]   # task indices trained (measurement only; never sent)
    rows: np.ndarray         # TokenStore rows the job samples from
    steps: int

    @property
    def num_examples(self) -> int:
        return int(len(self.rows))


#: Methods whose clients hold one adapter over all their data (FedIT's layout).
ONE_ADAPTER_METHODS = ("fedit", "hafl", "hetlora", "safedlora", "fedavg_full")


def plan_jobs(method: str, client_rows: list[list[np.ndarray]], local_steps: int) -> list[Job]:
    """All jobs of all clients. ``client_rows[k][t]``: store rows of task ``t`` held by client ``k``."""
    jobs = []
    if method == "centralized":
        n_tasks = len(client_rows[0])
        for t in range(n_tasks):
            holders = [rows[t] for rows in client_rows if len(rows[t])]
            jobs.append(Job(0, f"a{t}", (t,), np.concatenate(holders), local_steps * len(holders)))
        return jobs
    for k, rows in enumerate(client_rows):
        held = [t for t, r in enumerate(rows) if len(r)]
        if not held:
            continue
        if method in ONE_ADAPTER_METHODS:
            jobs.append(Job(k, "a0", tuple(held), np.concatenate([rows[t] for t in held]), local_steps * len(held)))
        else:
            jobs.extend(Job(k, f"a{i}", (t,), rows[t], local_steps) for i, t in enumerate(held))
    return jobs


def task_loss(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Cross-entropy over each row's own task slice of the shared output layer.

    Units of other tasks are masked out, so a row's gradient reaches only its task's head rows.
    """
    masked = logits.masked_fill(~batch.allowed.to(logits.device), torch.finfo(logits.dtype).min)
    return torch.nn.functional.cross_entropy(masked, batch.labels.to(logits.device))


def job_seed(seed: int, round_: int, client: int, key: str) -> int:
    """A seed for one job's batches and dropout, stable across resumes and independent of run order."""
    return int(np.random.SeedSequence([seed, round_, client, int(key[1:])]).generate_state(1)[0])


def train_job(model: AdapterModel, start: dict[str, torch.Tensor], store: TokenStore, job: Job, cfg: TrainConfig,
              seed: int, hooks: Sequence[Hook] = ()) -> tuple[dict[str, torch.Tensor], list[float], int]:
    """Train one adapter from ``start`` for ``job.steps`` AdamW steps; (adapter, per-step losses, tokens).

    A fresh optimizer per job and round, as in FedAvg-style clients: nothing of the optimizer persists.
    ``hooks`` add the method's own terms (see :mod:`fltac.client.hooks`); the logged loss is the task loss.
    """
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model.load(start)
    model.model.train()
    opt = torch.optim.AdamW(model.param_groups(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    losses, tokens = [], 0
    for rows in sample_batches(job.rows, job.steps, cfg.batch_size, rng):
        batch = store.batch(rows)
        loss = task_loss(model.logits(**batch.model_inputs()), batch)
        extra = [t for t in (h.extra_loss(model.params) for h in hooks) if t is not None]
        (loss + sum(extra)).backward()
        for h in hooks:
            h.after_backward(model.params)
        opt.step()
        for h in hooks:
            h.after_step(model.params)
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach())
        tokens += batch.n_tokens
    return model.state(), torch.stack(losses).tolist(), tokens
