"""Routed batches (``train.batching: routed``): one client budget for every method.

- the stacked AdamW is torch's AdamW bit for bit for an adapter that steps every time, and leaves an
  adapter told not to step (weights and moments) untouched;
- a routed step whose batch holds one task equals the old one-adapter step;
- a row's gradient reaches only its task's adapter (and only its task's head rows);
- an adapter without rows in a step is left bit-identical, and one without rows in the whole round is not
  uploaded (an 'idle' record instead);
- FL-TAC and FedIT of one client see the same rows in a round;
- a client trained alone gives the bytes it gets beside the other clients of a round (bf16, where the CPU
  has bf16 units): what makes the Flower engine equal the in-process one.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from fltac.client.optim import StackedAdamW
from fltac.client.round import train_client
from fltac.client.train import (Route, job_seed, plan_routes, route_seed, routed_batches, row_losses,
                                train_all_routed, train_job, train_routes_together)
from fltac.config import load_config
from fltac.data.batches import sample_batches
from fltac.experiment import build_experiment
from fltac.models.backbone import bf16_support
from fltac.models.bank import AdapterBank, Block, Group
from fltac.wire import Broadcast
from tests.conftest import assert_same_training, tiny_config_overrides

BF16 = bf16_support(torch.device("cpu"))[0]


def _experiment(tiny_bert, csv_scenario, out, **extra):
    overrides = {**tiny_config_overrides(tiny_bert, out), "data.scenario": "custom",
                 "data.custom_tasks": csv_scenario["tasks"], "train.batch_size": 5, **extra}
    return build_experiment(load_config(None, overrides))


@pytest.fixture(scope="module")
def fltac_exp(tiny_bert, csv_scenario, tmp_path_factory):
    return _experiment(tiny_bert, csv_scenario, tmp_path_factory.mktemp("routed"))


def _two_task_route(exp) -> Route:
    return next(r for r in plan_routes(exp.jobs) if len(r.jobs) == 2)


# ---- the optimizer -------------------------------------------------------------------------------------

@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_stacked_adamw_is_torch_adamw_bit_for_bit_and_skips_masked_adapters(weight_decay):
    gen = torch.Generator().manual_seed(0)
    shapes = [(4, 24), (24, 4), (6, 24), (6,)]
    stack = [torch.nn.Parameter(torch.randn(3, *s, generator=gen)) for s in shapes]
    start = [p.detach().clone() for p in stack]
    alone = [torch.nn.Parameter(p[0].detach().clone()) for p in stack]
    ours = StackedAdamW(stack, lr=3e-3, weight_decay=weight_decay)
    theirs = torch.optim.AdamW(alone, lr=3e-3, weight_decay=weight_decay)
    for step in range(6):
        grads = [torch.randn(3, *s, generator=gen) * 10.0 ** (step - 3) for s in shapes]
        for p, g in zip(stack, grads):
            p.grad = g
        ours.step([True, step % 2 == 0, False])  # adapter 1 steps every other time, adapter 2 never
        for p, g in zip(alone, grads):
            p.grad = g[0].clone()
        theirs.step()
    for p, q in zip(stack, alone):
        assert torch.equal(p[0], q)  # bit for bit
    for p, s in zip(stack, start):
        assert torch.equal(p[2], s[2]) and not torch.equal(p[1], s[1])
    assert all(torch.equal(m[2], torch.zeros_like(m[2])) for m in ours.exp_avg + ours.exp_avg_sq)
    assert ours.steps == [6, 3, 0]


# ---- the routed step -----------------------------------------------------------------------------------

def test_a_routed_step_holding_one_task_equals_the_old_one_adapter_step(fltac_exp):
    """A client holding one task: its route is its one job; same batches, dropout draws and AdamW steps
    as the one-by-one peft path, up to fp32 rounding."""
    exp = fltac_exp
    job = replace(exp.jobs[0], steps=3)
    route = Route(job.client, (job,))
    seed = route_seed(7, 1, route)
    assert seed == job_seed(7, 1, job.client, job.key)
    start = exp.strategy.initial
    alone = train_job(exp.model, start, exp.train_store, job, exp.cfg.train, seed)
    (routed,), = train_routes_together(exp.model, [[start]], exp.train_store, [route], exp.cfg.train, [seed], 10_000)
    assert_same_training(start, [alone], [routed])


def test_a_rows_gradient_reaches_only_its_tasks_adapter(fltac_exp):
    exp = fltac_exp
    route = _two_task_route(exp)
    rows, owner = next(routed_batches(route, 8, np.random.default_rng(0)))
    assert set(owner) == {0, 1}  # a mixed batch
    start = exp.strategy.initial
    bank = AdapterBank(exp.model, [start, start], [1])
    split = int(np.searchsorted(owner, 1))
    exp.model.model.train()
    with bank.installed():
        bank.set_layout([Group(0, 0, split), Group(1, split, len(rows))], [Block(0, 0, len(rows), 0)])
        batch = exp.train_store.batch(rows)
        per_row = row_losses(exp.model.logits(**batch.model_inputs()), batch)
        per_row[0].backward()  # the first row only: task of adapter 0
    for key, p in bank.params.items():
        assert torch.count_nonzero(p.grad[1]) == 0, key
    head = bank.params["classifier.weight"].grad[0]
    task = int(exp.train_store.task[rows[0]])
    units = slice(exp.space.offsets[task], exp.space.offsets[task] + exp.space.sizes[task])
    assert torch.count_nonzero(head[units]) > 0
    assert torch.count_nonzero(head) == torch.count_nonzero(head[units])  # no other task's head row moved
    assert any(torch.count_nonzero(p.grad[0]) > 0 for k, p in bank.params.items() if "lora_B" in k)


def test_an_adapter_without_rows_in_a_step_takes_no_step(fltac_exp):
    """One row per step: every step trains exactly one of the client's two adapters; the other one has no
    loss, no token and no AdamW step there. After one step the untouched adapter is bit-identical."""
    exp = fltac_exp
    route = _two_task_route(exp)
    cfg = replace(exp.cfg.train, batch_size=1)
    start = exp.strategy.initial
    one_step = Route(route.client, (replace(route.jobs[0], steps=1), replace(route.jobs[1], steps=0)))
    (a, b), = train_routes_together(exp.model, [[start, start]], exp.train_store, [one_step], cfg, [5], 10_000)
    moved, kept = (a, b) if a[1] else (b, a)
    assert len(moved[1]) == 1 and kept[1] == [] and kept[2] == 0
    assert all(torch.equal(kept[0][k], start[k]) for k in start)
    assert any(not torch.equal(moved[0][k], start[k]) for k in start)
    # several steps: each adapter's step count is the number of steps holding its rows
    results, = train_routes_together(exp.model, [[start, start]], exp.train_store, [route], cfg, [5], 10_000)
    draws = list(routed_batches(route, 1, np.random.default_rng(5)))
    assert [len(r[1]) for r in results] == [sum(int(o[0] == j) for _, o in draws) for j in (0, 1)]


def test_an_adapter_without_rows_in_the_round_is_not_uploaded(fltac_exp):
    """One step of one row: one of the client's two adapters trains, the other took no step, so its update is
    exactly zero; the client uploads the trained one only and logs the other as idle."""
    exp = fltac_exp
    route = _two_task_route(exp)
    cfg = replace(exp.cfg, train=replace(exp.cfg.train, batch_size=1))
    cjobs = [replace(route.jobs[0], steps=1), replace(route.jobs[1], steps=0)]
    broadcasts = {j.key: Broadcast(exp.strategy.initial) for j in cjobs}
    result = train_client(exp.model, exp.train_store, cfg, 1, route.client, cjobs, broadcasts, exp.task_names)
    (upload,) = result.uploads
    (idle,) = [r for r in result.records if r["phase"] == "idle"]
    assert {upload.key, idle["key"]} == {j.key for j in cjobs} and idle["client"] == route.client
    assert [r["key"] for r in result.records if r["phase"] == "local"] == [upload.key]
    assert any(not torch.equal(upload.state[k], exp.strategy.initial[k]) for k in upload.state)


def test_fltac_and_fedit_of_one_client_see_the_same_rows_in_a_round(fltac_exp, tiny_bert, csv_scenario, tmp_path):
    exp = fltac_exp
    fedit = _experiment(tiny_bert, csv_scenario, tmp_path, method="fedit")
    for route in plan_routes(exp.jobs):
        (job,) = [j for j in fedit.jobs if j.client == route.client]
        assert route.steps == job.steps
        ours = list(routed_batches(route, 5, np.random.default_rng(route_seed(3, 2, route))))
        theirs = list(sample_batches(job.rows, job.steps, 5, np.random.default_rng(job_seed(3, 2, job.client, job.key))))
        assert len(ours) == len(theirs) == job.steps
        for (rows, owner), want in zip(ours, theirs):
            assert sorted(rows) == sorted(want)
            assert (exp.train_store.task[rows] == [route.jobs[j].tasks[0] for j in owner]).all()
    # the trainer itself: both methods' clients train the same tokens
    starts = {(j.client, j.key): exp.strategy.initial for j in exp.jobs}
    ours = train_all_routed(exp.model, exp.train_store, exp.jobs, starts, exp.cfg.train, 3, 2)
    theirs = train_all_routed(fedit.model, fedit.train_store, fedit.jobs,
                              {(j.client, j.key): fedit.strategy.initial for j in fedit.jobs}, fedit.cfg.train, 3, 2)
    for client in {j.client for j in exp.jobs}:
        assert sum(v[2] for k, v in ours.items() if k[0] == client) == theirs[(client, "a0")][2]


@pytest.mark.skipif(not BF16, reason="the CPU reports no bf16 units (AMX / AVX512-BF16)")
def test_a_client_alone_gives_the_bytes_it_gets_beside_the_others_in_bf16(tiny_bert, csv_scenario, tmp_path):
    """Clients of different widths, one bank for all vs one bank per client (a Flower client): bit-identical."""
    tasks = [{k: v for k, v in t.items() if k != "client_column"} for t in csv_scenario["tasks"]]
    exp = _experiment(tiny_bert, {"tasks": tasks}, tmp_path, dtype="bfloat16",
                      **{"partition.n_clients": 4, "partition.alpha": 0.3})
    starts = {(j.client, j.key): exp.strategy.initial for j in exp.jobs}
    together = train_all_routed(exp.model, exp.train_store, exp.jobs, starts, exp.cfg.train, 3, 1)
    routes = plan_routes(exp.jobs)
    assert len(routes) > 2 and any(len(r.jobs) > 1 for r in routes)
    for route in routes:
        alone = train_all_routed(exp.model, exp.train_store, list(route.jobs), starts, exp.cfg.train, 3, 1)
        for key, (state, losses, tokens) in alone.items():
            ref = together[key]
            assert losses == ref[1] and tokens == ref[2]
            assert all(torch.equal(state[k], ref[0][k]) for k in state), key
