"""Client-level differential privacy (``privacy``): clipping bound, noise scale, the accountant, resume, errors."""

from __future__ import annotations

import math
import sys

import pytest
import torch
from conftest import run_killed_and_resumed, tiny_config_overrides
from safetensors.torch import load_file

from fltac import io
from fltac.config import ConfigError, load_config
from fltac.engines.inprocess import run
from fltac.privacy import CentralDP, client_clip_factor, epsilon, local_dp, noise_multiplier, sample_rate
from fltac.wire import Submission

opacus = pytest.importorskip("opacus")
from opacus.accountants import RDPAccountant  # noqa: E402


def _cfg(**privacy) -> object:
    return load_config(None, {f"privacy.{k}": v for k, v in privacy.items()})


def _norm(states, starts) -> float:
    return math.sqrt(sum(float(((s[k].double() - s0[k].double()) ** 2).sum()) for s, s0 in zip(states, starts)
                         for k in s))


def _adapters(n: int, scale: float, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"m.lora_A.weight": scale * torch.randn(4, 300, generator=g),
             "m.lora_B.weight": scale * torch.randn(300, 4, generator=g)} for _ in range(n)]


def test_local_dp_clips_a_clients_adapters_together_to_the_bound():
    """Near-zero noise: the client's two updates come back scaled by one factor to joint norm C exactly."""
    cfg = _cfg(mode="local", clip_norm=0.5, noise_multiplier=1e-12)
    starts, states = _adapters(2, 0.1, 0), _adapters(2, 1.0, 1)
    assert _norm(states, starts) > 10 * 0.5
    out = local_dp(states, starts, cfg, 1, 0)
    assert _norm(out, starts) == pytest.approx(0.5, rel=1e-6)
    f = client_clip_factor(states, starts, [list(s) for s in states], 0.5)
    for s, s0, o in zip(states, starts, out):
        for k in s:
            torch.testing.assert_close(o[k] - s0[k], f * (s[k] - s0[k]), atol=1e-6, rtol=1e-5)
    short = [{k: s0[k] + 1e-3 * (v - s0[k]) for k, v in s.items()} for s, s0 in zip(states, starts)]
    assert _norm(local_dp(short, starts, cfg, 1, 0), starts) == pytest.approx(_norm(short, starts), rel=1e-5)


def test_local_dp_noise_has_std_sigma_times_c_and_is_seeded_per_round_and_client():
    cfg = _cfg(mode="local", clip_norm=0.5, noise_multiplier=2.0)
    starts = _adapters(3, 1.0, 2)
    out = local_dp(starts, starts, cfg, 2, 7)  # no update: what comes back is the noise alone
    noise = torch.cat([(o[k] - s0[k]).double().flatten() for o, s0 in zip(out, starts) for k in o])
    assert noise.numel() == 3 * 2400
    assert float(noise.std()) == pytest.approx(2.0 * 0.5, rel=0.03)  # std error of a std over 7200 draws: ~0.8%
    assert abs(float(noise.mean())) < 4 * 1.0 / math.sqrt(noise.numel())
    again = local_dp(starts, starts, cfg, 2, 7)
    assert all(torch.equal(a[k], b[k]) for a, b in zip(out, again) for k in a)
    for other in (local_dp(starts, starts, cfg, 3, 7), local_dp(starts, starts, cfg, 2, 8)):
        assert not torch.equal(other[0]["m.lora_A.weight"], out[0]["m.lora_A.weight"])


def _sub(client, key, state, start):
    return Submission(client, key, state, 10, start)


def test_central_dp_is_the_equal_weight_mean_of_clipped_clients_plus_noise_of_std_sigma_c_over_n():
    """Client 0 has an adapter in each slot, so its two updates share one clip factor; slot 0 averages clients
    0 and 1 (weights equal, whatever their sample counts), slot 1 clients 0, 2 and 2's second adapter (its mean)."""
    starts, states = _adapters(5, 0.1, 3), _adapters(5, 1.0, 4)
    subs = [_sub(0, "a0", states[0], starts[0]), _sub(1, "a0", states[1], starts[1]),
            _sub(0, "a1", states[2], starts[2]), _sub(2, "a0", states[3], starts[3]), _sub(2, "a1", states[4], starts[4])]
    slot_of = [0, 0, 1, 1, 1]
    quiet = CentralDP(0.5, 1e-12, seed=1)(1, subs, slot_of, ())
    f = {c: client_clip_factor([s.state for s in subs if s.client == c], [s.start for s in subs if s.client == c],
                               [list(states[0])] * sum(s.client == c for s in subs), 0.5) for c in (0, 1, 2)}
    assert _norm([states[0], states[2]], [starts[0], starts[2]]) * f[0] == pytest.approx(0.5, rel=1e-9)

    def clipped(i, c):
        return {k: starts[i][k].double() + f[c] * (states[i][k].double() - starts[i][k].double()) for k in states[i]}

    want0 = {k: (clipped(0, 0)[k] + clipped(1, 1)[k]) / 2 for k in states[0]}
    want1 = {k: (clipped(2, 0)[k] + (clipped(3, 2)[k] + clipped(4, 2)[k]) / 2) / 2 for k in states[0]}
    for got, want in ((quiet[0], want0), (quiet[1], want1)):
        for k in want:
            torch.testing.assert_close(got[k].double(), want[k], atol=1e-6, rtol=1e-5)
    noisy = CentralDP(0.5, 3.0, seed=1)(1, subs, slot_of, ())
    for slot, n in ((0, 2), (1, 2)):
        noise = torch.cat([(noisy[slot][k] - quiet[slot][k]).double().flatten() for k in want0])
        assert float(noise.std()) == pytest.approx(3.0 * 0.5 / n, rel=0.05)  # 2400 draws
    frozen = ("m.lora_A.weight",)  # FFA-LoRA: left out of the clip norm, and no noise
    quiet, noisy = (CentralDP(0.5, sigma, seed=1)(1, subs, slot_of, frozen) for sigma in (1e-12, 3.0))
    assert torch.equal(noisy[0]["m.lora_A.weight"], quiet[0]["m.lora_A.weight"])
    assert not torch.equal(noisy[0]["m.lora_B.weight"], quiet[0]["m.lora_B.weight"])


def test_the_accountants_epsilon_is_opacus_rdp_called_directly():
    for sigma, q, steps, delta in ((1.3, 1.0, 3, 1e-5), (0.9, 0.25, 7, 1e-4)):
        acc = RDPAccountant()
        for _ in range(steps):
            acc.step(noise_multiplier=sigma, sample_rate=q)
        assert epsilon(sigma, q, steps, delta) == acc.get_epsilon(delta=delta)


@pytest.mark.parametrize("mode, fraction, q", [("local", 1.0, 1.0), ("local", 0.5, 1.0), ("central", 0.4, 0.4)])
def test_target_epsilon_solves_to_a_sigma_within_the_target(mode, fraction, q):
    cfg = load_config(None, {"privacy.mode": mode, "privacy.target_epsilon": 4.0, "train.fraction_fit": fraction,
                             "train.rounds": 5})
    assert sample_rate(cfg) == q
    sigma = noise_multiplier(cfg)
    got = epsilon(sigma, q, 5, cfg.privacy.delta)
    assert 4.0 - 0.05 <= got <= 4.0
    assert epsilon(sigma * 0.95, q, 5, cfg.privacy.delta) > 4.0  # the smallest such sigma, within the search's step


def _overrides(tiny_bert, csv_scenario, out, **extra) -> dict:
    return {**tiny_config_overrides(tiny_bert, out), "data.scenario": "custom",
            "data.custom_tasks": csv_scenario["tasks"], **extra}


@pytest.mark.parametrize("method, mode", [("fltac", "local"), ("fedit", "central")])
def test_a_dp_run_records_the_accountants_epsilon_and_noised_adapters(method, mode, tiny_bert, csv_scenario,
                                                                      tmp_path):
    """Every round line carries the epsilon so far (opacus, called directly here) and its increment; the summary
    the run's total. Honest noised submissions pass the screen (no drop)."""
    out = tmp_path / "dp"
    cfg = load_config(None, _overrides(tiny_bert, csv_scenario, out, method=method, **{
        "privacy.mode": mode, "privacy.noise_multiplier": 1.5, "privacy.clip_norm": 0.2}))
    summary = run(cfg, quiet=True)
    lines = [m for m in io.read_jsonl(out / "metrics.jsonl") if m["phase"] == "round"]
    previous = 0.0
    for line in lines:
        acc = RDPAccountant()
        for _ in range(line["round"]):
            acc.step(noise_multiplier=1.5, sample_rate=1.0)
        assert line["epsilon"] == acc.get_epsilon(delta=1e-5)
        assert line["epsilon_round"] == pytest.approx(line["epsilon"] - previous)
        previous = line["epsilon"]
    assert summary["privacy"]["epsilon"] == lines[-1]["epsilon"] and summary["privacy"]["mode"] == mode
    assert summary["dropped_submissions"] == 0
    plain = run(load_config(None, _overrides(tiny_bert, csv_scenario, tmp_path / "plain", method=method)), quiet=True)
    assert "privacy" not in plain
    a, b = (load_file(d / "adapters" / "round_1.safetensors") for d in (out, tmp_path / "plain"))
    assert any(not torch.equal(a[k], b[k]) for k in a)
    if method == "fltac":  # what K-means saw: the submissions, noised on the client (std 1.5 x 0.2 per entry)
        subs = load_file(out / "adapters" / "submissions_round_1.safetensors")
        b_keys = [k for k in subs if k.endswith("lora_B.weight")]  # B starts at zero: the entry is update + noise
        entries = torch.cat([subs[k].flatten() for k in b_keys]).double()
        assert float(entries.std()) == pytest.approx(0.3, rel=0.15)


@pytest.mark.parametrize("mode", ["local", "central"])
def test_a_dp_run_resumes_byte_identically(mode, tiny_bert, csv_scenario, tmp_path, monkeypatch):
    """The noise streams are (seed, round, client/slot) and the accountant is recomputed from the round, so a run
    killed before round 2's records resumes to the uninterrupted run's files, byte for byte; FedAdam composes."""
    extra = {"privacy.mode": mode, "privacy.target_epsilon": 8.0, "server.optimizer": "fedadam",
             "lora.freeze_A": True}
    whole = run(load_config(None, _overrides(tiny_bert, csv_scenario, tmp_path / "whole", **extra)), quiet=True)
    cfg = load_config(None, _overrides(tiny_bert, csv_scenario, tmp_path / "cut", **extra))
    resumed = run_killed_and_resumed(cfg, monkeypatch)
    for name in ("round_1.safetensors", "round_2.safetensors"):
        assert (tmp_path / "whole" / "adapters" / name).read_bytes() == (tmp_path / "cut" / "adapters" / name).read_bytes()
    strip = lambda rows: [{k: v for k, v in m.items() if "seconds" not in k} for m in rows]  # noqa: E731
    assert strip(io.read_jsonl(tmp_path / "whole" / "metrics.jsonl")) == strip(
        io.read_jsonl(tmp_path / "cut" / "metrics.jsonl"))
    assert resumed["privacy"] == whole["privacy"] and resumed["per_task_accuracy"] == whole["per_task_accuracy"]


@pytest.mark.parametrize("overrides, key", [
    ({"method": "centralized", "privacy.mode": "local", "privacy.noise_multiplier": 1.0}, "privacy.mode"),
    ({"method": "hafl", "privacy.mode": "local", "privacy.noise_multiplier": 1.0}, "privacy.mode"),
    ({"privacy.clip_norm": 0.0}, "privacy.clip_norm"),
    ({"privacy.clip_norm": -1.0}, "privacy.clip_norm"),
    ({"privacy.mode": "local", "privacy.target_epsilon": 0.0}, "privacy.target_epsilon"),
    ({"privacy.mode": "local", "privacy.target_epsilon": -2.0}, "privacy.target_epsilon"),
    ({"privacy.mode": "local", "privacy.noise_multiplier": 0.0}, "privacy.noise_multiplier"),
    ({"privacy.mode": "local"}, "privacy.noise_multiplier"),
    ({"privacy.mode": "local", "privacy.noise_multiplier": 1.0, "privacy.target_epsilon": 1.0},
     "privacy.noise_multiplier"),
    ({"privacy.mode": "local", "privacy.noise_multiplier": 1.0, "privacy.delta": 0.2}, "privacy.delta"),
    ({"privacy.mode": "central", "privacy.noise_multiplier": 1.0, "reliability.aggregation": "median"},
     "reliability.aggregation"),
])
def test_bad_privacy_settings_are_refused_in_one_line_naming_the_key(overrides, key):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert f"'{key}'" in str(err.value) and "\n" not in str(err.value)


def test_without_opacus_a_dp_run_stops_in_one_line_naming_the_pip_command(monkeypatch):
    cfg = _cfg(mode="local", noise_multiplier=1.0)
    monkeypatch.setitem(sys.modules, "opacus.accountants", None)  # import fails as if opacus were absent
    with pytest.raises(ConfigError, match=r"pip install 'fltac\[dp\]'") as err:
        noise_multiplier(cfg)
    assert "\n" not in str(err.value)
