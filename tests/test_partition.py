"""The Dirichlet partition: counts, zero shares, disjointness, seeding, and the CLI table vs what a run trains on."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest

from fltac.data.partition import client_counts, partition_all, partition_table, partition_task


# ---- helpers computed independently of the package ------------------------------------------------

def expected_shares(n_clients: int, alpha: float, min_frac: float, seed: int) -> np.ndarray:
    """The documented recipe: default_rng(seed) -> Dir(alpha) -> zero shares < min_frac -> renormalise."""
    rng = np.random.default_rng(seed)
    shares = rng.dirichlet([alpha] * n_clients)
    shares = np.where(shares < min_frac, 0.0, shares)
    return shares / shares.sum()


def largest_remainder(shares: list[float], n: int) -> list[int]:
    """Plain-Python largest-remainder apportionment (Hamilton's method), zero shares excluded."""
    exact = [s * n for s in shares]
    counts = [math.floor(e) for e in exact]
    left = n - sum(counts)
    eligible = sorted((i for i, s in enumerate(shares) if s > 0), key=lambda i: exact[i] - counts[i], reverse=True)
    for i in eligible[:left]:
        counts[i] += 1
    return counts


# ---- client_counts -----------------------------------------------------------------------------------

@pytest.mark.parametrize("shares, n, expected", [
    # 3.5, 0, 2.1, 1.4 -> floors 3, 0, 2, 1 (6); one row left goes to the largest fraction (client 0)
    ([0.5, 0.0, 0.3, 0.2], 7, [4, 0, 2, 1]),
    # 0, 0.5, 0.3, 0.2 -> floors all 0; the one row goes to client 1
    ([0.0, 0.5, 0.3, 0.2], 1, [0, 1, 0, 0]),
    # 1.35, 7.65 among zero shares -> floors 1, 7; the left-over row goes to client 3 (fraction .65 > .35)
    ([0.0, 0.15, 0.0, 0.85], 9, [0, 1, 0, 8]),
    ([1.0, 0.0, 0.0], 5, [5, 0, 0]),
    ([0.6, 0.4], 0, [0, 0]),
])
def test_client_counts_hand_computed(shares, n, expected):
    counts = client_counts(np.array(shares), n)
    assert int(counts.sum()) == n
    assert counts.tolist() == expected


def test_client_counts_zero_share_never_gets_a_remainder_row():
    # every non-zero client has fractional part 2/3; the two left-over rows must go to them, not to the zeros
    shares = np.array([0.0, 0.0, 1 / 3, 1 / 3, 1 / 3])
    counts = client_counts(shares, 2)
    assert counts[:2].tolist() == [0, 0]
    assert int(counts.sum()) == 2
    assert counts.max() <= 1


def test_client_counts_random_shares_match_largest_remainder():
    rng = np.random.default_rng(123)
    for _ in range(200):
        n_clients = int(rng.integers(2, 12))
        shares = rng.dirichlet(np.full(n_clients, 0.3))
        shares[shares < 0.05] = 0.0
        if shares.sum() == 0:
            continue
        shares = shares / shares.sum()
        n = int(rng.integers(0, 500))
        counts = client_counts(shares, n)
        assert int(counts.sum()) == n
        assert np.all(counts[shares == 0] == 0)
        assert np.all(np.abs(counts - shares * n) < 1.0)
        assert counts.tolist() == largest_remainder(shares.tolist(), n)


# ---- partition_task ----------------------------------------------------------------------------------

@pytest.mark.parametrize("n_rows, n_clients, alpha, min_frac, seed", [
    (1000, 10, 0.1, 0.05, 0),
    (333, 8, 0.2, 0.1, 7),
    (50, 6, 0.5, 0.15, 3),
    (1, 4, 1.0, 0.0, 11),
])
def test_partition_task_zero_share_clients_get_no_rows(n_rows, n_clients, alpha, min_frac, seed):
    shares = expected_shares(n_clients, alpha, min_frac, seed)
    parts = partition_task(n_rows, n_clients, alpha, min_frac, seed)
    sizes = np.array([len(p) for p in parts])
    assert len(parts) == n_clients
    assert np.all(sizes[shares == 0] == 0)
    assert int(sizes.sum()) == n_rows
    assert sizes.tolist() == largest_remainder(shares.tolist(), n_rows)


def test_partition_task_zero_shares_actually_occur_in_the_cases_above():
    # guards the test above against vacuity: the skewed settings really do zero some clients
    assert (expected_shares(10, 0.1, 0.05, 0) == 0).sum() >= 1
    assert (expected_shares(8, 0.2, 0.1, 7) == 0).sum() >= 1


@pytest.mark.parametrize("n_rows, n_clients, alpha, min_frac, seed", [
    (1000, 10, 0.1, 0.05, 0),
    (257, 5, 2.0, 0.0, 1),
    (10, 7, 0.3, 0.1, 2),
])
def test_partition_task_rows_are_disjoint_and_cover_all(n_rows, n_clients, alpha, min_frac, seed):
    parts = partition_task(n_rows, n_clients, alpha, min_frac, seed)
    allrows = np.concatenate(parts)
    assert len(allrows) == n_rows
    assert len(np.unique(allrows)) == n_rows
    assert np.array_equal(np.sort(allrows), np.arange(n_rows))
    for p in parts:
        assert p.dtype.kind in "iu"


def test_partition_task_follows_the_documented_recipe():
    # the rows are consecutive blocks of rng.permutation(n) drawn right after the Dirichlet, each sorted
    n_rows, n_clients, alpha, min_frac, seed = 400, 6, 0.4, 0.05, 99
    rng = np.random.default_rng(seed)
    shares = rng.dirichlet([alpha] * n_clients)
    shares = np.where(shares < min_frac, 0.0, shares)
    shares = shares / shares.sum()
    counts = largest_remainder(shares.tolist(), n_rows)
    perm = rng.permutation(n_rows)
    parts = partition_task(n_rows, n_clients, alpha, min_frac, seed)
    start = 0
    for k in range(n_clients):
        assert parts[k].tolist() == sorted(perm[start:start + counts[k]].tolist())
        start += counts[k]


def test_partition_task_same_seed_identical_different_seed_different():
    a = partition_task(500, 8, 0.5, 0.01, 5)
    b = partition_task(500, 8, 0.5, 0.01, 5)
    c = partition_task(500, 8, 0.5, 0.01, 6)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert any(not np.array_equal(x, y) for x, y in zip(a, c))


# ---- partition_all -----------------------------------------------------------------------------------

def test_partition_all_seeds_task_t_with_seed_plus_t():
    sizes = [300, 300, 120, 45]
    seed = 17
    parts = partition_all(sizes, 5, 0.3, 0.02, seed)
    assert len(parts) == len(sizes)
    for t, n in enumerate(sizes):
        ref = partition_task(n, 5, 0.3, 0.02, seed + t)
        assert len(parts[t]) == 5
        assert all(np.array_equal(x, y) for x, y in zip(parts[t], ref))
    # equal-sized tasks are not split identically (each has its own seed)
    assert any(not np.array_equal(x, y) for x, y in zip(parts[0], parts[1]))


def test_partition_all_reproducible_and_seed_sensitive():
    sizes = [200, 80]
    a = partition_all(sizes, 4, 0.5, 0.01, 1)
    b = partition_all(sizes, 4, 0.5, 0.01, 1)
    c = partition_all(sizes, 4, 0.5, 0.01, 2)
    for t in range(2):
        assert all(np.array_equal(x, y) for x, y in zip(a[t], b[t]))
    assert any(not np.array_equal(x, y) for t in range(2) for x, y in zip(a[t], c[t]))


def test_partition_table_is_client_by_task_counts():
    parts = [[np.array([0, 2]), np.array([1]), np.array([], dtype=np.int64)],
             [np.array([], dtype=np.int64), np.array([0, 1, 2, 3]), np.array([4])]]
    table = partition_table(parts)
    assert table.shape == (3, 2)
    assert table.tolist() == [[2, 0], [1, 4], [0, 1]]


# ---- the CLI table is the split a run trains on ------------------------------------------------------

TASKS = ["election", "bbc"]
N_CLIENTS, ALPHA, SEED, MIN_FRAC = 5, 0.3, 7, 0.02


@pytest.fixture(scope="module")
def text5_setup():
    """Load election + bbc once; the config a run would use with the partition flags below."""
    from fltac.config import load_config
    from fltac.data import load_tasks

    cfg = load_config(None, {"data.tasks": TASKS, "partition.n_clients": N_CLIENTS, "partition.alpha": ALPHA,
                             "partition.min_frac": MIN_FRAC, "seed": SEED, "data.max_length": 8,
                             "eval.eval_size": 4, "dtype": "float32"})
    tasks = load_tasks(cfg.data)
    return cfg, tasks


@pytest.fixture(scope="module")
def cli_table(text5_setup, tmp_path_factory):
    from fltac.cli import main

    path = tmp_path_factory.mktemp("partition") / "partition.csv"
    rc = main(["partition", "--scenario", "text5", "--n_clients", str(N_CLIENTS), "--alpha", str(ALPHA),
               "--min_frac", str(MIN_FRAC), "--seed", str(SEED), "--override", "data.tasks=[election,bbc]",
               "--save", str(path)])
    assert rc == 0
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    return rows


def test_cli_partition_csv_layout(cli_table, text5_setup):
    _, tasks = text5_setup
    header, *body = cli_table
    assert header == ["client", *TASKS, "total"]
    assert [int(r[0]) for r in body] == list(range(N_CLIENTS))
    counts = np.array([[int(v) for v in r[1:-1]] for r in body])
    totals = np.array([int(r[-1]) for r in body])
    assert np.array_equal(counts.sum(1), totals)
    # every training row of every task is handed out exactly once
    assert counts.sum(0).tolist() == [len(t.train_texts) for t in tasks]


def test_cli_partition_equals_build_partition(cli_table, text5_setup):
    from fltac.experiment import build_partition

    cfg, tasks = text5_setup
    parts = build_partition(cfg, tasks)
    counts = np.array([[int(v) for v in r[1:-1]] for r in cli_table[1:]])
    expected = np.array([[len(parts[t][k]) for t in range(len(tasks))] for k in range(N_CLIENTS)])
    assert np.array_equal(counts, expected)
    # and build_partition is the seeded recipe: task t with seed + t
    for t, task in enumerate(tasks):
        ref = partition_task(len(task.train_texts), N_CLIENTS, ALPHA, MIN_FRAC, SEED + t)
        assert [len(p) for p in ref] == expected[:, t].tolist()


def test_cli_partition_equals_jobs_of_a_built_experiment(cli_table, text5_setup):
    from fltac.client.train import plan_jobs
    from fltac.experiment import build_experiment

    cfg, tasks = text5_setup
    assert cfg.method == "fltac"
    exp = build_experiment(cfg, tasks)
    counts = np.array([[int(v) for v in r[1:-1]] for r in cli_table[1:]])

    # fltac: one job per (client, task held), its sample count is the table cell
    seen = {}
    for job in exp.jobs:
        assert len(job.tasks) == 1
        key = (job.client, job.tasks[0])
        assert key not in seen
        seen[key] = job.num_examples
        # the job's store rows are that task's rows, and exactly the partition's rows of it
        t = job.tasks[0]
        assert np.all(exp.train_store.task[job.rows] == t)
        lo = exp.space.offsets[t]
        np.testing.assert_array_equal(exp.train_store.labels[job.rows] - lo,
                                      tasks[t].train_labels[exp.parts[t][job.client]])
    for k in range(N_CLIENTS):
        for t in range(len(tasks)):
            if counts[k, t] == 0:
                assert (k, t) not in seen
            else:
                assert seen[(k, t)] == counts[k, t]
    assert sum(seen.values()) == counts.sum()
    # per client, keys are a0, a1, ... in task order
    for k in range(N_CLIENTS):
        mine = [j for j in exp.jobs if j.client == k]
        assert [j.key for j in mine] == [f"a{i}" for i in range(len(mine))]
        assert [j.tasks[0] for j in mine] == [t for t in range(len(tasks)) if counts[k, t] > 0]

    # the other methods plan from the same rows: fedit's job per client = the row total, centralized's = the column
    client_rows = [[np.concatenate([j.rows for j in exp.jobs if j.client == k and j.tasks[0] == t])
                    if counts[k, t] else np.array([], dtype=np.int64) for t in range(len(tasks))]
                   for k in range(N_CLIENTS)]
    fedit = plan_jobs("fedit", client_rows, cfg.train.local_steps)
    assert {j.client: j.num_examples for j in fedit} == {k: int(counts[k].sum()) for k in range(N_CLIENTS)
                                                          if counts[k].sum() > 0}
    for j in fedit:
        assert j.steps == cfg.train.local_steps * int((counts[j.client] > 0).sum())
    central = plan_jobs("centralized", client_rows, cfg.train.local_steps)
    assert [j.num_examples for j in central] == counts.sum(0).tolist()
    assert [j.steps for j in central] == [cfg.train.local_steps * int((counts[:, t] > 0).sum())
                                          for t in range(len(tasks))]


def test_cli_partition_prints_the_table(text5_setup, capsys):
    from fltac.cli import main

    rc = main(["partition", "--n_clients", "3", "--seed", str(SEED), "--override", "data.tasks=[election,bbc]"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "n_clients=3" in out and f"seed={SEED}" in out
    _, tasks = text5_setup
    total_line = [line for line in out.splitlines() if line.startswith("total")][0]
    numbers = [int(x) for x in total_line.split()[1:]]
    n_train = [len(t.train_texts) for t in tasks]
    assert numbers == [*n_train, sum(n_train)]


def test_iid_kind_gives_every_client_an_equal_share_of_every_task():
    parts = partition_all([103, 40], n_clients=4, alpha=0.5, min_frac=0.0, seed=7, iid=True)
    table = partition_table(parts)
    assert table[:, 0].tolist() == [26, 26, 26, 25] and table[:, 1].tolist() == [10] * 4
    for task_parts, n in zip(parts, [103, 40]):
        rows = np.concatenate(task_parts)
        assert sorted(rows.tolist()) == list(range(n))  # disjoint and covering
    again = partition_all([103, 40], n_clients=4, alpha=0.5, min_frac=0.0, seed=7, iid=True)
    assert all((a == b).all() for ta, tb in zip(parts, again) for a, b in zip(ta, tb))
