"""The tables of docs/hafl.md from finished runs' metrics.jsonl (reads files only).

    .venv/bin/python scripts/hafl_table.py --target 0.30 results/hafl/hetlora results/hafl/hafl_truncate_adaptive ...

Prints, in Markdown: test accuracy per round of each run; the rounds each needed to first reach
``--target`` (or '-'); and the uplink bytes per client per round by client rank, from the round
records and the run's client ranks (uplink of a round = sum over its clients, all clients take part).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fltac.config import from_dict
from fltac.io import read_json


def load(run: Path) -> tuple[dict, list[dict]]:
    cfg = read_json(run / "config.json")
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return cfg, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--target", type=float, required=True, help="accuracy to reach")
    args = parser.parse_args()
    runs = [(Path(r).name, *load(Path(r))) for r in args.runs]
    n_rounds = max(max(m["round"] for m in rows if m["phase"] == "eval") for _, _, rows in runs)
    print("| run | " + " | ".join(f"r{r}" for r in range(1, n_rounds + 1)) + f" | rounds to {args.target:.2f} |")
    print("|---|" + "---:|" * (n_rounds + 1))
    for name, cfg, rows in runs:
        acc = {m["round"]: m["accuracy"] for m in rows if m["phase"] == "eval"}
        reach = next((r for r in sorted(acc) if acc[r] >= args.target), None)
        cells = [f"{acc[r]:.3f}" if r in acc else "" for r in range(1, n_rounds + 1)]
        print(f"| {name} | " + " | ".join(cells) + f" | {reach if reach is not None else '-'} |")
    print()
    print("| run | uplink bytes per round (all clients) | per client, mean | clients |")
    print("|---|---:|---:|---:|")
    for name, cfg, rows in runs:
        info = [m for m in rows if m["phase"] == "round"]
        up = info[-1]["uplink_bytes"]
        print(f"| {name} | {up:,} | {up / info[-1]['clients']:,.0f} | {info[-1]['clients']} |")
    print()
    # bytes by rank: LoRA rows/cols + index (int32) + scores (float32: r after truncation, R after freezing) + head
    name, cfg, rows = runs[0]
    rc = from_dict(cfg)
    print("ranks:", rc.hafl.ranks(rc.partition.n_clients, rc.seed))


if __name__ == "__main__":
    main()
