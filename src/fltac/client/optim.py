"""AdamW over adapters stacked along a leading axis, stepping only the adapters told to step.

The fast path (:mod:`fltac.models.bank`) keeps G adapters as tensors ``[G, *shape]``. In the routed layout
(``train.batching: routed``) an adapter whose task has no row in a client's step takes no optimizer step in
it: its weights and both AdamW moments stay bit-identical (a zero gradient would still move them through
the momentum), and its bias corrections count only its own steps, so each adapter needs its own step count.

:class:`StackedAdamW` is torch's AdamW (``torch.optim.AdamW``, the single-tensor implementation torch runs
on CPU) with the per-adapter quantities (step count, ``lr / (1 - beta1^t)``, ``sqrt(1 - beta2^t)``) as
float32 tensors broadcast over the adapter axis instead of Python scalars, and the same elementwise
operations in the same order; so an adapter that steps every time gets torch's numbers bit for bit
(``tests/test_routed.py``), and an adapter's numbers never depend on which other adapters share its stack.
"""

from __future__ import annotations

import torch


class StackedAdamW:
    """AdamW over ``params`` (each ``[G, *shape]``, with ``.grad`` after backward) with a per-adapter step mask.

    ``lr``, ``weight_decay``, ``betas`` and ``eps`` mean what they mean for ``torch.optim.AdamW``.
    """

    def __init__(self, params: list[torch.nn.Parameter], lr: float, weight_decay: float = 0.0,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        self.params = list(params)
        self.lr, self.weight_decay, self.eps = lr, weight_decay, eps
        self.beta1, self.beta2 = betas
        self.size = int(self.params[0].shape[0])
        self.exp_avg = [torch.zeros_like(p, memory_format=torch.preserve_format) for p in self.params]
        self.exp_avg_sq = [torch.zeros_like(p, memory_format=torch.preserve_format) for p in self.params]
        self.steps = [0] * self.size  #: optimizer steps each adapter has taken

    def step(self, active: list[bool] | None = None) -> None:
        """One AdamW step of every adapter ``g`` with ``active[g]`` (all when None); the others stay as they are."""
        active = [True] * self.size if active is None else list(active)
        if len(active) != self.size:
            raise ValueError(f"step mask of {len(active)} entries for {self.size} stacked adapters")
        if not any(active):
            return
        self.steps = [t + int(a) for t, a in zip(self.steps, active)]
        t = [max(n, 1) for n in self.steps]  # an adapter that never stepped: any finite value, it is masked out
        # Python doubles, as torch computes them, then cast to float32 as torch casts a scalar operand
        neg_step_size = torch.tensor([-(self.lr / (1 - self.beta1 ** n)) for n in t], dtype=torch.float32)
        bc2_sqrt = torch.tensor([(1 - self.beta2 ** n) ** 0.5 for n in t], dtype=torch.float32)
        mask = torch.tensor(active)
        with torch.no_grad():
            for p, m, v in zip(self.params, self.exp_avg, self.exp_avg_sq):
                shape = (self.size,) + (1,) * (p.dim() - 1)
                on = mask.view(shape).to(p.device)
                grad = p.grad if p.grad is not None else torch.zeros_like(p)
                new_p = p.mul(1 - self.lr * self.weight_decay) if self.weight_decay != 0 else p.clone()
                new_m = m.lerp(grad, 1 - self.beta1)
                new_v = v.mul(self.beta2).addcmul_(grad, grad, value=1 - self.beta2)
                denom = (new_v.sqrt() / bc2_sqrt.view(shape).to(p.device)).add_(self.eps)
                # torch: param.addcdiv_(exp_avg, denom, value=-step_size) = param + (-step_size * exp_avg) / denom
                new_p.addcdiv_(new_m * neg_step_size.view(shape).to(p.device), denom)
                p.copy_(torch.where(on, new_p, p))
                m.copy_(torch.where(on, new_m, m))
                v.copy_(torch.where(on, new_v, v))

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None
