"""The strategy contract, checked over every registered method (scikit-learn's ``check_estimator`` idea).

Each method's strategy is built by its registry factory (:mod:`fltac.methods`) from small synthetic
adapters (no backbone), its clients' jobs come from the registry's layout (:func:`plan_jobs`), and each
"client" answers its broadcast as a real one would: the broadcast's hooks see one backward pass, cut the
upload (``Hook.outgoing``) and add their extras. Then, for every method:

- identical submissions aggregate to themselves (what each client is sent next is what it submitted);
- the order of the submissions does not matter;
- scaling every sample count by the same factor changes nothing;
- the same seed gives the same state, bit for bit;
- an empty round is the same named error (:class:`~fltac.server.strategies.EmptyRoundError`);
- ``state_dict`` / ``load_state_dict`` (through JSON) round-trips, and the next round then agrees.
"""

from __future__ import annotations

import json
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

from fltac.client.hooks import make_hooks
from fltac.client.round import sent_part
from fltac.client.train import plan_jobs
from fltac.config import load_config
from fltac.methods import METHODS
from fltac.server.strategies import EmptyRoundError, make_strategy
from fltac.wire import Submission

N_CLIENTS, N_TASKS, RANK, D_IN, D_OUT, N_LABELS = 4, 2, 4, 6, 5, 3
MODULES = ("enc.0.q", "enc.0.v")
#: Per method, config keys its strategy needs for this synthetic setup (ranks that fit R = RANK, short stages).
OVERRIDES = {
    "hafl": {"hafl.client_ranks": [2, 4, 3, 1]},
    "hetlora": {"hafl.client_ranks": [2, 4, 3, 1]},
    "flexlora": {"hafl.client_ranks": [2, 4, 3, 1]},
    "flora": {"lora.rank": RANK, "hafl.client_ranks": [2, 3, 1, 2]},
    "safedlora": {"train.rounds": 5, "safedlora.init_rounds": 1, "safedlora.rank_init": RANK,
                  "safedlora.target_rank": 2, "safedlora.warm_rounds": 2, "safedlora.cool_rounds": 1},
}
#: HetLoRA zero-pads: a component only some clients trained is shrunk by their share of the weight, by design
#: (tests/test_hafl.py checks that), so its identity check gives every client the full rank R.
IDENTITY_OVERRIDES = {"hetlora": {"hafl.client_ranks": [RANK] * N_CLIENTS},
                      "flexlora": {"hafl.client_ranks": [RANK] * N_CLIENTS}}
#: Methods that merge the products B A, not the factors. FlexLoRA re-splits the mean product by SVD: identical
#: submissions come back as their product. FLoRA adds the product to a frozen residual and sends fresh components
#: every round, so nothing comes back as sent (tests/test_hetero_aggregation.py checks its residual by hand).
PRODUCT_IDENTITY = {"flexlora"}
NO_IDENTITY = {"flora"}
#: Rounds each check runs: the first, and one more (for safedlora: its first annealing round).
ROUNDS = (1, 2)


def _randn(g: torch.Generator, *shape) -> torch.Tensor:
    return torch.randn(*shape, generator=g)


def synthetic_initial(method: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    """(initial state, its LoRA keys): a LoRA adapter + head, or for a method that trains the backbone the
    model's every parameter (backbone weights, head, full-rank AdaLoRA factors), as the real models give them."""
    g = torch.Generator().manual_seed(0)
    state = {}
    if METHODS[method].trains_backbone:
        for m in MODULES:
            state[f"{m}.base_layer.weight"] = _randn(g, D_OUT, D_IN)
            state[f"{m}.lora_A"] = _randn(g, RANK, D_IN) * 0.1
            state[f"{m}.lora_E"] = torch.zeros(RANK, 1)
            state[f"{m}.lora_B"] = _randn(g, D_OUT, RANK) * 0.1
    else:
        for m in MODULES:
            state[f"{m}.lora_A.weight"] = _randn(g, RANK, D_IN) * 0.1
            state[f"{m}.lora_B.weight"] = torch.zeros(D_OUT, RANK)
    state["classifier.weight"] = _randn(g, N_LABELS, D_OUT) * 0.1
    state["classifier.bias"] = torch.zeros(N_LABELS)
    return state, [k for k in state if ".lora_A.weight" in k or ".lora_B.weight" in k]


def new_strategy(method: str, overrides: dict | None = None):
    cfg = load_config(None, {"method": method, "partition.n_clients": N_CLIENTS, "seed": 7, **OVERRIDES.get(method, {}),
                             **(overrides or {})})
    initial, lora_keys = synthetic_initial(method)
    return make_strategy(cfg, initial, N_TASKS, lora_keys)


def jobs_of(method: str) -> list:
    """The method's jobs for 4 clients that each hold rows of both tasks (its registry layout decides them)."""
    rows = [[np.arange(10 * (k * N_TASKS + t), 10 * (k * N_TASKS + t) + 3 + k) for t in range(N_TASKS)]
            for k in range(N_CLIENTS)]
    return plan_jobs(method, rows, local_steps=2)


def trained_values(sent: dict[str, torch.Tensor], keys, seed: int | None) -> dict[str, torch.Tensor]:
    """A client's trained adapter in the broadcast's layout. ``seed`` None: one constant per tensor, the same for
    every client (so every rank-1 component scores the same and HAFL keeps choosing the same ones); else a
    random adapter shifted by its task (``seed // 100``) plus small per-client noise. Index tensors stay."""
    fixed = torch.Generator().manual_seed(123)
    noise = torch.Generator().manual_seed(1000 + (seed or 0))
    out = {}
    for i, k in enumerate(keys):
        v = sent[k]
        if not v.is_floating_point():
            out[k] = v
        elif seed is None:
            out[k] = torch.full(v.shape, 0.1 * (i + 1))
        else:
            out[k] = _randn(fixed, *v.shape) + 3.0 * (seed // 100) + 0.01 * _randn(noise, *v.shape)
    return out


def client_submission(strategy, r: int, job, seed: int | None, weight: int = 1) -> Submission:
    """What ``job``'s client submits in round ``r``: the broadcast's hooks see one backward pass (gradient 1),
    then cut the upload and add their extras; the frozen part of a broadcast (not in the expected layout) stays
    on the client."""
    b = strategy.configure(r, job.client, job.key)
    keys = [k for k in b.state if k in strategy.expected_spec(job.client, job.key, b)]
    trained = trained_values(b.state, keys, seed)
    hooks = make_hooks(b.config, b.state)
    params = {k: torch.nn.Parameter(v.clone()) for k, v in trained.items() if v.is_floating_point()}
    for p in params.values():
        p.grad = torch.ones_like(p)
    for h in hooks:
        h.after_backward(params)
    state = dict(trained)
    for h in hooks:
        state = h.outgoing(state)
    extras = {k: v for h in hooks for k, v in h.extras().items()}
    return Submission(job.client, job.key, state, job.num_examples * weight, sent_part(b), extras)


def run_round(strategy, method: str, r: int, identical: bool = False, weight: int = 1, order=None):
    jobs = jobs_of(method)
    subs = [client_submission(strategy, r, j, None if identical else 100 * j.tasks[0] + 7 * j.client + i, weight)
            for i, j in enumerate(jobs)]
    if order is not None:
        subs = [subs[i] for i in order]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # K-means on identical points: fewer distinct clusters than K
        strategy.aggregate(r, subs)
    return subs


def served(strategy, method: str, r: int) -> dict[tuple[int, str], dict[str, torch.Tensor]]:
    """Per job, the part of its next broadcast that matches what it uploads (the strategy's view of each job)."""
    return {(j.client, j.key): sent_part(strategy.configure(r, j.client, j.key)) for j in jobs_of(method)}


def assert_states_close(a: dict, b: dict, keys=None, exact: bool = False) -> None:
    for k in keys if keys is not None else a:
        if exact:
            assert torch.equal(a[k], b[k]), k
        else:
            torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)


ALL = pytest.mark.parametrize("method", list(METHODS))


@ALL
def test_identical_submissions_aggregate_to_themselves(method):
    if method in NO_IDENTITY:
        pytest.skip(f"{method} serves fresh components each round")
    strategy = new_strategy(method, IDENTITY_OVERRIDES.get(method))
    for r in ROUNDS:
        subs = run_round(strategy, method, r, identical=True)
        now = served(strategy, method, r)
        if method in PRODUCT_IDENTITY:
            for s in subs:
                got = now[(s.client, s.key)]
                for m in MODULES:
                    torch.testing.assert_close(got[f"{m}.lora_B.weight"] @ got[f"{m}.lora_A.weight"],
                                               s.state[f"{m}.lora_B.weight"] @ s.state[f"{m}.lora_A.weight"])
            continue
        for s in subs:
            assert_states_close(now[(s.client, s.key)], s.state, keys=s.state)


def assert_rounds_agree(method: str, **variant) -> None:
    """Two fresh strategies, one fed the plain rounds and one the ``variant`` of them, serve every job the same."""
    a, b = new_strategy(method), new_strategy(method)
    for r in ROUNDS:
        run_round(a, method, r)
        run_round(b, method, r, **variant)
        got_a, got_b = served(a, method, r), served(b, method, r)
        for job in got_a:
            assert_states_close(got_a[job], got_b[job])


@ALL
def test_submission_order_does_not_matter(method):
    assert_rounds_agree(method, order=list(reversed(range(len(jobs_of(method))))))


@ALL
def test_scaling_every_weight_changes_nothing(method):
    assert_rounds_agree(method, weight=3)


@ALL
def test_same_seed_same_state_bit_for_bit(method):
    a, b = new_strategy(method), new_strategy(method)
    for r in ROUNDS:
        run_round(a, method, r)
        run_round(b, method, r)
    (ta, ma), (tb, mb) = a.state_dict(), b.state_dict()
    assert ma == mb and sorted(ta) == sorted(tb)
    assert_states_close(ta, tb, exact=True)


@ALL
def test_an_empty_round_is_the_same_named_error(method):
    strategy = new_strategy(method)
    with pytest.raises(EmptyRoundError, match="round 1: no submission to aggregate"):
        strategy.aggregate(1, [])
    run_round(strategy, method, 1)
    with pytest.raises(EmptyRoundError, match="round 2: no submission to aggregate"):
        strategy.aggregate(2, [])


@ALL
def test_state_dict_round_trips_and_the_next_round_agrees(method):
    a = new_strategy(method)
    run_round(a, method, ROUNDS[0])
    tensors, meta = a.state_dict()
    b = new_strategy(method)
    b.load_state_dict({k: v.clone() for k, v in tensors.items()}, json.loads(json.dumps(meta)))
    tb, mb = b.state_dict()
    assert mb == meta and sorted(tb) == sorted(tensors)
    assert_states_close(tb, tensors, exact=True)
    run_round(a, method, ROUNDS[1])
    run_round(b, method, ROUNDS[1])
    (ta, ma), (tb, mb) = a.state_dict(), b.state_dict()
    assert ma == mb
    assert_states_close(ta, tb, exact=True)


@ALL
def test_the_registry_says_whether_broadcasts_carry_hook_settings(method):
    strategy = new_strategy(method)
    configs = []
    for r in ROUNDS:
        configs += [strategy.configure(r, j.client, j.key).config for j in jobs_of(method)]
        run_round(strategy, method, r)
    assert any(configs) == METHODS[method].client_hooks


def test_the_battery_covers_every_registered_method():
    assert set(METHODS) == {"fltac", "fedit", "centralized", "hafl", "hetlora", "flexlora", "flora", "safedlora",
                            "fedavg_full"}
    assert all(jobs_of(m) for m in METHODS)


def _modules_loaded_by(module: str) -> set[str]:
    """Every module a fresh interpreter has loaded after ``import <module>``."""
    code = f"import sys, {module}; print('\\n'.join(sys.modules))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(proc.stdout.split())


def test_server_code_loads_no_client_code_and_a_strategy_no_peft():
    """The wire vocabulary is the one thing server and client share: a strategy loads neither client code nor
    peft / transformers, the heterogeneous-rank and SA-FedLoRA servers no client code, the config no torch."""
    strategies = _modules_loaded_by("fltac.server.strategies")
    assert not {m for m in strategies if m.split(".")[0] in ("peft", "transformers")}
    for module in ("fltac.server.strategies", "fltac.server.hafl", "fltac.server.safedlora"):
        assert not {m for m in _modules_loaded_by(module) if m.startswith("fltac.client")}, module
    assert "torch" not in _modules_loaded_by("fltac.config")
