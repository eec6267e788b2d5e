"""A tiny real run of every method through the in-process engine: files, byte accounting, determinism, resume.

The backbone is a 2-layer, 32-wide random BERT written to a temporary folder with the packaged MiniLM
tokenizer, and the two tasks are hand-written sentences, so no corpus is loaded and a run takes about a second.
"""

from __future__ import annotations

import itertools
import json
import shutil
from collections import defaultdict

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from fltac.config import load_config
from fltac.data.tasks import Task
from fltac.engines import inprocess
from fltac.engines.inprocess import InProcessEngine, RunError, run

SUMMARY_KEYS = {"method", "per_task_accuracy", "mean_accuracy", "clustering_accuracy", "uplink_bytes",
                "downlink_bytes", "trainable_params_per_adapter", "rounds", "wall_seconds"}
HIDDEN = 32


# ---- fixtures: a tiny backbone and two hand-made tasks -----------------------------------------------

@pytest.fixture(scope="module")
def tiny_model(tiny_bert) -> str:
    """The session's tiny random BERT (tests/conftest.py): 2 layers, hidden 32, MiniLM's tokenizer."""
    return tiny_bert


POSITIVE = ["I loved this film", "what a wonderful day", "the food was delicious", "a truly great experience",
            "the staff were friendly and kind", "I am very happy with it", "brilliant acting and a lovely story",
            "this is the best purchase ever", "the concert was fantastic", "such a pleasant surprise",
            "highly recommended to everyone", "the view was beautiful", "it works perfectly well",
            "an excellent and enjoyable book", "my kids adored the show", "superb service all round"]
NEGATIVE = ["I hated this film", "what a terrible day", "the food was awful", "a truly horrible experience",
            "the staff were rude and slow", "I am very angry about it", "dreadful acting and a boring story",
            "this is the worst purchase ever", "the concert was a disaster", "such a nasty surprise",
            "avoid it at all costs", "the view was ugly", "it broke after one hour",
            "a dull and tedious book", "my kids cried during the show", "appalling service all round"]
SPORT = ["the striker scored a late goal", "the team won the league title", "a tennis match went to five sets",
         "the runner broke the world record", "the coach praised the defenders", "fans cheered in the stadium",
         "the cyclist won the mountain stage", "a boxer retained his belt", "the keeper saved a penalty",
         "the swimmer took gold in the relay", "rugby fans filled the ground", "the golfer sank a long putt"]
COOKING = ["stir the sauce over a low heat", "bake the bread for forty minutes", "chop the onions finely",
           "season the soup with salt and pepper", "whisk the eggs with sugar", "roast the chicken with garlic",
           "simmer the beans until soft", "knead the dough on a floured board", "grill the fish with lemon",
           "fry the mushrooms in butter", "add fresh basil to the pasta", "melt the chocolate gently"]
WEATHER = ["heavy rain is expected tomorrow", "the forecast says sunny spells", "strong winds hit the coast",
           "snow fell across the hills overnight", "temperatures will drop below zero", "a heatwave is on the way",
           "fog will clear by midday", "thunderstorms are likely this evening", "light showers in the north",
           "a frost warning for tonight", "clear skies and a cold night", "humid air brings more storms"]


def _task(name: str, groups: dict[str, list[str]], n_test: int) -> Task:
    """First ``n_test`` sentences of each label for the test split (round robin), the rest for training."""
    labels = sorted(groups)
    train_x, train_y, test_x, test_y = [], [], [], []
    for j, label in enumerate(labels):
        per_label = n_test // len(labels)
        test_x += groups[label][:per_label]
        test_y += [j] * per_label
        train_x += groups[label][per_label:]
        train_y += [j] * (len(groups[label]) - per_label)
    # training texts repeated with small variations so each task has ~40 rows
    extra = [(f"{x}, really", y) for x, y in zip(train_x, train_y)]
    train_x += [x for x, _ in extra]
    train_y += [y for _, y in extra]
    return Task(name, labels, train_x, np.array(train_y, dtype=np.int64), test_x, np.array(test_y, dtype=np.int64))


@pytest.fixture(scope="module")
def tasks() -> list[Task]:
    sentiment = _task("sentiment", {"negative": NEGATIVE, "positive": POSITIVE}, 12)
    topic = _task("topic", {"cooking": COOKING, "sport": SPORT, "weather": WEATHER}, 12)
    assert len(sentiment.train_texts) == 40 and len(topic.train_texts) == 48
    assert len(sentiment.test_texts) == 12 and len(topic.test_texts) == 12
    return [sentiment, topic]


def make_cfg(model: str, out, **extra):
    overrides = {"model_name": model, "output_dir": str(out), "partition.n_clients": 2, "train.rounds": 1,
                 "train.local_steps": 2, "train.batch_size": 4, "eval.eval_size": 8, "dtype": "float32",
                 "partition.min_frac": 0.0, "data.max_length": 32}
    overrides.update(extra)
    return load_config(None, overrides)


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def adapter_groups(path) -> dict[str, dict[str, torch.Tensor]]:
    """``slotN/key`` tensors of an adapter file, grouped by slot."""
    groups: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    for name, tensor in load_file(str(path)).items():
        slot, key = name.split("/", 1)
        groups[slot][key] = tensor
    return dict(groups)


def assert_same_adapter_file(a, b) -> None:
    """Byte-identical safetensors files."""
    assert a.read_bytes() == b.read_bytes(), f"{a} and {b} differ"


def nbytes(state: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


def best_matching_accuracy(true: list[int], pred: list[int]) -> float:
    """Clustering accuracy by brute force over all one-to-one maps of clusters to tasks."""
    clusters, labels = sorted(set(pred)), sorted(set(true))
    best = 0
    for perm in itertools.permutations(labels + [None] * len(clusters), len(clusters)):
        mapping = dict(zip(clusters, perm))
        best = max(best, sum(1 for t, p in zip(true, pred) if mapping[p] == t))
    return best / len(true)


@pytest.fixture(scope="module")
def fltac_run(tiny_model, tasks, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "fltac"
    cfg = make_cfg(tiny_model, out)
    summary = run(cfg, tasks=tasks, quiet=True)
    return cfg, out, summary


# ---- FL-TAC: what a run leaves behind ----------------------------------------------------------------

def test_fltac_summary(fltac_run, tasks):
    cfg, out, summary = fltac_run
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk == summary
    assert SUMMARY_KEYS <= set(summary)
    assert summary["method"] == "fltac" and summary["rounds"] == 1
    assert set(summary["per_task_accuracy"]) == {t.name for t in tasks}
    for acc in summary["per_task_accuracy"].values():
        assert 0.0 <= acc <= 1.0
    assert summary["mean_accuracy"] == pytest.approx(np.mean(list(summary["per_task_accuracy"].values())))
    assert 0.0 <= summary["clustering_accuracy"] <= 1.0
    assert summary["wall_seconds"] >= 0
    assert json.loads((out / "config.json").read_text()) == cfg.to_dict()


def test_fltac_metrics_and_cluster_records(fltac_run, tasks):
    cfg, out, summary = fltac_run
    metrics = read_jsonl(out / "metrics.jsonl")
    phases = {m["phase"] for m in metrics}
    assert phases == {"local", "eval", "round"}
    local = [m for m in metrics if m["phase"] == "local"]
    jobs = sorted({(m["client"], m["key"]) for m in local})
    # routed batches (the default): an adapter steps in each of its client's local_steps x (its adapters) steps
    # that holds rows of its task, numbered 1, 2, ...; never more than its client's steps
    assert cfg.train.batching == "routed"
    for job in jobs:
        steps = sorted(m["step"] for m in local if (m["client"], m["key"]) == job)
        held = len({k for c, k in jobs if c == job[0]})
        assert steps == list(range(1, len(steps) + 1)) and 1 <= len(steps) <= cfg.train.local_steps * held
    evals = [m for m in metrics if m["phase"] == "eval"]
    assert sorted(e["task"] for e in evals) == sorted(t.name for t in tasks)
    assert {e["task"]: e["accuracy"] for e in evals} == summary["per_task_accuracy"]
    for e in evals:   # eval_size = 8 test rows per task: accuracy is a multiple of 1/8
        assert e["accuracy"] * 8 == pytest.approx(round(e["accuracy"] * 8))
    (round_rec,) = [m for m in metrics if m["phase"] == "round"]
    assert round_rec["round"] == 1 and round_rec["submissions"] == len(jobs)

    clusters = read_jsonl(out / "cluster_assignments.jsonl")
    assert len(clusters) == cfg.train.rounds
    rec = clusters[0]
    assert rec["round"] == 1
    assert 0.0 <= rec["clustering_accuracy"] <= 1.0
    assert sorted((a["client"], a["key"]) for a in rec["assignments"]) == jobs
    names = [t.name for t in tasks]
    true = [names.index(a["task"]) for a in rec["assignments"]]
    pred = [a["cluster"] for a in rec["assignments"]]
    assert rec["clustering_accuracy"] == pytest.approx(best_matching_accuracy(true, pred))
    assert summary["clustering_accuracy"] == rec["clustering_accuracy"]
    # the per-(client, task) sample counts are the partition's: every training row is held once
    for t, task in enumerate(tasks):
        assert sum(a["n"] for a in rec["assignments"] if a["task"] == task.name) == len(task.train_texts)


def test_fltac_adapter_file_and_byte_accounting(fltac_run, tasks):
    cfg, out, summary = fltac_run
    path = out / "adapters" / "round_1.safetensors"
    groups = adapter_groups(path)
    n_outputs = sum(len(t.labels) for t in tasks)
    assert sorted(groups) == [f"slot{i}" for i in range(len(tasks))]    # K = number of tasks
    for state in groups.values():
        lora_a = [k for k in state if ".lora_A." in k]
        lora_b = [k for k in state if ".lora_B." in k]
        assert lora_a and len(lora_a) == len(lora_b)
        # query and value of both layers
        assert len(lora_a) == 2 * len(cfg.lora.target_modules)
        for k in lora_a:
            assert tuple(state[k].shape) == (cfg.rank, HIDDEN)
        for k in lora_b:
            assert tuple(state[k].shape) == (HIDDEN, cfg.rank)
        assert tuple(state["classifier.weight"].shape) == (n_outputs, HIDDEN)
        assert all(v.dtype == torch.float32 for v in state.values())
    one = groups["slot0"]
    assert summary["trainable_params_per_adapter"] == sum(v.numel() for v in one.values())

    metrics = read_jsonl(out / "metrics.jsonl")
    local = [m for m in metrics if m["phase"] == "local"]
    n_subs = len({(m["client"], m["key"]) for m in local})
    n_clients = len({m["client"] for m in local})
    assert summary["uplink_bytes"] == n_subs * nbytes(one)
    # round 1: every client is sent the one initial adapter once, whatever number of jobs it runs
    assert summary["downlink_bytes"] == n_clients * nbytes(one)


def test_same_config_twice_gives_identical_adapters(fltac_run, tiny_model, tasks, tmp_path):
    cfg, out, summary = fltac_run
    again = make_cfg(tiny_model, tmp_path / "again")
    summary2 = run(again, tasks=tasks, quiet=True)
    name = "adapters/round_1.safetensors"
    assert_same_adapter_file(tmp_path / "again" / name, out / name)
    assert_same_adapter_file(tmp_path / "again" / "checkpoint" / "round_1.safetensors",
                             out / "checkpoint" / "round_1.safetensors")
    for k in SUMMARY_KEYS - {"wall_seconds"}:
        assert summary2[k] == summary[k], k


def test_used_output_dir_is_refused(fltac_run, tasks):
    cfg, out, _ = fltac_run
    before = (out / "metrics.jsonl").read_bytes()
    with pytest.raises(RunError):
        run(cfg, tasks=tasks, quiet=True)
    assert (out / "metrics.jsonl").read_bytes() == before


# ---- the baselines -----------------------------------------------------------------------------------

@pytest.mark.parametrize("method, n_slots, rank", [("fedit", 1, 16), ("centralized", 2, 4)])
def test_baseline_runs(method, n_slots, rank, tiny_model, tasks, tmp_path):
    cfg = make_cfg(tiny_model, tmp_path / method, method=method)
    summary = run(cfg, tasks=tasks, quiet=True)
    assert SUMMARY_KEYS <= set(summary)
    assert summary["method"] == method
    assert summary["clustering_accuracy"] is None
    assert set(summary["per_task_accuracy"]) == {t.name for t in tasks}
    metrics = read_jsonl(tmp_path / method / "metrics.jsonl")
    assert {m["phase"] for m in metrics} == {"local", "eval", "round"}
    clusters = tmp_path / method / "cluster_assignments.jsonl"
    assert not clusters.exists() or read_jsonl(clusters) == []

    groups = adapter_groups(tmp_path / method / "adapters" / "round_1.safetensors")
    assert len(groups) == n_slots
    one = groups["slot0"]
    for k, v in one.items():
        if ".lora_A." in k:
            assert v.shape[0] == rank
    local = [m for m in metrics if m["phase"] == "local"]
    subs = {(m["client"], m["key"]) for m in local}
    assert summary["uplink_bytes"] == len(subs) * nbytes(one)
    if method == "fedit":
        # one shared adapter per client, trained local_steps x (tasks it holds) steps over its mixed data
        assert all(key == "a0" for _, key in subs)
        for client, key in subs:
            steps = [m for m in local if m["client"] == client]
            held = steps[0]["task"].split("+")
            assert len(steps) == cfg.train.local_steps * len(held)
    else:
        # one pooled client, one job per task, each local_steps x (clients holding the task) steps
        assert subs == {(0, f"a{t}") for t in range(len(tasks))}
        for t, task in enumerate(tasks):
            rows = [m for m in local if m["key"] == f"a{t}"]
            assert {m["task"] for m in rows} == {task.name}
            assert rows[0]["n"] == len(task.train_texts)
        assert summary["downlink_bytes"] == nbytes(one)   # the initial adapter, sent once to the one client


# ---- resume ------------------------------------------------------------------------------------------

class SimulatedCrash(Exception):
    pass


def _crash_in(monkeypatch, method_name: str, at_round: int):
    original = getattr(InProcessEngine, method_name)

    def crashing(self, exp, r, *args, **kwargs):
        if r == at_round:
            raise SimulatedCrash(f"simulated kill in {method_name} at round {r}")
        return original(self, exp, r, *args, **kwargs)

    monkeypatch.setattr(InProcessEngine, method_name, crashing)


def _without_timings(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in ("seconds", "train_seconds")} for r in records]


@pytest.fixture(scope="module")
def two_round_run(tiny_model, tasks, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "two_rounds"
    cfg = make_cfg(tiny_model, out, **{"train.rounds": 2})
    summary = run(cfg, tasks=tasks, quiet=True)
    return cfg, out, summary


@pytest.mark.parametrize("crash_point", ["evaluate", "_save_checkpoint"])
def test_resume_after_crash_reproduces_the_uninterrupted_run(crash_point, two_round_run, tiny_model, tasks,
                                                             tmp_path, monkeypatch):
    cfg_a, out_a, summary_a = two_round_run
    out_b = tmp_path / "b"
    cfg_b = make_cfg(tiny_model, out_b, **{"train.rounds": 2})
    # "evaluate": killed before round 2's records are written; "_save_checkpoint": killed after round 2's
    # metrics and adapters were written but before its checkpoint, so the resume must drop those records
    _crash_in(monkeypatch, crash_point, at_round=2)
    with pytest.raises(SimulatedCrash):
        run(cfg_b, tasks=tasks, quiet=True)
    monkeypatch.undo()
    assert json.loads((out_b / "checkpoint" / "latest.json").read_text())["round"] == 1
    assert not (out_b / "summary.json").exists()
    logged = {m["round"] for m in read_jsonl(out_b / "metrics.jsonl")}
    assert logged == ({1, 2} if crash_point == "_save_checkpoint" else {1})

    summary_b = run(cfg_b, resume=True, tasks=tasks, quiet=True)

    for name in ("adapters/round_1.safetensors", "adapters/round_2.safetensors"):
        assert_same_adapter_file(out_a / name, out_b / name)
    strip = lambda s: {k: v for k, v in s.items() if k != "wall_seconds"}  # noqa: E731
    assert strip(summary_b) == strip(summary_a)
    assert strip(json.loads((out_b / "summary.json").read_text())) == strip(summary_a)
    assert _without_timings(read_jsonl(out_b / "metrics.jsonl")) == _without_timings(read_jsonl(out_a / "metrics.jsonl"))
    assert read_jsonl(out_b / "cluster_assignments.jsonl") == read_jsonl(out_a / "cluster_assignments.jsonl")
    assert len(read_jsonl(out_b / "cluster_assignments.jsonl")) == 2


def test_two_round_downlink_counts_distinct_slots_per_client(two_round_run):
    cfg, out, summary = two_round_run
    one = adapter_groups(out / "adapters" / "round_1.safetensors")["slot0"]
    rounds = [m for m in read_jsonl(out / "metrics.jsonl") if m["phase"] == "round"]
    assert [r["round"] for r in rounds] == [1, 2]
    clusters = read_jsonl(out / "cluster_assignments.jsonl")
    assert [c["round"] for c in clusters] == [1, 2]
    first = clusters[0]["assignments"]
    clients = {a["client"] for a in first}
    # round 1: the initial adapter once per client; round 2: each distinct slot a client's jobs were assigned
    assert rounds[0]["downlink_bytes"] == len(clients) * nbytes(one)
    distinct = sum(len({a["cluster"] for a in first if a["client"] == c}) for c in clients)
    assert rounds[1]["downlink_bytes"] == distinct * nbytes(one)
    assert summary["downlink_bytes"] == rounds[0]["downlink_bytes"] + rounds[1]["downlink_bytes"]
    assert summary["uplink_bytes"] == sum(r["submissions"] for r in rounds) * nbytes(one)


def test_resume_with_a_different_seed_is_refused(two_round_run, tiny_model, tasks, tmp_path):
    cfg_a, out_a, _ = two_round_run
    copy = tmp_path / "copy"
    shutil.copytree(out_a, copy)
    cfg = make_cfg(tiny_model, copy, **{"train.rounds": 2, "seed": cfg_a.seed + 1})
    with pytest.raises(RunError) as err:
        run(cfg, resume=True, tasks=tasks, quiet=True)
    assert "seed" in str(err.value)
    assert "output_dir" not in str(err.value)     # the folder itself may differ on resume


def test_resume_of_a_finished_run_returns_its_summary(two_round_run, tiny_model, tasks, tmp_path, monkeypatch):
    cfg_a, out_a, summary_a = two_round_run
    copy = tmp_path / "copy"
    shutil.copytree(out_a, copy)

    def forbidden(*a, **k):
        raise AssertionError("a finished run must not be rebuilt")

    monkeypatch.setattr(inprocess, "build_experiment", forbidden)
    summary = run(make_cfg(tiny_model, copy, **{"train.rounds": 2}), resume=True, tasks=tasks, quiet=True)
    assert summary == summary_a


def test_overwrite_then_crash_then_resume_does_not_revive_the_old_run(two_round_run, tiny_model, tasks, tmp_path,
                                                                       monkeypatch):
    cfg_a, out_a, summary_a = two_round_run
    copy = tmp_path / "copy"
    shutil.copytree(out_a, copy)
    cfg = make_cfg(tiny_model, copy, **{"train.rounds": 2})
    _crash_in(monkeypatch, "run_round", at_round=1)
    with pytest.raises(SimulatedCrash):
        run(cfg, overwrite=True, tasks=tasks, quiet=True)
    monkeypatch.undo()
    # the replaced run is gone: nothing of it may be resumed or reported
    assert not (copy / "summary.json").exists()
    assert not (copy / "checkpoint" / "latest.json").exists()
    assert not (copy / "adapters" / "round_2.safetensors").exists()


def test_overwrite_replaces_a_finished_run(fltac_run, tiny_model, tasks, tmp_path):
    cfg, out, summary = fltac_run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    metrics_before = (copy / "metrics.jsonl").read_text()
    summary2 = run(make_cfg(tiny_model, copy), overwrite=True, tasks=tasks, quiet=True)
    # same config, so the same records again, written once (not appended to the old ones)
    assert _without_timings(read_jsonl(copy / "metrics.jsonl")) == _without_timings(
        [json.loads(line) for line in metrics_before.splitlines()])
    assert len(read_jsonl(copy / "cluster_assignments.jsonl")) == 1
    assert {k: v for k, v in summary2.items() if k != "wall_seconds"} == \
        {k: v for k, v in summary.items() if k != "wall_seconds"}
