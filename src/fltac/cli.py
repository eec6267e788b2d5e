"""``fltac`` command line: the only reader of argv. Parses, builds a validated RunConfig, calls an engine.

    fltac run --config configs/text5.yaml [--method fedit] [--rounds 3] [--override train.lr=1e-3] [--out DIR]
              [--resume] [--engine flower-sim]
    fltac partition --scenario text5 [--alpha 0.1] [--out partition.csv]
    fltac report RUN_DIR [RUN_DIR ...] [--out DIR]
    fltac compare --config configs/text5.yaml --methods fltac fedit centralized --seeds 42 43 44 --out DIR [--alpha 0.1]
    fltac export RUN_DIR --out DIR [--round N]
    fltac predict --adapter DIR "some text" ["more text" ...] [--task NAME] [--json]
    fltac pretrain-vit [--out DIR] [--epochs N] [--seed S] [--threads N]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys

import fltac
from fltac.config import FLAG_KEYS, ConfigError, key_doc, load_config, parse_override, read_value

#: Errors that are the user's to fix (their input, files or environment): printed as one line, exit code 2, no
#: traceback (unless --debug or FLTAC_DEBUG=1); anything else is an internal error and keeps its traceback. Named
#: by module, so that ``fltac --help`` and a config error import no torch, peft or transformers
#: (see :func:`user_errors`); OSError (a file or folder the system refuses) is always one.
USER_ERRORS = {"fltac.config": "ConfigError", "fltac.assets": "AssetMissing", "fltac.models.backbone": "ModelLoadError",
               "fltac.io": "RunFileError", "fltac.models.adapters": "AdapterMismatch",
               "fltac.data.hub": "HubUnavailable", "fltac.server.strategies": "AggregationError"}
#: Set to 1 to see the traceback of a user error, as --debug does.
DEBUG_ENV = "FLTAC_DEBUG"


def user_errors() -> tuple[type, ...]:
    """The :data:`USER_ERRORS` classes of the modules imported so far (one whose module never loaded cannot
    have been raised, and importing it to find out would cost seconds), and OSError."""
    return tuple(getattr(sys.modules[module], name) for module, name in USER_ERRORS.items()
                 if module in sys.modules) + (OSError,)


#: Other names a flag answers to: ``--out`` everywhere a command writes somewhere (old names kept).
FLAG_ALIASES = {"output_dir": ["--out"]}
#: Metavar of a flag without choices, by the key's type (or by the flag, where that says more).
TYPE_METAVARS = {"int": "N", "float": "X", "str": "TEXT", "bool": "BOOL", "list": "[A,B]"}
FLAG_METAVARS = {"output_dir": "DIR", "model_name": "NAME", "scenario": "NAME"}


def _yaml_text(value) -> str:
    """A default or choice as it is written in YAML and on the command line (``null``, ``true``, ``[a, b]``)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return "[" + ",".join(map(_yaml_text, value)) + "]"
    return str(value)


def flag_help(key: str) -> tuple[str, str]:
    """(metavar, help) of the flag that sets config ``key``: the field's help text, its key and built-in default;
    a Literal field's choices as the metavar, ``{a,b,null}``."""
    doc = key_doc(key)
    metavar = ("{" + ",".join(map(_yaml_text, doc.choices)) + "}" if doc.choices
               else TYPE_METAVARS.get(doc.type_name, "V"))
    text = f"{doc.help} [{key}; default: {_yaml_text(doc.default)}]"
    return metavar, text.replace("%", "%%")  # argparse %-formats help strings


def _add_config_flags(p: argparse.ArgumentParser, flags: list[str]) -> None:
    p.add_argument("--config", metavar="YAML", help="YAML config file (see configs/); its values replace the "
                                                    "built-in defaults shown here, and the flags below replace both")
    for flag in flags:
        metavar, text = flag_help(FLAG_KEYS[flag])
        metavar = FLAG_METAVARS.get(flag, metavar)
        p.add_argument(*FLAG_ALIASES.get(flag, []), f"--{flag}", dest=f"flag_{flag}", metavar=metavar, help=text)
    p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                   help="set any config key (repeatable), e.g. train.lr=1e-3, lora.target_modules=[query,value], "
                        "lora.target_modules.1=key (a list item, from 0) or data.custom_tasks.0.label_column=label; "
                        "every key, its help and default: docs/configuration.md")


def config_from_args(args: argparse.Namespace, fixed: dict | None = None):
    """The RunConfig of the config file, flags and --override of ``args``, then the ``fixed`` {dotted key: value}."""
    overrides = {}
    for name, value in vars(args).items():
        if name.startswith("flag_") and value is not None:
            overrides[FLAG_KEYS[name[5:]]] = read_value(FLAG_KEYS[name[5:]], value)
    for text in args.override:
        key, value = parse_override(text)
        overrides[key] = value
    return load_config(args.config, {**overrides, **(fixed or {})})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fltac", description=fltac.__doc__,
                                     epilog="'fltac COMMAND --help' lists a command's options, with each config "
                                            "flag's help, default and choices; every config key: "
                                            "docs/configuration.md")
    parser.add_argument("--version", action="version", version=f"fltac {fltac.__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a federated (or centralized) fine-tuning job",
                         description="Run a federated (or centralized) fine-tuning job. Defaults in brackets are the "
                                     "built-in ones: --config FILE replaces them with the file's values, and flags "
                                     "and --override replace those.")
    _add_config_flags(run, list(FLAG_KEYS))
    run.add_argument("--resume", action="store_true", help="continue the run in output_dir from its last round")
    run.add_argument("--overwrite", action="store_true", help="replace a finished or failed run in output_dir")
    run.add_argument("--quiet", action="store_true", help="no progress lines")
    run.add_argument("--engine", choices=["inprocess", "flower-sim"], default="inprocess",
                     help="inprocess (default): every client in this process; flower-sim: the same run on Flower's "
                          "simulation runtime (needs pip install 'fltac[flower]'; see docs/flower.md)")
    run.add_argument("--log", action="append", default=[], choices=["tensorboard"],
                     help="also stream metrics to TensorBoard (events in output_dir/tensorboard; needs the "
                          "tensorboard package); metrics.jsonl is always written")

    part = sub.add_parser("partition", help="print (and save) the per-client x per-task split a run trains on")
    _add_config_flags(part, ["scenario", "n_clients", "alpha", "min_frac", "seed"])
    part.add_argument("--out", "--save", dest="save", metavar="CSV", help="write the table as CSV")

    rep = sub.add_parser("report", help="report.md + report.html + PNG plots comparing finished runs")
    rep.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    rep.add_argument("--out", "--output_dir", dest="out", metavar="DIR",
                     help="where the report goes (default: the first RUN_DIR)")

    cmp = sub.add_parser("compare", help="run methods x seeds of one config (resumable), then tables of mean ± std "
                                         "over seeds (comparison.md, comparison.csv) and the report's plots")
    _add_config_flags(cmp, [f for f in FLAG_KEYS if f not in ("method", "seed", "output_dir")])
    cmp.add_argument("--methods", nargs="+", default=["fltac", "fedit", "centralized"], metavar="METHOD",
                     help=f"methods to compare, among {', '.join(key_doc('method').choices)} "
                          f"(default: fltac fedit centralized)")
    cmp.add_argument("--seeds", nargs="+", type=int, default=[42, 43, 44], metavar="SEED",
                     help="seeds each method runs with (default: 42 43 44); the spread is over these")
    cmp.add_argument("--out", "--output_dir", dest="out", metavar="DIR", required=True,
                     help="one run folder per pair (DIR/<method>_seed<seed>/; a finished one is not rerun, an "
                          "interrupted one resumes), then comparison.md, comparison.csv and report.md here")
    cmp.add_argument("--quiet", action="store_true", help="no progress lines")

    exp = sub.add_parser("export", help="write a run's global adapters as peft folders (+ labels.json, and a "
                                        "README.md on using them)")
    exp.add_argument("run_dir", metavar="RUN_DIR")
    exp.add_argument("--out", "--output_dir", dest="out", metavar="DIR", required=True,
                     help="one sub-folder per task (FL-TAC) or 'fedit'")
    exp.add_argument("--round", type=int, metavar="N", help="the adapters after round N (default: the last)")

    pred = sub.add_parser("predict", help="print the label (and its probability) an exported adapter predicts for "
                                          "each text")
    pred.add_argument("texts", nargs="+", metavar="TEXT", help="texts to classify (longer ones are cut to the "
                                                               "run's max_length tokens, as in training)")
    pred.add_argument("--json", action="store_true",
                      help="one JSON object per line and text: {text, tasks: {task: {label, probability, "
                           "probabilities}}}")
    pred.add_argument("--adapter", metavar="DIR", required=True, help="a folder written by fltac export")
    pred.add_argument("--task", help="only this task (a FedIT export serves every task)")
    pred.add_argument("--model", metavar="PATH", help="the backbone, if not where labels.json says")

    vit = sub.add_parser("pretrain-vit", help="pretrain the offline ViT (model_name: vit-fashion-mnist) on "
                                              "Fashion-MNIST and cache it; see docs/scenarios.md")
    vit.add_argument("--out", "--output_dir", dest="out", metavar="DIR",
                     help="where it goes (default: ~/.cache/fltac/vit-fashion-mnist, the "
                          "folder model_name vit-fashion-mnist reads with data.cache_dir null)")
    vit.add_argument("--epochs", type=int, default=3, help="passes over the 60k training images (default 3)")
    vit.add_argument("--seed", type=int, default=0, help="seeds the initial weights and the batch order (default 0)")
    vit.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1; 0 = torch's default)")
    return parser


def cmd_run(args) -> int:
    cfg = config_from_args(args)  # before any heavy import: a config error answers at once
    from fltac.engines.inprocess import RunError, run

    if "tensorboard" in args.log:
        from fltac.eval.tensorboard import require_tensorboard

        require_tensorboard()
    if args.engine == "flower-sim":
        try:
            from fltac.engines.flower import run_simulation as run
        except ImportError as exc:
            raise ConfigError(f"--engine flower-sim needs Flower: pip install 'fltac[flower]' ({exc})") from None
    try:
        summary = run(cfg, resume=args.resume, overwrite=args.overwrite, quiet=args.quiet, log=tuple(args.log))
    except RunError as exc:
        raise ConfigError(str(exc)) from None
    if args.quiet:
        from fltac.engines.inprocess import format_table

        print(format_table(summary))
    return 0


def cmd_partition(args) -> int:
    cfg = config_from_args(args)  # before any heavy import: a config error answers at once
    import numpy as np

    from fltac.data import load_tasks
    from fltac.data.partition import format_table, partition_table
    from fltac.experiment import build_partition

    tasks = load_tasks(cfg.data)
    parts = build_partition(cfg, tasks)
    table = partition_table(parts)
    names = [t.name for t in tasks]
    p = cfg.partition
    print(f"=== {cfg.data.scenario} partition (kind={p.kind}, n_clients={p.n_clients}, alpha={p.alpha}, "
          f"min_frac={p.min_frac}, seed={cfg.seed}) ===")
    print(format_table(table, names))
    if p.kind == "label_skew":  # the skew is across classes: show each task's client x class counts
        for task, task_parts in zip(tasks, parts):
            counts = np.array([np.bincount(task.train_labels[rows], minlength=len(task.labels)) for rows in task_parts])
            print(f"\n{task.name}: training rows per client and class (columns: class index, see below)")
            print(format_table(counts, [str(c) for c in range(len(task.labels))]))
            print("classes: " + ", ".join(f"{c}={name}" for c, name in enumerate(task.labels)))
    if args.save:
        with open(args.save, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["client", *names, "total"])
            for k, row in enumerate(table):
                writer.writerow([k, *row.tolist(), int(row.sum())])
        print(f"saved {args.save}")
    return 0


def cmd_report(args) -> int:
    import shlex

    from fltac.eval.report import build_report

    command = " ".join(["fltac report", *map(shlex.quote, args.run_dirs)]
                       + (["--out", shlex.quote(args.out)] if args.out else []))
    md = build_report(args.run_dirs, args.out, command=command)
    print(f"wrote {md} and {md.with_suffix('.html')}")
    return 0


def cmd_compare(args) -> int:
    from fltac.compare import check_distinct, command_line, compare, pair_dir  # heavy imports: only when it runs

    check_distinct("--methods", args.methods)
    check_distinct("--seeds", args.seeds)
    configs = {(m, s): config_from_args(args, {"method": m, "seed": s, "output_dir": str(pair_dir(args.out, m, s))})
               for m in args.methods for s in args.seeds}
    md = compare(configs, args.out, command_line(args), quiet=args.quiet)
    print(f"wrote {md}, {md.with_suffix('.csv')} and {md.parent / 'report.md'}")
    return 0


def cmd_export(args) -> int:
    from fltac.export import export_run

    for name, folder in export_run(args.run_dir, args.out, args.round).items():
        print(f"{name}\t{folder}")
    return 0


def cmd_predict(args) -> int:
    from fltac.export import predict

    for text, tasks in zip(args.texts, predict(args.adapter, args.texts, args.task, args.model)):
        print(json.dumps({"text": text, "tasks": tasks}, ensure_ascii=False) if args.json
              else prediction_line(text, tasks))
    return 0


def prediction_line(text: str, tasks: dict) -> str:
    """``reviews: positive (0.934)<TAB>topics: sport (0.412)<TAB>the text`` (one line, cut to 60 characters)."""
    flat = " ".join(text.split())
    shown = flat if len(flat) <= 60 else flat[:57] + "..."
    return "\t".join([*(f"{task}: {p['label']} ({p['probability']:.3f})" for task, p in tasks.items()), shown])


def cmd_pretrain_vit(args) -> int:
    from pathlib import Path

    from fltac.models.vit import offline_vit_dir, pretrain_offline_vit

    out = Path(args.out) if args.out else offline_vit_dir(None)
    pretrain_offline_vit(out, epochs=args.epochs, seed=args.seed, threads=args.threads or None)
    return 0


def error_line(exc: BaseException) -> str:
    """The one line a user error prints: ``fltac: error: <what, naming the file or key>``."""
    if isinstance(exc, OSError) and exc.strerror:  # the file and the system's reason, without '[Errno n]'
        where = f"{exc.filename}: " if exc.filename else ""
        text = f"{where}{exc.strerror}" + (f" ({exc.filename2})" if exc.filename2 else "")
    else:
        text = str(exc) or type(exc).__name__
    return "fltac: error: " + " ".join(text.split())


def add_debug_flag(parser: argparse.ArgumentParser) -> None:
    """``--debug`` on the command and on every subcommand: show a user error's traceback."""
    helper = f"show the traceback of an error (also: {DEBUG_ENV}=1)"
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=helper)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                sub.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=helper)


def main(argv: list[str] | None = None) -> int:
    """The error boundary: a user error is one line on stderr and exit code 2; ``--debug`` (or FLTAC_DEBUG=1)
    re-raises it with its traceback; internal errors always keep theirs."""
    parser = build_parser()
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    debug = getattr(args, "debug", False) or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    try:
        return {"run": cmd_run, "partition": cmd_partition, "report": cmd_report, "compare": cmd_compare,
                "export": cmd_export, "predict": cmd_predict, "pretrain-vit": cmd_pretrain_vit}[args.command](args)
    except user_errors() as exc:
        if debug:
            raise
        print(error_line(exc), file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
