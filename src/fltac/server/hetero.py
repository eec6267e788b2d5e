"""FLoRA and FlexLoRA: heterogeneous client ranks r_k <= R aggregated as the products ``B_k A_k``, not factor by factor.

FLoRA: Wang et al., "FLoRA: Federated Fine-Tuning Large Language Models with Heterogeneous Low-Rank Adaptations",
NeurIPS 2024, arXiv 2409.05976. FlexLoRA: Bai et al., "Federated Fine-tuning of Large Language Models under
Heterogeneous Tasks and Client Resources", NeurIPS 2024, arXiv 2402.11505.

Both are variants of :class:`~fltac.server.hafl.HAFL` (the same client hooks: a client trains and uploads
only its components, ``hafl_train_only``; the same head FedAvg), each overriding what it changes.

**Stacking** (:func:`stack_factors`). With ``p_k = n_k / sum n`` and the uploads ``B_k [d_out, r_k]``,
``A_k [r_k, d_in]``: ``B_s = [p_1 B_1, p_2 B_2, ...]`` (columns), ``A_s = [A_1; A_2; ...]`` (rows), so
``B_s A_s = sum_k p_k B_k A_k`` exactly: the weighted mean of the products, whatever the ranks (averaging A
and B separately gives ``(sum p B)(sum p A)``, which has cross terms ``p_j p_k B_j A_k``).

**Compression** (:func:`svd_factors`). The adapter of a run has one rank R for every client (the model is
built once; adapters are tensors swapped into it), so a product of rank up to ``sum r_k`` is stored as its
best rank-r approximation (Eckart-Young), computed from the factors without forming ``dW``: QR of ``B_s``
and ``A_s^T``, SVD of the small core. Components come out in order of singular value, so the first r_k of
them are the best rank-r_k approximation too. Split (``hafl.svd_split``): ``us`` gives ``B = U_r S_r``,
``A = V_r^T`` (our reading of FlexLoRA's released code; the paper writes only ``U S V^T``), ``sqrt``
gives ``B = U_r S_r^(1/2)``, ``A = S_r^(1/2) V_r^T``. The LoRA scaling alpha / R is the same on every client,
so a product means the same everywhere.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from fltac.server.hafl import HAFL, Part, client_ranks, truncate
from fltac.wire import A_SUFFIX, B_SUFFIX, State

def stack_factors(parts: list[Part], weights: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 ``(B_s, A_s)`` of one module with ``B_s A_s = sum_k p_k B_k A_k``, ``p_k = w_k / sum w``."""
    total = float(sum(weights))
    if not parts or total <= 0 or min(weights) < 0:
        raise ValueError(f"need parts and non-negative weights with a positive sum, got {weights}")
    b = torch.cat([part[2].double() * (w / total) for part, w in zip(parts, weights)], dim=1)
    a = torch.cat([part[1].double() for part in parts], dim=0)
    return b, a


def svd_factors(b: torch.Tensor, a: torch.Tensor, r: int, split: str = "us") -> tuple[torch.Tensor, torch.Tensor,
                                                                                          torch.Tensor]:
    """``(B_r [d_out, r], A_r [r, d_in], s)``: the best rank-r approximation ``B_r A_r`` of ``b @ a`` (float64)
    and all singular values ``s`` of ``b @ a`` (descending). Components past ``len(s)`` (the inner size) are zero.

    ``b = Q_b R_b``, ``a^T = Q_a R_a``, ``R_b R_a^T = u diag(s) vh``: then ``b a = (Q_b u) diag(s) (Q_a vh^T)^T``.
    """
    if split not in ("us", "sqrt"):
        raise ValueError(f"unknown SVD split '{split}' (us, sqrt)")
    qb, rb = torch.linalg.qr(b.double())
    qa, ra = torch.linalg.qr(a.double().T)
    u, s, vh = torch.linalg.svd(rb @ ra.T)
    keep = min(r, len(s))
    big_u, big_vt = qb @ u[:, :keep], vh[:keep] @ qa.T
    # sign convention (as sklearn's svd_flip): each U column's largest entry is positive, so the factors do not
    # depend on which of the two signs LAPACK returns (e.g. for the same product stacked in another order)
    sign = torch.sign(big_u.gather(0, big_u.abs().argmax(0, keepdim=True)))[0]
    sign[sign == 0] = 1
    big_u, big_vt = big_u * sign[None, :], big_vt * sign[:, None]
    left, right = (s[:keep], torch.ones_like(s[:keep])) if split == "us" else (s[:keep].sqrt(), s[:keep].sqrt())
    out_b = torch.zeros(b.shape[0], r, dtype=torch.float64)
    out_a = torch.zeros(r, a.shape[1], dtype=torch.float64)
    out_b[:, :keep] = big_u * left[None, :]
    out_a[:keep] = right[:, None] * big_vt
    return out_b, out_a, s


def null_components(s: torch.Tensor, r: int, shape: tuple[int, int]) -> list[int]:
    """Indices ``< r`` of the components past the numerical rank of the product of singular values ``s`` and
    ``shape``: ``s_i <= max(shape) x eps x s_0`` (numpy's matrix_rank rule), or all of them when ``s_0`` is 0."""
    tol = max(shape) * torch.finfo(torch.float64).eps * (float(s[0]) if len(s) else 0.0)
    rank = int((s > tol).sum()) if len(s) and float(s[0]) > 0 else 0
    return list(range(min(rank, r), r))


def discarded_fraction(s: torch.Tensor, r: int) -> float:
    """``||dW - dW_r||_F / ||dW||_F`` for the rank-r truncation (0 for a zero ``dW``)."""
    total = float((s.double() ** 2).sum())
    return 0.0 if total == 0 else math.sqrt(float((s[r:].double() ** 2).sum()) / total)


def fresh_rows(n: int, d_in: int, seed: int, *stream: int) -> torch.Tensor:
    """``[n, d_in]`` float32 rows of a new ``lora_A`` as peft initialises it (``kaiming_uniform_(a=sqrt(5))``:
    uniform on +-1/sqrt(d_in)), from a generator seeded by ``(seed, *stream)``."""
    g = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, *stream]).generate_state(1)[0]))
    bound = 1.0 / math.sqrt(d_in)
    return (torch.rand(n, d_in, generator=g, dtype=torch.float64) * 2 - 1).mul(bound).float()


class FlexLoRA(HAFL):
    """FlexLoRA (arXiv 2402.11505): the server averages the products, client k gets their rank-r_k SVD truncation.

    Per round, client k is sent the first r_k components of the global rank-R adapter (HetLoRA's selection;
    the components are ordered by singular value, so that is the best rank-r_k approximation of the global
    update, and a client at rank ``>= rank(dW)`` gets ``dW`` exactly), trains them and uploads them. The
    server forms ``dW = sum_k p_k B_k A_k`` (:func:`stack_factors`, exact) and stores its rank-R truncated
    SVD (:func:`svd_factors`, split ``svd_split``) as the new global adapter. A component past the rank of
    ``dW`` (e.g. in round 1 only a few clients reported) would be zero in both A and B, so no gradient
    could ever reach it; it gets fresh peft-initialised A rows (seeded by ``(seed, round, module)``) and a
    zero B column instead, which leaves ``dW`` unchanged (reconstructed detail: the paper's rank-``sum r_k``
    products leave no such gap in practice). The head is sample-weighted FedAvg, as for HAFL.

    Learned state: ``slots_[0]`` only (the SVD factors).
    """

    name = "flexlora"

    def __init__(self, initial: State, client_ranks: dict[int, int], seed: int, split: str = "us"):
        super().__init__(initial, client_ranks, "truncate", "svd", "first")
        self.seed = seed
        self.split = split
        self.discarded_: float = 0.0

    def sent_state(self, round_, client, key, comps):
        """The global adapter cut to its first r_k components, for every client (one it has not met too)."""
        return truncate(self.slots_[0], comps)

    def merge_lora(self, round_, current, uploads, weights, component_weights):
        out = dict(current)
        worst = 0.0
        for i, m in enumerate(self.modules):
            b, a, s = svd_factors(*stack_factors([up[m] for up in uploads], weights), self.rank, self.split)
            null = null_components(s, self.rank, (b.shape[0], a.shape[1]))
            if null:
                b[:, null] = 0
                a[null] = fresh_rows(len(null), a.shape[1], self.seed, round_, i).double()
            worst = max(worst, discarded_fraction(s, self.rank))
            out[m + A_SUFFIX] = a.to(current[m + A_SUFFIX].dtype)
            out[m + B_SUFFIX] = b.to(current[m + B_SUFFIX].dtype)
        self.discarded_ = worst
        return out

    def round_metrics(self) -> dict:
        """``svd_discarded``: the largest ``||dW - dW_R||_F / ||dW||_F`` over the modules this round."""
        return {"svd_discarded": self.discarded_}


class FLoRA(HAFL):
    """FLoRA (arXiv 2409.05976): stacked, noise-free aggregation; every round each client trains a fresh LoRA.

    In the paper the server sends the stacked factors ``B_s, A_s`` (rank ``sum r_k``), every client merges
    ``B_s A_s`` into its own copy of the base weights and starts a new LoRA module. Here the backbone is one
    frozen model shared by all simulated clients (and loaded once per Flower client), and an adapter has
    the run's rank R, so the merged update lives *inside* the rank-R adapter as a frozen residual:

    - components ``0 .. R_res - 1`` (``R_res = R - max_k r_k``) hold the global update so far, the
      residual; every client receives them and does not train them (``hafl_train_only`` leaves them as
      sent), so it trains on ``W_0 + residual``, FLoRA's merged base weights.
    - client k trains ``r_k`` fresh components ``R_res .. R_res + r_k - 1``: A rows initialised as peft does
      (seeded by ``(seed, round, client, module)``), B columns zero, so its adapter starts at the residual
      exactly, as a fresh LoRA on merged weights does. It uploads only them.
    - the server stacks the residual (weight 1) with the clients' ``p_k B_k, A_k`` and stores the result
      as the new residual: its best rank-``R_res`` approximation (:func:`svd_factors`). This is exact while
      the global update has rank ``<= R_res`` (each round adds up to ``sum r_k``); beyond that, the
      truncation's relative error is reported as ``svd_discarded`` in each round's metrics. The round's
      aggregate itself is noise-free (no cross terms), which is the paper's point.

    The alternatives were (a) an adapter whose rank grows by ``sum r_k`` every round (the paper's exact
    accumulation, which needs a model rebuilt each round) and (b) a dense per-module residual merged into
    the shared backbone (a second model state to broadcast and keep per client): neither fits one fixed
    adapter layout. The downlink is the rank-R adapter (the paper's is the stacked factors, ``sum r_k``
    components); the uplink is each client's ``r_k`` components, their indices and the head. The global
    model evaluated is ``W_0 + residual`` (the fresh components are zero in the stored adapter).

    Learned state: ``slots_[0]`` only (residual + zero components).
    """

    name = "flora"

    def __init__(self, initial: State, client_ranks: dict[int, int], seed: int, split: str = "us"):
        super().__init__(initial, client_ranks, "freeze", "stack", "first")
        self.seed = seed
        self.split = split
        self.residual_rank = self.rank - max(client_ranks.values())
        if self.residual_rank < 1:
            raise ValueError(f"FLoRA needs R > max r_k (room for the residual): R = {self.rank}, "
                             f"max r_k = {max(client_ranks.values())}")
        self.discarded_: float = 0.0

    def components(self, client: int) -> dict[str, list[int]]:
        """Client k's fresh components: ``R_res .. R_res + r_k - 1`` of every module."""
        first = self.residual_rank
        return {m: list(range(first, first + self.client_ranks[client])) for m in self.modules}

    def sent_state(self, round_, client, key, comps):
        """The residual (global adapter) with client k's fresh components: peft-initialised A rows, zero B."""
        state = dict(self.slots_[0])
        for i, m in enumerate(self.modules):
            idx = comps[m]
            a, b = state[m + A_SUFFIX].clone(), state[m + B_SUFFIX].clone()
            a[idx] = fresh_rows(len(idx), a.shape[1], self.seed, round_, client, i).to(a.dtype)
            b[:, idx] = 0
            state[m + A_SUFFIX], state[m + B_SUFFIX] = a, b
        return state

    def merge_lora(self, round_, current, uploads, weights, component_weights):
        out = dict(current)
        worst = 0.0
        res = list(range(self.residual_rank))
        for m in self.modules:
            a0, b0 = current[m + A_SUFFIX], current[m + B_SUFFIX]
            b_new, a_new = stack_factors([up[m] for up in uploads], weights)
            b = torch.cat([b0[:, res].double(), b_new], dim=1)
            a = torch.cat([a0[res].double(), a_new], dim=0)
            b_r, a_r, s = svd_factors(b, a, self.residual_rank, self.split)
            worst = max(worst, discarded_fraction(s, self.residual_rank))
            new_a, new_b = torch.zeros_like(a0), torch.zeros_like(b0)
            new_a[res], new_b[:, res] = a_r.to(a0.dtype), b_r.to(b0.dtype)
            out[m + A_SUFFIX], out[m + B_SUFFIX] = new_a, new_b
        self.discarded_ = worst
        return out

    def round_metrics(self) -> dict:
        """``svd_discarded``: the largest ``||residual - residual_R_res||_F / ||residual||_F`` over the modules."""
        return {"svd_discarded": self.discarded_}


def make_flexlora(cfg, initial: State, n_tasks: int = 0, lora_keys: list[str] | None = None) -> FlexLoRA:
    """The strategy of ``method: flexlora`` (client ranks and the SVD split from section hafl)."""
    return FlexLoRA(initial, client_ranks(cfg), cfg.seed, cfg.hafl.svd_split)


def make_flora(cfg, initial: State, n_tasks: int = 0, lora_keys: list[str] | None = None) -> FLoRA:
    """The strategy of ``method: flora`` (client ranks and the SVD split from section hafl)."""
    return FLoRA(initial, client_ranks(cfg), cfg.seed, cfg.hafl.svd_split)
