"""Reliability: resume after SIGKILL, failing clients, submission checks, robust aggregation.

Runs use a 2-layer, 32-wide random BERT (written once per module with the packaged MiniLM tokenizer)
and two small generated tasks, so one run takes about a second. The kill tests start real
``python -m fltac run`` processes on a ``custom`` scenario read from CSV files.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from fltac import io, rng
from fltac.config import ConfigError, ReliabilityConfig, load_config
from fltac.data.tasks import Task
from fltac.engines import faults
from fltac.engines.faults import ClientFault, corrupt, draw_client_fault, run_client, tamper
from fltac.engines.inprocess import RunError, TooFewClients, run
from fltac.server.aggregate import weighted_mean
from fltac.server.robust import (Aggregation, clip_update, coordinate_median, finite_problem, screen, slots_problem,
                                 spec_of, state_norm, structure_problem, trimmed_mean, update_norm)
from fltac.methods import pooled_slots
from fltac.server.strategies import Centralized, Submission, make_strategy

ROOT = Path(__file__).resolve().parents[1]
HIDDEN = 32


# ---- data and model ----------------------------------------------------------------------------------

def _sentiment() -> dict[str, list[str]]:
    nouns = ["film", "meal", "hotel", "book", "concert", "service", "game", "trip"]
    good = ["great", "lovely", "wonderful", "excellent", "superb"]
    bad = ["awful", "terrible", "dreadful", "boring", "horrible"]
    return {"negative": [f"the {n} was {a}" for n in nouns for a in bad][:36],
            "positive": [f"the {n} was {a}" for n in nouns for a in good][:36]}


def _topic() -> dict[str, list[str]]:
    sport = ["the striker scored", "the team won the cup", "the runner set a record", "the keeper saved it"]
    cooking = ["stir the sauce gently", "bake the bread slowly", "chop the onions finely", "roast the chicken"]
    weather = ["heavy rain tomorrow", "sunny spells later", "strong winds tonight", "snow on the hills"]
    tails = ["", " today", " again", " this week", " once more", " at last", " as planned"]
    return {name: [s + t for t in tails for s in group][:24]
            for name, group in (("sport", sport), ("cooking", cooking), ("weather", weather))}


def _split(groups: dict[str, list[str]], n_test_per_label: int):
    """(train rows, test rows) as (text, label) pairs; the first sentences of each label are the test split."""
    train, test = [], []
    for label, texts in sorted(groups.items()):
        test += [(t, label) for t in texts[:n_test_per_label]]
        train += [(t, label) for t in texts[n_test_per_label:]]
    return train, test


DATA = {"sentiment": _split(_sentiment(), 6), "topic": _split(_topic(), 4)}


def _task(name: str) -> Task:
    train, test = DATA[name]
    labels = sorted({y for _, y in train})
    ids = {y: i for i, y in enumerate(labels)}
    return Task(name, labels, [x for x, _ in train], np.array([ids[y] for _, y in train], dtype=np.int64),
                [x for x, _ in test], np.array([ids[y] for _, y in test], dtype=np.int64))


@pytest.fixture(scope="module")
def tasks() -> list[Task]:
    return [_task("sentiment"), _task("topic")]


@pytest.fixture(scope="module")
def tiny_model(tiny_bert) -> str:
    """The session's tiny random BERT (tests/conftest.py): 2 layers, hidden 32, MiniLM's tokenizer."""
    return tiny_bert


BASE = {"partition.n_clients": 4, "train.rounds": 2, "train.local_steps": 2, "train.batch_size": 4,
        "eval.eval_size": 8, "dtype": "float32", "partition.min_frac": 0.0, "data.max_length": 32}


def make_cfg(model: str, out, **extra):
    return load_config(None, {"model_name": model, "output_dir": str(out), **BASE, **extra})


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def phase(records: list[dict], name: str) -> list[dict]:
    return [r for r in records if r["phase"] == name]


def without_timings(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in ("seconds", "train_seconds")} for r in records]


def strip_wall(summary: dict) -> dict:
    return {k: v for k, v in summary.items() if k != "wall_seconds"}


# ---- robust rules on hand-made inputs ----------------------------------------------------------------

def _states(*rows) -> list[dict[str, torch.Tensor]]:
    return [{"w": torch.tensor(r, dtype=torch.float32)} for r in rows]


def test_coordinate_median_odd_and_even():
    odd = coordinate_median(_states([1.0, 10.0], [3.0, -2.0], [2.0, 4.0]))
    assert odd["w"].tolist() == [2.0, 4.0]
    even = coordinate_median(_states([1.0, 10.0], [3.0, -2.0], [2.0, 4.0], [100.0, 0.0]))
    # sorted columns: [1, 2, 3, 100] -> (2 + 3) / 2; [-2, 0, 4, 10] -> (0 + 4) / 2
    assert even["w"].tolist() == [2.5, 2.0]
    assert even["w"].dtype == torch.float32


def test_trimmed_mean_equals_its_formula():
    values = [[5.0], [1.0], [1000.0], [2.0], [-7.0]]
    # n = 5, trim 0.2 -> b = 1: drop -7 and 1000, mean of 1, 2, 5
    assert trimmed_mean(_states(*values), 0.2)["w"].tolist() == pytest.approx([8.0 / 3.0])
    # trim 0.4 -> b = 2: the median
    assert trimmed_mean(_states(*values), 0.4)["w"].tolist() == [2.0]
    # trim 0 is the plain mean; n = 4 with trim 0.2 -> b = 0 (floor), nothing trimmed
    assert trimmed_mean(_states(*values), 0.0)["w"].tolist() == pytest.approx([sum(v[0] for v in values) / 5])
    assert trimmed_mean(_states(*values[:4]), 0.2)["w"].tolist() == pytest.approx([1008.0 / 4])
    with pytest.raises(ValueError):
        trimmed_mean(_states(*values), 0.5)


def test_trimmed_mean_is_coordinate_wise():
    rows = np.random.default_rng(0).normal(size=(7, 3, 2))
    out = trimmed_mean([{"w": torch.tensor(r)} for r in rows], 0.3)["w"].numpy()   # b = 2
    expected = np.sort(rows, axis=0)[2:5].mean(0)
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-12)


def test_clip_update_equals_its_formula():
    start = {"a": torch.tensor([1.0, 1.0]), "b": torch.tensor([0.0])}
    state = {"a": torch.tensor([4.0, 1.0]), "b": torch.tensor([4.0])}      # u = (3, 0, 4), ||u|| = 5
    assert update_norm(state, start) == pytest.approx(5.0)
    clipped = clip_update(state, start, 1.0)                              # s0 + u / 5
    assert clipped["a"].tolist() == pytest.approx([1.6, 1.0])
    assert clipped["b"].tolist() == pytest.approx([0.8])
    assert update_norm(clipped, start) == pytest.approx(1.0)
    assert clip_update(state, start, 5.0) is state                        # short enough: unchanged


def test_aggregation_rules_compose_with_clipping():
    starts = _states([0.0], [0.0], [10.0])
    states = _states([1.0], [3.0], [10.0 + 30.0])    # updates 1, 3, 30
    weights = [1.0, 1.0, 2.0]
    assert Aggregation("fedavg")(states, starts, weights)["w"].tolist() == \
        weighted_mean(states, weights)["w"].tolist() == pytest.approx([(1 + 3 + 80) / 4])
    assert Aggregation("median")(states, starts, weights)["w"].tolist() == [3.0]
    # clip to 2: updates become 1, 2, 2 -> states 1, 2, 12
    assert Aggregation("fedavg", clip_norm=2.0)(states, starts, weights)["w"].tolist() == \
        pytest.approx([(1 + 2 + 24) / 4])
    assert Aggregation("median", clip_norm=2.0)(states, starts, weights)["w"].tolist() == [2.0]
    assert Aggregation("trimmed_mean", trim_fraction=0.34)(states, starts, weights)["w"].tolist() == [3.0]


def test_merge_applies_the_rule_inside_each_slot():
    initial = {"w": torch.zeros(2)}
    strategy = Centralized(initial, pooled_slots(3))
    strategy.aggregation = Aggregation("median")
    rows = {"a0": [[1.0, 0.0], [2.0, 5.0], [9.0, 1.0]], "a1": [[4.0, 4.0], [6.0, 8.0]]}
    subs = [Submission(c, key, {"w": torch.tensor(r)}, 1, initial) for key, rs in rows.items()
            for c, r in enumerate(rs)]
    strategy.aggregate(1, subs)
    assert strategy.slots_[0]["w"].tolist() == [2.0, 1.0]
    assert strategy.slots_[1]["w"].tolist() == [5.0, 6.0]
    assert strategy.slots_[2] is initial             # no submission: the slot keeps its adapter


@pytest.mark.parametrize("method", ["fltac", "fedit", "centralized"])
def test_every_method_gets_the_configured_rule(method):
    cfg = load_config(None, {"method": method, "reliability.aggregation": "trimmed_mean",
                             "reliability.trim_fraction": 0.3, "reliability.clip_norm": 2.5})
    initial = {"x.lora_A.weight": torch.zeros(2, 2), "classifier.weight": torch.zeros(2, 2)}
    strategy = make_strategy(cfg, initial, 2, ["x.lora_A.weight"])
    assert strategy.aggregation == Aggregation("trimmed_mean", 0.3, 2.5)


# ---- validation rules: each rejects its bad input and accepts a good one -----------------------------

def _adapter(scale: float = 1.0) -> dict[str, torch.Tensor]:
    return {"l.lora_A.weight": torch.full((4, 8), 0.1 * scale), "l.lora_B.weight": torch.full((8, 4), 0.1 * scale),
            "classifier.weight": torch.full((3, 8), 0.1 * scale)}


START = {k: torch.zeros_like(v) for k, v in _adapter().items()}
SPEC = spec_of(START)


@pytest.mark.parametrize("name, bad, words", [
    ("missing", lambda s: {k: v for k, v in s.items() if k != "classifier.weight"}, ["missing", "classifier.weight"]),
    ("unexpected", lambda s: {**s, "extra.weight": torch.zeros(1)}, ["unexpected", "extra.weight"]),
    ("shape (rank 8)", lambda s: {**s, "l.lora_A.weight": torch.zeros(8, 8)}, ["shape", "(8, 8)", "(4, 8)"]),
    ("dtype", lambda s: {**s, "l.lora_B.weight": s["l.lora_B.weight"].double()}, ["dtype", "float64"]),
    ("nan", lambda s: {**s, "classifier.weight": torch.full((3, 8), float("nan"))}, ["non-finite", "classifier"]),
    ("inf", lambda s: {**s, "l.lora_A.weight": s["l.lora_A.weight"].clone().fill_(float("inf"))}, ["non-finite"]),
])
def test_each_structural_and_finite_rule(name, bad, words):
    good = _adapter()
    assert structure_problem(good, SPEC) is None and finite_problem(good) is None
    reasons, _, _ = screen([good, bad(_adapter())], [START, START], [SPEC, SPEC], [0, 1])
    assert reasons[0] is None
    assert reasons[1] is not None and all(w in reasons[1] for w in words), reasons[1]


def test_norm_bound_relative_to_the_round_median():
    honest = [_adapter(1.0 + 0.1 * i) for i in range(9)]
    scaled = _adapter(100.0)
    reasons, bound, _ = screen(honest + [scaled], [START] * 10, [SPEC] * 10, list(range(10)), norm_bound_factor=10.0)
    norms = sorted(update_norm(s, START) for s in honest + [scaled])
    assert bound == pytest.approx(10.0 * norms[4])          # lower median of 10: the 5th smallest
    assert reasons[:9] == [None] * 9
    assert "exceeds the bound" in reasons[9]
    # a looser factor lets it through; an absolute bound overrides the factor
    assert screen(honest + [scaled], [START] * 10, [SPEC] * 10, list(range(10)), norm_bound_factor=1000.0)[0][9] is None
    reasons, bound, _ = screen(honest, [START] * 9, [SPEC] * 9, list(range(9)), norm_bound=update_norm(honest[4], START))
    assert bound == pytest.approx(update_norm(honest[4], START))
    assert reasons[:5] == [None] * 5 and all(r and "norm_bound" in r for r in reasons[5:])


def test_half_scaled_updates_are_still_rejected():
    subs = [_adapter(1.0), _adapter(1.1), _adapter(100.0), _adapter(120.0)]
    reasons, bound, _ = screen(subs, [START] * 4, [SPEC] * 4, [0, 1, 2, 3])
    assert bound == pytest.approx(10.0 * update_norm(subs[1], START))
    assert reasons[:2] == [None, None] and reasons[2] and reasons[3]


def test_broken_submissions_do_not_move_the_median_bound():
    # bound from the valid, finite ones only: NaN and wrong-shape submissions neither count nor crash
    subs = [_adapter(1.0), _adapter(1.0), corrupt(_adapter(), "nan", None), corrupt(_adapter(), "shape", None)]
    reasons, bound, _ = screen(subs, [START] * 4, [SPEC] * 4, [0, 1, 2, 3])
    assert reasons[0] is None and reasons[1] is None
    assert bound == pytest.approx(10.0 * update_norm(_adapter(1.0), START))


def test_one_client_with_most_adapters_does_not_outvote_the_others():
    # client 0 sends 4 adapters x100, clients 1-3 one honest adapter each: counted per adapter, the lower
    # median (4th of 7) would be an attacker's norm and let all four through; counted per client it is honest
    subs = [_adapter(100.0)] * 4 + [_adapter(1.0), _adapter(1.1), _adapter(1.2)]
    clients = [0, 0, 0, 0, 1, 2, 3]
    reasons, bound, reference = screen(subs, [START] * 7, [SPEC] * 7, clients)
    assert reference == pytest.approx(update_norm(_adapter(1.1), START))  # votes: x100, 1.0, 1.1, 1.2 -> 2nd
    assert bound == pytest.approx(10.0 * reference)
    assert all("over clients" in r for r in reasons[:4]) and reasons[4:] == [None] * 3


def test_a_lone_client_does_not_set_its_own_bound():
    scaled = [_adapter(100.0)] * 3
    # later rounds: the previous accepted round's reference
    reasons, bound, reference = screen(scaled, [START] * 3, [SPEC] * 3, [0, 0, 0], previous=0.5)
    assert reference == 0.5 and bound == pytest.approx(5.0)
    assert all("previous round" in r for r in reasons)
    # round 1: the norm of the adapter it was sent; an honest update well inside it passes
    start = _adapter(1.0)
    moved = {k: v + 0.01 for k, v in start.items()}
    x100 = {k: 100.0 * v for k, v in moved.items()}
    reasons, bound, reference = screen([moved, x100], [start, start], [SPEC, SPEC], [0, 0])
    assert bound == pytest.approx(10.0 * state_norm(start))
    assert reasons[0] is None and "adapter sent" in reasons[1]


@pytest.mark.parametrize("kind", faults.CORRUPT_KINDS)
def test_every_corruption_is_rejected(kind):
    honest = [_adapter(0.1 + 0.005 * i) for i in range(5)]
    bad = corrupt(_adapter(), kind, np.random.default_rng(0), scale=100.0, noise_std=1.0)
    reasons, _, _ = screen(honest + [bad], [START] * 6, [SPEC] * 6, list(range(6)))
    assert reasons[:5] == [None] * 5
    assert reasons[5] is not None


# ---- adapter files -----------------------------------------------------------------------------------

def test_slots_problem_names_rank_backbone_and_slot_count():
    spec = spec_of({"l.lora_A.weight": torch.zeros(4, 32), "l.lora_B.weight": torch.zeros(32, 4)})
    ok = {f"slot{i}/{k}": torch.zeros(shape) for i in range(2) for k, (shape, _) in spec.items()}
    assert slots_problem({**ok, "rng/torch": torch.zeros(3, dtype=torch.uint8)}, spec, 2) is None
    rank8 = {k: torch.zeros(8, 32) if "lora_A" in k else torch.zeros(32, 8) for k in ok}
    assert "made for LoRA rank 8; this run uses rank 4" in slots_problem(rank8, spec, 2)
    wide = {k: torch.zeros(4, 64) if "lora_A" in k else torch.zeros(64, 4) for k in ok}
    assert "another backbone" in slots_problem(wide, spec, 2)
    renamed = {k.replace("l.", "m."): v for k, v in ok.items()}
    assert "another backbone or lora.target_modules" in slots_problem(renamed, spec, 2)
    assert "holds 2 adapter slot(s), this run has 3" in slots_problem(ok, spec, 3)


# ---- fault draws and the client runner ---------------------------------------------------------------

def test_fault_draws_are_seeded_and_independent_of_order():
    rel = ReliabilityConfig(crash_prob=0.3, hang_prob=0.3, client_timeout_s=10.0, corrupt_prob=0.3)
    a = [draw_client_fault(rel, 42, r, c, 3) for r in range(1, 6) for c in range(10)]
    b = [draw_client_fault(rel, 42, r, c, 3) for r in range(5, 0, -1) for c in range(9, -1, -1)][::-1]
    assert a == b
    kinds = [f.kind for f in a]
    assert 0 < kinds.count("crash") < 50 and 0 < kinds.count("hang") < 50
    assert draw_client_fault(ReliabilityConfig(), 42, 1, 0, 3) == ClientFault(None)
    state = _adapter()
    for r, c in [(r, c) for r in range(1, 4) for c in range(10)]:
        s1, n1 = tamper(rel, 42, r, c, "a1", state)
        s2, n2 = tamper(rel, 42, r, c, "a1", state)
        assert n1 == n2 and {k: v.numpy().tobytes() for k, v in s1.items()} == \
            {k: v.numpy().tobytes() for k, v in s2.items()}


class _Job:
    def __init__(self, key):
        self.key = key


def test_run_client_drops_a_real_exception_as_a_crash():
    def train(job):
        if job.key == "a1":
            raise ValueError("disk full\nsecond line")
        return job.key
    out = run_client(0, [_Job("a0"), _Job("a1"), _Job("a2")], train, ReliabilityConfig(), 0, 1)
    assert out.kind == "crash" and out.reason == "crash: ValueError: disk full"
    assert [j.key for j, _ in out.done] == ["a0"]


def test_run_client_interrupts_a_really_hanging_client():
    def train(job):
        time.sleep(5.0)
    t0 = time.perf_counter()
    out = run_client(0, [_Job("a0")], train, ReliabilityConfig(client_timeout_s=0.2), 0, 1)
    assert time.perf_counter() - t0 < 2.0
    assert out.kind == "timeout" and "interrupted" in out.reason


def test_run_client_measured_time_drops_a_slow_client_off_the_main_thread():
    result = {}

    def work():   # no SIGALRM off the main thread: the measured time alone decides
        result["out"] = run_client(0, [_Job("a0")], lambda job: time.sleep(0.3),
                                   ReliabilityConfig(client_timeout_s=0.1), 0, 1)
    t = threading.Thread(target=work)
    t.start()
    t.join()
    assert result["out"].kind == "timeout" and "took" in result["out"].reason


def test_run_client_injected_hang_uses_the_same_time_check():
    rel = ReliabilityConfig(hang_prob=1.0, hang_seconds=30.0, client_timeout_s=5.0)
    trained = []
    out = run_client(3, [_Job("a0"), _Job("a1")], trained.append, rel, 7, 2)
    assert out.kind == "timeout" and "injected hang of 30 s exceeds client_timeout_s = 5 s" in out.reason
    assert len(trained) == out.injected.at          # the jobs before the hang ran; nothing after it
    short = ReliabilityConfig(hang_prob=1.0, hang_seconds=0.5, client_timeout_s=5.0)
    out = run_client(3, [_Job("a0"), _Job("a1")], lambda job: job.key, short, 7, 2)
    assert out.kind is None and len(out.done) == 2   # a stall shorter than the limit is not a failure


# ---- config ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("key, value", [
    ("reliability.crash_prob", 1.5), ("reliability.corrupt_prob", -0.1), ("reliability.trim_fraction", 0.5),
    ("reliability.min_clients_per_round", 0), ("reliability.norm_bound_factor", 0.5),
    ("reliability.clip_norm", 0.0), ("reliability.aggregation", "mean"), ("reliability.attack", "flip"),
    ("reliability.hang_prob", 0.1),            # without client_timeout_s
    ("reliability.attacker_clients", [10]),    # n_clients = 10
    ("reliability.attack", "none"),            # attackers named, no attack
])
def test_reliability_config_is_checked(key, value):
    other = {"reliability.attacker_clients": [1]} if key == "reliability.attack" else \
        {"reliability.attack": "nan"} if key == "reliability.attacker_clients" else {}
    with pytest.raises(ConfigError) as err:
        load_config(None, {key: value, **other})
    assert f"'{key}'" in str(err.value)


# ---- runs with failing clients -----------------------------------------------------------------------

FAULTY = {"partition.n_clients": 6, "reliability.crash_prob": 0.25, "reliability.hang_prob": 0.25,
          "reliability.client_timeout_s": 60.0, "reliability.corrupt_prob": 0.3}


@pytest.fixture(scope="module")
def faulty_run(tiny_model, tasks, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "faulty"
    cfg = make_cfg(tiny_model, out, **FAULTY)
    return cfg, out, run(cfg, tasks=tasks, quiet=True)


def test_injected_crash_hang_and_corruption_are_dropped_and_the_run_finishes(faulty_run):
    cfg, out, summary = faulty_run
    records = read_jsonl(out / "metrics.jsonl")
    dropped, injected = phase(records, "dropped"), phase(records, "injected")
    assert {d["kind"] for d in dropped} == {"crash", "timeout", "invalid"}
    assert summary["dropped_submissions"] == len(dropped) == sum(r["dropped"] for r in phase(records, "round"))
    local = {(m["round"], m["client"], m["key"]) for m in phase(records, "local")}
    for r in range(1, cfg.train.rounds + 1):
        jobs = {(c, k) for rr, c, k in local if rr == r}
        failed = {i["client"]: i["fault"] for i in injected if i["round"] == r and i["fault"] in ("crash", "hang")}
        corrupted = {(i["client"], i["key"]) for i in injected if i["round"] == r and i["fault"].startswith("corrupt")}
        gone = {(d["client"], d["key"]): d for d in dropped if d["round"] == r}
        # every adapter of a crashed or hung client is dropped with that reason
        for c, fault in failed.items():
            mine = [d for (cc, _), d in gone.items() if cc == c]
            assert mine and all(d["kind"] == {"crash": "crash", "hang": "timeout"}[fault] for d in mine)
            assert all(d["reason"].startswith(d["kind"]) for d in mine)
        # every corrupted adapter of a surviving client is rejected by validation, and nothing else is
        assert {k for k, d in gone.items() if d["kind"] == "invalid"} == \
            {k for k in corrupted if k[0] not in failed}
        # what reached the strategy is exactly what was not dropped
        (row,) = [c for c in read_jsonl(out / "cluster_assignments.jsonl") if c["round"] == r]
        clustered = {(a["client"], a["key"]) for a in row["assignments"]}
        assert clustered == {k for k in jobs | set(gone) if k not in gone}
    for name, t in load_file(str(out / "adapters" / f"round_{cfg.train.rounds}.safetensors")).items():
        assert torch.isfinite(t).all(), name
    assert summary["mean_accuracy"] is not None


def test_a_missed_round_keeps_the_last_cluster_assignment(faulty_run):
    _, out, _ = faulty_run
    rows = {c["round"]: {(a["client"], a["key"]): a["cluster"] for a in c["assignments"]}
            for c in read_jsonl(out / "cluster_assignments.jsonl")}
    missed = [k for k in rows[1] if k not in rows[2]]
    assert missed, "the fixture's faults should make some adapter miss round 2"
    final = {(c, k): s for c, k, s in io.read_json(out / "checkpoint" / "latest.json")["strategy"]["assignment"]}
    for k in missed:
        assert final[k] == rows[1][k]


def test_faulty_run_is_reproducible_and_resumes_identically(faulty_run, tiny_model, tasks, tmp_path, monkeypatch):
    _, out, summary = faulty_run
    from fltac.engines.inprocess import InProcessEngine

    original = InProcessEngine.run_round

    def crash_in_round_2(self, exp, r):
        if r == 2:
            raise KeyboardInterrupt("killed")
        return original(self, exp, r)

    other = tmp_path / "b"
    monkeypatch.setattr(InProcessEngine, "run_round", crash_in_round_2)
    with pytest.raises(KeyboardInterrupt):
        run(make_cfg(tiny_model, other, **FAULTY), tasks=tasks, quiet=True)
    monkeypatch.undo()
    resumed = run(make_cfg(tiny_model, other, **FAULTY), tasks=tasks, quiet=True, resume=True)
    assert strip_wall(resumed) == strip_wall(summary)
    for r in (1, 2):
        name = f"adapters/round_{r}.safetensors"
        assert (other / name).read_bytes() == (out / name).read_bytes()
    assert without_timings(read_jsonl(other / "metrics.jsonl")) == without_timings(read_jsonl(out / "metrics.jsonl"))


def test_checkpoint_holds_the_rng_states(faulty_run):
    _, out, _ = faulty_run
    meta = io.read_json(out / "checkpoint" / "latest.json")
    assert set(meta["rng"]) == {"python", "numpy"} and len(meta["rng"]["numpy"]["key"]) == 624
    tensors = load_file(str(out / "checkpoint" / meta["tensors_file"]))
    assert tensors[rng.TORCH_KEY].dtype == torch.uint8
    rng.restore(meta["rng"], tensors)
    assert torch.equal(torch.get_rng_state(), tensors[rng.TORCH_KEY])
    assert np.array_equal(np.random.get_state()[1], np.array(meta["rng"]["numpy"]["key"], dtype=np.uint32))


def test_min_clients_per_round_stops_with_its_message(tiny_model, tasks, tmp_path):
    cfg = make_cfg(tiny_model, tmp_path / "all_crash", **{"reliability.crash_prob": 1.0})
    with pytest.raises(TooFewClients) as err:
        run(cfg, tasks=tasks, quiet=True)
    msg = str(err.value)
    assert "round 1: only 0 of 4 sampled client(s)" in msg and "min_clients_per_round = 1" in msg
    assert "crash: InjectedCrash" in msg and "\n" not in msg
    assert not (tmp_path / "all_crash" / "checkpoint" / "latest.json").exists()
    assert {d["kind"] for d in phase(read_jsonl(tmp_path / "all_crash" / "metrics.jsonl"), "dropped")} == {"crash"}

    # a fraction: ceil(0.8 x 4) = 4 clients required; with seed 42 client 1 crashes in round 1
    cfg = make_cfg(tiny_model, tmp_path / "fraction", **{"reliability.crash_prob": 0.3,
                                                         "reliability.min_fraction_per_round": 0.8})
    with pytest.raises(TooFewClients) as err:
        run(cfg, tasks=tasks, quiet=True)
    assert "round 1: only 3 of 4" in str(err.value) and "fewer than the 4 required" in str(err.value)
    assert "min_fraction_per_round = 0.8" in str(err.value) and "client 1 a0: crash" in str(err.value)

    cfg = make_cfg(tiny_model, tmp_path / "too_many", **{"reliability.min_clients_per_round": 5})
    with pytest.raises(RunError) as err:
        run(cfg, tasks=tasks, quiet=True)
    assert "'reliability.min_clients_per_round' = 5 exceeds the 4 client(s) sampled" in str(err.value)


@pytest.mark.parametrize("attack", ["nan", "scale", "noise"])
def test_attacker_is_rejected_with_validation_and_poisons_without(attack, tiny_model, tasks, tmp_path):
    attacked = {"method": "fedit", "train.rounds": 1, "reliability.attacker_clients": [0], "reliability.attack": attack}
    guarded = run(make_cfg(tiny_model, tmp_path / "on", **attacked), tasks=tasks, quiet=True)
    records = read_jsonl(tmp_path / "on" / "metrics.jsonl")
    assert [(i["client"], i["fault"]) for i in phase(records, "injected")] == [(0, f"attack:{attack}")]
    dropped = phase(records, "dropped")
    assert [(d["round"], d["client"], d["kind"]) for d in dropped] == [(1, 0, "invalid")]
    assert guarded["dropped_submissions"] == 1
    clean = load_file(str(tmp_path / "on" / "adapters" / "round_1.safetensors"))
    assert all(torch.isfinite(t).all() for t in clean.values())

    run(make_cfg(tiny_model, tmp_path / "off", **attacked, **{"reliability.validate": False}), tasks=tasks, quiet=True)
    assert not phase(read_jsonl(tmp_path / "off" / "metrics.jsonl"), "dropped")
    poisoned = load_file(str(tmp_path / "off" / "adapters" / "round_1.safetensors"))
    drifts = [float((poisoned[k] - clean[k]).abs().max()) for k in clean]
    assert any(math.isnan(d) or d > 0.1 for d in drifts), drifts


# ---- resume: adapter files that cannot be used -------------------------------------------------------

@pytest.fixture(scope="module")
def half_run(tiny_model, tasks, tmp_path_factory):
    """A run of 2 rounds stopped after round 1's checkpoint (by a crash in round 2)."""
    from fltac.engines.inprocess import InProcessEngine

    out = tmp_path_factory.mktemp("runs") / "half"
    original = InProcessEngine.run_round

    def stop(self, exp, r):
        if r == 2:
            raise KeyboardInterrupt
        return original(self, exp, r)

    InProcessEngine.run_round = stop
    try:
        with pytest.raises(KeyboardInterrupt):
            run(make_cfg(tiny_model, out), tasks=tasks, quiet=True)
    finally:
        InProcessEngine.run_round = original
    return out


def _rewrite_checkpoint(folder: Path, how: str) -> Path:
    path = folder / "checkpoint" / "round_1.safetensors"
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "malformed":
        path.write_bytes(b"this is not a safetensors file")
    else:
        tensors = load_file(str(path))
        if how == "rank":
            tensors = {k: (torch.zeros(8, v.shape[1]) if ".lora_A." in k else torch.zeros(v.shape[0], 8))
                       if ".lora_" in k else v for k, v in tensors.items()}
        else:   # another backbone: hidden size 64
            tensors = {k: torch.zeros(*[64 if d == HIDDEN else d for d in v.shape]) if k.startswith("slot") else v
                       for k, v in tensors.items()}
        save_file(tensors, str(path))
    return path


@pytest.mark.parametrize("how, legacy, words", [("truncated", False, "is damaged (its SHA-256 differs"),
                                                ("rank", False, "is damaged (its SHA-256 differs"),
                                                ("truncated", True, "not a valid safetensors file"),
                                                ("malformed", True, "not a valid safetensors file"),
                                                ("rank", True, "made for LoRA rank 8; this run uses rank 4"),
                                                ("backbone", True, "made for another backbone")])
def test_unusable_checkpoint_file_is_a_one_line_error(how, legacy, words, half_run, tiny_model, tasks, tmp_path):
    """The checkpoint's recorded SHA-256 catches any change to its tensors; a checkpoint written before
    file hashes (``legacy``: no ``files`` in latest.json) still gets the file's own problem named."""
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(half_run, copy)
    path = _rewrite_checkpoint(copy, how)
    if legacy:
        meta = io.read_json(copy / "checkpoint" / "latest.json")
        del meta["files"]
        io.write_json(copy / "checkpoint" / "latest.json", meta)
    with pytest.raises(io.RunFileError) as err:
        run(make_cfg(tiny_model, copy), tasks=tasks, quiet=True, resume=True)
    msg = str(err.value)
    assert str(path) in msg and words in msg and "\n" not in msg, msg


@pytest.mark.parametrize("key, value", [("reliability.trim_fraction", 0.1), ("reliability.crash_prob", 0.2),
                                        ("lora.rank", 8)])
def test_resume_with_a_changed_result_key_is_refused_naming_it(key, value, half_run, tiny_model, tasks, capsys):
    from fltac.cli import main

    before = (half_run / "metrics.jsonl").read_bytes()
    with pytest.raises(RunError) as err:
        run(make_cfg(tiny_model, half_run, **{key: value}), tasks=tasks, quiet=True, resume=True)
    assert f"['{key}']" in str(err.value) and "\n" not in str(err.value)
    assert (half_run / "metrics.jsonl").read_bytes() == before     # nothing touched
    # the CLI prints it as one line and exits 2 (refused before any data or model is loaded)
    overrides = [f"--override={k}={json.dumps(v)}" for k, v in {**BASE, "model_name": tiny_model, key: value}.items()]
    assert main(["run", "--output_dir", str(half_run), "--resume", *overrides]) == 2
    err_lines = capsys.readouterr().err.strip().splitlines()
    assert len(err_lines) == 1 and key in err_lines[0]


def test_a_checkpoint_from_before_the_reliability_options_resumes(half_run, tiny_model, tasks, tmp_path):
    import shutil

    copy = tmp_path / "old"
    shutil.copytree(half_run, copy)
    pointer = copy / "checkpoint" / "latest.json"
    meta = io.read_json(pointer)
    for key in ("rng", "dropped"):
        meta.pop(key)
    meta["config"].pop("reliability")
    io.write_json(pointer, meta)
    resumed = run(make_cfg(tiny_model, copy), tasks=tasks, quiet=True, resume=True)
    reference = run(make_cfg(tiny_model, tmp_path / "ref"), tasks=tasks, quiet=True)
    assert strip_wall(resumed) == strip_wall(reference)
    assert (copy / "adapters/round_2.safetensors").read_bytes() == \
        (tmp_path / "ref/adapters/round_2.safetensors").read_bytes()


# ---- real processes: SIGKILL at any moment, then --resume --------------------------------------------

#: Runs in a subprocess: ``fltac run`` (its real CLI), optionally killing itself with SIGKILL at a chosen
#: file write, as a kill arriving at that instant would.
DRIVER = r'''
import os, signal, sys
from pathlib import Path
from fltac import io

target = os.environ.get("KILL_AT")   # "<folder>/<name>:<occurrence>:<mode>", mode 'mid' or 'after'
if target:
    where, occurrence, mode = target.split(":")
    seen = [0]
    original = io.atomic_write_bytes

    def write(path, data):
        path = Path(path)
        if f"{path.parent.name}/{path.name}" == where:
            seen[0] += 1
            if seen[0] == int(occurrence):
                path.parent.mkdir(parents=True, exist_ok=True)
                if mode == "mid":   # killed while writing the temporary file: half of it is on disk
                    with open(path.parent / f".{path.name}.killed.tmp", "wb") as f:
                        f.write(data[: len(data) // 2])
                        f.flush()
                        os.fsync(f.fileno())
                else:
                    original(path, data)
                os.kill(os.getpid(), signal.SIGKILL)
        return original(path, data)

    io.atomic_write_bytes = write

from fltac.cli import main
sys.exit(main(sys.argv[1:]))
'''


@pytest.fixture(scope="module")
def cli_setup(tiny_model, tmp_path_factory):
    """A YAML config for a 3-round FL-TAC run with faults and trimmed mean on CSV-defined tasks."""
    import csv

    folder = tmp_path_factory.mktemp("cli")
    specs = []
    for name, (train, test) in DATA.items():
        for split, rows in (("train", train), ("test", test)):
            with open(folder / f"{name}_{split}.csv", "w", newline="") as f:
                writer = csv.writer(f)
                writer.writerow(["text", "label"])
                writer.writerows(rows)
        specs.append({"name": name, "source": str(folder / f"{name}_train.csv"),
                      "test_source": str(folder / f"{name}_test.csv"), "text_columns": ["text"],
                      "label_column": "label"})
    config = {"method": "fltac", "model_name": tiny_model, "dtype": "float32", "num_threads": 1,
              "data": {"scenario": "custom", "custom_tasks": specs, "max_length": 32},
              "partition": {"n_clients": 4, "min_frac": 0.0},
              "train": {"rounds": 3, "local_steps": 3, "batch_size": 4},
              "eval": {"eval_size": 8},
              "reliability": {"crash_prob": 0.2, "corrupt_prob": 0.2, "aggregation": "trimmed_mean",
                              "trim_fraction": 0.34}}
    (folder / "run.yaml").write_text(yaml.safe_dump(config))
    (folder / "driver.py").write_text(DRIVER)
    return folder


def _fltac(folder: Path, out: Path, *extra: str, kill_at: str | None = None, wait: bool = True):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    env.pop("KILL_AT", None)
    if kill_at:
        env["KILL_AT"] = kill_at
    cmd = [sys.executable, str(folder / "driver.py"), "run", "--config", str(folder / "run.yaml"),
           "--output_dir", str(out), *extra]
    if not wait:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)


@pytest.fixture(scope="module")
def reference_run(cli_setup, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli_runs") / "reference"
    done = _fltac(cli_setup, out, "--quiet")
    assert done.returncode == 0, done.stderr
    return out


def assert_same_run(a: Path, b: Path, rounds: int = 3) -> None:
    """Byte-identical adapters and final checkpoint; same summary (wall time aside), metrics and clusters."""
    for r in range(1, rounds + 1):
        name = f"adapters/round_{r}.safetensors"
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    name = f"checkpoint/round_{rounds}.safetensors"
    assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert strip_wall(io.read_json(a / "summary.json")) == strip_wall(io.read_json(b / "summary.json"))
    assert without_timings(read_jsonl(a / "metrics.jsonl")) == without_timings(read_jsonl(b / "metrics.jsonl"))
    assert read_jsonl(a / "cluster_assignments.jsonl") == read_jsonl(b / "cluster_assignments.jsonl")
    assert not list(b.rglob(".*.tmp")), "stale temporary files left behind"


def _kill_from_outside_after_first_checkpoint(cli_setup: Path, out: Path, *extra: str) -> str:
    proc = _fltac(cli_setup, out, *extra, kill_at="checkpoint/latest.json:2:mid", wait=False)
    # SIGKILL as soon as round 1's checkpoint is there (should that kill land late, the driver kills itself
    # while writing round 2's pointer, so the process always dies inside round 2)
    pointer = out / "checkpoint" / "latest.json"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and not pointer.exists():
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, stderr
    return stderr


def test_sigkill_at_any_moment_then_resume_is_byte_identical(cli_setup, reference_run, tmp_path):
    """One folder, killed again and again at chosen instants, each time resumed by a new process; the
    end result must be the uninterrupted run's, byte for byte.

    0. Killed while writing the very first checkpoint: there is nothing to resume, and ``--resume``
       starts again from round 1 in the same folder.
    1. SIGKILL from outside right after the first checkpoint.
    2. Killed while writing round 3's checkpoint tensors (half of a temporary file on disk).
    3. Killed while writing round 3's checkpoint pointer, after round 3's records and adapters were
       written: the resume must cut metrics.jsonl back to round 2.
    4. Killed after round 3's pointer, before the old tensors are removed and summary.json is written.
    """
    out = tmp_path / "killed"
    killed = _fltac(cli_setup, out, kill_at="checkpoint/round_1.safetensors:1:mid")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not (out / "checkpoint" / "latest.json").exists() and (out / "metrics.jsonl").exists()

    stderr = _kill_from_outside_after_first_checkpoint(cli_setup, out, "--resume")
    assert "nothing to resume" in stderr
    assert io.read_json(out / "checkpoint" / "latest.json")["round"] == 1
    assert not (out / "summary.json").exists()

    steps = [("checkpoint/round_3.safetensors:1:mid", 2), ("checkpoint/latest.json:1:mid", 2),
             ("checkpoint/latest.json:1:after", 3)]
    for kill_at, last_complete in steps:
        killed = _fltac(cli_setup, out, "--resume", kill_at=kill_at)
        assert killed.returncode == -signal.SIGKILL, killed.stderr
        assert "resuming" in killed.stderr
        assert io.read_json(out / "checkpoint" / "latest.json")["round"] == last_complete, kill_at
        assert not (out / "summary.json").exists()
    assert max(r["round"] for r in read_jsonl(out / "metrics.jsonl")) == 3

    resumed = _fltac(cli_setup, out, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "after round 3" in resumed.stderr
    assert_same_run(reference_run, out)

    # a finished run: --resume says so and exits 0
    again = _fltac(cli_setup, out, "--resume")
    assert again.returncode == 0 and "already finished" in again.stderr
    assert_same_run(reference_run, out)
