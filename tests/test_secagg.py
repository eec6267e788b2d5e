"""Flower's SecAgg+ for FedIT (``secure_aggregation``): the mean it unmasks, runs through Flower, config errors.

The protocol is Flower's own (``SecAggPlusWorkflow`` + ``secaggplus_mod``); these tests check what fltac builds
around it: the legacy strategy that keeps the one mean, the ClientApp's masked reply, the engine merging the
mean, and the refusals. Flower runs on Ray only inside a loopback-only network namespace (as in test_flower.py).
"""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from test_flower import (ScriptedGrid, _overrides, _write_config, in_loopback_netns, needs_netns, only_loopback,
                         over_the_wire, task_identity)  # noqa: F401  (task_identity: a fixture)

from fltac.config import ConfigError, load_config
from fltac.engines.inprocess import run

pytestmark = pytest.mark.flower

SECAGG = {"method": "fedit", "secure_aggregation.enabled": True, "reliability.validate": False}


# ---- the unmasked mean against FedAvg (the real workflow and mod, planted adapters) ------------------------

class PlantedGrid:
    """Delivers each message to a ClientApp behind Flower's secaggplus_mod whose train function returns the
    node's planted adapter (as fltac's ClientApp returns its trained one) and sample count."""

    def __init__(self, planted: dict[int, tuple[list[np.ndarray], int]]):
        from flwr.app import Context, Message, RecordDict
        from flwr.clientapp import ClientApp
        from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
        from flwr.compat.common import recorddict_compat as compat

        from fltac.engines.flower_secagg import secagg_when_asked

        self.app = ClientApp()
        self.sent = 0
        self.nodes = {n: Context(run_id=1, node_id=n, state=RecordDict(), run_config={},
                                 node_config={"partition-id": i}) for i, n in enumerate(planted)}

        @self.app.train(mods=[secagg_when_asked])
        def train(msg, context):
            arrays, n = planted[context.node_id]
            res = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(arrays), n, {"records": "[]", "tokens": 0})
            return Message(compat.fitres_to_recorddict(res, keep_input=True), reply_to=msg)

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for m in messages:
            self.sent += 1
            m.metadata.__dict__["_message_id"] = f"msg{self.sent}"
            replies.append(self.app(over_the_wire(m), self.nodes[m.metadata.dst_node_id]))
        return replies


def test_secagg_mean_is_the_fedavg_aggregate_within_the_quantisation_bound(task_identity):
    """Three planted adapters of 10, 50 and 300 examples through SecAggPlusWorkflow (the real protocol): the
    strategy gets one mean, and FedIT's merge of it equals FedIT's FedAvg of the three within
    :func:`mean_error_bound` (and, being quantised, not exactly)."""
    from flwr.common import FitIns, ndarrays_to_parameters
    from flwr.server.compat.grid_client_proxy import GridClientProxy
    from flwr.server.workflow import SecAggPlusWorkflow

    from fltac.engines.flower_secagg import CountingGrid, MeanOnlyStrategy, legacy_context, mean_error_bound
    from fltac.server.strategies import FedAvg
    from fltac.wire import Mean, Submission

    gen = torch.Generator().manual_seed(0)
    initial = {"q.lora_A.weight": torch.zeros(4, 16), "q.lora_B.weight": torch.zeros(16, 4)}
    sizes = {11: 10, 12: 50, 13: 300}
    states = {n: {k: torch.randn(v.shape, generator=gen) * (i + 1) for k, v in initial.items()}
              for i, n in enumerate(sizes)}
    grid = CountingGrid(PlantedGrid({n: ([s[k].numpy() for k in initial], sizes[n]) for n, s in states.items()}))
    fit = FitIns(ndarrays_to_parameters([v.numpy() for v in initial.values()]), {})
    strategy = MeanOnlyStrategy({n: (GridClientProxy(n, grid, 0), fit) for n in sizes})
    SecAggPlusWorkflow(3, 2)(grid, legacy_context(strategy, 1, 1))  # Flower's defaults, example's shares

    assert sorted(strategy.members) == sorted(sizes) and strategy.mean is not None
    assert [strategy.members[n].num_examples for n in sizes] == list(sizes.values())
    members = [(n, "a0") for n in sizes]
    secure = FedAvg(initial)
    secure.aggregate_mean(1, Mean({k: torch.from_numpy(a).float() for k, a in zip(initial, strategy.mean)},
                                  sum(sizes.values()), members))
    plain = FedAvg(initial)
    plain.aggregate(1, [Submission(n, "a0", states[n], sizes[n], initial) for n in sizes])
    for k in initial:
        spread = (torch.stack([states[n][k] for n in sizes]) - plain.slots_[0][k]).abs().max().item()
        bound = mean_error_bound(list(sizes.values()), 1000.0, 8.0, 4194304, spread)
        assert 0 < bound < 2e-4
        err = (secure.slots_[0][k] - plain.slots_[0][k]).abs().max().item()
        assert 0 < err <= bound, (k, err, bound)
        unweighted = torch.stack([states[n][k] for n in sizes]).mean(0)
        assert (unweighted - plain.slots_[0][k]).abs().max().item() > 100 * bound  # the weights matter here
    assert secure.assignment_ == {m: 0 for m in members}
    # what crossed the wire: the three masked vectors (2 x 64 entries, 8 bytes each) and the protocol's keys
    assert grid.up > 3 * 2 * 64 * 8 and grid.down > 0


# ---- FedIT through Flower messages (the real ClientApp and engine, a scripted Grid, no Ray) ------------------

def _load(path):
    from safetensors.torch import load_file

    return load_file(path)


def _bound(cfg) -> float:
    """The run's quantisation bound for one round of all its clients (their FedIT sample counts), for entries
    less than 1 apart among the clients (its adapters' entries stay below 0.5: checked on the plain run)."""
    from fltac.engines.flower_secagg import mean_error_bound
    from fltac.experiment import build_experiment

    sa = cfg.secure_aggregation
    counts = [j.num_examples for j in build_experiment(cfg).jobs]
    return mean_error_bound(counts, sa.max_weight, sa.clipping_range, sa.quantization_range, spread=1.0)


def test_fedit_with_secagg_through_flower_messages_matches_plain_fedit(tiny_bert, csv_scenario, tmp_path,
                                                                        task_identity, monkeypatch):
    """Two FedIT rounds with SecAgg+ (the real ClientApp and FlowerEngine over a scripted Grid): the strategy
    never gets a client's adapter (aggregate is never called; aggregate_mean gets one mean of both clients),
    round 1's adapter is the plain run's within the quantisation bound, metrics and summary are written."""
    from fltac.engines.flower import FlowerEngine
    from fltac.server.strategies import FedAvg

    ref = run(load_config(None, _overrides(tiny_bert, csv_scenario, tmp_path / "plain", method="fedit")), quiet=True)
    seen = []
    real_mean = FedAvg.aggregate_mean

    def no_single(self, round_, subs):
        raise AssertionError("the strategy was handed single clients' adapters under secure aggregation")

    def spy(self, round_, mean):
        seen.append((round_, sorted(mean.members), mean.num_examples))
        return real_mean(self, round_, mean)

    monkeypatch.setattr(FedAvg, "aggregate", no_single)
    monkeypatch.setattr(FedAvg, "aggregate_mean", spy)
    cfg = load_config(None, _overrides(tiny_bert, csv_scenario, tmp_path / "secagg", **SECAGG))
    got = FlowerEngine(cfg, ScriptedGrid(2, {}), quiet=True).run()
    assert [(r, m) for r, m, _ in seen] == [(1, [(0, "a0"), (1, "a0")]), (2, [(0, "a0"), (1, "a0")])]

    bound = _bound(cfg)
    a, b = (_load(tmp_path / d / "adapters" / "round_1.safetensors") for d in ("plain", "secagg"))
    assert sorted(a) == sorted(b) and max(v.abs().max().item() for v in a.values()) < 0.5
    errors = [(b[k] - a[k]).abs().max().item() for k in a]
    assert 0 < max(errors) <= bound * (1 + 1e-3) + 1e-7  # float32 storage of the float64 mean
    a, b = (_load(tmp_path / d / "adapters" / "round_2.safetensors") for d in ("plain", "secagg"))
    assert max((b[k] - a[k]).abs().max().item() for k in a) < 100 * bound  # round 2 trained from round 1's mean
    lines = [json.loads(line) for line in (tmp_path / "secagg" / "metrics.jsonl").read_text().splitlines()]
    rounds = [m for m in lines if m["phase"] == "round"]
    assert [(m["submissions"], m["accepted"], m["dropped"]) for m in rounds] == [(2, 2, 0)] * 2
    assert all(m["uplink_bytes"] > 0 and m["downlink_bytes"] > 0 for m in rounds)
    assert sum(m["phase"] == "local" for m in lines) == sum(m["phase"] == "local" for m in
                                                            map(json.loads, (tmp_path / "plain" / "metrics.jsonl")
                                                                .read_text().splitlines()))
    assert got["rounds"] == 2 and got["per_task_accuracy"].keys() == ref["per_task_accuracy"].keys()


def test_a_secagg_run_killed_in_round_2_resumes_to_the_same_bytes(tiny_bert, csv_scenario, tmp_path, task_identity,
                                                                   monkeypatch):
    """The checkpoint of a SecAgg+ round is a normal one: a run killed before round 2's records resumes (through
    Flower again) to the uninterrupted run's adapters, byte for byte: the quantisation is seeded, so two runs
    (the uninterrupted one and the killed one's round 1) give the same bytes."""
    from fltac.engines.flower import FlowerEngine
    from fltac.engines.inprocess import InProcessEngine

    whole = load_config(None, _overrides(tiny_bert, csv_scenario, tmp_path / "whole", **SECAGG))
    FlowerEngine(whole, ScriptedGrid(2, {}), quiet=True).run()
    cfg = load_config(None, _overrides(tiny_bert, csv_scenario, tmp_path / "killed", **SECAGG))
    original = InProcessEngine.evaluate

    def kill(self, exp, r, *args, **kwargs):
        if r == 2:
            raise RuntimeError("simulated kill")
        return original(self, exp, r, *args, **kwargs)

    monkeypatch.setattr(InProcessEngine, "evaluate", kill)
    with pytest.raises(RuntimeError, match="simulated kill"):
        FlowerEngine(cfg, ScriptedGrid(2, {}), quiet=True).run()
    monkeypatch.undo()
    FlowerEngine(cfg, ScriptedGrid(2, {}), resume=True, quiet=True).run()
    assert ((tmp_path / "killed" / "adapters" / "round_2.safetensors").read_bytes()
            == (tmp_path / "whole" / "adapters" / "round_2.safetensors").read_bytes())


def test_a_client_lost_mid_protocol_is_unmasked_away_and_logged(tiny_bert, csv_scenario, tmp_path, task_identity):
    """Three clients; client 2 fails in round 1's training stage, after the keys were shared: Flower rebuilds
    its masks from the others' shares, the round's mean is of clients 0 and 1, and the drop is logged."""
    from fltac.engines.flower import FlowerEngine

    tasks = [{k: v for k, v in t.items() if k != "client_column"} for t in csv_scenario["tasks"]]
    cfg = load_config(None, _overrides(tiny_bert, csv_scenario, tmp_path / "run", **SECAGG,
                                       **{"partition.n_clients": 3, "data.custom_tasks": tasks}))
    FlowerEngine(cfg, ScriptedGrid(3, {(1, 2): "error"}), quiet=True).run()
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [(m["round"], m["client"], m["kind"]) for m in lines if m["phase"] == "dropped"] == [(1, 2, "crash")]
    rounds = [m for m in lines if m["phase"] == "round"]
    assert [(m["submissions"], m["dropped"]) for m in rounds] == [(2, 1), (3, 0)]


# ---- the Ray simulation (loopback-only namespace) ---------------------------------------------------------

@needs_netns
def test_flower_sim_fedit_with_secagg_matches_plain_fedit(tiny_bert, csv_scenario, tmp_path):
    """``fltac run --engine flower-sim`` with SecAgg+ (Ray, the real ClientApp behind secaggplus_mod): two rounds
    finish, write metrics and a summary, and round 1's adapter is the plain in-process run's within the bound."""
    run(load_config(None, _overrides(tiny_bert, csv_scenario, tmp_path / "plain", method="fedit")), quiet=True)
    overrides = _overrides(tiny_bert, csv_scenario, tmp_path / "secagg", **SECAGG)
    config = _write_config(tmp_path / "tiny.yaml", overrides)
    proc = in_loopback_netns(f"{sys.executable} -m fltac run --config {config} --engine flower-sim --quiet",
                             tmp_path, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert not only_loopback(tmp_path / "ss.txt")
    summary = json.loads((tmp_path / "secagg" / "summary.json").read_text())
    assert summary["rounds"] == 2 and summary["uplink_bytes"] > 0
    lines = [json.loads(line) for line in (tmp_path / "secagg" / "metrics.jsonl").read_text().splitlines()]
    assert [(m["round"], m["submissions"]) for m in lines if m["phase"] == "round"] == [(1, 2), (2, 2)]
    bound = _bound(load_config(None, overrides))
    a, b = (_load(tmp_path / d / "adapters" / "round_1.safetensors") for d in ("plain", "secagg"))
    assert 0 < max((b[k] - a[k]).abs().max().item() for k in a) <= bound * (1 + 1e-3) + 1e-7


# ---- refusals ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("extra, key, why", [
    ({"method": "fltac"}, "secure_aggregation.enabled", "cluster them by task"),
    ({"method": "hafl"}, "secure_aggregation.enabled", "per-client rule"),
    ({"method": "centralized"}, "secure_aggregation.enabled", "no client to hide"),
    ({"reliability.aggregation": "trimmed_mean"}, "reliability.aggregation", "only their sum"),
    ({"reliability.clip_norm": 1.0}, "reliability.clip_norm", "never sees"),
    ({"reliability.validate": True}, "reliability.validate", "hides"),
    ({"privacy.mode": "central", "privacy.noise_multiplier": 1.0}, "privacy.mode", "never sees one"),
    ({"partition.n_clients": 4, "train.fraction_fit": 0.25}, "partition.n_clients", "at least 2"),
])
def test_secagg_refuses_what_must_see_single_clients(extra, key, why):
    with pytest.raises(ConfigError, match=f"config key '{key}'.*{why}"):
        load_config(None, {**SECAGG, **extra})


def test_local_dp_composes_with_secagg_in_the_config():
    cfg = load_config(None, {**SECAGG, "privacy.mode": "local", "privacy.noise_multiplier": 1.0})
    assert cfg.secure_aggregation.enabled and cfg.privacy.mode == "local"


def test_the_inprocess_engine_refuses_secagg_naming_the_flower_engine(tmp_path):
    with pytest.raises(ConfigError, match="secure_aggregation.enabled' needs the Flower engine.*flower-sim"):
        run(load_config(None, {**SECAGG, "output_dir": str(tmp_path)}), quiet=True)
