#!/usr/bin/env python
"""Per-round cost of Flower versus the in-process engine, on one config: the numbers in docs/flower.md.

    unshare -n bash -c 'ip link set lo up; python scripts/flower_overhead.py --config configs/text5.yaml \
        --override partition.n_clients=4 --override train.rounds=3 --out results/overhead [--deployment]'

Runs the config with the in-process engine, then on Flower's simulation runtime (and, with
``--deployment``, through a local SuperLink + SuperNodes via scripts/flower_local.py), each into its own
folder under ``--out``, and prints per engine the median over rounds of ``train_seconds`` (sending the
broadcasts, training every client, collecting the submissions: the only step that differs) and of the
whole round; with ``--secagg`` also a run with Flower's SecAgg+ (FedIT) and the largest difference of its
final adapter from the plain simulation's. Round 1 is reported apart: it includes the nodes' start-up (Ray actors import torch and
build the model). On a shared machine, run it more than once.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


#: The overrides of the ``--secagg`` run: Flower's SecAgg+, with the per-client screening it rules out turned off.
SECAGG = {"secure_aggregation.enabled": True, "reliability.validate": False}


def rounds_of(out: Path) -> list[dict]:
    return [m for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if m["phase"] == "round"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--override", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--out", required=True)
    ap.add_argument("--deployment", action="store_true", help="also through a local SuperLink + SuperNodes")
    ap.add_argument("--secagg", action="store_true", help="also on the simulation runtime with Flower's SecAgg+ "
                    "(secure_aggregation.enabled, reliability.validate false; a method that allows it: fedit)")
    args = ap.parse_args(argv)

    from fltac.config import load_config, parse_override

    base = dict(parse_override(o) for o in args.override)
    out = Path(args.out).resolve()
    folders = {}
    engines = ["inprocess", "flower-sim"] + (["flower-sim-secagg"] if args.secagg else []) + (
        ["flower-deployment"] if args.deployment else [])
    for engine in engines:
        folder = out / engine
        folders[engine] = folder
        cfg = load_config(args.config, {**base, **(SECAGG if engine == "flower-sim-secagg" else {}),
                                        "output_dir": str(folder)})
        if engine == "inprocess":
            from fltac.engines.inprocess import run

            run(cfg, overwrite=True, quiet=True)
        elif engine.startswith("flower-sim"):
            from fltac.engines.flower import run_simulation

            run_simulation(cfg, overwrite=True, quiet=True)
        else:
            import flower_local

            rc = flower_local.main(["--nodes", str(cfg.partition.n_clients), "--config", str(Path(args.config).resolve()),
                                    "--overrides", json.dumps({**base, "output_dir": str(folder)}), "--overwrite"])
            if rc != 0:
                print(f"deployment run failed (rc {rc})", file=sys.stderr)
                return rc

    rows = []
    for engine, folder in folders.items():
        rs = rounds_of(folder)
        later = rs[1:] or rs
        rows.append({"engine": engine, "rounds": len(rs),
                     "round1_train_s": rs[0]["train_seconds"],
                     "median_train_s": float(np.median([m["train_seconds"] for m in later])),
                     "median_round_s": float(np.median([m["seconds"] for m in later])),
                     "uplink_MB_per_round": float(np.mean([m["uplink_bytes"] for m in rs])) / 1e6,
                     "downlink_MB_per_round": float(np.mean([m["downlink_bytes"] for m in rs])) / 1e6})
    ref = rows[0]["median_train_s"]
    print(f"{'engine':<18}{'round 1 train s':>16}{'median train s':>16}{'overhead s':>12}{'median round s':>16}"
          f"{'up MB/round':>13}{'down MB/round':>15}")
    for row in rows:
        print(f"{row['engine']:<18}{row['round1_train_s']:>16.2f}{row['median_train_s']:>16.2f}"
              f"{row['median_train_s'] - ref:>12.2f}{row['median_round_s']:>16.2f}"
              f"{row['uplink_MB_per_round']:>13.3f}{row['downlink_MB_per_round']:>15.3f}")
    if args.secagg:  # how far SecAgg+'s quantised mean moved the final adapter from the plain Flower run's
        from fltac.io import load_tensors

        last = f"round_{len(rounds_of(folders['flower-sim']))}.safetensors"
        a, b = (load_tensors(folders[e] / "adapters" / last) for e in ("flower-sim", "flower-sim-secagg"))
        rows[2]["max_abs_adapter_diff"] = max(  # rows: inprocess, flower-sim, flower-sim-secagg, ...
            float((a[k] - b[k]).abs().max()) for k in a)
        print(f"SecAgg+ vs plain Flower, final adapter: max |difference| {rows[2]['max_abs_adapter_diff']:.3g}")
    (out / "overhead.json").write_text(json.dumps({"rows": rows, "load_average": os.getloadavg(),
                                                   "cpus": os.cpu_count()}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
