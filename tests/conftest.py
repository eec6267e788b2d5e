"""Shared fixtures for the custom-data, export and report tests: a tiny random BERT, a two-task CSV
scenario written by the test, and two tiny finished runs (FL-TAC and FedIT) on it.

The backbone is a 2-layer, 32-wide random BERT with the packaged MiniLM tokenizer, so a run takes
about a second; the runs are made once per test session.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch

POSITIVE = ["I loved this film", "what a wonderful day", "the food was delicious", "a truly great experience",
            "the staff were friendly", "I am very happy with it", "brilliant acting and a lovely story",
            "the best purchase ever", "the concert was fantastic", "such a pleasant surprise"]
NEGATIVE = ["I hated this film", "what a terrible day", "the food was awful", "a truly horrible experience",
            "the staff were rude", "I am very angry about it", "dreadful acting and a boring story",
            "the worst purchase ever", "the concert was a disaster", "such a nasty surprise"]
SPORT = ["the striker scored a late goal", "the team won the league", "a tennis match went to five sets",
         "the runner broke the record", "fans cheered in the stadium", "the keeper saved a penalty"]
COOKING = ["stir the sauce over a low heat", "bake the bread for an hour", "chop the onions finely",
           "whisk the eggs with sugar", "roast the chicken with garlic", "knead the dough on a board"]
WEATHER = ["heavy rain is expected tomorrow", "the forecast says sunny spells", "strong winds hit the coast",
           "snow fell across the hills", "a heatwave is on the way", "thunderstorms are likely tonight"]
AUTHORS = ["ana", "bo"]


def tiny_config_overrides(model: str, out) -> dict:
    """A run of a few seconds: 2 clients, 2 rounds, 2 local steps of 4 examples, 8 test examples per task."""
    return {"model_name": model, "output_dir": str(out), "dtype": "float32", "partition.n_clients": 2,
            "partition.min_frac": 0.0, "train.rounds": 2, "train.local_steps": 2, "train.batch_size": 4,
            "eval.eval_size": 8, "data.max_length": 32, "seed": 3}


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> str:
    from transformers import AutoTokenizer, BertConfig, BertModel

    from fltac.models.backbone import resolve_model_path

    folder = tmp_path_factory.mktemp("tiny_bert")
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("minilm"))
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128)
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def csv_scenario(tmp_path_factory) -> dict:
    """Two CSV tasks: 'reviews' (text, sentiment, author; own test file) and 'topics' (title, body, topic).

    Returns ``{"dir": folder, "tasks": [spec, spec]}``, the specs as a config's data.custom_tasks holds them.
    """
    folder = tmp_path_factory.mktemp("csv_scenario")
    rows = [(t, "positive") for t in POSITIVE] + [(t, "negative") for t in NEGATIVE]
    train = [(f"{t}{suffix}", y, AUTHORS[(i + k) % 2]) for k, suffix in enumerate(["", ", really", " indeed"])
             for i, (t, y) in enumerate(rows)]
    pd.DataFrame(train, columns=["text", "sentiment", "author"]).to_csv(folder / "reviews.csv", index=False)
    pd.DataFrame([(f"honestly, {t}", y) for t, y in rows], columns=["text", "sentiment"]).to_csv(
        folder / "reviews_test.csv", index=False)
    topics = [(t.split()[1], t, y) for y, group in [("sport", SPORT), ("cooking", COOKING), ("weather", WEATHER)]
              for t in group for _ in range(3)]
    pd.DataFrame(topics, columns=["title", "body", "topic"]).to_csv(folder / "topics.csv", index=False)
    specs = [{"name": "reviews", "source": str(folder / "reviews.csv"), "text_columns": ["text"],
              "label_column": "sentiment", "client_column": "author", "test_source": str(folder / "reviews_test.csv")},
             {"name": "topics", "source": str(folder / "topics.csv"), "text_columns": ["title", "body"],
              "label_column": "topic", "test_fraction": 0.25}]
    return {"dir": folder, "tasks": specs}


@pytest.fixture(scope="session")
def tiny_runs(tiny_bert, csv_scenario, tmp_path_factory) -> dict[str, Path]:
    """``{"fltac": run folder, "fedit": run folder}``: two finished 2-round runs on the CSV scenario."""
    from fltac.config import load_config
    from fltac.engines.inprocess import run

    root = tmp_path_factory.mktemp("runs")
    out = {}
    for method in ("fltac", "fedit"):
        overrides = {**tiny_config_overrides(tiny_bert, root / method), "method": method,
                     "data.scenario": "custom", "data.custom_tasks": csv_scenario["tasks"]}
        run(load_config(None, overrides), quiet=True)
        out[method] = root / method
    return out


def run_killed_and_resumed(cfg, monkeypatch, round_: int = 2) -> dict:
    """Run ``cfg`` killed (a raise) before round ``round_``'s records are written, then resume it; the summary."""
    from fltac.engines.inprocess import InProcessEngine, run

    original = InProcessEngine.evaluate

    def crash(self, exp, r, *args, **kwargs):
        if r == round_:
            raise RuntimeError(f"simulated kill before round {round_}'s records")
        return original(self, exp, r, *args, **kwargs)

    monkeypatch.setattr(InProcessEngine, "evaluate", crash)
    with pytest.raises(RuntimeError, match="simulated kill"):
        run(cfg, quiet=True)
    monkeypatch.undo()
    return run(cfg, resume=True, quiet=True)


def train_alone_and_together(exp, jobs, seed: int, pass_tokens: int = 10_000):
    """(start adapter, results one by one, results in shared passes) of ``jobs`` from the initial adapter:
    the fast path's equality checks (tests/test_speed.py, tests/test_chat.py)."""
    from fltac.client.train import job_seed, train_job, train_jobs_together

    seeds = [job_seed(seed, 1, j.client, j.key) for j in jobs]
    start = exp.strategy.initial
    alone = [train_job(exp.model, start, exp.train_store, j, exp.cfg.train, s) for j, s in zip(jobs, seeds)]
    together = train_jobs_together(exp.model, [start] * len(jobs), exp.train_store, jobs, exp.cfg.train, seeds,
                                   pass_tokens)
    return start, alone, together


def assert_same_training(start, alone, together) -> None:
    """Same tokens, losses to 1e-5 and adapters to 1e-4 (each adapter moved), as fp32 training gives."""
    import numpy as np

    for (state_a, losses_a, tokens_a), (state_b, losses_b, tokens_b) in zip(alone, together):
        assert tokens_a == tokens_b
        np.testing.assert_allclose(losses_b, losses_a, rtol=1e-5)
        for key in state_a:
            assert (state_a[key] - start[key]).abs().max() > 0
            torch.testing.assert_close(state_b[key], state_a[key], rtol=1e-4, atol=1e-6)
