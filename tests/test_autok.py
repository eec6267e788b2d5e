"""FL-TAC with an unknown number of tasks (``server.n_clusters: auto``) and tasks that join mid-run
(``data.task_start_round``).

- the eigengap (and silhouette) selector recovers a planted K = 2, 3, 5, 7 on synthetic unit vectors, and
  K = 1 on one blob;
- the strategy, never told a task count, finds the planted groups of synthetic adapters, keeps each group's
  slot across rounds, gives a group that appears later a new slot, keeps a slot no cluster matches, and
  round-trips through its checkpoint state;
- a short real run (the packaged MiniLM, three text5 tasks) recovers K = 3 after a round of training; with
  one task held back to round 2 it finds K = 2, then 3 with a new slot;
- a tiny run with a late task withholds its jobs, records null for it before it starts, and resumes byte for
  byte with an automatic K;
- bad settings are refused with one line naming the key.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from fltac.config import ConfigError, load_config
from fltac.engines.inprocess import InProcessEngine, run
from fltac.server.aggregate import eigengap_k, match_to_previous, silhouette_k, spectral_labels
from fltac.server.strategies import FLTAC, Submission
from tests.conftest import tiny_config_overrides

B_KEY, A_KEY, HEAD_KEY = "layer.lora_B.weight", "layer.lora_A.weight", "classifier.weight"
SHAPES = {A_KEY: (4, 8), B_KEY: (8, 4), HEAD_KEY: (3, 8)}


def planted(k: int, seed: int, dim: int = 64, noise: float = 0.35) -> tuple[np.ndarray, np.ndarray]:
    """Unit vectors in ``k`` groups of 5 to 10 (random centres, Gaussian spread ``noise`` x the centre's
    typical entry, each row scaled by a random factor before normalising, as updates of unequal size are)."""
    g = np.random.default_rng(seed)
    centres = g.standard_normal((k, dim))
    sizes = g.integers(5, 11, size=k)
    x = np.concatenate([c + noise * g.standard_normal((s, dim)) for c, s in zip(centres, sizes)])
    x *= g.uniform(0.1, 10.0, size=(len(x), 1))
    return x / np.linalg.norm(x, axis=1, keepdims=True), np.repeat(np.arange(k), sizes)


@pytest.mark.parametrize("k", [2, 3, 5, 7])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_eigengap_recovers_a_planted_number_of_groups(k, seed):
    x, _ = planted(k, seed)
    chosen, gaps = eigengap_k(x, 10)
    assert chosen == k
    assert len(gaps) == 10 and gaps[k - 1] == max(gaps)


@pytest.mark.parametrize("k", [2, 3, 5, 7])
def test_the_silhouette_recovers_a_planted_number_of_groups(k):
    x, _ = planted(k, 0)
    chosen, scores = silhouette_k(x, 10, lambda kk: spectral_labels(x, kk, 0, 5))
    assert chosen == k and len(scores) == 9  # K = 2 .. 10


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_one_blob_is_one_cluster_by_the_eigengap(seed):
    """K = 1 is a candidate like any other: 30 vectors spread around one direction have their largest gap first."""
    g = np.random.default_rng(seed)
    x = g.standard_normal(64) + g.standard_normal((30, 64))
    assert eigengap_k(x / np.linalg.norm(x, axis=1, keepdims=True), 10)[0] == 1


def test_the_candidates_stop_at_the_submissions_minus_one():
    x, _ = planted(2, 0)
    chosen, gaps = eigengap_k(x[:6], 10)
    assert len(gaps) == 5 and 1 <= chosen <= 5
    assert len(eigengap_k(x[:6], 10, n_neighbors=9)[1]) == 5  # a configured neighbour count above n - 1 is capped


def test_match_to_previous_leaves_the_farthest_new_cluster_unmatched():
    old = np.array([[0.0, 0.0], [10.0, 0.0]])
    new = np.array([[10.2, 0.1], [50.0, 50.0], [0.1, -0.2]])
    assert match_to_previous(new, old).tolist() == [1, -1, 0]


# ---- the strategy on synthetic adapters -------------------------------------------------------------------

def initial_state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {k: 0.01 * torch.randn(*s, generator=g) for k, s in SHAPES.items()}


def group_centres(n: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return [torch.randn(*SHAPES[B_KEY], generator=g) for _ in range(n)]


def round_subs(initial, centres, groups, round_seed: int) -> tuple[list[Submission], list[int]]:
    """Six clients per group (client = 10 x group + i, key 'a0'), each sending initial + s (centre + noise)
    in B, a random A and head move, sample counts that differ."""
    g = torch.Generator().manual_seed(round_seed)
    subs, truth = [], []
    for c in groups:
        for i in range(6):
            scale = 0.1 + 3.0 * torch.rand(1, generator=g).item()
            state = {B_KEY: initial[B_KEY] + scale * (centres[c] + 0.3 * torch.randn(*SHAPES[B_KEY], generator=g)),
                     A_KEY: initial[A_KEY] + 0.1 * torch.randn(*SHAPES[A_KEY], generator=g),
                     HEAD_KEY: initial[HEAD_KEY] + torch.randn(*SHAPES[HEAD_KEY], generator=g)}
            subs.append(Submission(10 * c + i, "a0", state, 10 + 7 * i + c, initial))
            truth.append(c)
    return subs, truth


def slot_of_group(assigned, subs, truth) -> dict[int, int]:
    out = {}
    for c in sorted(set(truth)):
        slots = {assigned[(s.client, s.key)] for s, t in zip(subs, truth) if t == c}
        assert len(slots) == 1, f"group {c} split over slots {slots}"
        out[c] = slots.pop()
    return out


def auto_fltac(initial, clustering: str = "spectral", k_selection: str = "eigengap") -> FLTAC:
    return FLTAC(initial, None, [B_KEY], "update", 0, n_init=5, clustering=clustering, k_selection=k_selection)


@pytest.mark.parametrize("clustering,k_selection", [("spectral", "eigengap"), ("kmeans", "silhouette"),
                                                    ("kmeans", "eigengap")])
def test_auto_k_finds_the_groups_keeps_their_slots_and_opens_one_for_a_new_group(clustering, k_selection):
    initial = initial_state()
    centres = group_centres(4)
    strategy = auto_fltac(initial, clustering, k_selection)
    assert strategy.n_slots == 0

    subs, truth = round_subs(initial, centres, [0, 1, 2], 1)
    first = slot_of_group(strategy.aggregate(1, subs), subs, truth)
    assert strategy.n_slots == 3 and sorted(first.values()) == [0, 1, 2]
    assert strategy.round_metrics() == {"n_clusters": 3, "n_slots": 3}

    subs, truth = round_subs(initial, centres, [2, 0, 1], 2)  # another order: the ids must follow the groups
    assert slot_of_group(strategy.aggregate(2, subs), subs, truth) == first

    subs, truth = round_subs(initial, centres, [0, 3, 1, 2], 3)  # group 3 appears
    third = slot_of_group(strategy.aggregate(3, subs), subs, truth)
    assert third == {**first, 3: 3} and strategy.n_slots == 4
    assert strategy.k_history_[-1][:2] == [3, 4]

    kept = {k: v.clone() for k, v in strategy.slots_[first[1]].items()}
    subs, truth = round_subs(initial, centres, [0, 2, 3], 4)  # group 1 is away: its slot stays as it was
    assert slot_of_group(strategy.aggregate(4, subs), subs, truth) == {0: first[0], 2: first[2], 3: 3}
    assert strategy.n_slots == 4 and all(torch.equal(strategy.slots_[first[1]][k], kept[k]) for k in kept)


def test_auto_k_never_reads_a_task_count_and_its_state_round_trips():
    """The strategy's checkpoint holds the slots it grew and the K history; a strategy rebuilt from it takes
    the next round exactly as the one that went on."""
    initial = initial_state()
    centres = group_centres(4)
    strategy = auto_fltac(initial)
    for r, groups in enumerate([[0, 1], [0, 1, 2]], start=1):
        strategy.aggregate(r, round_subs(initial, centres, groups, r)[0])
    tensors, meta = strategy.state_dict()
    meta = json.loads(json.dumps(meta))
    restored = auto_fltac(initial)
    assert restored.checkpoint_slots(meta) == 3
    restored.load_state_dict(tensors, meta)
    assert restored.n_slots == 3 and restored.k_history_ == strategy.k_history_
    subs = round_subs(initial, centres, [2, 1, 0, 3], 3)[0]
    assert restored.aggregate(3, subs) == strategy.aggregate(3, subs)
    assert restored.n_slots == strategy.n_slots == 4
    for a, b in zip(restored.slots_, strategy.slots_):
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_with_three_submissions_or_fewer_the_previous_k_stands():
    initial = initial_state()
    centres = group_centres(2)
    strategy = auto_fltac(initial)
    subs = round_subs(initial, centres, [0, 1], 1)[0]
    strategy.aggregate(1, subs)
    assert strategy.k_history_[-1][1] == 2
    strategy.aggregate(2, subs[:3])
    assert strategy.k_history_[-1][1:] == [2, []]


# ---- real runs ----------------------------------------------------------------------------------------------

TEXT5_YAML = Path(__file__).resolve().parents[1] / "configs" / "text5.yaml"


def text5_slice(out, **extra):
    """configs/text5.yaml cut short: three tasks, 300 training rows each, 8 clients, 2 rounds of 6 local steps
    (the updates' task direction is clearer after more steps than the default 3), 32 tokens, 8 test texts."""
    return load_config(TEXT5_YAML, {"output_dir": str(out), "data.tasks": ["newsgroups", "rotten", "bbc"],
                                    "data.max_train_per_task": 300, "data.max_length": 32, "partition.n_clients": 8,
                                    "train.rounds": 2, "train.local_steps": 6, "eval.eval_size": 8,
                                    "server.n_clusters": "auto", "num_threads": 1, **extra})


def _records(out) -> list[dict]:
    return [json.loads(line) for line in (out / "cluster_assignments.jsonl").read_text().splitlines()]


def test_a_short_real_run_recovers_the_three_tasks_after_a_round(tmp_path):
    """After one round of training the eigengap at K = 3 stands clear (measured: 0.54 to 0.61 against at most
    0.23 for any other K, over three variants of this run); in round 1, from the initial adapter, it is a close
    call in so short a run (0.27 to 0.31 against 0.16 to 0.31: K = 3 or 2), so round 1's K is only recorded."""
    summary = run(text5_slice(tmp_path / "run"), quiet=True)
    first, last = _records(tmp_path / "run")
    assert last["n_clusters"] == 3 and last["clustering_accuracy"] >= 0.9
    assert last["k_scores"][2] == max(last["k_scores"]) and len(last["k_scores"]) == 10
    assert 1 <= first["n_clusters"] <= 10 and last["n_slots"] >= 3
    rounds = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
              if json.loads(line)["phase"] == "round"]
    assert [(r["n_clusters"], r["n_slots"]) for r in rounds] == [(first["n_clusters"], first["n_slots"]),
                                                                 (3, last["n_slots"])]
    assert summary["clustering_accuracy"] == last["clustering_accuracy"]


def test_a_task_that_joins_in_round_two_gets_a_new_slot_in_a_real_run(tmp_path):
    run(text5_slice(tmp_path / "late", **{"data.task_start_round": {"bbc": 2}}), quiet=True)
    first, second = _records(tmp_path / "late")
    assert {a["task"] for a in first["assignments"]} == {"newsgroups", "rotten"}
    assert (first["n_clusters"], first["n_slots"], second["n_clusters"], second["n_slots"]) == (2, 2, 3, 3)
    bbc = {a["cluster"] for a in second["assignments"] if a["task"] == "bbc"}
    assert bbc == {2}  # the new task, in the new slot; the others keep theirs
    evals = [json.loads(line) for line in (tmp_path / "late" / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["phase"] == "eval"]
    assert [(e["round"], e["slot"], e["accuracy"]) for e in evals if e["task"] == "bbc"][0] == (1, None, None)


# ---- a tiny run: late task, resume ---------------------------------------------------------------------------

def tiny(tiny_bert, csv_scenario, out, **extra):
    return load_config(None, {**tiny_config_overrides(tiny_bert, out), "data.scenario": "custom",
                              "data.custom_tasks": csv_scenario["tasks"], "train.rounds": 3,
                              "server.n_clusters": "auto",
                              "data.task_start_round": {"topics": 2}, **extra})


def test_a_late_task_is_withheld_then_trained_and_a_killed_auto_run_resumes_byte_for_byte(tiny_bert, csv_scenario,
                                                                                         tmp_path, monkeypatch):
    whole = run(tiny(tiny_bert, csv_scenario, tmp_path / "whole"), quiet=True)
    records = _records(tmp_path / "whole")
    assert {a["task"] for a in records[0]["assignments"]} == {"reviews"}
    assert {a["task"] for a in records[1]["assignments"]} == {"reviews", "topics"}
    assert all("n_clusters" in r and "k_scores" in r for r in records)
    metrics = [json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    topics = [m for m in metrics if m["phase"] == "eval" and m["task"] == "topics"]
    assert (topics[0]["slot"], topics[0]["accuracy"], topics[0]["personalized_accuracy"]) == (None, None, None)
    assert all(m["accuracy"] is not None for m in topics[1:])
    assert [m["submissions"] for m in metrics if m["phase"] == "round"][0] == 2  # reviews only, at its 2 owners

    original = InProcessEngine.evaluate

    def crash(self, exp, r, *args, **kwargs):
        if r == 3:
            raise RuntimeError("simulated kill before round 3's records")
        return original(self, exp, r, *args, **kwargs)

    cfg = tiny(tiny_bert, csv_scenario, tmp_path / "cut")
    monkeypatch.setattr(InProcessEngine, "evaluate", crash)
    with pytest.raises(RuntimeError, match="simulated kill"):
        run(cfg, quiet=True)
    monkeypatch.undo()
    resumed = run(cfg, resume=True, quiet=True)
    for name in ("adapters/round_2.safetensors", "adapters/round_3.safetensors"):
        a, b = (load_file(tmp_path / d / name) for d in ("whole", "cut"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "cut" / "cluster_assignments.jsonl").read_bytes() == \
        (tmp_path / "whole" / "cluster_assignments.jsonl").read_bytes()
    assert {k: v for k, v in resumed.items() if k != "wall_seconds"} == \
        {k: v for k, v in whole.items() if k != "wall_seconds"}


# ---- bad settings --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides,key", [
    ({"server.max_clusters": 0}, "server.max_clusters"),
    ({"server.n_clusters": "many"}, "server.n_clusters"),
    ({"server.n_clusters": "auto", "method": "fedit"}, "server.n_clusters"),
    ({"server.k_selection": "silhouette", "server.max_clusters": 1}, "server.max_clusters"),
    ({"data.task_start_round": {"bbc": 9}}, "data.task_start_round"),
    ({"data.task_start_round": {"bbc": 0}}, "data.task_start_round"),
    ({"data.task_start_round": {"bbc": 2}, "method": "fedit"}, "data.task_start_round"),
])
def test_bad_auto_k_and_late_task_settings_are_refused_naming_the_key(overrides, key):
    with pytest.raises(ConfigError, match=f"'{key}'") as err:
        load_config(None, overrides)
    assert "\n" not in str(err.value)


def test_a_late_task_the_run_does_not_have_is_refused_before_any_write(tiny_bert, csv_scenario, tmp_path):
    cfg = tiny(tiny_bert, csv_scenario, tmp_path / "out", **{"data.task_start_round": {"news": 2}})
    with pytest.raises(ConfigError, match=r"'data.task_start_round' names task\(s\) \['news'\]"):
        run(cfg, quiet=True)
    assert not (tmp_path / "out").exists()
