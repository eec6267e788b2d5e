"""HAFL / HetLoRA: importance EMA, component selection and write-back, freezing, rank-1 aggregation against
hand-worked formulas, config checks, the label-skew split, the hub loader on local files, and tiny runs.

The end-to-end runs use conftest's tiny random BERT (2 layers, 32 wide) and test_end_to_end's sentences.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fltac.client.importance import IDX, SCORE, ImportanceEMA, TrainOnly, component_scores
from fltac.config import ConfigError, load_config
from fltac.data.partition import partition_label_skew
from fltac.engines.inprocess import run
from fltac.server.hafl import (HAFL, aggregate_components, global_scores, place, top_components, truncate,
                               unpack)
from fltac.server.strategies import Submission
from test_end_to_end import COOKING, SPORT, WEATHER, _task, make_cfg

HUB_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "hafl_20news_hub.yaml"
M = "layer.q"
A, B = M + ".lora_A.weight", M + ".lora_B.weight"


def lora_state(rank: int = 3, d_in: int = 2, d_out: int = 2, fill: float = 0.0) -> dict[str, torch.Tensor]:
    return {A: torch.full((rank, d_in), fill), B: torch.full((d_out, rank), fill), "classifier.weight": torch.ones(2)}


# ---- client: importance EMA -----------------------------------------------------------------------------

def test_importance_is_an_ema_of_abs_weight_times_grad():
    a = torch.nn.Parameter(torch.tensor([[1.0, -2.0], [0.5, 0.0], [3.0, 1.0]]))   # [r=3, d_in=2]
    b = torch.nn.Parameter(torch.tensor([[2.0, 1.0, -1.0], [0.0, 4.0, 1.0]]))     # [d_out=2, r=3]
    params = {A: a, B: b}
    hook = ImportanceEMA(beta=0.85)
    grads = [(torch.tensor([[1.0, 1.0], [2.0, 0.0], [-1.0, 1.0]]), torch.tensor([[1.0, 0.0, 2.0], [1.0, 1.0, 1.0]])),
             (torch.tensor([[0.0, 2.0], [1.0, 1.0], [1.0, 0.0]]), torch.tensor([[-1.0, 1.0, 0.0], [2.0, 0.0, 1.0]]))]
    ibar_a, ibar_b = torch.zeros(3, 2), torch.zeros(2, 3)
    for ga, gb in grads:
        a.grad, b.grad = ga, gb
        hook.after_backward(params)
        ibar_a = 0.85 * ibar_a + 0.15 * (a.detach() * ga).abs()
        ibar_b = 0.85 * ibar_b + 0.15 * (b.detach() * gb).abs()
    assert torch.allclose(hook.ibar_[A], ibar_a) and torch.allclose(hook.ibar_[B], ibar_b)
    # S_i = sum_j s(B_ji) + sum_j s(A_ij): column i of B with row i of A
    want = ibar_b.sum(0) + ibar_a.sum(1)
    assert torch.allclose(hook.scores()[M], want)
    assert torch.allclose(component_scores({A: ibar_a, B: ibar_b}, "mean")[M], ibar_b.mean(0) + ibar_a.mean(1))
    assert torch.allclose(hook.extras()[M + SCORE], want)
    # a truncated client uploads only its components' scores
    hook.send = {M: [0, 2]}
    assert torch.allclose(hook.extras()[M + SCORE], want[[0, 2]])


def test_importance_uncertainty_option_multiplies_by_the_ema_of_the_deviation():
    p = torch.nn.Parameter(torch.tensor([[2.0]]))
    q = torch.nn.Parameter(torch.tensor([[1.0]]))
    hook = ImportanceEMA(beta=0.5, uncertainty=True)
    ibar = ubar = 0.0
    for g in (1.0, 3.0):
        p.grad, q.grad = torch.tensor([[g]]), torch.tensor([[0.0]])
        hook.after_backward({A: p, B: q})
        ipt = 2.0 * g
        ibar = 0.5 * ibar + 0.5 * ipt
        ubar = 0.5 * ubar + 0.5 * abs(ipt - ibar)
    assert hook.scores()[M].item() == pytest.approx(ibar * ubar)


# ---- selection, truncation and write-back ---------------------------------------------------------------

def test_top_components_breaks_ties_by_index_and_returns_ascending():
    assert top_components(torch.tensor([0.1, 0.9, 0.5, 0.9]), 2) == [1, 3]
    assert top_components(torch.zeros(8), 3) == [0, 1, 2]           # round 1: no scores yet
    assert top_components(torch.tensor([3.0, 1.0, 2.0]), 3) == [0, 1, 2]


def test_truncation_keeps_the_top_indices_and_writes_them_back_in_place():
    start = {A: torch.arange(8.0).reshape(4, 2), B: torch.arange(8.0).reshape(2, 4) + 100, "classifier.weight": torch.ones(2)}
    s = HAFL(start, {0: 2, 1: 4}, mode="truncate")
    s.score_ = {M: torch.tensor([0.1, 5.0, 0.2, 3.0])}
    sent = s.configure(1, 0, "a0")
    assert sent.config["hafl_train_only"] == {M: [1, 3]}
    # the client holds exactly a rank-2 adapter: the other components are zero
    assert torch.equal(sent.state[A][[0, 2]], torch.zeros(2, 2)) and torch.equal(sent.state[A][[1, 3]], start[A][[1, 3]])
    assert torch.equal(sent.state[B][:, [0, 2]], torch.zeros(2, 2)) and torch.equal(sent.state[B][:, [1, 3]], start[B][:, [1, 3]])
    # the client uploads only those rows/columns with their indices ...
    hook = TrainOnly(sent.config["hafl_train_only"], sent.state)
    trained = {A: sent.state[A] + 1.0, B: sent.state[B] - 1.0, "classifier.weight": torch.ones(2)}
    up = hook.outgoing(trained)
    assert up[A].shape == (2, 2) and up[B].shape == (2, 2)
    assert hook.extras()[M + IDX].tolist() == [1, 3]
    assert s.expected_spec(0, "a0", sent)[A][0] == (2, 2)
    # ... and the server writes them back at indices 1 and 3, leaving 0 and 2 as they were
    back = place(start, unpack(up, hook.extras(), [M]))
    assert torch.equal(back[A][[1, 3]], start[A][[1, 3]] + 1.0) and torch.equal(back[A][[0, 2]], start[A][[0, 2]])
    assert torch.equal(back[B][:, [1, 3]], start[B][:, [1, 3]] - 1.0) and torch.equal(back[B][:, [0, 2]], start[B][:, [0, 2]])
    assert torch.equal(truncate(start, {M: [0, 1, 2, 3]})[A], start[A])


def test_hetlora_always_sends_the_first_components():
    s = HAFL(lora_state(rank=4), {0: 2}, selection="first")
    s.score_ = {M: torch.tensor([0.0, 0.0, 9.0, 9.0])}
    assert s.configure(1, 0, "a0").config == {"hafl_train_only": {M: [0, 1]}}


def test_freeze_selects_by_the_clients_own_last_scores():
    s = HAFL(lora_state(rank=4, fill=1.0), {0: 1, 1: 1}, mode="freeze")
    s.score_ = {M: torch.tensor([0.0, 0.0, 1.0, 0.0])}
    s.client_score_ = {0: {M: torch.tensor([0.0, 7.0, 0.0, 0.0])}}
    assert s.configure(2, 0, "a0").config["hafl_train_only"] == {M: [1]}     # its own scores
    assert s.configure(2, 1, "a0").config["hafl_train_only"] == {M: [2]}     # never trained: global score
    assert torch.equal(s.configure(2, 1, "a0").state[A], torch.ones(4, 2))   # freeze sends the full rank R


def test_frozen_components_receive_no_update_even_with_weight_decay():
    torch.manual_seed(0)
    start = {A: torch.randn(4, 3), B: torch.randn(5, 4)}
    params = {k: torch.nn.Parameter(v.clone()) for k, v in start.items()}
    hook = TrainOnly({M: [0, 2]}, start)
    opt = torch.optim.AdamW(params.values(), lr=0.1, weight_decay=0.5)
    x = torch.randn(6, 3)
    for _ in range(5):
        loss = ((x @ params[A].T @ params[B].T) ** 2).mean()
        loss.backward()
        hook.after_backward(params)
        assert torch.count_nonzero(params[A].grad[[1, 3]]) == 0 and torch.count_nonzero(params[B].grad[:, [1, 3]]) == 0
        opt.step()
        hook.after_step(params)
        opt.zero_grad(set_to_none=True)
    assert torch.equal(params[A].data[[1, 3]], start[A][[1, 3]]) and torch.equal(params[B].data[:, [1, 3]], start[B][:, [1, 3]])
    assert not torch.allclose(params[A].data[[0, 2]], start[A][[0, 2]])
    assert not torch.allclose(params[B].data[:, [0, 2]], start[B][:, [0, 2]])


# ---- server: adaptive vs zero-padding aggregation, by hand ----------------------------------------------

def test_adaptive_and_zero_pad_equal_the_formulas_and_differ_where_components_were_skipped():
    current = lora_state(rank=3, fill=9.0)
    # client 1 (n = 1) updated components 0 and 1; client 2 (n = 3) updated component 1; nobody updated 2
    up1 = {M: (torch.tensor([0, 1]), torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([[1.0, 3.0], [2.0, 4.0]]))}
    up2 = {M: (torch.tensor([1]), torch.tensor([[7.0, 8.0]]), torch.tensor([[7.0], [8.0]]))}
    ada = aggregate_components(current, [up1, up2], [1.0, 3.0], "adaptive")
    zp = aggregate_components(current, [up1, up2], [1.0, 3.0], "zero_pad")
    # adaptive: component 0 only client 1 -> its values; component 1: (1 x c1 + 3 x c2) / 4; component 2 kept
    assert torch.allclose(ada[A], torch.tensor([[1.0, 2.0], [(3 + 21) / 4, (4 + 24) / 4], [9.0, 9.0]]))
    assert torch.allclose(ada[B], torch.tensor([[1.0, (3 + 21) / 4, 9.0], [2.0, (4 + 24) / 4, 9.0]]))
    # zero-pad: everything divided by all clients' weight 4, zeros from the clients that skipped
    assert torch.allclose(zp[A], torch.tensor([[1 / 4, 2 / 4], [(3 + 21) / 4, (4 + 24) / 4], [0.0, 0.0]]))
    assert torch.allclose(zp[B], torch.tensor([[1 / 4, (3 + 21) / 4, 0.0], [2 / 4, (4 + 24) / 4, 0.0]]))
    # they agree exactly on the component every client updated and differ on the others
    assert torch.equal(ada[A][1], zp[A][1]) and torch.equal(ada[B][:, 1], zp[B][:, 1])
    for i in (0, 2):
        assert not torch.allclose(ada[A][i], zp[A][i]) and not torch.allclose(ada[B][:, i], zp[B][:, i])
    assert torch.equal(ada["classifier.weight"], current["classifier.weight"])  # only A and B are touched here


def test_adaptive_score_weighting_and_global_scores():
    current = lora_state(rank=2)
    up1 = {M: (torch.tensor([0, 1]), torch.tensor([[1.0, 1.0], [2.0, 2.0]]), torch.ones(2, 2))}
    up2 = {M: (torch.tensor([0]), torch.tensor([[4.0, 4.0]]), torch.full((2, 1), 4.0))}
    # w_ki = n_k S_ki: component 0 weights 1 x 1 and 1 x 3
    out = aggregate_components(current, [up1, up2], [1.0, 1.0], "adaptive",
                               [{M: torch.tensor([1.0, 5.0])}, {M: torch.tensor([3.0])}])
    assert torch.allclose(out[A][0], torch.tensor([(1 + 12) / 4, (1 + 12) / 4]))
    assert torch.allclose(out[A][1], torch.tensor([2.0, 2.0]))
    s = global_scores({M: torch.tensor([0.0, 7.0])}, [up1, up2], [{M: torch.tensor([1.0, 5.0])}, {M: torch.tensor([3.0])}],
                      [1.0, 3.0])
    assert torch.allclose(s[M], torch.tensor([(1 + 9) / 4, 5.0]))
    with pytest.raises(ValueError, match="only defined for adaptive"):
        aggregate_components(current, [up1], [1.0], "zero_pad", [{M: torch.ones(2)}])


def test_strategy_aggregate_round_trip_and_state_dict():
    start = lora_state(rank=2, fill=1.0)
    s = HAFL(start, {0: 1, 1: 2}, mode="freeze")
    subs = []
    for client in (0, 1):
        sent = s.configure(1, client, "a0")
        hook = TrainOnly(sent.config["hafl_train_only"], sent.state)
        trained = {k: v + client + 1 for k, v in sent.state.items()}
        extras = {**hook.extras(), M + SCORE: torch.tensor([1.0, 2.0 + client])}
        subs.append(Submission(client, "a0", hook.outgoing(trained), 10, hook.outgoing(sent.state), extras))
    s.aggregate(1, subs)
    # component 0: both clients (2 and 3) -> 2.5; component 1: client 1 only -> 3; head: FedAvg of 2 and 3
    assert torch.allclose(s.slots_[0][A], torch.tensor([[2.5, 2.5], [3.0, 3.0]]))
    assert torch.allclose(s.slots_[0]["classifier.weight"], torch.full((2,), 2.5))
    assert torch.allclose(s.score_[M], torch.tensor([1.0, 2.5]))
    assert s.configure(2, 0, "a0").config["hafl_train_only"] == {M: [1]}  # client 0's own scores [1, 2]
    tensors, meta = s.state_dict()
    t = HAFL(start, {0: 1, 1: 2}, mode="freeze")
    t.load_state_dict(tensors, json.loads(json.dumps(meta)))
    assert torch.equal(t.slots_[0][A], s.slots_[0][A]) and torch.equal(t.score_[M], s.score_[M])
    assert torch.equal(t.client_score_[1][M], s.client_score_[1][M])


# ---- config ---------------------------------------------------------------------------------------------

def test_a_client_rank_larger_than_R_is_rejected_with_a_clear_message():
    with pytest.raises(ConfigError, match=r"'hafl.client_ranks' has client rank\(s\) \[16\] larger than the server "
                                          r"rank R = 8"):
        load_config(None, {"method": "hafl", "partition.n_clients": 3, "hafl.client_ranks": [2, 16, 4]})
    with pytest.raises(ConfigError, match=r"'hafl.rank_distribution' has client rank\(s\) \[8\] larger .* R = 4"):
        load_config(None, {"method": "hafl", "lora.rank": 4, "hafl.rank_distribution": "cycle:2,4,8"})
    with pytest.raises(ConfigError, match="one rank per client"):
        load_config(None, {"method": "hafl", "partition.n_clients": 3, "hafl.client_ranks": [2, 4]})
    with pytest.raises(ConfigError, match="hafl.mode"):
        load_config(None, {"method": "hetlora", "hafl.mode": "freeze"})
    with pytest.raises(ConfigError, match="hafl.rank_distribution"):
        load_config(None, {"method": "hafl", "hafl.rank_distribution": "uniform:2,x"})
    with pytest.raises(ConfigError, match="reliability.aggregation"):
        load_config(None, {"method": "hafl", "reliability.aggregation": "median"})
    cfg = load_config(None, {"method": "hetlora"})
    assert cfg.rank == 8 and cfg.hafl.resolved("hetlora") == ("truncate", "zero_pad")
    assert load_config(None, {"method": "hafl", "hafl.mode": "freeze"}).hafl.resolved("hafl") == ("freeze", "adaptive")
    ranks = load_config(None, {"method": "hafl"}).hafl.ranks(10, 42)
    assert ranks == load_config(None, {"method": "hafl"}).hafl.ranks(10, 42) and set(ranks) <= {2, 4, 8}


def test_named_cli_flags_set_the_hafl_keys():
    from fltac.cli import build_parser, config_from_args

    args = build_parser().parse_args(["run", "--method", "hafl", "--hafl_mode", "freeze", "--hafl_aggregation",
                                      "zero_pad", "--partition_kind", "label_skew"])
    cfg = config_from_args(args)
    assert (cfg.hafl.mode, cfg.hafl.aggregation, cfg.partition.kind) == ("freeze", "zero_pad", "label_skew")


# ---- data: label skew and the hub loader ----------------------------------------------------------------

def test_label_skew_gives_every_row_to_one_client_with_skewed_class_mixes():
    labels = np.repeat(np.arange(5), 40)
    parts = partition_label_skew(labels, 4, 0.3, 0.01, seed=7)
    rows = np.concatenate(parts)
    assert len(rows) == len(labels) and len(np.unique(rows)) == len(labels)
    mix = np.array([np.bincount(labels[p], minlength=5) for p in parts])
    assert (mix.sum(0) == 40).all() and mix.std(0).max() > 5           # classes spread unevenly over clients
    assert all(np.array_equal(a, b) for a, b in zip(parts, partition_label_skew(labels, 4, 0.3, 0.01, seed=7)))


def test_hub_switch_reads_the_setfit_schema_from_local_files(tmp_path):
    pytest.importorskip("datasets")
    from fltac.data import load_tasks

    rng = np.random.default_rng(0)
    names = ["alt.atheism", "sci.space", "rec.autos"]
    for split, n in (("train", 30), ("test", 9)):
        y = rng.integers(0, 3, size=n)
        y[:3] = [0, 1, 2]
        with open(tmp_path / f"{split}.jsonl", "w") as f:
            for i, label in enumerate(y):
                f.write(json.dumps({"text": f"post {split} {i} about {names[label]}", "label": int(label),
                                    "label_text": names[label]}) + "\n")
    cfg = load_config(HUB_CONFIG, {})
    spec = cfg.data.custom_tasks[0]
    assert (spec.source, spec.format, spec.label_column) == ("SetFit/20_newsgroups", "hub", "label_text")
    local = load_config(HUB_CONFIG,
                        {"data.custom_tasks": [{**vars(spec), "source": str(tmp_path)}]})
    (task,) = load_tasks(local.data)
    assert task.name == "newsgroups" and task.labels == sorted(names)
    assert len(task.train_texts) == 30 and len(task.test_texts) == 9


# ---- tiny end-to-end runs -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def topic_task():
    return [_task("topic", {"cooking": COOKING, "sport": SPORT, "weather": WEATHER}, 12)]


def lora_bytes_per_client(rank: int, n_modules: int, hidden: int = 32) -> int:
    return n_modules * rank * (hidden + hidden) * 4


@pytest.mark.parametrize("method,extra", [("hafl", {}), ("hafl", {"hafl.mode": "freeze"}), ("hetlora", {}),
                                          ("hafl", {"hafl.mode": "freeze", "hafl.aggregation": "zero_pad"})])
def test_tiny_run_uploads_only_the_selected_components(tiny_bert, topic_task, tmp_path, method, extra):
    ranks = [1, 2, 4]
    cfg = make_cfg(tiny_bert, tmp_path / "run", method=method, **{
        "partition.n_clients": 3, "lora.rank": 4, "hafl.client_ranks": ranks, "train.rounds": 2,
        "partition.kind": "label_skew"}, **extra)
    summary = run(cfg, tasks=topic_task, quiet=True)
    rounds = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    info = [m for m in rounds if m["phase"] == "round"]
    n_mod = 4                                   # query and value in 2 layers
    head = (3 * 32 + 3) * 4                     # classifier weight and bias, 3 outputs
    clients = sorted({m["client"] for m in rounds if m["phase"] == "local"})
    mode = extra.get("hafl.mode", "truncate")
    want = 0
    for k in clients:
        r = ranks[k]
        scores = 0 if method == "hetlora" else n_mod * 4 * (r if mode == "truncate" else 4)
        want += lora_bytes_per_client(r, n_mod) + head + n_mod * r * 4 + scores
    assert all(m["uplink_bytes"] == want for m in info) and all(m["dropped"] == 0 for m in info)
    assert summary["uplink_bytes"] == 2 * want and summary["lora_rank"] == 4
    assert summary["mean_accuracy"] is not None
