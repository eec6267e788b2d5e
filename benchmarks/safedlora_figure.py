"""Accuracy against cumulative uplink bytes for finished runs: a markdown table and a PNG (docs/safedlora.md).

    python benchmarks/safedlora_figure.py results/sa_small_fedavg_full results/sa_small_fedit \
        results/sa_small_safedlora --png docs/img/safedlora_acc_vs_uplink.png

Reads only each run's ``metrics.jsonl`` and ``summary.json``. The first run named is the reference of the
"uplink vs reference" column (FedAvg of full fine-tuning).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def curve(run: Path) -> list[tuple[int, float, int]]:
    """(round, mean accuracy over tasks, cumulative uplink bytes) for every evaluated round."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    up, out = 0, []
    for r in sorted({rec["round"] for rec in records if rec["phase"] == "round"}):
        up += sum(rec["uplink_bytes"] for rec in records if rec["phase"] == "round" and rec["round"] == r)
        accs = [rec["accuracy"] for rec in records if rec["phase"] == "eval" and rec["round"] == r]
        if accs:
            out.append((r, sum(accs) / len(accs), up))
    return out


def label(run: Path) -> str:
    """The method, with SA-FedLoRA's initiating-stage mode (from the run's config.json)."""
    cfg = json.loads((run / "config.json").read_text())
    if cfg["method"] == "safedlora":
        return f"safedlora (init {cfg['safedlora']['init_train']})"
    return cfg["method"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--png", type=Path)
    args = parser.parse_args(argv)
    curves = {run: curve(run) for run in args.runs}
    summaries = {run: json.loads((run / "summary.json").read_text()) if (run / "summary.json").exists() else None
                 for run in args.runs}
    ref_up = curves[args.runs[0]][-1][2]
    ref_acc = curves[args.runs[0]][-1][1]
    tasks = sorted({t for s in summaries.values() if s for t in s["per_task_accuracy"]})
    print("| method | rounds | " + " | ".join(tasks) + " | mean acc | acc - ref | cumulative uplink | uplink vs ref |")
    print("|---" * (6 + len(tasks)) + "|")
    for run, points in curves.items():
        rnd, acc, up = points[-1]
        s = summaries[run]
        method = label(run)
        per = [f"{s['per_task_accuracy'][t]:.3f}" if s else "-" for t in tasks]
        print(f"| {method} | {rnd} | " + " | ".join(per) + f" | {acc:.3f} | {acc - ref_acc:+.3f} | "
              f"{up / 1e6:.2f} MB | {100 * up / ref_up:.2f}% ({100 * (1 - up / ref_up):.1f}% fewer) |")
    if args.png:
        from fltac.eval.report import pyplot, save_figure

        plt = pyplot()

        fig, ax = plt.subplots(figsize=(6, 3.6), dpi=100)
        for run, points in curves.items():
            ax.plot([p[2] / 1e6 for p in points], [p[1] for p in points], marker="o", label=label(run))
        ax.set_xscale("log")
        ax.set_xlabel("cumulative uplink (MB, all clients, log scale)")
        ax.set_ylabel("mean test accuracy")
        ax.grid(True, alpha=0.3)
        ax.legend()
        save_figure(fig, args.png)
        print(f"saved {args.png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
