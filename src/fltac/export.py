"""Export a run's global adapters in peft's own format, and predict with one (``fltac export``, ``fltac predict``).

One folder per global adapter: per task for FL-TAC and centralized (the slot that serves the task, as
the run's evaluation chose it), one folder named ``fedit`` for FedIT. Each holds what
``PeftModel.save_pretrained`` would write for the same model, plus ``labels.json``:

- ``adapter_model.safetensors``: ``base_model.model.<adapter-state key>``, e.g.
  ``base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight``; the classification head
  as peft saves a ``modules_to_save`` module: ``base_model.model.classifier.weight`` (and ``.bias``);
- ``adapter_config.json``: peft's ``LoraConfig(task_type="SEQ_CLS", ...)`` with the resolved backbone path;
- ``labels.json``: ``num_labels`` (every task's outputs: the head is shared, so the backbone must be
  built with this many), ``max_length``, per task its ``offset`` and ``labels``, and ``id2label``
  (global output index -> ``"task/label"``, for this folder's tasks only). A task's prediction is the
  argmax over its own slice ``[offset, offset + len(labels))``, as fltac's evaluation scores it.

Loading needs no fltac::

    labels = json.load(open(f"{folder}/labels.json"))
    base = AutoModelForSequenceClassification.from_pretrained(labels["backbone"], num_labels=labels["num_labels"])
    model = PeftModel.from_pretrained(base, folder)
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from fltac import io
from fltac.config import ConfigError, RunConfig, from_dict
from fltac.models.adapters import PEFT_PREFIX
from fltac.models.backbone import resolve_model_path

LABELS = "labels.json"
#: Module names peft's sequence-classification wrapper adds to ``modules_to_save`` (the head).
PEFT_HEAD_MODULES = ["classifier", "score"]


class ExportError(ConfigError):
    """A run folder that cannot be exported, or an export folder that cannot be used; says which and why."""


# ---- reading a run ---------------------------------------------------------------------------------

def run_rounds(run_dir: Path) -> list[int]:
    """Rounds whose global adapters were saved (``adapters/round_<t>.safetensors``), ascending."""
    return sorted(int(p.stem.split("_")[1]) for p in (run_dir / "adapters").glob("round_*.safetensors"))


def read_run_config(run_dir: Path) -> RunConfig:
    path = run_dir / "config.json"
    if not path.is_file():
        raise ExportError(f"{run_dir} is not a run folder: it has no config.json")
    try:
        return from_dict(io.read_json(path, keys=()))
    except ConfigError as exc:
        raise ExportError(f"{path}: {exc}") from None


def check_run_files(run_dir: Path) -> None:
    """The files an export reads must have the SHA-256 the run's last checkpoint recorded (when it has one)."""
    from fltac.engines.inprocess import recorded_line_counts

    pointer = run_dir / "checkpoint" / "latest.json"
    if pointer.is_file():
        meta = io.read_json(pointer, keys=())
        io.check_recorded_files(run_dir, meta.get("files", {}), recorded_line_counts(meta), pointer)


def read_tasks(run_dir: Path, cfg: RunConfig) -> list[dict]:
    """Per task ``{name, offset, labels}``: from the run's ``tasks.json``, else by loading the data again."""
    path = run_dir / "tasks.json"
    if path.is_file():
        return io.read_json(path)
    from fltac.data import LabelSpace, load_tasks

    tasks = load_tasks(cfg.data)
    space = LabelSpace.of(tasks)
    return [{"name": t.name, "offset": space.offsets[i], "labels": t.labels} for i, t in enumerate(tasks)]


def read_slots(run_dir: Path, round_: int) -> dict[int, dict[str, torch.Tensor]]:
    """``{slot: adapter state}`` saved after ``round_`` (other strategy state in the file, e.g. HAFL's
    global scores under ``hafl/``, is not an adapter and is skipped)."""
    slots: dict[int, dict[str, torch.Tensor]] = defaultdict(dict)
    for name, tensor in io.load_tensors(run_dir / "adapters" / f"round_{round_}.safetensors").items():
        slot, key = name.split("/", 1)
        if not slot.startswith("slot"):
            continue
        slots[int(slot.removeprefix("slot"))][key] = tensor
    return dict(slots)


def serving_slots(run_dir: Path, cfg: RunConfig, task_names: list[str], round_: int) -> dict[str, int]:
    """Per task, the slot that serves it after ``round_``.

    The slot the run's evaluation of ``round_`` used (metrics.jsonl); for a round that was not evaluated,
    recomputed the same way: the slot holding most of the task's training samples, by the latest cluster
    assignment of every (client, adapter) up to that round.
    """
    if cfg.method == "fedit":
        return {name: 0 for name in task_names}
    if cfg.method == "centralized":
        return {name: i for i, name in enumerate(task_names)}
    evals = [m for m in io.read_jsonl(run_dir / "metrics.jsonl") if m.get("phase") == "eval" and m["round"] == round_]
    if evals:
        return {m["task"]: int(m["slot"]) for m in evals}
    return slots_from_assignments(run_dir, task_names, round_)


def slots_from_assignments(run_dir: Path, task_names: list[str], round_: int) -> dict[str, int]:
    """FL-TAC: per task, the slot holding most of its samples by the latest assignments up to ``round_``
    (what the engine's ``served_slots`` computes), read from cluster_assignments.jsonl."""
    latest: dict[tuple[int, str], dict] = {}
    for rec in io.read_jsonl(run_dir / "cluster_assignments.jsonl"):
        if rec["round"] <= round_:
            latest.update({(a["client"], a["key"]): a for a in rec["assignments"]})
    weight: dict[str, dict[int, float]] = defaultdict(lambda: defaultdict(float))
    for a in latest.values():
        weight[a["task"]][a["cluster"]] += a["n"]
    return {name: max(sorted(weight[name]), key=weight[name].get) if weight[name] else 0 for name in task_names}


# ---- writing ---------------------------------------------------------------------------------------

def backbone_path(model_name: str) -> str:
    path = resolve_model_path(model_name)
    return str(Path(path).resolve()) if Path(path).exists() else path


def peft_config(cfg: RunConfig, base: str):
    """The peft LoraConfig fltac trained with (as :class:`fltac.models.adapters.AdapterModel` builds it)."""
    from peft import LoraConfig as PeftLoraConfig

    return PeftLoraConfig(task_type="SEQ_CLS", r=cfg.rank, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                          target_modules=list(cfg.lora.target_modules), modules_to_save=list(PEFT_HEAD_MODULES),
                          base_model_name_or_path=base, inference_mode=True)


def write_adapter(folder: Path, state: dict[str, torch.Tensor], cfg: RunConfig, labels: dict) -> None:
    """One peft adapter folder: ``adapter_model.safetensors``, ``adapter_config.json``, ``labels.json``."""
    folder.mkdir(parents=True, exist_ok=True)
    io.save_tensors(folder / "adapter_model.safetensors", {PEFT_PREFIX + k: v for k, v in sorted(state.items())})
    peft_config(cfg, labels["backbone"]).save_pretrained(str(folder))
    io.write_json(folder / LABELS, labels)


def export_run(run_dir: str | Path, out: str | Path, round_: int | None = None) -> dict[str, Path]:
    """Write the global adapters of ``run_dir`` after ``round_`` (default: the last saved) under ``out``.

    Returns ``{folder name: path}``: one per task (FL-TAC, centralized) or ``{"fedit": ...}``.
    """
    run_dir, out = Path(run_dir), Path(out)
    problem = io.folder_problem(out)
    if problem:
        raise ExportError(f"--out {problem}")
    cfg = read_run_config(run_dir)
    check_run_files(run_dir)
    if cfg.method in ("safedlora", "fedavg_full"):  # a trained backbone / an SVD adapter: not a peft LoRA folder
        raise ExportError(f"{run_dir} is a {cfg.method} run: export writes peft LoRA adapters and does not support "
                          f"it yet; its global model is in {run_dir / 'checkpoint'} (see the README, SA-FedLoRA)")
    rounds = run_rounds(run_dir)
    if not rounds:
        raise ExportError(f"{run_dir} holds no adapters/round_<t>.safetensors: has the run finished a round?")
    round_ = rounds[-1] if round_ is None else round_
    if round_ not in rounds:
        raise ExportError(f"{run_dir} has no adapters for round {round_} (saved rounds: {rounds})")
    tasks = read_tasks(run_dir, cfg)
    names = [t["name"] for t in tasks]
    slots = read_slots(run_dir, round_)
    served = serving_slots(run_dir, cfg, names, round_)
    n_outputs = sum(len(t["labels"]) for t in tasks)
    base = backbone_path(cfg.model_name)
    groups = {"fedit": tasks} if cfg.method == "fedit" else {t["name"]: [t] for t in tasks}
    written = {}
    for folder_name, members in groups.items():
        slot = served[members[0]["name"]]
        labels = {"backbone": base, "num_labels": n_outputs, "max_length": cfg.data.max_length,
                  "method": cfg.method, "run": str(run_dir.resolve()), "round": round_, "slot": slot,
                  "tasks": [{"name": t["name"], "offset": t["offset"], "labels": t["labels"]} for t in members],
                  "id2label": {str(t["offset"] + j): f"{t['name']}/{label}" for t in members
                               for j, label in enumerate(t["labels"])}}
        write_adapter(out / folder_name, slots[slot], cfg, labels)
        written[folder_name] = out / folder_name
    return written


# ---- using an export ---------------------------------------------------------------------------------

def load_exported(folder: str | Path, backbone: str | None = None, dtype: torch.dtype = torch.float32):
    """(peft model in eval mode, tokenizer, labels.json) of an exported adapter folder."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    folder = Path(folder)
    if not (folder / LABELS).is_file() or not (folder / "adapter_config.json").is_file():
        raise ExportError(f"{folder} is not an exported adapter folder (no {LABELS} or adapter_config.json); "
                          f"make one with: fltac export RUN_DIR --out DIR")
    labels = io.read_json(folder / LABELS, keys=("backbone", "num_labels", "max_length", "tasks"))
    io.read_json(folder / "adapter_config.json", keys=("peft_type",))  # peft's own reader gives no file name
    io.load_tensors(folder / "adapter_model.safetensors")  # a truncated file: one line naming it
    path = backbone or labels["backbone"]
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        base = AutoModelForSequenceClassification.from_pretrained(path, num_labels=labels["num_labels"], dtype=dtype)
    except OSError as exc:
        raise ExportError(f"cannot load the backbone '{path}' named in {folder / LABELS}: "
                          f"{str(exc).splitlines()[0]} (pass --model to point at it)") from None
    with warnings.catch_warnings():  # peft 0.21 calls a transformers method deprecated in 5.x
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        model = PeftModel.from_pretrained(base, str(folder)).eval()
    return model, tokenizer, labels


@torch.inference_mode()
def predict(folder: str | Path, texts: list[str], task: str | None = None, backbone: str | None = None) -> list[dict]:
    """Per text ``{task: label}``: the argmax over each task's own output slice (only ``task`` if given)."""
    served = io.read_json(Path(folder) / LABELS, keys=("tasks",))["tasks"] if (Path(folder) / LABELS).is_file() else []
    tasks = [t for t in served if task is None or t["name"] == task]
    if served and not tasks:
        raise ExportError(f"task '{task}' is not served by {folder} (it serves {[t['name'] for t in served]})")
    model, tokenizer, labels = load_exported(folder, backbone)
    tasks = [t for t in labels["tasks"] if task is None or t["name"] == task]
    enc = tokenizer(texts, truncation=True, max_length=labels["max_length"], padding=True, return_tensors="pt")
    logits = model(**enc).logits.float().numpy()
    out = []
    for row in logits:
        out.append({t["name"]: t["labels"][int(np.argmax(row[t["offset"]: t["offset"] + len(t["labels"])]))]
                    for t in tasks})
    return out
