"""Where a round's wall time goes: a process-global, off-by-default stopwatch per phase of the product's own code.

The engine and the client code wrap their steps in ``with phase("forward"):`` and the like (:data:`PHASES`).
Off (the default), :func:`phase` returns one shared no-op context: a global read and a function call per
use, nothing timed. :func:`enable` turns it on for the process; :func:`collect` then returns the seconds
accumulated per phase so far (every phase of :data:`PHASES` present, 0.0 when not met).

Nesting: **exclusive accounting**. Each instant is charged to the innermost open phase only: entering a
phase pauses the one around it, leaving it resumes the outer one. So phases never double count, their sum is
the time spent inside any phase (at most the wall time that covers them), and an outer phase reports only
its own work; e.g. the adapter loads inside ``evaluation`` count as ``adapter_state``, the rest of the
evaluation as ``evaluation``. Re-entering the phase already open (a helper timed on its own and inside the
same phase) is simply more of that phase.

Valid where the code it times is synchronous: on CPU, torch runs every op before returning, so the wall
clock around ``forward`` or ``backward`` is their cost. On a GPU the deltas would be launch times unless
the device were synchronised at each boundary (not done: phases are for the CPU benchmark). One thread:
the accumulator is not locked.
"""

from __future__ import annotations

import time
from contextlib import nullcontext

#: The phases the code reports, in the order a breakdown lists them; ``other`` (round wall time minus their
#: sum) is added by whoever knows the round's wall time (:class:`fltac.engines.inprocess.InProcessEngine`).
PHASES = (
    "batches",        # sampling rows, routing them to adapters, padding and collating token tensors
    "forward",        # the backbone + LoRA forward and the loss
    "backward",       # autograd through the frozen backbone into the LoRA and head parameters
    "optimizer",      # AdamW steps and clearing gradients
    "adapter_state",  # adapters into the model or the bank, trained states read back, state copies
    "screening",      # the server's checks of every submission (reliability.validate)
    "aggregation",    # the strategy's aggregation (clustering, FedAvg) and its cluster records
    "evaluation",     # scoring adapters on the test samples (its adapter loads count as adapter_state)
    "writes",         # metrics, adapters, submissions and checkpoint files
)

#: The clock; a test may replace it to check the accounting without sleeping.
clock = time.perf_counter

_enabled = False
_totals: dict[str, float] = {}
_stack: list[str] = []  # the open phases, innermost last
_since = 0.0            # when the innermost open phase was last (re)started
_OFF = nullcontext()


def enabled() -> bool:
    return _enabled


def enable(on: bool = True) -> None:
    """Turn timing on (or off) for this process; the totals are kept (see :func:`reset`)."""
    global _enabled
    _enabled = on


def reset() -> None:
    """Forget every total (phases still open keep timing from now)."""
    global _since
    _totals.clear()
    _since = clock()


def collect() -> dict[str, float]:
    """Seconds spent in each phase since the last :func:`reset`: every name of :data:`PHASES` (0.0 if not met),
    then any other name used. The phase open now, if any, is counted up to this call."""
    totals = dict(_totals)
    if _stack:
        totals[_stack[-1]] = totals.get(_stack[-1], 0.0) + clock() - _since
    return {**{name: totals.pop(name, 0.0) for name in PHASES}, **totals}


class _Phase:
    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name

    def __enter__(self) -> None:
        global _since
        now = clock()
        if _stack:  # pause the enclosing phase: this time is ours
            _totals[_stack[-1]] = _totals.get(_stack[-1], 0.0) + now - _since
        _stack.append(self.name)
        _since = now

    def __exit__(self, *exc) -> None:
        global _since
        now = clock()
        _totals[self.name] = _totals.get(self.name, 0.0) + now - _since
        _stack.pop()
        _since = now  # the enclosing phase, if any, resumes


def phase(name: str):
    """A context that charges its time to ``name`` (exclusive of phases opened inside it) when timing is on;
    a shared no-op context when it is off."""
    return _Phase(name) if _enabled else _OFF


def breakdown(before: dict[str, float], after: dict[str, float], wall: float) -> dict[str, float]:
    """Seconds per phase between two :func:`collect` snapshots that ``wall`` seconds of wall time enclose, and
    ``other``: the part of ``wall`` in no phase (the phases never overlap, so they and ``other`` sum to ``wall``)."""
    spent = {name: after[name] - before.get(name, 0.0) for name in after}
    return {**spent, "other": wall - sum(spent.values())}
