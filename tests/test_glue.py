"""The GLUE hub scenario, on a tiny local copy of nyu-mll/glue written by the test (no network)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from fltac.config import load_config
from fltac.data import load_tasks
from fltac.data.batches import build_store
from fltac.data.glue import GLUE_TASKS
from fltac.data.hub import HubUnavailable
from fltac.data.tasks import LabelSpace

WORDS = "the a cat dog sat ran on under mat table quickly slowly red blue good bad".split()


def _sentence(rng) -> str:
    return " ".join(rng.choice(WORDS, size=int(rng.integers(3, 9))))


@pytest.fixture(scope="module")
def glue_copy(tmp_path_factory):
    """A folder laid out like the hub repository: README configs + ``<task>/<split>-00000-of-00001.parquet``."""
    root = tmp_path_factory.mktemp("glue")
    rng = np.random.default_rng(0)
    readme = ["---", "configs:"]
    for task, (first, second, _) in GLUE_TASKS.items():
        (root / task).mkdir()
        readme += [f"- config_name: {task}", "  data_files:"]
        for split, n in (("train", 24), ("validation", 8)):
            frame = {first: [_sentence(rng) for _ in range(n)]}
            if second:
                frame[second] = [_sentence(rng) for _ in range(n)]
            frame["label"] = [i % 2 for i in range(n)]
            frame["idx"] = list(range(n))
            pd.DataFrame(frame).to_parquet(root / task / f"{split}-00000-of-00001.parquet")
            readme += [f"  - split: {split}", f"    path: {task}/{split}-*"]
    readme.append("---")
    (root / "README.md").write_text("\n".join(readme) + "\n")
    return root


def test_glue_loader_reads_the_hub_layout(glue_copy):
    cfg = load_config(overrides={"data.scenario": "glue", "data.source": str(glue_copy)})
    tasks = load_tasks(cfg.data)
    assert [t.name for t in tasks] == list(GLUE_TASKS)
    sst2, mrpc = tasks[0], tasks[1]
    assert isinstance(sst2.train_texts[0], str) and isinstance(mrpc.train_texts[0], tuple)
    assert (len(mrpc.train_texts), len(mrpc.test_texts)) == (24, 8)  # train and validation splits
    expected = pd.read_parquet(glue_copy / "mrpc" / "validation-00000-of-00001.parquet")
    assert mrpc.test_texts[3] == (expected.sentence1[3], expected.sentence2[3])
    assert mrpc.test_labels.tolist() == expected.label.tolist()
    assert mrpc.labels == ["not_equivalent", "equivalent"]


def test_pairs_are_encoded_as_bert_pairs_with_token_types(glue_copy, tiny_bert):
    from transformers import AutoTokenizer

    cfg = load_config(overrides={"data.scenario": "glue", "data.source": str(glue_copy), "data.tasks": ["sst2", "rte"]})
    tasks = load_tasks(cfg.data)
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    store, index = build_store(tokenizer, tasks, LabelSpace.of(tasks), 40, "train")
    a, b = tasks[1].train_texts[0]
    want = tokenizer(a, b)
    row = index[1][0]
    n = store.lengths[row]
    assert store.ids[row, :n].tolist() == want["input_ids"]
    assert store.type_ids[row, :n].tolist() == want["token_type_ids"]
    assert set(store.type_ids[index[1][0], :n]) == {0, 1}
    assert not store.type_ids[index[0]].any()  # sst2 is single-sentence: segment 0 throughout
    batch = store.batch(index[1][:4])
    assert batch.model_inputs()["token_type_ids"].shape == batch.input_ids.shape


def test_glue_trains_end_to_end_from_a_local_copy(glue_copy, tiny_bert, tmp_path):
    from fltac.engines.inprocess import run
    from tests.conftest import tiny_config_overrides

    overrides = {**tiny_config_overrides(tiny_bert, tmp_path / "run"), "data.scenario": "glue",
                 "data.source": str(glue_copy), "data.tasks": ["sst2", "mrpc"]}
    summary = run(load_config(overrides=overrides), quiet=True)
    assert set(summary["per_task_accuracy"]) == {"sst2", "mrpc"}
    assert summary["clustering_accuracy"] is not None


def test_glue_without_hub_stops_at_once_naming_the_offline_scenario(monkeypatch):
    import fltac.data.hub as hub

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hub, "hub_reachable", lambda timeout=hub.PROBE_TIMEOUT_S: False)
    import datasets

    def no_download(*args, **kwargs):
        raise AssertionError("the check must stop the run before any download is tried")

    monkeypatch.setattr(datasets, "load_dataset", no_download)
    cfg = load_config("configs/glue_bert.yaml")
    with pytest.raises(HubUnavailable, match=r"nyu-mll/glue.*fltac run --config configs/text5.yaml"):
        load_tasks(cfg.data)
