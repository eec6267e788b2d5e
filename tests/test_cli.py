"""The ``fltac`` command explains itself: help and choices from the config's field metadata, ``--version``,
``--out`` on every command that writes, list items reachable by ``--override``, and a parser and config
errors that load no heavy library."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import fltac
from fltac.cli import FLAG_ALIASES, build_parser, config_from_args, main
from fltac.config import FLAG_KEYS, ConfigError, key_doc

REPO = Path(__file__).resolve().parents[1]
TEXT5_YAML = REPO / "configs" / "text5.yaml"
#: Libraries that take seconds to import: the parser and config checking must not need them.
HEAVY = ("torch", "transformers", "peft", "sklearn", "pandas", "flwr", "scipy", "matplotlib", "datasets")


def _subparser(name: str):
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return sub.choices[name]


def _flag_action(parser, flag: str):
    return next(a for a in parser._actions if a.dest == f"flag_{flag}")


def test_run_help_comes_from_the_config_fields():
    run = _subparser("run")
    text = run.format_help()
    for flag, key in FLAG_KEYS.items():
        doc = key_doc(key)
        action = _flag_action(run, flag)
        assert doc.help and doc.help in action.help, flag      # the field's own help, not "sets <key>"
        assert f"[{key}; default: " in action.help
        assert f"--{flag}" in text
    assert "sets " not in text
    assert "[train.rounds; default: 4]" in _flag_action(run, "rounds").help
    assert "[lora.rank; default: null]" in _flag_action(run, "lora_rank").help


def test_run_help_lists_the_choices_of_every_option_that_has_them():
    run = _subparser("run")
    text = " ".join(run.format_help().split())
    with_choices = [flag for flag, key in FLAG_KEYS.items() if key_doc(key).choices]
    assert {"method", "dtype", "cluster_features", "partition_kind", "hafl_mode"} <= set(with_choices)
    for flag in with_choices:
        shown = ["null" if c is None else c for c in key_doc(FLAG_KEYS[flag]).choices]
        assert f"--{flag} {{{','.join(shown)}}}" in text
    assert "--method {fltac,fedit,centralized,hafl,hetlora,flexlora,flora,safedlora,fedavg_full}" in text
    assert "--hafl_mode {truncate,freeze,null}" in text
    for action in run._actions:  # options with argparse choices of their own (--engine, --log)
        if action.choices:
            assert all(str(c) in text for c in action.choices), action.dest
    compare = " ".join(_subparser("compare").format_help().split())
    assert "--methods METHOD [METHOD ...] methods to compare, among fltac, fedit, centralized, hafl," in compare


def test_a_choice_outside_the_list_is_a_one_line_config_error(capsys):
    assert main(["run", "--dtype", "float16"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [err] and "'dtype'" in err and "bfloat16" in err


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"fltac {fltac.__version__}"


@pytest.mark.parametrize("command, rest, dest", [
    (["run"], [], "flag_output_dir"),
    (["report", "r1"], [], "out"),
    (["export", "r1"], [], "out"),
    (["pretrain-vit"], [], "out"),
    (["compare"], [], "out"),
    (["partition"], [], "save"),
])
def test_out_is_accepted_everywhere_and_old_names_still_work(command, rest, dest):
    parser = build_parser()
    assert getattr(parser.parse_args([*command, "--out", "somewhere", *rest]), dest) == "somewhere"
    old = {"run": "--output_dir", "partition": "--save"}.get(command[0], "--output_dir")
    assert getattr(parser.parse_args([*command, old, "elsewhere", *rest]), dest) == "elsewhere"
    assert FLAG_ALIASES["output_dir"] == ["--out"]


def test_out_sets_output_dir_of_a_run(tmp_path):
    args = build_parser().parse_args(["run", "--config", str(TEXT5_YAML), "--out", str(tmp_path / "o")])
    assert config_from_args(args).output_dir == str(tmp_path / "o")


def test_override_reaches_list_items(tmp_path):
    def cfg(*overrides, config=None):
        argv = ["run", *(["--config", str(config)] if config else [])]
        for o in overrides:
            argv += ["--override", o]
        return config_from_args(build_parser().parse_args(argv))

    # an item of a list the YAML does not set: the field's default list is the base
    assert cfg("lora.target_modules.1=key").lora.target_modules == ["query", "key"]
    assert cfg("target_modules.2=dense").lora.target_modules == ["query", "value", "dense"]  # one past the end appends
    assert cfg("lora.target_modules=[a,b,c]", "lora.target_modules.0=q").lora.target_modules == ["q", "b", "c"]
    # a key inside a list of sections (custom tasks), from a config file
    tasks = [{"name": "a", "source": "a.csv", "text_columns": ["text"], "label_column": "label"},
             {"name": "b", "source": "b.csv", "text_columns": ["text"], "label_column": "label"}]
    config = tmp_path / "custom.yaml"
    config.write_text(yaml.safe_dump({"data": {"scenario": "custom", "custom_tasks": tasks}}))
    got = cfg("data.custom_tasks.1.label_column=topic", "data.custom_tasks.0.text_columns.0=title", config=config)
    assert [t.label_column for t in got.data.custom_tasks] == ["label", "topic"]
    assert got.data.custom_tasks[0].text_columns == ["title"]
    assert got.data.custom_tasks[1].text_columns == ["text"]
    # mistakes name the key
    for bad, says in [("lora.target_modules.3=x", "at most 2"), ("data.custom_tasks.0.labl=x", "known in"),
                      ("lora.target_modules.x=1", "lora.target_modules.x"), ("lora.rank.0=1", "single value")]:
        with pytest.raises(ConfigError, match=says):
            cfg(bad, config=config)


def test_list_item_override_error_exits_2(capsys):
    assert main(["run", "--override", "lora.target_modules.7=x"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [err] and "'lora.target_modules.7'" in err


def _imported(argv: list[str]) -> tuple[int, set[str]]:
    """(exit code, top-level modules imported) of ``python -X importtime -m fltac ARGV`` in a fresh process."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "fltac", *argv], capture_output=True,
                          text=True, env=env, cwd=REPO, timeout=120)
    modules = {line.rsplit("|", 1)[1].strip().split(".")[0] for line in proc.stderr.splitlines()
               if line.startswith("import time:") and "|" in line}
    assert "fltac" in modules  # the measure sees fltac's own imports
    return proc.returncode, modules


@pytest.mark.parametrize("argv, code", [
    (["--help"], 0),
    (["run", "--help"], 0),
    (["run", "--override", "train.lrr=1"], 2),                # unknown key
    (["run", "--config", str(TEXT5_YAML), "--method", "foo"], 2),
    (["partition", "--alpha", "-1"], 2),
])
def test_help_and_config_errors_import_no_heavy_library(argv, code):
    rc, modules = _imported(argv)
    assert rc == code
    assert not modules & set(HEAVY), sorted(modules & set(HEAVY))


# ---- progress: the ETA counts adapter steps, which advance with every shared pass -------------------------

class RecordingProgress:
    """A :class:`fltac.eval.progress.Progress` that keeps ``(done, total, line)`` after every step."""

    def __init__(self, label: str, total: int):
        import io

        from fltac.eval.progress import Progress

        self.bar = Progress(label, total, stream=io.StringIO(), interval=0.0)
        self.seen: list[tuple[int, int, str]] = []

    def step(self, n: int = 1, note: str = "") -> None:
        self.bar.step(n, note)
        self.seen.append((self.bar.done, self.bar.total, self.bar.line(note)))

    def close(self) -> None:
        self.bar.close()


@pytest.mark.parametrize("batching, adapters_per_pass", [("routed", 64), ("per_adapter", 64), ("per_adapter", 1)])
def test_training_progress_advances_with_every_step_shared_or_not(tiny_bert, csv_scenario, tmp_path, monkeypatch,
                                                                  batching, adapters_per_pass):
    from conftest import tiny_config_overrides

    from fltac.config import load_config
    from fltac.engines.inprocess import InProcessEngine
    from fltac.experiment import build_experiment

    bars: dict[str, RecordingProgress] = {}

    def progress(self, label, total):
        bars[label] = RecordingProgress(label, total)
        return bars[label]

    monkeypatch.setattr(InProcessEngine, "progress", progress)
    cfg = load_config(None, {**tiny_config_overrides(tiny_bert, tmp_path / "run"), "method": "fltac",
                             "data.scenario": "custom", "data.custom_tasks": csv_scenario["tasks"],
                             "train.rounds": 1, "train.local_steps": 3, "train.adapters_per_pass": adapters_per_pass,
                             "train.batching": batching})
    exp = build_experiment(cfg)
    InProcessEngine(cfg).run()
    steps = [j.steps for j in exp.jobs]
    bar = bars["round 1/1: adapter steps trained"]
    done = [d for d, _, _ in bar.seen]
    assert bar.bar.total == sum(steps) and done[-1] == sum(steps)
    increments = [b - a for a, b in zip([0, *done], done)]
    if batching == "routed":  # each client's adapters in turn, all clients in shared passes: one step per client
        per_client = [sum(j.steps for j in exp.jobs if j.client == c) for c in sorted({j.client for j in exp.jobs})]
        assert len(per_client) > 1
        assert increments == [sum(n > i for n in per_client) for i in range(max(per_client))]
    elif adapters_per_pass > 1:  # every adapter in one pass: each shared step advances all of them together
        assert len(exp.jobs) > 1 and increments == [len(exp.jobs)] * 3
    else:                        # one adapter at a time: one step each
        assert increments == [1] * sum(steps)
    # the first line already reports a share of the work done, so its estimate extrapolates from real work
    assert done[0] < sum(steps) and f"{done[0]}/{sum(steps)}," in bar.seen[0][2] and "ETA" in bar.seen[0][2]


def test_user_errors_name_real_classes():
    import importlib

    from fltac.cli import USER_ERRORS, user_errors

    for module in USER_ERRORS:
        importlib.import_module(module)
    classes = user_errors()[:len(USER_ERRORS)]  # then OSError
    assert all(issubclass(c, Exception) for c in classes)
    assert [c.__name__ for c in classes] == list(USER_ERRORS.values())
