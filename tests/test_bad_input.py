"""The bad-input battery: every way a user, a damaged file or the environment can stop fltac, one row each.

Each row is a command line, the exit code expected (2), words the one-line error must hold, and a setup
that makes the bad input in a fresh folder. For every row: stderr is exactly one line starting
``fltac: error:``, no traceback, and every file in the folder is unchanged (SHA-256 before and after;
no new file either, except where a row names what the run may create). Most rows call ``fltac.cli.main``
in this process (fast); the rows marked ``proc`` run ``python -m fltac`` to prove the real entry point.

Categories (docs/reliability.md lists them): config values and files, the output folder, the model, the
data, the hub, a run's own limits, resume and checkpoints, report, export and predict.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import yaml
from conftest import tiny_config_overrides

from fltac import cli, io
from fltac.config import set_dotted

ROOT = Path(__file__).resolve().parents[1]
ROOT_USER = os.geteuid() == 0
CAN_MOUNT = ROOT_USER and shutil.which("unshare") is not None


@dataclass
class Case:
    id: str
    argv: str                      # formatted with {work}, {tiny} (a tiny run's YAML), {repo}
    words: list[str]               # must all appear in the one error line
    setup: Callable | None = None  # setup(work: Path, ctx: dict): makes the bad input inside work
    proc: bool = False             # run `python -m fltac` in a subprocess instead of cli.main in-process
    env: dict = field(default_factory=dict)
    creates: tuple[str, ...] = ()  # paths under work the command may create (a run that fails mid-way)
    readonly: str | None = None    # a folder under work made unwritable for the command


# ---- setups: each makes one bad input inside work ----------------------------------------------------

def write(rel: str, text: str | bytes):
    def setup(work: Path, ctx: dict) -> None:
        path = work / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return setup


def copy_run(method: str = "fltac", then: Callable | None = None):
    """Copy a finished tiny run into work/run, then apply ``then(run_folder)`` to it."""
    def setup(work: Path, ctx: dict) -> None:
        shutil.copytree(ctx["runs"][method], work / "run")
        if then is not None:
            then(work / "run")
    return setup


def truncate(rel: str, keep: float = 0.5):
    def damage(folder: Path) -> None:
        data = (folder / rel).read_bytes()
        (folder / rel).write_bytes(data[: int(len(data) * keep)])
    return damage


def edit_json(rel: str, change: Callable):
    def damage(folder: Path) -> None:
        (folder / rel).write_text(json.dumps(change(json.loads((folder / rel).read_text()))))
    return damage


def tear_last_line(rel: str):
    def damage(folder: Path) -> None:
        (folder / rel).write_bytes((folder / rel).read_bytes().rstrip(b"\n")[:-7])
    return damage


def other_rank_legacy_checkpoint(folder: Path) -> None:
    """A checkpoint from before file hashes whose tensors were made for LoRA rank 8 (the run uses 4), of a
    run planned for 3 rounds (so a resume goes on and reads the tensors)."""
    import torch

    latest = folder / "checkpoint" / "latest.json"
    meta = json.loads(latest.read_text())
    meta.pop("files")
    meta["config"]["train"]["rounds"] = 3
    latest.write_text(json.dumps(meta))
    path = folder / "checkpoint" / meta["tensors_file"]
    tensors = io.load_tensors(path)
    grown = {k: (torch.cat([v, v]) if ".lora_A." in k else torch.cat([v, v], 1) if ".lora_B." in k else v)
             for k, v in tensors.items()}
    io.save_tensors(path, grown)


def exported(then: Callable):
    """An export of the tiny FL-TAC run in work/exp, then ``then(folder of its first task)``."""
    def setup(work: Path, ctx: dict) -> None:
        from fltac.export import export_run

        folders = export_run(ctx["runs"]["fltac"], work / "exp")
        then(folders["reviews"])
    return setup


def custom_config(change: Callable, out: str = "out"):
    """work/bad.yaml: the tiny run's config with its custom tasks changed by ``change(tasks, data_dir)``."""
    def setup(work: Path, ctx: dict) -> None:
        data = work / "data"
        shutil.copytree(ctx["csv"]["dir"], data)
        tasks = json.loads(json.dumps(ctx["csv"]["tasks"]).replace(str(ctx["csv"]["dir"]), str(data)))
        change(tasks, data)
        nested = yaml.safe_load((work.parent / "tiny.yaml").read_text())
        nested["data"]["custom_tasks"] = tasks
        nested["output_dir"] = str(work / out)
        (work / "bad.yaml").write_text(yaml.safe_dump(nested))
    return setup


def _rename_column(tasks, data):
    tasks[0]["text_columns"] = ["txt"]


def _missing_source(tasks, data):
    tasks[1]["source"] = str(data / "nws.csv")


def _single_class(tasks, data):
    import pandas as pd

    frame = pd.read_csv(data / "reviews.csv")
    frame["sentiment"] = "fresh"
    frame.to_csv(data / "reviews.csv", index=False)


def _empty_test_split(tasks, data):
    (data / "reviews_test.csv").write_text("text,sentiment\n")


def user_folder(work: Path, ctx: dict) -> None:
    """The issue's reproduction: a folder holding the user's own config.json and checkpoint/."""
    (work / "mine").mkdir()
    (work / "mine" / "config.json").write_text('{"my": "settings"}\n')
    (work / "mine" / "checkpoint").mkdir()
    (work / "mine" / "checkpoint" / "weights.bin").write_bytes(b"\x00" * 64)


def empty_model_folder(work: Path, ctx: dict) -> None:
    (work / "model").mkdir()
    (work / "model" / "README.md").write_text("weights to come\n")


TEXT5 = "run --config {repo}/configs/text5.yaml --output_dir {work}/out"
TINY = "run --config {tiny} --output_dir {work}/out"
RESUME = "run --config {work}/run/config.json --output_dir {work}/run --resume"

CASES = [
    # -- config values and files
    Case("unknown key (README)", TEXT5 + " --override train.lrr=1", ["unknown config key 'train.lrr'"]),
    Case("override YAML parser error", TEXT5 + " --override lora.target_modules=[query",
         ["'lora.target_modules'", "not valid YAML"]),
    Case("flag YAML parser error", TEXT5 + " --alpha [0.5", ["'partition.alpha'", "not valid YAML"]),
    Case("alpha inf (run)", TEXT5 + " --alpha .inf", ["'partition.alpha'", "finite", "partition.kind: iid"]),
    Case("alpha inf (partition)", "partition --config {repo}/configs/text5.yaml --n_clients 3 --alpha .inf",
         ["'partition.alpha'", "finite"]),
    Case("lr inf", TEXT5 + " --lr .inf", ["'train.lr'", "finite"]),
    Case("nan float key", TEXT5 + " --override reliability.norm_bound_factor=.nan",
         ["'reliability.norm_bound_factor'", "finite"]),
    Case("out of range", TEXT5 + " --override train.fraction_fit=1.5", ["'train.fraction_fit'", "(0, 1]"]),
    Case("config file missing", "run --config {work}/nope.yaml", ["'{work}/nope.yaml'", "does not exist"]),
    Case("config file not YAML", "run --config {work}/bad.yaml", ["bad.yaml", "not valid YAML"],
         setup=write("bad.yaml", "train: [1,\n")),
    # -- the output folder
    Case("folder without marker (issue's reproduction)",
         "run --config {repo}/configs/text5.yaml --output_dir {work}/mine --override data.tasks=[nope]",
         ["{work}/mine", "not empty", "fltac-run.json", "config.json", "checkpoint"], setup=user_folder, proc=True),
    Case("--overwrite on a folder without marker", TEXT5.replace("/out", "/mine") + " --overwrite",
         ["{work}/mine", "no fltac-run.json"], setup=user_folder),
    Case("--resume on a folder without marker", TEXT5.replace("/out", "/mine") + " --resume",
         ["{work}/mine", "no fltac-run.json"], setup=user_folder),
    Case("output_dir is a file", "run --config {tiny} --output_dir {work}/afile", ["{work}/afile", "is a file"],
         setup=write("afile", "x")),
    Case("output_dir under a file", "run --config {tiny} --output_dir {work}/afile/run",
         ["{work}/afile/run", "lies under", "is a file"], setup=write("afile", "x")),
    Case("output_dir not writable", "run --config {tiny} --output_dir {work}/locked/run",
         ["{work}/locked/run", "not writable"], setup=write("locked/keep.txt", "x"), readonly="locked",
         proc=ROOT_USER),
    Case("a finished run without --resume or --overwrite (README)", "run --config {work}/run/config.json "
         "--output_dir {work}/run", ["already holds a run", "--resume", "--overwrite"], setup=copy_run()),
    # -- the model
    Case("model folder with no model", TINY + " --model_name {work}/model", ["'model_name'", "no model"],
         setup=empty_model_folder),
    # -- the data (README, custom tasks)
    Case("custom task: column not found (README)", "run --config {work}/bad.yaml",
         ["task 'reviews'", "'txt'", "not found"], setup=custom_config(_rename_column)),
    Case("custom task: source missing (README)", "run --config {work}/bad.yaml",
         ["task 'topics'", "nws.csv", "does not exist"], setup=custom_config(_missing_source)),
    Case("custom task: single class (README)", "run --config {work}/bad.yaml",
         ["task 'reviews'", "single class", "'fresh'"], setup=custom_config(_single_class)),
    Case("custom task: empty test split (README)", "run --config {work}/bad.yaml",
         ["task 'reviews'", "test split is empty"], setup=custom_config(_empty_test_split)),
    # -- the hub (README): a closed local port stands for an unreachable hub
    Case("hub unreachable (README)", "run --config {repo}/configs/glue_bert.yaml --output_dir {work}/out",
         ["scenario 'glue' needs the HuggingFace hub", "cannot be reached", "configs/text5.yaml"],
         env={"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_OFFLINE": ""}),
    # -- a run's own limits (README)
    Case("too few clients survive a round (README)", TINY + " --quiet --override reliability.crash_prob=1.0",
         ["round 1: only 0 of 2 sampled client(s)", "min_clients_per_round"], creates=("out",)),
    Case("impossible minimum of clients", TINY + " --quiet --override reliability.min_clients_per_round=3",
         ["'reliability.min_clients_per_round'", "exceeds"], creates=("out",)),
    # -- resume and checkpoints
    Case("resume with a changed result key (README)", RESUME + " --override reliability.trim_fraction=0.1",
         ["cannot resume", "'reliability.trim_fraction'"], setup=copy_run()),
    Case("truncated latest.json", RESUME, ["checkpoint/latest.json", "not valid JSON"],
         setup=copy_run(then=truncate("checkpoint/latest.json"))),
    Case("latest.json missing a key", RESUME, ["checkpoint/latest.json", "lacks key", "tensors_file"],
         setup=copy_run(then=edit_json("checkpoint/latest.json", lambda m: {k: v for k, v in m.items()
                                                                          if k != "tensors_file"}))),
    Case("latest.json not an object", RESUME, ["checkpoint/latest.json", "JSON object"],
         setup=copy_run(then=edit_json("checkpoint/latest.json", lambda m: [m]))),
    Case("finished run, last adapters truncated", RESUME,
         ["adapters/round_2.safetensors", "damaged", "--overwrite"],
         setup=copy_run(then=truncate("adapters/round_2.safetensors")), proc=True),
    Case("finished run, checkpoint tensors truncated", RESUME, ["checkpoint/round_2.safetensors", "damaged"],
         setup=copy_run(then=truncate("checkpoint/round_2.safetensors"))),
    Case("finished run, an earlier round's adapters missing", RESUME,
         ["adapters/round_1.safetensors", "missing"],
         setup=copy_run(then=lambda f: (f / "adapters" / "round_1.safetensors").unlink())),
    Case("metrics.jsonl cut short", RESUME, ["metrics.jsonl", "damaged", "first"],
         setup=copy_run(then=tear_last_line("metrics.jsonl"))),
    Case("checkpoint of another run", RESUME, ["belongs to run", "fltac-run.json"],
         setup=copy_run(then=edit_json("fltac-run.json", lambda m: {**m, "run_id": "0" * 32}))),
    Case("legacy checkpoint made for another rank (README)", RESUME + " --quiet --rounds 3",
         ["checkpoint/round_2.safetensors", "made for LoRA rank 8; this run uses rank 4"],
         setup=copy_run(then=other_rank_legacy_checkpoint)),
    # -- report
    Case("report: corrupt summary.json", "report {work}/run", ["summary.json", "not valid JSON"],
         setup=copy_run(then=truncate("summary.json"))),
    Case("report: not a run", "report {work}", ["is not a finished run"]),
    Case("report: torn metrics.jsonl", "report {work}/run", ["metrics.jsonl", "line", "not valid JSON"],
         setup=copy_run(then=tear_last_line("metrics.jsonl"))),
    # -- export
    Case("export: corrupt config.json", "export {work}/run --out {work}/exp", ["config.json", "not valid JSON"],
         setup=copy_run(then=truncate("config.json"))),
    Case("export: non-object config.json", "export {work}/run --out {work}/exp", ["config.json", "JSON object"],
         setup=copy_run(then=edit_json("config.json", lambda c: [c]))),
    Case("export: config.json with an unknown key", "export {work}/run --out {work}/exp",
         ["config.json", "unknown config key 'colour'"],
         setup=copy_run(then=edit_json("config.json", lambda c: {**c, "colour": "red"}))),
    Case("export: torn last line of metrics.jsonl", "export {work}/run --out {work}/exp",
         ["metrics.jsonl", "damaged", "--overwrite"], setup=copy_run(then=tear_last_line("metrics.jsonl"))),
    Case("export: truncated adapters", "export {work}/run --out {work}/exp",
         ["adapters/round_2.safetensors", "damaged"], setup=copy_run(then=truncate("adapters/round_2.safetensors"))),
    Case("export: --out is a file", "export {work}/run --out {work}/afile", ["--out", "{work}/afile", "is a file"],
         setup=lambda w, c: (copy_run()(w, c), write("afile", "x")(w, c))),
    Case("export: not a run", "export {work} --out {work}/exp", ["not a run folder", "config.json"]),
    # -- predict
    Case("predict: truncated adapter_model.safetensors", "predict --adapter {work}/exp/reviews 'a lovely day'",
         ["adapter_model.safetensors", "not a valid safetensors file"],
         setup=exported(truncate("adapter_model.safetensors"))),
    Case("predict: corrupt labels.json", "predict --adapter {work}/exp/reviews 'a lovely day'",
         ["labels.json", "not valid JSON"], setup=exported(truncate("labels.json"))),
    Case("predict: labels.json missing a key", "predict --adapter {work}/exp/reviews 'a lovely day'",
         ["labels.json", "lacks key", "num_labels"],
         setup=exported(edit_json("labels.json", lambda m: {k: v for k, v in m.items() if k != "num_labels"}))),
    Case("predict: corrupt adapter_config.json", "predict --adapter {work}/exp/reviews 'a lovely day'",
         ["adapter_config.json", "not valid JSON"], setup=exported(truncate("adapter_config.json"))),
    Case("predict: not an export", "predict --adapter {work} 'a lovely day'", ["not an exported adapter folder"]),
]


# ---- the runner ----------------------------------------------------------------------------------------

def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def ctx(tiny_bert, csv_scenario, tiny_runs, tmp_path_factory) -> dict:
    """The tiny runs, the CSV scenario, and {root}/tiny.yaml: a valid tiny FL-TAC config (each row's work
    folder lies in root, so the YAML stays outside what the row hashes)."""
    root = tmp_path_factory.mktemp("bad_input")
    nested: dict = {}
    overrides = {**tiny_config_overrides(tiny_bert, root / "unused"), "method": "fltac", "data.scenario": "custom",
                 "data.custom_tasks": csv_scenario["tasks"]}
    for key, value in overrides.items():
        set_dotted(nested, key, value)
    (root / "tiny.yaml").write_text(yaml.safe_dump(nested))
    return {"root": root, "runs": tiny_runs, "csv": csv_scenario}


def run_command(case: Case, argv: list[str], work: Path, capsys, monkeypatch) -> tuple[int, str]:
    """(exit code, stderr) of the command, in-process or as a real `python -m fltac` process."""
    if case.readonly and not ROOT_USER:
        os.chmod(work / case.readonly, 0o555)
    if case.proc:
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), **case.env}
        command = [sys.executable, "-m", "fltac", *argv]
        if case.readonly:  # root ignores permission bits: a read-only bind mount in a private mount namespace
            locked = work / case.readonly
            command = ["unshare", "-m", "bash", "-c", f'mount --bind "{locked}" "{locked}" && '
                       f'mount -o remount,bind,ro "{locked}" && exec "$@"', "bash", *command]
        proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, check=False)
        return proc.returncode, proc.stderr
    for key, value in case.env.items():
        monkeypatch.setenv(key, value) if value else monkeypatch.delenv(key, raising=False)
    rc = cli.main(argv)
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, ctx, tmp_path, capsys, monkeypatch):
    if case.readonly and ROOT_USER and not CAN_MOUNT:
        pytest.skip("as root, an unwritable folder needs unshare (mount namespace)")
    work = ctx["root"] / tmp_path.name
    work.mkdir()
    if case.setup is not None:
        case.setup(work, ctx)
    capsys.readouterr()
    fill = {"work": str(work), "tiny": str(ctx["root"] / "tiny.yaml"), "repo": str(ROOT)}
    argv = shlex.split(case.argv.format(**fill))
    before = snapshot(work)
    try:
        rc, err = run_command(case, argv, work, capsys, monkeypatch)
    finally:
        if case.readonly and not ROOT_USER:
            os.chmod(work / case.readonly, 0o755)
    lines = err.strip().splitlines()
    assert rc == 2, err
    assert len(lines) == 1 and lines[0].startswith("fltac: error: "), err
    assert "Traceback" not in err
    for word in case.words:
        assert word.format(**fill) in lines[0], (word, lines[0])
    after = snapshot(work)
    created = {k for k in set(after) - set(before) if not any(k.startswith(c) for c in case.creates)}
    assert not created, f"new files: {sorted(created)}"
    assert {k: after.get(k) for k in before} == before, "a file changed or vanished"


def test_the_battery_covers_every_category():
    """Guards the count docs/reliability.md states."""
    assert len(CASES) == 50
    assert len({c.id for c in CASES}) == len(CASES)


# ---- the boundary itself -------------------------------------------------------------------------------

def test_debug_flag_and_env_show_the_traceback(ctx, tmp_path, monkeypatch):
    from fltac.config import ConfigError

    argv = ["run", "--config", str(ROOT / "configs/text5.yaml"), "--alpha", ".inf"]
    with pytest.raises(ConfigError, match="partition.alpha"):
        cli.main(argv + ["--debug"])
    with pytest.raises(ConfigError, match="partition.alpha"):
        cli.main(["--debug"] + argv)
    monkeypatch.setenv(cli.DEBUG_ENV, "1")
    with pytest.raises(ConfigError, match="partition.alpha"):
        cli.main(argv)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), cli.DEBUG_ENV: "1"}
    proc = subprocess.run([sys.executable, "-m", "fltac", *argv], env=env, capture_output=True, text=True,
                          timeout=120, check=False)
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "partition.alpha" in proc.stderr


def test_an_internal_error_keeps_its_traceback(monkeypatch):
    def broken(args):
        raise KeyError("a bug, not the user's")

    monkeypatch.setattr(cli, "cmd_report", broken)
    with pytest.raises(KeyError):
        cli.main(["report", "somewhere"])
