"""Server maths and strategies: weighted FedAvg, clustering scores, cross-round matching, FL-TAC's K-means slots."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from fltac.server.aggregate import clustering_scores, kmeans_labels, match_to_previous, spectral_labels, weighted_mean
from fltac.methods import pooled_slots
from fltac.server.strategies import FLTAC, Centralized, FedAvg, Submission

# ---- weighted_mean -----------------------------------------------------------------------------------


def test_weighted_mean_two_states_hand_computed():
    s1 = {"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([[0.0, 4.0]])}
    s2 = {"a": torch.tensor([5.0, -2.0]), "b": torch.tensor([[8.0, 0.0]])}
    out = weighted_mean([s1, s2], [1, 3])
    # a: (1*1 + 3*5)/4 = 4, (1*2 + 3*-2)/4 = -1 ; b: (0 + 24)/4 = 6, (4 + 0)/4 = 1
    assert set(out) == {"a", "b"}
    assert torch.equal(out["a"], torch.tensor([4.0, -1.0]))
    assert torch.equal(out["b"], torch.tensor([[6.0, 1.0]]))
    assert out["a"].dtype == torch.float32 and out["b"].shape == (1, 2)


def test_weighted_mean_three_states_hand_computed():
    states = [{"w": torch.tensor([0.0, 1.0]), "v": torch.tensor([2.0], dtype=torch.float64)},
              {"w": torch.tensor([3.0, 1.0]), "v": torch.tensor([4.0], dtype=torch.float64)},
              {"w": torch.tensor([6.0, 4.0]), "v": torch.tensor([-2.0], dtype=torch.float64)}]
    out = weighted_mean(states, [1.0, 1.0, 2.0])
    # w: (0 + 3 + 12)/4 = 3.75, (1 + 1 + 8)/4 = 2.5 ; v: (2 + 4 - 4)/4 = 0.5
    assert torch.equal(out["w"], torch.tensor([3.75, 2.5]))
    assert torch.equal(out["v"], torch.tensor([0.5], dtype=torch.float64))
    assert out["v"].dtype == torch.float64 and out["w"].dtype == torch.float32


def test_weighted_mean_single_state_and_zero_weight_member():
    s1 = {"a": torch.tensor([1.5, -3.0])}
    s2 = {"a": torch.tensor([100.0, 100.0])}
    assert torch.equal(weighted_mean([s1], [7])["a"], s1["a"])
    # a zero weight drops that state entirely
    assert torch.equal(weighted_mean([s1, s2], [2, 0])["a"], s1["a"])


def test_weighted_mean_is_invariant_to_scaling_the_weights():
    g = torch.Generator().manual_seed(0)
    states = [{"a": torch.randn(3, 4, generator=g), "b": torch.randn(5, generator=g)} for _ in range(4)]
    w = [3.0, 1.0, 7.0, 2.0]
    base = weighted_mean(states, w)
    for c in (0.001, 13.0, 1e6):
        scaled = weighted_mean(states, [c * x for x in w])
        for k in base:
            torch.testing.assert_close(scaled[k], base[k], rtol=1e-6, atol=1e-7)
    # and matches the formula computed here
    for k in base:
        ref = sum(wi * s[k].double() for wi, s in zip(w, states)) / sum(w)
        torch.testing.assert_close(base[k], ref.float(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("weights", [[1.0, -1.0], [0.0, 0.0], [-2.0, -3.0]])
def test_weighted_mean_rejects_invalid_weights(weights):
    s = {"a": torch.ones(2)}
    with pytest.raises(ValueError):
        weighted_mean([s, s], weights)


def test_weighted_mean_rejects_no_states():
    with pytest.raises(ValueError):
        weighted_mean([], [])


def test_weighted_mean_rejects_mismatched_lengths():
    s = {"a": torch.tensor([2.0])}
    with pytest.raises(ValueError):
        weighted_mean([s], [1.0, 1.0])   # today: returns {'a': 1.0}, half of the only state


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_weighted_mean_rejects_non_finite_weight(bad):
    s = {"a": torch.tensor([2.0])}
    with pytest.raises(ValueError):
        weighted_mean([s, s], [1.0, bad])   # today: returns {'a': nan}


# ---- clustering_scores -------------------------------------------------------------------------------

def _ari(true, pred) -> float:
    """Adjusted Rand index from the pair-counting formula (Hubert & Arabie)."""
    n = len(true)
    cont = {}
    for t, p in zip(true, pred):
        cont[(t, p)] = cont.get((t, p), 0) + 1
    a = {t: sum(v for (tt, _), v in cont.items() if tt == t) for t in set(true)}
    b = {p: sum(v for (_, pp), v in cont.items() if pp == p) for p in set(pred)}
    index = sum(math.comb(v, 2) for v in cont.values())
    sa, sb = sum(math.comb(v, 2) for v in a.values()), sum(math.comb(v, 2) for v in b.values())
    expected = sa * sb / math.comb(n, 2)
    return (index - expected) / ((sa + sb) / 2 - expected)


def _nmi(true, pred) -> float:
    """Normalised mutual information, arithmetic-mean normalisation."""
    n = len(true)
    def h(xs):
        return -sum((xs.count(v) / n) * math.log(xs.count(v) / n) for v in set(xs))
    mi = 0.0
    for t in set(true):
        for p in set(pred):
            nij = sum(1 for a, b in zip(true, pred) if a == t and b == p)
            if nij:
                mi += nij / n * math.log(n * nij / (true.count(t) * pred.count(p)))
    return mi / ((h(true) + h(pred)) / 2)


def test_clustering_scores_permuted_ids_are_perfect():
    true = [0, 0, 1, 1, 2, 2]
    pred = [2, 2, 0, 0, 1, 1]
    s = clustering_scores(true, pred)
    assert s["clustering_accuracy"] == 1.0
    assert s["ari"] == pytest.approx(1.0)
    assert s["nmi"] == pytest.approx(1.0)


def test_clustering_scores_one_error_in_six():
    true = [0, 0, 1, 1, 2, 2]
    pred = [2, 2, 0, 0, 1, 0]
    s = clustering_scores(true, pred)
    assert s["clustering_accuracy"] == pytest.approx(5 / 6)
    assert s["ari"] == pytest.approx(_ari(true, pred))
    assert s["nmi"] == pytest.approx(_nmi(true, pred))
    assert s["ari"] < 1.0 and s["nmi"] < 1.0


def test_clustering_scores_more_clusters_than_tasks():
    # task 0 split over clusters 5 and 9: best one-to-one matching keeps 2 of its 3 and all 3 of task 1
    true = [0, 0, 0, 1, 1, 1]
    pred = [5, 5, 9, 7, 7, 7]
    assert clustering_scores(true, pred)["clustering_accuracy"] == pytest.approx(5 / 6)


def test_clustering_scores_everything_in_one_cluster():
    true = [0, 0, 1, 1, 1, 2]
    pred = [4, 4, 4, 4, 4, 4]
    # only one task can be matched to the single cluster: the largest (3 of 6)
    assert clustering_scores(true, pred)["clustering_accuracy"] == pytest.approx(0.5)


# ---- match_to_previous -------------------------------------------------------------------------------

def test_match_to_previous_recovers_a_permutation():
    old = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    new = np.array([[0.1, 10.0], [0.0, 0.2], [9.8, 0.0]])
    assert match_to_previous(new, old).tolist() == [2, 0, 1]


def test_match_to_previous_is_one_to_one_even_when_greedy_is_wrong():
    # new 0 is nearest to old 0, yet the cheapest one-to-one assignment gives old 0 to new 1
    old = np.array([[0.0], [10.0]])
    new = np.array([[0.5], [-1.0]])
    # costs: new0->old0 .25, new0->old1 90.25, new1->old0 1, new1->old1 121
    # assignments: (0->0, 1->1) = 121.25 ; (0->1, 1->0) = 91.25  -> the second
    assert match_to_previous(new, old).tolist() == [1, 0]


def test_match_to_previous_fewer_new_clusters_than_slots():
    old = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    new = np.array([[9.0, 1.0]])
    assert match_to_previous(new, old).tolist() == [1]


# ---- strategies on planted clusters ------------------------------------------------------------------

LORA_KEYS = ["enc.layer.0.attention.self.query.lora_A.weight", "enc.layer.0.attention.self.query.lora_B.weight",
             "enc.layer.0.attention.self.value.lora_A.weight", "enc.layer.0.attention.self.value.lora_B.weight"]
HEAD_KEYS = ["classifier.weight", "classifier.bias"]
SHAPES = {LORA_KEYS[0]: (2, 4), LORA_KEYS[1]: (4, 2), LORA_KEYS[2]: (2, 4), LORA_KEYS[3]: (4, 2),
          "classifier.weight": (3, 4), "classifier.bias": (3,)}
N_GROUPS = 3
PER_GROUP = 4


def make_initial() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {k: 0.01 * torch.randn(*s, generator=g) for k, s in SHAPES.items()}


def make_centres(seed: int = 2) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    # LoRA tensors of the groups sit far apart (offsets -20, 0, +20 plus a random pattern)
    return [{k: 20.0 * (c - 1) + torch.randn(*SHAPES[k], generator=g) for k in LORA_KEYS} for c in range(N_GROUPS)]


def make_subs(centres, initial, round_seed: int, order=None, shift: float = 0.0):
    """PER_GROUP submissions per group (client = group*PER_GROUP + i, key 'a0'), varied sample counts.

    The head carries a decoy structure far stronger than the groups but cutting across them (centre set by
    i % 3): K-means must not see it (feature_keys are the LoRA keys only), yet it is averaged like the rest.
    """
    g = torch.Generator().manual_seed(round_seed)
    subs, group_of = [], []
    groups = list(order) if order is not None else list(range(N_GROUPS))
    for c in groups:
        for i in range(PER_GROUP):
            state = {k: centres[c][k] + shift + 0.05 * torch.randn(*SHAPES[k], generator=g) for k in LORA_KEYS}
            state.update({k: 200.0 * (i % 3 - 1) + torch.randn(*SHAPES[k], generator=g) for k in HEAD_KEYS})
            n = int(10 + 17 * i + 5 * c + round_seed % 7)
            subs.append(Submission(c * PER_GROUP + i, "a0", state, n, initial))
            group_of.append(c)
    return subs, group_of


def expected_mean(members: list[Submission]) -> dict[str, torch.Tensor]:
    """Sample-weighted mean written out in numpy float64."""
    total = float(sum(m.num_examples for m in members))
    return {k: torch.from_numpy(sum(m.num_examples * m.state[k].numpy().astype(np.float64) for m in members)
                                / total) for k in members[0].state}


def assert_state_close(a, b):
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == torch.float32, k
        torch.testing.assert_close(a[k].double(), b[k].double(), rtol=1e-5, atol=1e-5)


def group_slots(assigned: dict, subs, group_of) -> dict[int, int]:
    """Group -> the single slot all of its submissions landed in (asserts there is exactly one)."""
    out = {}
    for c in range(N_GROUPS):
        slots = {assigned[(s.client, s.key)] for s, gc in zip(subs, group_of) if gc == c}
        assert len(slots) == 1, f"group {c} split over slots {slots}"
        out[c] = slots.pop()
    return out


def new_fltac(initial, seed: int = 0, cluster_on: str = "weights") -> FLTAC:
    return FLTAC(initial, N_GROUPS, list(LORA_KEYS), cluster_on, seed, n_init=5)


def _rings(n: int = 100, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two concentric noisy rings (radii 1 and 3) in the plane: the textbook case K-means cuts across."""
    rng = np.random.default_rng(seed)
    angle = rng.uniform(0, 2 * np.pi, size=2 * n)
    radius = np.repeat([1.0, 3.0], n) + rng.normal(0, 0.05, size=2 * n)
    return np.stack([radius * np.cos(angle), radius * np.sin(angle)], axis=1), np.repeat([0, 1], n)


def test_spectral_labels_follow_chained_groups_that_kmeans_cuts_across():
    x, truth = _rings()
    spectral = spectral_labels(x, 2, seed=0, n_init=5)
    assert clustering_scores(list(truth), list(spectral))["clustering_accuracy"] == 1.0
    assert clustering_scores(list(truth), list(kmeans_labels(x, 2, seed=0, n_init=5)))["clustering_accuracy"] < 0.8
    assert np.array_equal(spectral, spectral_labels(x, 2, seed=0, n_init=5))  # seeded: the same labels again


@pytest.mark.parametrize("n, k", [(2, 2), (3, 3), (3, 2), (2, 5), (1, 3)])
def test_spectral_labels_with_too_few_rows_for_a_graph_are_kmeans_labels(n, k):
    x = np.random.default_rng(1).normal(size=(n, 4))
    labels = spectral_labels(x, k, seed=0, n_init=3)
    assert np.array_equal(labels, kmeans_labels(x, k, seed=0, n_init=3))
    assert len(set(labels.tolist())) == min(n, k)


def test_fltac_kmeans_and_cluster_fedavg_on_planted_groups():
    initial, centres = make_initial(), make_centres()
    strat = new_fltac(initial)
    subs, group_of = make_subs(centres, initial, round_seed=11)
    assigned = strat.aggregate(1, subs)

    assert set(assigned) == {(s.client, s.key) for s in subs}
    slot_of = group_slots(assigned, subs, group_of)
    assert sorted(slot_of.values()) == list(range(N_GROUPS))      # different groups, different slots
    for c, slot in slot_of.items():
        members = [s for s, gc in zip(subs, group_of) if gc == c]
        assert_state_close(strat.slots_[slot], expected_mean(members))
    # start_state: the assigned slot; an unknown (client, key) gets the initial adapter
    for s in subs:
        assert_state_close(strat.start_state(s.client, s.key), strat.slots_[assigned[(s.client, s.key)]])
    assert strat.start_state(999, "a0") is initial
    assert strat.start_state(subs[0].client, "a7") is initial


def test_fltac_spectral_clustering_and_cluster_fedavg_on_planted_groups():
    initial, centres = make_initial(), make_centres()
    strat = FLTAC(initial, N_GROUPS, list(LORA_KEYS), "weights", 0, n_init=5, clustering="spectral")
    subs, group_of = make_subs(centres, initial, round_seed=11)
    assigned = strat.aggregate(1, subs)
    slot_of = group_slots(assigned, subs, group_of)
    assert sorted(slot_of.values()) == list(range(N_GROUPS))
    for c, slot in slot_of.items():
        assert_state_close(strat.slots_[slot], expected_mean([s for s, gc in zip(subs, group_of) if gc == c]))


def test_fltac_slots_follow_their_groups_across_rounds():
    initial, centres = make_initial(), make_centres()
    strat = new_fltac(initial)
    subs, group_of = make_subs(centres, initial, round_seed=11)
    slot_of = group_slots(strat.aggregate(1, subs), subs, group_of)

    permuted_raw_ids = 0
    orders = [(2, 0, 1), (1, 2, 0), (2, 1, 0), (0, 2, 1)]
    for r, order in enumerate(orders, start=2):
        # every group drifts a little, submissions arrive in another order, K-means uses another seed
        subs_r, group_r = make_subs(centres, initial, round_seed=100 + r, order=order, shift=0.3 * r)
        raw = kmeans_labels(strat.features(subs_r), N_GROUPS, strat.seed + r, strat.n_init)
        raw_group = {c: int(raw[group_r.index(c)]) for c in range(N_GROUPS)}
        permuted_raw_ids += raw_group != slot_of
        assigned = strat.aggregate(r, subs_r)
        assert group_slots(assigned, subs_r, group_r) == slot_of, f"round {r}: slots swapped between groups"
        for c, slot in slot_of.items():
            members = [s for s, gc in zip(subs_r, group_r) if gc == c]
            assert_state_close(strat.slots_[slot], expected_mean(members))
    # the matching was actually exercised: in some round K-means' own ids differed from the slot ids
    assert permuted_raw_ids > 0


def test_fltac_slot_without_submissions_keeps_its_adapter():
    initial, centres = make_initial(), make_centres()
    strat = new_fltac(initial)
    subs, group_of = make_subs(centres, initial, round_seed=11)
    slot_of = group_slots(strat.aggregate(1, subs), subs, group_of)
    before = {k: v.clone() for k, v in strat.slots_[slot_of[1]].items()}

    # round 2: one submission from group 0 and one from group 2 only (K is capped at 2 submissions)
    subs2, group2 = make_subs(centres, initial, round_seed=21, shift=0.1)
    pick = [group2.index(0), group2.index(2)]
    chosen = [subs2[i] for i in pick]
    assigned = strat.aggregate(2, chosen)
    assert assigned[(chosen[0].client, "a0")] == slot_of[0]
    assert assigned[(chosen[1].client, "a0")] == slot_of[2]
    assert_state_close(strat.slots_[slot_of[0]], expected_mean([chosen[0]]))
    assert_state_close(strat.slots_[slot_of[2]], expected_mean([chosen[1]]))
    for k in before:
        assert torch.equal(strat.slots_[slot_of[1]][k], before[k])
    # a job that missed the round keeps its last assignment
    missed = [s for s, gc in zip(subs, group_of) if gc == 1][0]
    assert strat.assignment_[(missed.client, missed.key)] == slot_of[1]


def test_fltac_cluster_on_update_groups_by_change_not_by_weights():
    # starts differ wildly per client, so the submitted weights do not group; the updates (state - start) do
    initial = make_initial()
    g = torch.Generator().manual_seed(5)
    # each group moves along its own random direction (distinct in length-normalised space too)
    deltas = [{k: 10.0 * torch.randn(*SHAPES[k], generator=g) for k in SHAPES} for c in range(3)]
    subs, group_of = [], []
    for c in range(3):
        for i in range(PER_GROUP):
            start = {k: 40.0 * torch.randn(*SHAPES[k], generator=g) for k in SHAPES}
            state = {k: start[k] + deltas[c][k] + 0.05 * torch.randn(*SHAPES[k], generator=g) for k in SHAPES}
            subs.append(Submission(c * PER_GROUP + i, "a0", state, 5 + i, start))
            group_of.append(c)
    strat = new_fltac(initial, cluster_on="update")
    slot_of = group_slots(strat.aggregate(1, subs), subs, group_of)
    assert sorted(slot_of.values()) == [0, 1, 2]
    for c, slot in slot_of.items():
        assert_state_close(strat.slots_[slot], expected_mean([s for s, gc in zip(subs, group_of) if gc == c]))


def test_fedavg_averages_everything_sample_weighted():
    initial, centres = make_initial(), make_centres()
    subs, _ = make_subs(centres, initial, round_seed=3)
    strat = FedAvg(initial)
    assert strat.n_slots == 1
    assigned = strat.aggregate(1, subs)
    assert set(assigned.values()) == {0}
    assert_state_close(strat.slots_[0], expected_mean(subs))
    assert_state_close(strat.start_state(subs[0].client, "a0"), expected_mean(subs))
    # a client that has not taken part yet (sampled later, or dropped) starts from the global adapter, w^t
    assert strat.start_state(12345, "a0") is strat.slots_[0]
    assert not torch.equal(strat.slots_[0][next(iter(SHAPES))], initial[next(iter(SHAPES))])


def test_centralized_slot_is_the_pooled_layouts_slot_of_the_key():
    initial = make_initial()
    g = torch.Generator().manual_seed(9)
    subs = [Submission(0, f"a{t}", {k: torch.randn(*s, generator=g) for k, s in SHAPES.items()}, 10 + t, initial)
            for t in range(3)]
    strat = Centralized(initial, pooled_slots(3))
    assert strat.aggregate(1, subs) == {(0, "a0"): 0, (0, "a1"): 1, (0, "a2"): 2}
    for t in range(3):
        assert_state_close(strat.slots_[t], subs[t].state)


def _json_roundtrip(meta):
    return json.loads(json.dumps(meta))


def test_fltac_state_dict_round_trip_then_identical_next_round():
    initial, centres = make_initial(), make_centres()
    strat = new_fltac(initial)
    for r, order in ((1, None), (2, (1, 0, 2))):
        strat.aggregate(r, make_subs(centres, initial, round_seed=40 + r, order=order, shift=0.2 * r)[0])
    tensors, meta = strat.state_dict()
    assert len(tensors) == N_GROUPS * len(SHAPES)

    fresh = new_fltac(initial)
    fresh.load_state_dict({k: v.clone() for k, v in tensors.items()}, _json_roundtrip(meta))
    assert fresh.assignment_ == strat.assignment_
    assert fresh.fitted_ is True
    for a, b in zip(fresh.slots_, strat.slots_):
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)

    # the restored strategy behaves exactly like the original on the next round
    subs3, group3 = make_subs(centres, initial, round_seed=77, order=(2, 1, 0), shift=0.7)
    assert fresh.aggregate(3, subs3) == strat.aggregate(3, subs3)
    for a, b in zip(fresh.slots_, strat.slots_):
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_fedavg_state_dict_round_trip():
    initial, centres = make_initial(), make_centres()
    strat = FedAvg(initial)
    subs, _ = make_subs(centres, initial, round_seed=8)
    strat.aggregate(1, subs)
    tensors, meta = strat.state_dict()
    fresh = FedAvg(initial)
    fresh.load_state_dict(tensors, _json_roundtrip(meta))
    assert fresh.assignment_ == strat.assignment_
    assert all(torch.equal(fresh.slots_[0][k], strat.slots_[0][k]) for k in SHAPES)
    assert all(torch.equal(fresh.start_state(s.client, s.key)[k], strat.slots_[0][k]) for s in subs for k in SHAPES)


def test_fltac_random_projection_keeps_the_planted_groups_and_shrinks_the_features():
    initial, centres = make_initial(), make_centres()
    subs, group_of = make_subs(centres, initial, round_seed=11)
    full = new_fltac(initial)
    projected = FLTAC(initial, N_GROUPS, list(LORA_KEYS), "weights", 0, n_init=5, kmeans_dims=3)
    dim = sum(int(np.prod(SHAPES[k])) for k in LORA_KEYS)
    assert full.features(subs).shape == (len(subs), dim)
    assert projected.features(subs).shape == (len(subs), 3)
    np.testing.assert_array_equal(projected.features(subs), projected.features(subs))  # seeded: same projection
    for strat in (full, projected):
        assigned = strat.aggregate(1, subs)
        slot_of = group_slots(assigned, subs, group_of)
        assert sorted(slot_of.values()) == list(range(N_GROUPS))
        for c, slot in slot_of.items():
            assert_state_close(strat.slots_[slot], expected_mean([s for s, gc in zip(subs, group_of) if gc == c]))


def test_fltac_names_a_non_finite_submission_instead_of_failing_inside_kmeans():
    from fltac.server.strategies import AggregationError

    initial, centres = make_initial(), make_centres()
    subs, _ = make_subs(centres, initial, round_seed=11)
    subs[5].state[LORA_KEYS[0]][0, 0] = float("nan")
    with pytest.raises(AggregationError, match=rf"client {subs[5].client} a0.*reliability.validate"):
        new_fltac(initial).aggregate(1, subs)


@pytest.mark.parametrize("features, want", [("lora_B", [LORA_KEYS[1], LORA_KEYS[3]]), ("lora", LORA_KEYS),
                                            ("lora_and_head", LORA_KEYS + HEAD_KEYS)])
def test_fltac_config_chooses_what_the_clustering_sees(features, want):
    from fltac.config import load_config
    from fltac.server.strategies import make_strategy

    cfg = load_config(None, {"server.cluster_features": features, "server.clustering": "kmeans"})
    strat = make_strategy(cfg, make_initial(), N_GROUPS, list(LORA_KEYS))
    assert strat.feature_keys == want and strat.clustering == "kmeans"
    x = strat.features(make_subs(make_centres(), make_initial(), round_seed=3)[0])
    assert x.shape[1] == sum(math.prod(SHAPES[k]) for k in want)
