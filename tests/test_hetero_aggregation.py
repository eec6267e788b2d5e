"""FLoRA and FlexLoRA: stacking and truncated SVD against hand-worked numbers and torch.linalg.svd, the strategies'
broadcasts and merges, config checks, tiny runs (uplink bytes by formula) and a bit-for-bit resume."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from fltac.client.importance import IDX
from fltac.config import ConfigError, load_config
from fltac.engines.inprocess import run
from fltac.server.hafl import aggregate_components
from fltac.server.hetero import FlexLoRA, FLoRA, discarded_fraction, stack_factors, svd_factors
from fltac.server.strategies import Submission
from test_end_to_end import COOKING, SPORT, WEATHER, _task, make_cfg

M = "layer.q"
A, B, HEAD = M + ".lora_A.weight", M + ".lora_B.weight", "classifier.weight"


def part(a, b):
    a, b = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    return torch.arange(a.shape[0]), a, b


def product(state) -> torch.Tensor:
    return state[B].double() @ state[A].double()


def upload(client: int, sent, a, b, n: int, head: float = 0.0) -> Submission:
    """Client ``client``'s submission: its trained rows ``a`` / columns ``b`` at the components it was sent."""
    idx = sent.config["hafl_train_only"][M]
    state = {A: torch.as_tensor(a, dtype=torch.float32), B: torch.as_tensor(b, dtype=torch.float32),
             HEAD: torch.full((2,), head)}
    return Submission(client, "a0", state, n, sent.state, {M + IDX: torch.tensor(idx, dtype=torch.int32)})


def initial(rank: int, d: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return {A: torch.rand(rank, d, generator=g) - 0.5, B: torch.zeros(d, rank), HEAD: torch.zeros(2)}


# ---- maths ---------------------------------------------------------------------------------------------------

def test_stacked_factors_multiply_to_the_weighted_sum_of_the_products():
    # B1 A1 = [[1, 0], [2, 0]], B2 A2 = [[0, 2], [1, 1]]; weights 1 and 3: p = 1/4, 3/4
    p1, p2 = part([[1, 0]], [[1], [2]]), part([[0, 2], [1, 1]], [[1, 0], [0, 1]])
    b, a = stack_factors([p1, p2], [1.0, 3.0])
    assert b.shape == (2, 3) and a.shape == (3, 2)
    assert torch.equal(b @ a, torch.tensor([[0.25, 1.5], [1.25, 0.75]], dtype=torch.float64))
    # factor-wise averaging (HetLoRA's zero-padding) has cross terms: not the mean of the products
    current = {A: torch.zeros(2, 2, dtype=torch.float64), B: torch.zeros(2, 2, dtype=torch.float64)}
    padded = aggregate_components(current, [{M: p1}, {M: p2}], [1.0, 3.0], "zero_pad")
    assert not torch.allclose(product(padded), b @ a)


def test_stacking_is_exact_for_many_random_clients_of_different_ranks():
    g = torch.Generator().manual_seed(1)
    parts = [(torch.arange(r), torch.randn(r, 7, generator=g, dtype=torch.float64),
              torch.randn(5, r, generator=g, dtype=torch.float64)) for r in (1, 2, 4, 3)]
    weights = [5.0, 1.0, 2.0, 8.0]
    b, a = stack_factors(parts, weights)
    want = sum(w * (p[2] @ p[1]) for p, w in zip(parts, weights)) / sum(weights)
    torch.testing.assert_close(b @ a, want, rtol=0, atol=1e-13)


def test_svd_factors_by_hand():
    # p = 1/2 each: dW = diag(1.5, 0.5); rank 1 keeps [[1.5, 0], [0, 0]]; rank 2 is dW itself
    b, a = stack_factors([part([[1, 0]], [[3], [0]]), part([[0, 1]], [[0], [1]])], [1.0, 1.0])
    b1, a1, s = svd_factors(b, a, 1, "us")
    assert torch.allclose(s, torch.tensor([1.5, 0.5], dtype=torch.float64))
    assert torch.allclose(b1, torch.tensor([[1.5], [0.0]], dtype=torch.float64))   # B = U S
    assert torch.allclose(a1, torch.tensor([[1.0, 0.0]], dtype=torch.float64))     # A = V^T
    b2, a2, _ = svd_factors(b, a, 2, "sqrt")
    assert torch.allclose(b2 @ a2, torch.diag(torch.tensor([1.5, 0.5], dtype=torch.float64)))
    assert discarded_fraction(s, 1) == pytest.approx(0.5 / (1.5 ** 2 + 0.5 ** 2) ** 0.5)


@pytest.mark.parametrize("split", ["us", "sqrt"])
def test_svd_factors_are_the_best_rank_r_approximation(split):
    g = torch.Generator().manual_seed(2)
    b = torch.randn(9, 6, generator=g, dtype=torch.float64)
    a = torch.randn(6, 11, generator=g, dtype=torch.float64)
    dw = b @ a
    u, s, vh = torch.linalg.svd(dw)
    for r in (1, 3, 5):
        br, ar, s_got = svd_factors(b, a, r, split)
        torch.testing.assert_close(s_got, s[:6], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(br @ ar, u[:, :r] @ torch.diag(s[:r]) @ vh[:r], rtol=1e-10, atol=1e-10)
        gram_b, gram_a = br.T @ br, ar @ ar.T        # the split: where S goes
        want_b, want_a = (s[:r] ** 2, torch.ones(r)) if split == "us" else (s[:r], s[:r])
        torch.testing.assert_close(gram_b, torch.diag(want_b).double(), rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(gram_a, torch.diag(want_a).double(), rtol=1e-9, atol=1e-9)
    # rank >= rank(dW) = 6: dW exactly, the components past it zero
    br, ar, _ = svd_factors(b, a, 8, split)
    torch.testing.assert_close(br @ ar, dw, rtol=1e-12, atol=1e-12)
    assert not br[:, 6:].any() and not ar[6:].any()


# ---- FlexLoRA ------------------------------------------------------------------------------------------------

def test_flexlora_averages_products_and_sends_each_client_its_truncated_svd():
    g = torch.Generator().manual_seed(3)
    s = FlexLoRA(initial(4), {0: 2, 1: 4}, seed=5)
    sent0, sent1 = s.configure(1, 0, "a0"), s.configure(1, 1, "a0")
    assert sent0.config == {"hafl_train_only": {M: [0, 1]}} and sent1.config == {"hafl_train_only": {M: [0, 1, 2, 3]}}
    assert torch.equal(sent0.state[A][:2], s.initial[A][:2]) and not sent0.state[A][2:].any()
    a0, b0 = torch.randn(2, 3, generator=g), torch.randn(3, 2, generator=g)
    a1, b1 = torch.randn(4, 3, generator=g), torch.randn(3, 4, generator=g)
    b1[:, 3] = 0                     # client 1's product has rank 3: dW has rank <= 3 < R = 4
    s.aggregate(1, [upload(0, sent0, a0, b0, 1, head=1.0), upload(1, sent1, a1, b1, 3, head=5.0)])
    dw = 0.25 * b0.double() @ a0.double() + 0.75 * b1.double() @ a1.double()
    full = s.configure(2, 1, "a0").state
    torch.testing.assert_close(product(full), dw, rtol=1e-6, atol=1e-6)      # rank-4 client: dW itself
    u, sv, vh = torch.linalg.svd(dw)
    best2 = u[:, :2] @ torch.diag(sv[:2]) @ vh[:2]
    torch.testing.assert_close(product(s.configure(2, 0, "a0").state), best2, rtol=1e-6, atol=1e-6)
    assert torch.equal(full[HEAD], torch.full((2,), 4.0))                     # head: FedAvg 1/4 x 1 + 3/4 x 5
    # the component past rank(dW) = 3 gets fresh A, zero B: it can train, and dW is unchanged
    assert full[A][3].abs().sum() > 0 and not full[B][:, 3].any()
    assert s.round_metrics() == {"svd_discarded": 0.0}


# ---- FLoRA ---------------------------------------------------------------------------------------------------

def test_flora_clients_train_fresh_components_on_the_frozen_residual():
    s = FLoRA(initial(5), {0: 1, 1: 2}, seed=5)          # R = 5, max r_k = 2: residual components 0..2
    assert s.residual_rank == 3
    sent0, sent1 = s.configure(1, 0, "a0"), s.configure(1, 1, "a0")
    assert sent0.config == {"hafl_train_only": {M: [3]}} and sent1.config == {"hafl_train_only": {M: [3, 4]}}
    for sent in (sent0, sent1):
        assert not sent.state[B].any() and sent.state[A][3].abs().sum() > 0   # fresh A, zero B
        bound = 1 / 3 ** 0.5                                                   # peft: U(-1/sqrt(d_in), +)
        assert sent.state[A][3:].abs().max() <= bound
    assert not torch.equal(sent0.state[A][3], sent1.state[A][3])               # each client its own draw
    assert torch.equal(s.configure(1, 0, "a0").state[A], sent0.state[A])      # seeded: the same again
    g = torch.Generator().manual_seed(4)
    a0, b0 = torch.randn(1, 3, generator=g), torch.randn(3, 1, generator=g)
    a1, b1 = torch.randn(2, 3, generator=g), torch.randn(3, 2, generator=g)
    s.aggregate(1, [upload(0, sent0, a0, b0, 2), upload(1, sent1, a1, b1, 2)])
    round1 = 0.5 * b0.double() @ a0.double() + 0.5 * b1.double() @ a1.double()  # rank 3 = R_res: exact
    torch.testing.assert_close(product(s.slots_[0]), round1, rtol=1e-6, atol=1e-6)
    assert not s.slots_[0][A][3:].any() and not s.slots_[0][B][:, 3:].any()
    # round 2: the residual is sent frozen; the new aggregate is added to it (stacked, weight 1)
    sent = s.configure(2, 1, "a0")
    torch.testing.assert_close(sent.state[B][:, :3], s.slots_[0][B][:, :3], rtol=0, atol=0)
    a2, b2 = torch.randn(2, 3, generator=g), torch.randn(3, 2, generator=g)
    s.aggregate(2, [upload(1, sent, a2, b2, 4)])
    # residual + B2 A2 lives in 3 x 3: rank <= 3 still fits R_res exactly
    torch.testing.assert_close(product(s.slots_[0]), round1 + b2.double() @ a2.double(), rtol=1e-5, atol=1e-5)


def test_flora_reports_what_truncating_the_residual_drops():
    s = FLoRA(initial(2, d=4), {0: 1, 1: 1}, seed=0)        # R_res = 1, two rank-1 clients: rank 2
    sent0, sent1 = s.configure(1, 0, "a0"), s.configure(1, 1, "a0")
    s.aggregate(1, [upload(0, sent0, [[1, 0, 0, 0]], [[2], [0], [0], [0]], 1),
                    upload(1, sent1, [[0, 1, 0, 0]], [[0], [1], [0], [0]], 1)])
    # dW = diag(1, 0.5, 0, 0): kept [[1]], dropped 0.5 of norm sqrt(1.25)
    assert s.round_metrics()["svd_discarded"] == pytest.approx(0.5 / 1.25 ** 0.5)
    torch.testing.assert_close(product(s.slots_[0]), torch.diag(torch.tensor([1.0, 0, 0, 0])).double())


# ---- config --------------------------------------------------------------------------------------------------

def test_config_checks_of_the_product_methods():
    with pytest.raises(ConfigError, match=r"'hafl.client_ranks' has client rank\(s\) \[4\] larger .* R = 4 \(lora.rank\) less 1"):
        load_config(None, {"method": "flora", "lora.rank": 4, "partition.n_clients": 2, "hafl.client_ranks": [2, 4]})
    with pytest.raises(ConfigError, match="'hafl.aggregation' must be null with method flexlora"):
        load_config(None, {"method": "flexlora", "hafl.aggregation": "adaptive"})
    with pytest.raises(ConfigError, match="'hafl.mode' must be freeze or null with method flora"):
        load_config(None, {"method": "flora", "hafl.mode": "truncate"})
    with pytest.raises(ConfigError, match="'hafl.weighting' must be samples with method flexlora"):
        load_config(None, {"method": "flexlora", "hafl.weighting": "samples_x_score"})
    with pytest.raises(ConfigError, match="hafl.svd_split"):
        load_config(None, {"method": "flexlora", "hafl.svd_split": "u"})
    flora = load_config(None, {"method": "flora"})
    assert flora.rank == 16 and flora.hafl.resolved("flora") == ("freeze", "stack")
    assert load_config(None, {"method": "flexlora"}).hafl.resolved("flexlora") == ("truncate", "svd")


# ---- tiny runs -----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def topic_task():
    return [_task("topic", {"cooking": COOKING, "sport": SPORT, "weather": WEATHER}, 12)]


def tiny(tiny_bert, out, method: str, **extra):
    return make_cfg(tiny_bert, out, method=method, **{
        "partition.n_clients": 3, "lora.rank": 5, "hafl.client_ranks": [1, 2, 4], "train.rounds": 2,
        "partition.kind": "label_skew", **extra})


@pytest.mark.parametrize("method", ["flexlora", "flora"])
def test_tiny_run_ends_with_finite_adapters_and_counts_the_components_sent(tiny_bert, topic_task, tmp_path, method):
    summary = run(tiny(tiny_bert, tmp_path / "run", method), tasks=topic_task, quiet=True)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    rounds = [m for m in records if m["phase"] == "round"]
    n_mod, head, ranks = 4, (3 * 32 + 3) * 4, [1, 2, 4]            # query and value in 2 layers; 3 classes
    clients = sorted({m["client"] for m in records if m["phase"] == "local"})
    want = sum(n_mod * ranks[k] * (32 + 32) * 4 + head + n_mod * ranks[k] * 4 for k in clients)  # LoRA, head, idx
    assert all(m["uplink_bytes"] == want and m["dropped"] == 0 for m in rounds)
    assert all(0.0 <= m["svd_discarded"] < 1.0 for m in rounds)
    final = load_file(tmp_path / "run" / "adapters" / "round_2.safetensors")
    assert all(torch.isfinite(v).all() for v in final.values())
    lora_b = [v for k, v in final.items() if k.endswith("lora_B.weight")]
    assert any(v.abs().sum() > 0 for v in lora_b)                          # the global update moved
    assert summary["mean_accuracy"] is not None


def test_a_flora_run_resumes_bit_for_bit(tiny_bert, topic_task, tmp_path, monkeypatch):
    """FLoRA's fresh components are drawn from (seed, round, client, module) and its residual is the slot: a run
    killed before round 2's records resumes to the uninterrupted run's adapters, bit for bit."""
    from fltac.engines.inprocess import InProcessEngine

    whole = run(tiny(tiny_bert, tmp_path / "whole", "flora"), tasks=topic_task, quiet=True)
    original = InProcessEngine.evaluate

    def crash(self, exp, r, *args, **kwargs):
        if r == 2:
            raise RuntimeError("simulated kill before round 2's records")
        return original(self, exp, r, *args, **kwargs)

    cfg = tiny(tiny_bert, tmp_path / "cut", "flora")
    monkeypatch.setattr(InProcessEngine, "evaluate", crash)
    with pytest.raises(RuntimeError, match="simulated kill"):
        run(cfg, tasks=topic_task, quiet=True)
    monkeypatch.undo()
    resumed = run(cfg, tasks=topic_task, resume=True, quiet=True)
    a, b = (load_file(tmp_path / d / "adapters" / "round_2.safetensors") for d in ("whole", "cut"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["per_task_accuracy"] == whole["per_task_accuracy"]
