"""Phase timing (fltac.eval.phases): exclusive accounting, nothing timed when off, a whole round broken down on a
tiny real run, and timing that changes no byte of what the run writes."""

from __future__ import annotations

import pytest

from fltac.config import load_config
from fltac.engines.inprocess import InProcessEngine
from fltac.eval import phases
from fltac.eval.phases import PHASES, phase
from fltac.io import read_jsonl
from conftest import tiny_config_overrides


@pytest.fixture(autouse=True)
def restore_phases():
    was_on = phases.enabled()
    yield
    phases.enable(was_on)
    phases.reset()


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def test_nested_phases_charge_each_instant_to_the_innermost_only(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(phases, "clock", clock)
    phases.enable()
    phases.reset()
    with phase("evaluation"):
        clock.advance(1.0)
        with phase("adapter_state"):
            clock.advance(2.0)
            with phase("adapter_state"):  # re-entered: more of the same phase
                clock.advance(0.5)
            assert phases.collect()["adapter_state"] == 2.5  # an open phase counts up to now
        clock.advance(3.0)
    clock.advance(10.0)  # outside every phase: nobody's
    got = phases.collect()
    assert got["evaluation"] == 4.0 and got["adapter_state"] == 2.5
    assert sum(got.values()) == 6.5  # the 6.5 s inside phases, once
    assert list(got)[:len(PHASES)] == list(PHASES)
    assert phases.breakdown({}, got, 20.0)["other"] == 13.5


def test_off_times_nothing(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(phases, "clock", clock)
    phases.enable(False)
    phases.reset()
    with phase("forward"):
        clock.advance(5.0)
    assert phase("forward") is phase("backward")  # one shared no-op context
    assert set(phases.collect().values()) == {0.0}


LAYOUTS = {
    "routed fast path": {},
    "per adapter, one adapter at a time": {"train.batching": "per_adapter", "reliability.client_timeout_s": 1000.0},
}


def tiny_run(model: str, scenario: dict, out, layout: dict, timed: bool) -> InProcessEngine:
    cfg = load_config(None, {**tiny_config_overrides(model, out), **layout, "data.scenario": "custom",
                             "data.custom_tasks": scenario["tasks"], "eval.phase_times": timed})
    engine = InProcessEngine(cfg, quiet=True)
    engine.run()
    return engine


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_a_timed_run_breaks_its_rounds_down_and_writes_the_same_bytes(tiny_bert, csv_scenario, tmp_path, layout):
    timed = tiny_run(tiny_bert, csv_scenario, tmp_path / "timed", LAYOUTS[layout], True)
    assert not phases.enabled()  # the run turned timing off again
    assert sorted(timed.phase_seconds) == [1, 2]
    for r, spent in timed.phase_seconds.items():
        assert list(spent) == [*PHASES, "other"]
        assert all(v >= 0.0 for k, v in spent.items() if k != "other") and spent["other"] >= -1e-9
        assert sum(v for k, v in spent.items() if k != "other") <= timed.round_seconds[r] + 1e-9
        assert all(spent[k] > 0 for k in PHASES)  # every phase is met in a round (validation is on by default)
    lines = [m for m in read_jsonl(tmp_path / "timed" / "metrics.jsonl") if m["phase"] == "round"]
    for line in lines:  # the record's breakdown covers what its 'seconds' covers
        assert set(line["phase_seconds"]) == {*PHASES, "other"}
        assert sum(line["phase_seconds"].values()) == pytest.approx(line["seconds"], abs=0.01)

    plain = tiny_run(tiny_bert, csv_scenario, tmp_path / "plain", LAYOUTS[layout], False)
    assert plain.phase_seconds == {}
    assert all("phase_seconds" not in m for m in read_jsonl(tmp_path / "plain" / "metrics.jsonl"))
    for name in ("round_1.safetensors", "round_2.safetensors", "submissions_round_2.safetensors"):
        assert (tmp_path / "timed" / "adapters" / name).read_bytes() == \
            (tmp_path / "plain" / "adapters" / name).read_bytes(), name


def test_a_run_resumes_with_phase_timing_switched(tiny_bert, csv_scenario, tmp_path):
    """Timing changes no result, so a resume may turn it on or off (RESUME_FREE_KEYS); any other change is refused."""
    from fltac.engines.inprocess import RunError, run

    overrides = {**tiny_config_overrides(tiny_bert, tmp_path / "run"), "data.scenario": "custom",
                 "data.custom_tasks": csv_scenario["tasks"], "train.rounds": 1}
    first = run(load_config(None, overrides), quiet=True)
    again = run(load_config(None, {**overrides, "eval.phase_times": True}), resume=True, quiet=True)
    assert again == first  # already finished: nothing to do, and no refusal
    with pytest.raises(RunError, match="differ"):
        run(load_config(None, {**overrides, "train.lr": 0.5}), resume=True, quiet=True)
