"""Speed benchmark: prints what this machine can do and how close fltac's local training gets to it.

    .venv/bin/python benchmarks/bench.py            # full (a few minutes on 2 cores)
    .venv/bin/python benchmarks/bench.py --quick    # smaller sizes, for a smoke check
    .venv/bin/python benchmarks/bench.py --quick --training-only   # peaks and training tokens/s only
    .venv/bin/python benchmarks/bench.py --product-only [--dtype float32]  # the engine's round + the reference's

The product's round: the text5 default (``configs/text5.yaml``) run for 2 rounds by the real engine
(:class:`fltac.engines.inprocess.InProcessEngine`, as ``fltac run --quiet`` runs it, into a temporary folder)
with phase timing on (:mod:`fltac.eval.phases`); its round 2 (clients start from cluster slots, as in every
later round) is reported: wall time from the start of its training to its checkpoint written
(``round_seconds_product``: training, screening, aggregation, evaluation, writes) and where it went
(``breakdown``: seconds per phase, ``other`` the rest). ``round_speedup_vs_reference_product`` = the reference
approach's round / the product's round; the reference's round is its training only (no evaluation, no
writes), so this ratio is a lower bound of the whole-round ratio. Beside them: the matmul peaks, the MFU of both
rounds' training (``train_mfu_product``, ``reference_mfu``) and ``round_speedup_ceiling``, the ratio at 100% MFU
(:func:`add_product_round`).

Measures, in one process (memory in subprocesses): the CPU and the capability torch reports; fp32 and
bf16 matmul peaks at the backbone's shapes; the dtype ``dtype: auto`` picks; training tokens/s and
model-FLOPs utilisation (MFU) of the local-training step at the text5 default's batch shape, for both
dtypes, both for one adapter alone (batch_size rows) and for the fast path (all of a round's adapters in
shared backbone passes, ``train.adapters_per_pass``) in both layouts of ``train.batching``: ``routed`` (the
default: each client's mixed batches, its adapters sharing its steps, clients sharing passes; its figure is
the headline ``mfu``; also with every client alone in its passes, as a Flower client trains) and
``per_adapter`` (each adapter its own batches); seconds per round of the text5 default (training only,
as the engine trains it; in the chosen dtype and in fp32), and
of the same round done the FL-TAC reference code's way; peak memory for 10/100/1,000 simulated clients;
server aggregation time (flatten + K-means + slot matching + cluster FedAvg) for 100/1,000 adapters on
full vectors and 100/1,000/10,000 with ``server.kmeans_dims: 256``. The last line printed is the JSON.

MFU = achieved FLOP/s / the FASTEST measured matmul peak (whichever dtype gives it), counting per
training token 4 x (non-embedding parameters) plus attention 8 x T x d per layer (forward QK^T and AV,
2 x 2 x T x d; backward, input gradients only since the backbone is frozen, the same again).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from fltac.client.train import job_seed, task_loss, train_all_together, train_fast_path, train_job
from fltac.config import load_config
from fltac.data.batches import TokenStore
from fltac.engines.inprocess import METRICS, InProcessEngine
from fltac.eval import phases
from fltac.io import read_jsonl
from fltac.experiment import build_experiment
from fltac.models.backbone import bf16_support, choose_dtype, cpu_model
from fltac.server.strategies import FLTAC, Submission

ROOT = Path(__file__).resolve().parent.parent


def note(message: str) -> None:
    """Progress on stderr (stdout's last line is the JSON)."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def matmul_peak(dtype: torch.dtype, m: int, k: int, n: int, seconds: float = 1.0) -> float:
    """GFLOP/s of ``[m,k] @ [k,n]`` in ``dtype``, best of repeated timed loops."""
    a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
    for _ in range(3):
        a @ b
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        t0 = time.perf_counter()
        for _ in range(5):
            a @ b
        best = max(best, 5 * 2 * m * k * n / (time.perf_counter() - t0))
    return best / 1e9


def flops_per_token(model, seq_len: int) -> float:
    cfg = model.model.base_model.model.config
    emb = sum(p.numel() for n, p in model.model.named_parameters() if "embeddings" in n and "lora" not in n)
    base = sum(p.numel() for n, p in model.model.named_parameters() if "lora" not in n and "modules_to_save" not in n)
    return 4 * (base - emb) + 8 * seq_len * cfg.hidden_size * cfg.num_hidden_layers


def train_throughput(exp, steps: int) -> tuple[float, int]:
    """Training tokens/s of ONE adapter's local step (batch_size rows, dynamic padding), the one-by-one loop."""
    job = max(exp.jobs, key=lambda j: j.num_examples)
    cfg = exp.cfg.train
    train_job(exp.model, exp.strategy.initial, exp.train_store, replace(job, steps=2), cfg, 0)  # warm-up
    t0 = time.perf_counter()
    _, _, tokens = train_job(exp.model, exp.strategy.initial, exp.train_store, replace(job, steps=steps), cfg, 1)
    return tokens / (time.perf_counter() - t0), int(np.mean(exp.train_store.lengths[job.rows]))


def round_jobs(exp) -> tuple[dict, dict]:
    """(start adapter, seed) per (client, key) of round 1, as the engine hands them to the fast path."""
    ids = [(j.client, j.key) for j in exp.jobs]
    return ({k: exp.strategy.initial for k in ids},
            {(j.client, j.key): job_seed(exp.cfg.seed, 1, j.client, j.key) for j in exp.jobs})


def shared_pass_throughput(exp, steps: int, batching: str, adapters_per_pass: int | None = None) -> float:
    """Training tokens/s of all of round 1's adapters trained in shared backbone passes in layout ``batching``
    (``train.batching``), each job given ``steps`` steps (a routed client: ``steps x`` its jobs), optionally
    at another ``train.adapters_per_pass`` (1: every client alone, as a Flower client trains)."""
    starts, _ = round_jobs(exp)
    cfg = replace(exp.cfg.train, batching=batching, adapters_per_pass=adapters_per_pass or exp.cfg.train.adapters_per_pass)
    jobs = [replace(j, steps=steps) for j in exp.jobs]
    train_fast_path(exp.model, exp.train_store, [replace(j, steps=1) for j in jobs[:4]], starts, cfg, 0, 1)  # warm-up
    t0 = time.perf_counter()
    results = train_fast_path(exp.model, exp.train_store, jobs, starts, cfg, exp.cfg.seed, 1)
    return sum(tokens for _, _, tokens in results.values()) / (time.perf_counter() - t0)


def ours_round_seconds(exp) -> float:
    """Training time of one round of the default run, as the in-process engine trains it (the fast path)."""
    starts, _ = round_jobs(exp)
    t0 = time.perf_counter()
    train_fast_path(exp.model, exp.train_store, exp.jobs, starts, exp.cfg.train, exp.cfg.seed, 1)
    return time.perf_counter() - t0


def product_round(dtype: str, round_: int = 2) -> dict:
    """Round ``round_`` of the text5 default run by the real engine with phase timing on: its wall time (training
    to checkpoint), its training seconds as metrics.jsonl records them, and its phase breakdown."""
    with tempfile.TemporaryDirectory() as out:
        cfg = load_config(ROOT / "configs/text5.yaml", {"output_dir": out, "train.rounds": round_, "dtype": dtype})
        was_on = phases.enabled()
        phases.enable()
        try:
            engine = InProcessEngine(cfg, quiet=True)
            engine.run()
        finally:
            phases.enable(was_on)
        line = next(m for m in read_jsonl(Path(out) / METRICS) if m["phase"] == "round" and m["round"] == round_)
    return {"round_seconds": engine.round_seconds[round_], "train_seconds": line["train_seconds"],
            "train_tokens": line["train_tokens"], "breakdown": engine.phase_seconds[round_]}


def breakdown_table(breakdown: dict[str, float], wall: float) -> str:
    """The breakdown as aligned lines: phase, seconds, share of the round, biggest first."""
    rows = sorted(breakdown.items(), key=lambda kv: -kv[1])
    return "\n".join([f"{'phase':<14}{'seconds':>9}{'share':>8}"] +
                     [f"{name:<14}{sec:>9.2f}{sec / wall:>8.1%}" for name, sec in rows] +
                     [f"{'round':<14}{wall:>9.2f}{1:>8.0%}"])


def reference_round_seconds(exp_fp32, max_length: int) -> float:
    """The FL-TAC reference code's round (siqi2000/FL-TAC trainer.py/client.py), re-implemented:
    fp32 backbone with its pretrained dropout, every text padded to max length, per (client, task) a new
    DataLoader (shuffle) and a new AdamW, exactly ``local_steps`` steps with ``loss.item()`` every step,
    clients one after another."""
    from torch.utils.data import DataLoader, TensorDataset

    store: TokenStore = exp_fp32.train_store
    model, cfg = exp_fp32.model, exp_fp32.cfg.train
    t0 = time.perf_counter()
    for job in exp_fp32.jobs:
        rows = job.rows
        ids = torch.from_numpy(store.ids[rows, :max_length].astype(np.int64))
        mask = (torch.arange(max_length)[None, :] < torch.from_numpy(store.lengths[rows].astype(np.int64))[:, None])
        data = TensorDataset(ids, mask.long(), torch.from_numpy(rows))
        loader = DataLoader(data, batch_size=cfg.batch_size, shuffle=True)
        model.load(exp_fp32.strategy.initial)
        model.model.train()
        opt = torch.optim.AdamW(model.params.values(), lr=cfg.lr)
        it, done = iter(loader), 0
        while done < job.steps:
            try:
                b_ids, b_mask, b_rows = next(it)
            except StopIteration:
                it = iter(loader)
                continue
            batch = store.batch(b_rows.numpy())
            loss = task_loss(model.logits(input_ids=b_ids, attention_mask=b_mask), batch)
            loss.backward()
            opt.step()
            opt.zero_grad()
            loss.item()
            done += 1
        model.state()
    return time.perf_counter() - t0


def reference_round(overrides: dict) -> float:
    """Seconds of :func:`reference_round_seconds` on its own fp32 text5 experiment (the pretrained backbone
    dropout, sdpa attention; batching per_adapter, which backbone dropout requires and which changes none of
    the jobs the reference trains; peft's own LoRA dropout, ``lora.dropout_draw: bernoulli``), to 0.1 s."""
    ref_cfg = load_config(ROOT / "configs/text5.yaml", {**overrides, "dtype": "float32", "backbone_dropout": None,
                                                         "attn_implementation": "sdpa", "train.batching": "per_adapter",
                                                         "lora.dropout_draw": "bernoulli"})
    return round(reference_round_seconds(build_experiment(ref_cfg), ref_cfg.data.max_length), 1)


MEMORY_SCRIPT = r"""
import json, sys, numpy as np, torch, transformers
from fltac.config import load_config
from fltac.data.tasks import Task
from fltac.engines.inprocess import run
n, model_dir, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
rng = np.random.default_rng(0)
words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
def texts(k): return [" ".join(rng.choice(words, 6)) for _ in range(k)]
tasks = [Task(f"t{i}", ["a", "b"], texts(4 * n), rng.integers(0, 2, 4 * n), texts(8), rng.integers(0, 2, 8)) for i in range(2)]
cfg = load_config(None, {"model_name": model_dir, "output_dir": out, "partition.n_clients": n, "partition.min_frac": 0.0,
    "partition.alpha": 100.0, "train.rounds": 1, "train.local_steps": 1, "train.batch_size": 4, "eval.eval_size": 8,
    "data.max_length": 16})
run(cfg, tasks=tasks, quiet=True)
# VmHWM: this process image's own peak RSS (getrusage's ru_maxrss would carry the parent's peak across fork+exec)
hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"clients": n, "peak_rss_mb": int(hwm.split()[1]) / 1024}))
"""


def peak_memory(counts: list[int]) -> dict[str, float]:
    """Peak RSS (MB) of a whole one-round FL-TAC run with n clients on the real MiniLM backbone (dtype auto),
    each client holding 4 tiny texts of each of 2 tasks, in a fresh process per n."""
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        model = "minilm"
        script = Path(tmp) / "mem.py"
        script.write_text(MEMORY_SCRIPT)
        for n in counts:
            res = subprocess.run([sys.executable, str(script), str(n), model, str(Path(tmp) / f"run{n}")],
                                 capture_output=True, text=True, check=True)
            out[str(n)] = round(json.loads(res.stdout.strip().splitlines()[-1])["peak_rss_mb"], 1)
    return out


def aggregation_seconds(counts: list[int], template: dict[str, torch.Tensor], lora_keys: list[str],
                        kmeans_dims: int | None = None) -> dict[str, float]:
    """Server time for one FL-TAC aggregation (flatten + K-means + Hungarian slot matching + cluster FedAvg)
    over n adapters of the default's shape (5 planted tasks), in a round after the first (slots matched)."""
    out = {}
    g = torch.Generator().manual_seed(0)
    centres = [{k: torch.randn(v.shape, generator=g) * 0.01 for k, v in template.items()} for _ in range(5)]
    for n in counts:
        subs = []
        for i in range(n):
            c = centres[i % 5]
            state = {k: template[k] + c[k] + 0.001 * torch.randn(v.shape, generator=g) for k, v in template.items()}
            subs.append(Submission(i, "a0", state, 10 + i % 7, template))
        strategy = FLTAC(template, 5, lora_keys, "update", seed=0, n_init=10, normalize=True,
                         kmeans_dims=kmeans_dims)
        strategy.fitted_ = True  # a later round: the clusters are matched to the previous slots too
        t0 = time.perf_counter()
        strategy.aggregate(1, subs)
        out[str(n)] = round(time.perf_counter() - t0, 2)
        del subs
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--training-only", action="store_true", help="stop after the training tokens/s")
    ap.add_argument("--product-only", action="store_true",
                    help="only the engine's round (with its phase breakdown) and the reference approach's round")
    ap.add_argument("--dtype", choices=("auto", "bfloat16", "float32"), default="auto",
                    help="backbone dtype of the product's round and of the headline figures (default auto)")
    args = ap.parse_args()
    steps = 8 if args.quick else 24
    result: dict = {"cpu": cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "torch": torch.__version__, "load_average_before": [round(x, 2) for x in os.getloadavg()]}
    native, flags = bf16_support(torch.device("cpu"))
    result["capability"] = flags
    result["dtype"] = choose_dtype(args.dtype, torch.device("cpu"))[1]

    overrides = {"output_dir": tempfile.mkdtemp()}
    if args.product_only:
        add_product_round(result, args.dtype, overrides)
        result["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
        print(json.dumps(result))
        return
    overrides["dtype"] = args.dtype
    exp = build_experiment(load_config(ROOT / "configs/text5.yaml", overrides))
    tokens_per_row = int(np.mean(exp.train_store.lengths))
    m = exp.cfg.train.batch_size * exp.cfg.data.max_length
    peaks = {}
    for name, dt in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        peaks[name] = round(max(matmul_peak(dt, m, 384, 1536), matmul_peak(dt, m, 1536, 384),
                                matmul_peak(dt, m, 384, 384)), 1)
    result["matmul_peak_gflops"] = peaks
    note("matmul peaks done; training throughput next")
    peak = max(peaks.values()) * 1e9

    per_dtype, experiments = {}, {}
    for name in ("bfloat16", "float32"):
        e = exp if exp.model.model.dtype == getattr(torch, name) else build_experiment(
            load_config(ROOT / "configs/text5.yaml", {**overrides, "dtype": name}))
        experiments[name] = e
        tok_s, seq = train_throughput(e, steps)
        fpt = flops_per_token(e.model, seq)
        per_dtype[name] = {"one_adapter_tokens_per_s": round(tok_s), "one_adapter_mfu": round(tok_s * fpt / peak, 4),
                           "attention": e.attn}
        for label, batching, per_pass in (("routed", "routed", None), ("routed_clients_alone", "routed", 1),
                                          ("per_adapter", "per_adapter", None)):
            shared_tok_s = shared_pass_throughput(e, max(1, steps // 4) if batching == "routed" else steps, batching,
                                                  per_pass)
            per_dtype[name][f"{label}_tokens_per_s"] = round(shared_tok_s)
            per_dtype[name][f"{label}_mfu"] = round(shared_tok_s * fpt / peak, 4)
        note(f"{name} training throughput done")
    result["training"] = per_dtype
    result["adapters_per_round"] = len(exp.jobs)
    chosen = chosen_dtype(result)
    result["mfu"] = per_dtype[chosen]["routed_mfu"]
    if args.training_only:
        print(json.dumps(result))
        return
    note("throughput done; rounds next")

    result["round_seconds"] = round(ours_round_seconds(exp), 1)
    result["round_seconds_float32"] = round(ours_round_seconds(experiments["float32"]), 1)
    result["reference_round_seconds"] = reference_round(overrides)
    result["round_speedup_vs_reference"] = round(result["reference_round_seconds"] / result["round_seconds"], 2)
    result["round_speedup_vs_reference_float32"] = round(
        result["reference_round_seconds"] / result["round_seconds_float32"], 2)
    result["padding_fraction_reference"] = round(1 - tokens_per_row / exp.cfg.data.max_length, 3)
    note("training rounds done; the product's round next")
    add_product_round(result, args.dtype, overrides)
    note("rounds done; memory by clients next")

    result["peak_memory_mb_by_clients"] = peak_memory([10, 100] if args.quick else [10, 100, 1000])
    note("memory done; aggregation next")
    template = exp.strategy.initial
    counts = [100, 1000] if args.quick else [100, 1000, 10000]
    result["aggregation_seconds_by_adapters"] = aggregation_seconds(counts[:2], template, exp.model.lora_keys)
    result["aggregation_seconds_by_adapters_kmeans_dims_256"] = aggregation_seconds(counts, template,
                                                                                    exp.model.lora_keys, 256)
    result["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(result))


def chosen_dtype(result: dict) -> str:
    """'bfloat16' or 'float32': the backbone dtype of the run ``result`` describes (its ``dtype`` note)."""
    return "bfloat16" if "bfloat16" in result["dtype"].split(" ")[0] else "float32"


def add_product_round(result: dict, dtype: str, overrides: dict) -> None:
    """Add the product's round (:func:`product_round`), the reference approach's round unless ``result`` has it,
    their ratio, the matmul peaks, the MFU of both rounds' training and the ratio's ceiling to ``result``; print
    the breakdown on stderr.

    ``train_mfu_product``: the product's training FLOPs (its real tokens x :func:`flops_per_token` at the mean
    row length) / ``train_seconds`` / the fastest matmul peak; ``reference_mfu``: the reference's FLOPs (every
    row padded to max length) / its seconds / the same peak. ``round_speedup_ceiling``: the ratio the product's
    round would reach if its training ran at 100% of the peak of its own dtype and the round did nothing else
    (no evaluation, no writes): reference seconds / (product training FLOPs / that peak)."""
    product = product_round(dtype)
    wall = product["round_seconds"]
    note("the product's round 2, phase by phase:\n" + breakdown_table(product["breakdown"], wall))
    if "reference_round_seconds" not in result:
        note("the reference approach's round next")
        result["reference_round_seconds"] = reference_round(overrides)
    reference_seconds = result["reference_round_seconds"]
    result["round_seconds_product"] = round(wall, 2)
    result["train_seconds_product"] = product["train_seconds"]
    result["train_tokens_product"] = product["train_tokens"]
    result["round_speedup_vs_reference_product"] = round(reference_seconds / wall, 2)
    result["breakdown"] = {k: round(v, 3) for k, v in product["breakdown"].items()}

    exp = build_experiment(load_config(ROOT / "configs/text5.yaml", {**overrides, "dtype": "float32"}))
    m = exp.cfg.train.batch_size * exp.cfg.data.max_length
    peaks = {name: round(max(matmul_peak(dt, m, 384, 1536), matmul_peak(dt, m, 1536, 384), matmul_peak(dt, m, 384, 384)), 1)
             for name, dt in (("float32", torch.float32), ("bfloat16", torch.bfloat16))}
    peak = max(peaks.values()) * 1e9
    mean_len = float(np.mean(exp.train_store.lengths))
    product_flops = product["train_tokens"] * flops_per_token(exp.model, round(mean_len))
    rows = sum(j.steps for j in exp.jobs) * exp.cfg.train.batch_size
    max_len = exp.cfg.data.max_length
    reference_flops = rows * max_len * flops_per_token(exp.model, max_len)
    result["matmul_peak_gflops"] = peaks
    result["train_mfu_product"] = round(product_flops / product["train_seconds"] / peak, 4)
    result["reference_mfu"] = round(reference_flops / reference_seconds / peak, 4)
    own_peak = peaks[chosen_dtype(result)] * 1e9
    result["round_speedup_ceiling"] = round(reference_seconds / (product_flops / own_peak), 2)


if __name__ == "__main__":
    main()
