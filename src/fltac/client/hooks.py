"""Per-method terms of the one local loop, each a few lines: extra loss, after-backward, after-step.

A strategy's :class:`~fltac.server.strategies.Broadcast` carries a plain ``config`` dict next to the
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


#: Broadcast config key -> hook factory(value, start adapter). Methods register theirs here.
HOOKS: dict[str, callable] = {}


def make_hooks(config: dict, start: dict[str, torch.Tensor]) -> list[Hook]:
    unknown = sorted(set(config) - set(HOOKS))
    if unknown:
        raise ValueError(f"broadcast config has keys no client hook understands: {unknown}")
    return [HOOKS[k](v, start) for k, v in sorted(config.items())]
