"""Server optimizers on the pseudo-gradient: FedAvgM, FedAdam, FedYogi, FedAdagrad. Pure functions, no I/O.

Each round, for every slot (the one global adapter of FedIT, every cluster's adapter of FL-TAC), the
aggregation rule gives ``a_t`` from the slot's members and the slot served this round was ``x_{t-1}``. The
*pseudo-gradient* is ``d_t = a_t - x_{t-1}`` (the direction the clients moved, on average) and the optimizer
turns it into the new slot ``x_t``, entry by entry:

- FedAvgM (Hsu et al., arXiv 1909.06335): ``v_t = beta v_{t-1} + d_t``; ``x_t = x_{t-1} + lr v_t``.
  With ``beta = 0`` and ``lr = 1`` it is the aggregation rule itself.
- FedAdam, FedYogi, FedAdagrad (Reddi et al., "Adaptive Federated Optimization", arXiv 2003.00295,
  Algorithm 2): ``m_t = beta1 m_{t-1} + (1 - beta1) d_t`` and ``x_t = x_{t-1} + lr m_t / (sqrt(v_t) + tau)``, with
  Adam: ``v_t = beta2 v_{t-1} + (1 - beta2) d_t^2``; Yogi: ``v_t = v_{t-1} - (1 - beta2) d_t^2 sign(v_{t-1} - d_t^2)``;
  Adagrad: ``v_t = v_{t-1} + d_t^2``. As in the paper, no bias correction; ``m_0 = v_0 = 0`` (Flower's
  choice; the paper allows any ``v_0 >= tau^2``).

Defaults follow Flower's strategies of the same names (``flwr.serverapp.strategy``): FedAvgM lr 1 (with
momentum 0.9 here: Flower's 0 would make it plain FedAvg), FedAdam lr 0.1 / tau 1e-9, FedYogi lr 0.01 /
tau 1e-3, FedAdagrad lr 0.1 / tau 1e-9; beta1 0.9, beta2 0.99. Arithmetic in float64, the slot cast back
to its dtype; the state (``m``, ``v``) is kept in float64 so a resumed run continues bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fltac.server.aggregate import State

#: Optimizer -> (server learning rate, tau) used when the config leaves them null (Flower's defaults).
DEFAULTS = {"fedavgm": (1.0, 0.0), "fedadam": (0.1, 1e-9), "fedyogi": (0.01, 1e-3), "fedadagrad": (0.1, 1e-9)}
KINDS = tuple(DEFAULTS)


@dataclass(frozen=True)
class ServerOptimizer:
    """One of :data:`KINDS` with its hyperparameters (see the module docstring for the update rules).

    Parameters
    ----------
    kind : {'fedavgm', 'fedadam', 'fedyogi', 'fedadagrad'}
    lr : float
        Server learning rate (eta).
    momentum : float (default: 0.9)
        FedAvgM's beta.
    beta1, beta2 : float (default: 0.9, 0.99)
        First- and second-moment factors of the adaptive optimizers.
    tau : float
        Adaptivity (added to sqrt(v)) of the adaptive optimizers.
    """

    kind: str
    lr: float
    momentum: float = 0.9
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-9

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown server optimizer '{self.kind}' (known: {', '.join(KINDS)})")

    def step(self, served: State, aggregate: State, memory: State) -> tuple[State, State]:
        """(the new slot, the new optimizer memory) from the slot ``served`` this round, the rule's ``aggregate``
        and the memory of the previous rounds (``{}`` at first; keys ``m/<key>`` and ``v/<key>``)."""
        new, mem = {}, {}
        for k, x in served.items():
            d = aggregate[k].double() - x.double()
            if self.kind == "fedavgm":
                v = self.momentum * memory.get(f"v/{k}", torch.zeros_like(d)) + d
                new[k] = (x.double() + self.lr * v).to(x.dtype)
                mem[f"v/{k}"] = v
                continue
            m = self.beta1 * memory.get(f"m/{k}", torch.zeros_like(d)) + (1 - self.beta1) * d
            v = self.second_moment(memory.get(f"v/{k}", torch.zeros_like(d)), d * d)
            new[k] = (x.double() + self.lr * m / (v.sqrt() + self.tau)).to(x.dtype)
            mem[f"m/{k}"], mem[f"v/{k}"] = m, v
        return new, mem

    def second_moment(self, v: torch.Tensor, d2: torch.Tensor) -> torch.Tensor:
        """v_t from v_{t-1} and the squared pseudo-gradient d_t^2, by the optimizer's own rule."""
        if self.kind == "fedadam":
            return self.beta2 * v + (1 - self.beta2) * d2
        if self.kind == "fedyogi":
            return v - (1 - self.beta2) * d2 * torch.sign(v - d2)
        return v + d2  # fedadagrad
