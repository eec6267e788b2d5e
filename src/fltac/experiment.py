"""Everything a run needs before its first round, built once from a RunConfig and shared by every engine.

Order: tasks -> label space -> partition (pure numpy, no model) -> backbone + LoRA -> tokenised rows
-> client jobs -> strategy -> evaluator. :func:`build_partition` is the very function ``fltac partition``
prints, so the table a user inspects is the split ``fltac run`` trains on.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fltac.client.train import Job, plan_jobs
from fltac.config import RunConfig
from fltac.data import LabelSpace, Task, load_tasks
from fltac.data.batches import TokenStore, build_store, eval_rows
from fltac.data.partition import partition_all
from fltac.eval.evaluate import Evaluator
from fltac.models.adapters import AdapterModel
from fltac.models.backbone import choose_attention, choose_dtype, default_device, load_backbone, set_threads
from fltac.server.strategies import Strategy, make_strategy


def build_partition(cfg: RunConfig, tasks: list[Task]) -> list[list[np.ndarray]]:
    """``parts[t][k]``: task-local training rows of task ``t`` held by client ``k``."""
    p = cfg.partition
    return partition_all([len(t.train_texts) for t in tasks], p.n_clients, p.alpha, p.min_frac, cfg.seed)


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


def build_experiment(cfg: RunConfig, tasks: list[Task] | None = None) -> Experiment:
    tasks = tasks if tasks is not None else load_tasks(cfg.data)
    space = LabelSpace.of(tasks)
    parts = build_partition(cfg, tasks)
    threads = set_threads(cfg.num_threads)
    device = default_device()
    dtype, dtype_note = choose_dtype(cfg.dtype, device)
    attn = choose_attention(cfg.attn_implementation, dtype, device)
    base, tokenizer = load_backbone(cfg.model_name, space.n_outputs, dtype, attn, cfg.seed, cfg.backbone_dropout)
    torch.manual_seed(cfg.seed)
    model = AdapterModel(base, cfg.lora, cfg.rank, device)
    initial = model.state()

    train_store, train_index = build_store(tokenizer, tasks, space, cfg.data.max_length, "train")
    client_rows = [[train_index[t][parts[t][k]] for t in range(len(tasks))] for k in range(cfg.partition.n_clients)]
    jobs = plan_jobs(cfg.method, client_rows, cfg.train.local_steps)

    sample = [eval_rows(len(t.test_texts), cfg.eval.eval_size, cfg.seed + i) for i, t in enumerate(tasks)]
    test_store, test_index = build_store(tokenizer, tasks, space, cfg.data.max_length, "test", sample)
    evaluator = Evaluator(model, test_store, test_index, cfg.eval.batch_size)

    strategy = make_strategy(cfg, initial, len(tasks), model.lora_keys)
    return Experiment(cfg, tasks, space, parts, model, train_store, jobs, strategy, evaluator, dtype_note, attn,
                      threads)
