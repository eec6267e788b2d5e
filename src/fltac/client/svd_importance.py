"""SA-FedLoRA's annealing stage on the client: AdaLoRA's smoothed sensitivity per rank-1 triplet, and
its orthogonality loss, on the active triplets of an SVD-form adapter (see :mod:`fltac.models.staged`).

Broadcast config ``{"svd_anneal": {"beta1": .., "beta2": .., "orth_reg": ..}}`` -> :class:`TripletImportance`.
The active triplets are those the broadcast state carries (``<matrix>.lora_index``); the model itself zeroes
the gradient of the others (:class:`~fltac.models.staged.StagedModel`), so they are neither trained nor sent.

Sensitivity (AdaLoRA, Zhang et al., arXiv 2303.10512, as peft's ``RankAllocator``), per entry of
Q = ``lora_A``, lambda = ``lora_E`` and P = ``lora_B``, after every backward pass:
``I = |w * grad|``, ``Ibar <- beta1 Ibar + (1 - beta1) I``, ``Ubar <- beta2 Ubar + (1 - beta2) |I - Ibar|``,
``s = Ibar * Ubar``; triplet score ``S_i = s(lambda_i) + mean_j s(Q_ij) + mean_j s(P_ji)``.
Reconstructed: the EMAs start at zero every round (clients keep no state between rounds, as with their
optimizer), and only the active triplets' scores are uploaded (``<matrix>.svd_score``, ascending index
order), for the server to average (:mod:`fltac.server.safedlora`).

The HAFL helper's :mod:`fltac.client.importance` computes the same EMA for plain LoRA (A, B) keys; the
triplet here also has lambda and its keys differ, hence this short separate hook.
"""

from __future__ import annotations

import torch

from fltac.client.hooks import HOOKS, Hook
from fltac.models.staged import INDEX, PARTS, matrices_of
from fltac.wire import HOOK_SVD_ANNEAL, SVD_SCORE


def triplet_scores(s_a: torch.Tensor, s_e: torch.Tensor, s_b: torch.Tensor) -> torch.Tensor:
    """``S_i = s(lambda_i) + mean_j s(Q_ij) + mean_j s(P_ji)`` from entry scores of Q [r, d_in], lambda [r, 1],
    P [d_out, r]."""
    return s_e.reshape(-1) + s_a.mean(dim=1) + s_b.mean(dim=0)


def orthogonality_loss(params: dict[str, torch.Tensor], active: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """AdaLoRA's regulariser over the active triplets: the mean over matrices and factors of
    ``||Q Q^T - I||_F`` and ``||P^T P - I||_F`` (Q, P restricted to the active rows / columns)."""
    terms = []
    for m, idx in active.items():
        if len(idx) == 0:
            continue
        q = params[f"{m}.lora_A"][idx.to(params[f"{m}.lora_A"].device)]
        p = params[f"{m}.lora_B"][:, idx.to(params[f"{m}.lora_B"].device)]
        for cov in (q @ q.T, p.T @ p):
            terms.append(torch.linalg.matrix_norm(cov - torch.eye(len(idx), device=cov.device, dtype=cov.dtype)))
    return torch.stack(terms).mean() if terms else None


class TripletImportance(Hook):
    """Sensitivity EMAs of the adapter's entries; one score per active triplet in ``extras``.

    Parameters
    ----------
    start : dict[str, Tensor]
        The packed broadcast: its ``<matrix>.lora_index`` tensors name the active triplets.
    beta1, beta2 : float (default: 0.85)
        EMA factors of the sensitivity and of its uncertainty.
    orth_reg : float (default: 0.1)
        Weight of :func:`orthogonality_loss`; 0 = off.
    """

    def __init__(self, start: dict[str, torch.Tensor], beta1: float = 0.85, beta2: float = 0.85,
                 orth_reg: float = 0.1):
        self.active = {m: start[f"{m}.{INDEX}"].long() for m in matrices_of(start)}
        self.beta1, self.beta2, self.orth_reg = float(beta1), float(beta2), float(orth_reg)
        self.ibar_: dict[str, torch.Tensor] = {}
        self.ubar_: dict[str, torch.Tensor] = {}

    def extra_loss(self, params):
        if self.orth_reg == 0.0:
            return None
        loss = orthogonality_loss(params, self.active)
        return None if loss is None else self.orth_reg * loss

    def after_backward(self, params):
        b1, b2 = self.beta1, self.beta2
        with torch.no_grad():
            for m in self.active:
                for part in PARTS:
                    k = f"{m}.{part}"
                    p = params[k]
                    if p.grad is None:
                        continue
                    ipt = (p.detach() * p.grad).abs().float().cpu()
                    ibar = b1 * self.ibar_.get(k, torch.zeros_like(ipt)) + (1 - b1) * ipt
                    self.ubar_[k] = b2 * self.ubar_.get(k, torch.zeros_like(ipt)) + (1 - b2) * (ipt - ibar).abs()
                    self.ibar_[k] = ibar

    def scores(self) -> dict[str, torch.Tensor]:
        """Per matrix, the scores of its active triplets (zeros before any step)."""
        out = {}
        for m, idx in self.active.items():
            s = {}
            for part in PARTS:
                k = f"{m}.{part}"
                s[part] = self.ibar_[k] * self.ubar_[k] if k in self.ibar_ else None
            if any(v is None for v in s.values()):
                out[m] = torch.zeros(len(idx))
            else:
                out[m] = triplet_scores(s["lora_A"], s["lora_E"], s["lora_B"])[idx].contiguous()
        return out

    def extras(self):
        return {f"{m}.{SVD_SCORE}": s.to(torch.float32) for m, s in self.scores().items()}


HOOKS[HOOK_SVD_ANNEAL] = lambda value, start: TripletImportance(start, value.get("beta1", 0.85), value.get("beta2", 0.85),
                                                             value.get("orth_reg", 0.1))
