"""Print a markdown table of per-task accuracy, clustering accuracy and bytes from run folders.

    python scripts/results_table.py results/text5_fltac results/text5_fedit results/text5_centralized
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(dirs: list[str]) -> None:
    runs = [(d, json.loads((Path(d) / "summary.json").read_text())) for d in dirs]
    tasks = runs[0][1]["tasks"]
    print("| run | " + " | ".join(tasks) + " | mean | personalised mean | clustering acc | uplink MB | params/adapter | wall s |")
    print("|---" * (len(tasks) + 7) + "|")
    for d, s in runs:
        acc = " | ".join(f"{s['per_task_accuracy'][t]:.3f}" for t in tasks)
        ca = "-" if s["clustering_accuracy"] is None else f"{s['clustering_accuracy']:.3f}"
        print(f"| `{Path(d).name}` ({s['method']}, r={s['lora_rank']}) | {acc} | {s['mean_accuracy']:.3f} | "
              f"{s['mean_personalized_accuracy']:.3f} | {ca} | {s['uplink_bytes'] / 1e6:.1f} | "
              f"{s['trainable_params_per_adapter']:,} | {s['wall_seconds']:.0f} |")
    print()
    print("clustering accuracy per round:")
    for d, s in runs:
        path = Path(d) / "cluster_assignments.jsonl"
        rows = [json.loads(line) for line in path.read_text().splitlines() if line] if path.exists() else []
        if rows:
            print(f"- `{Path(d).name}`: " + ", ".join(f"{r['clustering_accuracy']:.3f}" for r in rows))


if __name__ == "__main__":
    main(sys.argv[1:])
