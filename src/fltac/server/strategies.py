"""Server strategies: what each client is sent (``configure``) and how submissions are merged (``aggregate``).

A strategy holds *slots*, the global adapters it serves, and the slot each (client, key) was last
assigned. Engines call ``configure`` for every job before a round and ``aggregate`` once after it;
they never look inside. State learned across rounds ends in ``_`` and round-trips through
``state_dict`` / ``load_state_dict`` (tensors + JSON) so a run can resume.
"""

from __future__ import annotations

import numpy as np
import torch

from fltac.config import RunConfig
from fltac.methods import method_of, pooled_slots
from fltac.privacy import CentralDP, noise_multiplier
from fltac.server.aggregate import (clustering_scores, eigengap_k, flatten, kmeans_labels, match_to_previous,
                                   random_projection, silhouette_k, spectral_labels)
from fltac.server.optimizers import DEFAULTS as OPTIMIZER_DEFAULTS
from fltac.server.optimizers import ServerOptimizer
from fltac.server.robust import Aggregation, Spec, spec_of
from fltac.wire import Broadcast, Mean, State, Submission, frozen_keys

__all__ = ["AggregationError", "Broadcast", "Centralized", "EmptyRoundError", "FLTAC", "FedAvg", "Strategy",
           "Submission", "make_strategy"]


class AggregationError(ValueError):
    """Submissions the strategy cannot aggregate (e.g. non-finite values with validation turned off)."""


class EmptyRoundError(AggregationError):
    """``aggregate`` called with no submission: the same error for every method (the engines stop a round
    with too few clients before aggregating, :class:`fltac.engines.inprocess.TooFewClients`)."""


#: Key prefix of the server optimizer's memory in ``state_dict`` (``server_memory/slot<i>/m/<key>``): not a slot.
MEMORY = "server_memory/slot"


class Strategy:
    """Base: slots of global adapters, each job starting from the slot it was last assigned."""

    name = "base"
    #: How the members of one slot are combined (``reliability.aggregation``; set by :func:`make_strategy`).
    aggregation: Aggregation = Aggregation()
    #: What turns a slot's aggregate into its new adapter (``server.optimizer``; None: the aggregate itself).
    server_optimizer: ServerOptimizer | None = None
    #: Tensors no client trains (FFA-LoRA's lora_A, ``lora.freeze_A``): every slot keeps the one it served.
    frozen: tuple[str, ...] = ()
    #: Central DP (``privacy.mode: central``): replaces ``aggregation`` by DP-FedAvg's noised mean (fltac.privacy).
    privacy: CentralDP | None = None

    def __init__(self, initial: State, n_slots: int):
        self.initial = initial
        self.n_slots = n_slots
        self.slots_: list[State] = [initial] * n_slots
        self.assignment_: dict[tuple[int, str], int] = {}
        self.memory_: list[State] = [{} for _ in range(n_slots)]  # the server optimizer's state, per slot

    def start_state(self, client: int, key: str) -> State:
        """The adapter sent to ``client`` for its adapter ``key``: its last slot. An adapter the server has not
        placed yet (its client not sampled before, or dropped) gets the global adapter when there is one slot
        (FedAvg's w^t), else the initial adapter: with several slots (FL-TAC) which one it belongs to is known
        only once it has been clustered."""
        slot = self.assignment_.get((client, key))
        if slot is None:
            return self.slots_[0] if self.n_slots == 1 else self.initial
        return self.slots_[slot]

    def configure(self, round_: int, client: int, key: str) -> Broadcast:
        """What ``client`` receives for its adapter ``key`` in ``round_``; methods add hook settings."""
        return Broadcast(self.start_state(client, key))

    def round_metrics(self) -> dict:
        """Method-specific numbers for the round's metrics record (e.g. a rank budget), after ``aggregate``."""
        return {}

    def cluster_records(self, round_: int, assigned: dict[tuple[int, str], int], jobs: list,
                        task_names: list[str]) -> list[dict]:
        """The round's lines for ``cluster_assignments.jsonl``, after ``aggregate``: none unless the method
        clusters. ``jobs`` (each with ``client``, ``key``, ``tasks``, ``num_examples``) and ``task_names`` are
        the engine's ground truth, for measurement only: ``aggregate`` never saw them."""
        return []

    def checkpoint_slots(self, meta: dict) -> int:
        """How many slots a checkpoint of this strategy holds, given its ``state_dict`` JSON: ``n_slots``, unless
        the strategy's slots grow during a run (FL-TAC with an automatic K)."""
        return self.n_slots

    def expected_spec(self, client: int, key: str, sent: Broadcast) -> Spec:
        """The layout ``{tensor: (shape, dtype)}`` a submission for (client, key) must have: by default
        that of the adapter the client was sent (which carries the method's tensors and its rank)."""
        return spec_of(sent.state)

    def aggregate(self, round_: int, subs: list[Submission]) -> dict[tuple[int, str], int]:
        """Merge ``subs`` into the slots; return the slot each submission was assigned. No submission at all
        is an :class:`EmptyRoundError`, whatever the method."""
        if not subs:
            raise EmptyRoundError(f"round {round_}: no submission to aggregate (method {self.name})")
        return self._aggregate(round_, subs)

    def _aggregate(self, round_: int, subs: list[Submission]) -> dict[tuple[int, str], int]:
        """The method's own merge of a round's (non-empty) submissions."""
        raise NotImplementedError

    def _merge(self, round_: int, subs: list[Submission], slot_of: list[int]) -> dict[tuple[int, str], int]:
        """Combine the members of each slot with ``self.aggregation`` (sample-weighted FedAvg by default; robust
        rules, optionally after update-norm clipping: see :mod:`fltac.server.robust`; with central DP,
        ``self.privacy``'s clipped, equal-weight, noised mean of the slot's clients), then, with a
        ``server_optimizer``, step the slot from the adapter it served towards that aggregate
        (:mod:`fltac.server.optimizers`); a slot that got no submission keeps its adapter and its memory.
        The ``frozen`` tensors are the slot's own, bit for bit (its members all hold them: a weighted mean of
        equal tensors could still move them by a rounding), so with FFA-LoRA's shared ``lora_A`` the merged
        ``lora_B`` gives the exact average of the members' products ``B A``."""
        slots = list(self.slots_)
        private = self.privacy(round_, subs, slot_of, self.frozen) if self.privacy is not None else {}
        for s in sorted(set(slot_of)):
            members = [sub for sub, c in zip(subs, slot_of) if c == s]
            slots[s] = private[s] if private else self.aggregation(
                [m.state for m in members], [m.start for m in members], [m.num_examples for m in members])
            if self.server_optimizer is not None:
                slots[s], self.memory_[s] = self.server_optimizer.step(self.slots_[s], slots[s], self.memory_[s])
            if self.frozen:
                slots[s] = {k: self.slots_[s][k].clone() if k in self.frozen else v for k, v in slots[s].items()}
        self.slots_ = slots
        assigned = {(sub.client, sub.key): int(c) for sub, c in zip(subs, slot_of)}
        self.assignment_.update(assigned)
        return assigned

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict]:
        tensors = {f"slot{i}/{k}": v for i, slot in enumerate(self.slots_) for k, v in slot.items()}
        tensors.update({f"{MEMORY}{i}/{k}": v for i, memory in enumerate(self.memory_) for k, v in memory.items()})
        meta = {"assignment": [[c, k, s] for (c, k), s in sorted(self.assignment_.items())]}
        return tensors, meta

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        self.slots_ = [{k: tensors[f"slot{i}/{k}"] for k in self.initial} for i in range(self.n_slots)]
        self.memory_ = [{k.removeprefix(f"{MEMORY}{i}/"): v for k, v in tensors.items()
                         if k.startswith(f"{MEMORY}{i}/")} for i in range(self.n_slots)]
        self.assignment_ = {(int(c), str(k)): int(s) for c, k, s in meta["assignment"]}


class FedAvg(Strategy):
    """FedIT (Zhang et al., arXiv 2305.05644): one shared adapter, sample-weighted FedAvg of all submissions."""

    name = "fedit"

    def __init__(self, initial: State):
        super().__init__(initial, 1)

    def _aggregate(self, round_, subs):
        return self._merge(round_, subs, [0] * len(subs))

    def aggregate_mean(self, round_: int, mean: Mean) -> dict[tuple[int, str], int]:
        """Merge a round that arrives as the sample-weighted mean of its submissions (secure aggregation: the
        server never holds one of them). FedAvg of all submissions *is* that mean, so the slot's aggregate is
        ``mean.state`` (the FedAvg of it alone), then the server optimizer and the frozen tensors as in
        :meth:`~Strategy._merge`; every member is assigned the one slot."""
        if not mean.members:
            raise EmptyRoundError(f"round {round_}: no submission to aggregate (method {self.name})")
        client, key = mean.members[0]
        self._merge(round_, [Submission(client, key, mean.state, mean.num_examples, self.slots_[0])], [0])
        assigned = {member: 0 for member in mean.members}
        self.assignment_.update(assigned)
        return assigned


class Centralized(Strategy):
    """Upper bound, not federated: one pooled client; ``slot_of`` names the slot of each of its keys (the
    registry's pooled layout, :func:`fltac.methods.pooled_slots`)."""

    name = "centralized"

    def __init__(self, initial: State, slot_of: dict[str, int]):
        super().__init__(initial, len(slot_of))
        self.slot_of = dict(slot_of)

    def _aggregate(self, round_, subs):
        unknown = sorted({s.key for s in subs} - set(self.slot_of))
        if unknown:
            raise AggregationError(f"adapter key(s) {unknown} have no slot (known: {sorted(self.slot_of)})")
        return self._merge(round_, subs, [self.slot_of[s.key] for s in subs])


#: Submissions flattened at a time when building K-means features.
FEATURE_CHUNK = 256


class FLTAC(Strategy):
    """FL-TAC (Ping et al., arXiv 2404.15384): K-means on the submitted adapters, FedAvg inside each cluster.

    Parameters
    ----------
    initial : State
        The adapter every job starts from before it has a cluster.
    n_clusters : int or None
        K, by default the number of tasks. The server is never told any task. None (``server.n_clusters:
        auto``): K is chosen every round from the round's features alone (:meth:`choose_k`), and the
        strategy starts with no slot; it is never told how many tasks there are.
    feature_keys : list[str]
        Tensors K-means sees: the LoRA matrices only by default (``server.cluster_features: lora``),
        since which head rows moved would give the task away; the head is averaged all the same.
    cluster_on : {'weights', 'update'}
        Cluster the submitted weights (the paper) or their change since the adapter the client was sent.
    normalize : bool
        Scale every feature vector to unit length first (spherical K-means). Reconstructed: the paper
        only says the adapters are flattened; see ``server.cluster_normalize`` for why it is the default.
    seed, n_init : int
        K-means uses ``random_state = seed + round`` and ``n_init`` restarts.
    clustering : {'kmeans', 'spectral'}
        K-means on the features (the paper), or spectral clustering of their nearest-neighbour graph
        (:func:`spectral_labels`, ``n_neighbors`` neighbours each; ``server.clustering``).
    kmeans_dims : int or None
        Project the (normalised) features to this many dimensions with a seeded Gaussian random projection
        before K-means (Johnson-Lindenstrauss: distances kept within a small factor), so thousands of
        adapters cluster in seconds; None (default) = K-means on the full vectors, as the paper does.

    max_clusters, k_selection
        ``n_clusters`` None only: the largest K considered and how K is chosen ('eigengap' on the
        neighbour graph, or 'silhouette' of the clusterings; :func:`eigengap_k`, :func:`silhouette_k`).

    Cluster ids are matched to the previous round's slots (Hungarian between the clusters' mean
    submitted weights and the slots' weights, see
    :func:`match_to_previous`), so a task keeps its slot. If fewer than K clusters form (fewer
    submissions than K), or a slot is matched by no cluster, that slot keeps its previous adapter.
    With an automatic K, a round may find more clusters than there are slots (a task appeared): the
    clusters the matching leaves out, the ones farthest from every slot, get new slots, numbered on
    from the last, which start from the initial adapter (the server optimizer steps from it); a round
    that finds fewer keeps the slots no cluster matched, unchanged, for the jobs still assigned to them,
    and a later round may match them again. Slot ids therefore never change meaning.
    Each (client, key) starts the next round from the slot its submission was assigned; a job that
    missed a round keeps its last assignment, and one never seen starts from the initial adapter.

    Failed clients: only accepted submissions reach ``aggregate`` (the engine drops crashed, late and
    rejected ones first). A (client, key) that missed a round (its client failed, or its adapter was
    rejected) keeps its last cluster assignment and starts the next round from that slot's adapter.
    A cluster that receives no submission in a round (no accepted submission was matched to its
    slot) keeps its adapter unchanged, and the jobs assigned to it keep being sent that adapter;
    it is updated again in the first round some submission is matched to it. Robust rules
    (``reliability.aggregation``) run inside each cluster, after K-means.
    """

    name = "fltac"

    def __init__(self, initial: State, n_clusters: int | None, feature_keys: list[str], cluster_on: str, seed: int,
                 n_init: int = 10, normalize: bool = True, kmeans_dims: int | None = None,
                 clustering: str = "kmeans", n_neighbors: int | None = None, max_clusters: int = 10,
                 k_selection: str = "eigengap"):
        super().__init__(initial, n_clusters or 0)
        self.auto = n_clusters is None
        self.max_clusters = max_clusters
        self.k_selection = k_selection
        self.k_history_: list[list] = []  # auto: [round, K chosen, its criterion's scores] per round
        self.clustering = clustering
        self.n_neighbors = n_neighbors
        self.kmeans_dims = kmeans_dims
        self.feature_keys = feature_keys
        self.cluster_on = cluster_on
        self.normalize = normalize
        self.seed = seed
        self.n_init = n_init
        self.fitted_ = False

    def features(self, subs: list[Submission]) -> np.ndarray:
        """float32 ``[n, D]`` (``D`` = the feature tensors' size, or ``kmeans_dims`` when projecting), built
        in chunks so that with a projection the full ``[n, D]`` matrix never exists."""
        cached: dict[int, torch.Tensor] = {}  # many jobs share a start adapter (its slot): flatten it once

        def start(s: Submission) -> torch.Tensor:
            if id(s.start) not in cached:
                cached[id(s.start)] = flatten(s.start, self.feature_keys)
            return cached[id(s.start)]

        project = None
        rows = []
        for i in range(0, len(subs), FEATURE_CHUNK):
            chunk = subs[i: i + FEATURE_CHUNK]
            x = torch.stack([flatten(s.state, self.feature_keys) for s in chunk])
            if self.cluster_on == "update":
                x -= torch.stack([start(s) for s in chunk])
            bad = (~torch.isfinite(x).all(dim=1)).nonzero().flatten().tolist()
            if bad:
                who = ", ".join(f"client {chunk[j].client} {chunk[j].key}" for j in bad[:4])
                raise AggregationError(f"non-finite adapter values from {who}: the clustering cannot place them; "
                                       f"turn reliability.validate on to drop such submissions before aggregation")
            if self.normalize:
                x /= x.norm(dim=1, keepdim=True).clamp_min(1e-12)
            if self.kmeans_dims is not None and x.shape[1] > self.kmeans_dims:
                if project is None:
                    project = random_projection(x.shape[1], self.kmeans_dims, self.seed)
                x = x @ project
            rows.append(x)
        return torch.cat(rows).numpy()

    def cluster_means(self, subs: list[Submission], cluster: np.ndarray, k: int) -> torch.Tensor:
        """``[k, D]``: the mean submitted feature tensors (weights, not updates) of each cluster, summed in chunks."""
        sums = None
        for i in range(0, len(subs), FEATURE_CHUNK):
            x = torch.stack([flatten(s.state, self.feature_keys) for s in subs[i: i + FEATURE_CHUNK]])
            onehot = torch.nn.functional.one_hot(torch.from_numpy(cluster[i: i + FEATURE_CHUNK]), k).T.float()
            sums = onehot @ x if sums is None else sums + onehot @ x
        return sums / torch.from_numpy(np.bincount(cluster, minlength=k)).float()[:, None]

    def labels(self, features: np.ndarray, round_: int, k: int) -> np.ndarray:
        """The cluster id of each feature row in ``k`` clusters, by ``self.clustering``, seeded by ``seed + round_``."""
        if self.clustering == "spectral":
            return spectral_labels(features, k, self.seed + round_, self.n_init, self.n_neighbors)
        return kmeans_labels(features, k, self.seed + round_, self.n_init)

    def choose_k(self, features: np.ndarray, round_: int) -> tuple[int, list[float]]:
        """(K, the criterion's score per candidate K) for this round's features: ``self.k_selection`` over
        K = 1 (eigengap) or 2 (silhouette) .. ``max_clusters``. With at most three submissions there is no
        graph worth reading: the previous round's K (all of them, each its own cluster, in a first round),
        at most the submissions' count."""
        n = len(features)
        if n <= 3:
            previous = self.k_history_[-1][1] if self.k_history_ else n
            return min(previous, n), []
        if self.k_selection == "silhouette":
            return silhouette_k(features, self.max_clusters, lambda k: self.labels(features, round_, k))
        return eigengap_k(features, self.max_clusters, self.n_neighbors)

    def add_slot(self) -> int:
        """A new slot holding the initial adapter (and no server-optimizer memory); its id."""
        self.slots_.append(self.initial)
        self.memory_.append({})
        self.n_slots += 1
        return self.n_slots - 1

    def _aggregate(self, round_, subs):
        features = self.features(subs)
        k = self.n_slots
        if self.auto:
            k, scores = self.choose_k(features, round_)
            self.k_history_.append([round_, k, scores])
        labels = self.labels(features, round_, k)
        found = np.unique(labels)
        if self.fitted_:
            centers = self.cluster_means(subs, np.searchsorted(found, labels), len(found))
            previous = torch.stack([flatten(s, self.feature_keys) for s in self.slots_])
            matched = match_to_previous(centers.double().numpy(), previous.double().numpy())
        else:
            matched = np.arange(len(found)) if self.n_slots >= len(found) else np.full(len(found), -1)
        slot_of_cluster = {c: int(s) if s >= 0 else self.add_slot() for c, s in zip(found, matched)}
        self.fitted_ = True
        return self._merge(round_, subs, [slot_of_cluster[c] for c in labels])

    def round_metrics(self):
        """With an automatic K: the round's K (``n_clusters``) and the slots held so far (``n_slots``)."""
        return {"n_clusters": self.k_history_[-1][1], "n_slots": self.n_slots} if self.auto else {}

    def cluster_records(self, round_, assigned, jobs, task_names):
        """One line: each assigned (client, key) with its true task, cluster and sample count, and the
        clustering accuracy, ARI and NMI of the round's assignment against the true tasks."""
        done = [j for j in jobs if (j.client, j.key) in assigned]
        rows = [{"client": j.client, "key": j.key, "task": task_names[j.tasks[0]],
                 "cluster": assigned[(j.client, j.key)], "n": j.num_examples} for j in done]
        scores = clustering_scores([j.tasks[0] for j in done], [row["cluster"] for row in rows])
        chosen = {}
        if self.auto:  # the K chosen, its criterion's score per candidate (eigengap: K = 1, 2, ...; silhouette: 2, ...)
            _, k, k_scores = self.k_history_[-1]
            chosen = {"n_clusters": k, "k_selection": self.k_selection, "k_scores": k_scores, "n_slots": self.n_slots}
        return [{"round": round_, "assignments": rows, **scores, **chosen}]

    def state_dict(self):
        tensors, meta = super().state_dict()
        return tensors, {**meta, "fitted": self.fitted_, "n_slots": self.n_slots, "k_history": self.k_history_}

    def checkpoint_slots(self, meta: dict) -> int:
        return int(meta["n_slots"]) if self.auto else self.n_slots

    def load_state_dict(self, tensors, meta):
        if self.auto:  # the slots grew with the tasks found: as many as the checkpoint holds
            self.n_slots = int(meta["n_slots"])
            self.k_history_ = [list(h) for h in meta["k_history"]]
        super().load_state_dict(tensors, meta)
        self.fitted_ = bool(meta["fitted"])


def make_strategy(cfg: RunConfig, initial: State, n_tasks: int, lora_keys: list[str]) -> Strategy:
    """The strategy of ``cfg.method`` (its registry factory), combining slot members by ``reliability.aggregation``."""
    strategy = method_of(cfg.method).make_strategy(cfg, initial, n_tasks, lora_keys)
    rel, server = cfg.reliability, cfg.server
    strategy.frozen = tuple(frozen_keys(initial, cfg.lora.freeze_A))
    strategy.aggregation = Aggregation(rel.aggregation, rel.trim_fraction, rel.clip_norm, rel.krum_f, rel.multi_krum_m)
    if cfg.privacy.mode == "central":
        strategy.privacy = CentralDP(cfg.privacy.clip_norm, noise_multiplier(cfg), cfg.seed)
    if server.optimizer != "none":
        lr, tau = OPTIMIZER_DEFAULTS[server.optimizer]
        strategy.server_optimizer = ServerOptimizer(
            server.optimizer, server.server_lr if server.server_lr is not None else lr, server.server_momentum,
            server.server_beta1, server.server_beta2, server.server_tau if server.server_tau is not None else tau)
    return strategy


def make_fedavg(cfg: RunConfig, initial: State, n_tasks: int, lora_keys: list[str]) -> FedAvg:
    return FedAvg(initial)


def make_centralized(cfg: RunConfig, initial: State, n_tasks: int, lora_keys: list[str]) -> Centralized:
    return Centralized(initial, pooled_slots(n_tasks))


def make_fltac(cfg: RunConfig, initial: State, n_tasks: int, lora_keys: list[str]) -> FLTAC:
    keys = {"lora": lora_keys, "lora_B": [k for k in lora_keys if ".lora_B." in k],
            "lora_and_head": list(initial)}[cfg.server.cluster_features]
    keys = [k for k in keys if k not in frozen_keys(keys, cfg.lora.freeze_A)]  # FFA-LoRA: A is everyone's
    server = cfg.server
    k = None if server.n_clusters == "auto" else server.n_clusters or n_tasks  # auto: the task count is not read
    return FLTAC(initial, k, keys, server.cluster_on, cfg.seed, server.kmeans_n_init, server.cluster_normalize,
                 server.kmeans_dims, server.clustering, server.spectral_neighbors, server.max_clusters,
                 server.k_selection)
