"""SA-FedLoRA (Yang et al., "SA-FedLoRA", arXiv 2405.09394) and FedAvg of full fine-tuning.

The paper gives the two stages and their purpose, not every formula; the readings below follow
the most faithful reading of the paper (docs/safedlora.md) and are marked *reconstructed*; each is a config option
(section ``safedlora``).

**Initiating stage** (rounds 1..``init_rounds``). Clients minimise L_k(w) + mu/2 ||w - w_g||^2
(FedProx's proximal term, :mod:`fltac.client.proximal`; reconstructed); the server does FedAvg
(``Strategy._merge``, so ``reliability.aggregation`` applies). ``init_train: full`` trains the whole
backbone and head (fp32), ``lora`` the SVD adapter at full rank and the head.

**Annealing stage.** The backbone is frozen (with ``full``: at the stage-1 FedAvg result, sent once to
each client, counted in its downlink) and an AdaLoRA adapter dW = P diag(lambda) Q starts at
``rank_init`` per matrix. The total budget b(t), in rank-1 triplets over all adapted matrices, follows
AdaLoRA's cubic schedule over annealing rounds (:func:`budget`). Each client computes AdaLoRA's smoothed
sensitivity per active triplet (:mod:`fltac.client.svd_importance`) and uploads it with the active rows;
the server averages both by sample count, keeps the global top-b(t+1) triplets (:func:`select_mask`) and
sends one shared mask as the indices of the packed adapter. Masked triplets get lambda = 0 on the server,
are not trained (zero gradient) and travel in neither direction.

Reconstructed choices: the budget is evaluated per round, not per step; a triplet once masked is never
revived (its lambda is 0 and it is not trained, so its score could only be stale; AdaLoRA's own masked
triplets also see zero sensitivity from then on); the first mask is set after ``warm_rounds`` >= 1
rounds of scores; P, Q and lambda are averaged separately, entry by entry, over the clients (all trained
the same triplets, so no padding is involved); the head is averaged the same way.
"""

from __future__ import annotations

import torch

from fltac.models.staged import (
    INDEX,
    Mask,
    full_mask,
    matrices_of,
    pack,
    part_of,
    unpack,
)
from fltac.server.robust import Spec, spec_of
from fltac.server.strategies import FedAvg, Strategy
from fltac.wire import HOOK_PROXIMAL, HOOK_SVD_ANNEAL, SVD_SCORE, Broadcast, State, Submission

# ---- pure functions -----------------------------------------------------------------------------------

def budget(t: int, total: int, b0: int, bT: int, warm: int, cool: int) -> int:
    """Triplets kept in annealing round ``t`` (1-based) of ``total``: AdaLoRA's cubic schedule in rounds.

    b(t) = b0 for t <= warm; bT for t > total - cool; else
    floor(bT + (b0 - bT) (1 - (t - warm) / (total - warm - cool))^3), as peft's ``RankAllocator.budget_schedule``.
    """
    if not 1 <= t <= total:
        raise ValueError(f"annealing round {t} outside 1..{total}")
    if warm + cool > total:
        raise ValueError(f"warm ({warm}) + cool ({cool}) rounds exceed the {total} annealing rounds")
    if t <= warm:
        return b0
    if t > total - cool:
        return bT
    progress = (t - warm) / (total - warm - cool)
    return int(bT + (b0 - bT) * (1 - progress) ** 3)


def select_mask(scores: dict[str, torch.Tensor], active: Mask, b: int) -> Mask:
    """The ``b`` highest-scoring triplets among the active ones, over all matrices together.

    ``scores[m]`` holds one score per triplet of matrix ``m`` (length r_init; inactive entries are ignored).
    Ties go to the lower (matrix, index) position, so the result is deterministic. If fewer than ``b`` are
    active, all active ones are kept (a masked triplet is never revived).
    """
    order = sorted(active)
    flat_active = torch.cat([active[m] for m in order])
    flat = torch.cat([scores[m].double() for m in order]).masked_fill(~flat_active, float("-inf"))
    b = min(int(b), int(flat_active.sum()))
    keep = torch.zeros_like(flat_active)
    if b > 0:
        ranked = torch.sort(-flat, stable=True).indices  # descending, stable: ties keep their position
        keep[ranked[:b]] = True
    keep &= flat_active
    sizes = [len(active[m]) for m in order]
    return dict(zip(order, torch.split(keep, sizes)))


def average_scores(uploads: list[dict[str, torch.Tensor]], weights: list[float], mask: Mask) -> dict[str, torch.Tensor]:
    """Sample-weighted mean of the clients' packed triplet scores, placed at full rank (0 at masked triplets)."""
    w = torch.tensor(weights, dtype=torch.float64)
    w = w / w.sum()
    out = {}
    for m, keep in mask.items():
        full = torch.zeros(len(keep), dtype=torch.float64)
        if uploads:
            full[keep] = sum(wi * u[f"{m}.{SVD_SCORE}"].double() for wi, u in zip(w, uploads))
        out[m] = full
    return out


def wire_params(state: State) -> int:
    """Numbers a packed state carries: per matrix r_m (d_in + d_out + 1) + r_m indices, plus other tensors."""
    return sum(v.numel() for v in state.values())


# ---- strategies --------------------------------------------------------------------------------------

class FedAvgFull(FedAvg):
    """FedAvg of full fine-tuning (McMahan et al., arXiv 1602.05629): the whole backbone and head are trained
    (fp32) and averaged by sample count every round; the comparison point of SA-FedLoRA."""

    name = "fedavg_full"


class SAFedLoRA(Strategy):
    """SA-FedLoRA (Yang et al., arXiv 2405.09394): initiating stage, then an annealed SVD-adapter budget.

    Parameters
    ----------
    everything : State
        Every parameter of the model at the start: backbone, head (``classifier.*``) and the full-rank
        AdaLoRA adapter (``<matrix>.lora_A/E/B``), as :meth:`fltac.models.staged.StagedModel.everything`.
    rounds : int
        Total rounds (both stages).
    init_rounds : int (default: 1)
        Rounds of the initiating stage; 0 starts annealing at round 1.
    init_train : {'full', 'lora'} (default: 'full')
        What the initiating stage trains. Reconstructed reading of "parameter regularisation on the
        pretrained model": ``full``.
    mu : float (default: 0.01)
        Proximal coefficient of the initiating stage (reconstructed).
    rank_init, target_rank : int (default: 12, 4)
        b_0 = rank_init x n_matrices, b_T = target_rank x n_matrices (AdaLoRA's init_r, target_r).
    warm_rounds, cool_rounds : int (default: 1, 1)
        Annealing rounds at b_0 first and at b_T last (AdaLoRA's tinit and tfinal, in rounds).
    orth_reg, beta1, beta2 : float (default: 0.1, 0.85, 0.85)
        Sent to clients: orthogonality-loss weight and the sensitivity EMA factors.

    State learned across rounds: ``adapter_`` (full-rank adapter + head; lambda = 0 at masked triplets),
    ``base_`` (the frozen backbone after a full initiating stage, else None), ``mask_``, ``scores_`` (the last
    averaged triplet scores), ``base_sent_`` (clients already holding ``base_``). ``slots_[0]`` is what the
    server evaluates: the stage-1 model, or ``base_`` plus the packed adapter.
    """

    name = "safedlora"

    def __init__(self, everything: State, rounds: int, init_rounds: int = 1, init_train: str = "full",
                 mu: float = 0.01, rank_init: int = 12, target_rank: int = 4, warm_rounds: int = 1,
                 cool_rounds: int = 1, orth_reg: float = 0.1, beta1: float = 0.85, beta2: float = 0.85):
        self.rounds, self.init_rounds, self.init_train, self.mu = rounds, init_rounds, init_train, mu
        self.rank_init, self.target_rank = rank_init, target_rank
        self.warm_rounds, self.cool_rounds = warm_rounds, cool_rounds
        self.client_config = {"beta1": beta1, "beta2": beta2, "orth_reg": orth_reg}
        self.adapter_keys = [k for k in everything if part_of(k) is not None]
        self.head_keys = [k for k in everything if k.startswith("classifier.")]
        self.base_keys = [k for k in everything if k not in self.adapter_keys and k not in self.head_keys]
        self.matrices = matrices_of(everything)
        self.b0, self.bT = rank_init * len(self.matrices), target_rank * len(self.matrices)
        self.adapter_ = {k: everything[k] for k in self.adapter_keys + self.head_keys}
        self.mask_ = full_mask(self.adapter_)
        self.base_: State | None = None
        self.scores_: dict[str, torch.Tensor] | None = None
        self.base_sent_: set[int] = set()
        self.resumed_ = False
        self.last_ = {}
        full_first = init_rounds > 0 and init_train == "full"
        self.entered_ = not full_first  # past the stage-1 model: slots_[0] is view()
        initial = {k: everything[k] for k in self.base_keys + self.head_keys} if full_first else self.view()
        super().__init__(initial, 1)

    # ---- stages and views ----------------------------------------------------------------------------
    def annealing(self, round_: int) -> bool:
        return round_ > self.init_rounds

    def budget_at(self, round_: int) -> int:
        """b(t) for a round of the annealing stage (b_0 during the initiating stage)."""
        if not self.annealing(round_):
            return self.b0
        return budget(round_ - self.init_rounds, self.rounds - self.init_rounds, self.b0, self.bT,
                      self.warm_rounds, self.cool_rounds)

    def view(self) -> State:
        """The global model as the server evaluates it: the frozen backbone (if any) + the packed adapter."""
        return {**(self.base_ or {}), **pack(self.adapter_, self.mask_)}

    # ---- configure -------------------------------------------------------------------------------------
    def configure(self, round_, client, key):
        if not self.annealing(round_):
            return Broadcast(self.slots_[0], {HOOK_PROXIMAL: self.mu} if self.mu > 0 else {})
        wire = pack(self.adapter_, self.mask_)
        if self.base_ is not None and (client not in self.base_sent_ or self.resumed_):
            # the backbone trained in the initiating stage reaches each client once; after a resume the in-process
            # clients share a freshly loaded model, so the first broadcast carries it again (counted again).
            wire = {**self.base_, **wire}
            self.base_sent_.add(client)
            self.resumed_ = False
        return Broadcast(wire, {HOOK_SVD_ANNEAL: dict(self.client_config)})

    def expected_spec(self, client: int, key: str, sent: Broadcast) -> Spec:
        """What comes back: what was sent, less the frozen backbone (never sent back)."""
        return spec_of({k: v for k, v in sent.state.items() if self.base_ is None or k not in self.base_})

    # ---- aggregate ------------------------------------------------------------------------------------
    def _aggregate(self, round_, subs):
        annealing = self.annealing(round_)
        adapter_stage = annealing or self.init_train == "lora"
        trained = int(sum(int(v.sum()) for v in self.mask_.values()))
        ranks = self._ranks()
        # the index tensors are the mask the server sent (the same for every client): never averaged
        stripped = [Submission(s.client, s.key, _no_index(s.state), s.num_examples,
                               {k: s.start[k] for k in _no_index(s.state)}, s.extras) for s in subs]
        assigned = self._merge(round_, stripped, [0] * len(subs))
        if adapter_stage:
            index = {k: v for k, v in pack(self.adapter_, self.mask_).items() if k.endswith(f".{INDEX}")}
            merged = {k: v for k, v in self.slots_[0].items() if k not in (self.base_ or {})}
            self.adapter_, _ = unpack({**merged, **index}, self.rank_init, into=self.adapter_)
        if annealing:
            self.scores_ = average_scores([s.extras for s in subs], [s.num_examples for s in subs], self.mask_)
            if round_ < self.rounds:  # the mask of the next round, at its budget
                self.mask_ = select_mask(self.scores_, self.mask_, self.budget_at(round_ + 1))
                self._zero_masked()
        if round_ == self.init_rounds and not annealing:
            self._enter_annealing()
        elif adapter_stage:
            self.slots_ = [self.view()]
        self.last_ = {"stage": "annealing" if annealing else "initiating",
                      "budget": trained if adapter_stage else None,
                      "active_rank": ranks if adapter_stage else None,
                      "next_budget": int(sum(int(v.sum()) for v in self.mask_.values()))}
        return assigned

    def _enter_annealing(self) -> None:
        if self.init_train == "full":
            merged = self.slots_[0]
            self.base_ = {k: merged[k] for k in self.base_keys}
            self.adapter_ = {**self.adapter_, **{k: merged[k] for k in self.head_keys}}
        self.entered_ = True
        self.slots_ = [self.view()]

    def _zero_masked(self) -> None:
        for m, keep in self.mask_.items():
            e = self.adapter_[f"{m}.lora_E"].clone()
            e[~keep] = 0.0
            self.adapter_[f"{m}.lora_E"] = e

    def _ranks(self) -> dict[str, int]:
        return {m: int(v.sum()) for m, v in self.mask_.items()}

    def round_metrics(self) -> dict:
        """stage, budget (active triplets trained this round), active_rank per matrix, next_budget."""
        return dict(self.last_)

    # ---- resume ---------------------------------------------------------------------------------------
    def state_dict(self):
        """``slot0/`` holds the global model in the layout the run started with (what the engine checks a
        checkpoint against): the stage-1 model while in that stage, then the frozen backbone + head, or (no
        full initiating stage) the full-rank adapter + head. ``adapter/`` (cloned), ``mask/`` and ``scores/``
        hold the rest; :meth:`load_state_dict` rebuilds ``slots_[0]`` (:meth:`view`) from them."""
        if not self.entered_:
            slot0 = self.slots_[0]
        elif self.base_ is not None:
            slot0 = {**self.base_, **{k: self.adapter_[k] for k in self.head_keys}}
        else:
            slot0 = pack(self.adapter_, full_mask(self.adapter_))
        tensors = {f"slot0/{k}": v for k, v in slot0.items()}
        tensors.update({f"adapter/{k}": v.clone() for k, v in self.adapter_.items()})
        tensors.update({f"mask/{m}": v.to(torch.uint8) for m, v in self.mask_.items()})
        tensors.update({f"scores/{m}": v for m, v in (self.scores_ or {}).items()})
        meta = {"assignment": [[c, k, s] for (c, k), s in sorted(self.assignment_.items())],
                "entered": self.entered_, "has_base": self.base_ is not None, "base_sent": sorted(self.base_sent_)}
        return tensors, meta

    def load_state_dict(self, tensors, meta):
        def group(prefix: str) -> dict[str, torch.Tensor]:
            return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}

        slot0 = group("slot0/")
        self.adapter_ = group("adapter/")
        self.mask_ = {m: v.bool() for m, v in group("mask/").items()}
        self.scores_ = group("scores/") or None
        self.entered_ = bool(meta["entered"])
        self.base_ = {k: slot0[k] for k in self.base_keys} if meta["has_base"] else None
        self.slots_ = [self.view() if self.entered_ else slot0]
        self.assignment_ = {(int(c), str(k)): int(s) for c, k, s in meta["assignment"]}
        self.base_sent_ = {int(c) for c in meta["base_sent"]}
        self.resumed_ = True


def _no_index(state: State) -> State:
    return {k: v for k, v in state.items() if not k.endswith(f".{INDEX}")}


def make_safedlora(cfg, everything: State, n_tasks: int = 0, lora_keys: list[str] | None = None) -> SAFedLoRA:
    """The strategy of ``method: safedlora`` from the run config and the model's initial parameters."""
    sa = cfg.safedlora
    return SAFedLoRA(everything, cfg.train.rounds, sa.init_rounds, sa.init_train, sa.mu, sa.rank_init,
                     sa.target_rank, sa.warm_rounds, sa.cool_rounds, sa.orth_reg, sa.beta1, sa.beta2)


def make_fedavg_full(cfg, everything: State, n_tasks: int = 0, lora_keys: list[str] | None = None) -> FedAvgFull:
    """The strategy of ``method: fedavg_full``: FedAvg of every parameter."""
    return FedAvgFull(everything)
