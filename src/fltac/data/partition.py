"""Dirichlet partition of every task over clients (Hsu et al., 2019; the FL-TAC paper's split).

For task ``i`` (in the scenario's task order), a generator seeded with ``seed + i`` draws
``p ~ Dir(alpha, ..., alpha)`` over the clients; shares below ``min_frac`` are set to zero and the rest
renormalised; a random permutation of the task's training rows is then cut into consecutive blocks of
``count_k`` rows. Counts are the floor of ``p_k * n`` with the remainder handed, one row each, to the
clients with the largest fractional parts among those with ``p_k > 0``: a client whose share is zero
receives exactly zero rows, and the counts add up to ``n``.

A task whose data names its owners (a custom task's ``client_column``) is not split this way: its
rows go to their owner's client (:func:`owner_clients`, :func:`partition_by_owner`). ``partition.kind: iid``
gives every client the same share 1/n_clients (the same permutation and counting rule, no draw).
"""

from __future__ import annotations

import numpy as np

from fltac.config import ConfigError


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


def partition_task(n_rows: int, n_clients: int, alpha: float, min_frac: float, seed: int,
                   iid: bool = False) -> list[np.ndarray]:
    """Row indices of one task for each client; ``iid``: equal shares 1/n_clients instead of the Dirichlet draw."""
    rng = np.random.default_rng(seed)
    shares = np.full(n_clients, 1.0 / n_clients) if iid else dirichlet_shares(rng, n_clients, alpha, min_frac)
    counts = client_counts(shares, n_rows)
    perm = rng.permutation(n_rows)
    bounds = np.concatenate([[0], np.cumsum(counts)])
    return [np.sort(perm[bounds[k]:bounds[k + 1]]) for k in range(n_clients)]


def partition_all(task_sizes: list[int], n_clients: int, alpha: float, min_frac: float, seed: int,
                  iid: bool = False) -> list[list[np.ndarray]]:
    """``parts[t][k]``: the training rows of task ``t`` held by client ``k`` (task ``t`` seeded with ``seed + t``;
    ``iid``: ``partition.kind: iid``, equal shares)."""
    return [partition_task(n, n_clients, alpha, min_frac, seed + t, iid) for t, n in enumerate(task_sizes)]


def partition_label_skew(labels: np.ndarray, n_clients: int, alpha: float, min_frac: float,
                         seed: int) -> list[np.ndarray]:
    """Row indices of one task for each client, skewed by label (``partition.kind: label_skew``).

    For every class ``c`` (in sorted order) its own generator, seeded with ``[seed, c]``, draws
    ``p ~ Dir(alpha)`` over the clients with the same ``min_frac`` rule and largest-remainder counts as
    :func:`partition_task`, and cuts a permutation of that class's rows into blocks: each client gets a
    different mix of classes, and every row goes to exactly one client.
    """
    labels = np.asarray(labels)
    parts: list[list[np.ndarray]] = [[] for _ in range(n_clients)]
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        rng = np.random.default_rng([seed, int(c)])
        counts = client_counts(dirichlet_shares(rng, n_clients, alpha, min_frac), len(rows))
        perm = rows[rng.permutation(len(rows))]
        bounds = np.concatenate([[0], np.cumsum(counts)])
        for k in range(n_clients):
            parts[k].append(perm[bounds[k]:bounds[k + 1]])
    return [np.sort(np.concatenate(p)) if p else np.zeros(0, dtype=np.int64) for p in parts]


def partition_all_label_skew(task_labels: list[np.ndarray], n_clients: int, alpha: float, min_frac: float,
                             seed: int) -> list[list[np.ndarray]]:
    """``parts[t][k]`` under label skew, task ``t`` seeded with ``seed + t`` (as :func:`partition_all`)."""
    return [partition_label_skew(y, n_clients, alpha, min_frac, seed + t) for t, y in enumerate(task_labels)]


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


def owner_clients(owners_per_task: list[list[str] | None], task_names: list[str], n_clients: int) -> dict[str, int]:
    """Natural federated data: each distinct owner (author, site, device) of the owned tasks is one client.

    The distinct values of every task's client column (``None`` for a Dirichlet task), pooled and sorted
    as strings, are clients ``0..n-1``, so an owner that appears in two tasks is one client holding both.
    ``n`` must equal ``n_clients``: merging or splitting owners would change what the data says.
    """
    owned = [(name, owners) for name, owners in zip(task_names, owners_per_task) if owners is not None]
    if not owned:
        return {}
    values = sorted({v for _, owners in owned for v in owners})
    if len(values) != n_clients:
        shown = ", ".join(repr(v) for v in values[:5]) + (", ..." if len(values) > 5 else "")
        raise ConfigError(f"the client columns of task(s) {[n for n, _ in owned]} name {len(values)} distinct "
                          f"client(s) ({shown}) but partition.n_clients is {n_clients}: set partition.n_clients: "
                          f"{len(values)}")
    return {v: k for k, v in enumerate(values)}


def partition_by_owner(owners: list[str], client_of: dict[str, int], n_clients: int) -> list[np.ndarray]:
    """Row indices of one task for each client: row ``i`` goes to ``client_of[owners[i]]``."""
    ids = np.array([client_of[v] for v in owners], dtype=np.int64)
    return [np.flatnonzero(ids == k) for k in range(n_clients)]
