"""``fltac compare``: every (method, seed) of one config, run or resumed, then tables of mean ± std over seeds.

    fltac compare --config configs/text5.yaml --methods fltac fedit centralized --seeds 42 43 44 \\
                  --out results/text5_compare [--alpha 0.1] [--override KEY=VALUE ...]

Each pair runs through the in-process engine, as ``fltac run`` does, into ``OUT/<method>_seed<seed>/`` with
``--resume`` semantics: a finished pair is not retrained (the engine checks its config snapshot against the
pair's config, stops with an error if they differ, else returns the summary it wrote), an interrupted one
continues after its last checkpointed round, a missing one starts.

Shared across the runs of one call: the loaded tasks (the engine's ``tasks=``). The tokenised rows are
shared through ``data.token_cache`` (on by default: a run after the first reads them from disk, about 0.6 s
for text5 instead of 13 s). Not shared: the backbone. A run's model is a function of its seed (the new head
is drawn inside ``from_pretrained`` and LoRA's A inside peft, both from torch's global generator) and of its
method (dtype, staged backbone), so a reused model would have to replay those libraries' draws to stay
bit-identical to a lone ``fltac run``; building it costs about half a second (MiniLM) against minutes of
training, so each run builds its own.

Writes ``OUT/comparison.md``, ``OUT/comparison.csv`` and ``fltac report``'s report.md, report.html and plots
of all the runs (:func:`fltac.eval.report.build_report`). The spread is the sample standard deviation
(ddof=1) over seeds, undefined for one seed.
"""

from __future__ import annotations

import csv
import os
import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fltac.config import ConfigError, RunConfig

if TYPE_CHECKING:  # the report module loads torch: imported where used, so a config error answers at once
    from fltac.eval.report import Run

CSV_HEAD = ["method", "quantity", "mean", "std", "n_seeds", "seeds", "values"]


def pair_dir(out: str | Path, method: str, seed: int) -> Path:
    """The run folder of ``(method, seed)`` inside a comparison's folder."""
    return Path(out) / f"{method}_seed{seed}"


def check_distinct(name: str, values: list) -> None:
    repeated = sorted({str(v) for v in values if values.count(v) > 1})
    if repeated:
        raise ConfigError(f"{name}: {', '.join(repeated)} given more than once")


def run_pairs(configs: dict[tuple[str, int], RunConfig], quiet: bool = False) -> None:
    """Run, resume or skip (finished) each pair's run, loading the tasks once."""
    from fltac.data import load_tasks
    from fltac.engines.inprocess import RunError, run

    tasks = None
    for i, ((method, seed), cfg) in enumerate(configs.items(), 1):
        out = Path(cfg.output_dir)
        if not quiet:
            print(f"[fltac compare] {i}/{len(configs)}: {method}, seed {seed} -> {out}", file=sys.stderr, flush=True)
        if tasks is None and not (out / "summary.json").is_file():
            tasks = load_tasks(cfg.data)
        try:
            run(cfg, resume=out.exists(), tasks=tasks, quiet=quiet)
        except RunError as exc:
            raise ConfigError(f"{exc} (pair {method}, seed {seed}: choose another --out for a different config)") \
                from None


def quantities(run: Run) -> dict[str, float]:
    """The compared figures of one run: ``{metric}/{task}``, ``{metric}/mean``, ``clustering_accuracy/round_{r}``
    (clustering methods only), ``uplink_bytes``, ``wall_seconds``."""
    from fltac.eval.report import clustering_by_round

    s, metric = run.summary, run.metric
    values = {f"{metric}/{task}": s[f"per_task_{metric}"][task] for task in run.tasks}
    values[f"{metric}/mean"] = s[f"mean_{metric}"]
    values.update({f"clustering_accuracy/round_{r}": acc for r, acc in zip(*clustering_by_round(run))})
    values.update(uplink_bytes=s["uplink_bytes"], wall_seconds=s["wall_seconds"])
    return values


def spread(values: list[float]) -> tuple[float, float | None]:
    """(mean, sample standard deviation with ddof=1; None for a single value)."""
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else None


def table(runs: dict[tuple[str, int], Run]) -> dict[str, dict[str, list[float]]]:
    """``{method: {quantity: [value per seed, in seed order]}}``."""
    out: dict[str, dict[str, list[float]]] = {}
    for (method, _), run in runs.items():
        for name, value in quantities(run).items():
            out.setdefault(method, {}).setdefault(name, []).append(value)
    return out


def write_csv(path: Path, figures: dict[str, dict[str, list[float]]], seeds: list[int]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(CSV_HEAD)
        for method, per in figures.items():
            for name, values in per.items():
                mean, std = spread(values)
                writer.writerow([method, name, repr(mean), "" if std is None else repr(std), len(values),
                                 " ".join(map(str, seeds)), " ".join(map(str, values))])


def cell(values: list[float], spec: str, scale: float = 1.0) -> str:
    mean, std = spread([v / scale for v in values])
    return format(mean, spec) + ("" if std is None else f" ± {format(std, spec)}")


def blocks(figures: dict[str, dict[str, list[float]]], runs: dict[tuple[str, int], Run], seeds: list[int],
           command: str) -> list[tuple]:
    """The document, as :func:`fltac.eval.report.render_markdown` blocks."""
    from fltac.eval.report import LABELS

    first = next(iter(runs.values()))
    metric, tasks = first.metric, first.tasks
    what = f"test {LABELS[metric]}" + (" (lower is better)" if metric == "lm_loss" else "")
    doc = [("h1", "fltac compare"), ("code", command),
           ("p", f"Seeds: {', '.join(map(str, seeds))} (n = {len(seeds)}). Each cell: mean ± sample standard "
                 "deviation (ddof=1) over the seeds" + (" (one seed: no spread)" if len(seeds) == 1 else "")
                 + ". Runs: `<method>_seed<seed>/` in this folder; every figure per seed is in comparison.csv."),
           ("h2", f"{what[0].upper()}{what[1:]} per task, after the last round"),
           ("table", ["method", *tasks, "mean"],
            [[m, *(cell(per[f"{metric}/{t}"], ".4f") for t in [*tasks, "mean"])] for m, per in figures.items()]),
           ("p", "The serving global adapter of each task; the mean is over tasks.")]
    clustered = {m: per for m, per in figures.items() if any(k.startswith("clustering_accuracy/") for k in per)}
    if clustered:
        rounds = [k for k in next(iter(clustered.values())) if k.startswith("clustering_accuracy/")]
        doc += [("h2", "Clustering accuracy per round"),
                ("table", ["method", *(f"round {k.rsplit('_', 1)[1]}" for k in rounds)],
                 [[m, *(cell(per[k], ".3f") for k in rounds)] for m, per in clustered.items()])]
    doc += [("h2", "Cost"),
            ("table", ["method", "uplink per run (MB)", "wall time per run (s)"],
             [[m, cell(per["uplink_bytes"], ".3f", 1e6), cell(per["wall_seconds"], ".1f")] for m, per in figures.items()]),
            ("p", f"CPU: {first.summary.get('cpu', '?')}; load average when this table was written: "
                  f"{', '.join(f'{x:.2f}' for x in os.getloadavg())} (1, 5, 15 min). Wall time includes setup; the runs "
                  "of one call share the loaded tasks, and with data.token_cache only the first run of a data "
                  "config pays for tokenising."),
            ("h2", "Per seed"),
            ("table", ["method", "seed", f"mean {metric}", "final clustering accuracy", "wall time (s)"],
             [[m, str(seed), f"{r.summary[f'mean_{metric}']:.4f}",
               "-" if r.summary["clustering_accuracy"] is None else f"{r.summary['clustering_accuracy']:.3f}",
               f"{r.summary['wall_seconds']:.1f}"] for (m, seed), r in runs.items()]),
            ("h2", "Plots"),
            ("p", "From `fltac report` on all the runs (report.md, report.html in this folder)."),
            ("img", "accuracy_vs_uplink.png", "mean accuracy against cumulative uplink bytes"),
            ("img", "accuracy_per_round.png", "per-task accuracy per round")]
    if clustered:
        doc.append(("img", "clustering_accuracy.png", "clustering accuracy per round"))
    return doc


def compare(configs: dict[tuple[str, int], RunConfig], out: str | Path, command: str, quiet: bool = False) -> Path:
    """Run every ``(method, seed)`` config (resumably), then write comparison.md, comparison.csv and the
    report's plots into ``out``; return comparison.md."""
    from fltac.eval.report import build_report, load_run, render_markdown

    out = Path(out)
    run_pairs(configs, quiet)
    runs = {pair: load_run(cfg.output_dir) for pair, cfg in configs.items()}
    seeds = list(dict.fromkeys(seed for _, seed in configs))
    figures = table(runs)
    write_csv(out / "comparison.csv", figures, seeds)
    build_report([cfg.output_dir for cfg in configs.values()], out, command=command)
    md = out / "comparison.md"
    md.write_text(render_markdown(blocks(figures, runs, seeds, command)))
    return md


def command_line(args) -> str:
    """The ``fltac compare`` command ``args`` (its parsed namespace) stands for, flags in a fixed order."""
    parts = ["fltac", "compare"] + (["--config", args.config] if args.config else [])
    parts += [f"--{name[5:]}={value}" for name, value in vars(args).items() if name.startswith("flag_") and value is not None]
    parts += [f"--override={text}" for text in args.override]
    parts += ["--methods", *args.methods, "--seeds", *map(str, args.seeds), "--out", args.out]
    return shlex.join(parts)
