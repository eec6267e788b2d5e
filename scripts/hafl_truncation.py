"""Accuracy of a finished HAFL/HetLoRA run's global adapter as a rank-r client receives it (docs/hafl.md).

    .venv/bin/python scripts/hafl_truncation.py results/hafl/hafl_truncate_adaptive [RUN_DIR ...] [--round N]

For every r in the runs' client ranks, the final global rank-R adapter is cut to r components, as the
method distributes it to a truncated client: HAFL keeps the top-r by the server's global score, HetLoRA
the first r (:meth:`fltac.server.hafl.HAFL.pick`, :func:`fltac.server.hafl.truncate`). A freeze-mode client receives the full rank-R adapter,
so for it the rank-R row is the model it starts from. Printed as one JSON object per run.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fltac import io
from fltac.config import from_dict
from fltac.experiment import build_experiment
from fltac.methods import method_of
from fltac.server.hafl import truncate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--round", type=int, default=None, help="adapter round (default: the run's last)")
    args = parser.parse_args()
    for run in map(Path, args.runs):
        cfg = from_dict(io.read_json(run / "config.json"))
        r_final = args.round or cfg.train.rounds
        tensors = io.load_tensors(run / "adapters" / f"round_{r_final}.safetensors")
        state = {k.split("/", 1)[1]: v for k, v in tensors.items() if k.startswith("slot0/")}
        scores = {k[len("hafl/score/"):]: v for k, v in tensors.items() if k.startswith("hafl/score/")}
        exp = build_experiment(cfg)
        strategy = method_of(cfg.method).make_strategy(cfg, state, 1, list(state))
        out = {"run": str(run), "method": cfg.method, "mode_aggregation": list(cfg.hafl.resolved(cfg.method)),
               "round": r_final, "accuracy_at_rank": {}}
        for r in sorted(set(cfg.hafl.ranks(cfg.partition.n_clients, cfg.seed)) | {cfg.rank}):
            comps = strategy.pick(scores, r)
            out["accuracy_at_rank"][r] = exp.evaluator.accuracy(truncate(state, comps), 0)
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
