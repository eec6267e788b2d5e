"""Failing and misbehaving clients for the in-process engine: injected faults, attacks, the time limit.

Every draw comes from ``np.random.default_rng([seed, round, client, (key,) salt])``, a stream of its
own that no other draw of the run touches, so the same faults hit the same clients in the same
rounds whatever ran before them: a resumed run meets exactly the faults of the uninterrupted one.

Injected faults go through the very path real ones take: an injected crash is an exception raised
inside the client, caught with every other exception a client raises; an injected hang is a
simulated delay added to the client's measured time, checked against ``client_timeout_s`` by the
same comparison that drops a really slow client; a corrupted adapter is sent to the server and
meets the same checks (:func:`fltac.server.robust.screen`) as any other submission.
"""

from __future__ import annotations

import math
import signal
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch

from fltac.config import ReliabilityConfig

State = dict[str, torch.Tensor]

#: Salts that give each kind of draw its own stream (arbitrary, fixed forever: changing one changes results).
SALT_CLIENT, SALT_CORRUPT, SALT_ATTACK = 0xC7A5, 0xC0AA, 0xA77A
#: What 'any' corruption picks from, uniformly.
CORRUPT_KINDS = ("nan", "scale", "noise", "shape", "dtype", "missing")


class InjectedCrash(RuntimeError):
    """The crash a fault-injecting config asked for."""


class ClientTimeout(RuntimeError):
    """A client ran past ``client_timeout_s``."""


def _key_index(key: str) -> int:
    return int(key[1:])


@dataclass(frozen=True)
class ClientFault:
    """What happens to one client in one round: a crash or a hang before its job number ``at``, or nothing."""

    kind: str | None  # None, 'crash' or 'hang'
    at: int = 0


def draw_client_fault(rel: ReliabilityConfig, seed: int, round_: int, client: int, n_jobs: int) -> ClientFault:
    """Crash with probability ``crash_prob``, else hang with probability ``hang_prob``, before a job drawn
    uniformly among the client's ``n_jobs`` (the jobs before it are trained, then lost with the client)."""
    if rel.crash_prob == 0.0 and rel.hang_prob == 0.0:
        return ClientFault(None)
    rng = np.random.default_rng([seed, round_, client, SALT_CLIENT])
    u_crash, u_hang = rng.random(2)
    at = int(rng.integers(max(n_jobs, 1)))
    if u_crash < rel.crash_prob:
        return ClientFault("crash", at)
    if u_hang < rel.hang_prob:
        return ClientFault("hang", at)
    return ClientFault(None)


def draw_corruption(rel: ReliabilityConfig, seed: int, round_: int, client: int, key: str) -> str | None:
    """The corruption of one submitted adapter (a kind from :data:`CORRUPT_KINDS`), or None."""
    if rel.corrupt_prob == 0.0:
        return None
    rng = np.random.default_rng([seed, round_, client, _key_index(key), SALT_CORRUPT])
    hit, pick = rng.random(), int(rng.integers(len(CORRUPT_KINDS)))
    if hit >= rel.corrupt_prob:
        return None
    return CORRUPT_KINDS[pick] if rel.corrupt_kind == "any" else rel.corrupt_kind


def corrupt(state: State, kind: str, rng: np.random.Generator, scale: float = 100.0, noise_std: float = 1.0) -> State:
    """``state`` broken as ``kind`` says (a new dict; ``state`` is not modified).

    nan: every entry NaN. scale: every tensor x ``scale``. noise: every entry replaced by
    N(0, noise_std^2). shape: the first tensor loses its last row. dtype: every tensor float64.
    missing: the first tensor (sorted by name) left out.
    """
    keys = sorted(state)
    if kind == "nan":
        return {k: torch.full_like(v, float("nan")) for k, v in state.items()}
    if kind == "scale":
        return {k: v * scale for k, v in state.items()}
    if kind == "noise":
        return {k: torch.from_numpy(rng.normal(0.0, noise_std, size=tuple(v.shape))).to(v.dtype)
                for k, v in state.items()}
    if kind == "shape":
        return {k: (v[:-1].clone() if k == keys[0] else v) for k, v in state.items()}
    if kind == "dtype":
        return {k: v.double() for k, v in state.items()}
    if kind == "missing":
        return {k: v for k, v in state.items() if k != keys[0]}
    raise ValueError(f"unknown corruption '{kind}'")


def tamper(rel: ReliabilityConfig, seed: int, round_: int, client: int, key: str,
           state: State) -> tuple[State, list[str]]:
    """The adapter the client actually sends, and what was done to it (e.g. ``['attack:scale']``).

    Attackers (``attacker_clients``) apply ``attack`` to every adapter of theirs; then each adapter
    may be corrupted with probability ``corrupt_prob``.
    """
    notes = []
    if client in rel.attacker_clients and rel.attack != "none":
        rng = np.random.default_rng([seed, round_, client, _key_index(key), SALT_ATTACK])
        state = corrupt(state, rel.attack, rng, rel.attack_scale, rel.attack_noise_std)
        notes.append(f"attack:{rel.attack}")
    kind = draw_corruption(rel, seed, round_, client, key)
    if kind is not None:
        rng = np.random.default_rng([seed, round_, client, _key_index(key), SALT_CORRUPT, 1])
        state = corrupt(state, kind, rng, rel.attack_scale, rel.attack_noise_std)
        notes.append(f"corrupt:{kind}")
    return state, notes


# ---- the time limit ----------------------------------------------------------------------------------

@contextmanager
def deadline(seconds: float | None):
    """Raise :class:`ClientTimeout` inside the block once ``seconds`` of wall time have passed.

    Uses SIGALRM, so it works on the main thread of a Unix process and only between Python bytecodes
    (a single long C call finishes first). Elsewhere, or when a real-time timer is already set by
    someone else, it does nothing and the measured time alone decides (:func:`run_client`).
    """
    usable = (seconds is not None and hasattr(signal, "setitimer")
              and threading.current_thread() is threading.main_thread()
              and signal.getitimer(signal.ITIMER_REAL)[0] == 0.0)
    if not usable:
        yield
        return

    def on_alarm(signum, frame):
        raise ClientTimeout(f"interrupted after client_timeout_s = {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0.0)
        signal.signal(signal.SIGALRM, previous)


def over_time(seconds: float, limit: float | None) -> bool:
    """The one time-limit check, for real and injected delays alike."""
    return limit is not None and seconds > limit


@dataclass
class ClientRun:
    """One client's round: the jobs it finished (in order, with their outputs) and, if it failed, why.

    A failed client's finished jobs are kept only for the record (their losses); none is submitted.
    """

    client: int
    done: list = field(default_factory=list)  # [(job, output)]
    kind: str | None = None                # None, 'crash' or 'timeout'
    reason: str | None = None
    seconds: float = 0.0
    injected: ClientFault | None = None    # the injected fault drawn for this round, if any


def run_client(client: int, jobs: list, train: Callable, rel: ReliabilityConfig, seed: int,
               round_: int) -> ClientRun:
    """Run ``train(job)`` for each of the client's jobs, in order, under its fault and time limit.

    Any exception a job raises (an injected crash or a real one) fails the whole client for the round;
    so does a total time, measured plus any injected hang, above ``client_timeout_s``.
    """
    fault = draw_client_fault(rel, seed, round_, client, len(jobs))
    out = ClientRun(client, injected=fault if fault.kind else None)
    limit = rel.client_timeout_s
    t0 = time.perf_counter()
    hang = 0.0
    try:
        with deadline(limit):
            for i, job in enumerate(jobs):
                if fault.kind == "crash" and i == fault.at:
                    raise InjectedCrash(f"injected crash before adapter {job.key}")
                if fault.kind == "hang" and i == fault.at:
                    hang = rel.hang_seconds  # simulated: the client stalls this long, then goes on
                    if over_time(time.perf_counter() - t0 + hang, limit):
                        break  # the server stops waiting at the limit: nothing after this arrives
                out.done.append((job, train(job)))
    except ClientTimeout as exc:
        out.kind, out.reason = "timeout", f"timeout: {exc}"
    except Exception as exc:  # noqa: BLE001 -- a client may fail in any way; the round goes on without it
        first = str(exc).splitlines()[0] if str(exc) else ""
        out.kind, out.reason = "crash", f"crash: {type(exc).__name__}: {first}"
    out.seconds = time.perf_counter() - t0
    if out.kind is None and over_time(out.seconds + hang, limit):
        if hang:
            out.reason = f"timeout: injected hang of {hang:g} s exceeds client_timeout_s = {limit:g} s"
        else:
            out.reason = f"timeout: took {out.seconds:.3g} s > client_timeout_s = {limit:g} s"
        out.kind = "timeout"
    return out


def required_clients(rel: ReliabilityConfig, n_sampled: int) -> int:
    """max(min_clients_per_round, ceil(min_fraction_per_round x clients sampled))."""
    return max(rel.min_clients_per_round, math.ceil(rel.min_fraction_per_round * n_sampled - 1e-9))
