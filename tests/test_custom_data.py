"""Custom tasks defined in the config alone: formats, the client-column partition, and every config mistake
stopping before training with a message that names the task and the problem."""

from __future__ import annotations

import json
import runpy
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from fltac.cli import main
from fltac.config import ConfigError, load_config
from fltac.data import load_tasks
from fltac.data.partition import partition_task
from fltac.experiment import build_partition

from conftest import AUTHORS, tiny_config_overrides


def custom_cfg(specs, **extra):
    return load_config(None, {"data.scenario": "custom", "data.custom_tasks": specs, "partition.n_clients": 2,
                              "partition.min_frac": 0.0, **extra})


def write_yaml(path, model, out, specs, **extra) -> str:
    """A scenario config file as a user would write it: nested sections, tasks listed under data."""
    data = {"model_name": model, "output_dir": str(out), "dtype": "float32",
            "data": {"scenario": "custom", "max_length": 32, "custom_tasks": specs},
            "partition": {"n_clients": 2, "min_frac": 0.0}, "train": {"rounds": 1, "local_steps": 1, "batch_size": 4},
            "eval": {"eval_size": 8}}
    for dotted, value in extra.items():
        section, key = dotted.split(".")
        data[section][key] = value
    path.write_text(yaml.safe_dump(data))
    return str(path)


# ---- the scenario, end to end ----------------------------------------------------------------------

def test_two_csv_tasks_load_with_labels_split_and_owners(csv_scenario):
    reviews, topics = load_tasks(custom_cfg(csv_scenario["tasks"]).data)
    assert (reviews.name, reviews.labels, topics.labels) == ("reviews", ["negative", "positive"],
                                                             ["cooking", "sport", "weather"])
    assert len(reviews.train_texts) == 60 and len(reviews.test_texts) == 20  # its own test file
    assert len(topics.train_texts) + len(topics.test_texts) == 54 and len(topics.test_texts) == 14  # 25% held out
    assert sorted(Counter(topics.test_labels.tolist()).values()) == [4, 5, 5]  # stratified
    assert topics.train_texts[0].count("\n") == 1  # title and body joined
    assert sorted(set(reviews.train_owners)) == AUTHORS and topics.train_owners is None


def test_partition_follows_the_client_column(csv_scenario):
    cfg = custom_cfg(csv_scenario["tasks"])
    reviews, topics = tasks = load_tasks(cfg.data)
    parts = build_partition(cfg, tasks)
    for k, author in enumerate(sorted(AUTHORS)):  # sorted distinct owners are clients 0..n-1
        assert {reviews.train_owners[i] for i in parts[0][k]} == {author}
    assert sum(len(p) for p in parts[0]) == len(reviews.train_texts)
    p = cfg.partition  # the other task: Dirichlet as before, seeded with seed + its index
    dirichlet = partition_task(len(topics.train_texts), p.n_clients, p.alpha, p.min_frac, cfg.seed + 1)
    assert all(np.array_equal(a, b) for a, b in zip(parts[1], dirichlet))


def test_one_round_run_trains_each_owner_on_its_own_rows(tiny_runs, csv_scenario):
    rows = [json.loads(line) for line in (tiny_runs["fltac"] / "cluster_assignments.jsonl").read_text().splitlines()]
    owners = Counter(pd.read_csv(csv_scenario["dir"] / "reviews.csv")["author"])
    held = {a["client"]: a["n"] for a in rows[0]["assignments"] if a["task"] == "reviews"}
    assert held == {k: owners[a] for k, a in enumerate(sorted(AUTHORS))}
    summary = json.loads((tiny_runs["fltac"] / "summary.json").read_text())
    assert summary["tasks"] == ["reviews", "topics"] and summary["scenario"] == "custom"


def test_partition_cli_reads_a_yaml_scenario(tmp_path, tiny_bert, csv_scenario, capsys):
    config = write_yaml(tmp_path / "two.yaml", tiny_bert, tmp_path / "run", csv_scenario["tasks"])
    assert main(["partition", "--config", config]) == 0
    table = capsys.readouterr().out
    assert "reviews" in table and "topics" in table
    owners = Counter(pd.read_csv(csv_scenario["dir"] / "reviews.csv")["author"])
    assert [int(line.split()[1]) for line in table.splitlines() if line.startswith("#")] == \
        [owners[a] for a in sorted(AUTHORS)]


# ---- formats ---------------------------------------------------------------------------------------

def test_every_format_reads_the_same_task(tmp_path, csv_scenario):
    frame = pd.read_csv(csv_scenario["dir"] / "topics.csv")
    (tmp_path / "folder").mkdir()
    frame.iloc[:20].to_csv(tmp_path / "folder" / "a.csv", index=False)
    frame.iloc[20:].to_csv(tmp_path / "folder" / "b.csv", index=False)
    frame.to_csv(tmp_path / "t.tsv", sep="\t", index=False)
    frame.to_json(tmp_path / "t.jsonl", orient="records", lines=True)
    frame.to_parquet(tmp_path / "t.parquet")
    frame.to_csv(tmp_path / "t.csv.gz", index=False)
    spec = {"name": "topics", "text_columns": ["title", "body"], "label_column": "topic"}
    reference = load_tasks(custom_cfg([{**spec, "source": str(csv_scenario["dir"] / "topics.csv")}]).data)[0]
    for source in ["folder", "t.tsv", "t.jsonl", "t.parquet", "t.csv.gz"]:
        task = load_tasks(custom_cfg([{**spec, "source": str(tmp_path / source)}]).data)[0]
        assert (task.train_texts, task.test_texts, task.labels) == \
            (reference.train_texts, reference.test_texts, reference.labels), source
        assert np.array_equal(task.train_labels, reference.train_labels)


def test_hub_source_reads_a_local_dataset_folder(tmp_path, csv_scenario):
    folder = tmp_path / "hub_like"
    folder.mkdir()
    frame = pd.read_csv(csv_scenario["dir"] / "reviews.csv")
    frame.to_csv(folder / "train.csv", index=False)
    pd.read_csv(csv_scenario["dir"] / "reviews_test.csv").to_csv(folder / "test.csv", index=False)
    spec = {"name": "reviews", "source": str(folder), "format": "hub", "hub_split": "train", "hub_test_split": "test",
            "text_columns": ["text"], "label_column": "sentiment", "client_column": "author"}
    task = load_tasks(custom_cfg([spec]).data)[0]
    assert len(task.train_texts) == len(frame) and len(task.test_texts) == 20
    assert sorted(set(task.train_owners)) == AUTHORS
    with pytest.raises(ConfigError, match=r"task 'reviews': cannot load hub dataset .*split 'validation'"):
        load_tasks(custom_cfg([{**spec, "hub_test_split": "validation"}]).data)


def test_max_examples_caps_training_rows_only(csv_scenario):
    spec = {**csv_scenario["tasks"][0], "max_examples": 10}
    task = load_tasks(custom_cfg([spec]).data)[0]
    assert len(task.train_texts) == 10 and len(task.train_owners) == 10 and len(task.test_texts) == 20


# ---- every mistake: stops before training, names the task and the problem ---------------------------

def _write(path, text: str) -> str:
    path.write_text(text)
    return str(path)


MISTAKES = {
    "missing file": (lambda d, s: {**s, "source": str(d / "nowhere.csv")},
                     [r"task 'reviews': source '.*nowhere\.csv' does not exist"]),
    "missing test file": (lambda d, s: {**s, "test_source": str(d / "nowhere.csv")},
                          [r"task 'reviews': test_source '.*nowhere\.csv' does not exist"]),
    "missing text column": (lambda d, s: {**s, "text_columns": ["review"]},
                            [r"task 'reviews': column 'review' \(text_columns\) not found",
                             r"columns there: text, sentiment, author"]),
    "missing label column": (lambda d, s: {**s, "label_column": "stars"},
                             [r"task 'reviews': column 'stars' \(label_column\) not found",
                              r"columns there: text, sentiment, author"]),
    "missing client column": (lambda d, s: {**s, "client_column": "site"},
                              [r"task 'reviews': column 'site' \(client_column\) not found"]),
    "one class": (lambda d, s: {**s, "source": _write(d / "one.csv", "text,sentiment,author\na,pos,ana\nb,pos,bo\n")},
                  [r"task 'reviews': label column 'sentiment' has a single class \('pos'\)"]),
    "empty test file": (lambda d, s: {**s, "test_source": _write(d / "empty.csv", "text,sentiment\n")},
                        [r"task 'reviews': the test split is empty: '.*empty\.csv' has no usable rows"]),
    "too few rows to hold out": (
        lambda d, s: {**s, "source": _write(d / "tiny.csv", "text,sentiment,author\na,pos,ana\n"),
                      "test_source": None},
        [r"task 'reviews': the test split is empty: .* has 1 usable row"]),
    "unseen test label": (lambda d, s: {**s, "test_source": _write(d / "odd.csv", "text,sentiment\nx,neutral\n")},
                          [r"task 'reviews': test label\(s\) \['neutral'\] of column 'sentiment' never occur"]),
    "generation": (lambda d, s: {**{k: v for k, v in s.items() if k not in ("text_columns", "label_column")},
                                 "kind": "generation", "prompt_column": "text", "response_column": "sentiment"},
                   [r"task 'reviews': kind: generation is read and checked", r"not implemented yet"]),
    "owners differ from n_clients": (lambda d, s: s, [r"task\(s\) \['reviews'\] name 2 distinct client",
                                                      r"set partition.n_clients: 2"]),
}


@pytest.mark.parametrize("mistake", list(MISTAKES))
def test_config_mistake_stops_before_training(mistake, tmp_path, csv_scenario, capsys):
    make, patterns = MISTAKES[mistake]
    spec = make(tmp_path, dict(csv_scenario["tasks"][0]))
    spec = {k: v for k, v in spec.items() if v is not None}
    extra = {"partition.n_clients": 3} if mistake == "owners differ from n_clients" else {}
    # a backbone that does not exist: the data is checked first, so the message is about the data
    config = write_yaml(tmp_path / "bad.yaml", str(tmp_path / "no_model"), tmp_path / "run",
                        [spec, csv_scenario["tasks"][1]], **extra)
    assert main(["run", "--config", config, "--quiet"]) == 2
    message = capsys.readouterr().err
    for pattern in patterns:
        assert __import__("re").search(pattern, message), (pattern, message)
    assert "no_model" not in message and not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.parametrize("change, pattern", [
    ({"source": None}, r"'data.custom_tasks\[0\]' \(task 'reviews'\) lacks required key\(s\) \['source'\]"),
    ({"label_column": None}, r"task 'reviews': a classification task needs label_column"),
    ({"test_fraction": 0.2}, r"task 'reviews': give test_source or test_fraction, not both"),
    ({"hub_config": "x"}, r"task 'reviews': hub_config/hub_split/hub_test_split need format: hub"),
    ({"text_columns": "text"}, r"'data.custom_tasks\[0\].text_columns' must be a list"),
    ({"colour": "red"}, r"unknown config key 'data.custom_tasks\[0\].colour'"),
])
def test_spec_mistakes_fail_when_the_config_is_read(change, pattern, csv_scenario):
    spec = {k: v for k, v in {**csv_scenario["tasks"][0], **change}.items() if v is not None}
    with pytest.raises(ConfigError, match=pattern):
        custom_cfg([spec])


def test_scenario_and_task_list_must_agree(csv_scenario):
    with pytest.raises(ConfigError, match="must list at least one task"):
        load_config(None, {"data.scenario": "custom"})
    with pytest.raises(ConfigError, match="only read when data.scenario is 'custom'"):
        load_config(None, {"data.custom_tasks": csv_scenario["tasks"]})
    with pytest.raises(ConfigError, match=r"duplicate task names \['reviews'\]"):
        custom_cfg([csv_scenario["tasks"][0]] * 2)


def test_config_round_trips_through_json(csv_scenario, tiny_runs):
    from fltac.config import from_dict

    saved = json.loads((tiny_runs["fltac"] / "config.json").read_text())
    cfg = from_dict(saved)
    assert [t.name for t in cfg.data.custom_tasks] == ["reviews", "topics"]
    assert cfg.to_dict() == saved
    assert tiny_config_overrides("m", "o")["partition.n_clients"] == len(AUTHORS)


# ---- the documented example: scripts/demo_data.py + configs/demo_custom.yaml ------------------------

ROOT = Path(__file__).resolve().parents[1]


def test_demo_config_loads_and_is_the_one_the_docs_show():
    cfg = load_config(ROOT / "configs" / "demo_custom.yaml")
    assert cfg.data.scenario == "custom" and [t.name for t in cfg.data.custom_tasks] == ["reviews", "news"]
    page = (ROOT / "docs" / "own-data.md").read_text()
    shown = page.split("`configs/demo_custom.yaml` reads them:\n\n```yaml\n", 1)[1].split("```", 1)[0]
    assert shown == (ROOT / "configs" / "demo_custom.yaml").read_text()


def test_demo_data_writes_the_csvs_the_demo_config_reads(tmp_path, monkeypatch, capsys):
    demo_data = runpy.run_path(str(ROOT / "scripts" / "demo_data.py"))["main"]
    monkeypatch.chdir(tmp_path)  # the config's paths are relative to the current directory, as documented
    assert demo_data([]) == 0
    written = {p: p.stat().st_mtime_ns for p in (tmp_path / "data" / "demo").glob("*.csv")}
    assert sorted(p.name for p in written) == ["news.csv", "reviews.csv"]
    assert demo_data([]) == 1 and "--force" in capsys.readouterr().err  # an existing file is left alone
    assert {p: p.stat().st_mtime_ns for p in written} == written
    assert main(["partition", "--config", str(ROOT / "configs" / "demo_custom.yaml")]) == 0
    totals = next(line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("total "))
    assert totals[1:] == ["2000", "1000", "3000"]  # each task's max_examples training rows, all assigned
