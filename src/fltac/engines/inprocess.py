"""The embedded engine: every client trained in turn on one shared backbone, in this process.

One round: sample clients -> for each job, the strategy names its start adapter, the client trains it
-> the strategy aggregates -> evaluate when due -> write metrics, adapters and a checkpoint. The loop
knows no method: methods differ only in their jobs (client side) and strategy (server side).

Resume contract: at the end of every round, ``checkpoint/`` gets the strategy's state and the line
counts of the jsonl files, written atomically (tensors first, then the JSON that points at them).
Every random draw is derived from (seed, round, client, key), never from a generator carried across
rounds, so ``--resume`` after a kill at any instant reproduces the uninterrupted run bit for bit.
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

import numpy as np

from fltac import io
from fltac.client.hooks import make_hooks
from fltac.client.train import job_seed, train_job
from fltac.config import RunConfig
from fltac.experiment import Experiment, build_experiment
from fltac.models.adapters import state_bytes
from fltac.models.backbone import cpu_model
from fltac.server.aggregate import clustering_scores
from fltac.server.strategies import Submission

METRICS = "metrics.jsonl"
CLUSTERS = "cluster_assignments.jsonl"
CHECKPOINT = "checkpoint"
#: What a run writes into output_dir; all of it is removed by --overwrite, nothing else is.
RUN_FILES = (METRICS, CLUSTERS, CHECKPOINT, "adapters", "summary.json", "config.json")
#: Config keys that may differ between a run and its resume: they do not change any result.
RESUME_FREE_KEYS = {"output_dir"}


class RunError(RuntimeError):
    """A run that cannot start or go on, with the reason."""


def sample_clients(cfg: RunConfig, round_: int, clients: list[int]) -> list[int]:
    """Clients trained in ``round_``: all, or a seeded sample of ``fraction_fit`` of them (at least one)."""
    if cfg.train.fraction_fit >= 1.0 or cfg.method == "centralized":
        return clients
    m = max(1, int(round(cfg.train.fraction_fit * len(clients))))
    rng = np.random.default_rng([cfg.seed, round_])
    return sorted(int(c) for c in rng.choice(clients, size=m, replace=False))


def _flat_diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    keys = []
    for k in sorted(set(a) | set(b)):
        dotted = f"{prefix}{k}"
        if isinstance(a.get(k), dict) and isinstance(b.get(k), dict):
            keys.extend(_flat_diff(a[k], b[k], dotted + "."))
        elif a.get(k) != b.get(k) and dotted not in RESUME_FREE_KEYS:
            keys.append(dotted)
    return keys


class InProcessEngine:
    def __init__(self, cfg: RunConfig, resume: bool = False, overwrite: bool = False, tasks=None, quiet: bool = False):
        self.cfg = cfg
        self.out = Path(cfg.output_dir)
        self.resume = resume
        self.overwrite = overwrite
        self.tasks = tasks
        self.quiet = quiet

    def log(self, msg: str) -> None:
        if not self.quiet:
            print(msg, file=sys.stderr, flush=True)

    # ---- checkpoint -------------------------------------------------------------------------------
    def _load_checkpoint(self) -> dict | None:
        pointer = self.out / CHECKPOINT / "latest.json"
        if not pointer.exists():
            return None
        meta = io.read_json(pointer)
        meta["tensors"] = io.load_tensors(self.out / CHECKPOINT / meta["tensors_file"])
        return meta

    def _save_checkpoint(self, exp: Experiment, round_: int, counters: dict) -> None:
        tensors, strategy_meta = exp.strategy.state_dict()
        folder = self.out / CHECKPOINT
        name = f"round_{round_}.safetensors"
        io.save_tensors(folder / name, tensors)
        io.write_json(folder / "latest.json", {"round": round_, "tensors_file": name, "strategy": strategy_meta,
                                               "config": self.cfg.to_dict(), **counters})
        for old in folder.glob("round_*.safetensors"):
            if old.name != name:
                old.unlink()

    def _prepare_output(self) -> dict | None:
        ckpt = self._load_checkpoint() if self.resume else None
        if ckpt is not None:
            changed = _flat_diff(ckpt["config"], self.cfg.to_dict())
            if changed:
                raise RunError(f"cannot resume {self.out}: config key(s) {changed} differ from the run's snapshot "
                               f"({self.out / 'config.json'})")
            return ckpt
        if self.resume:
            self.log(f"[fltac] nothing to resume in {self.out}: starting from round 1")
        elif (self.out / METRICS).exists() and not self.overwrite:
            raise RunError(f"output_dir {self.out} already holds a run: pass --resume to continue it, "
                           f"--overwrite to replace it, or choose another --output_dir")
        self.out.mkdir(parents=True, exist_ok=True)
        for name in RUN_FILES:
            path = self.out / name
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
        return None

    # ---- the run ----------------------------------------------------------------------------------
    def run(self) -> dict:
        cfg = self.cfg
        ckpt = self._prepare_output()
        if ckpt is not None and ckpt["round"] >= cfg.train.rounds and (self.out / "summary.json").exists():
            self.log(f"[fltac] run in {self.out} already finished ({ckpt['round']} rounds); nothing to do")
            return io.read_json(self.out / "summary.json")
        t_start = time.perf_counter()
        exp = build_experiment(cfg, self.tasks)
        self.log(f"[fltac] method {cfg.method}, {len(exp.tasks)} tasks, {cfg.partition.n_clients} clients, "
                 f"{len(exp.jobs)} adapters trained per round, rank {cfg.rank}")
        self.log(f"[fltac] dtype {exp.dtype_note}; attention {exp.attn}; {exp.threads} threads; CPU {cpu_model()}")
        counters = {"metrics_lines": 0, "cluster_lines": 0, "uplink_bytes": 0, "downlink_bytes": 0,
                    "wall_seconds": 0.0, "train_tokens": 0, "last_eval": None}
        start_round = 1
        if ckpt is not None:
            exp.strategy.load_state_dict(ckpt["tensors"], ckpt["strategy"])
            counters = {k: ckpt[k] for k in counters}
            io.truncate_jsonl(self.out / METRICS, counters["metrics_lines"])
            io.truncate_jsonl(self.out / CLUSTERS, counters["cluster_lines"])
            start_round = ckpt["round"] + 1
            self.log(f"[fltac] resuming {self.out} after round {ckpt['round']}")
        io.write_json(self.out / "config.json", cfg.to_dict())
        setup_seconds = time.perf_counter() - t_start

        for r in range(start_round, cfg.train.rounds + 1):
            t0 = time.perf_counter()
            metrics, clusters, round_info = self.run_round(exp, r)
            if r % cfg.eval.eval_every == 0 or r == cfg.train.rounds:
                evals = self.evaluate(exp, r)
                metrics.extend(evals)
                counters["last_eval"] = evals
            seconds = time.perf_counter() - t0
            round_info["seconds"] = round(seconds, 3)
            metrics.append(round_info)
            io.append_jsonl(self.out / METRICS, metrics)
            io.append_jsonl(self.out / CLUSTERS, clusters)
            counters["metrics_lines"] += len(metrics)
            counters["cluster_lines"] += len(clusters)
            counters["uplink_bytes"] += round_info["uplink_bytes"]
            counters["downlink_bytes"] += round_info["downlink_bytes"]
            counters["train_tokens"] += round_info["train_tokens"]
            counters["wall_seconds"] += seconds + (setup_seconds if r == start_round else 0.0)
            tensors, _ = exp.strategy.state_dict()
            io.save_tensors(self.out / "adapters" / f"round_{r}.safetensors", tensors)
            self._save_checkpoint(exp, r, counters)
            self.log(self.round_line(r, round_info, clusters, counters["last_eval"]))
        summary = self.summary(exp, counters)
        io.write_json(self.out / "summary.json", summary)
        self.log(format_table(summary))
        return summary

    def run_round(self, exp: Experiment, r: int) -> tuple[list[dict], list[dict], dict]:
        cfg = self.cfg
        clients = sample_clients(cfg, r, sorted({j.client for j in exp.jobs}))
        jobs = [j for j in exp.jobs if j.client in set(clients)]
        subs, metrics, sent = [], [], {}
        tokens, t_train = 0, time.perf_counter()
        for job in jobs:
            sent_to_job = exp.strategy.configure(r, job.client, job.key)
            start = sent_to_job.state
            sent.setdefault(job.client, {})[id(start)] = state_bytes(start)
            hooks = make_hooks(sent_to_job.config, start)
            state, losses, n_tok = train_job(exp.model, start, exp.train_store, job, cfg.train,
                                             job_seed(cfg.seed, r, job.client, job.key), hooks)
            tokens += n_tok
            extras = {k: v for h in hooks for k, v in h.extras().items()}
            subs.append(Submission(job.client, job.key, state, job.num_examples, start, extras))
            task = "+".join(exp.task_names[t] for t in job.tasks)
            metrics.extend({"phase": "local", "round": r, "client": job.client, "key": job.key, "task": task,
                            "step": i + 1, "loss": round(loss, 6), "n": job.num_examples}
                           for i, loss in enumerate(losses))
        train_seconds = time.perf_counter() - t_train
        assigned = exp.strategy.aggregate(r, subs)
        clusters = []
        if cfg.method == "fltac":
            rows = [{"client": j.client, "key": j.key, "task": exp.task_names[j.tasks[0]],
                     "cluster": assigned[(j.client, j.key)], "n": j.num_examples} for j in jobs]
            scores = clustering_scores([j.tasks[0] for j in jobs], [row["cluster"] for row in rows])
            clusters.append({"round": r, "assignments": rows, **scores})
        info = {"phase": "round", "round": r, "clients": len(clients), "submissions": len(subs),
                "uplink_bytes": sum(state_bytes(s.state) + state_bytes(s.extras) for s in subs),
                "downlink_bytes": sum(sum(per.values()) for per in sent.values()),
                "train_tokens": tokens, "train_seconds": round(train_seconds, 3),
                "mean_local_loss": float(np.mean([m["loss"] for m in metrics])) if metrics else None}
        if clusters:
            info.update({k: clusters[0][k] for k in ("clustering_accuracy", "ari", "nmi")})
        return metrics, clusters, info

    def served_slots(self, exp: Experiment) -> list[int]:
        """Per task, the slot holding most of its assigned training samples (the adapter that serves it)."""
        n_tasks = len(exp.tasks)
        weight = np.zeros((n_tasks, exp.strategy.n_slots))
        for job in exp.jobs:
            slot = exp.strategy.assignment_.get((job.client, job.key))
            if slot is not None:
                for t in job.tasks:
                    weight[t, slot] += np.sum(exp.train_store.task[job.rows] == t)
        return [int(np.argmax(weight[t])) for t in range(n_tasks)]

    def evaluate(self, exp: Experiment, r: int) -> list[dict]:
        """Per task: the serving global adapter's accuracy, and the personalised accuracy (each client's own
        assigned adapter on its share of the task, weighted by that share)."""
        cache: dict[tuple[int, int], float] = {}

        def acc(slot: int, t: int) -> float:
            if (slot, t) not in cache:
                cache[(slot, t)] = exp.evaluator.accuracy(exp.strategy.slots_[slot], t)
            return cache[(slot, t)]

        served = self.served_slots(exp)
        records = []
        for t, name in enumerate(exp.task_names):
            num, den = 0.0, 0.0
            for job in exp.jobs:
                slot = exp.strategy.assignment_.get((job.client, job.key))
                if slot is not None and t in job.tasks:
                    n = float(np.sum(exp.train_store.task[job.rows] == t))
                    num, den = num + n * acc(slot, t), den + n
            records.append({"phase": "eval", "round": r, "task": name, "slot": served[t],
                            "accuracy": acc(served[t], t), "personalized_accuracy": num / den if den else None})
        return records

    def round_line(self, r: int, info: dict, clusters: list[dict], evals: list[dict] | None) -> str:
        parts = [f"round {r}/{self.cfg.train.rounds}", f"loss {info['mean_local_loss']:.3f}",
                 f"up {info['uplink_bytes'] / 1e6:.2f} MB"]
        if clusters:
            parts.append(f"clustering acc {clusters[0]['clustering_accuracy']:.3f}")
        if evals and evals[0]["round"] == r:
            parts.append(f"mean acc {np.mean([e['accuracy'] for e in evals]):.4f}")
        tok_s = info["train_tokens"] / max(info["train_seconds"], 1e-9)
        parts.append(f"{info['seconds']:.1f} s ({tok_s:,.0f} train tok/s)")
        return "[fltac] " + " | ".join(parts)

    def summary(self, exp: Experiment, counters: dict) -> dict:
        evals = counters["last_eval"] or []
        per_task = {e["task"]: e["accuracy"] for e in evals}
        personal = {e["task"]: e["personalized_accuracy"] for e in evals}
        clusters = io.read_jsonl(self.out / CLUSTERS)
        last = clusters[-1] if clusters else {}
        return {
            "method": self.cfg.method,
            "scenario": self.cfg.data.scenario,
            "tasks": exp.task_names,
            "per_task_accuracy": per_task,
            "mean_accuracy": float(np.mean(list(per_task.values()))) if per_task else None,
            "personalized_accuracy": personal,
            "mean_personalized_accuracy": float(np.mean([v for v in personal.values() if v is not None]))
            if personal else None,
            "clustering_accuracy": last.get("clustering_accuracy"),
            "ari": last.get("ari"),
            "nmi": last.get("nmi"),
            "uplink_bytes": counters["uplink_bytes"],
            "downlink_bytes": counters["downlink_bytes"],
            "trainable_params_per_adapter": exp.model.n_trainable(),
            "lora_rank": self.cfg.rank,
            "rounds": self.cfg.train.rounds,
            "train_tokens": counters["train_tokens"],
            "wall_seconds": round(counters["wall_seconds"], 2),
            "dtype": exp.dtype_note,
            "cpu": cpu_model(),
            "seed": self.cfg.seed,
        }


def format_table(summary: dict) -> str:
    lines = [f"{'task':<14}{'accuracy':>10}{'personal':>10}", "-" * 34]
    for task, acc in summary["per_task_accuracy"].items():
        pers = summary["personalized_accuracy"].get(task)
        lines.append(f"{task:<14}{acc:>10.4f}{(f'{pers:.4f}' if pers is not None else '-'):>10}")
    lines.append("-" * 34)
    mp = summary["mean_personalized_accuracy"]
    lines.append(f"{'mean':<14}{summary['mean_accuracy']:>10.4f}{(f'{mp:.4f}' if mp is not None else '-'):>10}")
    ca = summary["clustering_accuracy"]
    lines.append(f"method {summary['method']}; clustering accuracy {ca if ca is None else f'{ca:.3f}'}; "
                 f"uplink {summary['uplink_bytes'] / 1e6:.2f} MB; {summary['wall_seconds']:.0f} s")
    return "\n".join(lines)


def run(cfg: RunConfig, resume: bool = False, overwrite: bool = False, tasks=None, quiet: bool = False) -> dict:
    return InProcessEngine(cfg, resume=resume, overwrite=overwrite, tasks=tasks, quiet=quiet).run()
