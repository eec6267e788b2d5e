"""The privacy-utility curve of finished runs: a markdown table and a PNG (docs/algorithms.md#differential-privacy).

    python benchmarks/privacy_figure.py results/dp/local_eps1 results/dp/local_eps4 results/dp/local_eps8 \
        results/text5_compare_bits --png docs/img/privacy_utility_text5.png

Reads every run folder under the given folders (each one's ``config.json``, ``metrics.jsonl`` and
``cluster_assignments.jsonl``) and groups runs by (method, privacy mode, target epsilon), over seeds. Per group:
the mean and spread (sample standard deviation) of the served mean accuracy and of the clustering accuracy
(FL-TAC) at the last evaluated round, and the epsilon spent by then. A run without DP is its method's "no DP"
point. An unfinished run counts at its last evaluated round, which the table's "round" column gives.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def run_point(run: Path) -> dict | None:
    """(method, mode, target epsilon, seed, mean accuracy, clustering accuracy, epsilon, rounds done) of a run, at its
    last evaluated round (an unfinished run counts with the rounds it has: the table and the plot say so)."""
    if not (run / "config.json").exists():
        return None
    cfg = json.loads((run / "config.json").read_text())
    records = _jsonl(run / "metrics.jsonl")
    evals = [r for r in records if r["phase"] == "eval"]
    if not evals:
        return None
    last = max(r["round"] for r in evals)
    line = next(r for r in records if r["phase"] == "round" and r["round"] == last)
    clusters = [c for c in _jsonl(run / "cluster_assignments.jsonl") if c["round"] == last]
    accs = [r["accuracy"] for r in evals if r["round"] == last]
    privacy = cfg.get("privacy", {"mode": "none", "target_epsilon": None})  # runs from before DP existed have none
    return {"method": cfg["method"], "mode": privacy["mode"], "target": privacy["target_epsilon"],
            "seed": cfg["seed"], "accuracy": sum(accs) / len(accs), "round": last, "of": cfg["train"]["rounds"],
            "clustering": clusters[0]["clustering_accuracy"] if clusters else None, "epsilon": line.get("epsilon")}


def spread(values: list[float]) -> str:
    if not values:
        return "-"
    mean = statistics.fmean(values)
    return f"{mean:.3f} ± {statistics.stdev(values):.3f}" if len(values) > 1 else f"{mean:.3f}"


def groups(points: list[dict]) -> dict[tuple, list[dict]]:
    """Runs by (method, mode, target epsilon): no DP first, then by decreasing epsilon."""
    out: dict[tuple, list[dict]] = {}
    for p in points:
        out.setdefault((p["method"], p["mode"], p["target"]), []).append(p)
    return dict(sorted(out.items(), key=lambda kv: (kv[0][0], kv[0][1] != "none", -(kv[0][2] or 0))))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folders", nargs="+", type=Path, help="folders holding run folders")
    parser.add_argument("--png", type=Path)
    parser.add_argument("--methods", nargs="+", default=["fltac", "fedit"], help="methods kept (default: fltac fedit)")
    args = parser.parse_args(argv)
    points = [p for folder in args.folders for run in sorted(folder.iterdir()) if run.is_dir()
              for p in [run_point(run)] if p is not None and p["method"] in args.methods]
    table = groups(points)
    print("| method | DP | target epsilon | round | epsilon spent | seeds | mean accuracy | clustering accuracy |")
    print("|---|---|---|---|---|---|---|---|")
    for (method, mode, target), runs in table.items():
        eps = f"{runs[0]['epsilon']:.3f}" if runs[0]["epsilon"] is not None else "∞"
        done = sorted({f"{r['round']} of {r['of']}" for r in runs})
        print(f"| {method} | {mode} | {target if target is not None else '-'} | {', '.join(done)} | {eps} | "
              f"{', '.join(str(r['seed']) for r in sorted(runs, key=lambda r: r['seed']))} | "
              f"{spread([r['accuracy'] for r in runs])} | "
              f"{spread([r['clustering'] for r in runs if r['clustering'] is not None])} |")
    if args.png:
        from fltac.eval.report import pyplot, save_figure

        plt = pyplot()

        fig, (ax_acc, ax_clu) = plt.subplots(1, 2, figsize=(9, 3.6), dpi=100)
        targets = sorted({t for (_, mode, t) in table if mode != "none"})
        none_x = (max(targets) * 2) if targets else 1.0  # "no DP" drawn right of the largest epsilon
        colour = {m: f"C{i}" for i, m in enumerate(sorted({m for (m, _, _) in table}))}  # one per method, both panels
        for (method, mode) in sorted({(m, mode) for (m, mode, _) in table if mode != "none"}):
            xs = sorted(t for (m, md, t) in table if m == method and md == mode)
            rows = [table[(method, mode, t)] for t in xs]
            if (method, "none", None) in table:
                xs, rows = xs + [none_x], rows + [table[(method, "none", None)]]
            for ax, key in ((ax_acc, "accuracy"), (ax_clu, "clustering")):
                vals = [[r[key] for r in runs if r[key] is not None] for runs in rows]
                if not all(vals):
                    continue
                means = [statistics.fmean(v) for v in vals]
                errs = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in vals]
                ax.errorbar(xs, means, yerr=errs, marker="o", capsize=3, label=f"{method} ({mode} DP)",
                            color=colour[method])
        for ax, what in ((ax_acc, "served mean test accuracy"), (ax_clu, "clustering accuracy (last round)")):
            ax.set_xscale("log")
            ax.set_xticks(targets + [none_x], [f"{t:g}" for t in targets] + ["no DP"])
            ax.minorticks_off()
            ax.set_xlabel("target epsilon (delta 1e-5, whole run)")
            ax.set_ylabel(what)
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=8)
        save_figure(fig, args.png)
        print(f"saved {args.png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
