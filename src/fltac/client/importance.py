"""Rank-1 components of LoRA adapters: sensitivity scores (an EMA of |w * grad|) and training only some of them.

A LoRA update is a sum of rank-1 matrices, ``dW = B A = sum_i b_i a_i^T`` with ``b_i = B[:, i]`` (column
``i`` of ``lora_B``, shape ``[d_out, r]``) and ``a_i = A[i, :]`` (row ``i`` of ``lora_A``, shape ``[r, d_in]``).
Component ``i`` of one adapted module is the pair (``B[:, i]``, ``A[i, :]``); a module is named by the
adapter-state key up to ``.lora_A.weight``.

Two hooks, set from the broadcast config (see :mod:`fltac.client.hooks`):

- ``hafl_importance`` -> :class:`ImportanceEMA`: after every backward pass, ``I = |w * grad|`` per entry and
  ``Ibar <- beta Ibar + (1 - beta) I`` (and, as an option, AdaLoRA's uncertainty
  ``Ubar <- beta Ubar + (1 - beta) |I - Ibar|``, score ``Ibar * Ubar``). The component score sums (or averages)
  the entries of ``B[:, i]`` and ``A[i, :]``. Sent to the server in ``extras`` as ``<module>.hafl_score``.
- ``hafl_train_only`` -> :class:`TrainOnly`: only the listed components train (the others' gradients are
  zeroed, and after each optimizer step their values are put back, so AdamW's weight decay cannot move
  them either); the upload is cut to those components (``lora_A`` rows, ``lora_B`` columns) with their
  indices as ``<module>.hafl_idx``, so the uplink byte count is what a real client would send.

Scores are computed from the gradient *before* it is masked (hooks run in sorted key order,
``hafl_importance`` before ``hafl_train_only``): a frozen component's sensitivity is still measured.
"""

from __future__ import annotations

import torch

from fltac.client.hooks import HOOKS, Hook
from fltac.wire import A_SUFFIX, B_SUFFIX, HOOK_IMPORTANCE, HOOK_TRAIN_ONLY, IDX, SCORE, lora_modules


def component_scores(entry_scores: dict[str, torch.Tensor], reduce: str = "sum") -> dict[str, torch.Tensor]:
    """Per module, the score of each rank-1 component from per-entry scores of its ``lora_A`` / ``lora_B``.

    ``sum``: ``S_i = sum_j s(B_ji) + sum_j s(A_ij)``; ``mean``: the same with means
    (the reconstructed alternative, docs/hafl.md).
    """
    red = torch.sum if reduce == "sum" else torch.mean
    return {m: red(entry_scores[m + B_SUFFIX], dim=0) + red(entry_scores[m + A_SUFFIX], dim=1)
            for m in lora_modules(entry_scores)}


class ImportanceEMA(Hook):
    """Smoothed sensitivity of every LoRA entry, reduced to one score per rank-1 component.

    Parameters
    ----------
    beta : float (default: 0.85)
        EMA factor; the EMA starts at zero in every round (the client keeps no optimizer state either).
    uncertainty : bool (default: False)
        Reconstructed option (AdaLoRA, as peft's ``RankAllocator``): multiply by the EMA of ``|I - Ibar|``.
    reduce : {'sum', 'mean'}
        How a component's entries are gathered (:func:`component_scores`).
    send : dict[str, list[int]] | None
        Per module, the components whose scores are uploaded (a truncated client only holds those);
        None = all of them.
    """

    def __init__(self, beta: float = 0.85, uncertainty: bool = False, reduce: str = "sum",
                 send: dict[str, list[int]] | None = None):
        self.beta = beta
        self.uncertainty = uncertainty
        self.reduce = reduce
        self.send = send
        self.ibar_: dict[str, torch.Tensor] = {}
        self.ubar_: dict[str, torch.Tensor] = {}
        self.steps_ = 0

    def after_backward(self, params):
        b = self.beta
        with torch.no_grad():
            for k, p in params.items():
                if not k.endswith((A_SUFFIX, B_SUFFIX)) or p.grad is None:
                    continue
                ipt = (p.detach() * p.grad).abs().float().cpu()
                ibar = self.ibar_.get(k, torch.zeros_like(ipt))
                self.ibar_[k] = b * ibar + (1 - b) * ipt
                if self.uncertainty:
                    ubar = self.ubar_.get(k, torch.zeros_like(ipt))
                    self.ubar_[k] = b * ubar + (1 - b) * (ipt - self.ibar_[k]).abs()
        self.steps_ += 1

    def entry_scores(self) -> dict[str, torch.Tensor]:
        if self.uncertainty:
            return {k: v * self.ubar_[k] for k, v in self.ibar_.items()}
        return dict(self.ibar_)

    def scores(self) -> dict[str, torch.Tensor]:
        """Per module, a ``[r]`` tensor: the score of every component."""
        return component_scores(self.entry_scores(), self.reduce)

    def extras(self):
        out = {}
        for m, s in self.scores().items():
            idx = None if self.send is None else torch.tensor(self.send[m], dtype=torch.long)
            out[m + SCORE] = (s if idx is None else s[idx]).to(torch.float32).contiguous()
        return out


class TrainOnly(Hook):
    """Train only the listed rank-1 components of each module; upload only those, with their indices.

    Parameters
    ----------
    components : dict[str, list[int]]
        Per module, the indices (ascending, into the rank-R adapter) that this client trains.
    start : dict[str, Tensor]
        The adapter the client was sent: the frozen entries are kept at these values.
    """

    def __init__(self, components: dict[str, list[int]], start: dict[str, torch.Tensor]):
        self.components = {m: sorted(int(i) for i in idx) for m, idx in components.items()}
        self.frozen: dict[str, torch.Tensor] = {}  # key -> bool mask of entries that must not move
        self.start = start
        for m, idx in self.components.items():
            a, b = start[m + A_SUFFIX], start[m + B_SUFFIX]
            keep = torch.zeros(a.shape[0], dtype=torch.bool)
            keep[idx] = True
            self.frozen[m + A_SUFFIX] = (~keep)[:, None].expand_as(a)
            self.frozen[m + B_SUFFIX] = (~keep)[None, :].expand_as(b)

    def after_backward(self, params):
        with torch.no_grad():
            for k, mask in self.frozen.items():
                g = params[k].grad
                if g is not None:
                    g.masked_fill_(mask.to(g.device), 0.0)

    def after_step(self, params):
        with torch.no_grad():
            for k, mask in self.frozen.items():
                p = params[k]
                p.copy_(torch.where(mask.to(p.device), self.start[k].to(p.device, p.dtype), p))

    def outgoing(self, state):
        out = dict(state)
        for m, idx in self.components.items():
            i = torch.tensor(idx, dtype=torch.long)
            out[m + A_SUFFIX] = state[m + A_SUFFIX][i].contiguous()
            out[m + B_SUFFIX] = state[m + B_SUFFIX][:, i].contiguous()
        return out

    def extras(self):
        return {m + IDX: torch.tensor(idx, dtype=torch.int32) for m, idx in self.components.items()}


HOOKS[HOOK_IMPORTANCE] = lambda value, start: ImportanceEMA(
    value.get("beta", 0.85), value.get("uncertainty", False), value.get("reduce", "sum"), value.get("send"))
HOOKS[HOOK_TRAIN_ONLY] = lambda value, start: TrainOnly(value, start)
