"""What the shared output layer tells the server: the task of each FL-TAC submission, read from its head alone.

    python scripts/head_leak.py results/text5_compare/fltac_seed42

Every task owns a slice of the shared output layer (``tasks.json``: its offset and labels), and a row's loss
is masked to its task's slice, so an adapter's head update is exactly zero outside the slices of the tasks it
trained. This reads round 1's submissions (``adapters/submissions_round_1.safetensors``; their start is the
initial adapter, saved beside them), names for each the task slices whose head rows moved, and compares that
with the true task (``cluster_assignments.jsonl``, measurement only). No task label is used to read it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from safetensors.torch import load_file


def moved_tasks(update: dict, tasks: list[dict]) -> list[str]:
    """Names of the tasks whose head rows (weight and bias) changed."""
    moved = (update["classifier.weight"].abs().sum(dim=1) + update["classifier.bias"].abs()) > 0
    return [t["name"] for t in tasks if bool(moved[t["offset"]: t["offset"] + len(t["labels"])].any())]


def main(run: str) -> None:
    folder = Path(run)
    tasks = json.loads((folder / "tasks.json").read_text())
    tensors = load_file(folder / "adapters" / "submissions_round_1.safetensors")
    initial = {k.removeprefix("initial/"): v for k, v in tensors.items() if k.startswith("initial/")}
    truth = {(a["client"], a["key"]): a["task"] for a in
             json.loads((folder / "cluster_assignments.jsonl").read_text().splitlines()[0])["assignments"]}
    right = still = 0
    for (client, key), task in sorted(truth.items()):
        prefix = f"{client}/{key}/"
        update = {k: tensors[prefix + k] - initial[k] for k in ("classifier.weight", "classifier.bias")}
        moved = moved_tasks(update, tasks)
        right += moved == [task]
        still += not moved
    print(f"{run}: round 1, {right} of {len(truth)} submissions' task read from which head rows moved "
          f"(moved rows = exactly one task's slice, and it is the true task); {still} with no head row moved "
          f"(an adapter that took no step in the round)")


if __name__ == "__main__":
    main(sys.argv[1])
