"""Typed, validated run configuration: one place that says what a run may be asked to do.

A run is described by a YAML file (see ``configs/``) whose sections mirror the dataclasses below,
then by named command-line flags and ``--override section.key=value`` (a bare key works when only
one section has it). Everything is checked here, before any data or model is touched: an unknown
key, a value of the wrong type or out of range raises :class:`ConfigError` naming the key.

No torch, no data, no engine: this module only describes.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from fltac.methods import METHOD_NAMES, METHODS


class ConfigError(ValueError):
    """A configuration problem, with the dotted name of the key at fault in the message."""


class NotFinite(ConfigError):
    """A float key given NaN or an infinity."""


def _help(text: str, default: Any = dataclasses.MISSING, factory: Any = dataclasses.MISSING):
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata={"help": text})
    return field(default=default, metadata={"help": text})


#: Formats a custom task's ``source`` may have; null in the config = inferred from the file extension.
TASK_FORMATS = ("csv", "tsv", "jsonl", "parquet", "hub")
_TASK_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-.")


@dataclass(frozen=True)
class TaskSpec:
    """One task of a ``custom`` scenario: where its rows are and which columns mean what.

    Checked here for consistency only (which keys go together); whether the files and columns exist is
    checked when the data is read (:mod:`fltac.data.custom`), still before any model is loaded.
    """

    name: str = _help("Task name: unique in the scenario; used in metrics and as the exported adapter's folder.")
    source: str = _help("A CSV/TSV/JSONL/Parquet file, a folder of such files (read in name order), or, with "
                        "format: hub, a datasets hub id or a local dataset folder for datasets.load_dataset. "
                        "Relative paths are read from the current directory.")
    format: Optional[Literal["csv", "tsv", "jsonl", "parquet", "hub"]] = _help(
        "Source format; null = from the file extension (a folder: from its files' extensions).", None)
    kind: Literal["classification", "generation"] = _help(
        "classification (text_columns + label_column) or generation (prompt_column + response_column; "
        "parsed and validated, but not trainable yet).", "classification")
    text_columns: Optional[list[str]] = _help("Columns joined (newline-separated) into the input text.", None)
    label_column: Optional[str] = _help("Column holding the class (read as a string; classes sorted by name).", None)
    prompt_column: Optional[str] = _help("Generation only: the prompt column.", None)
    response_column: Optional[str] = _help("Generation only: the response column.", None)
    client_column: Optional[str] = _help(
        "Natural federated data: the column naming each row's owner (author, site, device). Set, this task's "
        "training rows follow it instead of the Dirichlet split: the sorted distinct values of all tasks' client "
        "columns are clients 0..n-1, and n must equal partition.n_clients.", None)
    test_source: Optional[str] = _help("File or folder holding the test split (same format and columns).", None)
    test_fraction: Optional[float] = _help(
        "Held-out fraction (seeded, stratified by label where every class has 2+ rows) when there is no "
        "test_source or hub_test_split; null = data.test_fraction.", None)
    max_examples: Optional[int] = _help("Cap on this task's training examples (seeded sample); null = all.", None)
    hub_config: Optional[str] = _help("format: hub only: the dataset config name.", None)
    hub_split: str = _help("format: hub only: the split to train on.", "train")
    hub_test_split: Optional[str] = _help("format: hub only: the split to test on (else test_fraction holds out).",
                                          None)

    def __post_init__(self):
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise ConfigError(f"data.custom_tasks: task '{self.name}': {message}")

        need(bool(self.name) and set(self.name) <= _TASK_NAME_CHARS,
             "the name must be non-empty and use only letters, digits, '_', '-', '.'")
        need(bool(self.source), "source must name a file, folder or hub id")
        hub = self.format == "hub"
        if self.kind == "classification":
            need(bool(self.text_columns), "a classification task needs text_columns (a list of one or more columns)")
            need(self.label_column is not None, "a classification task needs label_column")
            need(self.prompt_column is None and self.response_column is None,
                 "prompt_column/response_column belong to generation tasks (set kind: generation)")
        else:
            need(self.prompt_column is not None and self.response_column is not None,
                 "a generation task needs prompt_column and response_column")
            need(self.text_columns is None and self.label_column is None,
                 "text_columns/label_column belong to classification tasks")
        held_out = [k for k in ("test_source", "hub_test_split") if getattr(self, k) is not None]
        need(len(held_out) <= 1, "give test_source (files) or hub_test_split (hub), not both")
        need(not (held_out and self.test_fraction is not None),
             f"give {held_out[0] if held_out else ''} or test_fraction, not both")
        need(self.test_fraction is None or 0.0 < self.test_fraction < 1.0, "test_fraction must lie in (0, 1)")
        need(self.max_examples is None or self.max_examples >= 1, "max_examples must be positive")
        need(hub or (self.hub_config is None and self.hub_test_split is None and self.hub_split == "train"),
             "hub_config/hub_split/hub_test_split need format: hub")
        need(not (hub and self.test_source is not None), "a hub source takes hub_test_split, not test_source")


@dataclass(frozen=True)
class DataConfig:
    scenario: str = _help("Task collection to load: 'text5' (offline, packaged corpora), 'text7' (text5 and two "
                          "more packaged corpora: debates, friends), 'glue' (the paper's "
                          "GLUE tasks, from the hub or data.source), 'vision_offline' (MNIST + digits on a ViT "
                          "pretrained on Fashion-MNIST), 'cifar' (CIFAR-10/100, from the hub or data.source) or "
                          "'custom' (the tasks listed in data.custom_tasks).", "text5")
    tasks: Optional[list[str]] = _help("Subset of the scenario's tasks, in this order; null = all.", None)
    max_length: int = _help("Tokens kept per text (longer texts are truncated).", 64)
    split_seed: int = _help("Seed of the stratified 80/20 split for corpora without an official test split.", 0)
    test_fraction: float = _help("Held-out fraction for corpora without an official test split.", 0.2)
    max_train_per_task: Optional[int] = _help("Cap on training examples per task (seeded sample); null = all.", None)
    source: Optional[str] = _help(
        "Hub scenarios only: where the data comes from. null = the scenario's hub dataset (glue: nyu-mll/glue; dolly: "
        "databricks/databricks-dolly-15k, or a local .jsonl/.parquet file or save_to_disk folder of it); "
        "a local folder with the same layout (e.g. a clone of the dataset repository) works without the hub.", None)
    custom_tasks: Optional[list[TaskSpec]] = _help(
        "scenario: custom only: the tasks, in order (which fixes label offsets and partition seeds). "
        "See TaskSpec for the keys of each.", None)
    cache_dir: Optional[str] = _help(
        "Folder for derived files: hub images decoded once (vision/*.npz), the pretrained offline ViT "
        "(vit-fashion-mnist/) and the packaged GGUF causal LM dequantised once to safetensors (smollm2-*/); "
        "null = ~/.cache/fltac.", None)
    task_start_round: dict[str, int] = _help(
        "Tasks that appear only from some round on, {task name: first round} (e.g. {rotten: 3}): before that "
        "round no client trains the task (its jobs are withheld, its rows stay with the clients the partition "
        "gave them) and its evaluation records hold null; from it on, its clients train it as any other task. A "
        "task not named starts in round 1. For the methods with one adapter per task (fltac, centralized).",
        factory=dict)
    token_cache: bool = _help(
        "Keep tokenised texts in data.cache_dir/tokens/, keyed by a hash of the texts, the tokenizer and "
        "max_length (any change gives a new entry), so a second run over the same data skips tokenisation.", True)

    def __post_init__(self):
        if self.scenario == "custom":
            _check(bool(self.custom_tasks), "data.custom_tasks",
                   "must list at least one task when scenario is 'custom'")
            names = [t.name for t in self.custom_tasks]
            dupes = sorted({n for n in names if names.count(n) > 1})
            _check(not dupes, "data.custom_tasks", f"has duplicate task names {dupes}")
        else:
            _check(self.custom_tasks is None, "data.custom_tasks",
                   f"is only read when data.scenario is 'custom' (it is '{self.scenario}')")
        _check(self.max_length >= 8, "data.max_length", "must be at least 8")
        _check(0.0 < self.test_fraction < 1.0, "data.test_fraction", "must lie in (0, 1)")
        _check(self.max_train_per_task is None or self.max_train_per_task > 0, "data.max_train_per_task", "must be positive")
        _check(self.tasks is None or len(self.tasks) > 0, "data.tasks", "must name at least one task, or be null")
        bad = sorted(name for name, r in self.task_start_round.items() if r < 1)
        _check(not bad, "data.task_start_round", f"must give each task a first round of at least 1 (not for {bad})")


@dataclass(frozen=True)
class PartitionConfig:
    n_clients: int = _help("Number of simulated clients.", 10)
    alpha: float = _help("Dirichlet concentration per task over clients (smaller = more skewed).", 0.5)
    min_frac: float = _help("Client shares below this are set to zero (that client gets no sample of the task).", 0.01)
    kind: Literal["per_task", "label_skew", "iid"] = _help(
        "per_task: Dir(alpha) over clients once per task (FL-TAC's split). label_skew: Dir(alpha) over clients "
        "once per class of each task (Hsu et al. 2019 label skew; HAFL's 20 Newsgroups scenario); the same "
        "min_frac rule applies to every draw. iid: every client gets an equal share of every task (a seeded "
        "random permutation cut into equal blocks; alpha and min_frac are not read). An IID split is asked for "
        "by this name, never by alpha: inf (every float key must be finite).", "per_task")

    def __post_init__(self):
        _check(self.n_clients >= 1, "partition.n_clients", "must be at least 1")
        _check(self.alpha > 0, "partition.alpha", "must be positive")
        _check(0.0 <= self.min_frac < 1.0 / self.n_clients, "partition.min_frac",
               f"must lie in [0, 1/n_clients) = [0, {1.0 / self.n_clients:.3g}) so that some client keeps each task")


@dataclass(frozen=True)
class LoraConfig:
    rank: Optional[int] = _help("LoRA rank r; null = the method's paper default (" + ", ".join(
        f"{m.name} {m.default_rank}" for m in METHODS.values() if m.default_rank is not None) + ").", None)
    alpha: float = _help("LoRA alpha; the update is scaled by alpha / r.", 16.0)
    dropout: float = _help("Dropout on the LoRA input.", 0.05)
    dropout_draw: Literal["bits", "bernoulli"] = _help(
        "How LoRA-dropout masks are drawn (fltac.models.dropout). bits: one 64-bit random word per four elements, "
        "an element kept when its 15-bit lane is at least round(dropout x 2^15): a quarter of torch's random draws, "
        "about 10% of a training step at the text5 default (docs/performance.md); bernoulli: peft's "
        "torch.nn.Dropout, one Bernoulli draw per element (the reference code's; runs made before this key drew "
        "so). Both keep an element with probability 1 - dropout (bits: to within 2^-16) and scale kept ones by "
        "1 / (that probability); the two give different masks, so different (equally valid) numbers.", "bits")
    target_modules: list[str] = _help("Backbone module names that receive LoRA (peft's target_modules).",
                                      factory=lambda: ["query", "value"])
    freeze_A: bool = _help(
        "FFA-LoRA (Sun et al., ICLR 2024, 'Improving LoRA in privacy-preserving federated learning'): every "
        "lora_A stays at the shared seeded initialisation all clients start from; clients train only lora_B and "
        "the head, leave lora_A out of their uploads (the server puts back the lora_A it sent), and the server "
        "keeps each slot's lora_A, so FedAvg of B is the exact average of the products B A. For the methods whose "
        "clients train plain LoRA without hooks (fltac, fedit, centralized).", False)

    def __post_init__(self):
        _check(self.rank is None or self.rank >= 1, "lora.rank", "must be at least 1")
        _check(self.alpha > 0, "lora.alpha", "must be positive")
        _check(0.0 <= self.dropout < 1.0, "lora.dropout", "must lie in [0, 1)")
        _check(len(self.target_modules) > 0, "lora.target_modules", "must name at least one module")


@dataclass(frozen=True)
class TrainConfig:
    rounds: int = _help("Communication rounds.", 4)
    local_steps: int = _help(
        "A client's round budget, per task it holds: with batching 'routed' every client takes local_steps x "
        "(tasks held) steps of batch_size rows drawn from all its tasks, whatever the method; with 'per_adapter' "
        "each per-task adapter takes local_steps steps of its own (FedIT's one adapter local_steps x tasks held).", 4)
    batch_size: int = _help("Examples per local step.", 16)
    batching: Literal["routed", "per_adapter"] = _help(
        "How a client's round is batched. routed: one budget for every method, equal in rows and sequential "
        "steps: the client draws mixed batches of batch_size rows from all the tasks it holds (in proportion to "
        "its data, local_steps x tasks held steps, seeded per client and round: the batches FedIT trains on), "
        "and each row trains the adapter of its task (FL-TAC: each adapter steps on the mean loss of its own "
        "rows in a step, and takes no step when it has none); centralized runs the rounds' total steps on the "
        "pooled data. per_adapter: the FL-TAC paper's literal layout: each (client, task) adapter takes "
        "local_steps full batches of its own task, so it takes fewer sequential steps than FedIT's one adapter.",
        "routed")
    lr: float = _help("AdamW learning rate for LoRA matrices and the classification head.", 3e-3)
    backbone_lr: float = _help("AdamW learning rate of the backbone's own weights, when they are trained "
                               "(fedavg_full; safedlora's initiating stage with init_train: full).", 5e-5)
    weight_decay: float = _help("AdamW weight decay.", 0.0)
    fraction_fit: float = _help("Fraction of clients sampled each round (seeded); 1.0 = full participation.", 1.0)
    adapters_per_pass: int = _help(
        "Fast path: up to this many adapters (any clients) share every backbone pass, each with its own rows, "
        "dropout draws and AdamW state (docs/performance.md). Used when the method's clients run no hooks "
        "(fltac, fedit, centralized), the backbone has no dropout and reliability.client_timeout_s is null (one "
        "shared pass cannot time one client). batching routed: clients are never split (a client's adapters "
        "always share its own steps' passes) and results are bit-identical to each client trained alone, as a "
        "Flower client trains; 1 = every client alone. per_adapter: jobs with the same number of steps share "
        "passes, equal to one-by-one training up to float rounding; 1 = adapters one at a time.", 64)
    pass_tokens: int = _help(
        "Fast path: padded tokens (rows x width) per forward pass. A step's batches beyond it run as several "
        "passes bucketed by length (gradients accumulate), bounding activation memory. Causal LMs: a pass's "
        "logits are rows x width x vocabulary floats, so use a few thousand.", 16384)
    prox_mu: float = _help(
        "FedProx's proximal coefficient (Li et al., MLSys 2020, arXiv 1812.06127) for every method's clients: "
        "the local loss gets mu / 2 * ||w - w_sent||^2 over the trained adapter tensors and head (w_sent: the "
        "adapter the client was sent this round), on every training path (one adapter at a time and shared "
        "passes; fedavg_full: the whole backbone and head). 0 = off (plain FedAvg-style clients). Not with "
        "safedlora, whose initiating stage has its own safedlora.mu.", 0.0)

    def __post_init__(self):
        _check(self.adapters_per_pass >= 1, "train.adapters_per_pass", "must be at least 1")
        _check(self.pass_tokens >= 1, "train.pass_tokens", "must be at least 1")
        for name in ("rounds", "local_steps", "batch_size"):
            _check(getattr(self, name) >= 1, f"train.{name}", "must be at least 1")
        _check(self.lr > 0, "train.lr", "must be positive")
        _check(self.backbone_lr > 0, "train.backbone_lr", "must be positive")
        _check(self.weight_decay >= 0, "train.weight_decay", "must be non-negative")
        _check(math.isfinite(self.prox_mu) and self.prox_mu >= 0, "train.prox_mu",
               f"must be a finite number >= 0 (FedProx's mu; 0 = off), got {self.prox_mu!r}")
        _check(0.0 < self.fraction_fit <= 1.0, "train.fraction_fit", "must lie in (0, 1]")


@dataclass(frozen=True)
class ServerConfig:
    n_clusters: Optional[Union[int, Literal["auto"]]] = _help(
        "K, the number of clusters FL-TAC forms: a number; null = the number of tasks (the engine tells the "
        "server); 'auto' = chosen every round from the submissions alone, never from the task count "
        "(server.k_selection, at most server.max_clusters; see FLTAC.choose_k in fltac.server.strategies and "
        "docs/fltac.md, "
        "'Unknown number of tasks'). With auto the slots grow when a round finds a cluster that matches none of "
        "them (a new task), and a slot no cluster matches is kept, unchanged, for the jobs still assigned to it.",
        None)
    max_clusters: int = _help(
        "n_clusters: auto only: the largest K considered (also at most the round's submissions minus one). K = 1 "
        "is a candidate with k_selection: eigengap (the graph is one piece), never with silhouette.", 10)
    k_selection: Literal["eigengap", "silhouette"] = _help(
        "n_clusters: auto only: how K is chosen. 'eigengap' (default): the K with the largest gap between the "
        "K-th and (K+1)-th smallest eigenvalues of the normalised Laplacian of the submissions' k-nearest-neighbour "
        "graph (von Luxburg 2007, section 8.3; neighbours: spectral_neighbors, or ceil(ln n) + 1 for n "
        "submissions), K = 1 .. max_clusters. 'silhouette': the K = 2 .. max_clusters whose clustering (by "
        "server.clustering) has the largest mean silhouette (cosine on the normalised features).", "eigengap")
    cluster_features: Literal["lora_B", "lora", "lora_and_head"] = _help(
        "What the clustering sees. 'lora_B' (default): the LoRA up-projections B only. B starts at zero, so A's "
        "gradient is zero at the first step and W = BA changes to first order by dB A: A's early moves are "
        "second-order noise (Adam scales them up to lr per step all the same). 'lora': A and B. Never the "
        "head by default: its moved rows would give the task away ('lora_and_head'). Measured in docs/fltac.md.",
        "lora_B")
    cluster_on: Literal["weights", "update"] = _help(
        "Cluster the submitted adapter weights (the paper's literal reading) or their change since the adapter the "
        "client was sent (default: re-decided from fresh evidence every round, so a round-1 mistake can heal; "
        "weights-clustering is self-reinforcing, since each job restarts from its cluster's adapter).", "update")
    cluster_normalize: bool = _help(
        "Scale each feature vector to unit length before K-means (spherical K-means). Adam moves clients with "
        "small, repetitive data further, and raw Euclidean K-means then splits tasks by update size; measured on "
        "text5 round 1: 0.69 raw vs 0.97 normalised clustering accuracy.", True)
    clustering: Literal["kmeans", "spectral"] = _help(
        "How FL-TAC groups the round's feature vectors into K clusters. 'spectral' (default): spectral clustering "
        "of their k-nearest-neighbour graph (scikit-learn; K-means on the graph's spectral embedding), which "
        "follows clusters of unequal size and shape that K-means cuts across. 'kmeans': K-means on the vectors, "
        "as the paper does. Measured on text5 in docs/fltac.md.", "spectral")
    spectral_neighbors: Optional[int] = _help(
        "clustering: spectral: the neighbours each feature vector is joined to in the graph; null = ceil(sqrt(n)) "
        "for the round's n submissions, at most ceil(n / K) - 1 (the other members of a cluster of mean size) and "
        "at least 2.", None)
    kmeans_n_init: int = _help("K-means restarts (the best inertia wins; spectral: of its final K-means).", 10)
    kmeans_dims: Optional[int] = _help(
        "Project the flattened features to this many dimensions (seeded Gaussian random projection, which keeps "
        "distances within a small factor) before K-means: 10,000 adapters then cluster in seconds. null = K-means "
        "on the full vectors (the paper's reading; fine for hundreds of adapters). See docs/performance.md.", None)
    optimizer: Literal["none", "fedavgm", "fedadam", "fedyogi", "fedadagrad"] = _help(
        "Server optimizer on the pseudo-gradient d = aggregate - served adapter, per slot (per cluster for FL-TAC), "
        "after reliability.aggregation: none (the aggregate is the new adapter), fedavgm (Hsu et al. 2019: server "
        "momentum), fedadam, fedyogi, fedadagrad (Reddi et al. 2021, Algorithm 2, no bias correction). Its state "
        "is kept in the checkpoint. See fltac.server.optimizers.", "none")
    server_lr: Optional[float] = _help(
        "Server learning rate of server.optimizer; null = Flower's default for it (fedavgm 1, fedadam 0.1, "
        "fedyogi 0.01, fedadagrad 0.1).", None)
    server_momentum: float = _help("fedavgm: the momentum factor beta of v = beta v + d.", 0.9)
    server_beta1: float = _help("fedadam/fedyogi/fedadagrad: first-moment factor beta1.", 0.9)
    server_beta2: float = _help("fedadam/fedyogi: second-moment factor beta2.", 0.99)
    server_tau: Optional[float] = _help(
        "fedadam/fedyogi/fedadagrad: adaptivity tau added to sqrt(v); null = Flower's default (fedyogi 1e-3, "
        "others 1e-9).", None)

    def __post_init__(self):
        _check(self.server_lr is None or self.server_lr > 0, "server.server_lr", "must be positive or null")
        _check(0.0 <= self.server_momentum < 1.0, "server.server_momentum", "must lie in [0, 1)")
        for name in ("server_beta1", "server_beta2"):
            _check(0.0 <= getattr(self, name) < 1.0, f"server.{name}", "must lie in [0, 1)")
        _check(self.server_tau is None or self.server_tau > 0, "server.server_tau", "must be positive or null")
        _check(self.kmeans_dims is None or self.kmeans_dims >= 1, "server.kmeans_dims", "must be at least 1 or null")
        _check(self.n_clusters in (None, "auto") or self.n_clusters >= 1, "server.n_clusters",
               "must be at least 1, auto or null")
        _check(self.max_clusters >= 1, "server.max_clusters", "must be at least 1")
        _check(self.k_selection != "silhouette" or self.max_clusters >= 2, "server.max_clusters",
               "must be at least 2 with server.k_selection: silhouette (it compares K = 2 .. max_clusters)")
        _check(self.kmeans_n_init >= 1, "server.kmeans_n_init", "must be at least 1")
        _check(self.spectral_neighbors is None or self.spectral_neighbors >= 2, "server.spectral_neighbors",
               "must be at least 2 or null")


@dataclass(frozen=True)
class EvalConfig:
    eval_every: int = _help("Evaluate every this many rounds (the last round is always evaluated).", 1)
    eval_size: int = _help("Test examples per task: a fixed seeded sample of the test split (never the first N).", 300)
    batch_size: int = _help("Examples per evaluation forward pass.", 128)
    judge: Literal["rouge_l", "token_f1", "llm"] = _help(
        "Causal-LM scenarios: how generated answers are scored in [0, 1] against the reference. rouge_l (ROUGE-L "
        "F1 on words) and token_f1 run offline; llm asks a chat-completions endpoint to rate 1-10 (the paper's "
        "GPT-4 scoring; see judge_endpoint).", "rouge_l")
    judge_samples: int = _help("Causal-LM scenarios: held-out pairs per task whose generated answers are judged (a "
                               "seeded sample of the eval sample), at the last round; 0 = no generation.", 8)
    max_new_tokens: int = _help("Causal-LM scenarios: tokens generated per judged answer (greedy).", 32)
    judge_endpoint: Optional[str] = _help(
        "judge: llm only: an OpenAI-compatible chat-completions URL; null = $FLTAC_JUDGE_ENDPOINT. The API key is "
        "read only from $FLTAC_JUDGE_API_KEY, never from a config.", None)
    judge_model: Optional[str] = _help("judge: llm only: the model name sent to the endpoint (null: none sent).", None)
    phase_times: bool = _help(
        "Time the phases of every round (building batches, forward, backward, optimizer, adapter state in and out, "
        "screening, aggregation, evaluation, writes, other) and add them, in seconds, to the round's line of "
        "metrics.jsonl as phase_seconds (they sum to its 'seconds'; that round's own file writes come after its line "
        "and are not in it). Off by default; timing changes no result (see fltac.eval.phases).", False)

    def __post_init__(self):
        _check(self.eval_every >= 1, "eval.eval_every", "must be at least 1")
        _check(self.eval_size >= 1, "eval.eval_size", "must be at least 1")
        _check(self.batch_size >= 1, "eval.batch_size", "must be at least 1")
        _check(self.judge_samples >= 0, "eval.judge_samples", "must be non-negative")
        _check(self.max_new_tokens >= 1, "eval.max_new_tokens", "must be at least 1")
        _check(self.judge == "llm" or (self.judge_endpoint is None and self.judge_model is None), "eval.judge_endpoint",
               "and eval.judge_model are only read with eval.judge: llm")


@dataclass(frozen=True)
class ReliabilityConfig:
    """Failing clients, submission checks and robust aggregation (see docs/reliability.md).

    Faults and attacks are drawn from (seed, round, client[, key]) alone, like every other random
    draw of a run, so a resumed run meets the same faults as the uninterrupted one.
    """

    crash_prob: float = _help("Injected fault: probability that a sampled client crashes (raises) in a round; all "
                              "its adapters of that round are lost.", 0.0)
    hang_prob: float = _help("Injected fault: probability that a sampled client hangs for hang_seconds (simulated: "
                             "added to its measured time, not slept), so the client_timeout_s check drops it.", 0.0)
    hang_seconds: float = _help("How long an injected hang lasts, in (simulated) seconds.", 3600.0)
    corrupt_prob: float = _help("Injected fault: probability that one submitted adapter is corrupted "
                                "(drawn per adapter, i.e. per client and task for FL-TAC).", 0.0)
    corrupt_kind: Literal["nan", "scale", "noise", "shape", "dtype", "missing", "any"] = _help(
        "How an injected corruption breaks the adapter: NaN entries, every tensor x attack_scale, Gaussian noise "
        "(attack_noise_std), a tensor with a wrong shape, float64 tensors, a missing tensor; 'any' draws one of "
        "these per corruption.", "any")
    client_timeout_s: Optional[float] = _help(
        "Per-client time limit per round (seconds): a client whose training took longer (measured wall time, "
        "plus any injected hang) is dropped; on the main thread a real client is also interrupted when it runs "
        "past the limit. null = no limit. Wall-clock timeouts are by nature not reproducible; injected hangs are.",
        None)
    min_clients_per_round: int = _help("Stop the run with an error when fewer distinct clients than this have an "
                                       "accepted adapter in a round (never a silent empty average).", 1)
    min_fraction_per_round: float = _help("Also stop when fewer than this fraction of the round's sampled clients "
                                          "have an accepted adapter (0 = no fraction requirement).", 0.0)
    validate: bool = _help("Check every submission before the strategy sees it: tensor names, shapes and dtypes "
                           "for the method and the client's rank, finite values, and the update-norm bound. "
                           "A rejected submission counts as a dropped client.", True)
    norm_bound: Optional[float] = _help("Absolute bound on a submission's update norm ||submitted - sent||_2 "
                                        "(all tensors together); null = norm_bound_factor x a reference norm.", None)
    norm_bound_factor: float = _help(
        "With norm_bound null, reject an update whose norm exceeds this multiple of a reference norm computed over "
        "clients, not adapters: each client votes once, with the lower median of its structurally valid, finite "
        "submissions' update norms, and the reference is the lower median of the votes (the smaller middle value "
        "for an even count), so clients sending too-long updates must be at least half of the round's clients to "
        "loosen it, however many adapters each sends. A round where only one client votes would set its own bound: "
        "it takes the previous accepted round's reference instead (in round 1, the norm of the adapter it was "
        "sent). See fltac.server.robust.norm_reference.", 10.0)
    aggregation: Literal["fedavg", "median", "trimmed_mean", "krum", "multi_krum", "geometric_median"] = _help(
        "How the submissions merged into one global adapter are combined (inside each cluster for FL-TAC): "
        "sample-weighted FedAvg, coordinate-wise median, coordinate-wise trimmed mean (unweighted), Krum (the one "
        "submission closest to its n - f - 2 nearest others; Blanchard et al. 2017), multi-Krum (the mean of the "
        "multi_krum_m best by Krum's score) or the sample-weighted geometric median (Weiszfeld; Pillutla et al.'s "
        "RFA). See fltac.server.robust.", "fedavg")
    krum_f: int = _help("krum/multi_krum: the number f of Byzantine submissions assumed among a slot's members "
                        "(Krum scores each by its n - f - 2 nearest others, at least one).", 1)
    multi_krum_m: Optional[int] = _help("multi_krum: how many of the best-scored submissions are averaged "
                                        "(sample-weighted); null = n - f.", None)
    trim_fraction: float = _help("trimmed_mean: drop floor(trim_fraction x n) values at each end of every "
                                 "coordinate (n = submissions being merged). 0.2 trims one of each end from 5 to 9.",
                                 0.2)
    clip_norm: Optional[float] = _help("Clip every update to this L2 norm (all tensors together) before merging: "
                                       "start + u min(1, clip_norm / ||u||). null = no clipping.", None)
    attacker_clients: list[int] = _help("Clients that attack every round they are sampled (for robustness "
                                        "experiments); each of their adapters is replaced as 'attack' says.",
                                        factory=list)
    attack: Literal["none", "scale", "nan", "noise", "missing"] = _help(
        "What attackers send: their trained adapter x attack_scale, NaN everywhere, Gaussian noise with std "
        "attack_noise_std in place of every entry, or (missing) their adapter without its first tensor: a "
        "malformed upload, the control for an attacker whose every adapter is rejected.", "none")
    attack_scale: float = _help("Factor of the 'scale' attack and corruption.", 100.0)
    attack_noise_std: float = _help("Standard deviation of the 'noise' attack and corruption.", 1.0)

    def __post_init__(self):
        for name in ("crash_prob", "hang_prob", "corrupt_prob", "min_fraction_per_round"):
            _check(0.0 <= getattr(self, name) <= 1.0, f"reliability.{name}", "must lie in [0, 1]")
        _check(self.hang_seconds > 0, "reliability.hang_seconds", "must be positive")
        _check(self.client_timeout_s is None or self.client_timeout_s > 0, "reliability.client_timeout_s",
               "must be positive or null")
        _check(self.hang_prob == 0.0 or self.client_timeout_s is not None, "reliability.hang_prob",
               "needs reliability.client_timeout_s: without a time limit a hung client is waited for forever")
        _check(self.min_clients_per_round >= 1, "reliability.min_clients_per_round", "must be at least 1")
        _check(self.norm_bound is None or self.norm_bound > 0, "reliability.norm_bound", "must be positive or null")
        _check(self.norm_bound_factor >= 1.0, "reliability.norm_bound_factor",
               "must be at least 1 (the median update itself must pass)")
        _check(0.0 <= self.trim_fraction < 0.5, "reliability.trim_fraction", "must lie in [0, 0.5)")
        _check(self.krum_f >= 0, "reliability.krum_f", "must be non-negative")
        _check(self.multi_krum_m is None or self.multi_krum_m >= 1, "reliability.multi_krum_m",
               "must be at least 1 or null")
        _check(self.clip_norm is None or self.clip_norm > 0, "reliability.clip_norm", "must be positive or null")
        _check(all(c >= 0 for c in self.attacker_clients), "reliability.attacker_clients",
               "must hold client indices (>= 0)")
        _check(self.attack != "none" or not self.attacker_clients, "reliability.attack",
               "must name an attack when reliability.attacker_clients is set")
        _check(self.attack_scale > 0, "reliability.attack_scale", "must be positive")
        _check(self.attack_noise_std > 0, "reliability.attack_noise_std", "must be positive")


@dataclass(frozen=True)
class PrivacyConfig:
    """Client-level differential privacy (see docs/algorithms.md#differential-privacy, :mod:`fltac.privacy`).

    The unit of privacy is one client: all its adapters of a round are clipped together to ``clip_norm``.
    ``local``: every client clips its update and adds Gaussian noise before it sends it (the server, and
    FL-TAC's clustering, only ever see noised adapters). ``central``: DP-FedAvg (McMahan et al., arXiv
    1710.06963): the server clips each client's update, averages clients with equal weights and adds noise to
    the average. Epsilon comes from opacus's RDP accountant (``pip install 'fltac[dp]'``).
    """

    mode: Literal["none", "local", "central"] = _help(
        "none: no DP. local: each client clips its round's update (all its adapters together) to clip_norm and adds "
        "N(0, (noise_multiplier clip_norm)^2) to every uploaded coordinate before sending. central: the server "
        "clips each client's update to clip_norm, averages the clients of each slot (each FL-TAC cluster) with "
        "equal weights and adds N(0, (noise_multiplier clip_norm / n)^2) to the average of n clients. fltac and "
        "fedit only.", "none")
    clip_norm: float = _help("C: the L2 bound on one client's round update ||s - s0|| (its adapters' trained tensors "
                             "together, lora_A left out under lora.freeze_A).", 1.0)
    noise_multiplier: Optional[float] = _help(
        "sigma: noise std in units of clip_norm. Give it or target_epsilon, not both.", None)
    target_epsilon: Optional[float] = _help(
        "Solve sigma so that the run's total epsilon (all train.rounds, at privacy.delta) is at most this "
        "(opacus get_noise_multiplier, RDP accountant). Give it or noise_multiplier, not both.", None)
    delta: float = _help("The delta of (epsilon, delta)-DP; must be below 1 / partition.n_clients.", 1e-5)

    def __post_init__(self):
        _check(self.clip_norm > 0, "privacy.clip_norm", f"must be positive, got {self.clip_norm!r}")
        _check(self.noise_multiplier is None or self.noise_multiplier > 0, "privacy.noise_multiplier",
               f"must be positive or null, got {self.noise_multiplier!r}")
        _check(self.target_epsilon is None or self.target_epsilon > 0, "privacy.target_epsilon",
               f"must be positive or null, got {self.target_epsilon!r}")
        _check(0.0 < self.delta < 1.0, "privacy.delta", "must lie in (0, 1)")
        if self.mode != "none":
            _check((self.noise_multiplier is None) != (self.target_epsilon is None), "privacy.noise_multiplier",
                   f"or privacy.target_epsilon must be set (exactly one of them) with privacy.mode {self.mode}")


@dataclass(frozen=True)
class SecureAggregationConfig:
    """Flower's SecAgg+ (Bell et al., CCS 2020) for the methods that merge one sample-weighted mean of all clients
    (FedIT): the server learns only that mean, never one client's adapter (docs/algorithms.md#secure-aggregation,
    :mod:`fltac.engines.flower_secagg`). A Flower engine feature. The knobs are ``SecAggPlusWorkflow``'s, with its
    names and defaults (num_shares and reconstruction_threshold: Flower's secure-aggregation example).
    """

    enabled: bool = _help("Run every round's fit through Flower's SecAggPlusWorkflow (server) and secaggplus_mod "
                          "(clients): each client uploads its quantised, masked adapter; the server unmasks only the "
                          "sum. Flower engine only (--engine flower-sim or a deployment); methods whose registry "
                          "record allows it (fedit).", False)
    num_shares: Union[int, float] = _help(
        "Shares each client's secrets are split into, one per neighbour (itself included): an int > 2, or a float in "
        "(0, 1]: that fraction of the round's sampled clients. More shares tolerate more dropouts, at more cost.", 3)
    reconstruction_threshold: Union[int, float] = _help(
        "Shares needed to rebuild a client's secret (to unmask a dropped client's pairwise masks, or its own mask): "
        "an int below num_shares, or a float in (0, 1]: that fraction of num_shares. Higher: better privacy "
        "against colluding clients, less tolerance of dropouts.", 2)
    max_weight: float = _help(
        "The largest client weight (its num_examples) the protocol expects: each client scales its adapter by "
        "num_examples / max_weight before quantising, so the sum is sample-weighted. Must be at least every "
        "client's num_examples (checked before round 1); a larger value costs precision.", 1000.0)
    clipping_range: float = _help(
        "c: every weighted entry (num_examples / max_weight x value) is clipped to [-c, c] before quantising "
        "(the client refuses an adapter with an entry beyond it rather than send a clipped one).", 8.0)
    quantization_range: int = _help(
        "Q: entries are quantised (stochastic rounding) to integers in [0, Q - 1], a step of 2c / Q. The unmasked "
        "mean is off FedAvg's by about n x (2c / Q) x max_weight / (sum of num_examples) per entry at most, for n "
        "clients (fltac.engines.flower_secagg.mean_error_bound). Must be below 2^32 / n.", 4194304)

    def __post_init__(self):
        shares, threshold = self.num_shares, self.reconstruction_threshold
        _check(shares > 2 if isinstance(shares, int) else 0 < shares <= 1, "secure_aggregation.num_shares",
               f"must be an int > 2 or a float in (0, 1], got {shares!r}")
        _check((isinstance(threshold, int) and threshold >= 2 and (not isinstance(shares, int) or threshold < shares))
               or (isinstance(threshold, float) and 0 < threshold <= 1), "secure_aggregation.reconstruction_threshold",
               f"must be an int >= 2 below num_shares or a float in (0, 1], got {threshold!r}")
        _check(self.max_weight > 0, "secure_aggregation.max_weight", "must be positive")
        _check(self.clipping_range > 0, "secure_aggregation.clipping_range", "must be positive")
        _check(0 < self.quantization_range < 2 ** 32, "secure_aggregation.quantization_range",
               "must lie in (0, 2^32) (below Flower's modulus_range)")


@dataclass(frozen=True)
class HaflConfig:
    """HAFL / HetLoRA / FlexLoRA / FLoRA: heterogeneous client LoRA ranks r_k <= R (R = the run's lora rank),
    see docs/hafl.md.

    Su, Yan, Deng, arXiv 2411.06581 v1. Options the paper does not settle are marked reconstructed.
    """

    mode: Optional[Literal["truncate", "freeze"]] = _help(
        "truncate: client k is sent its top-r_k components by global score and trains a rank-r_k adapter. freeze: "
        "client k is sent the full rank-R adapter and updates only its locally top-r_k components. null = the "
        "method's own (hafl: truncate; hetlora, flexlora: truncate, flora: freeze, the only one each allows).", None)
    aggregation: Optional[Literal["adaptive", "zero_pad"]] = _help(
        "adaptive: each rank-1 component averaged over only the clients that updated it (kept if none did). "
        "zero_pad: HetLoRA's average over all clients with zeros for components a client did not update. "
        "null = the method's own (hafl: adaptive; hetlora: zero_pad only; flexlora, flora: their own product rules, "
        "leave it null).", None)
    client_ranks: Optional[list[int]] = _help(
        "Explicit rank r_k of each client (length partition.n_clients, each <= R); null = rank_distribution.", None)
    rank_distribution: str = _help(
        "With client_ranks null: 'uniform:2,4,8' draws each client's rank uniformly from the list (seeded by the "
        "run seed); 'cycle:2,4,8' gives client k the (k mod 3)-th value.", "uniform:2,4,8")
    beta: float = _help("EMA factor of the sensitivity |w * grad| (and of the uncertainty term).", 0.85)
    uncertainty: bool = _help("Reconstructed option (AdaLoRA): score = EMA(|w g|) x EMA(| |w g| - EMA(|w g|) |) "
                              "instead of EMA(|w g|) alone.", False)
    score_reduce: Literal["sum", "mean"] = _help(
        "How a component's score gathers its entries' sensitivities: sum over column i of B and row i of A (the "
        "default reading, docs/hafl.md) or mean over each plus mean over the other (reconstructed alternative).", "sum")
    weighting: Literal["samples", "samples_x_score"] = _help(
        "Weights of adaptive aggregation: n_k, or n_k x the client's score of that component (reconstructed "
        "option; adaptive aggregation only).", "samples")
    svd_split: Literal["us", "sqrt"] = _help(
        "FlexLoRA and FLoRA: how the truncated SVD U_r S_r V_r^T of an aggregated product is split into LoRA "
        "factors: us = B = U_r S_r, A = V_r^T (our reading of FlexLoRA's released code); sqrt = B = U_r S_r^(1/2), "
        "A = S_r^(1/2) V_r^T.", "us")

    def __post_init__(self):
        _check(0.0 < self.beta < 1.0, "hafl.beta", "must lie in (0, 1)")
        _check(self.client_ranks is None or (len(self.client_ranks) > 0 and min(self.client_ranks) >= 1),
               "hafl.client_ranks", f"must list ranks >= 1, got {self.client_ranks}")
        kind, values = _rank_distribution(self.rank_distribution)
        _check(kind in ("uniform", "cycle") and values is not None and min(values) >= 1, "hafl.rank_distribution",
               f"must look like 'uniform:2,4,8' or 'cycle:2,4,8' (ranks >= 1), got {self.rank_distribution!r}")
        _check(self.weighting == "samples" or self.aggregation != "zero_pad", "hafl.weighting",
               "samples_x_score needs hafl.aggregation adaptive (zero_pad averages over all clients)")

    def ranks(self, n_clients: int, seed: int) -> list[int]:
        """r_k of each client: ``client_ranks``, or drawn from ``rank_distribution`` with its own seeded generator."""
        if self.client_ranks is not None:
            return list(self.client_ranks)
        kind, values = _rank_distribution(self.rank_distribution)
        if kind == "cycle":
            return [values[k % len(values)] for k in range(n_clients)]
        import numpy as np

        rng = np.random.default_rng([seed, 2411065810])  # the paper's arXiv id: a stream of its own
        return [int(v) for v in rng.choice(values, size=n_clients)]

    def resolved(self, method: str) -> tuple[str, str]:
        """(mode, aggregation) for ``method``: the rule its registry record fixes (hetlora: truncate + zero_pad),
        else this section's, truncate + adaptive by default."""
        fixed = METHODS[method].hafl_rule
        if fixed is not None:
            return fixed
        return self.mode or "truncate", self.aggregation or "adaptive"


def _rank_distribution(text: str) -> tuple[str, list[int] | None]:
    kind, _, rest = text.partition(":")
    try:
        values = [int(v) for v in rest.split(",")] if rest else None
    except ValueError:
        values = None
    return kind.strip(), values


@dataclass(frozen=True)
class SAFedLoraConfig:
    """SA-FedLoRA (Yang et al., arXiv 2405.09394): an initiating stage, then an annealed SVD-adapter budget.

    Rounds 1..init_rounds: clients train with the proximal term mu/2 ||w - w_global||^2 (FedProx), the server
    does FedAvg. Then the backbone is frozen and an AdaLoRA adapter P diag(lambda) Q of rank rank_init per
    matrix is trained; the budget b(t) (rank-1 triplets over all matrices) falls from rank_init x n_matrices
    to target_rank x n_matrices along AdaLoRA's cubic schedule over the annealing rounds. The paper gives the
    idea only; the formulas are reconstructed (see docs/safedlora.md and fltac.server.safedlora).
    """

    init_rounds: int = _help("Rounds of the initiating stage (proximal term, FedAvg); 0 = anneal from round 1.", 1)
    mu: float = _help("Proximal coefficient of the initiating stage (reconstructed: FedProx's mu/2 ||w - w_g||^2).",
                      0.01)
    init_train: Literal["full", "lora"] = _help(
        "What the initiating stage trains: 'full' = the whole backbone and head (fp32, train.backbone_lr; the "
        "most faithful reading), 'lora' = the SVD adapter at full rank_init and the head.", "full")
    rank_init: int = _help("Initial rank r_init of every adapted matrix (the 'heating' budget).", 12)
    target_rank: int = _help("Average rank per matrix at the end of annealing: b_T = target_rank x n_matrices.", 4)
    warm_rounds: int = _help("Annealing rounds at the full budget b_0 before the cubic decrease (AdaLoRA's "
                             "tinit, counted in rounds; at least 1, since the first mask needs one round of scores).",
                             1)
    cool_rounds: int = _help("Last annealing rounds at the final budget b_T (AdaLoRA's tfinal, in rounds).", 1)
    orth_reg: float = _help("Weight of AdaLoRA's orthogonality loss mean(||P^T P - I||_F, ||Q Q^T - I||_F) over "
                            "the active triplets; 0 = off.", 0.1)
    beta1: float = _help("EMA factor of the sensitivity |w * grad| (AdaLoRA's beta1).", 0.85)
    beta2: float = _help("EMA factor of the uncertainty |I - Ibar| (AdaLoRA's beta2).", 0.85)

    def __post_init__(self):
        _check(self.init_rounds >= 0, "safedlora.init_rounds", "must be non-negative")
        _check(self.mu >= 0, "safedlora.mu", "must be non-negative")
        _check(self.rank_init >= 1, "safedlora.rank_init", "must be at least 1")
        _check(1 <= self.target_rank <= self.rank_init, "safedlora.target_rank",
               f"must lie in [1, safedlora.rank_init = {self.rank_init}]")
        _check(self.warm_rounds >= 1, "safedlora.warm_rounds", "must be at least 1 (the first mask needs scores)")
        _check(self.cool_rounds >= 0, "safedlora.cool_rounds", "must be non-negative")
        _check(self.orth_reg >= 0, "safedlora.orth_reg", "must be non-negative")
        for name in ("beta1", "beta2"):
            _check(0.0 <= getattr(self, name) < 1.0, f"safedlora.{name}", "must lie in [0, 1)")


@dataclass(frozen=True)
class RunConfig:
    method: Literal[METHOD_NAMES] = _help(" ".join(f"{m.name}: {m.summary}" for m in METHODS.values()), "fltac")
    model_name: str = _help("'minilm' (the packaged MiniLM-L6), a hub id, or a local folder.", "minilm")
    seed: int = _help("Seeds the partition (seed + task index), initial adapter, local batches, K-means, eval sample.", 42)
    dtype: Literal["auto", "float32", "bfloat16"] = _help(
        "Backbone dtype. auto: bfloat16 where the hardware reports native bf16 units (CUDA bf16, AMX or AVX512-BF16), "
        "else float32. Adapters and head always train in float32.", "auto")
    attn_implementation: Literal["auto", "eager", "sdpa"] = _help(
        "Attention kernel. auto: eager for a bf16 backbone on CPU (measured faster), sdpa otherwise.", "auto")
    backbone_dropout: Optional[float] = _help(
        "Dropout inside the frozen backbone (attention, hidden, before the head). 0 by default: the backbone is "
        "frozen, LoRA has its own dropout, and on CPU the pretrained 0.1 costs about 40% of a step. null keeps the "
        "pretrained values.", 0.0)
    num_threads: Optional[int] = _help("torch CPU threads; null = torch's default (the physical cores).", None)
    output_dir: str = _help("Where metrics, adapters, checkpoints and the summary go.", "results/run")
    data: DataConfig = field(default_factory=DataConfig)
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    reliability: ReliabilityConfig = field(default_factory=ReliabilityConfig)
    hafl: HaflConfig = field(default_factory=HaflConfig)
    safedlora: SAFedLoraConfig = field(default_factory=SAFedLoraConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    secure_aggregation: SecureAggregationConfig = field(default_factory=SecureAggregationConfig)

    def __post_init__(self):
        _check(self.backbone_dropout is None or 0.0 <= self.backbone_dropout < 1.0, "backbone_dropout",
               "must lie in [0, 1) or be null")
        _check(self.num_threads is None or self.num_threads >= 1, "num_threads", "must be at least 1")
        _check(self.backbone_dropout == 0.0 or self.train.batching == "per_adapter"
               or METHODS[self.method].layout == "shared", "backbone_dropout",
               f"must be 0 with train.batching routed for method {self.method}: a routed step trains a client's "
               f"adapters in shared passes, which needs a backbone without dropout (or set train.batching: per_adapter)")
        _check(self.server.optimizer == "none" or METHODS[self.method].server_optimizer, "server.optimizer",
               f"must be none with method {self.method}: its strategy merges adapters by its own rule, not the "
               f"per-slot aggregate a server optimizer steps from")
        record = METHODS[self.method]
        _check(self.train.prox_mu == 0 or record.proximal, "train.prox_mu",
               f"must be 0 with method {self.method}: its clients train a packed adapter the broadcast does not hold "
               f"as sent (SA-FedLoRA's proximal term is safedlora.mu, in its initiating stage)")
        _check(not self.lora.freeze_A or not (record.trains_backbone or record.client_hooks), "lora.freeze_A",
               f"must be false with method {self.method}: its clients train their own layout (client hooks or a "
               f"staged model); FFA-LoRA applies to the methods training plain LoRA without client hooks")
        late = {name: r for name, r in self.data.task_start_round.items() if r > self.train.rounds}
        _check(not late, "data.task_start_round", f"names task(s) {late} that would start after the last round "
               f"(train.rounds = {self.train.rounds})")
        _check(not self.data.task_start_round or record.layout != "shared", "data.task_start_round",
               f"needs a method with one adapter per task (fltac, centralized): method {self.method} trains one "
               f"adapter over all of a client's tasks")
        _check(self.server.n_clusters != "auto" or record.clusters, "server.n_clusters",
               f"auto is read by method fltac only (method {self.method} does not cluster)")
        _check(all(c < self.partition.n_clients for c in self.reliability.attacker_clients),
               "reliability.attacker_clients", f"must name clients below partition.n_clients = {self.partition.n_clients}")
        if self.privacy.mode != "none":
            self._check_privacy()
        if self.secure_aggregation.enabled:
            self._check_secure_aggregation()
        if record.client_ranks:
            self._check_hafl()
        if METHODS[self.method].trains_backbone:
            self._check_safedlora()

    def _check_safedlora(self) -> None:
        _check(self.lora.rank is None, "lora.rank",
               f"is not read by method {self.method} (safedlora's rank is safedlora.rank_init); leave it null")
        _check(self.dtype != "bfloat16", "dtype",
               f"must be auto or float32 for method {self.method}: a trained backbone needs fp32 weights")
        if self.method == "safedlora":
            sa = self.safedlora
            _check(sa.init_rounds <= self.train.rounds, "safedlora.init_rounds",
                   f"must not exceed train.rounds = {self.train.rounds}")
            anneal = self.train.rounds - sa.init_rounds
            _check(anneal == 0 or sa.warm_rounds + sa.cool_rounds <= anneal, "safedlora.warm_rounds",
                   f"+ safedlora.cool_rounds must not exceed the {anneal} annealing round(s) "
                   f"(train.rounds - safedlora.init_rounds)")

    def _check_privacy(self) -> None:
        p, n = self.privacy, self.partition.n_clients
        _check(self.method != "centralized", "privacy.mode",
               "must be none with method centralized: it pools all data in one place, so there is no client to protect")
        _check(METHODS[self.method].private, "privacy.mode",
               f"must be none with method {self.method}: client-level DP is implemented for fltac and fedit (their "
               f"uploads are whole plain-LoRA adapters; its own uploads carry scores or a packed layout)")
        _check(p.delta < 1.0 / n, "privacy.delta", f"must be below 1 / partition.n_clients = {1.0 / n:.3g}")
        if p.mode == "central":
            _check(self.reliability.aggregation == "fedavg" and self.reliability.clip_norm is None,
                   "reliability.aggregation", "must be fedavg (and reliability.clip_norm null) with privacy.mode "
                   "central: DP-FedAvg is its own clipped, equally weighted mean (privacy.clip_norm)")

    def _check_secure_aggregation(self) -> None:
        """SecAgg+ shows the server one sum: whatever must look at a single client's adapter is refused."""
        key, rel = "secure_aggregation.enabled", self.reliability
        problem = METHODS[self.method].secagg_problem()
        _check(problem is None, key, f"must be false: {problem}")
        _check(rel.aggregation == "fedavg", "reliability.aggregation",
               f"must be fedavg with secure_aggregation: {rel.aggregation} ranks or drops single clients' "
               f"adapters, which SecAgg+ hides (it shows the server only their sum)")
        _check(rel.clip_norm is None, "reliability.clip_norm", "must be null with secure_aggregation: the server "
               "cannot clip an update it never sees (privacy.mode local clips on the client)")
        _check(not rel.validate, "reliability.validate", "must be false with secure_aggregation: screening checks "
               "each client's adapter (layout, finite values, update norm), which SecAgg+ hides from the server")
        _check(self.privacy.mode != "central", "privacy.mode", "must be none or local with secure_aggregation: central "
               "DP clips each client's update on the server, which never sees one (local DP noises before masking)")
        _check(rel.corrupt_prob == 0.0 and rel.attack not in ("nan", "missing"), "reliability.corrupt_prob",
               "must be 0 (and reliability.attack not nan or missing) with secure_aggregation: a malformed or "
               "non-finite upload cannot be quantised into the masked sum")
        n = self.partition.n_clients
        sampled = n if self.train.fraction_fit >= 1.0 else max(1, int(round(self.train.fraction_fit * n)))
        _check(sampled >= 2, "partition.n_clients", f"x train.fraction_fit must sample at least 2 clients a round "
               f"with secure_aggregation (SecAgg+ needs 2 or more), got {sampled}")

    def _check_hafl(self) -> None:
        h, n = self.hafl, self.partition.n_clients
        record = METHODS[self.method]
        if record.hafl_rule is not None:
            mode, aggregation = record.hafl_rule
            _check(h.mode in (None, mode), "hafl.mode", f"must be {mode} or null with method {self.method} "
                   f"(its own rule; method hafl chooses freely)")
            _check(h.aggregation in (None, aggregation), "hafl.aggregation", f"must be null with method "
                   f"{self.method} (it aggregates by {aggregation}; method hafl chooses freely)")
        _check(h.weighting == "samples" or h.resolved(self.method)[1] == "adaptive", "hafl.weighting",
               f"must be samples with method {self.method} (samples_x_score weights adaptive aggregation only)")
        _check(h.client_ranks is None or len(h.client_ranks) == n, "hafl.client_ranks",
               f"must give one rank per client: {len(h.client_ranks or [])} values for partition.n_clients = {n}")
        key = "hafl.client_ranks" if h.client_ranks is not None else "hafl.rank_distribution"
        room = record.rank_headroom
        too_big = sorted({r for r in h.ranks(n, self.seed) if r > self.rank - room})
        _check(not too_big, key, f"has client rank(s) {too_big} larger than the server rank R = {self.rank} "
               f"(lora.rank{'' if self.lora.rank is not None else ', the method default'})"
               + (f" less {room} (method {self.method} keeps a residual beside the largest r_k); every r_k must be "
                  f"<= R - {room}" if room else "; every r_k must be <= R"))
        _check(self.reliability.aggregation == "fedavg" and self.reliability.clip_norm is None,
               "reliability.aggregation", f"must be fedavg (and reliability.clip_norm null) with method {self.method}: "
               f"its own aggregation rule (rank-1 components or products) has no robust variant yet")

    @property
    def rank(self) -> int:
        """The LoRA rank this run uses: ``lora.rank``, or the method's default (the registry's)."""
        if self.method == "safedlora":
            return self.safedlora.rank_init
        if self.method == "fedavg_full":
            return 0  # no adapter: the whole backbone is trained
        return self.lora.rank if self.lora.rank is not None else METHODS[self.method].default_rank

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


#: Named command-line flags and the dotted key each sets.
FLAG_KEYS = {
    "method": "method", "model_name": "model_name", "seed": "seed", "dtype": "dtype", "output_dir": "output_dir",
    "scenario": "data.scenario", "max_length": "data.max_length",
    "n_clients": "partition.n_clients", "alpha": "partition.alpha", "min_frac": "partition.min_frac",
    "lora_rank": "lora.rank", "rounds": "train.rounds", "local_steps": "train.local_steps",
    "batch_size": "train.batch_size", "lr": "train.lr", "fraction_fit": "train.fraction_fit",
    "n_clusters": "server.n_clusters", "cluster_features": "server.cluster_features",
    "eval_every": "eval.eval_every", "eval_size": "eval.eval_size",
    "hafl_mode": "hafl.mode", "hafl_aggregation": "hafl.aggregation", "partition_kind": "partition.kind",
}


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"config key '{key}' {message}")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Return ``value`` as type ``tp`` (a dataclass field annotation), or raise ConfigError naming ``key``."""
    inner, optional = _optional_inner(tp)
    if optional:
        return None if value is None else _coerce(value, inner, key)
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):  # e.g. int or 'auto': the first alternative that takes it
        for alternative in typing.get_args(tp):
            try:
                return _coerce(value, alternative, key)
            except NotFinite:
                raise  # a number, but NaN or infinite: that is the problem, whatever the other alternatives
            except ConfigError:
                pass
        names = " or ".join(repr(a) if not isinstance(a, type) else a.__name__
                            for t in typing.get_args(tp) for a in (typing.get_args(t) or (t,)))
        raise ConfigError(f"config key '{key}' must be {names}, got {value!r}")
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' must be a mapping, got {value!r}")
        key_type, value_type = typing.get_args(tp)
        return {_coerce(k, key_type, f"{key} (a key)"): _coerce(v, value_type, f"{key}.{k}") for k, v in value.items()}
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"config key '{key}' must be one of {list(choices)}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}' must be a list, got {value!r}")
        (item,) = typing.get_args(tp)
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"config section '{key}' must be a mapping, got {value!r}")
        return build(tp, value, key)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is not None:
            if not math.isfinite(number):  # NaN or +-inf: no float key of a run means anything by them
                hint = " (for an IID split write partition.kind: iid)" if key == "partition.alpha" else ""
                raise NotFinite(f"config key '{key}' must be a finite number, got {value!r}{hint}")
            return number
    elif tp is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"config key '{key}' must be of type {getattr(tp, '__name__', tp)}, got {value!r}")


def build(cls: type, mapping: dict, prefix: str = "") -> Any:
    """Construct dataclass ``cls`` from a nested mapping, rejecting unknown keys by their dotted name."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in mapping.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            raise ConfigError(f"unknown config key '{dotted}' (known here: {', '.join(sorted(names))})")
        kwargs[key] = _coerce(value, hints[key], dotted)
    required = [f.name for f in dataclasses.fields(cls)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [n for n in required if n not in kwargs]
    if missing:
        where = f"'{prefix}'" + (f" (task '{mapping['name']}')" if "name" in mapping else "")
        raise ConfigError(f"config section {where} lacks required key(s) {missing}")
    return cls(**kwargs)


def _leaf_keys(cls: type = RunConfig, prefix: str = "") -> list[str]:
    out = []
    for f in dataclasses.fields(cls):
        dotted = f"{prefix}{f.name}"
        tp = typing.get_type_hints(cls)[f.name]
        out.extend(_leaf_keys(tp, dotted + ".") if dataclasses.is_dataclass(tp) else [dotted])
    return out


def _segments(dotted: str) -> list[str | int]:
    """``"data.custom_tasks.0.label_column"`` -> ``["data", "custom_tasks", 0, "label_column"]``."""
    return [int(s) if s.isdigit() else s for s in dotted.split(".")]


def _optional_inner(tp: Any) -> tuple[Any, bool]:
    """(``tp`` without ``Optional``, whether it was optional)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return (args[0] if len(args) == 1 else typing.Union[tuple(args)]), len(args) < len(typing.get_args(tp))
    return tp, False


def _path(dotted: str) -> list[tuple[str | int, Any, Any]]:
    """Each step of ``dotted`` from RunConfig down: (name or list index, its annotation, its dataclass field, or
    None for a list index). Raises ConfigError when no such key exists."""
    steps, tp = [], RunConfig
    for seg in _segments(dotted):
        tp, _ = _optional_inner(tp)
        here = ".".join(str(s) for s, _, _ in steps)
        if isinstance(seg, int) and typing.get_origin(tp) is list:
            steps.append((seg, typing.get_args(tp)[0], None))
        elif isinstance(seg, str) and dataclasses.is_dataclass(tp):
            fields = {f.name: f for f in dataclasses.fields(tp)}
            if seg not in fields:
                known = f" (known in '{here}': {', '.join(fields)})" if here else ""
                raise ConfigError(f"unknown config key '{dotted}'{known}")
            steps.append((seg, typing.get_type_hints(tp)[seg], fields[seg]))
        elif typing.get_origin(tp) is list:
            raise ConfigError(f"unknown config key '{dotted}': '{here}' is a list, so a number (its item index, "
                              f"from 0) must follow it")
        else:
            raise ConfigError(f"unknown config key '{dotted}': '{here}' is a single value, not a section or a list")
        tp = steps[-1][1]
    return steps


def resolve_key(key: str) -> str:
    """Return the dotted path of ``key``: itself if dotted and known, or the unique leaf with that name.

    A key may reach into a list by item index, from 0: ``lora.target_modules.1``,
    ``data.custom_tasks.0.label_column`` (the part before the first index may be a bare name too).
    """
    segments = key.split(".")
    first_index = next((i for i, s in enumerate(segments) if s.isdigit()), None)
    if first_index is not None:
        head = resolve_key(".".join(segments[:first_index])) if first_index else ""
        dotted = ".".join([head, *segments[first_index:]])
        _path(dotted)
        return dotted
    leaves = _leaf_keys()
    if key in leaves:
        return key
    matches = [k for k in leaves if k.rsplit(".", 1)[-1] == key]
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise ConfigError(f"config key '{key}' is ambiguous: write one of {matches}")
    raise ConfigError(f"unknown config key '{key}'")


def _default_list(fld: Any) -> list:
    """A fresh copy of a list field's default (``[]`` for a null default or a list item)."""
    if fld is None:
        return []
    if fld.default_factory is not dataclasses.MISSING:
        return list(fld.default_factory())
    return list(fld.default or []) if fld.default is not dataclasses.MISSING else []


def set_dotted(mapping: dict, dotted: str, value: Any) -> None:
    """Set ``dotted`` in a raw (YAML) config mapping, creating sections as needed.

    A list index reaches into the list the mapping holds, or into a copy of the field's default when it
    holds none (``lora.target_modules.1=key`` replaces ``value`` in ``[query, value]``); the index one past
    the end appends an item.
    """
    steps = _path(dotted)
    node: Any = mapping
    for i, (seg, _, fld) in enumerate(steps):
        parent = ".".join(str(s) for s, _, _ in steps[:i]) or "the config"
        if isinstance(seg, int):
            if not isinstance(node, list):
                raise ConfigError(f"config key '{parent}' must be a list to take '{dotted}'")
            if seg > len(node):
                raise ConfigError(f"config key '{dotted}': '{parent}' has {len(node)} item(s), so the index may be "
                                  f"at most {len(node)} (which appends one)")
            if seg == len(node):
                node.append(None)
        elif not isinstance(node, dict):
            raise ConfigError(f"config section '{parent}' must be a mapping")
        if i == len(steps) - 1:
            node[seg] = value
            return
        child = node[seg] if isinstance(seg, int) else node.get(seg)
        if child is None:
            child = _default_list(fld) if isinstance(steps[i + 1][0], int) else {}
            node[seg] = child
        node = child


@dataclass(frozen=True)
class KeyDoc:
    """What the config says about one key: its help text, default and (for a Literal) the values it takes."""

    key: str
    help: str
    default: Any
    choices: tuple | None  # None = any value of the type; an Optional Literal includes None
    type_name: str         # int, float, str, bool, list


def key_doc(dotted: str) -> KeyDoc:
    """The :class:`KeyDoc` of a leaf key (``"train.lr"``), read from its dataclass field."""
    _, tp, fld = _path(dotted)[-1]
    inner, optional = _optional_inner(tp)
    choices = None
    if typing.get_origin(inner) is Literal:
        choices = typing.get_args(inner) + ((None,) if optional else ())
    if fld.default_factory is not dataclasses.MISSING:
        default = fld.default_factory()
    else:
        default = None if fld.default is dataclasses.MISSING else fld.default
    origin = typing.get_origin(inner)
    type_name = ("str" if origin is Literal else "list" if origin is list else "dict" if origin is dict
                 else "|".join("str" if typing.get_origin(a) is Literal else a.__name__ for a in typing.get_args(inner))
                 if origin is typing.Union else getattr(inner, "__name__", str(inner)))
    return KeyDoc(dotted, fld.metadata.get("help", ""), default, choices, type_name)


def read_value(key: str, raw: str) -> Any:
    """A command-line value read as YAML (``1e-3``, ``[query,value]``, ``null``); bad YAML is a ConfigError naming ``key``."""
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config key '{key}': the value {raw!r} is not valid YAML "
                          f"({' '.join(str(exc).split())})") from None


def parse_override(text: str) -> tuple[str, Any]:
    """``"train.lr=1e-3"`` -> ``("train.lr", 0.001)``; the value is read as YAML."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like key=value")
    key, raw = text.split("=", 1)
    key = resolve_key(key.strip())
    return key, read_value(key, raw)


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file '{path}' does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file '{path}' is not valid YAML: {' '.join(str(exc).split())}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{path}' must hold a mapping at the top level")
    return data


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> RunConfig:
    """The validated RunConfig from a YAML file plus ``{dotted key: value}`` overrides."""
    data = load_yaml(path) if path else {}
    for dotted, value in (overrides or {}).items():
        set_dotted(data, resolve_key(dotted), value)
    return build(RunConfig, data)


#: Keys added with a default other than what runs made before them did: a snapshot that lacks one (a run's
#: config.json from before the key existed) was made with this value, not with today's default.
DEFAULT_BEFORE = {"server.clustering": "kmeans", "lora.dropout_draw": "bernoulli"}


def from_dict(data: dict) -> RunConfig:
    """The RunConfig of a complete snapshot (a run's ``config.json``, a Flower run config). Keys the snapshot
    predates take their defaults, except those in :data:`DEFAULT_BEFORE`, which take the value its run used."""
    data = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items()}
    for dotted, value in DEFAULT_BEFORE.items():
        section, key = dotted.split(".")
        if isinstance(data.get(section), dict):
            data[section].setdefault(key, value)
    return build(RunConfig, data)
