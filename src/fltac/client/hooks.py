"""Per-method terms of the one local loop, each a few lines: extra loss, after-backward, after-step.

A strategy's :class:`~fltac.wire.Broadcast` carries a plain ``config`` dict next to the
start adapter; :func:`make_hooks` turns it into hooks, so the client never imports a strategy class
(as Flower's FedProx sends ``proximal-mu`` in the round config). Hooks may leave results for the
server in ``extras`` (tensors sent beside the adapter, e.g. importance scores).
"""

from __future__ import annotations

import torch


class Hook:
    """No-op base: override what the method needs."""

    def extra_loss(self, params: dict[str, torch.nn.Parameter]) -> torch.Tensor | None:
        return None

    def after_backward(self, params: dict[str, torch.nn.Parameter]) -> None:
        pass

    def after_step(self, params: dict[str, torch.nn.Parameter]) -> None:
        pass

    def extras(self) -> dict[str, torch.Tensor]:
        return {}

    def outgoing(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """What of the trained adapter is sent: all of it, unless the method uploads a part (e.g. HAFL)."""
        return state


#: Broadcast config key -> hook factory(value, start adapter). Methods register theirs here.
HOOKS: dict[str, callable] = {}


def make_hooks(config: dict, start: dict[str, torch.Tensor]) -> list[Hook]:
    unknown = sorted(set(config) - set(HOOKS))
    if unknown:
        raise ValueError(f"broadcast config has keys no client hook understands: {unknown}")
    return [HOOKS[k](v, start) for k, v in sorted(config.items())]


# Hook modules register themselves in HOOKS on import (kept last: they import Hook from here).
from fltac.client import importance  # noqa: E402,F401  (hafl_importance, hafl_train_only)
from fltac.client import proximal, svd_importance  # noqa: E402,F401  (proximal_mu, svd_anneal)
