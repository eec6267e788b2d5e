"""``fltac export`` writes what peft's own save_pretrained writes, and peft alone (no fltac) reproduces
fltac's evaluation of the exported adapter; ``fltac predict`` uses it."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file

from fltac.cli import main
from fltac.config import from_dict
from fltac.experiment import build_experiment
from fltac.export import ExportError, export_run, read_slots, serving_slots, slots_from_assignments


@pytest.fixture(scope="module")
def exported(tiny_runs, tmp_path_factory):
    out = tmp_path_factory.mktemp("export")
    return {method: export_run(tiny_runs[method], out / method) for method in ("fltac", "fedit")}


@pytest.fixture(scope="module")
def experiment(tiny_runs):
    """fltac's own model and evaluator for the FL-TAC run, rebuilt from its config.json."""
    return build_experiment(from_dict(json.loads((tiny_runs["fltac"] / "config.json").read_text())))


def test_one_folder_per_task_for_fltac_and_one_for_fedit(exported):
    assert sorted(exported["fltac"]) == ["reviews", "topics"] and sorted(exported["fedit"]) == ["fedit"]
    for folder in [*exported["fltac"].values(), exported["fedit"]["fedit"]]:
        assert sorted(p.name for p in folder.iterdir()) == ["README.md", "adapter_config.json",
                                                             "adapter_model.safetensors", "labels.json"]
    labels = json.loads((exported["fltac"]["topics"] / "labels.json").read_text())
    assert labels["num_labels"] == 5 and labels["tasks"] == [
        {"name": "topics", "offset": 2, "labels": ["cooking", "sport", "weather"]}]
    assert labels["id2label"] == {"2": "topics/cooking", "3": "topics/sport", "4": "topics/weather"}
    fedit = json.loads((exported["fedit"]["fedit"] / "labels.json").read_text())
    assert [t["name"] for t in fedit["tasks"]] == ["reviews", "topics"] and len(fedit["id2label"]) == 5


def test_export_matches_peft_save_pretrained(exported, experiment, tiny_runs, tmp_path):
    folder = exported["fltac"]["reviews"]
    slot = json.loads((folder / "labels.json").read_text())["slot"]
    experiment.model.load(read_slots(tiny_runs["fltac"], 2)[slot])
    experiment.model.model.save_pretrained(str(tmp_path / "peft"))
    ours, theirs = load_file(str(folder / "adapter_model.safetensors")), load_file(str(tmp_path / "peft" /
                                                                                      "adapter_model.safetensors"))
    assert sorted(ours) == sorted(theirs)
    assert "base_model.model.classifier.weight" in ours
    assert "base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight" in ours
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config == json.loads((tmp_path / "peft" / "adapter_config.json").read_text()) | {
        "base_model_name_or_path": config["base_model_name_or_path"]}


PEFT_ONLY = textwrap.dedent("""
    import json, sys
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForSequenceClassification
    for folder, inputs, out in zip(*[iter(sys.argv[1:])] * 3):
        labels = json.load(open(f"{folder}/labels.json"))
        base = AutoModelForSequenceClassification.from_pretrained(labels["backbone"], num_labels=labels["num_labels"])
        model = PeftModel.from_pretrained(base, folder).eval()
        batches = load_file(inputs)
        with torch.inference_mode():
            logits = {f"logits{i}": model(input_ids=batches[f"ids{i}"], attention_mask=batches[f"mask{i}"]).logits
                      for i in range(len(batches) // 2)}
        save_file(logits, out)
    assert not any(name.startswith("fltac") for name in sys.modules), "fltac was imported"
""")


def test_peft_alone_gives_fltac_logits_and_accuracy(exported, experiment, tiny_runs, tmp_path):
    """A python with peft and transformers only loads each exported task adapter and scores fltac's test batches."""
    args, ours, metas = [], {}, {}
    for task, folder in exported["fltac"].items():
        labels = json.loads((folder / "labels.json").read_text())
        t = experiment.task_names.index(task)
        experiment.model.load(read_slots(tiny_runs["fltac"], 2)[labels["slot"]])
        experiment.model.model.eval()
        batches, ours[task] = {}, []
        with torch.inference_mode():
            for i, rows in enumerate(experiment.evaluator.batches[t]):
                batch = experiment.evaluator.store.batch(rows)
                batches[f"ids{i}"], batches[f"mask{i}"] = batch.input_ids, batch.attention_mask
                ours[task].append(experiment.model.logits(**batch.model_inputs()))
        save_file(batches, str(tmp_path / f"{task}_inputs.safetensors"))
        args += [str(folder), *(str(tmp_path / f"{task}_{kind}.safetensors") for kind in ("inputs", "logits"))]
        metas[task] = (t, labels["tasks"][0])
    subprocess.run([sys.executable, "-c", PEFT_ONLY, *args], check=True, cwd=tmp_path)
    metrics = [json.loads(line) for line in (tiny_runs["fltac"] / "metrics.jsonl").read_text().splitlines()]
    for task, (t, spec) in metas.items():
        theirs = load_file(str(tmp_path / f"{task}_logits.safetensors"))
        theirs = [theirs[f"logits{i}"] for i in range(len(ours[task]))]
        # the same fp32 maths; bf16 backbones would differ by bf16 rounding (~1e-2), fp32 by far less
        for a, b in zip(ours[task], theirs):
            torch.testing.assert_close(b.float(), a, atol=1e-4, rtol=1e-4)
        lo, hi = spec["offset"], spec["offset"] + len(spec["labels"])
        pred = torch.cat([b[:, lo:hi].argmax(-1) + lo for b in theirs])
        true = torch.cat([experiment.evaluator.store.batch(rows).labels for rows in experiment.evaluator.batches[t]])
        recorded = next(m["accuracy"] for m in metrics if m.get("phase") == "eval" and m["round"] == 2
                        and m["task"] == task)
        assert (pred == true).float().mean().item() == pytest.approx(recorded)


LABEL_LINE = r"(\w+): (\w+) \((0\.\d{3}|1\.000)\)"


def test_predict_cli_prints_text_label_and_probability(exported, capsys):
    long_text = "the striker scored a late goal " * 150  # ~900 tokens: cut to max_length, as in training
    assert main(["predict", "--adapter", str(exported["fltac"]["reviews"]), "I loved it", long_text]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2
    for line, text in zip(lines, ["I loved it", long_text]):
        cell, shown = line.split("\t")
        task, label, prob = re.fullmatch(LABEL_LINE, cell).groups()
        assert task == "reviews" and label in {"negative", "positive"} and 0.5 <= float(prob) <= 1.0
        assert shown == text[:57] + "..." if len(text) > 60 else shown == text
    assert main(["predict", "--adapter", str(exported["fedit"]["fedit"]), "bake the bread"]) == 0
    (line,) = capsys.readouterr().out.splitlines()
    cells = line.split("\t")
    assert [re.fullmatch(LABEL_LINE, c).group(1) for c in cells[:2]] == ["reviews", "topics"]
    assert cells[2] == "bake the bread"
    assert main(["predict", "--adapter", str(exported["fedit"]["fedit"]), "--task", "topics", "bake"]) == 0
    cell, text = capsys.readouterr().out.strip().split("\t")
    assert re.fullmatch(LABEL_LINE, cell).group(2) in {"cooking", "sport", "weather"} and text == "bake"
    assert main(["predict", "--adapter", str(exported["fedit"]["fedit"]), "--task", "nope", "bake"]) == 2
    assert "task 'nope' is not served" in capsys.readouterr().err


def test_predict_json_one_object_per_text(exported, capsys):
    texts = ["bake the bread", "what a bore"]
    assert main(["predict", "--json", "--adapter", str(exported["fedit"]["fedit"]), *texts]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["text"] for r in rows] == texts
    labels = json.loads((exported["fedit"]["fedit"] / "labels.json").read_text())
    for row in rows:
        assert list(row["tasks"]) == ["reviews", "topics"]
        for spec in labels["tasks"]:
            pred = row["tasks"][spec["name"]]
            probs = pred["probabilities"]
            assert list(probs) == spec["labels"] and sum(probs.values()) == pytest.approx(1.0, abs=1e-5)
            assert pred["label"] == max(probs, key=probs.get) and pred["probability"] == max(probs.values())
    # the text lines and the JSON agree
    assert main(["predict", "--adapter", str(exported["fedit"]["fedit"]), *texts]) == 0
    for line, row in zip(capsys.readouterr().out.splitlines(), rows):
        assert line.split("\t")[0] == f"reviews: {row['tasks']['reviews']['label']} " \
                                       f"({row['tasks']['reviews']['probability']:.3f})"


def test_readme_snippet_predicts_with_peft_alone_on_a_long_text(exported, tmp_path, capsys):
    """The README.md export writes holds a snippet that runs with peft and transformers only, cuts a 900-token
    text to max_length, prints no head report and agrees with fltac predict."""
    folder = exported["fltac"]["topics"]
    readme = (folder / "README.md").read_text()
    assert f"fltac predict --adapter {folder}" in readme
    snippet = re.search(r"```python\n(.*?)```", readme, re.S).group(1)
    texts = ["bake the bread", "heavy rain " * 450]
    snippet = re.sub(r"^texts = .*$", f"texts = {texts!r}", snippet, count=1, flags=re.M)
    guard = "\nimport sys\nassert not any(m.startswith('fltac') for m in sys.modules), 'fltac was imported'\n"
    proc = subprocess.run([sys.executable, "-c", snippet + guard], capture_output=True, text=True, cwd=tmp_path,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "MISSING" not in proc.stderr and "newly initialized" not in proc.stderr
    assert main(["predict", "--adapter", str(folder), *texts]) == 0
    ours = [line.split("\t")[0] for line in capsys.readouterr().out.splitlines()]
    assert [line.split("\t")[0] for line in proc.stdout.splitlines()] == ours


def test_loading_an_export_prints_no_head_report_and_restores_logging(exported, capfd):
    from transformers.utils import logging as hf_logging

    from fltac.export import load_exported

    hf_logging.set_verbosity_warning()
    load_exported(exported["fltac"]["reviews"])
    assert hf_logging.get_verbosity() == hf_logging.WARNING
    err = capfd.readouterr().err
    assert "MISSING" not in err and "newly initialized" not in err


def test_serving_slot_recomputed_from_assignments_matches_the_evaluation(tiny_runs):
    for round_ in (1, 2):
        from_eval = serving_slots(tiny_runs["fltac"], from_dict(json.loads(
            (tiny_runs["fltac"] / "config.json").read_text())), ["reviews", "topics"], round_)
        assert slots_from_assignments(tiny_runs["fltac"], ["reviews", "topics"], round_) == from_eval


def test_export_round_and_errors(tiny_runs, tmp_path, capsys):
    assert main(["export", str(tiny_runs["fltac"]), "--out", str(tmp_path / "r1"), "--round", "1"]) == 0
    assert json.loads((tmp_path / "r1" / "reviews" / "labels.json").read_text())["round"] == 1
    with pytest.raises(ExportError, match=r"no adapters for round 7 \(saved rounds: \[1, 2\]\)"):
        export_run(tiny_runs["fltac"], tmp_path / "r7", 7)
    assert main(["export", str(tmp_path), "--out", str(tmp_path / "x")]) == 2
    assert "is not a run folder" in capsys.readouterr().err


def test_the_docs_show_the_snippet_the_export_writes():
    from pathlib import Path

    from fltac.export import PEFT_SNIPPET

    page = (Path(__file__).resolve().parents[1] / "docs" / "own-data.md").read_text()
    assert PEFT_SNIPPET.replace("FOLDER", '"exported/text5/bbc"') in page
