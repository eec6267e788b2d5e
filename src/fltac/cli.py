"""``fltac`` command line: the only reader of argv. Parses, builds a validated RunConfig, calls an engine.

    fltac run --config configs/text5.yaml [--method fedit] [--rounds 3] [--override train.lr=1e-3] [--resume]
    fltac partition --scenario text5 [--alpha 0.1] [--save partition.csv]
"""

from __future__ import annotations

import argparse
import csv
import sys

from fltac.assets import AssetMissing
from fltac.config import FLAG_KEYS, ConfigError, load_config, parse_override
from fltac.io import AdapterFileError
from fltac.models.adapters import AdapterMismatch
from fltac.models.backbone import ModelLoadError

#: Errors that are the user's to fix: printed as one line, exit code 2, no traceback.
USER_ERRORS = (ConfigError, AssetMissing, ModelLoadError, AdapterFileError, AdapterMismatch)


def _add_config_flags(p: argparse.ArgumentParser, flags: list[str]) -> None:
    p.add_argument("--config", help="YAML config file (see configs/)")
    for flag in flags:
        p.add_argument(f"--{flag}", dest=f"flag_{flag}", metavar="V", help=f"sets {FLAG_KEYS[flag]}")
    p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                   help="set any config key, e.g. train.lr=1e-3 or lora.target_modules=[query,value]")


def config_from_args(args: argparse.Namespace):
    import yaml

    overrides = {}
    for name, value in vars(args).items():
        if name.startswith("flag_") and value is not None:
            overrides[FLAG_KEYS[name[5:]]] = yaml.safe_load(value)
    for text in args.override:
        key, value = parse_override(text)
        overrides[key] = value
    return load_config(args.config, overrides)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fltac", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a federated (or centralized) fine-tuning job")
    _add_config_flags(run, list(FLAG_KEYS))
    run.add_argument("--resume", action="store_true", help="continue the run in output_dir from its last round")
    run.add_argument("--overwrite", action="store_true", help="replace a finished or failed run in output_dir")
    run.add_argument("--quiet", action="store_true", help="no progress lines")

    part = sub.add_parser("partition", help="print (and save) the per-client x per-task split a run trains on")
    _add_config_flags(part, ["scenario", "n_clients", "alpha", "min_frac", "seed"])
    part.add_argument("--save", metavar="CSV", help="write the table as CSV")
    return parser


def cmd_run(args) -> int:
    from fltac.engines.inprocess import RunError, run

    cfg = config_from_args(args)
    try:
        summary = run(cfg, resume=args.resume, overwrite=args.overwrite, quiet=args.quiet)
    except RunError as exc:
        raise ConfigError(str(exc)) from None
    if args.quiet:
        from fltac.engines.inprocess import format_table

        print(format_table(summary))
    return 0


def cmd_partition(args) -> int:
    from fltac.data import load_tasks
    from fltac.data.partition import format_table, partition_table
    from fltac.experiment import build_partition

    cfg = config_from_args(args)
    tasks = load_tasks(cfg.data)
    table = partition_table(build_partition(cfg, tasks))
    names = [t.name for t in tasks]
    p = cfg.partition
    print(f"=== {cfg.data.scenario} partition (n_clients={p.n_clients}, alpha={p.alpha}, min_frac={p.min_frac}, "
          f"seed={cfg.seed}) ===")
    print(format_table(table, names))
    if args.save:
        with open(args.save, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["client", *names, "total"])
            for k, row in enumerate(table):
                writer.writerow([k, *row.tolist(), int(row.sum())])
        print(f"saved {args.save}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return {"run": cmd_run, "partition": cmd_partition}[args.command](args)
    except USER_ERRORS as exc:
        print(f"fltac: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
