"""The text5 table of docs/algorithms.md: one row per algorithm, FL-TAC and FedIT over the same seeds.

Each argument is ``LABEL=FOLDER``, FOLDER being the ``--out`` of one ``fltac compare`` (its run folders
``<method>_seed<seed>/``). Per row and method: the served mean test accuracy after the last round (mean ± sample
standard deviation over the seeds, then each seed's), FL-TAC's clustering accuracy in the last round, and the
uplink: bytes per client per round (the run's uplink over the clients of each round summed over rounds, averaged over seeds).

    PYTHONPATH=src python benchmarks/algorithms_table.py "FedAvg=results/text5_compare_bits" \\
        "Krum=results/alg/krum" "FedAdam=results/alg/fedadam" ...
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from fltac.compare import cell, table
from fltac.eval.report import load_run

PAIR = re.compile(r"(?P<method>\w+?)_seed(?P<seed>\d+)$")
METHODS = ("fltac", "fedit")


def runs_of(folder: Path) -> dict[tuple[str, int], object]:
    """The finished runs of one compare folder, ``{(method, seed): Run}``, in seed order (FL-TAC and FedIT only)."""
    found = {}
    for path in sorted(folder.iterdir()):
        m = PAIR.match(path.name)
        if m and m["method"] in METHODS and (path / "summary.json").is_file():
            found[(m["method"], int(m["seed"]))] = load_run(path)
    return dict(sorted(found.items(), key=lambda kv: (kv[0][0], kv[0][1])))


def uplink_per_client_round(runs: list) -> float:
    """Mean over runs of uplink bytes / (the clients of each round, summed over rounds)."""
    per = []
    for run in runs:
        client_rounds = sum(r["clients"] for r in run.metrics if r["phase"] == "round")
        per.append(run.summary["uplink_bytes"] / client_rounds)
    return sum(per) / len(per)


def row(label: str, folder: Path) -> list[str]:
    runs = runs_of(folder)
    figures = table(runs)
    cells = [label]
    for method in METHODS:
        per = figures.get(method)
        if per is None:
            cells += ["-", "-"]
            continue
        seeds = [s for (m, s) in runs if m == method]
        values = " / ".join(f"{v:.3f}" for v in per["accuracy/mean"])
        cells += [f"{cell(per['accuracy/mean'], '.3f')} ({values}; seeds {', '.join(map(str, seeds))})",
                  f"{uplink_per_client_round([r for (m, _), r in runs.items() if m == method]) / 1e3:.1f}"]
    clustering = figures.get("fltac", {})
    last = sorted((k for k in clustering if k.startswith("clustering_accuracy/")), key=lambda k: int(k.rsplit("_", 1)[1]))
    cells.append(cell(clustering[last[-1]], ".3f") if last else "-")
    return cells


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("rows", nargs="+", metavar="LABEL=FOLDER")
    args = parser.parse_args(argv)
    head = ["algorithm", "FL-TAC accuracy", "FL-TAC uplink (kB per client-round)", "FedIT accuracy",
            "FedIT uplink (kB per client-round)", "FL-TAC clustering accuracy (last round)"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for item in args.rows:
        label, _, folder = item.partition("=")
        print("| " + " | ".join(row(label, Path(folder))) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
