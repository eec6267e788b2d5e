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

- ``README.md``: what the folder is, and a runnable snippet (:data:`PEFT_SNIPPET`) that loads it and
  predicts with peft and transformers alone, no fltac.
"""

from __future__ import annotations

import json
import warnings
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from fltac import io
from fltac.config import ConfigError, RunConfig, from_dict
from fltac.methods import method_of, pooled_slots
from fltac.models.adapters import PEFT_PREFIX
from fltac.models.backbone import resolve_model_path
from fltac.wire import job_key

LABELS = "labels.json"
USAGE = "README.md"
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
    layout = method_of(cfg.method).layout
    if layout == "shared":  # one global adapter serves every task
        return {name: 0 for name in task_names}
    if layout == "pooled":
        slot_of = pooled_slots(len(task_names))
        return {name: slot_of[job_key(i)] for i, name in enumerate(task_names)}
    evals = [m for m in io.read_jsonl(run_dir / "metrics.jsonl") if m.get("phase") == "eval" and m["round"] == round_]
    if evals:  # a task that had not started by then (data.task_start_round) has no slot, and is left out
        return {m["task"]: int(m["slot"]) for m in evals if m["slot"] is not None}
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


#: Loads an exported folder and predicts with peft and transformers alone (written into each folder's README.md,
#: run by tests/test_export.py on a text longer than the backbone's positions).
PEFT_SNIPPET = """\
import json

import torch
import transformers
from peft import PeftModel
from transformers import AutoModelForSequenceClassification, AutoTokenizer

folder = FOLDER
texts = ["Shares fell sharply after the bank's results"]
labels = json.load(open(f"{folder}/labels.json"))
# The backbone's checkpoint has no classification head, so transformers would report `classifier.weight |
# MISSING ... newly initialized`: harmless, PeftModel.from_pretrained loads the trained head from the folder next.
transformers.logging.set_verbosity_error()
transformers.logging.disable_progress_bar()
base = AutoModelForSequenceClassification.from_pretrained(labels["backbone"], num_labels=labels["num_labels"])
transformers.logging.set_verbosity_warning()
model = PeftModel.from_pretrained(base, folder).eval()
tokenizer = AutoTokenizer.from_pretrained(labels["backbone"])
# Cut each text to the run's max_length tokens, as in training (a longer text overflows the backbone's positions).
inputs = tokenizer(texts, truncation=True, max_length=labels["max_length"], padding=True, return_tensors="pt")
with torch.inference_mode():
    logits = model(**inputs).logits
for task in labels["tasks"]:  # each task's prediction: the argmax over its own slice of the shared output layer
    probs = logits[:, task["offset"]: task["offset"] + len(task["labels"])].softmax(-1)
    for text, p in zip(texts, probs):
        print(f"{task['name']}: {task['labels'][int(p.argmax())]} ({float(p.max()):.3f})\\t{text[:60]}")
"""


def usage_text(folder: Path, labels: dict) -> str:
    """The README.md of an exported folder: what it holds, and how to predict with it, with and without fltac."""
    tasks = ", ".join(f"{t['name']} ({', '.join(t['labels'])})" for t in labels["tasks"])
    return (f"# fltac export: {folder.name}\n\n"
            f"LoRA adapter and classification head exported by `fltac export` from the {labels['method']} run "
            f"`{labels['run']}`, round {labels['round']}, in peft's format (`adapter_model.safetensors`, "
            f"`adapter_config.json`; the head is a `modules_to_save` module), with `labels.json`. "
            f"Backbone: `{labels['backbone']}`. Tasks: {tasks}.\n\n"
            f"With fltac (label and probability per text; `--json` for one JSON object per text):\n\n"
            f"```bash\nfltac predict --adapter {folder} \"some text\"\n```\n\n"
            f"With peft and transformers alone:\n\n"
            f"```python\n{PEFT_SNIPPET.replace('FOLDER', json.dumps(str(folder)))}```\n\n"
            f"A task's prediction is the argmax over its own slice `[offset, offset + len(labels))` of the shared "
            f"output layer (`labels.json`), as fltac scored it; texts longer than `max_length` "
            f"({labels['max_length']}) tokens are cut, as in training.\n")


def write_adapter(folder: Path, state: dict[str, torch.Tensor], cfg: RunConfig, labels: dict) -> None:
    """One peft adapter folder: ``adapter_model.safetensors``, ``adapter_config.json``, ``labels.json``, ``README.md``."""
    folder.mkdir(parents=True, exist_ok=True)
    io.save_tensors(folder / "adapter_model.safetensors", {PEFT_PREFIX + k: v for k, v in sorted(state.items())})
    peft_config(cfg, labels["backbone"]).save_pretrained(str(folder))
    io.write_json(folder / LABELS, labels)
    (folder / USAGE).write_text(usage_text(folder, labels))


def export_run(run_dir: str | Path, out: str | Path, round_: int | None = None) -> dict[str, Path]:
    """Write the global adapters of ``run_dir`` after ``round_`` (default: the last saved) under ``out``.

    Returns ``{folder name: path}``: one per task, or one named after the method (FedIT; the registry's
    ``export`` says which).
    """
    run_dir, out = Path(run_dir), Path(out)
    problem = io.folder_problem(out)
    if problem:
        raise ExportError(f"--out {problem}")
    cfg = read_run_config(run_dir)
    check_run_files(run_dir)
    method = method_of(cfg.method)
    if method.export is None:  # e.g. a trained backbone / an SVD adapter: not a peft LoRA folder
        raise ExportError(f"{run_dir} is a {cfg.method} run: export writes peft LoRA adapters and does not support "
                          f"it yet; its global model is in {run_dir / 'checkpoint'} (see docs/safedlora.md)")
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
    groups = {method.name: tasks} if method.export == "one" else {t["name"]: [t] for t in tasks}
    written = {}
    for folder_name, members in groups.items():
        if members[0]["name"] not in served:  # not started by ``round_``: no adapter serves it yet
            continue
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

@contextmanager
def head_report_silenced():
    """transformers' warnings and progress bars off for one load, then as they were.

    An export's backbone checkpoint has no classification head, so building it for sequence classification
    makes transformers report ``classifier.weight | MISSING ... newly initialized``. Harmless: the trained
    head is in the export and ``PeftModel.from_pretrained`` loads it right after.
    """
    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def load_exported(folder: str | Path, backbone: str | None = None, dtype: torch.dtype = torch.float32):
    """(peft model in eval mode, tokenizer, labels.json) of an exported adapter folder."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    folder = Path(folder)
    if not (folder / LABELS).is_file() or not (folder / "adapter_config.json").is_file():
        raise ExportError(f"{folder} is not an exported adapter folder (no {LABELS} or adapter_config.json); "
                          f"make one with: fltac export RUN_DIR --out DIR")
    labels = io.read_json(folder / LABELS, keys=("backbone", "num_labels", "max_length", "tasks"))
    io.read_json(folder / "adapter_config.json", keys=("peft_type",))  # peft's own reader gives no file name
    io.load_tensors(folder / "adapter_model.safetensors")  # a truncated file: one line naming it
    path = backbone or labels["backbone"]
    try:
        with head_report_silenced():
            tokenizer = AutoTokenizer.from_pretrained(path)
            base = AutoModelForSequenceClassification.from_pretrained(path, num_labels=labels["num_labels"],
                                                                      dtype=dtype)
    except OSError as exc:
        raise ExportError(f"cannot load the backbone '{path}' named in {folder / LABELS}: "
                          f"{str(exc).splitlines()[0]} (pass --model to point at it)") from None
    with warnings.catch_warnings():  # peft 0.21 calls a transformers method deprecated in 5.x
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        model = PeftModel.from_pretrained(base, str(folder)).eval()
    return model, tokenizer, labels


@torch.inference_mode()
def predict(folder: str | Path, texts: list[str], task: str | None = None, backbone: str | None = None) -> list[dict]:
    """Per text ``{task: {"label", "probability", "probabilities": {label: p}}}``: the argmax over each task's
    own output slice (only ``task`` if given), with the softmax over that slice."""
    served = io.read_json(Path(folder) / LABELS, keys=("tasks",))["tasks"] if (Path(folder) / LABELS).is_file() else []
    tasks = [t for t in served if task is None or t["name"] == task]
    if served and not tasks:
        raise ExportError(f"task '{task}' is not served by {folder} (it serves {[t['name'] for t in served]})")
    model, tokenizer, labels = load_exported(folder, backbone)
    tasks = [t for t in labels["tasks"] if task is None or t["name"] == task]
    enc = tokenizer(texts, truncation=True, max_length=labels["max_length"], padding=True, return_tensors="pt")
    logits = model(**enc).logits.float()
    out = [{} for _ in texts]
    for t in tasks:
        probs = logits[:, t["offset"]: t["offset"] + len(t["labels"])].softmax(-1).numpy()
        for row, p in zip(out, probs):
            best = int(np.argmax(p))
            row[t["name"]] = {"label": t["labels"][best], "probability": round(float(p[best]), 6),
                              "probabilities": {name: round(float(q), 6) for name, q in zip(t["labels"], p)}}
    return out
