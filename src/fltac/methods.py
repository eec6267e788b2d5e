"""The method registry: every fact about a method that code outside its strategy needs, in one record.

A method is a server strategy (what clients are sent, how their adapters are merged; built by the
record's ``strategy`` factory) plus a *job layout* (which adapters each client trains):

- ``per_task``: one adapter per task the client holds, ``local_steps`` steps each (FL-TAC);
- ``shared``: one adapter over all the client's tasks mixed, ``local_steps x n_tasks`` steps, the same
  total as ``per_task`` gives that client (FedIT's layout);
- ``pooled``: not federated: one client holding all data, one adapter per task with ``local_steps x
  (clients holding the task)`` steps, the same total per task as the federated runs. Its adapter
  :func:`~fltac.wire.job_key` ``(t)`` trains task ``t`` and slot ``t`` serves it (:func:`pooled_slots`).

Engines, the client planner, export and config validation read these records; none of them branches on
a method's name. No torch here (the config imports this module); factories are imported when called.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Literal

from fltac.wire import job_key

Layout = Literal["per_task", "shared", "pooled"]
ENGINES = ("inprocess", "flower")


@dataclass(frozen=True)
class Method:
    name: str
    summary: str               # one line, for the config's help text
    layout: Layout             # how a client's jobs are laid out (module docstring)
    strategy: str              # "module:function", the factory (cfg, initial, n_tasks, lora_keys) -> Strategy
    default_rank: int | None   # LoRA rank when lora.rank is null; None: the method takes no lora.rank
    trains_backbone: bool = False   # the backbone itself is trained (fp32 masters, a staged model)
    client_hooks: bool = False      # its broadcasts carry hook settings (checked by tests/test_contract.py)
    export: Literal["per_task", "one"] | None = "per_task"  # peft folders: one per task, one in all, or none
    server_optimizer: bool = True   # slots merged per slot (Strategy._merge), so server.optimizer applies
    proximal: bool = True           # train.prox_mu applies: its clients train tensors the broadcast holds as sent
    private: bool = False           # privacy.mode applies: whole plain-LoRA uploads, merged per slot (fltac.privacy)
    client_ranks: bool = False      # clients train at their own ranks r_k <= R (section hafl)
    hafl_rule: tuple[str, str] | None = None  # (hafl.mode, aggregation) the method fixes; None: section hafl's
    rank_headroom: int = 0          # components of R kept beside the largest r_k (FLoRA's residual)
    clusters: bool = False          # the server clusters the submissions (server.n_clusters: auto applies)
    engines: tuple[str, ...] = ENGINES
    engine_note: str = ""      # why an engine is missing from ``engines``
    #: Flower's SecAgg+ applies (``secure_aggregation``): the merge is one sample-weighted mean of all submissions,
    #: so the server needs only their sum. Else ``secagg_note`` says what of each client the server must see.
    secure_aggregation: bool = False
    secagg_note: str = ""

    def make_strategy(self, cfg, initial, n_tasks: int, lora_keys: list[str]):
        """The method's strategy for a run (imported now: the registry itself loads no torch)."""
        module, _, function = self.strategy.partition(":")
        return getattr(importlib.import_module(module), function)(cfg, initial, n_tasks, lora_keys)

    def engine_problem(self, engine: str) -> str | None:
        """Why this method cannot run on ``engine``, or None when it can."""
        if engine in self.engines:
            return None
        return f"method '{self.name}' {self.engine_note}: run it with --engine {self.engines[0]}"

    def secagg_problem(self) -> str | None:
        """Why Flower's SecAgg+ (which shows the server only the clients' sum) cannot serve this method, or None."""
        if self.secure_aggregation:
            return None
        return f"method {self.name} {self.secagg_note}; SecAgg+ shows the server only the clients' sum"


_PER_CLIENT_MERGE = "merges each client's adapter at its own rank r_k by a per-client rule, not one weighted sum"
_RECORDS = (
    Method("fltac", "one adapter per (client, task), K-means + FedAvg per cluster.", "per_task",
           "fltac.server.strategies:make_fltac", default_rank=4, private=True, clusters=True,
           secagg_note="must see each client's adapters to cluster them by task"),
    Method("fedit", "one shared adapter per client, FedAvg.", "shared",
           "fltac.server.strategies:make_fedavg", default_rank=16, export="one", private=True,
           secure_aggregation=True),
    Method("centralized", "pooled data, one adapter per task (upper bound).", "pooled",
           "fltac.server.strategies:make_centralized", default_rank=4, engines=("inprocess",),
           engine_note="pools all data in one process",
           secagg_note="pools all data in one place: there is no client to hide"),
    Method("hafl", "one adapter per client at its own rank r_k <= R, importance-based truncation or freezing, "
           "rank-1 aggregation (section hafl).", "shared", "fltac.server.hafl:make_hafl", default_rank=8,
           client_hooks=True, server_optimizer=False, client_ranks=True, secagg_note=_PER_CLIENT_MERGE),
    Method("hetlora", "the baseline, first r_k components + zero-padded averaging.", "shared",
           "fltac.server.hafl:make_hetlora", default_rank=8, client_hooks=True,
           server_optimizer=False, client_ranks=True, hafl_rule=("truncate", "zero_pad"),
           secagg_note=_PER_CLIENT_MERGE),
    Method("flexlora", "FlexLoRA, the mean of the products B_k A_k, sent back to client k as its rank-r_k "
           "truncated SVD (section hafl).", "shared", "fltac.server.hetero:make_flexlora", default_rank=8,
           client_hooks=True, server_optimizer=False, client_ranks=True, hafl_rule=("truncate", "svd"),
           secagg_note=_PER_CLIENT_MERGE),
    Method("flora", "FLoRA, stacked (exact) aggregation of the products into a frozen residual; each client "
           "trains a fresh rank-r_k LoRA on it every round (section hafl).", "shared",
           "fltac.server.hetero:make_flora", default_rank=16, client_hooks=True, server_optimizer=False,
           client_ranks=True, hafl_rule=("freeze", "stack"), rank_headroom=1, secagg_note=_PER_CLIENT_MERGE),
    Method("safedlora", "SA-FedLoRA, an initiating stage then an annealed SVD adapter (section safedlora).",
           "shared", "fltac.server.safedlora:make_safedlora", default_rank=None, trains_backbone=True,
           client_hooks=True, export=None, server_optimizer=False, proximal=False,
           secagg_note="reads each client's importance scores to anneal its rank"),
    Method("fedavg_full", "FedAvg of full fine-tuning (fp32 backbone).", "shared",
           "fltac.server.safedlora:make_fedavg_full", default_rank=None, trains_backbone=True, export=None,
           server_optimizer=False, secagg_note="is not wired to SecAgg+ (its strategy has no mean-only merge)"),
)
#: Every method, by name, in the order the docs list them.
METHODS: dict[str, Method] = {m.name: m for m in _RECORDS}
METHOD_NAMES = tuple(METHODS)


def method_of(name: str) -> Method:
    """The record of method ``name``; a clear error for an unknown one."""
    if name not in METHODS:
        raise ValueError(f"unknown method '{name}' (known: {', '.join(METHOD_NAMES)})")
    return METHODS[name]


def pooled_slots(n_tasks: int) -> dict[str, int]:
    """The pooled layout's key table: the pooled client's adapter ``job_key(t)`` trains task ``t``, served by slot ``t``."""
    return {job_key(t): t for t in range(n_tasks)}
