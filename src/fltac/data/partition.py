"""Dirichlet partition of every task over clients (Hsu et al., 2019; the FL-TAC paper's split).

For task ``i`` (in the scenario's task order), a generator seeded with ``seed + i`` draws
``p ~ Dir(alpha, ..., alpha)`` over the clients; shares below ``min_frac`` are set to zero and the rest
renormalised; a random permutation of the task's training rows is then cut into consecutive blocks of
``count_k`` rows. Counts are the floor of ``p_k * n`` with the remainder handed, one row each, to the
clients with the largest fractional parts among those with ``p_k > 0``: a client whose share is zero
receives exactly zero rows, and the counts add up to ``n``.
"""

from __future__ import annotations

import numpy as np


def client_counts(shares: np.ndarray, n: int) -> np.ndarray:
    """Integer counts summing to ``n``, proportional to ``shares``; zero shares get zero (largest remainder)."""
    exact = shares * n
    counts = np.floor(exact).astype(np.int64)
    remainder = n - int(counts.sum())
    frac = np.where(shares > 0, exact - counts, -1.0)
    order = np.argsort(-frac, kind="stable")
    counts[order[:remainder]] += 1
    return counts


def dirichlet_shares(rng: np.random.Generator, n_clients: int, alpha: float, min_frac: float) -> np.ndarray:
    shares = rng.dirichlet(np.full(n_clients, alpha))
    shares[shares < min_frac] = 0.0
    if shares.sum() == 0:  # cannot happen while min_frac < 1/n_clients, which the config enforces
        raise ValueError("every client share fell below min_frac")
    return shares / shares.sum()


def partition_task(n_rows: int, n_clients: int, alpha: float, min_frac: float, seed: int) -> list[np.ndarray]:
    """Row indices of one task for each client."""
    rng = np.random.default_rng(seed)
    shares = dirichlet_shares(rng, n_clients, alpha, min_frac)
    counts = client_counts(shares, n_rows)
    perm = rng.permutation(n_rows)
    bounds = np.concatenate([[0], np.cumsum(counts)])
    return [np.sort(perm[bounds[k]:bounds[k + 1]]) for k in range(n_clients)]


def partition_all(task_sizes: list[int], n_clients: int, alpha: float, min_frac: float, seed: int) -> list[list[np.ndarray]]:
    """``parts[t][k]``: the training rows of task ``t`` held by client ``k`` (task ``t`` seeded with ``seed + t``)."""
    return [partition_task(n, n_clients, alpha, min_frac, seed + t) for t, n in enumerate(task_sizes)]


def partition_table(parts: list[list[np.ndarray]]) -> np.ndarray:
    """Counts ``[client, task]``."""
    return np.array([[len(parts[t][k]) for t in range(len(parts))] for k in range(len(parts[0]))], dtype=np.int64)


def format_table(table: np.ndarray, task_names: list[str]) -> str:
    width = max(8, *(len(n) + 2 for n in task_names))
    head = "client" + "".join(f"{n:>{width}}" for n in task_names) + f"{'total':>{width}}"
    rows = [f"#{k:<5}" + "".join(f"{v:>{width}}" for v in row) + f"{row.sum():>{width}}" for k, row in enumerate(table)]
    total = "total " + "".join(f"{v:>{width}}" for v in table.sum(0)) + f"{table.sum():>{width}}"
    rule = "-" * len(head)
    return "\n".join([head, rule, *rows, rule, total])
