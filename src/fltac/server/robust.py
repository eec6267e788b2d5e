"""Robust aggregation and submission checks: small pure functions on adapter states, no state, no I/O.

Notation: a submission is an adapter state ``s_i`` (``{key: tensor}``) trained from the adapter
``s0_i`` the client was sent; its *update* is ``u_i = s_i - s0_i`` and ``||u_i||`` is the L2 norm
of all its tensors together (LoRA factors and head). As in :mod:`fltac.server.aggregate`, A and B
are combined separately, entry by entry, never as the product BA.

The rules here are what :meth:`fltac.server.strategies.Strategy._merge` applies to the members of
one slot (one cluster for FL-TAC), so they compose with all methods instead of copying any.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fltac.server.aggregate import State, flatten, weighted_mean

#: Expected layout of one adapter: ``{key: (shape, dtype)}``.
Spec = dict[str, tuple[tuple[int, ...], torch.dtype]]


# ---- coordinate-wise rules ---------------------------------------------------------------------------

def _stack(states: list[State], key: str) -> torch.Tensor:
    return torch.stack([s[key].double() for s in states])


def coordinate_median(states: list[State]) -> State:
    """Coordinate-wise median (Yin et al., arXiv 1803.01498), unweighted.

    For every entry j: med_j = x_(m)j for n = 2m - 1 values, and (x_(m)j + x_(m+1)j) / 2 for n = 2m,
    where x_(1)j <= ... <= x_(n)j are the n submissions' values sorted. Sample counts are ignored:
    a weighted median would hand the rule to whoever claims many examples. float64, cast back.
    """
    if not states:
        raise ValueError("coordinate_median of no states")
    out = {}
    for k in states[0]:
        x, _ = torch.sort(_stack(states, k), dim=0)
        n = x.shape[0]
        mid = x[(n - 1) // 2] if n % 2 else (x[n // 2 - 1] + x[n // 2]) / 2
        out[k] = mid.to(states[0][k].dtype)
    return out


def trimmed_mean(states: list[State], trim_fraction: float) -> State:
    """Coordinate-wise trimmed mean (Yin et al., arXiv 1803.01498), unweighted.

    With b = floor(trim_fraction * n): for every entry j, sort the n values, drop the b smallest and
    the b largest, and average the n - 2b left: (1 / (n - 2b)) sum_{i=b+1}^{n-b} x_(i)j.
    ``trim_fraction`` must lie in [0, 0.5), so at least one value is left; 0 is the plain mean.
    """
    if not states:
        raise ValueError("trimmed_mean of no states")
    if not 0.0 <= trim_fraction < 0.5:
        raise ValueError(f"trim_fraction must lie in [0, 0.5), got {trim_fraction}")
    n = len(states)
    b = math.floor(trim_fraction * n)
    out = {}
    for k in states[0]:
        x, _ = torch.sort(_stack(states, k), dim=0)
        out[k] = x[b:n - b].mean(dim=0).to(states[0][k].dtype)
    return out


# ---- rules that pick or weigh whole submissions ------------------------------------------------------------

def _flat(states: list[State]) -> torch.Tensor:
    """[n, D] float64: each state's tensors flattened in key order (the first state's)."""
    keys = list(states[0])
    return torch.stack([flatten(s, keys, torch.float64) for s in states])


def krum_scores(states: list[State], f: int) -> torch.Tensor:
    """Krum's score of each submission (Blanchard et al., NeurIPS 2017): the sum of its squared distances to
    its ``n - f - 2`` nearest other submissions (at least one; Krum's guarantee needs n >= 2f + 3)."""
    x = _flat(states)
    d2 = torch.cdist(x, x).pow(2)
    n = len(states)
    k = min(max(n - f - 2, 1), n - 1)
    nearest, _ = torch.sort(d2 + torch.diag(torch.full((n,), float("inf"), dtype=d2.dtype)), dim=1)
    return nearest[:, :k].sum(dim=1)


def multi_krum(states: list[State], weights: list[float], f: int, m: int | None) -> State:
    """The sample-weighted mean of the ``m`` submissions with the lowest :func:`krum_scores` (ties: the earlier);
    ``m`` None = ``n - f``; ``m = 1`` is Krum itself, which returns its pick unchanged."""
    if len(states) == 1:
        return states[0]
    m = len(states) - f if m is None else m
    scores = krum_scores(states, f)
    chosen = sorted(sorted(range(len(states)), key=lambda i: (float(scores[i]), i))[:max(1, min(m, len(states)))])
    if len(chosen) == 1:
        return states[chosen[0]]
    return weighted_mean([states[i] for i in chosen], [weights[i] for i in chosen])


def geometric_median(states: list[State], weights: list[float], eps: float = 1e-8, max_iter: int = 200,
                     tol: float = 1e-10) -> State:
    """The weighted geometric median argmin_z sum_i w_i ||z - s_i|| (RFA, Pillutla et al., arXiv 1912.13445),
    by Weiszfeld's iteration z <- sum_i b_i s_i / sum_i b_i with b_i = w_i / max(eps, ||z - s_i||), from the
    weighted mean, until z moves less than ``tol`` (relative) or ``max_iter`` steps. float64, cast back."""
    x = _flat(states)
    w = torch.tensor(weights, dtype=torch.float64)
    z = (w[:, None] * x).sum(0) / w.sum()
    for _ in range(max_iter):
        b = w / torch.clamp(torch.linalg.vector_norm(x - z, dim=1), min=eps)
        new = (b[:, None] * x).sum(0) / b.sum()
        moved = float(torch.linalg.vector_norm(new - z))
        z = new
        if moved <= tol * max(1.0, float(torch.linalg.vector_norm(z))):
            break
    out, start = {}, 0
    for k, v in states[0].items():
        out[k] = z[start: start + v.numel()].reshape(v.shape).to(v.dtype)
        start += v.numel()
    return out


def update_norm(state: State, start: State) -> float:
    """||s - s0||_2 over all tensors together, in float64."""
    return math.sqrt(sum(float(((state[k].double() - start[k].double()) ** 2).sum()) for k in state))


def state_norm(state: State) -> float:
    """||s||_2 over all tensors together, in float64."""
    return math.sqrt(sum(float((v.double() ** 2).sum()) for v in state.values()))


def clip_update(state: State, start: State, max_norm: float) -> State:
    """s0 + u * min(1, max_norm / ||u||) with u = s - s0: the update scaled down to norm ``max_norm``
    (norm clipping as in DP-FedAvg, McMahan et al., arXiv 1710.06963); shorter updates are unchanged."""
    norm = update_norm(state, start)
    if norm <= max_norm:
        return state
    factor = max_norm / norm
    return {k: (start[k].double() + factor * (state[k].double() - start[k].double())).to(state[k].dtype)
            for k in state}


@dataclass(frozen=True)
class Aggregation:
    """The rule that merges the submissions of one slot into its new adapter.

    Parameters
    ----------
    rule : {'fedavg', 'median', 'trimmed_mean', 'krum', 'multi_krum', 'geometric_median'} (default: 'fedavg')
        fedavg: sum_i n_i s_i / sum_i n_i (:func:`weighted_mean`); median: :func:`coordinate_median`;
        trimmed_mean: :func:`trimmed_mean` (these two ignore sample counts); krum: the one submission
        :func:`multi_krum` picks with m = 1; multi_krum: :func:`multi_krum`; geometric_median:
        :func:`geometric_median`. Distances are between the submitted states, as the coordinate rules read
        them (a slot's members mostly share their start, so these are the distances of their updates).
    trim_fraction : float (default: 0.2)
        Fraction trimmed at each end by ``trimmed_mean``.
    clip_norm : float or None (default: None)
        If set, every submission is first replaced by :func:`clip_update` of it, then the rule runs.
    krum_f : int (default: 1)
        Byzantine submissions assumed by krum and multi_krum.
    multi_krum_m : int or None (default: None)
        Submissions multi_krum averages; None = n - f.
    """

    rule: str = "fedavg"
    trim_fraction: float = 0.2
    clip_norm: float | None = None
    krum_f: int = 1
    multi_krum_m: int | None = None

    def __call__(self, states: list[State], starts: list[State], weights: list[float]) -> State:
        if self.clip_norm is not None:
            states = [clip_update(s, s0, self.clip_norm) for s, s0 in zip(states, starts)]
        if self.rule == "fedavg":
            return weighted_mean(states, weights)
        if self.rule == "median":
            return coordinate_median(states)
        if self.rule == "trimmed_mean":
            return trimmed_mean(states, self.trim_fraction)
        if self.rule in ("krum", "multi_krum"):
            return multi_krum(states, weights, self.krum_f, 1 if self.rule == "krum" else self.multi_krum_m)
        if self.rule == "geometric_median":
            return geometric_median(states, weights)
        raise ValueError(f"unknown aggregation rule '{self.rule}'")


# ---- submission checks -------------------------------------------------------------------------------

def spec_of(state: State) -> Spec:
    """The layout ``{key: (shape, dtype)}`` of an adapter state."""
    return {k: (tuple(v.shape), v.dtype) for k, v in state.items()}


def _few(keys: list[str]) -> str:
    return ", ".join(keys[:3]) + (f" (+{len(keys) - 3} more)" if len(keys) > 3 else "")


def structure_problem(state: State, expected: Spec) -> str | None:
    """Why ``state`` does not have the expected tensor names, shapes and dtypes, or None if it does."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing:
        return f"missing tensor(s) {_few(missing)}"
    if unexpected:
        return f"unexpected tensor(s) {_few(unexpected)}"
    for k, (shape, dtype) in expected.items():
        v = state[k]
        if not isinstance(v, torch.Tensor):
            return f"tensor '{k}' is a {type(v).__name__}, not a tensor"
        if tuple(v.shape) != tuple(shape):
            return f"tensor '{k}' has shape {tuple(v.shape)}, expected {tuple(shape)}"
        if v.dtype != dtype:
            return f"tensor '{k}' has dtype {v.dtype}, expected {dtype}"
    return None


def finite_problem(state: State) -> str | None:
    """Which tensor holds NaN or infinite values, or None if all are finite."""
    for k, v in state.items():
        bad = int((~torch.isfinite(v)).sum())
        if bad:
            return f"tensor '{k}' holds {bad} non-finite value(s)"
    return None


def lower_median(values: list[float]) -> float:
    """x_(ceil(n/2)) of the n values sorted: the median for odd n, the smaller middle value for even n."""
    x = sorted(values)
    return x[(len(x) - 1) // 2]


def client_votes(norms: list[float], clients: list[int]) -> dict[int, float]:
    """One vote per client: the lower median of the update norms of its submissions.

    A client's adapters share one vote, so a client that sends many adapters (FL-TAC: one per task it
    holds) weighs no more in the bound than one that sends a single adapter.
    """
    per: dict[int, list[float]] = {}
    for norm, client in zip(norms, clients):
        per.setdefault(client, []).append(norm)
    return {c: lower_median(v) for c, v in per.items()}


def norm_reference(votes: dict[int, float], previous: float | None, start_norms: list[float]) -> tuple[float, str]:
    """(the round's reference update norm, how it was found); the bound is ``norm_bound_factor`` x it.

    - Two or more clients voted: the lower median of their votes (:func:`client_votes`). Clients
      that send too-long updates move it only when they are at least half of the round's clients
      (for an even count the smaller middle vote wins), however many adapters each sends.
    - One client voted: it would set its own bound, so the previous accepted round's reference is
      used (``previous``); in the first round, with no previous one, the lower median of the norms
      ||s0|| of the adapters it was sent (the served adapter: an update x factor longer than the
      adapter it started from is no fine-tuning step; an x100 scaling of it is about 99 ||s0||);
      with an all-zero adapter sent there is nothing to compare with, and no relative bound.
    """
    if len(votes) >= 2:
        return lower_median(list(votes.values())), "the round's lower median over clients"
    if previous is not None:
        return previous, "the previous round's reference (one client voted)"
    if lower_median(start_norms) > 0:
        return lower_median(start_norms), "the norm of the adapter sent (one client voted, no previous round)"
    return math.inf, "nothing to compare with (one client, no previous round, an all-zero adapter sent)"


def screen(states: list[State], starts: list[State], specs: list[Spec], clients: list[int],
           norm_bound_factor: float = 10.0, norm_bound: float | None = None,
           previous: float | None = None) -> tuple[list[str | None], float, float | None]:
    """Check a round's submissions: (one reason per submission, None when accepted; the norm bound;
    the reference norm the relative bound came from, None with an absolute ``norm_bound``).

    In order, a submission is rejected for: a wrong layout (:func:`structure_problem` against its own
    expected spec, which carries the method and the client's rank), non-finite values
    (:func:`finite_problem`), or an update norm ||s_i - s0_i|| above the bound. ``clients[i]`` is the
    client that sent submission i. The bound is ``norm_bound`` if set, else ``norm_bound_factor`` x
    :func:`norm_reference` of the submissions that passed the first two checks: one vote per client,
    so fewer than half of the clients cannot loosen it whatever they send, and a round with a
    single client takes ``previous`` (the last accepted round's reference) instead of its own.
    """
    reasons: list[str | None] = []
    for s, spec in zip(states, specs):
        reasons.append(structure_problem(s, spec) or finite_problem(s))
    ok = [i for i, r in enumerate(reasons) if r is None]
    if not ok:
        return reasons, math.inf, None
    norms = {i: update_norm(states[i], starts[i]) for i in ok}
    if norm_bound is not None:
        bound, reference, how = float(norm_bound), None, "norm_bound"
    else:
        votes = client_votes([norms[i] for i in ok], [clients[i] for i in ok])
        start_norms = [state_norm(starts[i]) for i in ok] if len(votes) < 2 and previous is None else []
        reference, what = norm_reference(votes, previous, start_norms)
        bound, how = norm_bound_factor * reference, f"{norm_bound_factor:g} x {what}"
    for i, norm in norms.items():
        if not norm <= bound:
            reasons[i] = f"update norm {norm:.4g} exceeds the bound {bound:.4g} ({how})"
    return reasons, bound, reference


# ---- adapter files -----------------------------------------------------------------------------------

def _rank_hint(key: str, got: tuple[int, ...], want: tuple[int, ...]) -> str:
    """' (made for LoRA rank 8; this run uses rank 4)' when only a LoRA factor's rank axis differs."""
    axis = 0 if ".lora_A." in key else 1 if ".lora_B." in key else None
    if axis is None or len(got) != 2 or len(want) != 2 or got[1 - axis] != want[1 - axis]:
        return " (made for another backbone?)"
    return f" (made for LoRA rank {got[axis]}; this run uses rank {want[axis]})"


def slots_problem(tensors: dict[str, torch.Tensor], spec: Spec, n_slots: int) -> str | None:
    """Why a file of ``slot<i>/<key>`` tensors is not ``n_slots`` adapters of layout ``spec``, or None.

    Other entries (e.g. ``rng/...``) are ignored. The answer is one line naming the first mismatch,
    with the rank the file was made for when only a LoRA factor's rank axis differs.
    """
    slotted = {k: v for k, v in tensors.items() if k.startswith("slot")}
    want = {f"slot{i}/{k}": sd for i in range(n_slots) for k, sd in spec.items()}
    missing = sorted(set(want) - set(slotted))
    unexpected = sorted(set(slotted) - set(want))
    if missing or unexpected:
        names = {k.split("/", 1)[1] for k in slotted}
        n_file = len({k.split("/", 1)[0] for k in slotted})
        if names != set(spec):
            hint = "made for another backbone or lora.target_modules"
        else:
            hint = f"holds {n_file} adapter slot(s), this run has {n_slots}: made for another method or n_clusters"
        parts = ([f"missing {_few(missing)}"] if missing else []) + (
            [f"unexpected {_few(unexpected)}"] if unexpected else [])
        return f"tensor names differ ({'; '.join(parts)}): {hint}?"
    for name, (shape, dtype) in want.items():
        v = slotted[name]
        if tuple(v.shape) != tuple(shape):
            return (f"tensor '{name}' has shape {tuple(v.shape)}, expected {tuple(shape)}"
                    f"{_rank_hint(name, tuple(v.shape), tuple(shape))}")
        if v.dtype != dtype:
            return f"tensor '{name}' has dtype {v.dtype}, expected {dtype}"
    return None
