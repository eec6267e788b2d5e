"""The embedded engine: every client trained in turn on one shared backbone, in this process.

One round: sample clients -> for each job, the strategy names its start adapter (``configure``) and the
layout of the reply (``expected_spec``) -> the engine's transport carries the broadcasts to the clients and
brings back their results (:class:`Transport`: :class:`InProcessTransport` here, the Flower one in
:mod:`fltac.engines.flower`) -> screening -> the strategy aggregates -> evaluate when due -> write metrics,
adapters and a checkpoint. The loop knows no method: methods differ only in their jobs (client side, the
registry's layout, :mod:`fltac.methods`) and strategy (server side, which also reports its clusters).

Resume contract: at the end of every round, ``checkpoint/`` gets the strategy's state (global
adapters, the cluster of every (client, key), whatever else the method learned), the process's RNG
states and the line counts of the jsonl files, written atomically (tensors first, then the JSON that
points at them). Every random draw is derived from (seed, round, client, key), never from a generator
carried across rounds, so ``--resume`` after a kill at any instant reproduces the uninterrupted run
bit for bit. No client-side state outlives a round here (a fresh optimizer per job; a job's cluster
is kept by the strategy), so there is none to save.

Failing clients (see :mod:`fltac.engines.faults`): a client that raises or runs past
``reliability.client_timeout_s`` is dropped for the round; every submission is then checked
(:func:`fltac.server.robust.screen`) before the strategy sees it. Each lost adapter is logged to
``metrics.jsonl`` as ``{"phase": "dropped", "round", "client", "key", "kind", "reason"}``; too few
surviving clients stop the run (:class:`TooFewClients`).

Phase timing (:mod:`fltac.eval.phases`, off by default; ``eval.phase_times`` or ``phases.enable()``): each round's
wall time and seconds per phase are kept in ``round_seconds`` / ``phase_seconds`` (what ``benchmarks/bench.py``
reports) and, with ``eval.phase_times``, written into the round's line of ``metrics.jsonl``.
"""

from __future__ import annotations

import shutil
import sys
import time
import uuid
from dataclasses import dataclass
from typing import Protocol
from pathlib import Path

import numpy as np

from fltac import io, privacy, rng
from fltac.client.round import ClientResult, sent_part, train_client, uses_bank
from fltac.client.train import train_fast_path
from fltac.config import ConfigError, RunConfig, from_dict
from fltac.data import load_tasks
from fltac.engines.faults import required_clients
from fltac.eval import phases
from fltac.eval.phases import phase
from fltac.eval.progress import Progress, eta, format_seconds
from fltac.experiment import Experiment, build_experiment
from fltac.models.adapters import AdapterModel, state_bytes
from fltac.models.backbone import cpu_model, model_folder_problem
from fltac.server.robust import finite_problem, screen, slots_problem, spec_of
from fltac.wire import Broadcast, Mean, Submission, with_frozen

METRICS = "metrics.jsonl"
CLUSTERS = "cluster_assignments.jsonl"
CHECKPOINT = "checkpoint"
LATEST = "latest.json"  # the checkpoint's pointer: round, tensors file, strategy state, file hashes
#: The marker a run writes first into output_dir (its run id): only a folder that carries it is ever
#: cleared (--overwrite) or continued (--resume); a non-empty folder without it is refused.
MARKER = "fltac-run.json"
#: Per task: name, label names, offset in the shared output layer (for export), the majority-class accuracy of
#: the test sample (for the report).
TASKS = "tasks.json"
GENERATIONS = "generations.jsonl"  # causal LM, last round: per judged pair, prompt, reference, prediction, score
#: What a run writes into output_dir besides its marker; all of it is removed by --overwrite, nothing else is.
RUN_FILES = (METRICS, CLUSTERS, CHECKPOINT, "adapters", "summary.json", "config.json", TASKS, "tensorboard",
             GENERATIONS)
#: Config keys that may differ between a run and its resume: they do not change any result.
RESUME_FREE_KEYS = {"output_dir", "eval.phase_times"}


class RunError(RuntimeError):
    """A run that cannot start or go on, with the reason."""


class TooFewClients(RunError):
    """Fewer clients than ``reliability.min_clients_per_round`` (or its fraction) survived a round."""


def sample_clients(cfg: RunConfig, round_: int, clients: list[int]) -> list[int]:
    """Clients trained in ``round_``: all, or a seeded sample of ``fraction_fit`` of them (at least one; so
    a run with one client, e.g. the pooled one, trains it every round)."""
    if cfg.train.fraction_fit >= 1.0:
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


def _with_defaults(snapshot: dict) -> dict:
    """A checkpoint's config with keys added since it was written set to their defaults, so a run made
    before a new option existed still resumes (when it uses the default); unreadable snapshots are kept as-is."""
    try:
        return from_dict(snapshot).to_dict()
    except ConfigError:
        return snapshot


def recorded_line_counts(meta: dict) -> dict[str, int]:
    """The jsonl logs a checkpoint (``latest.json``) hashed, with the number of lines it hashed of each."""
    return {METRICS: meta.get("metrics_lines", 0), CLUSTERS: meta.get("cluster_lines", 0)}


def _listing(names: list[str], at_most: int = 6) -> str:
    return ", ".join(names[:at_most]) + (f" and {len(names) - at_most} more" if len(names) > at_most else "")


def _remove_stale_temporaries(out: Path) -> None:
    """Delete the temporary files (``.<name>.<random>.tmp``) a kill left behind in the run's folders."""
    for folder in (out, out / CHECKPOINT, out / "adapters"):
        for tmp in folder.glob(".*.tmp") if folder.is_dir() else ():
            tmp.unlink(missing_ok=True)


# ---- the transport seam: broadcasts out, client results back -------------------------------------------

@dataclass
class Delivery:
    """What a transport brings back from one round: each sampled client's result (a failed client's says
    so and holds its 'dropped' lines) and the bytes that crossed the wire each way."""

    results: dict[int, ClientResult]
    downlink_bytes: int
    uplink_bytes: int
    #: Secure aggregation: the round's uploads as the server gets them, one sample-weighted mean (the results
    #: then hold no upload); the round skips screening and goes to the strategy's ``aggregate_mean``.
    mean: Mean | None = None


class Transport(Protocol):
    """Carries a round's broadcasts to the clients and their results back; knows no method and no strategy."""

    def exchange(self, round_: int, jobs_of: dict[int, list], broadcasts: dict[int, dict[str, Broadcast]],
                 bar) -> Delivery:
        """Deliver ``broadcasts[client][key]`` to every client of ``jobs_of`` (its jobs of the round, in
        order) and return what each sent back; ``bar`` steps once per adapter step trained or dropped."""
        ...


def trains_together(model, cfg: RunConfig, broadcasts: list) -> bool:
    """Whether a round's adapters, all clients together, take the fast path (``train.adapters_per_pass``):
    :func:`~fltac.client.round.uses_bank`, no client time limit (a shared pass cannot time one client) and, in
    the per-adapter layout, more than one adapter per pass allowed (routed: 1 means every client alone, still
    on the bank)."""
    return ((cfg.train.adapters_per_pass > 1 or cfg.train.batching == "routed") and uses_bank(model, cfg, broadcasts)
            and cfg.reliability.client_timeout_s is None)


class InProcessTransport:
    """Every client trained in turn in this process, on the engine's one model and store (the broadcast
    states are the server's own tensors: nothing is copied)."""

    def __init__(self, cfg: RunConfig, model, store, task_names: list[str]):
        self.cfg, self.model, self.store, self.task_names = cfg, model, store, task_names

    def exchange(self, round_, jobs_of, broadcasts, bar) -> Delivery:
        cfg, r = self.cfg, round_
        jobs = [j for cjobs in jobs_of.values() for j in cjobs]
        trained = None
        if trains_together(self.model, cfg, [b for per in broadcasts.values() for b in per.values()]):
            trained = train_fast_path(self.model, self.store, jobs,
                                      {(j.client, j.key): broadcasts[j.client][j.key].state for j in jobs},
                                      cfg.train, cfg.seed, r, lambda n: bar.step(n, note=f"{n} clients per step"
                                                                                 if cfg.train.batching == "routed"
                                                                                 else f"{n} adapters per pass"))
        results, down = {}, 0
        for client, cjobs in jobs_of.items():
            distinct = {id(b.state): b.state for b in broadcasts[client].values()}  # a shared slot is sent once
            down += sum(state_bytes(state) for state in distinct.values())
            results[client] = train_client(self.model, self.store, cfg, r, client, cjobs, broadcasts[client],
                                           self.task_names, bar, trained)
        up = sum(state_bytes(u.state) + state_bytes(u.extras) for res in results.values() for u in res.uploads)
        return Delivery(results, down, up)


def check_enough_sampled(rel, n_sampled: int) -> None:
    """Stop before training when ``min_clients_per_round`` exceeds the clients sampled: every round would fail."""
    if required_clients(rel, n_sampled) > n_sampled:
        raise RunError(f"config key 'reliability.min_clients_per_round' = {rel.min_clients_per_round} exceeds "
                       f"the {n_sampled} client(s) sampled per round: every round would stop")


class InProcessEngine:
    #: Whether this engine's transport runs Flower's SecAgg+ (``secure_aggregation.enabled``): the Flower engine's.
    offers_secure_aggregation = False

    def __init__(self, cfg: RunConfig, resume: bool = False, overwrite: bool = False, tasks=None, quiet: bool = False,
                 log: tuple[str, ...] = ()):
        self.cfg = cfg
        self.out = Path(cfg.output_dir)
        self.resume = resume
        self.overwrite = overwrite
        self.tasks = tasks
        self.quiet = quiet
        self.sinks = tuple(log)  # extra metric streams ('tensorboard'); metrics.jsonl is always written
        self.tb = None
        self.norm_reference: float | None = None  # the last accepted round's reference update norm (screening)
        self.run_id = uuid.uuid4().hex  # written to the folder's marker; a resume keeps the folder's
        self.file_hashes: dict[str, str] = {}  # adapters/round_<t>.safetensors -> SHA-256, for the checkpoint
        #: With phase timing on (:mod:`fltac.eval.phases`): per round, its wall time from the start of its training
        #: to its checkpoint written, and the seconds of each phase in it (``other``: the rest of that wall time).
        self.round_seconds: dict[int, float] = {}
        self.phase_seconds: dict[int, dict[str, float]] = {}

    def make_transport(self, exp: Experiment) -> Transport:
        """How this engine reaches its clients: in this process, on the experiment's model and data."""
        return InProcessTransport(self.cfg, exp.model, exp.train_store, exp.task_names)

    def progress(self, label: str, total: int) -> Progress:
        return Progress(label, total, enabled=not self.quiet)

    def log(self, msg: str) -> None:
        if not self.quiet:
            print(msg, file=sys.stderr, flush=True)

    # ---- checkpoint -------------------------------------------------------------------------------
    def _load_checkpoint(self) -> dict | None:
        """The last checkpoint, its files checked against the hashes it recorded (:meth:`_check_files`), or None."""
        pointer = self.out / CHECKPOINT / LATEST
        if not pointer.exists():
            return None
        meta = io.read_json(pointer, keys=("round", "tensors_file", "strategy", "config"))
        self._check_files(meta)
        meta["tensors"] = io.load_tensors(self.out / CHECKPOINT / meta["tensors_file"])
        return meta

    def _check_files(self, meta: dict) -> None:
        """Every file a resume or an export relies on must have the SHA-256 the checkpoint recorded for it
        (the jsonl logs: their first ``metrics_lines`` / ``cluster_lines`` lines, what a resume keeps), and the
        checkpoint must belong to this folder's run (the marker's run id); else a one-line error naming it."""
        pointer = self.out / CHECKPOINT / LATEST
        marker = io.read_json(self.out / MARKER, keys=("run_id",))
        if meta.get("run_id", marker["run_id"]) != marker["run_id"]:
            raise io.RunFileError(f"{pointer} belongs to run {meta['run_id']}, but {self.out / MARKER} names run "
                                  f"{marker['run_id']}: the checkpoint was copied from another run; start again "
                                  f"with --overwrite")
        io.check_recorded_files(self.out, meta.get("files", {}), recorded_line_counts(meta), pointer)

    def _save_checkpoint(self, exp: Experiment, round_: int, counters: dict) -> None:
        tensors, strategy_meta = exp.strategy.state_dict()
        rng_meta, rng_tensors = rng.capture()
        folder = self.out / CHECKPOINT
        name = f"round_{round_}.safetensors"
        io.save_tensors(folder / name, {**tensors, **rng_tensors})
        for rel in (f"adapters/round_{round_}.safetensors", "config.json", TASKS):
            self.file_hashes[rel] = io.sha256_file(self.out / rel)
        files = {**self.file_hashes, f"{CHECKPOINT}/{name}": io.sha256_file(folder / name),
                 METRICS: io.sha256_lines(self.out / METRICS, counters["metrics_lines"]),
                 CLUSTERS: io.sha256_lines(self.out / CLUSTERS, counters["cluster_lines"])}
        io.write_json(folder / LATEST, {"round": round_, "tensors_file": name, "strategy": strategy_meta,
                                        "rng": rng_meta, "config": self.cfg.to_dict(), "run_id": self.run_id,
                                        "files": files, **counters})
        for old in folder.glob("round_*.safetensors"):
            if old.name != name:
                old.unlink()

    # ---- output folder ----------------------------------------------------------------------------
    def check_output(self) -> dict | None:
        """Check, without changing the disk, that this run may use ``output_dir``; the checkpoint to resume from.

        ``output_dir`` must be a writable folder or creatable; a non-empty folder must carry the marker a run
        writes first (:data:`MARKER`), so a run never deletes or overwrites files it did not write. A resume's
        checkpoint is loaded and verified here, and its config compared with this run's.
        """
        problem = io.folder_problem(self.out)
        if problem:
            raise RunError(f"output_dir {problem}")
        entries = sorted(p.name for p in self.out.iterdir()) if self.out.is_dir() else []
        if entries and not (self.out / MARKER).is_file():
            touched = [n for n in RUN_FILES if n in entries] or list(RUN_FILES)
            raise RunError(f"output_dir {self.out} is not empty and was not written by a fltac run (no {MARKER}): "
                           f"it holds {_listing(entries)}; a run would write {_listing(touched)} there. Choose a new "
                           f"or empty --output_dir (--overwrite and --resume only act on a folder a run wrote)")
        ckpt = self._load_checkpoint() if self.resume else None
        if ckpt is not None:
            changed = _flat_diff(_with_defaults(ckpt["config"]), self.cfg.to_dict())
            if changed:
                raise RunError(f"cannot resume {self.out}: config key(s) {changed} differ from the run's snapshot "
                               f"({self.out / 'config.json'})")
        elif self.resume:
            self.log(f"[fltac] nothing to resume in {self.out}: starting from round 1")
        elif (self.out / METRICS).exists() and not self.overwrite:
            raise RunError(f"output_dir {self.out} already holds a run: pass --resume to continue it, "
                           f"--overwrite to replace it, or choose another --output_dir")
        return ckpt

    def _claim_output(self, ckpt: dict | None) -> None:
        """Make ``output_dir`` this run's: the marker first, then (a fresh start) the previous run's files removed.

        Called only after :meth:`check_output` and the data have passed. A resume keeps the folder's run id
        and files, and removes the temporary files a kill left behind.
        """
        if ckpt is not None:
            self.run_id = io.read_json(self.out / MARKER, keys=("run_id",))["run_id"]
            self.file_hashes = {k: v for k, v in ckpt.get("files", {}).items() if k.startswith("adapters/")}
            _remove_stale_temporaries(self.out)
            return
        self.out.mkdir(parents=True, exist_ok=True)
        io.write_json(self.out / MARKER, {"run_id": self.run_id, "written_by": "fltac run",
                                          "note": "this folder holds a fltac run; --overwrite replaces only "
                                                  "the files a run writes: " + ", ".join(RUN_FILES)})
        _remove_stale_temporaries(self.out)
        for name in RUN_FILES:
            path = self.out / name
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)

    # ---- the run ----------------------------------------------------------------------------------
    def run(self) -> dict:
        """The whole run; its summary. ``eval.phase_times`` turns phase timing on for the run's duration."""
        was_on = phases.enabled()
        phases.enable(was_on or self.cfg.eval.phase_times)
        try:
            return self._run()
        finally:
            phases.enable(was_on)

    def _run(self) -> dict:
        cfg = self.cfg
        if cfg.secure_aggregation.enabled and not self.offers_secure_aggregation:
            raise ConfigError("config key 'secure_aggregation.enabled' needs the Flower engine (--engine flower-sim "
                              "or a Flower deployment): SecAgg+ is Flower's protocol, and the in-process engine "
                              "trains every client inside the server's own process")
        ckpt = self.check_output()
        if ckpt is not None and ckpt["round"] >= cfg.train.rounds and (self.out / "summary.json").exists():
            self.log(f"[fltac] run in {self.out} already finished ({ckpt['round']} rounds); nothing to do")
            return io.read_json(self.out / "summary.json")
        t_start = time.perf_counter()
        problem = model_folder_problem(cfg.model_name)
        if problem:
            raise RunError(problem)
        private = cfg.privacy.mode != "none"
        sigma = privacy.noise_multiplier(cfg) if private else None  # a missing accountant: before any write
        tasks = self.tasks if self.tasks is not None else load_tasks(cfg.data)  # data problems before any write
        self._claim_output(ckpt)
        exp = build_experiment(cfg, tasks)
        self.transport = self.make_transport(exp)
        self.log(f"[fltac] method {cfg.method}, {len(exp.tasks)} tasks, {cfg.partition.n_clients} clients, "
                 f"{len(exp.jobs)} adapters trained per round, rank {cfg.rank}")
        self.log(f"[fltac] dtype {exp.dtype_note}; attention {exp.attn}; {exp.threads} threads; CPU {cpu_model()}")
        if private:
            p = privacy.summary_record(cfg)
            self.log(f"[fltac] {p['mode']} DP: clip norm {p['clip_norm']:g}, noise multiplier {sigma:.4g}, sample rate "
                     f"{p['sample_rate']:.3g}: epsilon {p['epsilon']:.3g} at delta {p['delta']:g} after {p['steps']} rounds")
        counters = {"metrics_lines": 0, "cluster_lines": 0, "uplink_bytes": 0, "downlink_bytes": 0,
                    "wall_seconds": 0.0, "train_tokens": 0, "last_eval": None, "dropped": 0, "norm_reference": None}
        start_round = 1
        if ckpt is not None:
            problem = slots_problem(ckpt["tensors"], spec_of(exp.strategy.initial),
                                    exp.strategy.checkpoint_slots(ckpt["strategy"]))
            if problem:
                raise io.AdapterFileError(f"{self.out / CHECKPOINT / ckpt['tensors_file']}: {problem}")
            exp.strategy.load_state_dict(ckpt["tensors"], ckpt["strategy"])
            rng.restore(ckpt.get("rng", {}), ckpt["tensors"])
            counters = {k: ckpt.get(k, v) for k, v in counters.items()}
            self.norm_reference = counters["norm_reference"]
            io.truncate_jsonl(self.out / METRICS, counters["metrics_lines"])
            io.truncate_jsonl(self.out / CLUSTERS, counters["cluster_lines"])
            start_round = ckpt["round"] + 1
            self.log(f"[fltac] resuming {self.out} after round {ckpt['round']}")
        io.write_json(self.out / "config.json", cfg.to_dict())
        io.write_json(self.out / TASKS, [{"name": t.name, "offset": exp.space.offsets[i], "labels": t.labels,
                                          "n_train": len(t.train_texts), "n_test": len(t.test_texts),
                                          **self.baselines(exp, i)} for i, t in enumerate(exp.tasks)])
        if "tensorboard" in self.sinks:
            from fltac.eval.tensorboard import TensorBoardSink

            self.tb = TensorBoardSink(self.out / "tensorboard")
        setup_seconds = time.perf_counter() - t_start

        for r in range(start_round, cfg.train.rounds + 1):
            t0 = time.perf_counter()
            before = phases.collect() if phases.enabled() else None
            metrics, clusters, round_info = self.run_round(exp, r)
            if r % cfg.eval.eval_every == 0 or r == cfg.train.rounds:
                with phase("evaluation"):
                    evals = self.evaluate(exp, r)
                metrics.extend(evals)
                counters["last_eval"] = evals
            seconds = time.perf_counter() - t0
            round_info["seconds"] = round(seconds, 3)
            if before is not None and cfg.eval.phase_times:  # up to this line, as 'seconds'
                round_info["phase_seconds"] = {k: round(v, 4) for k, v in
                                               phases.breakdown(before, phases.collect(), seconds).items()}
            metrics.append(round_info)
            with phase("writes"):
                io.append_jsonl(self.out / METRICS, metrics)
                io.append_jsonl(self.out / CLUSTERS, clusters)
                if self.tb is not None:
                    self.tb.write(metrics)
            counters["metrics_lines"] += len(metrics)
            counters["cluster_lines"] += len(clusters)
            counters["uplink_bytes"] += round_info["uplink_bytes"]
            counters["downlink_bytes"] += round_info["downlink_bytes"]
            counters["train_tokens"] += round_info["train_tokens"]
            counters["dropped"] += round_info["dropped"]
            counters["norm_reference"] = self.norm_reference
            counters["wall_seconds"] += seconds + (setup_seconds if r == start_round else 0.0)
            with phase("writes"):
                tensors, _ = exp.strategy.state_dict()
                io.save_tensors(self.out / "adapters" / f"round_{r}.safetensors", tensors)
                self._save_checkpoint(exp, r, counters)
            if before is not None:
                self.round_seconds[r] = time.perf_counter() - t0
                self.phase_seconds[r] = phases.breakdown(before, phases.collect(), self.round_seconds[r])
            left = eta(r - start_round + 1, cfg.train.rounds - start_round + 1, time.perf_counter() - t_start)
            self.log(self.round_line(r, round_info, clusters, counters["last_eval"])
                     + (f" | run ETA {format_seconds(left)}" if r < cfg.train.rounds else ""))
        if self.tb is not None:
            self.tb.close()
        summary = self.summary(exp, counters)
        io.write_json(self.out / "summary.json", summary)
        self.log(format_table(summary))
        return summary

    def run_round(self, exp: Experiment, r: int) -> tuple[list[dict], list[dict], dict]:
        cfg = self.cfg
        active = exp.active_jobs(r)  # data.task_start_round: a task's jobs join from its first round on
        clients = sample_clients(cfg, r, sorted({j.client for j in active}))
        jobs = [j for j in active if j.client in set(clients)]
        metrics = []
        t_train = time.perf_counter()
        starts = {(j.client, j.key): exp.strategy.assignment_.get((j.client, j.key)) for j in jobs}
        # counted in adapter steps, not adapters: adapters sharing passes all advance together (fast path)
        bar = self.progress(f"round {r}/{cfg.train.rounds}: adapter steps trained", sum(j.steps for j in jobs))
        received, expected, delivery = self._run_clients(exp, r, jobs, len(clients), metrics, bar)
        bar.close()
        train_seconds = time.perf_counter() - t_train
        if delivery.mean is None:
            with phase("screening"):
                subs, bound = self._screen(r, len(clients), received, expected, metrics)
            n_received, n_accepted = len(received), len(subs)
            with phase("aggregation"):
                assigned = exp.strategy.aggregate(r, subs)
        else:  # secure aggregation: nothing to screen, one mean of every member's adapter to merge
            self._check_survivors(r, len(clients), {c for c, _ in delivery.mean.members}, metrics)
            subs, bound = [], None
            n_received = n_accepted = len(delivery.mean.members)
            with phase("aggregation"):
                assigned = exp.strategy.aggregate_mean(r, delivery.mean)
        with phase("aggregation"):
            clusters = exp.strategy.cluster_records(r, assigned, jobs, exp.task_names)
        if clusters and r in (1, cfg.train.rounds):
            with phase("writes"):
                self._save_submissions(exp, r, subs, starts)
        local = [m for m in metrics if m["phase"] == "local"]
        idle = sum(m["phase"] == "idle" for m in metrics)  # adapters that took no step, hence sent nothing
        info = {"phase": "round", "round": r, "clients": len(clients), "submissions": n_received,
                "accepted": n_accepted, "idle": idle, "dropped": len(jobs) - n_accepted - idle, "norm_bound": bound,
                "uplink_bytes": delivery.uplink_bytes, "downlink_bytes": delivery.downlink_bytes,
                "train_tokens": sum(res.tokens for res in delivery.results.values()),
                "train_seconds": round(train_seconds, 3),
                "mean_local_loss": float(np.mean([m["loss"] for m in local])) if local else None}
        if clusters:
            info.update({k: clusters[0][k] for k in ("clustering_accuracy", "ari", "nmi")})
        info.update(exp.strategy.round_metrics())
        if cfg.privacy.mode != "none":
            info.update(privacy.round_record(cfg, r))
        return metrics, clusters, info

    def _run_clients(self, exp: Experiment, r: int, jobs: list, n_sampled: int, metrics: list[dict],
                     bar) -> tuple[list[Submission], dict, Delivery]:
        """One exchange with the sampled clients through the engine's transport.

        The strategy is asked once per job for its broadcast (``configure``) and for the layout the reply
        must have (``expected_spec``); the transport carries the broadcasts and brings back each client's
        result. Returns (the submissions the server received, the layout each (client, key) must send, the
        delivery). Local losses, injected faults and failed clients are appended to ``metrics``.
        """
        check_enough_sampled(self.cfg.reliability, n_sampled)
        jobs_of: dict[int, list] = {}
        for job in jobs:
            jobs_of.setdefault(job.client, []).append(job)
        broadcasts = {client: {j.key: exp.strategy.configure(r, client, j.key) for j in cjobs}
                      for client, cjobs in jobs_of.items()}
        expected = {(client, key): exp.strategy.expected_spec(client, key, b)
                    for client, per in broadcasts.items() for key, b in per.items()}
        delivery = self.transport.exchange(r, jobs_of, broadcasts, bar)
        subs = []
        for client in jobs_of:
            result = delivery.results[client]
            metrics.extend(result.records)
            for u in result.uploads:
                start = sent_part(broadcasts[client][u.key])
                subs.append(Submission(client, u.key, with_frozen(u.state, start, self.cfg.lora.freeze_A),
                                       u.num_examples, start, u.extras))
        return subs, expected, delivery

    def _screen(self, r: int, n_sampled: int, received: list[Submission], expected: dict,
                metrics: list[dict]) -> tuple[list[Submission], float | None]:
        """The submissions the strategy may see, and the round's update-norm bound (None when not validating).

        With ``reliability.validate``, each submission must pass :func:`fltac.server.robust.screen` (and
        its extras be finite); a rejected one is a dropped client, logged with its reason. The last
        accepted round's reference norm (``self.norm_reference``, kept in the checkpoint) is the bound's
        fallback for a round in which a single client votes. Stops the run
        (:class:`TooFewClients`) when fewer clients than required have an accepted submission left.
        """
        rel = self.cfg.reliability
        accepted, bound = received, None
        if rel.validate and received:
            reasons, bound, reference = screen(
                [s.state for s in received], [s.start for s in received], [expected[(s.client, s.key)] for s in received],
                [s.client for s in received], rel.norm_bound_factor, rel.norm_bound, self.norm_reference)
            reasons = [why or (f"extras {finite_problem(s.extras)}" if finite_problem(s.extras) else None)
                       for why, s in zip(reasons, received)]
            metrics.extend({"phase": "dropped", "round": r, "client": s.client, "key": s.key, "kind": "invalid",
                            "reason": f"invalid: {why}"} for s, why in zip(received, reasons) if why)
            accepted = [s for s, why in zip(received, reasons) if why is None]
            bound = bound if np.isfinite(bound) else None
            if accepted and reference is not None and np.isfinite(reference):
                self.norm_reference = reference  # the next round's fallback (robust.norm_reference)
        self._check_survivors(r, n_sampled, {s.client for s in accepted}, metrics)
        return accepted, bound

    def _check_survivors(self, r: int, n_sampled: int, survivors: set[int], metrics: list[dict]) -> None:
        """Stop the run (:class:`TooFewClients`) when fewer clients than required have an accepted adapter left."""
        rel = self.cfg.reliability
        need = required_clients(rel, n_sampled)
        if len(survivors) < need:
            io.append_jsonl(self.out / METRICS, metrics)  # the failed round's records, for the post-mortem
            dropped = [m for m in metrics if m["phase"] == "dropped"]
            listing = "; ".join(f"client {m['client']} {m['key']}: {m['reason']}" for m in dropped[:4])
            more = f"; and {len(dropped) - 4} more in {self.out / METRICS}" if len(dropped) > 4 else ""
            raise TooFewClients(
                f"round {r}: only {len(survivors)} of {n_sampled} sampled client(s) have an accepted adapter, "
                f"fewer than the {need} required (reliability.min_clients_per_round = {rel.min_clients_per_round}, "
                f"reliability.min_fraction_per_round = {rel.min_fraction_per_round:g}); dropped: {listing}{more}")

    @staticmethod
    def baselines(exp: Experiment, task: int) -> dict:
        """What a task's scores should beat, for tasks.json: ``majority_accuracy`` (always its most frequent label of
        the test sample) where the run scores accuracy; nothing for a causal LM."""
        return {"majority_accuracy": exp.evaluator.majority_accuracy(task)} if exp.evaluator.metric == "accuracy" else {}

    def served_slots(self, exp: Experiment, r: int) -> list[int | None]:
        """Per task, the slot holding most of its assigned training samples (the adapter that serves it) after
        round ``r``; None for a task that has not started by then (``data.task_start_round``)."""
        n_tasks = len(exp.tasks)
        weight = np.zeros((n_tasks, exp.strategy.n_slots))
        for job in exp.jobs:
            slot = exp.strategy.assignment_.get((job.client, job.key))
            if slot is not None:
                for t in job.tasks:
                    weight[t, slot] += np.sum(exp.train_store.task[job.rows] == t)
        return [int(np.argmax(weight[t])) if exp.task_started(t, r) else None for t in range(n_tasks)]

    def evaluate(self, exp: Experiment, r: int) -> list[dict]:
        """Per task: the serving global adapter's accuracy, and the personalised accuracy (each client's own
        assigned adapter on its share of the task, weighted by that share). A causal-LM run records its LM
        loss in their place (``lm_loss``, ``personalized_lm_loss``; ``exp.evaluator.metric``) and, at the last
        round, the judge score of the serving adapter's generated answers (:meth:`judge`)."""
        metric = exp.evaluator.metric
        cache: dict[tuple[int, int], float] = {}
        served = self.served_slots(exp, r)
        needed = {(s, t) for t, s in enumerate(served) if s is not None} | {
            (exp.strategy.assignment_[(j.client, j.key)], t) for j in exp.jobs
            if (j.client, j.key) in exp.strategy.assignment_ for t in j.tasks}
        bar = self.progress(f"round {r}: evaluated (adapter, task) pairs", len(needed))

        def acc(slot: int, t: int) -> float:
            if (slot, t) not in cache:
                cache[(slot, t)] = exp.evaluator.score(exp.strategy.slots_[slot], t)
                bar.step(note=exp.task_names[t])
            return cache[(slot, t)]

        records = []
        for t, name in enumerate(exp.task_names):
            num, den = 0.0, 0.0
            for job in exp.jobs:
                slot = exp.strategy.assignment_.get((job.client, job.key))
                if slot is not None and t in job.tasks:
                    n = float(np.sum(exp.train_store.task[job.rows] == t))
                    num, den = num + n * acc(slot, t), den + n
            records.append({"phase": "eval", "round": r, "task": name, "slot": served[t],
                            metric: None if served[t] is None else acc(served[t], t),
                            f"personalized_{metric}": num / den if den else None})
        bar.close()
        if r == self.cfg.train.rounds and metric == "lm_loss" and self.cfg.eval.judge_samples:
            self.judge(exp, r, served, records)
        return records

    def judge(self, exp: Experiment, r: int, served: list[int], records: list[dict]) -> None:
        """Causal LM: each task's serving adapter answers the task's judged prompts; the mean judge score goes
        into the task's eval record (``judge_score``), every answer into ``generations.jsonl``."""
        from fltac.eval.lm_eval import mean_score

        lines = []
        bar = self.progress(f"round {r}: tasks answered and judged", len(records))
        for t, rec in enumerate(records):
            answers = exp.evaluator.generate(exp.strategy.slots_[served[t]], t)
            rec["judge_score"] = mean_score(answers)
            lines.extend({"round": r, "task": rec["task"], "slot": served[t], **a} for a in answers)
            bar.step(note=rec["task"])
        bar.close()
        (self.out / GENERATIONS).unlink(missing_ok=True)  # written once, at the last round
        io.append_jsonl(self.out / GENERATIONS, lines)

    def _save_submissions(self, exp: Experiment, r: int, subs: list[Submission], starts: dict) -> None:
        """The adapters clients submitted in round ``r`` (FL-TAC, first and last round), for the report's projection.

        Keys ``<client>/<key>/<tensor>``. The JSON beside it gives the slot each job started from (-1: the
        initial adapter, then saved as ``initial/<tensor>``) and the order of an adapter's tensors as clients
        sent them (``tensor_order``; safetensors files sort them), so a reader can rebuild the vectors K-means saw.
        """
        tensors = {f"{s.client}/{s.key}/{k}": v for s in subs for k, v in s.state.items()}
        start_rows = [[s.client, s.key, -1 if starts.get((s.client, s.key)) is None else starts[(s.client, s.key)]]
                      for s in subs]
        if any(row[2] == -1 for row in start_rows):
            tensors.update({f"initial/{k}": v for k, v in exp.strategy.initial.items()})
        io.save_tensors(self.out / "adapters" / f"submissions_round_{r}.safetensors", tensors)
        io.write_json(self.out / "adapters" / f"submissions_round_{r}.json",
                      {"round": r, "starts": start_rows, "tensor_order": list(subs[0].state) if subs else []})

    def round_line(self, r: int, info: dict, clusters: list[dict], evals: list[dict] | None) -> str:
        parts = [f"round {r}/{self.cfg.train.rounds}", f"loss {info['mean_local_loss']:.3f}",
                 f"up {info['uplink_bytes'] / 1e6:.2f} MB"]
        if clusters:
            parts.append(f"clustering acc {clusters[0]['clustering_accuracy']:.3f}")
            if "n_clusters" in clusters[0]:
                parts.append(f"K {clusters[0]['n_clusters']} ({clusters[0]['n_slots']} slots)")
        if info.get("dropped"):
            parts.append(f"{info['dropped']} adapter(s) dropped")
        if evals and evals[0]["round"] == r and "accuracy" in evals[0]:  # tasks not started yet: not in the mean
            parts.append(f"mean acc {np.mean([e['accuracy'] for e in evals if e['accuracy'] is not None]):.4f}")
        elif evals and evals[0]["round"] == r:  # causal LM
            parts.append(f"mean lm loss {np.mean([e['lm_loss'] for e in evals]):.4f}")
            if "judge_score" in evals[0]:
                parts.append(f"judge {np.mean([e['judge_score'] or 0.0 for e in evals]):.3f}")
        tok_s = info["train_tokens"] / max(info["train_seconds"], 1e-9)
        parts.append(f"{info['seconds']:.1f} s ({tok_s:,.0f} train tok/s)")
        return "[fltac] " + " | ".join(parts)

    def summary(self, exp: Experiment, counters: dict) -> dict:
        evals = counters["last_eval"] or []
        metric = exp.evaluator.metric  # accuracy; lm_loss for a causal LM (then also judge_score)
        per_task = {e["task"]: e[metric] for e in evals}
        personal = {e["task"]: e[f"personalized_{metric}"] for e in evals}
        judged = {e["task"]: e["judge_score"] for e in evals if "judge_score" in e}
        clusters = io.read_jsonl(self.out / CLUSTERS)
        last = clusters[-1] if clusters else {}
        return {
            "method": self.cfg.method,
            "scenario": self.cfg.data.scenario,
            "tasks": exp.task_names,
            f"per_task_{metric}": per_task,
            f"mean_{metric}": float(np.mean(list(per_task.values()))) if per_task else None,
            f"personalized_{metric}": personal,
            f"mean_personalized_{metric}": float(np.mean([v for v in personal.values() if v is not None]))
            if personal else None,
            **({"per_task_judge_score": judged, "judge": self.cfg.eval.judge,
                "mean_judge_score": float(np.mean([v for v in judged.values() if v is not None]))
                if any(v is not None for v in judged.values()) else None} if judged else {}),
            **({"privacy": privacy.summary_record(self.cfg)} if self.cfg.privacy.mode != "none" else {}),
            "clustering_accuracy": last.get("clustering_accuracy"),
            "ari": last.get("ari"),
            "nmi": last.get("nmi"),
            "uplink_bytes": counters["uplink_bytes"],
            "downlink_bytes": counters["downlink_bytes"],
            "trainable_params_per_adapter": exp.model.n_trainable(),
            "lora_rank": self.cfg.rank,
            "rounds": self.cfg.train.rounds,
            "train_tokens": counters["train_tokens"],
            "dropped_submissions": counters["dropped"],
            "wall_seconds": round(counters["wall_seconds"], 2),
            "dtype": exp.dtype_note,
            "cpu": cpu_model(),
            "seed": self.cfg.seed,
        }


def format_table(summary: dict) -> str:
    metric = "accuracy" if "per_task_accuracy" in summary else "lm_loss"  # a causal-LM run: LM loss and judge
    judged = summary.get("per_task_judge_score")
    fmt = lambda v: f"{v:.4f}" if v is not None else "-"  # noqa: E731
    width = 34 + (10 if judged else 0)
    lines = [f"{'task':<14}{metric:>10}{'personal':>10}" + (f"{'judge':>10}" if judged else ""), "-" * width]
    for task, acc in summary[f"per_task_{metric}"].items():
        pers = summary[f"personalized_{metric}"].get(task)
        lines.append(f"{task:<14}{acc:>10.4f}{fmt(pers):>10}" + (f"{fmt(judged.get(task)):>10}" if judged else ""))
    lines.append("-" * width)
    mp = summary[f"mean_personalized_{metric}"]
    lines.append(f"{'mean':<14}{summary[f'mean_{metric}']:>10.4f}{fmt(mp):>10}"
                 + (f"{fmt(summary.get('mean_judge_score')):>10}" if judged else ""))
    ca = summary["clustering_accuracy"]
    lines.append(f"method {summary['method']}; clustering accuracy {ca if ca is None else f'{ca:.3f}'}; "
                 f"uplink {summary['uplink_bytes'] / 1e6:.2f} MB; {summary['wall_seconds']:.0f} s")
    return "\n".join(lines)


def run(cfg: RunConfig, resume: bool = False, overwrite: bool = False, tasks=None, quiet: bool = False,
        log: tuple[str, ...] = ()) -> dict:
    return InProcessEngine(cfg, resume=resume, overwrite=overwrite, tasks=tasks, quiet=quiet, log=log).run()
