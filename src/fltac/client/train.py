"""Local training: the one loop every method's clients run, and the plan of what each client trains.

A client never sees the server's strategy. It is handed a start adapter for each of its *jobs* and
returns the trained adapter with its sample count. What a job is depends only on the method's job
layout in the registry (:mod:`fltac.methods`: ``per_task``, ``shared`` or ``pooled``; :func:`plan_jobs`).

Jobs carry an opaque key (:func:`fltac.wire.job_key`: ``a0``, ``a1``, ...): the server never learns which
task a job trained.

How a client spends its round (``train.batching``):

- ``routed`` (default): one budget for every method, equal in rows and in sequential steps. A client
  draws one stream of mixed batches from the rows of all its jobs (:class:`Route`): ``batch_size`` rows per
  step from all the tasks it holds, in proportion to its data, for the sum of its jobs' steps
  (``local_steps x tasks held``), seeded per client and round: exactly the batches a ``shared`` client's
  one job (FedIT's) draws. Each row trains the adapter of its own job (task); each adapter steps on the
  mean loss of its rows in that step, and an adapter without a row in a step takes no step
  (:mod:`fltac.client.optim`). A ``shared`` client has one job, so its route is its old job. The
  ``pooled`` client (centralized) is one stream over all the pooled rows for ``local_steps x (sum over
  tasks of the clients holding it)`` steps of ``batch_size`` rows: the rows and steps of all federated
  clients of a round together, one step after another.
- ``per_adapter`` (the FL-TAC paper's literal layout): each job draws its own ``local_steps`` full
  batches from its own rows (:func:`train_job`), so a ``per_task`` client's adapters take fewer
  sequential steps per round than a ``shared`` client's one adapter.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from fltac.client.hooks import Hook
from fltac.client.proximal import Proximal
from fltac.config import TrainConfig
from fltac.data.batches import Batch, TokenStore, sample_batches
from fltac.data.chat import LMBatch
from fltac.eval.phases import phase
from fltac.methods import method_of, pooled_slots
from fltac.models.adapters import AdapterModel
from fltac.models.causal_lm import lm_loss, row_token_nll
from fltac.client.optim import StackedAdamW
from fltac.models.bank import AdapterBank, Block, Group
from fltac.wire import job_key


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


def plan_jobs(method: str, client_rows: list[list[np.ndarray]], local_steps: int) -> list[Job]:
    """All jobs of all clients, in ``method``'s job layout (:mod:`fltac.methods`).

    ``client_rows[k][t]``: store rows of task ``t`` held by client ``k``.
    """
    jobs = []
    layout = method_of(method).layout
    if layout == "pooled":
        for key, t in pooled_slots(len(client_rows[0])).items():
            holders = [rows[t] for rows in client_rows if len(rows[t])]
            jobs.append(Job(0, key, (t,), np.concatenate(holders), local_steps * len(holders)))
        return jobs
    for k, rows in enumerate(client_rows):
        held = [t for t, r in enumerate(rows) if len(r)]
        if not held:
            continue
        if layout == "shared":
            jobs.append(Job(k, job_key(0), tuple(held), np.concatenate([rows[t] for t in held]),
                            local_steps * len(held)))
        else:
            jobs.extend(Job(k, job_key(i), (t,), rows[t], local_steps) for i, t in enumerate(held))
    return jobs


@dataclass(frozen=True)
class Route:
    """One client's round in the routed layout: one stream of mixed batches over the rows of all its jobs.

    ``rows`` are the jobs' rows concatenated in job order (for FedIT's one job: its rows; for FL-TAC's jobs:
    the same rows in the same order, since both list a client's tasks in task order) and ``steps`` the
    sum of the jobs' steps, so FL-TAC's and FedIT's clients draw the same batches from the same seed.
    """

    client: int
    jobs: tuple[Job, ...]

    @property
    def rows(self) -> np.ndarray:
        return np.concatenate([job.rows for job in self.jobs])

    @property
    def steps(self) -> int:
        return sum(job.steps for job in self.jobs)


def plan_routes(jobs: list[Job]) -> list[Route]:
    """The routes of ``jobs``: one per client, its jobs in their order."""
    by_client: dict[int, list[Job]] = {}
    for job in jobs:
        by_client.setdefault(job.client, []).append(job)
    return [Route(client, tuple(cjobs)) for client, cjobs in by_client.items()]


def route_seed(seed: int, round_: int, route: Route) -> int:
    """The seed of a route's batches and dropout: its first job's :func:`job_seed` (FedIT's one job's)."""
    return job_seed(seed, round_, route.client, route.jobs[0].key)


def routed_batches(route: Route, batch_size: int, rng: np.random.Generator) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Per step of ``route``: the step's rows (:func:`~fltac.data.batches.sample_batches` over the route's rows,
    the draws FedIT makes) reordered so each job's rows are contiguous (stable), and the job index of each."""
    rows = route.rows
    job_of = np.repeat(np.arange(len(route.jobs)), [len(job.rows) for job in route.jobs])
    order = np.argsort(rows, kind="stable")
    for batch in sample_batches(rows, route.steps, batch_size, rng):
        owner = job_of[order[np.searchsorted(rows, batch, sorter=order)]]
        regroup = np.argsort(owner, kind="stable")
        yield batch[regroup], owner[regroup]


def row_losses(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Per-row cross-entropy over each row's own task slice of the shared output layer.

    Units of other tasks are masked out, so a row's gradient reaches only its task's head rows.
    """
    masked = logits.masked_fill(~batch.allowed.to(logits.device), torch.finfo(logits.dtype).min)
    return torch.nn.functional.cross_entropy(masked, batch.labels.to(logits.device), reduction="none")


def task_loss(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    """The batch's mean :func:`row_losses`: the loss one adapter's step minimises. A causal-LM batch
    (:class:`~fltac.data.chat.LMBatch`) takes the mean next-token loss over its response tokens instead."""
    if isinstance(batch, LMBatch):
        return lm_loss(logits, batch.labels)
    return row_losses(logits, batch).mean()


def group_losses(logits: torch.Tensor, batch, groups: list[Group]) -> list[torch.Tensor]:
    """:func:`task_loss` of each group's own rows (``start:end``) of a batch shared by several adapters: the
    mean cross-entropy of its rows, or for a causal-LM batch the mean over its own response tokens."""
    if isinstance(batch, LMBatch):
        total, count = row_token_nll(logits, batch.labels)
        return [total[g.start:g.end].sum() / max(int(count[g.start:g.end].sum()), 1) for g in groups]
    per_row = row_losses(logits, batch)
    return [per_row[g.start:g.end].mean() for g in groups]


def job_seed(seed: int, round_: int, client: int, key: str) -> int:
    """A seed for one job's batches and dropout, stable across resumes and independent of run order."""
    return int(np.random.SeedSequence([seed, round_, client, int(key[1:])]).generate_state(1)[0])


#: Progress callback of the training functions: called after every optimizer step with the number of
#: adapters that step advanced (1 alone; every adapter of the pass when adapters share passes).
OnStep = Callable[[int], None]


def _no_progress(n: int) -> None:
    pass


def train_job(model: AdapterModel, start: dict[str, torch.Tensor], store: TokenStore, job: Job, cfg: TrainConfig,
              seed: int, hooks: Sequence[Hook] = (),
              on_step: OnStep = _no_progress) -> tuple[dict[str, torch.Tensor], list[float], int]:
    """Train one adapter from ``start`` for ``job.steps`` AdamW steps; (adapter, per-step losses, tokens).

    A fresh optimizer per job and round, as in FedAvg-style clients: nothing of the optimizer persists.
    ``hooks`` add the method's own terms (see :mod:`fltac.client.hooks`); the logged loss is the task loss.
    FedProx's term (``cfg.prox_mu``) comes as one of them (:func:`fltac.client.round.job_hooks`); the
    shared-pass functions below take no hooks and add it themselves (:func:`add_proximal_grad`). Only the
    model's ``trained`` tensors step (FFA-LoRA's frozen ``lora_A`` has no gradient and no optimizer state).
    ``on_step(1)`` after every step (:data:`OnStep`).
    """
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model.load(start)
    model.model.train()
    opt = torch.optim.AdamW(model.param_groups(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    losses, tokens = [], 0
    batches = sample_batches(job.rows, job.steps, cfg.batch_size, rng)
    for _ in range(job.steps):
        with phase("batches"):
            batch = store.batch(next(batches))
        with phase("forward"):
            loss = task_loss(model.logits(**batch.model_inputs()), batch)
            extra = [t for t in (h.extra_loss(model.params) for h in hooks) if t is not None]
        with phase("backward"):
            (loss + sum(extra)).backward()
            for h in hooks:
                h.after_backward(model.params)
        with phase("optimizer"):
            opt.step()
            for h in hooks:
                h.after_step(model.params)
            opt.zero_grad(set_to_none=True)
        losses.append(loss.detach())
        tokens += batch.n_tokens
        on_step(1)
    return model.state(), torch.stack(losses).tolist(), tokens


def micro_batches(widths: list[int], sizes: list[int], max_tokens: int, same_width: bool = False) -> list[list[int]]:
    """Batches (indices) grouped into forward passes of at most ``max_tokens`` padded tokens each.

    Length bucketing: batches are taken in order of their width, so each pass pads its rows only to
    widths close to their own; with ``same_width`` a pass holds batches of one width only (no row is
    padded beyond its own batch's width). A batch is never split (its dropout draws and its loss stay
    whole); one that alone exceeds ``max_tokens`` gets a pass of its own.
    """
    passes, current, widest = [], [], 0
    for g in sorted(range(len(widths)), key=lambda i: (widths[i], i)):
        rows = sum(sizes[i] for i in current) + sizes[g]
        if current and (rows * max(widest, widths[g]) > max_tokens or (same_width and widths[g] != widest)):
            passes.append(current)
            current, widest = [], 0
        current.append(g)
        widest = max(widest, widths[g])
    return passes + [current] if current else passes


def bank_proximal(bank: AdapterBank, mu: float) -> Proximal | None:
    """FedProx's term (``train.prox_mu``) over a bank's trained stacked tensors, anchored at the adapters the
    bank was given (the ones the clients were sent); None when ``mu`` is 0, so nothing changes then."""
    return Proximal(mu, {k: p.detach().clone() for k, p in bank.trained.items()}) if mu > 0 else None


def add_proximal_grad(prox: Proximal | None, bank: AdapterBank, active: list[bool] | None = None) -> None:
    """Add ``mu * (w - w_sent)`` to the stacked gradients of the adapters ``g`` with ``active[g]`` (all when
    None), before the optimizer step: the :class:`~fltac.client.proximal.Proximal` hook's own loss, backward
    through the stacked tensors, the others' rows detached (an adapter that takes no step gets no gradient).
    Per adapter, the very gradient the hook adds in :func:`train_job`."""
    if prox is None:
        return
    params = bank.trained
    if active is not None:
        on = torch.tensor(active)
        params = {k: torch.where(on.view((-1,) + (1,) * (p.dim() - 1)).to(p.device), p, p.detach())
                  for k, p in params.items()}
    prox.extra_loss(params).backward()


def train_jobs_together(model: AdapterModel, starts: list[dict[str, torch.Tensor]], store: TokenStore,
                        jobs: list[Job], cfg: TrainConfig, seeds: list[int], max_tokens: int,
                        on_step: OnStep = _no_progress) -> list[tuple[dict[str, torch.Tensor], list[float], int]]:
    """:func:`train_job` for several jobs at once, sharing every backbone pass (:mod:`fltac.models.bank`).

    Each job keeps its own batches (its seed's generator), its own dropout draws and its own AdamW state,
    so the results equal one-by-one training up to float rounding (padding to a pass's widest batch and
    matmul blocking). All jobs must take the same number of steps. The methods whose clients use hooks
    train one by one instead; FedProx's term (``cfg.prox_mu``) is added to every adapter's gradient before
    each step (:func:`add_proximal_grad`). ``on_step(len(jobs))`` after every shared step: each job advanced one.
    """
    steps = {job.steps for job in jobs}
    if len(steps) != 1:
        raise ValueError(f"jobs trained together must take the same number of steps, got {sorted(steps)}")
    bank = AdapterBank(model, starts, seeds)
    samplers = [sample_batches(job.rows, job.steps, cfg.batch_size, np.random.default_rng(seed))
                for job, seed in zip(jobs, seeds)]
    opt = StackedAdamW(list(bank.trained.values()), lr=cfg.lr, weight_decay=cfg.weight_decay)
    prox = bank_proximal(bank, cfg.prox_mu)
    losses: list[list[torch.Tensor]] = [[] for _ in jobs]
    tokens = [0] * len(jobs)
    model.model.train()
    with bank.installed():
        for _ in range(steps.pop()):
            with phase("batches"):
                rows = [next(sampler) for sampler in samplers]
                widths = [int(store.lengths[r].max()) for r in rows]
                passes = micro_batches(widths, [len(r) for r in rows], max_tokens)
            for members in passes:
                with phase("batches"):
                    groups, blocks, start = [], [], 0
                    for g in members:
                        groups.append(Group(g, start, start + len(rows[g])))
                        blocks.append(Block(g, start, start + len(rows[g]), widths[g]))
                        start += len(rows[g])
                    batch = store.batch(np.concatenate([rows[g] for g in members]))
                    bank.set_layout(groups, blocks)
                with phase("forward"):
                    per_job = group_losses(model.logits(**batch.model_inputs()), batch, groups)
                with phase("backward"):
                    torch.stack(per_job).sum().backward()
                for grp, loss in zip(groups, per_job):
                    losses[grp.adapter].append(loss.detach())
                    tokens[grp.adapter] += int(store.lengths[rows[grp.adapter]].sum())
            with phase("optimizer"):
                add_proximal_grad(prox, bank)
                opt.step()
                opt.zero_grad()
            on_step(len(jobs))
    return [(state, torch.stack(job_losses).tolist(), n_tok)
            for state, job_losses, n_tok in zip(bank.states(), losses, tokens)]


def train_all_together(model: AdapterModel, store: TokenStore, jobs: list[Job], starts: dict, cfg: TrainConfig,
                       seeds: dict, on_step: OnStep = _no_progress
                       ) -> dict[tuple[int, str], tuple[dict[str, torch.Tensor], list[float], int]]:
    """Every job of ``jobs`` trained by :func:`train_jobs_together`, in passes of up to ``cfg.adapters_per_pass``
    jobs with equal step counts; keyed by (client, key). ``starts``/``seeds``: per (client, key). ``on_step``:
    see :data:`OnStep`, so a progress bar over the round's adapter steps advances with every shared step."""
    by_steps: dict[int, list[Job]] = {}
    for job in jobs:
        by_steps.setdefault(job.steps, []).append(job)
    out = {}
    for same in by_steps.values():
        for i in range(0, len(same), cfg.adapters_per_pass):
            chunk = same[i: i + cfg.adapters_per_pass]
            ids = [(j.client, j.key) for j in chunk]
            results = train_jobs_together(model, [starts[k] for k in ids], store, chunk, cfg,
                                          [seeds[k] for k in ids], cfg.pass_tokens, on_step)
            out.update(zip(ids, results))
    return out


def train_routes_together(model: AdapterModel, starts: list[list[dict[str, torch.Tensor]]], store: TokenStore,
                          routes: list[Route], cfg: TrainConfig, seeds: list[int], max_tokens: int,
                          on_step: OnStep = _no_progress) -> list[list[tuple[dict[str, torch.Tensor], list[float], int]]]:
    """The routed layout's local training of several clients at once; per route, per job: (adapter, losses, tokens).

    ``starts[i][j]``: the start adapter of job ``j`` of route ``i``; ``seeds[i]``: route ``i``'s seed (its
    batches and its LoRA dropout draws, one generator per route). A step of a route is one *block* of rows
    (never split), sorted by job; each of its jobs' adapters gets the mean loss of its own rows, and every
    adapter with rows in the step takes one AdamW step after it, the others none (:class:`StackedAdamW`);
    with ``cfg.prox_mu`` > 0 the adapters that step get FedProx's ``mu * (w - w_sent)`` added to their
    gradient first, the others no gradient (:func:`add_proximal_grad`).
    Routes with fewer steps simply stop taking part. ``on_step(n)`` after every step, ``n`` the routes in it
    (a route's steps are the sum of its jobs' ``steps``, which a progress bar counts).

    Passes hold whole blocks of ONE width (``micro_batches(..., same_width=True)``), so no row is padded
    beyond its own block's width: a row's numbers then do not depend on which other blocks share its pass
    (the backbone's matmuls and attention are computed row by row, measured bit-identical in bf16 for any
    companions of the same width, not for wider padding), which makes a client trained alone (a Flower
    client) give the very bytes it gets beside every other client of the round in one process.
    """
    first = np.cumsum([0] + [len(route.jobs) for route in routes])
    bank = AdapterBank(model, [s for per_route in starts for s in per_route], seeds)
    opt = StackedAdamW(list(bank.trained.values()), lr=cfg.lr, weight_decay=cfg.weight_decay)
    prox = bank_proximal(bank, cfg.prox_mu)
    samplers = [routed_batches(route, cfg.batch_size, np.random.default_rng(seed)) for route, seed in zip(routes, seeds)]
    losses: list[list[torch.Tensor]] = [[] for _ in range(len(bank))]
    tokens = [0] * len(bank)
    model.model.train()
    with bank.installed():
        for step in range(max(route.steps for route in routes)):
            with phase("batches"):
                live = [i for i, route in enumerate(routes) if route.steps > step]
                drawn = [next(samplers[i]) for i in live]
                widths = [int(store.lengths[rows].max()) for rows, _ in drawn]
                passes = micro_batches(widths, [len(rows) for rows, _ in drawn], max_tokens, same_width=True)
            active = [False] * len(bank)
            for members in passes:
                with phase("batches"):
                    groups, blocks, start = [], [], 0
                    for m in members:
                        rows, owner = drawn[m]
                        blocks.append(Block(live[m], start, start + len(rows), widths[m]))
                        for j in np.unique(owner):
                            where = np.flatnonzero(owner == j)
                            groups.append(Group(int(first[live[m]] + j), start + int(where[0]),
                                                start + int(where[-1]) + 1))
                            tokens[groups[-1].adapter] += int(store.lengths[rows[where]].sum())
                        start += len(rows)
                    batch = store.batch(np.concatenate([drawn[m][0] for m in members]))
                    bank.set_layout(groups, blocks)
                with phase("forward"):
                    per_group = group_losses(model.logits(**batch.model_inputs()), batch, groups)
                with phase("backward"):
                    torch.stack(per_group).sum().backward()
                for grp, loss in zip(groups, per_group):
                    losses[grp.adapter].append(loss.detach())
                    active[grp.adapter] = True
            with phase("optimizer"):
                add_proximal_grad(prox, bank, active)
                opt.step(active)
                opt.zero_grad()
            on_step(len(live))
    states = bank.states()
    return [[(states[g], torch.stack(losses[g]).tolist() if losses[g] else [], tokens[g])
             for g in range(first[i], first[i + 1])] for i in range(len(routes))]


def train_all_routed(model: AdapterModel, store: TokenStore, jobs: list[Job], starts: dict, cfg: TrainConfig,
                     seed: int, round_: int, on_step: OnStep = _no_progress
                     ) -> dict[tuple[int, str], tuple[dict[str, torch.Tensor], list[float], int]]:
    """Every job of ``jobs`` trained in the routed layout (:func:`train_routes_together`), clients whole, in
    banks of up to ``cfg.adapters_per_pass`` adapters (a client with more gets a bank of its own); keyed by
    (client, key). ``starts``: per (client, key)."""
    out, chunk, size = {}, [], 0
    routes = plan_routes(jobs)
    for i, route in enumerate(routes):
        chunk.append(route)
        size += len(route.jobs)
        nxt = len(routes[i + 1].jobs) if i + 1 < len(routes) else None
        if nxt is None or size + nxt > cfg.adapters_per_pass:
            results = train_routes_together(model, [[starts[(j.client, j.key)] for j in r.jobs] for r in chunk],
                                            store, chunk, cfg, [route_seed(seed, round_, r) for r in chunk],
                                            cfg.pass_tokens, on_step)
            for r, per_job in zip(chunk, results):
                out.update({(j.client, j.key): res for j, res in zip(r.jobs, per_job)})
            chunk, size = [], 0
    return out


def train_fast_path(model: AdapterModel, store: TokenStore, jobs: list[Job], starts: dict, cfg: TrainConfig,
                    seed: int, round_: int, on_step: OnStep = _no_progress
                    ) -> dict[tuple[int, str], tuple[dict[str, torch.Tensor], list[float], int]]:
    """A round's jobs trained in shared backbone passes, in the layout ``cfg.batching`` names: routed
    (:func:`train_all_routed`) or per adapter (:func:`train_all_together`); keyed by (client, key)."""
    if cfg.batching == "routed":
        return train_all_routed(model, store, jobs, starts, cfg, seed, round_, on_step)
    return train_all_together(model, store, jobs, starts, cfg,
                              {(j.client, j.key): job_seed(seed, round_, j.client, j.key) for j in jobs}, on_step)
