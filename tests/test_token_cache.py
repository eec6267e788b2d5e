"""The on-disk cache of tokenised texts (fltac.data.token_cache): a hit equals a fresh tokenisation, and any
change to the texts, the tokenizer or max_length gives a new entry instead of a stale one."""

from __future__ import annotations

import numpy as np
import pytest

from fltac.data import token_cache
from fltac.data.batches import build_store, tokenize
from fltac.data.tasks import LabelSpace, Task

TEXTS = ["the striker scored a late goal", "bake the bread for an hour", "a heatwave is on the way",
         "the staff were friendly and the food was delicious " * 4]


@pytest.fixture(scope="module")
def tokenizer(tiny_bert):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_bert)


def two_tasks(texts=TEXTS) -> list[Task]:
    labels = np.array([0, 1, 0, 1])
    pairs = [(t, t[::-1]) for t in texts]
    return [Task("single", ["a", "b"], list(texts), labels, list(texts), labels),
            Task("pairs", ["a", "b"], pairs, labels, pairs, labels)]


def stores_equal(a, b) -> None:
    for name in ("ids", "lengths", "labels", "task", "type_ids"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert a.pad_id == b.pad_id


def test_cached_store_equals_fresh_tokenisation(tokenizer, tmp_path):
    tasks = two_tasks()
    space = LabelSpace.of(tasks)
    fresh, index = build_store(tokenizer, tasks, space, 16, "train")
    first, index1 = build_store(tokenizer, tasks, space, 16, "train", cache=tmp_path)
    second, index2 = build_store(tokenizer, tasks, space, 16, "train", cache=tmp_path)
    assert len(list(tmp_path.glob("*.npz"))) == 2  # one entry per task
    for store, idx in ((first, index1), (second, index2)):
        stores_equal(store, fresh)
        for a, b in zip(idx, index):
            np.testing.assert_array_equal(a, b)


def test_a_hit_does_not_tokenise(tokenizer, tmp_path):
    token_cache.cached(tokenize, tokenizer, TEXTS, 16, tmp_path)

    def refuse(*args):
        raise AssertionError("tokenised although the entry is cached")

    ids, lengths, types = token_cache.cached(refuse, tokenizer, TEXTS, 16, tmp_path)
    want = tokenize(tokenizer, TEXTS, 16)
    np.testing.assert_array_equal(ids, want[0])
    np.testing.assert_array_equal(lengths, want[1])
    assert types is None


@pytest.mark.parametrize("change", ["text", "max_length", "salt", "truncation_side", "vocabulary"])
def test_a_change_of_input_or_tokenizer_is_a_new_entry(tokenizer, tmp_path, change):
    import copy

    token_cache.cached(tokenize, tokenizer, TEXTS, 16, tmp_path)
    texts, max_length, salt, tok = list(TEXTS), 16, "", tokenizer
    if change == "text":
        texts[1] = texts[1] + "!"
    elif change == "max_length":
        max_length = 8
    elif change == "salt":
        salt = "chars_per_token_bound=4"
    else:
        tok = copy.deepcopy(tokenizer)
        if change == "truncation_side":
            tok.truncation_side = "left"
        else:
            tok.add_tokens(["strikerscored"])
    calls = []

    def counting(*args):
        calls.append(1)
        return tokenize(*args)

    ids, lengths, _ = token_cache.cached(counting, tok, texts, max_length, tmp_path, salt)
    assert calls == [1]  # rebuilt, not read from the old entry
    assert len(list(tmp_path.glob("*.npz"))) == 2
    want = tokenize(tok, texts, max_length)
    np.testing.assert_array_equal(ids, want[0])
    np.testing.assert_array_equal(lengths, want[1])


def test_an_unreadable_entry_is_rebuilt(tokenizer, tmp_path):
    token_cache.cached(tokenize, tokenizer, TEXTS, 16, tmp_path)
    (entry,) = tmp_path.glob("*.npz")
    entry.write_bytes(entry.read_bytes()[:100])  # torn
    ids, _, _ = token_cache.cached(tokenize, tokenizer, TEXTS, 16, tmp_path)
    np.testing.assert_array_equal(ids, tokenize(tokenizer, TEXTS, 16)[0])
    assert token_cache.cached(lambda *a: (_ for _ in ()).throw(AssertionError), tokenizer, TEXTS, 16,
                              tmp_path)[0].shape == ids.shape  # rewritten whole


def test_a_run_with_and_without_the_cache_gives_the_same_numbers(tiny_bert, csv_scenario, tmp_path):
    from fltac.config import load_config
    from fltac.engines.inprocess import run

    from conftest import tiny_config_overrides

    summaries = []
    for name, use in (("cold", True), ("warm", True), ("off", False)):
        overrides = {**tiny_config_overrides(tiny_bert, tmp_path / name), "data.scenario": "custom",
                     "data.custom_tasks": csv_scenario["tasks"], "data.cache_dir": str(tmp_path / "cache"),
                     "data.token_cache": use}
        summaries.append(run(load_config(None, overrides), quiet=True))
    assert list((tmp_path / "cache" / "tokens").glob("*.npz"))
    for other in summaries[1:]:
        assert other["per_task_accuracy"] == summaries[0]["per_task_accuracy"]
        assert other["mean_personalized_accuracy"] == summaries[0]["mean_personalized_accuracy"]
