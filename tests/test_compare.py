"""``fltac compare`` on the tiny BERT and the two CSV tasks (tests/conftest.py): the tables, the skip of finished
pairs, and runs bit-identical to separate ``fltac run`` calls although they share the loaded tasks; a causal
LM (tests/test_chat.py's tiny Llama) compared on its LM loss."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import yaml

from fltac.cli import main
from fltac.config import load_config
from fltac.engines.inprocess import run
from fltac.io import load_tensors

from conftest import tiny_config_overrides
from test_chat import dolly_jsonl, tiny_llama  # noqa: F401  (fixtures: a tiny Llama and Dolly rows)
from test_cli import HEAVY, _imported

METHODS, SEEDS = ["fltac", "fedit"], [3, 4]


def nested(dotted: dict) -> dict:
    out: dict = {}
    for key, value in dotted.items():
        *parents, last = key.split(".")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return out


@pytest.fixture(scope="module")
def tiny_yaml(tiny_bert, csv_scenario, tmp_path_factory) -> str:
    """A config file for the tiny scenario (what a user passes as --config)."""
    path = tmp_path_factory.mktemp("compare_cfg") / "tiny.yaml"
    overrides = {**tiny_config_overrides(tiny_bert, "unused"), "data.scenario": "custom",
                 "data.custom_tasks": csv_scenario["tasks"]}
    path.write_text(yaml.safe_dump(nested(overrides)))
    return str(path)


@pytest.fixture(scope="module")
def compared(tiny_yaml, tmp_path_factory):
    """The folder of one ``fltac compare`` of fltac and fedit over seeds 3 and 4, at --alpha 0.7."""
    out = tmp_path_factory.mktemp("compare") / "cmp"
    argv = ["compare", "--config", tiny_yaml, "--alpha", "0.7", "--methods", *METHODS,
            "--seeds", *map(str, SEEDS), "--out", str(out), "--quiet"]
    assert main(argv) == 0
    return out, argv


def summary(folder) -> dict:
    return json.loads((folder / "summary.json").read_text())


def test_compare_writes_both_tables_with_mean_and_sample_std(compared):
    out, _ = compared
    with open(out / "comparison.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["method", "quantity", "mean", "std", "n_seeds", "seeds", "values"]
    quantities = {m: [r["quantity"] for r in rows if r["method"] == m] for m in METHODS}
    common = ["accuracy/reviews", "accuracy/topics", "accuracy/mean"]
    assert quantities["fltac"] == [*common, "clustering_accuracy/round_1", "clustering_accuracy/round_2",
                                   "uplink_bytes", "wall_seconds"]
    assert quantities["fedit"] == [*common, "uplink_bytes", "wall_seconds"]
    for r in rows:
        runs = [summary(out / f"{r['method']}_seed{s}") for s in SEEDS]
        assert runs[0]["method"] == r["method"] and r["seeds"] == "3 4" and r["n_seeds"] == "2"
        if r["quantity"] == "accuracy/mean":
            values = [s["mean_accuracy"] for s in runs]
        elif r["quantity"].startswith("accuracy/"):
            values = [s["per_task_accuracy"][r["quantity"].split("/")[1]] for s in runs]
        elif r["quantity"] == "clustering_accuracy/round_2":
            values = [s["clustering_accuracy"] for s in runs]
        elif r["quantity"] in ("uplink_bytes", "wall_seconds"):
            values = [s[r["quantity"]] for s in runs]
        else:
            continue
        assert [float(v) for v in r["values"].split()] == values
        assert float(r["mean"]) == pytest.approx(np.mean(values))
        assert float(r["std"]) == pytest.approx(np.std(values, ddof=1))
    assert all(json.loads((out / f"{m}_seed{s}" / "config.json").read_text())["partition"]["alpha"] == 0.7
               for m in METHODS for s in SEEDS)
    text = (out / "comparison.md").read_text()
    assert "| method | reviews | topics | mean |" in text and "sample standard deviation (ddof=1)" in text
    fltac = [summary(out / f"fltac_seed{s}")["mean_accuracy"] for s in SEEDS]
    row = next(line for line in text.splitlines() if line.startswith("| fltac |"))
    assert row.rstrip(" |").endswith(f"{np.mean(fltac):.4f} ± {np.std(fltac, ddof=1):.4f}")
    assert "| method | round 1 | round 2 |" in text and "--alpha=0.7" in text and "--seeds 3 4" in text
    for name in ("report.md", "report.html", "accuracy_per_round.png", "clustering_accuracy.png"):
        assert (out / name).is_file(), name


def test_a_second_call_retrains_nothing(compared, capsys):
    out, argv = compared
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.glob("*_seed*/**/*") if p.is_file()}
    assert main([a for a in argv if a != "--quiet"]) == 0
    after = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.glob("*_seed*/**/*") if p.is_file()}
    assert after == before
    assert capsys.readouterr().err.count("already finished") == len(METHODS) * len(SEEDS)


def test_a_changed_config_in_the_same_folder_stops_with_one_line(compared, capsys):
    out, argv = compared
    assert main([*argv, "--lr", "0.5"]) == 2
    err = capsys.readouterr().err.strip()
    assert "train.lr" in err and "another --out" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("method", METHODS)
def test_a_compared_run_equals_a_separate_run(compared, tiny_yaml, tmp_path, method):
    """The pair's run (which reused the tasks the call's first run loaded) and a lone run."""
    out, _ = compared
    seed = SEEDS[-1]
    alone = run(load_config(tiny_yaml, {"method": method, "seed": seed, "partition.alpha": 0.7,
                                        "output_dir": str(tmp_path / "alone")}), quiet=True)
    pair = out / f"{method}_seed{seed}"
    skip = {"wall_seconds"}
    assert {k: v for k, v in summary(pair).items() if k not in skip} == {k: v for k, v in alone.items() if k not in skip}
    a, b = load_tensors(pair / "adapters" / "round_2.safetensors"), load_tensors(tmp_path / "alone" / "adapters" /
                                                                                  "round_2.safetensors")
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)


def test_bad_methods_or_repeated_seeds_stop_before_training(tiny_yaml, tmp_path, capsys):
    assert main(["compare", "--config", tiny_yaml, "--methods", "fltac", "nope", "--out", str(tmp_path / "x")]) == 2
    assert main(["compare", "--config", tiny_yaml, "--seeds", "1", "1", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert "nope" in err[0] and "--seeds: 1 given more than once" in err[1]
    assert not (tmp_path / "x").exists()


def test_causal_lm_runs_are_compared_on_their_lm_loss(tiny_llama, dolly_jsonl, tmp_path):
    cfg = {"model_name": tiny_llama, "dtype": "float32", "lora": {"target_modules": ["q_proj", "v_proj"]},
           "data": {"scenario": "dolly", "source": dolly_jsonl, "tasks": ["open_qa", "closed_qa"], "test_fraction": 0.25,
                    "max_length": 24},
           "partition": {"n_clients": 2, "min_frac": 0.0}, "train": {"rounds": 2, "local_steps": 2, "batch_size": 4},
           "eval": {"eval_size": 3, "batch_size": 2, "judge_samples": 0}}
    (tmp_path / "lm.yaml").write_text(yaml.safe_dump(cfg))
    out = tmp_path / "cmp"
    assert main(["compare", "--config", str(tmp_path / "lm.yaml"), "--methods", "fedit", "--seeds", "1", "2",
                 "--out", str(out), "--quiet"]) == 0
    with open(out / "comparison.csv") as f:
        rows = {r["quantity"]: r for r in csv.DictReader(f)}
    assert list(rows) == ["lm_loss/open_qa", "lm_loss/closed_qa", "lm_loss/mean", "uplink_bytes", "wall_seconds"]
    losses = [summary(out / f"fedit_seed{s}")["mean_lm_loss"] for s in (1, 2)]
    assert [float(v) for v in rows["lm_loss/mean"]["values"].split()] == losses
    assert "Test LM loss (lower is better)" in (out / "comparison.md").read_text()
    assert (out / "accuracy_per_round.png").is_file() and (out / "accuracy_vs_uplink.png").is_file()


def test_a_config_error_answers_before_any_heavy_import(tiny_yaml, tmp_path):
    rc, modules = _imported(["compare", "--config", tiny_yaml, "--methods", "fltac", "nope", "--out", str(tmp_path)])
    assert rc == 2 and not modules & set(HEAVY), sorted(modules & set(HEAVY))
