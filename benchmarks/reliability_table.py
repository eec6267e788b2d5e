"""The reliability table of docs/reliability.md: FL-TAC on a small text5 under attacks, over seeds.

Each row is one ``fltac run`` per seed (the exact command is printed with ``--print-commands``);
runs already finished in ``--root`` are read, not redone, so the script can be stopped and started
again (a run a stopped script left unfinished keeps its ``<run>.lock`` in the root: delete it to redo the
run), and two instances can share a root. Prints the markdown tables (mean and sample standard deviation over the seeds) and writes
the per-run figures to ``--root``/table.json.

    PYTHONPATH=src python benchmarks/reliability_table.py --root results/reliability --seeds 42 43 44 --jobs 2
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

#: The small text5 every row runs on (3 rounds of 3 local steps, evaluated after round 3, one thread), with
#: torch's Bernoulli LoRA-dropout masks, the draws the table was measured with (``lora.dropout_draw``).
SMALL = ["--config", "configs/text5.yaml", "--rounds", "3", "--local_steps", "3", "--eval_every", "3",
         "--override", "data.max_train_per_task=2000", "--override", "eval.eval_size=200",
         "--override", "num_threads=1", "--override", "lora.dropout_draw=bernoulli"]


def attack(clients: list[int], kind: str) -> list[str]:
    return ["--override", f"reliability.attacker_clients=[{','.join(map(str, clients))}]",
            "--override", f"reliability.attack={kind}"]


NOVAL = ["--override", "reliability.validate=false"]
TRIMMED = ["--override", "reliability.aggregation=trimmed_mean"]
FOUR = ["--n_clients", "4"]

#: (row name, table, attack label, clients, aggregation, validation, extra arguments)
ROWS = [("none", "one", "none", 10, "fedavg", "on", []),
        ("none_trimmed", "one", "none", 10, "trimmed_mean", "on", TRIMMED)]
for _kind, _label in [("scale", "scale x100"), ("nan", "NaN"), ("noise", "noise")]:
    ROWS += [(f"{_kind}_fedavg_noval", "one", _label, 10, "fedavg", "off", attack([0], _kind) + NOVAL),
             (f"{_kind}_fedavg_val", "one", _label, 10, "fedavg", "on", attack([0], _kind)),
             (f"{_kind}_trimmed_noval", "one", _label, 10, "trimmed_mean", "off", attack([0], _kind) + NOVAL + TRIMMED),
             (f"{_kind}_trimmed_val", "one", _label, 10, "trimmed_mean", "on", attack([0], _kind) + TRIMMED)]
ROWS += [("four_none", "many", "none", 4, "fedavg", "on", FOUR),
         ("four_scale_val", "many", "client 0 of 4, scale x100", 4, "fedavg", "on", FOUR + attack([0], "scale")),
         ("four_scale_noval", "many", "client 0 of 4, scale x100", 4, "fedavg", "off",
          FOUR + attack([0], "scale") + NOVAL),
         ("four_missing_val", "many", "control: client 0 of 4 sends nothing usable", 4, "fedavg", "on",
          FOUR + attack([0], "missing")),
         ("three_scale_val", "many", "clients 0-2 of 10, scale x100", 10, "fedavg", "on", attack([0, 1, 2], "scale")),
         ("three_missing_val", "many", "control: clients 0-2 of 10 send nothing usable", 10, "fedavg", "on",
          attack([0, 1, 2], "missing")),
         ("three_scale_noval", "many", "clients 0-2 of 10, scale x100", 10, "fedavg", "off",
          attack([0, 1, 2], "scale") + NOVAL)]
#: The order the runs are made in (the issue's rows first), so a partial run still gives whole rows.
ORDER = ["none", "four_none", "four_scale_val", "four_missing_val", "three_scale_val", "three_missing_val", "scale_fedavg_val", "scale_fedavg_noval",
         "four_scale_noval", "three_scale_noval", "nan_fedavg_noval", "nan_fedavg_val", "noise_fedavg_noval",
         "noise_fedavg_val", "none_trimmed", "scale_trimmed_val", "scale_trimmed_noval", "nan_trimmed_noval",
         "nan_trimmed_val", "noise_trimmed_val", "noise_trimmed_noval"]
#: The attack-free row each 'many' row is compared with.
BASELINE = {"four_scale_val": "four_none", "four_scale_noval": "four_none", "three_scale_val": "none",
            "three_scale_noval": "none", "four_none": "four_none", "four_missing_val": "four_none",
            "three_missing_val": "none"}


def command(name: str, extra: list[str], seed: int, root: Path) -> list[str]:
    return ["fltac", "run", *SMALL, *extra, "--seed", str(seed), "--output_dir", str(root / f"{name}_s{seed}"),
            "--quiet"]


def run_one(name: str, extra: list[str], seed: int, root: Path) -> dict | None:
    """Run (or read) one row at one seed: its summary figures, or the one-line error it stopped with; None
    when another instance of this script holds the run (``<run>.lock`` in ``root``, made first)."""
    out = root / f"{name}_s{seed}"
    if not (out / "summary.json").exists() and not (out / "error.txt").exists():
        root.mkdir(parents=True, exist_ok=True)
        try:
            os.close(os.open(root / f"{out.name}.lock", os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            return None
        argv = command(name, extra, seed, root)
        proc = subprocess.run([sys.executable, "-m", "fltac", *argv[1:]], capture_output=True, text=True,
                              env={**os.environ})
        if proc.returncode != 0:
            out.mkdir(parents=True, exist_ok=True)
            (out / "error.txt").write_text(proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "?")
    if (out / "error.txt").exists():
        return {"error": (out / "error.txt").read_text()}
    summary = json.loads((out / "summary.json").read_text())
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    attacks = {(m["round"], m["client"], m["key"]) for m in metrics
               if m["phase"] == "injected" and str(m.get("fault", "")).startswith("attack")}
    dropped = {(m["round"], m["client"], m["key"]) for m in metrics if m["phase"] == "dropped"}
    return {"mean_accuracy": summary["mean_accuracy"], "per_task_accuracy": summary["per_task_accuracy"],
            "clustering_accuracy": summary["clustering_accuracy"], "dropped": summary["dropped_submissions"],
            "attack_adapters": len(attacks), "attack_accepted": len(attacks - dropped),
            "attack_rejected_round1": len({a for a in attacks & dropped if a[0] == 1}),
            "attack_round1": len({a for a in attacks if a[0] == 1}),
            "honest_dropped": len(dropped - attacks)}


def mean_sd(values: list[float]) -> str:
    v = np.array(values, dtype=float)
    return f"{v.mean():.3f} ± {v.std(ddof=1):.3f}" if len(v) > 1 else f"{v.mean():.3f}"


def table_one(results: dict) -> list[str]:
    lines = ["| attack (client 0 of 10) | aggregation | validation | mean accuracy | clustering accuracy "
             "| attacker adapters accepted | adapters dropped |", "|---|---|---|---|---|---|---|"]
    for name, table, label, _, agg, val, _ in ROWS:
        runs = results.get(name)
        if table != "one" or not runs:
            continue
        errors = [r["error"] for r in runs if "error" in r]
        if errors:
            lines.append(f"| {label} | {agg} | {val} | run stops in round 1 ({len(errors)} of {len(runs)} seeds): "
                         f"`{errors[0]}` | | | |")
            continue
        lines.append(f"| {label} | {agg} | {val} | {mean_sd([r['mean_accuracy'] for r in runs])} | "
                     f"{mean_sd([r['clustering_accuracy'] for r in runs])} | "
                     f"{'/'.join(str(r['attack_accepted']) for r in runs)} of "
                     f"{'/'.join(str(r['attack_adapters']) for r in runs)} | "
                     f"{'/'.join(str(r['dropped']) for r in runs)} |")
    return lines


def table_many(results: dict) -> list[str]:
    tasks = next((list(r["per_task_accuracy"]) for runs in results.values() for r in runs if "per_task_accuracy" in r),
                 [])
    lines = ["| attack | validation | rejected in round 1 | attacker adapters accepted | mean accuracy | "
             + " | ".join(tasks) + " |", "|---" * (5 + len(tasks)) + "|"]
    for name, table, label, _, _, val, _ in ROWS:
        runs = results.get(name)
        if table != "many" or not runs or any("error" in r for r in runs):
            continue
        base = results.get(BASELINE.get(name, "none"), [])
        rows = [(f"{label}", runs)] if name != "four_none" else [("none, 4 clients", runs)]
        if name == "three_scale_val":
            rows.insert(0, ("none, 10 clients", base))
        for shown, rr in rows:
            round1 = "/".join(f"{r['attack_rejected_round1']} of {r['attack_round1']}" for r in rr)
            accepted = "/".join(str(r["attack_accepted"]) for r in rr)
            per_task = [mean_sd([r["per_task_accuracy"][t] for r in rr]) for t in tasks]
            lines.append(f"| {shown} | {val} | {round1} | {accepted} | {mean_sd([r['mean_accuracy'] for r in rr])} | "
                         + " | ".join(per_task) + " |")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", default="results/reliability")
    ap.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44])
    ap.add_argument("--jobs", type=int, default=1, help="runs at once (each uses one thread)")
    ap.add_argument("--rows", nargs="*", help="only these rows (default: all)")
    ap.add_argument("--print-commands", action="store_true", help="print each run's command and stop")
    args = ap.parse_args(argv)
    root = Path(args.root)
    rows = [r for r in ROWS if not args.rows or r[0] in args.rows]
    if args.print_commands:
        for name, *_, extra in rows:
            for seed in args.seeds:
                print(shlex.join(command(name, extra, seed, root)))
        return 0
    work = [(name, extra, seed) for name, *_, extra in sorted(rows, key=lambda r: ORDER.index(r[0]))
            for seed in args.seeds]
    with ThreadPoolExecutor(args.jobs) as pool:
        done = list(pool.map(lambda w: run_one(w[0], w[1], w[2], root), work))
    results: dict[str, list[dict]] = {}
    for (name, _, seed), res in zip(work, done):
        if res is not None:
            results.setdefault(name, []).append({"seed": seed, **res})
    (root / "table.json").write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    print("\n".join(table_one(results)))
    print()
    print("\n".join(table_many(results)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
