"""Tables for FL-TAC with an unknown number of tasks (docs/fltac.md, "Unknown number of tasks").

Two parts, each printed as markdown:

``--saved RUN ...``: offline, on finished FL-TAC runs (K given) that saved their submissions
(``adapters/submissions_round_<t>.safetensors``, rounds 1 and last): the K each selector would have chosen
in those rounds, from the very vectors the server clustered (:func:`fltac.eval.report.kmeans_features`), with
the planted number of tasks beside it. No training.

``--runs ROOT``: the measurement runs under ROOT, named ``<set>_<auto|given>_s<seed>`` (as
``benchmarks/autok_runs.sh`` writes them): per set and seed, the K chosen in each round, the last round's
clustering accuracy, and the mean accuracy of the serving adapters after the last round, auto against K given.

    PYTHONPATH=src python benchmarks/autok_table.py --saved results/text5_compare/fltac_seed42 ...
    PYTHONPATH=src python benchmarks/autok_table.py --runs results/autok
"""

from __future__ import annotations

import argparse
import re
from collections import defaultdict
from pathlib import Path

from fltac import io
from fltac.compare import cell
from fltac.config import from_dict
from fltac.eval.report import kmeans_features, load_run, submission_rounds
from fltac.server.strategies import make_fltac

RUN_NAME = re.compile(r"(?P<set>\w+?)_(?P<mode>auto|given)_s(?P<seed>\d+)$")


def saved_table(paths: list[Path]) -> str:
    """Per saved run and round: tasks present, K by eigengap and by silhouette, each selector's scores."""
    lines = ["| run | round | submissions | tasks | K by eigengap | K by silhouette |", "|---|---|---|---|---|---|"]
    for path in paths:
        run = load_run(path)
        selectors = {how: make_fltac(from_dict({**run.config, "server": {**run.config["server"], "n_clusters": "auto",
                                                                         "k_selection": how}}), {}, 0, [])
                     for how in ("eigengap", "silhouette")}
        for r in submission_rounds(run):
            features, tasks, _ = kmeans_features(run, r)
            chosen = {how: strategy.choose_k(features, r)[0] for how, strategy in selectors.items()}
            lines.append(f"| {path.name} ({path.parent.name}) | {r} | {len(tasks)} | {len(set(tasks))} | "
                         f"{chosen['eigengap']} | {chosen['silhouette']} |")
    return "\n".join(lines)


def run_figures(path: Path) -> dict:
    """K per round (auto runs), the last round's clustering accuracy, the final mean served accuracy, wall time."""
    clusters = io.read_jsonl(path / "cluster_assignments.jsonl")
    summary = io.read_json(path / "summary.json")
    return {"k": [c.get("n_clusters") for c in clusters], "slots": clusters[-1].get("n_slots"),
            "clustering": [c["clustering_accuracy"] for c in clusters], "accuracy": summary["mean_accuracy"],
            "wall": summary["wall_seconds"], "tasks": len(summary["tasks"])}


def runs_table(root: Path) -> str:
    """One row per (set, seed) with both an auto and a given run finished; then the mean and spread per set."""
    found: dict[tuple[str, int], dict[str, dict]] = defaultdict(dict)
    for path in sorted(root.iterdir()):
        match = RUN_NAME.match(path.name)
        if match and (path / "summary.json").exists():
            found[(match["set"], int(match["seed"]))][match["mode"]] = run_figures(path)
    lines = ["| set | tasks | seed | K chosen per round (slots at the end) | clustering accuracy per round, auto / "
             "K given | mean accuracy, auto / K given | wall s, auto / K given |", "|---|---|---|---|---|---|---|"]
    per_set: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for (name, seed), modes in sorted(found.items()):
        if set(modes) != {"auto", "given"}:
            continue
        auto, given = modes["auto"], modes["given"]
        fmt = lambda xs: " ".join(f"{x:.3f}" for x in xs)  # noqa: E731
        lines.append(f"| {name} | {auto['tasks']} | {seed} | {' '.join(map(str, auto['k']))} ({auto['slots']}) | "
                     f"{fmt(auto['clustering'])} / {fmt(given['clustering'])} | "
                     f"{auto['accuracy']:.3f} / {given['accuracy']:.3f} | {auto['wall']:.0f} / {given['wall']:.0f} |")
        per_set[name].append((auto["accuracy"], given["accuracy"]))
    lines += ["", "| set | seeds | mean accuracy auto (mean ± sample sd) | K given (mean ± sample sd) |", "|---|---|---|---|"]
    for name, pairs in per_set.items():
        auto, given = zip(*pairs)
        lines.append(f"| {name} | {len(pairs)} | {cell(list(auto), '.3f')} | {cell(list(given), '.3f')} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--saved", nargs="*", type=Path, default=[], help="finished FL-TAC runs with saved submissions")
    parser.add_argument("--runs", type=Path, help="folder of <set>_<auto|given>_s<seed> runs")
    args = parser.parse_args()
    if args.saved:
        print(saved_table(args.saved))
    if args.runs:
        print(runs_table(args.runs))


if __name__ == "__main__":
    main()
