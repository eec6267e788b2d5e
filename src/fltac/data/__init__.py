"""Data: tasks and their label space, the Dirichlet partition over clients, tokenised batches."""

from __future__ import annotations

import numpy as np

from fltac.config import ConfigError, DataConfig
from fltac.data.tasks import LabelSpace, Task
from fltac.data.chat import CHAT_OFFLINE, GenerationTask
from fltac.data.text5 import TEXT5, TEXT7
from fltac.data.vision import VISION_OFFLINE

#: Scenario name -> {task name -> loader(test_fraction, split_seed)}, in the scenario's stable task order.
SCENARIOS = {"text5": TEXT5, "text7": TEXT7, "vision_offline": VISION_OFFLINE, "chat_offline": CHAT_OFFLINE}
#: What a scenario's rows are, where not text: "image" rows go to an image-classification backbone
#: through fltac.data.vision.ImageStore; "causal_lm" (prompt, response) pairs to a causal LM through
#: fltac.data.chat.LMStore; every other scenario (text5, glue, custom) is "text".
MODALITY = {"vision_offline": "image", "cifar": "image", "chat_offline": "causal_lm", "dolly": "causal_lm"}


def modality_of(cfg: DataConfig) -> str:
    """"text", "image" or "causal_lm" (see :data:`MODALITY`): which backbone and which store the run builds."""
    return MODALITY.get(cfg.scenario, "text")


def load_tasks(cfg: DataConfig) -> list[Task]:
    """The scenario's tasks, in config order (which fixes label offsets and partition seeds)."""
    if cfg.scenario == "custom":  # tasks defined in the config: see fltac.data.custom
        from fltac.data.custom import custom_loaders

        loaders = custom_loaders(cfg.custom_tasks)
    elif cfg.scenario == "glue":  # the paper's GLUE tasks, from the hub or a local copy (data.source)
        from fltac.data.glue import glue_loaders

        loaders = glue_loaders(cfg.source)
    elif cfg.scenario == "cifar":  # CIFAR-10/100 from the hub or a local copy (data.source); images cached
        from fltac.data.vision import cifar_loaders

        loaders = cifar_loaders(cfg.source, cfg.cache_dir)
    elif cfg.scenario == "dolly":  # Databricks-Dolly-15k by category, from the hub or a local copy (data.source)
        from fltac.data.chat import dolly_loaders

        loaders = dolly_loaders(cfg.source)
    elif cfg.scenario not in SCENARIOS:
        raise ConfigError(f"config key 'data.scenario': unknown scenario '{cfg.scenario}' "
                          f"(known: {sorted(SCENARIOS) + ['cifar', 'custom', 'dolly', 'glue']})")
    else:
        loaders = SCENARIOS[cfg.scenario]
    names = cfg.tasks or list(loaders)
    unknown = [n for n in names if n not in loaders]
    if unknown:
        raise ConfigError(f"config key 'data.tasks': unknown task(s) {unknown} in scenario '{cfg.scenario}' "
                          f"(known: {list(loaders)})")
    late = sorted(set(cfg.task_start_round) - set(names))
    if late:
        raise ConfigError(f"config key 'data.task_start_round' names task(s) {late} that the run does not have "
                          f"(its tasks: {names})")
    tasks = [loaders[n](cfg.test_fraction, cfg.split_seed) for n in names]
    if cfg.max_train_per_task:
        tasks = [cap_train(t, cfg.max_train_per_task, cfg.split_seed) for t in tasks]
    return tasks


def cap_train(task: Task, limit: int, seed: int) -> Task:
    """``task`` with at most ``limit`` training examples, a seeded sample (order kept)."""
    if len(task.train_texts) <= limit:
        return task
    keep = np.sort(np.random.default_rng(seed).choice(len(task.train_texts), size=limit, replace=False))
    if isinstance(task, GenerationTask):
        return task.take_train(keep)
    owners = None if task.train_owners is None else [task.train_owners[i] for i in keep]
    kept = task.train_texts[keep] if isinstance(task.train_texts, np.ndarray) else [task.train_texts[i] for i in keep]
    return Task(task.name, task.labels, kept, task.train_labels[keep],
                task.test_texts, task.test_labels, owners)


__all__ = ["LabelSpace", "Task", "load_tasks", "cap_train", "modality_of", "SCENARIOS", "MODALITY"]
