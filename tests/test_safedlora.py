"""SA-FedLoRA and FedAvg of full fine-tuning: the budget schedule, the shared mask, what trains and what travels,
the proximal term, the byte accounting, and one tiny run of each new method.

The backbone is the tiny random BERT of ``conftest.tiny_bert``; the tasks are hand-made, so a run takes seconds.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fltac.client.hooks import make_hooks
from fltac.client.proximal import Proximal
from fltac.client.svd_importance import triplet_scores
from fltac.config import ConfigError, load_config
from fltac.data.tasks import Task
from fltac.engines.inprocess import run
from fltac.models.staged import INDEX, StagedModel, pack, unpack
from fltac.server.safedlora import average_scores, budget, select_mask
from fltac.wire import SVD_SCORE

RANK = 4


# ---- budget schedule -----------------------------------------------------------------------------------

def test_budget_at_its_boundaries():
    b0, bT, total, warm, cool = 120, 40, 10, 2, 3
    values = [budget(t, total, b0, bT, warm, cool) for t in range(1, total + 1)]
    assert values[:warm] == [b0, b0]                      # t <= warm: b_0
    assert values[-cool:] == [bT] * cool                  # last cool rounds: b_T
    # first cubic round: progress 1 / (total - warm - cool) = 1/5 -> bT + (b0 - bT) * 0.8^3
    assert values[warm] == int(40 + 80 * 0.8 ** 3) == 80
    assert values[total - cool - 1] == bT                 # t = total - cool: progress 1, already b_T
    assert values == sorted(values, reverse=True)
    # no cubic rounds at all when warm + cool fill the stage
    assert [budget(t, 3, 9, 3, 1, 2) for t in (1, 2, 3)] == [9, 3, 3]
    with pytest.raises(ValueError):
        budget(0, total, b0, bT, warm, cool)
    with pytest.raises(ValueError):
        budget(1, 3, b0, bT, 2, 2)


# ---- the shared mask ----------------------------------------------------------------------------------

def test_mask_keeps_exactly_b_of_the_active_triplets():
    gen = torch.Generator().manual_seed(0)
    active = {m: torch.rand(6, generator=gen) > 0.3 for m in ("a", "b", "c")}
    scores = {m: torch.rand(6, generator=gen) for m in active}
    n_active = sum(int(v.sum()) for v in active.values())
    for b in range(n_active + 3):
        mask = select_mask(scores, active, b)
        kept = sum(int(v.sum()) for v in mask.values())
        assert kept == min(b, n_active)
        assert all(not (mask[m] & ~active[m]).any() for m in active)  # never revives a masked triplet
        if 0 < b <= n_active:  # the kept ones are the top-b active scores
            kept_scores = torch.cat([scores[m][mask[m]] for m in sorted(mask)])
            dropped = torch.cat([scores[m][active[m] & ~mask[m]] for m in sorted(mask)])
            assert dropped.numel() == 0 or kept_scores.min() >= dropped.max()


def test_average_scores_by_sample_count():
    mask = {"m": torch.tensor([True, False, True])}
    ups = [{f"m.{SVD_SCORE}": torch.tensor([1.0, 3.0])}, {f"m.{SVD_SCORE}": torch.tensor([4.0, 0.0])}]
    avg = average_scores(ups, [1, 2], mask)["m"]
    assert torch.allclose(avg, torch.tensor([(1 + 8) / 3, 0.0, 3 / 3], dtype=torch.float64))


def test_triplet_score_formula():
    s_a, s_e, s_b = torch.ones(3, 5), torch.tensor([[1.0], [2.0], [3.0]]), torch.full((4, 3), 2.0)
    assert torch.allclose(triplet_scores(s_a, s_e, s_b), torch.tensor([4.0, 5.0, 6.0]))


def test_pack_sends_only_active_rows_and_unpack_restores_them():
    gen = torch.Generator().manual_seed(1)
    state = {"m.lora_A": torch.randn(4, 6, generator=gen), "m.lora_E": torch.randn(4, 1, generator=gen),
             "m.lora_B": torch.randn(5, 4, generator=gen), "classifier.weight": torch.randn(2, 6, generator=gen)}
    mask = {"m": torch.tensor([True, False, True, False])}
    wire = pack(state, mask)
    assert wire["m.lora_A"].shape == (2, 6) and wire["m.lora_E"].shape == (2, 1) and wire["m.lora_B"].shape == (5, 2)
    assert wire[f"m.{INDEX}"].tolist() == [0, 2]
    full, got = unpack(wire, 4)
    assert torch.equal(got["m"], mask["m"])
    assert torch.equal(full["m.lora_A"][[0, 2]], state["m.lora_A"][[0, 2]])
    assert not full["m.lora_A"][[1, 3]].any() and not full["m.lora_E"][[1, 3]].any()
    assert torch.equal(full["classifier.weight"], state["classifier.weight"])


# ---- the client side: masked triplets neither trained nor sent; the proximal term -------------------------

@pytest.fixture(scope="module")
def staged(tiny_bert):
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=3)
    return StagedModel(base, torch.device("cpu"), RANK, alpha=8.0, dropout=0.0)


def _random_batch(gen: torch.Generator):
    ids = torch.randint(100, 1000, (6, 9), generator=gen)
    return ids, torch.ones_like(ids), torch.randint(0, 3, (6,), generator=gen)


def test_masked_triplets_are_neither_trained_nor_sent(staged):
    everything = staged.everything()
    adapter = {k: v for k, v in everything.items() if k in staged.adapter_keys + staged.head_keys}
    gen = torch.Generator().manual_seed(2)
    for k in staged.adapter_keys:  # a non-zero lambda everywhere, so every triplet would get a gradient
        adapter[k] = torch.randn(adapter[k].shape, generator=gen)
    mask = {m: torch.tensor([i % 2 == 0 for i in range(RANK)]) for m in staged.matrices}
    mask[staged.matrices[0]] = torch.tensor([True, True, True, False])
    wire = pack(adapter, mask)
    staged.load(wire)
    assert staged.mode == "adapter" and set(staged.params) == set(staged.adapter_keys + staged.head_keys)
    before = {k: p.detach().clone() for k, p in staged.params.items()}
    hooks = make_hooks({"svd_anneal": {"orth_reg": 0.5}}, wire)
    opt = torch.optim.AdamW(staged.param_groups(), lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        ids, att, y = _random_batch(gen)
        loss = torch.nn.functional.cross_entropy(staged.logits(input_ids=ids, attention_mask=att), y)
        (loss + sum(h.extra_loss(staged.params) for h in hooks)).backward()
        for h in hooks:
            h.after_backward(staged.params)
        for m, keep in mask.items():  # the gradient of masked triplets is zero, orthogonality term included
            assert not staged.params[f"{m}.lora_A"].grad[~keep].any()
            assert not staged.params[f"{m}.lora_E"].grad[~keep].any()
            assert not staged.params[f"{m}.lora_B"].grad[:, ~keep].any()
        opt.step()
        opt.zero_grad(set_to_none=True)
    for m, keep in mask.items():
        a, a0 = staged.params[f"{m}.lora_A"].detach(), before[f"{m}.lora_A"]
        assert torch.equal(a[~keep], a0[~keep]) and not a[~keep].any()  # masked: zero and unchanged
        assert not torch.equal(a[keep], a0[keep])                         # active: trained
    sent = staged.state()
    for m, keep in mask.items():
        n = int(keep.sum())
        assert sent[f"{m}.lora_A"].shape[0] == n and sent[f"{m}.lora_B"].shape[1] == n
        assert sent[f"{m}.{INDEX}"].tolist() == torch.nonzero(keep).reshape(-1).tolist()
    (hook,) = hooks
    extras = hook.extras()
    assert {k: v.shape[0] for k, v in extras.items()} == {f"{m}.{SVD_SCORE}": int(k.sum()) for m, k in mask.items()}
    assert all(bool((v > 0).all()) for v in extras.values())


def test_proximal_gradient_is_mu_times_drift(staged):
    staged.load({k: v for k, v in staged.everything().items() if k in staged.base_keys + staged.head_keys})
    assert staged.mode == "full" and set(staged.params) == set(staged.base_keys + staged.head_keys)
    start = staged.state()
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in staged.params.values():
            p.add_(0.01 * torch.randn(p.shape, generator=gen))
    mu = 0.3
    hook = Proximal(mu, start)
    for p in staged.params.values():
        p.grad = None
    hook.extra_loss(staged.params).backward()
    for k, p in staged.params.items():
        assert torch.allclose(p.grad, mu * (p.detach() - start[k]), atol=1e-7), k


def test_full_mode_trains_backbone_at_its_own_lr(staged):
    staged.load({k: v for k, v in staged.everything().items() if k in staged.base_keys + staged.head_keys})
    groups = staged.param_groups()
    assert [g.get("lr") for g in groups] == [None, staged.backbone_lr]
    assert sum(len(g["params"]) for g in groups) == len(staged.base_keys) + len(staged.head_keys)


# ---- config -------------------------------------------------------------------------------------------

def test_config_checks():
    with pytest.raises(ConfigError, match="lora.rank"):
        load_config(None, {"method": "safedlora", "lora.rank": 8})
    with pytest.raises(ConfigError, match="cool_rounds"):
        load_config(None, {"method": "safedlora", "train.rounds": 4, "safedlora.init_rounds": 2,
                           "safedlora.warm_rounds": 1, "safedlora.cool_rounds": 2})
    with pytest.raises(ConfigError, match="target_rank"):
        load_config(None, {"method": "safedlora", "safedlora.rank_init": 4, "safedlora.target_rank": 5})
    with pytest.raises(ConfigError, match="dtype"):
        load_config(None, {"method": "fedavg_full", "dtype": "bfloat16"})
    assert load_config(None, {"method": "safedlora"}).rank == 12


# ---- tiny end-to-end runs -----------------------------------------------------------------------------

def _tasks() -> list[Task]:
    def task(name: str, words: list[str]) -> Task:
        xs = [f"{words[i % len(words)]} and some words {i}" for i in range(44)]
        ys = np.array([i % len(words) for i in range(44)], dtype=np.int64)
        return Task(name, words, xs[:36], ys[:36], xs[36:], ys[36:])
    return [task("mood", ["happy", "sad"]), task("topic", ["sport", "food", "rain"])]


def _run(tiny_bert, out, method: str, **extra) -> tuple[dict, list[dict]]:
    overrides = {"model_name": tiny_bert, "output_dir": str(out), "method": method, "dtype": "float32",
                 "partition.n_clients": 3, "partition.min_frac": 0.0, "train.rounds": 3, "train.local_steps": 2,
                 "train.batch_size": 4, "eval.eval_size": 8, "data.max_length": 24, "seed": 5, "num_threads": 1,
                 "safedlora.rank_init": RANK, "safedlora.target_rank": 1, **extra}
    summary = run(load_config(None, overrides), tasks=_tasks(), quiet=True)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return summary, [r for r in records if r["phase"] == "round"]


def test_fedavg_full_run_sends_the_whole_model(tiny_bert, tmp_path, staged):
    summary, rounds = _run(tiny_bert, tmp_path / "full", "fedavg_full", **{"train.rounds": 2})
    assert summary["method"] == "fedavg_full" and len(rounds) == 2
    assert 0.0 <= summary["mean_accuracy"] <= 1.0
    from transformers import AutoModelForSequenceClassification

    plain = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=5)  # 2 + 3 label units
    per_client = 4 * sum(p.numel() for p in plain.parameters())  # every parameter, fp32
    for r in rounds:
        assert r["uplink_bytes"] == r["accepted"] * per_client == r["downlink_bytes"]


def test_safedlora_run_budget_and_bytes(tiny_bert, tmp_path, staged):
    summary, rounds = _run(tiny_bert, tmp_path / "sa", "safedlora", **{"train.rounds": 4})
    n_matrices = len(staged.matrices)  # 2 layers x (query, value)
    b0, bT = RANK * n_matrices, 1 * n_matrices
    assert [r["stage"] for r in rounds] == ["initiating", "annealing", "annealing", "annealing"]
    expected = [budget(t, 3, b0, bT, 1, 1) for t in (1, 2, 3)]
    assert [r["budget"] for r in rounds[1:]] == expected
    assert [sum(r["active_rank"].values()) for r in rounds[1:]] == expected
    d = 32  # hidden size of the tiny BERT: every adapted matrix is 32 x 32
    head = 4 * (5 * d + 5)
    for r in rounds[1:]:
        triplets = sum(r["active_rank"].values())
        # per client: active rows of Q, lambda, P (fp32), their int64 indices, one fp32 score each, the head
        per_client = triplets * (d + d + 1) * 4 + triplets * 8 + triplets * 4 + head
        assert r["uplink_bytes"] == r["accepted"] * per_client
        # down (after the backbone's delivery): the same active rows and indices, no scores
        if r is not rounds[1]:
            assert r["downlink_bytes"] == r["clients"] * (triplets * (d + d + 1) * 4 + triplets * 8 + head)
    # the frozen backbone reaches each client once, in the first annealing round
    assert rounds[1]["downlink_bytes"] > rounds[0]["downlink_bytes"] > rounds[2]["downlink_bytes"]
    assert summary["uplink_bytes"] < 2 * rounds[0]["uplink_bytes"]  # round 1 (full model) dominates
    assert 0.0 <= summary["mean_accuracy"] <= 1.0


def test_safedlora_lora_initiating_stage(tiny_bert, tmp_path, staged):
    _, rounds = _run(tiny_bert, tmp_path / "sa_lora", "safedlora", **{"safedlora.init_train": "lora",
                                                                       "train.local_steps": 1})
    n_matrices = len(staged.matrices)
    assert rounds[0]["stage"] == "initiating" and rounds[0]["budget"] == RANK * n_matrices
    assert rounds[-1]["budget"] == n_matrices
    assert max(r["uplink_bytes"] for r in rounds) < 100_000  # adapters only, never the backbone


def test_safedlora_resume_matches_uninterrupted_run(tiny_bert, tmp_path):
    overrides = {"model_name": tiny_bert, "method": "safedlora", "dtype": "float32", "partition.n_clients": 2,
                 "partition.min_frac": 0.0, "train.local_steps": 2, "train.batch_size": 4, "eval.eval_size": 8,
                 "num_threads": 1,
                 "data.max_length": 24, "safedlora.rank_init": RANK, "safedlora.target_rank": 1}
    whole = run(load_config(None, {**overrides, "train.rounds": 3, "output_dir": str(tmp_path / "a")}),
                tasks=_tasks(), quiet=True)
    # the same run stopped right after round 2's checkpoint, then resumed
    first = {**overrides, "output_dir": str(tmp_path / "b")}
    from fltac.engines.inprocess import InProcessEngine

    class Stop(Exception):
        pass

    engine = InProcessEngine(load_config(None, {**first, "train.rounds": 3}), tasks=_tasks(), quiet=True)
    original = engine._save_checkpoint

    def save_then_stop(exp, r, counters):
        original(exp, r, counters)
        if r == 2:  # after the first annealing round: the resumed process must get the frozen backbone again
            raise Stop

    engine._save_checkpoint = save_then_stop
    with pytest.raises(Stop):
        engine.run()
    resumed = run(load_config(None, {**first, "train.rounds": 3}), resume=True, tasks=_tasks(), quiet=True)
    assert resumed["per_task_accuracy"] == whole["per_task_accuracy"]
    assert resumed["uplink_bytes"] == whole["uplink_bytes"]
