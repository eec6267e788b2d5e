"""Client-side algorithms for every method, on every training path: FedProx's proximal term (``train.prox_mu``)
and FFA-LoRA (``lora.freeze_A``).

- the proximal term's gradient is ``mu * (w - w_sent)`` (a hand case), and in the bank only the adapters
  that step get it;
- the bank's term (routed and per-adapter shared passes) equals the per-adapter hook, up to fp32 rounding;
- an adapter without rows in a routed step stays bit-identical with the term on;
- mu = 0 leaves a client's adapters byte-identical to a client without the term;
- FFA-LoRA: lora_A stays bit-identical on every path while B and the head train; the server's average of
  B with the shared A is the exact average of the products; tiny runs of FL-TAC and FedIT complete, keep
  every slot's A and send A's bytes less;
- bad settings are refused with one line naming the key.
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from fltac.client.proximal import Proximal
from fltac.client.round import train_client
from fltac.client.train import (Route, add_proximal_grad, bank_proximal, job_seed, plan_routes, route_seed,
                                train_job, train_jobs_together, train_routes_together)
from fltac.config import ConfigError, load_config
from fltac.engines.inprocess import run
from fltac.experiment import build_experiment
from fltac.models.bank import AdapterBank
from fltac.server.strategies import make_strategy
from fltac.wire import A_SUFFIX, B_SUFFIX, Broadcast, Submission
from tests.conftest import assert_same_training, run_killed_and_resumed, tiny_config_overrides

MU = 10.0  # large enough to change a few steps of training well beyond fp32 rounding


def _overrides(tiny_bert, csv_scenario, out, **extra) -> dict:
    return {**tiny_config_overrides(tiny_bert, out), "data.scenario": "custom",
            "data.custom_tasks": csv_scenario["tasks"], "train.batch_size": 5, **extra}


@pytest.fixture(scope="module")
def exp(tiny_bert, csv_scenario, tmp_path_factory):
    return build_experiment(load_config(None, _overrides(tiny_bert, csv_scenario, tmp_path_factory.mktemp("prox"))))


@pytest.fixture(scope="module")
def ffa_exp(tiny_bert, csv_scenario, tmp_path_factory):
    overrides = _overrides(tiny_bert, csv_scenario, tmp_path_factory.mktemp("ffa"),
                           **{"lora.freeze_A": True, "train.weight_decay": 0.01, "train.prox_mu": MU})
    return build_experiment(load_config(None, overrides))


def _one_job_route(exp, steps: int, which: int = 0) -> Route:
    job = replace(exp.jobs[which], steps=steps)
    return Route(job.client, (job,))


# ---- FedProx ----------------------------------------------------------------------------------------------

def test_the_proximal_gradient_is_mu_times_the_distance_to_the_sent_weights():
    sent = {"w": torch.tensor([1.0, 2.0, -0.5])}
    w = torch.nn.Parameter(torch.tensor([3.0, -1.0, -0.5]))
    loss = Proximal(0.5, sent).extra_loss({"w": w})
    assert loss.item() == pytest.approx(0.25 * (2.0 ** 2 + 3.0 ** 2))  # mu / 2 * ||w - w_sent||^2
    loss.backward()
    assert torch.equal(w.grad, torch.tensor([1.0, -1.5, 0.0]))  # mu * (w - w_sent)
    assert Proximal(0.0, sent).extra_loss({"w": w}) is None


def test_in_the_bank_only_the_adapters_that_step_get_the_proximal_gradient(exp):
    start = exp.strategy.initial
    bank = AdapterBank(exp.model, [start, start, start], [1, 2, 3])
    prox = bank_proximal(bank, 0.5)
    with torch.no_grad():  # every adapter moved away from what it was sent
        for p in bank.params.values():
            p.add_(torch.linspace(-1.0, 1.0, p.numel()).reshape(p.shape))
    add_proximal_grad(prox, bank, [True, False, True])
    for key, p in bank.trained.items():
        for g in (0, 2):
            assert torch.equal(p.grad[g], 0.5 * (p[g].detach() - start[key])), key
        assert torch.count_nonzero(p.grad[1]) == 0, key


def test_the_banks_proximal_term_equals_the_per_adapter_hook(exp):
    """One client's one adapter, 4 steps: the routed and per-adapter shared passes with ``train.prox_mu``
    train what :func:`train_job` trains with the Proximal hook, up to fp32 rounding; and the term matters."""
    route = _one_job_route(exp, 4)
    (job,) = route.jobs
    seed = route_seed(7, 1, route)
    start = exp.strategy.initial
    cfg = replace(exp.cfg.train, prox_mu=MU)
    alone = train_job(exp.model, start, exp.train_store, job, cfg, seed, [Proximal(MU, start)])
    (routed,), = train_routes_together(exp.model, [[start]], exp.train_store, [route], cfg, [seed], 10_000)
    together = train_jobs_together(exp.model, [start], exp.train_store, [job], cfg, [seed], 10_000)
    assert_same_training(start, [alone], [routed])
    assert_same_training(start, [alone], together)
    plain = train_job(exp.model, start, exp.train_store, job, exp.cfg.train, seed)
    assert max(float((alone[0][k] - plain[0][k]).abs().max()) for k in start) > 1e-3


def test_an_adapter_without_rows_stays_bit_identical_with_the_proximal_term_on(exp):
    """Two clients of one adapter each in one bank, one pass per block: client 1 has rows in step 1 only.
    Whether client 0 goes on for two more steps (in which client 1's adapter has no rows while client 0's
    moves under the term) or not, client 1's adapter comes out bit for bit the same."""
    cfg = replace(exp.cfg.train, prox_mu=MU)
    start = exp.strategy.initial
    other = next(i for i, j in enumerate(exp.jobs) if j.client != exp.jobs[0].client)
    short = _one_job_route(exp, 1, other)
    seeds = [5, 6]
    results = {}
    for steps in (1, 3):
        (_,), (kept,) = train_routes_together(exp.model, [[start], [start]], exp.train_store,
                                              [_one_job_route(exp, steps), short], cfg, seeds, 1)
        results[steps] = kept
    assert len(results[3][1]) == 1
    assert any(not torch.equal(results[3][0][k], start[k]) for k in start)  # it trained in its one step
    assert all(torch.equal(results[3][0][k], results[1][0][k]) for k in start)


@pytest.mark.parametrize("batching", ["routed", "per_adapter"])
def test_mu_zero_leaves_a_clients_adapters_byte_identical(exp, batching):
    """A client's round through :func:`train_client` with ``train.prox_mu: 0`` sends the bytes the training
    functions give without any proximal term (routed bank; one adapter at a time)."""
    cfg = replace(exp.cfg, train=replace(exp.cfg.train, prox_mu=0.0, batching=batching))
    client = exp.jobs[0].client
    cjobs = [j for j in exp.jobs if j.client == client]
    start = exp.strategy.initial
    got = train_client(exp.model, exp.train_store, cfg, 1, client, cjobs,
                       {j.key: Broadcast(start) for j in cjobs}, exp.task_names)
    if batching == "routed":
        (route,) = plan_routes(cjobs)
        want = [s for s, _, _ in train_routes_together(exp.model, [[start] * len(cjobs)], exp.train_store, [route],
                                                        cfg.train, [route_seed(cfg.seed, 1, route)],
                                                        cfg.train.pass_tokens)[0]]
    else:
        want = [train_job(exp.model, start, exp.train_store, j, cfg.train, job_seed(cfg.seed, 1, client, j.key))[0]
                for j in cjobs]
    assert [u.key for u in got.uploads] == [j.key for j in cjobs]
    for upload, state in zip(got.uploads, want):
        assert list(upload.state) == list(state)
        assert all(torch.equal(upload.state[k], state[k]) for k in state)


# ---- FFA-LoRA ---------------------------------------------------------------------------------------------

def test_ffa_lora_clients_never_move_lora_A_on_any_path(ffa_exp):
    """With weight decay and the proximal term on: one adapter at a time, the routed bank and the per-adapter
    bank all leave every lora_A bit-identical to what was sent, and train every lora_B and the head."""
    exp = ffa_exp
    start = exp.strategy.initial
    route = next(r for r in plan_routes(exp.jobs) if len(r.jobs) == 2)
    seed = route_seed(3, 1, route)
    cfg = exp.cfg.train
    alone = train_job(exp.model, start, exp.train_store, route.jobs[0], cfg, seed)[0]
    routed = [s for s, _, _ in train_routes_together(exp.model, [[start, start]], exp.train_store, [route], cfg,
                                                      [seed], 10_000)[0]]
    together = [s for s, _, _ in train_jobs_together(exp.model, [start, start], exp.train_store, list(route.jobs),
                                                      cfg, [seed, seed + 1], 10_000)]
    a_keys = [k for k in start if k.endswith(A_SUFFIX)]
    assert a_keys and set(a_keys) == set(exp.model.frozen_keys)
    for state in [alone, *routed, *together]:
        for k in start:
            assert torch.equal(state[k], start[k]) == (k in a_keys), k


def test_ffa_lora_averaging_of_b_is_the_exact_average_of_the_products(ffa_exp):
    """FedAvg of B with every member's A the shared one: the slot keeps A bit for bit, and B_avg A equals
    the sample-weighted mean of the members' products B_i A (to fp32 rounding)."""
    exp = ffa_exp
    start = exp.strategy.initial
    strategy = make_strategy(replace(exp.cfg, method="fedit"), start, 2, exp.model.lora_keys)  # one slot
    gen = torch.Generator().manual_seed(0)
    states = [{k: v if k.endswith(A_SUFFIX) else v + torch.randn(v.shape, generator=gen) for k, v in start.items()}
              for _ in range(3)]
    weights = [1, 2, 5]
    strategy.aggregate(1, [Submission(c, "a0", s, n, start) for c, (s, n) in enumerate(zip(states, weights))])
    slot = strategy.slots_[0]
    for a_key in (k for k in start if k.endswith(A_SUFFIX)):
        b_key = a_key.removesuffix(A_SUFFIX) + B_SUFFIX
        assert torch.equal(slot[a_key], start[a_key])
        products = sum(n * (s[b_key].double() @ s[a_key].double()) for s, n in zip(states, weights)) / sum(weights)
        torch.testing.assert_close(slot[b_key].double() @ slot[a_key].double(), products, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("method", ["fltac", "fedit"])
def test_a_tiny_ffa_lora_run_with_fedprox_keeps_every_slots_A_and_sends_less(method, tiny_bert, csv_scenario,
                                                                           tiny_runs, tmp_path):
    """A 2-round run with ``lora.freeze_A`` and ``train.prox_mu`` completes; every slot's lora_A after the
    last round is the initial one bit for bit; each round's uplink is the plain run's (tests/conftest.py
    ``tiny_runs``, same seed, so the same uploads) times (adapter bytes - A bytes) / adapter bytes."""
    out = tmp_path / method
    cfg = load_config(None, _overrides(tiny_bert, csv_scenario, out, method=method, **{
        "train.batch_size": 4, "lora.freeze_A": True, "train.prox_mu": 0.01}))
    summary = run(cfg, quiet=True)
    initial = build_experiment(cfg).strategy.initial  # seeded: the adapter the run started from
    slots = load_file(out / "adapters" / "round_2.safetensors")
    slot_of = {}
    for name, v in slots.items():
        slot, key = name.split("/", 1)
        slot_of.setdefault(slot, {})[key] = v
    a_keys = [k for k in initial if k.endswith(A_SUFFIX)]
    assert a_keys and slot_of
    for slot in slot_of.values():
        assert all(torch.equal(slot[k], initial[k]) for k in a_keys)
        assert any(not torch.equal(slot[k], initial[k]) for k in initial if k.endswith(B_SUFFIX))
    first = slot_of["slot0"]
    whole = sum(v.numel() * v.element_size() for v in first.values())
    a_bytes = sum(v.numel() * v.element_size() for k, v in first.items() if k.endswith(A_SUFFIX))

    def uplinks(folder):
        return [json.loads(line)["uplink_bytes"] for line in (folder / "metrics.jsonl").read_text().splitlines()
                if json.loads(line).get("phase") == "round"]

    ours, plain = uplinks(out), uplinks(tiny_runs[method])
    assert len(ours) == len(plain) == 2
    assert [u * whole for u in ours] == [p * (whole - a_bytes) for p in plain]
    a_params = sum(v.numel() for k, v in first.items() if k.endswith(A_SUFFIX))
    assert summary["trainable_params_per_adapter"] == sum(v.numel() for v in first.values()) - a_params


# ---- configuration ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides, key", [
    ({"train.prox_mu": -0.1}, "train.prox_mu"),
    ({"train.prox_mu": float("nan")}, "train.prox_mu"),
    ({"train.prox_mu": "inf"}, "train.prox_mu"),
    ({"method": "safedlora", "train.prox_mu": 0.1}, "train.prox_mu"),
    ({"method": "hafl", "lora.freeze_A": True}, "lora.freeze_A"),
])
def test_bad_client_algorithm_settings_are_refused_naming_the_key(overrides, key):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    message = str(err.value)
    assert f"'{key}'" in message and "\n" not in message


def test_ffa_lora_fltac_clusters_on_what_trains(ffa_exp):
    """K-means leaves the frozen A (identical in every submission) out of its features."""
    strategy = make_strategy(ffa_exp.cfg, ffa_exp.strategy.initial, 2, ffa_exp.model.lora_keys)
    assert strategy.feature_keys == [k for k in ffa_exp.model.lora_keys if k.endswith(B_SUFFIX)]


def test_an_ffa_lora_fedprox_run_with_a_server_optimizer_resumes_bit_for_bit(tiny_bert, csv_scenario, tmp_path,
                                                                             monkeypatch):
    """Neither option keeps state of its own (the shared A is in the slots, the anchor is the broadcast), so a
    run killed before round 2's records resumes to the uninterrupted run's adapters, bit for bit; FedAdam's
    zero pseudo-gradient on A leaves it the initial one."""
    extra = {"lora.freeze_A": True, "train.prox_mu": 0.01, "server.optimizer": "fedadam"}
    whole = run(load_config(None, _overrides(tiny_bert, csv_scenario, tmp_path / "whole", **extra)), quiet=True)
    cfg = load_config(None, _overrides(tiny_bert, csv_scenario, tmp_path / "cut", **extra))
    resumed = run_killed_and_resumed(cfg, monkeypatch)
    a, b = (load_file(tmp_path / d / "adapters" / "round_2.safetensors") for d in ("whole", "cut"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["per_task_accuracy"] == whole["per_task_accuracy"]
    initial = build_experiment(cfg).strategy.initial
    assert all(torch.equal(v, initial[k.split("/", 1)[1]]) for k, v in a.items()
               if k.startswith("slot") and k.endswith(A_SUFFIX))


@pytest.mark.parametrize("method", ["hafl", "hetlora", "fedavg_full"])
def test_fedprox_reaches_the_methods_trained_one_adapter_at_a_time(method, tiny_bert, csv_scenario, tmp_path):
    """HAFL and HetLoRA clients train one adapter at a time with their own hooks, fedavg_full's the whole
    backbone (FedProx proper); ``train.prox_mu`` joins them (the term acts: the result differs from the run
    without it)."""
    states = {}
    for mu in (0.0, MU):
        out = tmp_path / f"mu{mu}"
        run(load_config(None, _overrides(tiny_bert, csv_scenario, out, method=method, **{"train.prox_mu": mu})),
            quiet=True)
        states[mu] = load_file(out / "adapters" / "round_2.safetensors")
    assert states[0.0].keys() == states[MU].keys()
    assert any(not torch.equal(states[0.0][k], states[MU][k]) for k in states[0.0])
