"""HAFL and HetLoRA: clients of different LoRA ranks r_k <= R, aggregated one rank-1 component at a time.

HAFL: Su, Yan, Deng, "Federated LLMs Fine-tuned with Adaptive Importance-Aware LoRA", arXiv 2411.06581 v1.
HetLoRA (the baseline): Cho et al., "Heterogeneous LoRA for Federated Fine-tuning of On-Device Foundation
Models", arXiv 2401.06432.

The global adapter has rank R. Per adapted module, ``dW = B A = sum_i b_i a_i^T`` (``b_i = B[:, i]``,
``a_i = A[i, :]``); component ``i`` is the pair (``b_i``, ``a_i``), and every function here treats the
two factors of a component together but averages them separately, entry by entry (never the product).

Per round and client ``k`` (``configure``):

- **selection.** ``first`` (HetLoRA): components ``0..r_k-1``. ``importance`` + truncate: the top-r_k by
  the server's global score. ``importance`` + freeze: the top-r_k by the client's own scores of its last
  round, falling back to the global score (reconstructed; see :meth:`HAFL.components`). Ties go to the
  lower index, so round 1 (all scores zero) selects ``0..r_k-1``.
- **truncate.** The client is sent the global adapter with every other component set to zero, which is
  exactly a rank-r_k LoRA adapter (the LoRA scaling stays alpha / R for every client, so a component
  means the same everywhere); it trains those components.
- **freeze.** The client is sent the full rank-R adapter and trains only its r_k components; the
  others take part in its forward pass but do not move (:class:`fltac.client.importance.TrainOnly`).
- **upload.** The selected rows of ``lora_A`` and columns of ``lora_B`` with their indices
  (``<module>.hafl_idx``) and, for HAFL, the component scores (``<module>.hafl_score``): r_k of them
  after truncation, all R after freezing (the client measures them all). The head is sent whole.

Aggregation (``aggregate``, :func:`aggregate_components`): adaptive (HAFL) or zero_pad (HetLoRA); the
classification head is sample-weighted FedAvg over all clients either way.
"""

from __future__ import annotations

import torch

from fltac.server.aggregate import weighted_mean
from fltac.server.robust import Spec, spec_of
from fltac.server.strategies import Strategy
from fltac.wire import (A_SUFFIX, B_SUFFIX, HOOK_IMPORTANCE, HOOK_TRAIN_ONLY, IDX, SCORE, Broadcast, State, Submission,
                        lora_modules)

#: One client's upload of one module: (component indices [r], A rows [r, d_in], B columns [d_out, r]).
Part = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


# ---- pure functions ---------------------------------------------------------------------------------

def top_components(scores: torch.Tensor, r: int) -> list[int]:
    """Indices of the ``r`` highest scores (ties: the lower index first), in ascending order."""
    order = torch.sort(-scores.double(), stable=True).indices[:r]
    return sorted(int(i) for i in order)


def truncate(state: State, components: dict[str, list[int]]) -> State:
    """``state`` with every component not listed for its module set to zero (A rows and B columns)."""
    out = dict(state)
    for m, idx in components.items():
        a, b = state[m + A_SUFFIX], state[m + B_SUFFIX]
        keep = torch.zeros(a.shape[0], dtype=torch.bool)
        keep[list(idx)] = True
        out[m + A_SUFFIX] = torch.where(keep[:, None], a, torch.zeros_like(a))
        out[m + B_SUFFIX] = torch.where(keep[None, :], b, torch.zeros_like(b))
    return out


def unpack(state: State, extras: dict[str, torch.Tensor], modules: list[str]) -> dict[str, Part]:
    """A submission's rank-1 components per module, from its sliced tensors and ``<module>.hafl_idx``."""
    parts = {}
    for m in modules:
        idx = extras[m + IDX].long()
        a, b = state[m + A_SUFFIX], state[m + B_SUFFIX]
        if a.shape[0] != len(idx) or b.shape[1] != len(idx) or len(set(idx.tolist())) != len(idx):
            raise ValueError(f"module '{m}': {len(idx)} distinct indices expected for A {tuple(a.shape)} and "
                             f"B {tuple(b.shape)}, got {idx.tolist()}")
        parts[m] = (idx, a, b)
    return parts


def place(current: State, parts: dict[str, Part]) -> State:
    """``current`` with each uploaded component written back at its own index (the others unchanged)."""
    out = dict(current)
    for m, (idx, a, b) in parts.items():
        out[m + A_SUFFIX] = current[m + A_SUFFIX].clone()
        out[m + B_SUFFIX] = current[m + B_SUFFIX].clone()
        out[m + A_SUFFIX][idx] = a.to(out[m + A_SUFFIX].dtype)
        out[m + B_SUFFIX][:, idx] = b.to(out[m + B_SUFFIX].dtype)
    return out


def aggregate_components(current: State, uploads: list[dict[str, Part]], weights: list[float], rule: str,
                         component_weights: list[dict[str, torch.Tensor]] | None = None) -> State:
    """New A and B of every module from the clients' rank-1 components (other keys of ``current`` untouched).

    With ``K_i`` the clients that uploaded component ``i`` and ``w_k`` their weights (sample counts):

    - ``adaptive`` (HAFL): ``b_i = sum_{k in K_i} w_ki b_ki / sum_{k in K_i} w_ki`` and the same for ``a_i``;
      ``w_ki = w_k``, or ``component_weights[k][m][j]`` for the j-th uploaded component when given
      (e.g. ``n_k x S_ki``, reconstructed). A component no client uploaded (``K_i`` empty), or whose
      weights sum to zero, keeps its current value.
    - ``zero_pad`` (HetLoRA): every client's adapter is padded to rank R with zeros where it uploaded
      nothing, and all are averaged: ``b_i = sum_{k in K_i} w_k b_ki / sum_{all k} w_k``. A component
      updated by only some clients is shrunk by their share of the weight, one nobody updated becomes zero.

    A and B are averaged separately (never the product B A), in float64, cast back.
    """
    if rule not in ("adaptive", "zero_pad"):
        raise ValueError(f"unknown component aggregation rule '{rule}'")
    if not uploads:
        return dict(current)
    if len(weights) != len(uploads) or min(weights) < 0 or sum(weights) <= 0:
        raise ValueError(f"need one non-negative weight per upload with a positive sum, got {weights}")
    if component_weights is not None and rule != "adaptive":
        raise ValueError("per-component weights are only defined for adaptive aggregation")
    out = dict(current)
    total = float(sum(weights))
    for m in sorted(uploads[0]):
        a0, b0 = current[m + A_SUFFIX], current[m + B_SUFFIX]
        num_a = torch.zeros(a0.shape, dtype=torch.float64)
        num_b = torch.zeros(b0.shape, dtype=torch.float64)
        den = torch.zeros(a0.shape[0], dtype=torch.float64)
        for k, up in enumerate(uploads):
            idx, a, b = up[m]
            w = torch.full((len(idx),), float(weights[k]), dtype=torch.float64)
            if component_weights is not None:
                w = component_weights[k][m].double().reshape(len(idx))
            num_a.index_add_(0, idx, w[:, None] * a.double())
            num_b.index_add_(1, idx, b.double() * w[None, :])
            den.index_add_(0, idx, w)
        if rule == "zero_pad":
            new_a, new_b = num_a / total, num_b / total
        else:
            seen = den > 0
            safe = torch.where(seen, den, torch.ones_like(den))
            new_a = torch.where(seen[:, None], num_a / safe[:, None], a0.double())
            new_b = torch.where(seen[None, :], num_b / safe[None, :], b0.double())
        out[m + A_SUFFIX], out[m + B_SUFFIX] = new_a.to(a0.dtype), new_b.to(b0.dtype)
    return out


def global_scores(current: dict[str, torch.Tensor], uploads: list[dict[str, Part]],
                  scores: list[dict[str, torch.Tensor]], weights: list[float]) -> dict[str, torch.Tensor]:
    """Sample-weighted global score of each component: ``S_i = sum_{k in K_i} n_k S_ki / sum_{k in K_i} n_k``
    over the clients that reported a score for ``i`` (``scores[k][m]`` aligned with ``uploads[k][m]``'s
    indices); a component nobody scored keeps its previous score."""
    out = {}
    for m, s0 in current.items():
        num = torch.zeros(s0.shape, dtype=torch.float64)
        den = torch.zeros(s0.shape, dtype=torch.float64)
        for up, sc, w in zip(uploads, scores, weights):
            idx = up[m][0]
            num.index_add_(0, idx, float(w) * sc[m].double())
            den.index_add_(0, idx, torch.full((len(idx),), float(w), dtype=torch.float64))
        seen = den > 0
        out[m] = torch.where(seen, num / torch.where(seen, den, torch.ones_like(den)), s0.double()).float()
    return out


# ---- the strategy -----------------------------------------------------------------------------------

class HAFL(Strategy):
    """Heterogeneous-rank LoRA: HAFL (arXiv 2411.06581 v1) and, with its options, HetLoRA (arXiv 2401.06432).

    Parameters
    ----------
    initial : State
        The rank-R adapter every client starts from (LoRA factors and classification head).
    client_ranks : dict[int, int]
        r_k of every client, each in [1, R].
    mode : {'truncate', 'freeze'} (default: 'truncate')
        What client k is sent: its r_k components only (others zero), or the full rank-R adapter with
        all but r_k components frozen.
    aggregation : {'adaptive', 'zero_pad'} (default: 'adaptive')
        :func:`aggregate_components`.
    selection : {'importance', 'first'} (default: 'importance')
        Which components a client gets: by score (HAFL), or always ``0..r_k-1`` (HetLoRA).
    beta : float (default: 0.85)
        EMA factor of the client's sensitivity scores.
    uncertainty : bool (default: False)
        Reconstructed option: AdaLoRA's uncertainty factor in the score.
    score_reduce : {'sum', 'mean'} (default: 'sum')
        How a component's entries are gathered into its score.
    weighting : {'samples', 'samples_x_score'} (default: 'samples')
        Adaptive weights ``n_k``, or ``n_k x S_ki`` (reconstructed option).

    Learned state: ``slots_[0]`` (the global adapter), ``score_`` (global score per module, ``[R]``),
    ``client_score_`` (freeze mode: each client's last reported scores, kept on its behalf; a real
    client keeps them itself, so they are never counted as sent).
    """

    name = "hafl"

    def __init__(self, initial: State, client_ranks: dict[int, int], mode: str = "truncate",
                 aggregation: str = "adaptive", selection: str = "importance", beta: float = 0.85,
                 uncertainty: bool = False, score_reduce: str = "sum", weighting: str = "samples"):
        super().__init__(initial, 1)
        self.client_ranks = client_ranks
        self.mode = mode
        self.aggregation_rule = aggregation
        self.selection = selection
        self.beta = beta
        self.uncertainty = uncertainty
        self.score_reduce = score_reduce
        self.weighting = weighting
        self.modules = lora_modules(initial)
        self.rank = int(initial[self.modules[0] + A_SUFFIX].shape[0])
        bad = {k: r for k, r in client_ranks.items() if not 1 <= r <= self.rank}
        if bad:
            raise ValueError(f"client ranks {bad} outside [1, R = {self.rank}]")
        self.score_ = {m: torch.zeros(self.rank) for m in self.modules}
        self.client_score_: dict[int, dict[str, torch.Tensor]] = {}

    @property
    def uses_scores(self) -> bool:
        return self.selection == "importance" or self.weighting == "samples_x_score"

    def components(self, client: int) -> dict[str, list[int]]:
        """Per module, the component indices ``client`` trains this round.

        Freeze mode ranks by the client's own scores from its last round (reconstructed: the paper says
        "locally most important"; a client that has not trained yet uses the global score).
        """
        source = self.score_
        if self.mode == "freeze" and client in self.client_score_:
            source = self.client_score_[client]
        return self.pick(source, self.client_ranks[client])

    def pick(self, scores: dict[str, torch.Tensor], r: int) -> dict[str, list[int]]:
        """Per module, the ``r`` components a rank-``r`` client gets: the first ``r`` (HetLoRA's selection) or the
        top ``r`` by ``scores`` (HAFL's)."""
        if self.selection == "first":
            return {m: list(range(r)) for m in self.modules}
        return {m: top_components(scores[m], r) for m in self.modules}

    def sent_state(self, round_: int, client: int, key: str, comps: dict[str, list[int]]) -> State:
        """The adapter ``client`` is sent: the global one, cut to its components ``comps`` when truncating."""
        state = self.start_state(client, key)
        return truncate(state, comps) if self.mode == "truncate" else state

    def configure(self, round_: int, client: int, key: str) -> Broadcast:
        comps = self.components(client)
        state = self.sent_state(round_, client, key, comps)
        config = {HOOK_TRAIN_ONLY: comps}
        if self.uses_scores:
            config[HOOK_IMPORTANCE] = {"beta": self.beta, "uncertainty": self.uncertainty,
                                         "reduce": self.score_reduce,
                                         "send": comps if self.mode == "truncate" else None}
        return Broadcast(state, config)

    def expected_spec(self, client: int, key: str, sent: Broadcast) -> Spec:
        """The sliced layout a client uploads: r_k rows of each ``lora_A``, r_k columns of each ``lora_B``."""
        spec = spec_of(sent.state)
        for m, idx in sent.config[HOOK_TRAIN_ONLY].items():
            (_, d_in), dt = spec[m + A_SUFFIX]
            spec[m + A_SUFFIX] = ((len(idx), d_in), dt)
            (d_out, _), dt = spec[m + B_SUFFIX]
            spec[m + B_SUFFIX] = ((d_out, len(idx)), dt)
        return spec

    def _aggregate(self, round_: int, subs: list[Submission]) -> dict[tuple[int, str], int]:
        current = self.slots_[0]
        uploads = [unpack(s.state, s.extras, self.modules) for s in subs]
        weights = [float(s.num_examples) for s in subs]
        scores = None
        if self.uses_scores:
            scores = [self._scores_of(s, up) for s, up in zip(subs, uploads)]
        comp_w = None
        if self.weighting == "samples_x_score":
            comp_w = [{m: w * (sc[m][up[m][0]] if len(sc[m]) == self.rank else sc[m]) for m in self.modules}
                      for w, sc, up in zip(weights, scores, uploads)]
        new = self.merge_lora(round_, current, uploads, weights, comp_w)
        other = [k for k in current if not k.endswith((A_SUFFIX, B_SUFFIX))]
        if other:
            new.update(weighted_mean([{k: s.state[k] for k in other} for s in subs], weights))
        if scores is not None:
            # which components each score belongs to: all R (freeze) or the uploaded ones (truncate)
            reported = [{m: (torch.arange(self.rank) if len(sc[m]) == self.rank else up[m][0], None, None)
                         for m in self.modules} for sc, up in zip(scores, uploads)]
            self.score_ = global_scores(self.score_, reported, scores, weights)
            if self.mode == "freeze":
                for s, sc in zip(subs, scores):
                    if all(len(sc[m]) == self.rank for m in self.modules):
                        self.client_score_[s.client] = {m: sc[m].float().clone() for m in self.modules}
        self.slots_ = [new]
        assigned = {(s.client, s.key): 0 for s in subs}
        self.assignment_.update(assigned)
        return assigned

    def merge_lora(self, round_: int, current: State, uploads: list[dict[str, Part]], weights: list[float],
                   component_weights: list[dict[str, torch.Tensor]] | None) -> State:
        """``current`` with every module's A and B merged from the round's uploads (:func:`aggregate_components`)."""
        return aggregate_components(current, uploads, weights, self.aggregation_rule, component_weights)

    def _scores_of(self, sub: Submission, upload: dict[str, Part]) -> dict[str, torch.Tensor]:
        """The submission's component scores per module: length R (all measured) or r_k (its components)."""
        out = {}
        for m in self.modules:
            sc = sub.extras[m + SCORE].float()
            if len(sc) not in (self.rank, len(upload[m][0])):
                raise ValueError(f"client {sub.client}: {len(sc)} scores for module '{m}', expected "
                                 f"{self.rank} or {len(upload[m][0])}")
            out[m] = sc
        return out

    def state_dict(self):
        tensors, meta = super().state_dict()
        tensors.update({f"hafl/score/{m}": v for m, v in self.score_.items()})
        tensors.update({f"hafl/client_score/{k}/{m}": v for k, sc in self.client_score_.items() for m, v in sc.items()})
        return tensors, {**meta, "hafl_clients_with_scores": sorted(self.client_score_)}

    def load_state_dict(self, tensors, meta):
        super().load_state_dict(tensors, meta)
        self.score_ = {m: tensors[f"hafl/score/{m}"] for m in self.modules}
        self.client_score_ = {int(k): {m: tensors[f"hafl/client_score/{k}/{m}"] for m in self.modules}
                              for k in meta["hafl_clients_with_scores"]}


def make_hafl(cfg, initial: State, n_tasks: int = 0, lora_keys: list[str] | None = None) -> HAFL:
    """The strategy of ``method: hafl`` from a validated RunConfig: components chosen by importance."""
    return _heterogeneous(cfg, initial, "importance")


def make_hetlora(cfg, initial: State, n_tasks: int = 0, lora_keys: list[str] | None = None) -> HAFL:
    """The strategy of ``method: hetlora``: the first r_k components, zero-padded averaging."""
    return _heterogeneous(cfg, initial, "first")


def client_ranks(cfg) -> dict[int, int]:
    """r_k of every client of a validated RunConfig (section hafl)."""
    return dict(enumerate(cfg.hafl.ranks(cfg.partition.n_clients, cfg.seed)))


def _heterogeneous(cfg, initial: State, selection: str) -> HAFL:
    h = cfg.hafl
    mode, aggregation = h.resolved(cfg.method)
    ranks = client_ranks(cfg)
    strategy = HAFL(initial, ranks, mode, aggregation, selection, h.beta, h.uncertainty, h.score_reduce, h.weighting)
    strategy.name = cfg.method
    return strategy
