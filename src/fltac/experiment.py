"""Everything a run needs before its first round, built once from a RunConfig and shared by every engine.

Order: tasks -> label space -> partition (pure numpy, no model) -> backbone + LoRA -> tokenised rows
-> client jobs -> strategy -> evaluator. :func:`build_partition` is the very function ``fltac partition``
prints, so the table a user inspects is the split ``fltac run`` trains on.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fltac.client.train import Job, plan_jobs
from fltac.config import RunConfig
from fltac.data import LabelSpace, Task, load_tasks, modality_of
from fltac.data.batches import TokenStore, build_store, eval_rows
from fltac.data.partition import owner_clients, partition_all, partition_all_label_skew, partition_by_owner
from fltac.eval.evaluate import Evaluator
from fltac.methods import method_of
from fltac.models.adapters import AdapterModel
from fltac.models.staged import StagedModel
from fltac.models.backbone import choose_attention, choose_dtype, default_device, load_backbone, set_threads
from fltac.server.strategies import Strategy, make_strategy


def build_partition(cfg: RunConfig, tasks: list[Task]) -> list[list[np.ndarray]]:
    """``parts[t][k]``: task-local training rows of task ``t`` held by client ``k``.

    Dirichlet per task, except tasks that name their rows' owners (``client_column``), which follow them.
    """
    p = cfg.partition
    if p.kind == "label_skew":  # Dir(alpha) per class of each task (HAFL's 20 Newsgroups scenario)
        parts = partition_all_label_skew([t.train_labels for t in tasks], p.n_clients, p.alpha, p.min_frac, cfg.seed)
    else:
        parts = partition_all([len(t.train_texts) for t in tasks], p.n_clients, p.alpha, p.min_frac, cfg.seed,
                              iid=p.kind == "iid")
    client_of = owner_clients([t.train_owners for t in tasks], [t.name for t in tasks], p.n_clients)
    for i, task in enumerate(tasks):
        if task.train_owners is not None:
            parts[i] = partition_by_owner(task.train_owners, client_of, p.n_clients)
    return parts


@dataclass
class Experiment:
    cfg: RunConfig
    tasks: list[Task]
    space: LabelSpace
    parts: list[list[np.ndarray]]
    model: AdapterModel
    train_store: TokenStore
    jobs: list[Job]
    strategy: Strategy
    evaluator: Evaluator
    dtype_note: str
    attn: str
    threads: int

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    def task_started(self, t: int, round_: int) -> bool:
        """Whether task ``t`` is trained in ``round_`` (``data.task_start_round``; unnamed tasks from round 1)."""
        return self.cfg.data.task_start_round.get(self.tasks[t].name, 1) <= round_

    def active_jobs(self, round_: int) -> list[Job]:
        """The jobs of ``round_``: those whose tasks have all started (every job, without late tasks)."""
        return [j for j in self.jobs if all(self.task_started(t, round_) for t in j.tasks)]


def build_model(cfg: RunConfig, space: LabelSpace):
    """(model, initial state, tokenizer, dtype note, attention kernel, threads): the backbone with its adapter,
    built the same way wherever it runs (the in-process engine, a Flower SuperNode), so every copy is identical."""
    threads = set_threads(cfg.num_threads)
    device = default_device()
    dtype, dtype_note = choose_dtype(cfg.dtype, device)
    trains_backbone = method_of(cfg.method).trains_backbone
    if trains_backbone:  # the backbone itself is trained: fp32 masters (docs/safedlora.md)
        dtype, dtype_note = torch.float32, f"float32 (method {cfg.method} trains the backbone; {dtype_note})"
    attn = choose_attention(cfg.attn_implementation, dtype, device)
    causal_lm = modality_of(cfg.data) == "causal_lm"
    if causal_lm:  # LoRA only (no head); a packaged GGUF is dequantised once into data.cache_dir
        from fltac.models.causal_lm import load_causal_lm

        base, tokenizer = load_causal_lm(cfg.model_name, dtype, attn, cfg.seed, cfg.backbone_dropout,
                                         cfg.data.cache_dir, device, cfg.data.scenario)
    elif modality_of(cfg.data) == "image":  # the 'tokenizer' of an image run is its ImageSpec (size, mean, std)
        from fltac.models.vit import load_image_backbone

        base, tokenizer = load_image_backbone(cfg.model_name, cfg.data.cache_dir, space.n_outputs, dtype, attn,
                                              cfg.seed, cfg.backbone_dropout, cfg.data.scenario)
    else:
        base, tokenizer = load_backbone(cfg.model_name, space.n_outputs, dtype, attn, cfg.seed, cfg.backbone_dropout)
    torch.manual_seed(cfg.seed)
    if trains_backbone:
        model = StagedModel(base, device, cfg.rank or None, cfg.lora.alpha, cfg.lora.dropout,
                            tuple(cfg.lora.target_modules), cfg.train.backbone_lr)
        initial = model.everything()  # the strategy takes its stage-1 state and its adapter from this
    else:
        model = AdapterModel(base, cfg.lora, cfg.rank, device, task_type="CAUSAL_LM" if causal_lm else "SEQ_CLS")
        initial = model.state()
    return model, initial, tokenizer, dtype_note, attn, threads


def build_rows(cfg: RunConfig, tokenizer, tasks: list[Task], space: LabelSpace, split: str,
               rows_per_task: list[np.ndarray] | None = None):
    """(store, store rows per task) of ``split`` for the run's modality: tokenised texts, or images
    (``tokenizer`` is then the backbone's ImageSpec)."""
    if modality_of(cfg.data) == "image":
        from fltac.data.vision import build_image_store

        return build_image_store(tokenizer, tasks, space, split, rows_per_task)
    if modality_of(cfg.data) == "causal_lm":
        from fltac.data.chat import build_lm_store

        return build_lm_store(tokenizer, tasks, cfg.data.max_length, split, rows_per_task)
    return build_store(tokenizer, tasks, space, cfg.data.max_length, split, rows_per_task, token_cache_folder(cfg))


def token_cache_folder(cfg: RunConfig) -> Path | None:
    """Where tokenised texts are cached (``data.token_cache``), or None."""
    from fltac.data.vision import cache_root

    return cache_root(cfg.data.cache_dir) / "tokens" if cfg.data.token_cache else None


def build_experiment(cfg: RunConfig, tasks: list[Task] | None = None) -> Experiment:
    tasks = tasks if tasks is not None else load_tasks(cfg.data)
    space = LabelSpace.of(tasks)
    parts = build_partition(cfg, tasks)
    model, initial, tokenizer, dtype_note, attn, threads = build_model(cfg, space)

    train_store, train_index = build_rows(cfg, tokenizer, tasks, space, "train")
    client_rows = [[train_index[t][parts[t][k]] for t in range(len(tasks))] for k in range(cfg.partition.n_clients)]
    jobs = plan_jobs(cfg.method, client_rows, cfg.train.local_steps)

    sample = [eval_rows(len(t.test_texts), cfg.eval.eval_size, cfg.seed + i) for i, t in enumerate(tasks)]
    test_store, test_index = build_rows(cfg, tokenizer, tasks, space, "test", sample)
    if modality_of(cfg.data) == "causal_lm":  # token-weighted LM loss, and judged generations at the last round
        from fltac.eval.lm_eval import lm_evaluator

        evaluator = lm_evaluator(cfg, model, tokenizer, test_store, test_index)
    else:
        evaluator = Evaluator(model, test_store, test_index, cfg.eval.batch_size)

    strategy = make_strategy(cfg, initial, len(tasks), model.lora_keys)
    return Experiment(cfg, tasks, space, parts, model, train_store, jobs, strategy, evaluator, dtype_note, attn,
                      threads)


@dataclass
class ClientSide:
    """What one client (a Flower SuperNode) builds for itself: its own jobs, its own tokenised rows, the model."""

    cfg: RunConfig
    client: int
    tasks: list[Task]
    model: AdapterModel
    tokenizer: object
    train_store: TokenStore
    jobs: list[Job]

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]


def build_client(cfg: RunConfig, client: int, shared: tuple | None = None,
                 tasks: list[Task] | None = None) -> ClientSide:
    """The client ``client``'s side of the run, built from the config alone (no server, no other client's rows).

    Every node reads the task descriptions (the partition needs each task's size, labels and owners, and
    is a pure function of them and the seed), then tokenises only its own rows. Its store holds them in the
    order :func:`build_experiment` has them, so its batches are exactly those of the in-process run.
    ``shared``: the (model, tokenizer) of another client of the same run in this process, reused (clients
    share the frozen backbone, as in the in-process engine; each job loads its own start adapter); ``tasks``:
    the run's tasks, when already loaded in this process.
    """
    tasks = tasks if tasks is not None else load_tasks(cfg.data)
    space = LabelSpace.of(tasks)
    parts = build_partition(cfg, tasks)
    if shared is None:
        model, _, tokenizer, _, _, _ = build_model(cfg, space)
    else:
        model, tokenizer = shared
    own = [parts[t][client] for t in range(len(tasks))]
    store, index = build_rows(cfg, tokenizer, tasks, space, "train", own)
    empty = [np.zeros(0, dtype=np.int64)] * len(tasks)
    rows = [index if k == client else empty for k in range(cfg.partition.n_clients)]
    jobs = [j for j in plan_jobs(cfg.method, rows, cfg.train.local_steps) if j.client == client]
    return ClientSide(cfg, client, tasks, model, tokenizer, store, jobs)
