"""LoRA-input dropout whose masks are built from random bits: a quarter of the random draws torch's dropout makes.

``torch.nn.Dropout`` (peft's ``lora_dropout``) draws one Bernoulli per element, each from its own Mersenne-Twister
draw: about 5 ns an element on one core, 13% of a bf16 training step at the text5 default (``docs/performance.md``),
since every LoRA layer masks its whole ``[rows, width, d]`` input. :func:`keep_mask` draws one 64-bit word per four
elements instead and reads four 15-bit lanes out of it: an element is kept when its lane is at least
``cut = round(p * 2**15)``, so with probability ``1 - cut / 2**15`` (the configured ``p`` to within 2**-16), and kept
entries are scaled by ``2**15 / (2**15 - cut)`` so the layer's expected output is its input, as with ``F.dropout``.
The mask depends on the generator, the shape and ``p`` only, never on the dtype: a lone adapter's
:class:`MaskDropout` (global generator, seeded per job) and the shared-pass bank's per-block draws
(:meth:`fltac.models.bank.AdapterBank._dropout`, a generator per stream) give the same masks.

Chosen by ``lora.dropout_draw: bits`` (the default); ``bernoulli`` keeps peft's ``torch.nn.Dropout``.
"""

from __future__ import annotations

import math

import torch

#: Random bits per element; lanes are 16-bit with the top bit cleared.
LANE_BITS = 15
_LANES = 1 << LANE_BITS


def keep_cut(p: float) -> int:
    """Lanes below this value are dropped: ``round(p * 2**15)``."""
    return round(p * _LANES)


def keep_scale(p: float) -> float:
    """What kept entries are multiplied by: 1 / (the probability of keeping)."""
    return _LANES / (_LANES - keep_cut(p))


def keep_mask(shape: tuple[int, ...], p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """A bool mask of ``shape``, each entry True with probability ``1 - round(p * 2**15) / 2**15``, from
    ``ceil(numel / 4)`` 64-bit draws of ``generator`` (torch's default generator when None)."""
    n = math.prod(shape)
    words = torch.empty((n + 3) // 4, dtype=torch.int64).random_(generator=generator)  # 63 uniform bits each
    lanes = words.bitwise_and_(0x7FFF7FFF7FFF7FFF).view(torch.int16)[:n]
    return lanes.ge(keep_cut(p)).view(shape)


def apply_mask(x: torch.Tensor, keep: torch.Tensor, p: float) -> torch.Tensor:
    """``x`` with the entries ``keep`` drops zeroed and the kept ones scaled by :func:`keep_scale`, in x's dtype:
    the one expression a lone :class:`MaskDropout` and the shared-pass bank both compute, so their bytes agree."""
    return x * keep * torch.tensor(keep_scale(p), dtype=x.dtype, device=x.device)


class MaskDropout(torch.nn.Module):
    """Drop-in for ``torch.nn.Dropout(p)`` on a LoRA input, with masks from :func:`keep_mask` (global generator)."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        return apply_mask(x, keep_mask(tuple(x.shape), self.p).to(x.device), self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}, draws=bits"
