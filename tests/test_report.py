"""``fltac report`` on two tiny runs; TensorBoard streaming; progress lines with a time estimate."""

from __future__ import annotations

import io
import json
import re

import numpy as np
from sklearn.metrics import adjusted_rand_score

from fltac.cli import main
from fltac.config import from_dict
from fltac.eval.progress import Progress, eta, format_seconds
from fltac.eval.report import (accuracy_vs_uplink, build_report, kmeans_features, load_run, majority_accuracy,
                               per_task_rows, submission_rounds)
from fltac.server.strategies import make_fltac

PNGS = ["accuracy_per_round.png", "accuracy_vs_uplink.png", "clustering_accuracy.png", "confusion_fltac.png",
        "projection_fltac.png"]


def test_report_has_plots_and_a_table_of_both_runs(tiny_runs, tmp_path):
    md = build_report([tiny_runs["fltac"], tiny_runs["fedit"]], tmp_path / "report")
    for name in PNGS:
        data = (tmp_path / "report" / name).read_bytes()
        assert data.startswith(b"\x89PNG") and 1_000 < len(data) < 100_000, name
    text = md.read_text()
    for method in ("fltac", "fedit"):
        s = json.loads((tiny_runs[method] / "summary.json").read_text())
        row = next(line for line in text.splitlines() if line.startswith(f"| {method} |"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[:4] == [method, s["method"], str(s["rounds"]), f"{s['mean_accuracy']:.4f}"]
        assert cells[5] == ("-" if s["clustering_accuracy"] is None else f"{s['clustering_accuracy']:.4f}")
        assert cells[6:] == [f"{s['uplink_bytes']:,}", f"{s['downlink_bytes']:,}", "-",  # no DP: no epsilon
                             f"{s['wall_seconds']:.1f}"]
    page = (tmp_path / "report" / "report.html").read_text()
    assert sorted(re.findall(r'<img src="([^"]+)"', page)) == sorted(PNGS)  # relative: opens with its images
    assert sorted(re.findall(r"\]\(([^)]+\.png)\)", text)) == sorted(PNGS)


def test_majority_class_accuracy_of_the_eval_sample_in_the_report(tiny_runs, tmp_path):
    """tasks.json records each task's majority-class accuracy on the very test sample the run scored; the
    report's per-task table sets it under each run's per-task accuracy (both runs: one seed, one sample)."""
    from fltac.config import from_dict
    from fltac.experiment import build_experiment

    run = load_run(tiny_runs["fltac"])
    exp = build_experiment(from_dict(run.config))
    majority = majority_accuracy(run)
    assert list(majority) == run.tasks == ["reviews", "topics"]
    for t, task in enumerate(run.tasks):
        _, true = exp.evaluator.predictions(exp.strategy.initial, t)  # the sample's true labels, as scored
        assert len(true) == run.config["eval"]["eval_size"]
        assert majority[task] == np.bincount(true).max() / len(true)
    assert 0.5 <= majority["reviews"] < 1.0 and 1 / 3 <= majority["topics"] < 1.0
    head, rows = per_task_rows([run, load_run(tiny_runs["fedit"])])
    assert head == ["run", "method", "reviews", "topics"]
    for row, method in zip(rows, ("fltac", "fedit")):
        s = json.loads((tiny_runs[method] / "summary.json").read_text())
        assert row == [method, method, *(f"{s['per_task_accuracy'][t]:.4f}" for t in head[2:])]
    assert rows[2:] == [["majority class", "-", f"{majority['reviews']:.4f}", f"{majority['topics']:.4f}"]]
    text = build_report([tiny_runs["fltac"]], tmp_path / "r").read_text()
    assert "## Accuracy per task" in text and f"| majority class | - | {majority['reviews']:.4f} |" in text


def test_report_cli_defaults_to_the_first_run(tiny_runs, capsys):
    assert main(["report", str(tiny_runs["fltac"]), str(tiny_runs["fedit"])]) == 0
    assert (tiny_runs["fltac"] / "report.md").is_file() and (tiny_runs["fltac"] / "report.html").is_file()
    assert "fltac report" in (tiny_runs["fltac"] / "report.md").read_text()
    assert main(["report", str(tiny_runs["fltac"] / "adapters")]) == 2
    assert "is not a finished run" in capsys.readouterr().err


def test_uplink_curve_ends_at_the_summary(tiny_runs):
    for method in ("fltac", "fedit"):
        run = load_run(tiny_runs[method])
        x, y = accuracy_vs_uplink(run)
        assert x[-1] == run.summary["uplink_bytes"] and y[-1] == run.summary["mean_accuracy"]
        assert x == sorted(x) and len(x) == 2


def test_projection_shows_what_the_server_clustered(tiny_runs):
    """The run's own clustering (spectral by default) on the rebuilt features, seeded as the server seeds it,
    gives back the recorded clusters."""
    run = load_run(tiny_runs["fltac"])
    assert submission_rounds(run) == [1, 2] and run.config["server"]["clustering"] == "spectral"
    strategy = make_fltac(from_dict(run.config), {}, len(run.tasks), [])
    for r in (1, 2):
        feats, tasks, clusters = kmeans_features(run, r)
        again = strategy.labels(feats, r, strategy.n_slots)
        assert adjusted_rand_score(clusters, again) == 1.0
        assert np.allclose(np.linalg.norm(feats, axis=1), 1.0)  # the run normalised them


def test_tensorboard_stream(tiny_bert, csv_scenario, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from fltac.config import load_config
    from fltac.engines.inprocess import run

    from conftest import tiny_config_overrides

    cfg = load_config(None, {**tiny_config_overrides(tiny_bert, tmp_path / "run"), "method": "fedit",
                             "data.scenario": "custom", "data.custom_tasks": csv_scenario["tasks"]})
    summary = run(cfg, quiet=True, log=("tensorboard",))
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    mean = events.Scalars("accuracy/mean")
    assert [e.step for e in mean] == [1, 2] and abs(mean[-1].value - summary["mean_accuracy"]) < 1e-6
    assert {"accuracy/reviews", "accuracy/topics", "round/uplink_bytes"} <= set(events.Tags()["scalars"])


def test_progress_estimates_the_time_left():
    assert (format_seconds(9.4), format_seconds(75), format_seconds(3725)) == ("9s", "1m15s", "1h02m")
    assert eta(0, 10, 5.0) is None and eta(2, 10, 4.0) == 16.0
    log = io.StringIO()
    bar = Progress("round 1/3: adapters trained", 4, stream=log, interval=0)
    for _ in range(3):
        bar.step(note="client 0")
    bar.step()  # the last unit: a plain log leaves the summary to the caller
    lines = log.getvalue().splitlines()
    assert len(lines) == 3 and lines[0].startswith("[fltac] round 1/3: adapters trained 1/4") and "ETA" in lines[0]

    class Tty(io.StringIO):
        def isatty(self):
            return True

    tty = Tty()
    bar = Progress("eval", 2, stream=tty, interval=0)
    bar.step()
    bar.close()
    assert tty.getvalue().startswith("\r[fltac] eval 1/2") and tty.getvalue().endswith("\r")
    quiet = io.StringIO()
    Progress("x", 3, enabled=False, stream=quiet, interval=0).step()
    assert quiet.getvalue() == ""


def test_projection_rebuilds_exactly_the_vectors_the_server_clustered(tiny_bert, csv_scenario, tmp_path, monkeypatch):
    """A run that clusters randomly projected updates: the report's vectors are the very ones the server's
    K-means got (same tensors, update from each job's start adapter, normalisation, kmeans_dims projection)."""
    from fltac.config import load_config
    from fltac.engines.inprocess import run
    from fltac.server.strategies import FLTAC

    from conftest import tiny_config_overrides

    seen = []
    features = FLTAC.features
    monkeypatch.setattr(FLTAC, "features", lambda self, subs: seen.append(features(self, subs)) or seen[-1])
    cfg = load_config(None, {**tiny_config_overrides(tiny_bert, tmp_path / "run"), "method": "fltac",
                             "data.scenario": "custom", "data.custom_tasks": csv_scenario["tasks"],
                             "server.cluster_on": "update", "server.kmeans_dims": 6})
    run(cfg, quiet=True)
    monkeypatch.undo()
    finished = load_run(tmp_path / "run")
    for r in (1, 2):
        feats, tasks, clusters = kmeans_features(finished, r)
        assert feats.shape == (len(clusters), 6) and len(set(tasks)) == 2
        np.testing.assert_array_equal(feats, seen[r - 1])
