"""The fast path of local training changes no result beyond rounding.

- several adapters trained in shared backbone passes (``fltac.models.bank``) equal the same adapters
  trained one by one, dropout included (fp32, tiny BERT);
- the bf16 backbone gives the fp32 loss and gradients within bf16 rounding (stated tolerances below);
- ``dtype: auto`` follows the capability the CPU reports, mocked both ways.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from fltac.client.train import Job, micro_batches, task_loss, train_jobs_together
from fltac.config import load_config
from fltac.engines.inprocess import run
from fltac.experiment import build_experiment
from tests.conftest import assert_same_training, tiny_config_overrides, train_alone_and_together


@pytest.fixture(scope="module")
def experiment(tiny_bert, csv_scenario, tmp_path_factory):
    overrides = {**tiny_config_overrides(tiny_bert, tmp_path_factory.mktemp("speed")), "data.scenario": "custom",
                 "data.custom_tasks": csv_scenario["tasks"], "train.batch_size": 5}
    return build_experiment(load_config(None, overrides))


def _jobs(exp, steps: int) -> list[Job]:
    """Three jobs of different clients and tasks (so batch widths differ), ``steps`` steps each."""
    picked, seen = [], set()
    for job in exp.jobs:
        if (job.client, job.tasks) not in seen and len(picked) < 3:
            picked.append(replace(job, steps=steps))
            seen.add((job.client, job.tasks))
    return picked


@pytest.fixture(scope="module", params=["bits", "bernoulli"])
def draw_experiment(request, tiny_bert, csv_scenario, tmp_path_factory):
    """The experiment with LoRA-dropout masks drawn each way (``lora.dropout_draw``)."""
    overrides = {**tiny_config_overrides(tiny_bert, tmp_path_factory.mktemp("speed")), "data.scenario": "custom",
                 "data.custom_tasks": csv_scenario["tasks"], "train.batch_size": 5, "lora.dropout_draw": request.param}
    return build_experiment(load_config(None, overrides))


@pytest.mark.parametrize("pass_tokens", [10_000, 1])  # all jobs in one pass; one pass per job (bucketing)
def test_jobs_trained_together_equal_jobs_trained_one_by_one(draw_experiment, pass_tokens):
    exp = draw_experiment
    assert exp.model.peft_config.lora_dropout > 0  # the dropout draws must match too
    drops = {type(d).__name__ for m in exp.model.model.modules() if hasattr(m, "lora_dropout")
             for d in m.lora_dropout.values()}
    assert drops == {"MaskDropout" if exp.cfg.lora.dropout_draw == "bits" else "Dropout"}
    start, alone, together = train_alone_and_together(exp, _jobs(exp, steps=3), 7, pass_tokens)
    assert_same_training(start, alone, together)
    # the model is the plain peft model again afterwards
    assert all("forward" not in vars(m) for m in exp.model.model.modules())


def test_on_a_bf16_backbone_jobs_together_agree_with_one_by_one_within_bf16_rounding(tiny_bert, csv_scenario,
                                                                                    tmp_path):
    """The fast path runs the rank-r products in bf16 there (peft's loop in fp32): losses within 1%, and each
    adapter's total update pointing the same way (cosine > 0.95; Adam's normalised steps turn rounding in
    near-zero gradient entries into visible but small per-entry differences)."""
    overrides = {**tiny_config_overrides(tiny_bert, tmp_path), "data.scenario": "custom",
                 "data.custom_tasks": csv_scenario["tasks"], "train.batch_size": 5, "dtype": "bfloat16"}
    exp = build_experiment(load_config(None, overrides))
    start, alone, together = train_alone_and_together(exp, _jobs(exp, steps=3), 7)
    for (state_a, losses_a, _), (state_b, losses_b, _) in zip(alone, together):
        np.testing.assert_allclose(losses_b, losses_a, rtol=1e-2)
        update_a = torch.cat([(state_a[k] - start[k]).flatten() for k in state_a])
        update_b = torch.cat([(state_b[k] - start[k]).flatten() for k in state_a])
        assert float(torch.nn.functional.cosine_similarity(update_a, update_b, dim=0)) > 0.95


def test_jobs_with_different_step_counts_are_refused(experiment):
    jobs = _jobs(experiment, steps=2)
    jobs[0] = replace(jobs[0], steps=3)
    with pytest.raises(ValueError, match="same number of steps"):
        train_jobs_together(experiment.model, [experiment.strategy.initial] * 3, experiment.train_store, jobs,
                            experiment.cfg.train, [1, 2, 3], 10_000)


def test_micro_batches_bucket_by_width_and_respect_the_token_budget():
    widths, sizes = [40, 10, 38, 12, 64], [4, 4, 4, 4, 4]
    passes = micro_batches(widths, sizes, max_tokens=4 * 2 * 40)
    assert sorted(g for p in passes for g in p) == [0, 1, 2, 3, 4]
    assert passes[0] == [1, 3]  # the two short batches share a pass
    for members in passes:
        assert len(members) == 1 or sum(sizes[g] for g in members) * max(widths[g] for g in members) <= 320
    assert micro_batches(widths, sizes, max_tokens=1) == [[1], [3], [2], [0], [4]]


def test_a_run_on_the_fast_path_matches_the_one_by_one_run(tiny_bert, csv_scenario, tmp_path):
    base = {**tiny_config_overrides(tiny_bert, tmp_path), "data.scenario": "custom",
            "data.custom_tasks": csv_scenario["tasks"]}
    fast = run(load_config(None, {**base, "output_dir": str(tmp_path / "fast")}), quiet=True)
    slow = run(load_config(None, {**base, "output_dir": str(tmp_path / "slow"), "train.adapters_per_pass": 1}),
               quiet=True)
    assert fast["per_task_accuracy"] == pytest.approx(slow["per_task_accuracy"], abs=1e-9)
    assert fast["clustering_accuracy"] == slow["clustering_accuracy"]


def _loss_and_grads(tiny_bert, csv_scenario, tmp_path, dtype: str):
    overrides = {**tiny_config_overrides(tiny_bert, tmp_path / dtype), "data.scenario": "custom",
                 "data.custom_tasks": csv_scenario["tasks"], "dtype": dtype, "lora.dropout": 0.0}
    exp = build_experiment(load_config(None, overrides))
    g = torch.Generator().manual_seed(0)
    state = {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in exp.strategy.initial.items()}
    exp.model.load(state)
    exp.model.model.train()
    batch = exp.train_store.batch(np.arange(8))
    loss = task_loss(exp.model.logits(**batch.model_inputs()), batch)
    loss.backward()
    grads = {k: p.grad.detach().clone() for k, p in exp.model.params.items()}
    return float(loss.detach()), grads


def test_bf16_backbone_gives_the_fp32_loss_and_gradients_within_bf16_rounding(tiny_bert, csv_scenario, tmp_path):
    """Tolerances: bf16 keeps 8 mantissa bits (relative step 2^-8 = 0.4%); through two layers the loss stays
    within 1% and every adapter tensor's gradient within 5% in norm, pointing the same way (cosine > 0.99)."""
    loss32, grads32 = _loss_and_grads(tiny_bert, csv_scenario, tmp_path, "float32")
    loss16, grads16 = _loss_and_grads(tiny_bert, csv_scenario, tmp_path, "bfloat16")
    assert loss16 == pytest.approx(loss32, rel=1e-2)
    for key, g32 in grads32.items():
        g16 = grads16[key]
        assert g16.dtype == torch.float32  # adapters and head train as fp32 masters
        assert float((g16 - g32).norm()) <= 0.05 * float(g32.norm()) + 1e-8, key
        assert float(torch.nn.functional.cosine_similarity(g16.flatten(), g32.flatten(), dim=0)) > 0.99, key


@pytest.mark.parametrize("amx, avx512_bf16, expected", [(True, False, torch.bfloat16), (False, True, torch.bfloat16),
                                                       (False, False, torch.float32)])
def test_auto_dtype_follows_the_reported_capability(monkeypatch, amx, avx512_bf16, expected):
    from fltac.models.backbone import choose_dtype

    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    dtype, note = choose_dtype("auto", torch.device("cpu"))
    assert dtype == expected
    assert ("AMX yes" in note) == amx and ("AVX512-BF16 yes" in note) == avx512_bf16
    forced, warning = choose_dtype("bfloat16", torch.device("cpu"))
    assert forced == torch.bfloat16 and (("WARNING" in warning) == (expected == torch.float32))
