"""What travels between server and client, named once: both sides import this module, neither imports the other.

- :class:`Broadcast`: what the server sends for one (client, key): a start adapter and plain hook settings
  (``config``, keyed by the ``HOOK_*`` names below; the client turns them into hooks, :mod:`fltac.client.hooks`).
- :class:`Upload`: what a client sends back for one adapter: its key, the trained tensors (possibly only a
  part, e.g. HAFL's rows), its sample count and extra tensors (scores, indices).
- :class:`Submission`: an upload as the server holds it: with the client's id and the start it was sent.
- :class:`Mean`: a round's uploads as secure aggregation hands them to the server: only their sample-weighted
  mean, with who took part.
- Key suffixes and score names of the tensors the methods put on the wire.

A job's key (``a0``, ``a1``, ...) is the client's own name for one of its adapters; the server treats it as
opaque. :func:`job_key` is the one place that spells it.

Imports nothing at run time (not even torch): the config and the registry may use it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

#: An adapter state: tensor name -> tensor.
State = dict[str, "torch.Tensor"]

# ---- tensor names on the wire -----------------------------------------------------------------------

#: A LoRA module's factors in a plain LoRA adapter state (``<module>.lora_A.weight``, ``<module>.lora_B.weight``).
A_SUFFIX = ".lora_A.weight"
B_SUFFIX = ".lora_B.weight"
#: HAFL / HetLoRA extras: the indices of the rank-1 components a client uploads, and their importance scores.
IDX = ".hafl_idx"
SCORE = ".hafl_score"
#: SA-FedLoRA extras: ``<matrix>.svd_score``, one sensitivity score per active triplet.
SVD_SCORE = "svd_score"

# ---- hook settings a broadcast may carry (Broadcast.config keys) -----------------------------------------

#: HAFL: per module, the component indices the client trains (and uploads).
HOOK_TRAIN_ONLY = "hafl_train_only"
#: HAFL: settings of the client's component-importance EMA (beta, uncertainty, reduce, send).
HOOK_IMPORTANCE = "hafl_importance"
#: SA-FedLoRA's initiating stage: FedProx's proximal coefficient mu.
HOOK_PROXIMAL = "proximal_mu"
#: SA-FedLoRA's annealing stage: triplet sensitivity EMA and orthogonality loss (beta1, beta2, orth_reg).
HOOK_SVD_ANNEAL = "svd_anneal"


def is_lora_key(key: str) -> bool:
    """Whether ``key`` names a LoRA factor (``lora_A`` / ``lora_B``) of a plain LoRA adapter state."""
    return ".lora_A." in key or ".lora_B." in key


def frozen_keys(keys, freeze_A: bool) -> list[str]:
    """The tensors clients never train and never upload: every ``lora_A`` under FFA-LoRA (``lora.freeze_A``),
    else none. The server puts back the ``lora_A`` it sent (identical for every client of a slot)."""
    return [k for k in keys if k.endswith(A_SUFFIX)] if freeze_A else []


def with_frozen(state: State, sent: State, freeze_A: bool) -> State:
    """An upload as the server merges it: the :func:`frozen_keys` the client left out put back from the adapter
    it was sent (FFA-LoRA's shared ``lora_A``; copies: safetensors refuses to save tensors sharing memory), in the
    sent adapter's key order; other uploads as they are."""
    missing = {k for k in frozen_keys(sent, freeze_A) if k not in state}
    if not missing:
        return state
    out = {k: sent[k].clone() if k in missing else state[k] for k in sent if k in state or k in missing}
    out.update({k: v for k, v in state.items() if k not in out})
    return out


def lora_modules(keys) -> list[str]:
    """Adapted module names (sorted) of the ``lora_A`` keys among ``keys``."""
    return sorted(k[: -len(A_SUFFIX)] for k in keys if k.endswith(A_SUFFIX))


def job_key(i: int) -> str:
    """The key of a client's ``i``-th adapter."""
    return f"a{i}"


# ---- messages -----------------------------------------------------------------------------------------

@dataclass
class Broadcast:
    """What the server sends for one (client, key): the start adapter and plain settings for client hooks."""

    state: State
    config: dict = field(default_factory=dict)


@dataclass
class Upload:
    """What a client sends for one of its adapters."""

    key: str            # the client's own name for the adapter (opaque to the server)
    state: State        # the trained adapter, or the part of it the method uploads (Hook.outgoing)
    num_examples: int   # the samples it was trained on (the aggregation weight)
    extras: State = field(default_factory=dict)  # tensors sent beside it (e.g. importance scores, indices)


@dataclass
class Submission:
    """What a client sends for one adapter: no task label, only its own key and sample count."""

    client: int
    key: str
    state: State
    num_examples: int
    start: State  # the adapter the client was sent (kept server-side; not sent back)
    extras: dict = field(default_factory=dict)  # tensors sent beside the adapter (e.g. importance scores)


@dataclass
class Mean:
    """A round's submissions as the server gets them under secure aggregation: one sample-weighted mean, no single one.

    ``members`` are the (client, key) whose adapters are in it (who took part is no secret: the transport knows
    whom it heard from); ``num_examples`` their total weight.
    """

    state: State
    num_examples: int
    members: list[tuple[int, str]]
