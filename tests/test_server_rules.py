"""Server optimizers (FedAvgM, FedAdam, FedYogi, FedAdagrad) and the robust rules Krum, multi-Krum and the
geometric median, checked on numbers worked out by hand; a run with a server optimizer resumes bit for bit."""

from __future__ import annotations

import math

import pytest
import torch

from fltac.server.optimizers import ServerOptimizer
from fltac.server.robust import Aggregation, geometric_median, krum_scores, multi_krum


def scalar(v: float) -> dict[str, torch.Tensor]:
    return {"w": torch.tensor([v], dtype=torch.float32)}


def value(state) -> float:
    return float(state["w"][0])


# ---- server optimizers: two rounds from x0 = 0, with pseudo-gradients d1 = 1 and d2 = 2 -----------------------

def two_steps(opt: ServerOptimizer) -> tuple[float, float]:
    x1, memory = opt.step(scalar(0.0), scalar(1.0), {})
    x2, _ = opt.step(x1, scalar(value(x1) + 2.0), memory)
    return value(x1), value(x2)


def test_fedavgm_first_two_steps():
    # v1 = d1 = 1, x1 = 0 + 1 * 1 = 1; v2 = 0.9 * 1 + 2 = 2.9, x2 = 1 + 2.9 = 3.9
    assert two_steps(ServerOptimizer("fedavgm", lr=1.0, momentum=0.9)) == pytest.approx((1.0, 3.9))


def test_fedavgm_without_momentum_at_rate_one_is_the_aggregate():
    x1, _ = ServerOptimizer("fedavgm", lr=1.0, momentum=0.0).step(scalar(0.25), scalar(-0.5), {})
    assert value(x1) == -0.5


@pytest.mark.parametrize("kind", ["fedadam", "fedyogi", "fedadagrad"])
def test_adaptive_optimizers_first_two_steps(kind):
    lr, b1, b2, tau = 0.1, 0.9, 0.99, 1e-3
    m1 = (1 - b1) * 1.0                                    # 0.1
    m2 = b1 * m1 + (1 - b1) * 2.0                          # 0.29
    v1, v2 = {"fedadam": (0.01, 0.99 * 0.01 + 0.01 * 4),   # beta2 v + (1 - beta2) d^2
              "fedyogi": (0.01, 0.01 + 0.01 * 4),          # v - (1 - beta2) d^2 sign(v - d^2): sign -1 both times
              "fedadagrad": (1.0, 1.0 + 4.0)}[kind]        # v + d^2
    x1 = lr * m1 / (math.sqrt(v1) + tau)
    x2 = x1 + lr * m2 / (math.sqrt(v2) + tau)
    assert two_steps(ServerOptimizer(kind, lr=lr, beta1=b1, beta2=b2, tau=tau)) == pytest.approx((x1, x2), rel=1e-6)


def test_fedadam_by_hand_in_numbers():
    # the same as above written out once: x1 = 0.1 * 0.1 / (0.1 + 0.001), x2 = x1 + 0.029 / (sqrt(0.0499) + 0.001)
    assert two_steps(ServerOptimizer("fedadam", lr=0.1, tau=1e-3)) == pytest.approx((0.0990099, 0.2282531), abs=1e-6)


# ---- Krum, multi-Krum, geometric median ---------------------------------------------------------------------

PLANTED = [0.0, 1.0, -1.0, 0.5, 100.0]  # four honest values and one far outlier


def test_krum_scores_and_pick_on_planted_values():
    # n = 5, f = 1: each score sums the squared distances to its n - f - 2 = 2 nearest others
    # 0: 0.25 + 1 | 1: 0.25 + 1 | -1: 1 + 2.25 | 0.5: 0.25 + 0.25 | 100: 99^2 + 99.5^2 (to 1 and 0.5)
    scores = krum_scores([scalar(v) for v in PLANTED], f=1)
    assert scores.tolist() == pytest.approx([1.25, 1.25, 3.25, 0.5, 99 ** 2 + 99.5 ** 2])
    picked = Aggregation("krum", krum_f=1)([scalar(v) for v in PLANTED], [scalar(0)] * 5, [1] * 5)
    assert value(picked) == 0.5


def test_multi_krum_averages_the_best_scored_by_sample_count():
    states, weights = [scalar(v) for v in PLANTED], [2, 1, 1, 1, 1]
    # m = 3: the values 0.5, 0 and 1 (scores 0.5, 1.25, 1.25), weighted 1, 2, 1 -> 1.5 / 4
    assert value(multi_krum(states, weights, f=1, m=3)) == pytest.approx(0.375)
    # m = n - f = 4: also -1 -> (0 * 2 + 1 - 1 + 0.5) / 5
    assert value(Aggregation("multi_krum", krum_f=1)(states, [scalar(0)] * 5, weights)) == pytest.approx(0.1)


def test_geometric_median_by_hand():
    # on a line, the geometric median of 0, 1, 10 is their median
    assert value(geometric_median([scalar(0), scalar(1), scalar(10)], [1, 1, 1])) == pytest.approx(1.0, abs=1e-6)
    # weights 3 : 1 on 0 and 10: the weighted median, 0
    assert value(geometric_median([scalar(0), scalar(10)], [3, 1])) == pytest.approx(0.0, abs=1e-6)
    # an equilateral triangle: the Fermat point is its centre (1, sqrt(3) / 3)
    pts = [{"w": torch.tensor(p)} for p in ([0.0, 0.0], [2.0, 0.0], [1.0, math.sqrt(3.0)])]
    assert geometric_median(pts, [1, 1, 1])["w"].tolist() == pytest.approx([1.0, math.sqrt(3.0) / 3], abs=1e-6)


def test_geometric_median_ignores_a_far_outlier_where_the_mean_does_not():
    states = [scalar(v) for v in PLANTED]
    assert abs(value(geometric_median(states, [1] * 5))) < 1.0
    assert value(Aggregation("fedavg")(states, [scalar(0)] * 5, [1] * 5)) > 19.0


# ---- through the engine: config, checkpoint, resume -----------------------------------------------------------

def tiny_cfg(tiny_bert, csv_scenario, out, **extra):
    from conftest import tiny_config_overrides

    from fltac.config import load_config

    return load_config(None, {**tiny_config_overrides(tiny_bert, out), "data.scenario": "custom",
                              "data.custom_tasks": csv_scenario["tasks"], **extra})


def test_a_server_optimizer_run_resumes_bit_for_bit(tiny_bert, csv_scenario, tmp_path, monkeypatch):
    from fltac.engines.inprocess import InProcessEngine, run

    extra = {"server.optimizer": "fedadam", "reliability.aggregation": "geometric_median"}
    whole = run(tiny_cfg(tiny_bert, csv_scenario, tmp_path / "whole", **extra), quiet=True)

    original = InProcessEngine.evaluate

    def crash(self, exp, r, *args, **kwargs):
        if r == 2:
            raise RuntimeError("simulated kill before round 2's records")
        return original(self, exp, r, *args, **kwargs)

    cfg = tiny_cfg(tiny_bert, csv_scenario, tmp_path / "cut", **extra)
    monkeypatch.setattr(InProcessEngine, "evaluate", crash)
    with pytest.raises(RuntimeError, match="simulated kill"):
        run(cfg, quiet=True)
    monkeypatch.undo()
    resumed = run(cfg, resume=True, quiet=True)

    from safetensors.torch import load_file

    a = load_file(tmp_path / "whole" / "adapters" / "round_2.safetensors")
    b = load_file(tmp_path / "cut" / "adapters" / "round_2.safetensors")
    assert any(k.startswith("server_memory/") for k in a)  # the optimizer's moments travel with the slots
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["per_task_accuracy"] == whole["per_task_accuracy"]


def test_server_optimizer_moves_the_slots_away_from_plain_fedavg(tiny_bert, csv_scenario, tmp_path):
    from safetensors.torch import load_file

    from fltac.engines.inprocess import run

    run(tiny_cfg(tiny_bert, csv_scenario, tmp_path / "avg", method="fedit"), quiet=True)
    run(tiny_cfg(tiny_bert, csv_scenario, tmp_path / "avgm", method="fedit", **{"server.optimizer": "fedavgm"}),
        quiet=True)
    a = load_file(tmp_path / "avg" / "adapters" / "round_2.safetensors")
    b = load_file(tmp_path / "avgm" / "adapters" / "round_2.safetensors")
    slot = [k for k in a if k.startswith("slot0/")]
    # round 1 of FedAvgM (v = d, x = x0 + d) is FedAvg; round 2 adds 0.9 x round 1's move
    assert any(not torch.equal(a[k], b[k]) for k in slot)


@pytest.mark.parametrize("overrides, words", [
    ({"method": "hafl", "server.optimizer": "fedadam"}, "server.optimizer"),
    ({"server.server_momentum": 1.0}, "server.server_momentum"),
    ({"reliability.krum_f": -1}, "reliability.krum_f"),
])
def test_bad_server_settings_are_named(overrides, words):
    from fltac.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=words.replace(".", r"\.")):
        load_config(None, overrides)
