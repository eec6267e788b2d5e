"""Client-level differential privacy: clipping, seeded Gaussian noise and the epsilon of a run (``privacy``).

The unit of privacy is one client. Its round update is ``u = (s_a - s0_a)_a`` over all the adapters ``a`` it
uploads that round (FL-TAC: one per task it holds), the trained tensors only (FFA-LoRA's frozen ``lora_A`` never
leaves the client). Clipping scales all of them by one factor, ``min(1, C / ||u||)``, so ``||u|| <= C`` for the
client as a whole: a client with five adapters gets no more privacy budget than one with one.

Local DP (``privacy.mode: local``), on the client side of the transport (:func:`fltac.client.round.train_client`,
which a Flower ClientApp runs on its own node): every uploaded coordinate gets ``N(0, sigma^2 C^2)`` added after
the clipping. What leaves the client is a Gaussian mechanism with L2 sensitivity ``C`` (add/remove adjacency: the
client's update against none, the convention of opacus and DP-FedAvg; for replace-one adjacency the sensitivity is
``2C``, i.e. the epsilon of ``sigma / 2``). Everything the server does with it (screening, FL-TAC's clustering,
averaging, a server optimizer) is post-processing. No amplification by sampling: the server sees who submitted,
so each round a client takes part costs it a full step (sample rate 1); the recorded epsilon is that of a client
sampled every round (the worst case when ``train.fraction_fit < 1``).

Central DP (``privacy.mode: central``), DP-FedAvg (McMahan et al., arXiv 1710.06963) on the server
(:class:`CentralDP`, called by :meth:`fltac.server.strategies.Strategy._merge`): the server clips each client's
update as above, and in every slot (FedIT's one adapter; each FL-TAC cluster) averages its ``n`` clients with equal
weights (a client with several adapters in one cluster enters with their mean), then adds ``N(0, sigma^2 C^2 / n^2)``
per coordinate. The client's contributions to all slots together have norm at most ``C`` (the mean of ``m``
adapters has squared norm at most the sum of their squared norms over ``m``), so the noisy sums are one Gaussian
mechanism of sensitivity ``C`` per round. Sampling: a seeded fixed-size sample of ``m`` of ``N`` clients per round,
accounted as the sampled Gaussian mechanism with ``q = m / N`` (the Poisson-sampling analysis, as DP-FedAvg does).
For FedIT ``n`` is the number of clients that submitted (``m`` unless some dropped). Dividing the noisy sum by
that ``n`` is post-processing of the Gaussian mechanism: ``n`` is not protected (the server sees who submits), as
with DP-FedAvg's fixed denominator ``q N``, which the server could divide by instead with the same epsilon. For FL-TAC the *clustering is
not private*: K-means/spectral clustering runs on the un-noised adapters and decides which clients share a slot and
the ``n`` of each; the epsilon holds for the slot adapters given that partition, not for the partition itself.
Local DP has no such gap (the clustering sees noised adapters), which is why it is FL-TAC's headline mode. Secure
aggregation cannot be combined with FL-TAC for the same reason: the server must see individual adapters to
cluster them, and SecAgg shows it only their sum.

Screening (``reliability.validate``) runs before central noise, on un-noised updates. With local DP every honest
submission carries noise of norm about ``sigma C sqrt(D)`` (``D`` uploaded coordinates), so the relative norm bound
(a factor of the clients' median) accepts them all alike; an absolute ``reliability.norm_bound`` must exceed it.

Noise is drawn from ``np.random.default_rng([seed, round, client or slot, salt])`` in the uploads' and tensors'
order, so runs are reproducible and a resumed run draws the noise of the uninterrupted one. The accountant keeps
no state: the epsilon after round ``r`` is that of ``r`` steps of the same mechanism, recomputed from the config.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch

from fltac.config import ConfigError, RunConfig
from fltac.server.robust import update_norm
from fltac.wire import State

#: Salts of the noise streams (fixed forever: changing one changes results).
SALT_LOCAL, SALT_CENTRAL = 0xD1F0, 0xD1CE
#: How to get the accountant when it is missing.
INSTALL = "pip install 'fltac[dp]' (or pip install 'opacus>=1.6,<2')"


def _rdp_accountant():
    try:
        from opacus.accountants import RDPAccountant
    except ImportError:
        raise ConfigError(f"config key 'privacy.mode' needs opacus for its privacy accountant: {INSTALL}") from None
    return RDPAccountant


def sample_rate(cfg: RunConfig) -> float:
    """q of the accountant: 1 for local DP (no amplification, see the module docstring); for central DP the
    fraction of clients sampled per round (:func:`fltac.engines.inprocess.sample_clients` takes this many)."""
    if cfg.privacy.mode == "local" or cfg.train.fraction_fit >= 1.0:
        return 1.0
    n = cfg.partition.n_clients
    return max(1, int(round(cfg.train.fraction_fit * n))) / n


def epsilon(sigma: float, q: float, steps: int, delta: float) -> float:
    """The epsilon of ``steps`` sampled Gaussian mechanisms (noise multiplier ``sigma``, sample rate ``q``) at
    ``delta``, by opacus's RDP accountant (its default orders); 0 for no step."""
    if steps <= 0:
        return 0.0
    accountant = _rdp_accountant()()
    accountant.history = [(sigma, q, steps)]
    return float(accountant.get_epsilon(delta=delta))


@functools.lru_cache(maxsize=64)
def solve_noise_multiplier(target_epsilon: float, delta: float, q: float, steps: int) -> float:
    """The noise multiplier opacus's ``get_noise_multiplier`` finds for ``steps`` steps at sample rate ``q``
    (its binary search stops at an epsilon within 0.01 below the target, never above)."""
    _rdp_accountant()
    from opacus.accountants.utils import get_noise_multiplier

    return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta, sample_rate=q,
                                      steps=steps, accountant="rdp"))


def noise_multiplier(cfg: RunConfig) -> float:
    """sigma of the run: ``privacy.noise_multiplier``, or solved for ``privacy.target_epsilon`` over all rounds."""
    p = cfg.privacy
    if p.noise_multiplier is not None:
        _rdp_accountant()  # a missing accountant is a config problem, found before any training
        return p.noise_multiplier
    return solve_noise_multiplier(p.target_epsilon, p.delta, sample_rate(cfg), cfg.train.rounds)


def round_record(cfg: RunConfig, round_: int) -> dict:
    """The privacy numbers of round ``round_``'s metrics line: the run's epsilon so far and this round's part."""
    sigma, q, delta = noise_multiplier(cfg), sample_rate(cfg), cfg.privacy.delta
    total = epsilon(sigma, q, round_, delta)
    return {"epsilon": total, "epsilon_round": total - epsilon(sigma, q, round_ - 1, delta)}


def summary_record(cfg: RunConfig) -> dict:
    """``summary.json``'s ``privacy``: the mechanism's settings and the epsilon of the whole run."""
    p = cfg.privacy
    sigma = noise_multiplier(cfg)
    return {"mode": p.mode, "clip_norm": p.clip_norm, "noise_multiplier": sigma, "target_epsilon": p.target_epsilon,
            "delta": p.delta, "sample_rate": sample_rate(cfg), "steps": cfg.train.rounds,
            "epsilon": epsilon(sigma, sample_rate(cfg), cfg.train.rounds, p.delta), "accountant": "opacus RDP"}


# ---- the mechanisms ------------------------------------------------------------------------------------

def client_clip_factor(states: list[State], starts: list[State], keys: list[list[str]], clip_norm: float) -> float:
    """min(1, C / ||u||) for one client's updates ``u = (s - s0)`` over ``keys[i]`` of each of its states."""
    norm = math.sqrt(sum(update_norm({k: s[k] for k in ks}, s0) ** 2 for s, s0, ks in zip(states, starts, keys)))
    return min(1.0, clip_norm / norm) if norm > 0 else 1.0


def gaussian(rng: np.random.Generator, like: torch.Tensor, std: float) -> torch.Tensor:
    """float64 noise ``N(0, std^2)`` of ``like``'s shape, drawn from ``rng``."""
    return torch.from_numpy(rng.standard_normal(tuple(like.shape))) * std


def local_dp(states: list[State], starts: list[State], cfg: RunConfig, round_: int, client: int) -> list[State]:
    """One client's uploads of a round, clipped together to ``clip_norm`` and noised (``privacy.mode: local``):
    ``s0 + f (s - s0) + N(0, sigma^2 C^2)`` per coordinate, ``f`` = :func:`client_clip_factor`. ``starts``: the
    parts of the broadcasts the uploads correspond to. Noise from the (seed, round, client) stream, in order."""
    c = cfg.privacy.clip_norm
    f = client_clip_factor(states, starts, [list(s) for s in states], c)
    std = noise_multiplier(cfg) * c
    rng = np.random.default_rng([cfg.seed, round_, client, SALT_LOCAL])
    out = []
    for s, s0 in zip(states, starts):
        out.append({k: (s0[k].double() + f * (v.double() - s0[k].double()) + gaussian(rng, v, std)).to(v.dtype)
                    for k, v in s.items()})
    return out


class CentralDP:
    """DP-FedAvg's server side (``privacy.mode: central``): per-client clipping, equal-weight mean per slot, noise.

    Parameters
    ----------
    clip_norm : float
        C, the bound on one client's update over all its submissions of the round.
    sigma : float
        The noise multiplier; a slot averaging ``n`` clients gets ``N(0, sigma^2 C^2 / n^2)`` per coordinate.
    seed : int
        The run seed; slot ``i`` of round ``r`` draws from ``(seed, r, i, SALT_CENTRAL)``.
    """

    def __init__(self, clip_norm: float, sigma: float, seed: int):
        self.clip_norm, self.sigma, self.seed = clip_norm, sigma, seed

    def __call__(self, round_: int, subs: list, slot_of: list[int], frozen: tuple[str, ...]) -> dict[int, State]:
        """The noised aggregate of every slot that has members (``subs``: :class:`~fltac.wire.Submission`\\ s,
        ``slot_of``: the slot of each). ``frozen`` tensors take no noise (no client trains them)."""
        factor = {}
        for client in sorted({s.client for s in subs}):
            own = [s for s in subs if s.client == client]
            factor[client] = client_clip_factor([s.state for s in own], [s.start for s in own],
                                                [[k for k in s.state if k not in frozen] for s in own], self.clip_norm)
        out = {}
        for slot in sorted(set(slot_of)):
            per_client: dict[int, list] = {}
            for s, c in zip(subs, slot_of):
                if c == slot:
                    per_client.setdefault(s.client, []).append(s)
            means = []
            for client, own in per_client.items():
                f = factor[client]
                means.append({k: sum(s.start[k].double() + f * (s.state[k].double() - s.start[k].double())
                                     for s in own) / len(own) for k in own[0].state})
            n = len(means)
            rng = np.random.default_rng([self.seed, round_, slot, SALT_CENTRAL])
            first = subs[slot_of.index(slot)].state
            agg = {}
            for k, v in first.items():
                mean = sum(m[k] for m in means) / n
                if k not in frozen:
                    mean = mean + gaussian(rng, v, self.sigma * self.clip_norm / n)
                agg[k] = mean.to(v.dtype)
            out[slot] = agg
        return out
