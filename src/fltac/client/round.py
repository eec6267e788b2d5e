"""A client's round: train its jobs from their broadcasts, meet its faults, and say what it uploads.

The client side of every transport (:class:`fltac.engines.inprocess.Transport`): the in-process transport calls
:func:`train_client` for each client in turn on the engine's one model, the Flower ClientApp on the
SuperNode's own model and data. It sees broadcasts and its own jobs, never the server's strategy.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fltac.client.hooks import make_hooks
from fltac.client.train import job_seed, train_all_routed, train_job
from fltac.config import RunConfig
from fltac.engines.faults import run_client, tamper
from fltac.models.adapters import AdapterModel
from fltac.privacy import local_dp
from fltac.wire import HOOK_PROXIMAL, Upload, frozen_keys


@dataclass
class ClientResult:
    """One client's round, as its side sees it: what goes into metrics.jsonl and what it uploads.

    ``records``: its local losses, injected faults and (if it failed) one 'dropped' line per adapter, in
    the order the engine logs them. ``uploads``: one :class:`~fltac.wire.Upload` per adapter it sends;
    empty when it failed. An adapter that took no optimizer step (routed layout: its task drew no row in
    the client's round) is not sent: its update is exactly zero, so it would cost uplink bytes and give
    clustering a point that carries no evidence. It gets an ``idle`` record instead, and on the server it
    keeps its cluster, as a job that missed the round does.
    """

    records: list[dict] = field(default_factory=list)
    uploads: list[Upload] = field(default_factory=list)
    tokens: int = 0
    failed: bool = False


def dropped_result(r: int, client: int, cjobs: list, kind: str, reason: str) -> ClientResult:
    """A client lost for round ``r`` before anything of it arrived: one 'dropped' line per adapter it had."""
    return ClientResult([{"phase": "dropped", "round": r, "client": client, "key": j.key, "kind": kind,
                          "reason": reason} for j in cjobs], failed=True)


class _NoBar:
    def step(self, n: int = 1, note: str = "") -> None:
        pass


def sent_part(b) -> dict:
    """The part of the broadcast adapter that matches what the client uploads (HAFL: a slice), i.e. the
    start of the update the server screens and merges: ``b.state`` through every hook's ``outgoing``."""
    start = b.state
    for h in make_hooks(b.config, b.state):
        start = h.outgoing(start)
    return start


def job_hooks(b, cfg: RunConfig) -> list:
    """The client hooks of one job: those its broadcast sets, and FedProx's proximal term when ``train.prox_mu``
    > 0 and the broadcast sets no coefficient of its own (a method's own coefficient wins).
    A run-wide setting, so it needs no broadcast: every client holds the run config (the Flower ClientApp
    receives it in the setup query)."""
    config = {HOOK_PROXIMAL: cfg.train.prox_mu, **b.config} if cfg.train.prox_mu > 0 else b.config
    return make_hooks(config, b.state)


def uses_bank(model, cfg: RunConfig, broadcasts: list) -> bool:
    """Whether a client's adapters can train in shared backbone passes (:mod:`fltac.models.bank`): a plain
    LoRA classifier or causal LM (not a staged backbone), no client hooks (their per-adapter terms act on
    one adapter's tensors; ``train.prox_mu`` is not one: the bank adds it itself) and no backbone dropout (its
    draws would span adapters)."""
    return (isinstance(model, AdapterModel) and model.peft_config.task_type in ("SEQ_CLS", "CAUSAL_LM")
            and cfg.backbone_dropout == 0.0 and not any(b.config for b in broadcasts))


def train_client(model, store, cfg: RunConfig, r: int, client: int, cjobs: list, broadcasts: dict,
                 task_names: list[str], bar=None, trained: dict | None = None) -> ClientResult:
    """Train one client's jobs of round ``r`` from its broadcasts, under its injected faults and time limit.

    The client side of a round, shared by every transport: the in-process one calls it for each client
    in turn on its one model; the Flower ClientApp calls it on the SuperNode's own model and data
    (:mod:`fltac.engines.flower`). A client that raises or runs late is dropped whole for the round
    (:func:`fltac.engines.faults.run_client`); attackers and corruptions alter what is sent (:func:`tamper`).
    ``trained``: results of jobs already trained on the fast path (:func:`fltac.client.train.train_fast_path`),
    keyed by (client, key); the client then only meets its faults, as if it had trained them itself.
    With ``train.batching: routed`` on a bank-capable model (:func:`uses_bank`), a client not in ``trained``
    trains its jobs together in the routed layout, alone (:func:`fltac.client.train.train_all_routed`): the
    computation the fast path does for it beside the other clients, bit for bit.
    With ``privacy.mode: local`` the uploads are clipped together and noised here (:func:`fltac.privacy.local_dp`),
    on the client, before attacks and corruptions alter them.
    ``bar`` counts adapter steps (a job's ``steps``): it advances with every step this client trains, and by
    the rest of the client's steps when it fails; steps trained on the fast path were counted there.
    """
    rel, bar = cfg.reliability, bar or _NoBar()
    out = ClientResult()
    counted = [sum(j.steps for j in cjobs if trained is not None and (j.client, j.key) in trained)]
    done = dict(trained or {})
    routed = cfg.train.batching == "routed" and uses_bank(model, cfg, list(broadcasts.values()))

    def on_step(n: int) -> None:
        counted[0] += n
        bar.step(n, note=f"client {client}")

    def train(job):
        b = broadcasts[job.key]
        hooks = job_hooks(b, cfg)
        if routed and (job.client, job.key) not in done:  # the client's first job: all its jobs, together
            done.update(train_all_routed(model, store, cjobs, {(j.client, j.key): broadcasts[j.key].state
                                                               for j in cjobs}, cfg.train, cfg.seed, r, on_step))
        if (job.client, job.key) in done:
            state, losses, n_tok = done[(job.client, job.key)]
        else:
            state, losses, n_tok = train_job(model, b.state, store, job, cfg.train,
                                             job_seed(cfg.seed, r, job.client, job.key), hooks, on_step)
        for h in hooks:  # the method may upload only part of the adapter (Hook.outgoing)
            state = h.outgoing(state)
        frozen = frozen_keys(state, cfg.lora.freeze_A)  # FFA-LoRA: the server holds the shared lora_A already
        state = {k: v for k, v in state.items() if k not in frozen}
        return state, losses, n_tok, {k: v for h in hooks for k, v in h.extras().items()}

    outcome = run_client(client, cjobs, train, rel, cfg.seed, r)
    if outcome.injected is not None:
        out.records.append({"phase": "injected", "round": r, "client": client,
                            "key": cjobs[outcome.injected.at].key, "fault": outcome.injected.kind})
    for job, (state, losses, n_tok, extras) in outcome.done:
        out.tokens += n_tok
        task = "+".join(task_names[t] for t in job.tasks)
        out.records.extend({"phase": "local", "round": r, "client": job.client, "key": job.key, "task": task,
                            "step": i + 1, "loss": round(loss, 6), "n": job.num_examples}
                           for i, loss in enumerate(losses))
    if outcome.kind is not None:
        bar.step(sum(j.steps for j in cjobs) - counted[0], note=f"client {client} dropped")
        out.records.extend({"phase": "dropped", "round": r, "client": client, "key": j.key,
                            "kind": outcome.kind, "reason": outcome.reason} for j in cjobs)
        out.failed = True
        return out
    sent = []
    for job, (state, losses, n_tok, extras) in outcome.done:
        if not losses:  # routed: its task had no row in any of the client's steps, so its update is exactly zero
            out.records.append({"phase": "idle", "round": r, "client": client, "key": job.key})
            continue
        sent.append((job, state, extras))
    states = [state for _, state, _ in sent]
    if cfg.privacy.mode == "local":  # clipped together and noised here, before anything leaves the client
        starts = [{k: v for k, v in sent_part(broadcasts[job.key]).items() if k in state} for job, state, _ in sent]
        states = local_dp(states, starts, cfg, r, client)
    for (job, _, extras), state in zip(sent, states):
        state, notes = tamper(rel, cfg.seed, r, client, job.key, state)
        out.records.extend({"phase": "injected", "round": r, "client": client, "key": job.key, "fault": note}
                           for note in notes)
        out.uploads.append(Upload(job.key, state, job.num_examples, extras))
    return out
