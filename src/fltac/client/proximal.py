"""The proximal term of FedProx (Li et al., arXiv 1812.06127), used by SA-FedLoRA's initiating stage.

Broadcast config ``{"proximal_mu": mu}`` -> :class:`Proximal`: the local loss gets
``mu / 2 * sum_k ||w_k - w_global,k||^2`` over every trained tensor ``k`` (the whole backbone and head
when the backbone is trained, the adapter and head otherwise), whose gradient is ``mu * (w - w_global)``.
``w_global`` is the state the client was sent.
"""

from __future__ import annotations

import torch

from fltac.client.hooks import HOOKS, Hook
from fltac.wire import HOOK_PROXIMAL


class Proximal(Hook):
    """``mu / 2 * ||w - w_global||^2`` added to the local loss.

    Parameters
    ----------
    mu : float
        The coefficient; 0 adds nothing.
    start : dict[str, Tensor]
        The global state the client was sent; every trained tensor must be in it, with its shape.
    """

    def __init__(self, mu: float, start: dict[str, torch.Tensor]):
        self.mu = float(mu)
        self.start = start
        self._on_device: dict[str, torch.Tensor] = {}

    def anchor(self, key: str, p: torch.Tensor) -> torch.Tensor:
        if key not in self._on_device:
            if key not in self.start or tuple(self.start[key].shape) != tuple(p.shape):
                raise ValueError(f"proximal term: the broadcast has no tensor '{key}' of shape {tuple(p.shape)}")
            self._on_device[key] = self.start[key].to(p.device, p.dtype)
        return self._on_device[key]

    def extra_loss(self, params):
        if self.mu == 0.0:
            return None
        total = sum(((p - self.anchor(k, p)) ** 2).sum() for k, p in params.items())
        return 0.5 * self.mu * total


HOOKS[HOOK_PROXIMAL] = lambda value, start: Proximal(value, start)
