"""Flower's SecAgg+ for the methods that merge without looking (FedIT): the server learns one weighted mean.

Flower 1.42 implements SecAgg+ (Bell et al., CCS 2020) as ``SecAggPlusWorkflow`` (server) and
``secaggplus_mod`` (client) on its *legacy* fit messages: the workflow asks a legacy
``flwr.server.strategy.Strategy`` for the round's ``FitIns`` (``configure_fit``), runs the protocol's four
stages over the Grid (setup: public keys; share keys: encrypted secret shares; collect masked vectors: the mod
calls the ClientApp's own train function, then quantises the client's weighted adapter and masks it;
unmask: the shares that remove the masks) and hands ``aggregate_fit`` the unmasked mean. fltac runs that
workflow unchanged, once per round (:class:`SecAggTransport`), with :class:`MeanOnlyStrategy` as the legacy
strategy: it hands out the FitIns built from our strategy's broadcasts and keeps the mean. The Delivery then
carries a :class:`~fltac.wire.Mean` in place of per-client uploads and the engine merges it with the strategy's
``aggregate_mean`` (:meth:`fltac.server.strategies.FedAvg.aggregate_mean`), so checkpoints, metrics.jsonl,
summary.json and resume are a normal run's. Which methods may: the registry's ``secure_aggregation`` field.
The client trains with :func:`fltac.client.round.train_client`, as on every engine (:func:`secagg_train`).

Precision and weighting (Flower's arithmetic; ``secure_aggregation.*``)
------------------------------------------------------------------------
Client k with n_k examples gets the integer weight w_k = round(n_k / W x Q) (W = ``max_weight``, Q =
``quantization_range``) and sends each entry x of its adapter as round_stoch((clip(w_k x / Q, -c, c) + c) Q / 2c)
(c = ``clipping_range``; stochastic rounding: unbiased, within one step 2c/Q), masked mod 2^32, and w_k itself.
The server unmasks the sums and divides by sum_k w_k / Q, so it gets sum_k w_k x_k / sum_k w_k: FedAvg with
weights w_k (proportional to n_k up to 1/2 each), each entry off the exact sample-weighted mean by less than
n (2c + s/2) / sum_k w_k ~ n 2c W / (Q sum_k n_k) for n clients, s the entry's largest distance from the mean
among the clients, small next to 4c for an adapter (:func:`mean_error_bound`). Defaults (c = 8, Q = 2^22,
W = 1000): a step of 3.8e-6; two clients of 100 examples: under 3.8e-5 per entry. The mean comes
back in float64 and is cast to the adapter's dtype. An entry beyond c after weighting would be clipped without a
word, so the client refuses to send such an adapter (an error reply: SecAgg+ treats it as a dropout), and an n_k
above W (Flower warns of overflow) stops the run before round 1.

The stochastic rounding draws from NumPy's global generator: the ClientApp seeds it from (seed, round, partition)
around the protocol's messages and restores it after (:func:`secagg_when_asked`), so a run is reproducible;
the masks come from ``os.urandom`` and cancel exactly.

What the server sees: which clients answered, each one's ``num_examples`` (its FedAvg weight) and the FitRes
metrics, which carry the records a normal reply carries (local losses, injected faults), in the clear; never an
adapter. ``uplink_bytes`` count every reply of the four stages (public keys, encrypted shares, the masked vectors,
the unmasking shares), ``downlink_bytes`` every message sent (the FitIns with the served adapter, forwarded keys
and shares): the size of the messages' records as Flower serialises them (protobuf).
"""

from __future__ import annotations

import json

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.common import Code, FitIns, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.common.serde import recorddict_to_proto
from flwr.compat.common import recorddict_compat as compat
from flwr.server import ServerConfig
from flwr.server.client_manager import SimpleClientManager
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy as LegacyStrategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey

from fltac.client.round import ClientResult, dropped_result, train_client
from fltac.config import RunConfig
from fltac.engines.inprocess import Delivery, RunError
from fltac.wire import Broadcast, Mean


def mean_error_bound(num_examples: list[int], max_weight: float, clipping_range: float, quantization_range: int,
                     spread: float = 0.0) -> float:
    """The largest error of one entry of SecAgg+'s mean against FedAvg's exact sample-weighted mean:
    n (2c + spread / 2) / sum_k w_k. The 2c: n quantisation steps (2c / Q) of the weighted sum over the weight
    sum_k w_k / Q; the spread / 2: the integer weights w_k are off n_k Q / W by at most 1/2 each, which moves the
    mean by sum_k delta_k (x_k - mean) / sum_k w_k, ``spread`` being the largest |x_k - mean| of the entry (0:
    the bound against the mean with the protocol's own weights w_k)."""
    weights = [round(n / max_weight * quantization_range) for n in num_examples]
    return len(weights) * (2 * clipping_range + spread / 2) / sum(weights)


# ---- server side ---------------------------------------------------------------------------------------

class MeanOnlyStrategy(LegacyStrategy):
    """The legacy Flower strategy ``SecAggPlusWorkflow`` drives: it hands out the FitIns it was given and keeps
    the one unmasked mean the workflow passes to ``aggregate_fit``.

    The workflow gives ``aggregate_fit`` one ``(proxy, FitRes)`` per client whose masked vector went into the sum;
    every FitRes holds the same mean as its ``parameters`` (no adapter of one client), beside that client's own
    ``num_examples`` and metrics. Kept: ``mean`` (the arrays), ``members`` ({node id: FitRes}), ``failures``.
    """

    def __init__(self, fit: dict[int, tuple[GridClientProxy, FitIns]]):
        self.fit = fit
        self.mean: list[np.ndarray] | None = None
        self.members: dict[int, FitRes] = {}
        self.failures: list = []

    def initialize_parameters(self, client_manager):
        return None

    def configure_fit(self, server_round, parameters, client_manager):
        return list(self.fit.values())

    def aggregate_fit(self, server_round, results, failures):
        if results:
            shared = results[0][1].parameters
            if any(res.parameters is not shared for _, res in results):
                raise RunError(f"round {server_round}: SecAgg+ handed the strategy more than the one unmasked mean")
            self.mean = parameters_to_ndarrays(shared)
        self.members = {proxy.node_id: res for proxy, res in results}
        self.failures = list(failures)
        return (results[0][1].parameters if results else None), {}

    def configure_evaluate(self, server_round, parameters, client_manager):
        return []

    def aggregate_evaluate(self, server_round, results, failures):
        return None, {}

    def evaluate(self, server_round, parameters):
        return None


class CountingGrid:
    """The engine's Grid, counting the bytes of every record sent (``down``) and received (``up``), and noting
    each error reply's reason by the node it was sent to (the workflow keeps only the error)."""

    def __init__(self, grid):
        self.grid = grid
        self.down = self.up = 0
        self.errors: dict[int, str] = {}

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        self.down += sum(record_bytes(m.content) for m in messages)
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        node_of = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}
        for rep in replies:
            if rep.has_error():
                last = rep.error.reason.strip().splitlines()[-1] if rep.error.reason else ""
                self.errors[node_of.get(rep.metadata.reply_to_message_id, -1)] = \
                    f"flower error {rep.error.code}: {last}"
            else:
                self.up += record_bytes(rep.content)
        return replies


def record_bytes(content: RecordDict) -> int:
    """Bytes of a message's records (arrays, configs, metrics) as Flower serialises them (protobuf)."""
    return recorddict_to_proto(content).ByteSize()


def legacy_context(strategy: MeanOnlyStrategy, round_: int, rounds: int) -> LegacyContext:
    """The LegacyContext SecAggPlusWorkflow reads: the strategy, the round, and (unused: our FitIns carry the
    adapters) an empty global-parameters record."""
    context = LegacyContext(Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={}),
                            config=ServerConfig(num_rounds=rounds), strategy=strategy,
                            client_manager=SimpleClientManager())
    context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND: round_})
    context.state.array_records[MAIN_PARAMS_RECORD] = ArrayRecord()
    return context


class SecAggTransport:
    """The Flower engine's transport with ``secure_aggregation`` on: one SecAgg+ round per fltac round.

    Every sampled client trains its one adapter (the method's layout: one per client) and
    takes part in the protocol; the Delivery holds, per client, its records (no upload) and the round's
    :class:`~fltac.wire.Mean`. A sampled client whose masked vector did not go into the sum is dropped for the
    round ('crash', or 'timeout' when it did not answer), logged like any drop. Too few answers halt Flower's
    workflow (fewer than ``reconstruction_threshold`` neighbours): the run stops with that reason.
    """

    def __init__(self, engine, limit: float | None):
        self.engine = engine
        self.limit = limit  # seconds each stage waits for replies (None: no limit)

    def fit_instructions(self, round_: int, jobs_of: dict, broadcasts: dict) -> dict[int, FitIns]:
        """Per client, its legacy FitIns: the adapter it is served, as float32 arrays, and what it needs to train it."""
        eng, sa = self.engine, self.engine.cfg.secure_aggregation
        if len(jobs_of) < 2:
            raise RunError(f"round {round_}: SecAgg+ needs at least 2 sampled clients, got {len(jobs_of)}")
        if any(len(cjobs) != 1 for cjobs in jobs_of.values()):
            raise RunError(f"round {round_}: secure aggregation sums one adapter per client (method "
                           f"{eng.cfg.method} trains several)")
        heavy = {c: cjobs[0].num_examples for c, cjobs in jobs_of.items() if cjobs[0].num_examples > sa.max_weight}
        if heavy:
            raise RunError(f"client(s) {sorted(heavy)} hold {max(heavy.values())} examples, more than "
                           f"secure_aggregation.max_weight = {sa.max_weight:g}: raise it to at least that")
        fit = {}
        for client, cjobs in jobs_of.items():
            eng.check_reported(client, cjobs)
            b = broadcasts[client][cjobs[0].key]
            names = list(b.state)
            fit[client] = FitIns(ndarrays_to_parameters([b.state[k].detach().float().cpu().numpy() for k in names]), {
                "round": round_, "key": cjobs[0].key, "names": json.dumps(names), "hooks": json.dumps(b.config)})
        return fit

    def exchange(self, round_, jobs_of, broadcasts, bar) -> Delivery:
        eng, sa = self.engine, self.engine.cfg.secure_aggregation
        fit = self.fit_instructions(round_, jobs_of, broadcasts)
        grid = CountingGrid(eng.grid)
        strategy = MeanOnlyStrategy({eng.node_of[c]: (GridClientProxy(eng.node_of[c], grid, 0), ins)
                                     for c, ins in fit.items()})
        workflow = SecAggPlusWorkflow(sa.num_shares, sa.reconstruction_threshold, max_weight=sa.max_weight,
                                      clipping_range=sa.clipping_range, quantization_range=sa.quantization_range,
                                      timeout=self.limit)
        workflow(grid, legacy_context(strategy, round_, eng.cfg.train.rounds))
        if strategy.mean is None:
            reasons = "; ".join(f"node {n}: {why}" for n, why in sorted(grid.errors.items())) or "see Flower's log"
            raise RunError(f"round {round_}: Flower's SecAgg+ halted before unmasking a sum (too few clients "
                           f"answered for secure_aggregation.reconstruction_threshold = {sa.reconstruction_threshold}"
                           f"): {reasons}")
        results, members, total = {}, [], 0
        for client, cjobs in jobs_of.items():
            job, node = cjobs[0], eng.node_of[client]
            res = strategy.members.get(node)
            if res is None:
                why = grid.errors.get(node)
                kind, reason = ("crash", f"crash: {why}") if why else (
                    "timeout", f"timeout: no masked vector from node {node}"
                    + (f" within {self.limit:g} s" if self.limit is not None else ""))
                results[client] = dropped_result(round_, client, cjobs, kind, reason)
                bar.step(job.steps, note=f"client {client} dropped")
                continue
            results[client] = ClientResult(json.loads(str(res.metrics["records"])), [], int(res.metrics["tokens"]))
            members.append((client, job.key))
            total += int(res.num_examples)
            bar.step(job.steps, note=f"client {client}")
        like = broadcasts[members[0][0]][members[0][1]].state  # every client's adapter has this layout
        state = {k: torch.from_numpy(np.asarray(a)).to(like[k].dtype) for k, a in zip(like, strategy.mean)}
        return Delivery(results, grid.down, grid.up, Mean(state, total, members))


# ---- client side ---------------------------------------------------------------------------------------

def is_secagg(msg: Message) -> bool:
    """Whether a train message belongs to a SecAgg+ round (it carries the protocol's config record)."""
    return RECORD_KEY_CONFIGS in msg.content.config_records


def secagg_when_asked(msg: Message, context: Context, call_next):
    """The ClientApp's train mod: Flower's ``secaggplus_mod`` for a SecAgg+ message, with NumPy's global generator
    (the mod's stochastic rounding) seeded from (seed, round, partition) and restored after; other messages pass."""
    if not is_secagg(msg):
        return call_next(msg, context)
    run = context.state.config_records["fltac"]["run_config"] if "fltac" in context.state.config_records else "{}"
    seed = int(json.loads(str(run)).get("seed", 0))
    saved = np.random.get_state()
    np.random.seed([seed, int(msg.metadata.group_id or 0), int(context.node_config.get("partition-id", 0)), 0x5EC])
    try:
        return secaggplus_mod(msg, context, call_next)
    finally:
        np.random.set_state(saved)


def secagg_train(msg: Message, cfg: RunConfig, side) -> Message:
    """Train this node's adapter for a SecAgg+ round with fltac's client code; the legacy FitRes the mod masks.

    The reply's arrays are the sent adapter's tensors in the sent order (a tensor the client does not upload, e.g.
    a frozen lora_A, goes back as sent), in float32; ``num_examples`` is the FedAvg weight; metrics carry the
    records and tokens a normal reply carries. A client with nothing to add (it failed, or its weighted entries
    exceed ``clipping_range``) raises: SecAgg+ treats it as a dropout.
    """
    fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    conf = fitins.config
    r, key, names = int(conf["round"]), str(conf["key"]), json.loads(str(conf["names"]))
    state = {k: torch.from_numpy(a.copy()) for k, a in zip(names, parameters_to_ndarrays(fitins.parameters))}
    jobs = {j.key: j for j in side.jobs}
    if key not in jobs:
        raise RuntimeError(f"the server sent adapter key {key!r} this client does not hold")
    result = train_client(side.model, side.train_store, cfg, r, side.client, [jobs[key]],
                          {key: Broadcast(state, json.loads(str(conf["hooks"])))}, side.task_names)
    if result.failed or not result.uploads:
        reasons = "; ".join(m.get("reason", m["phase"]) for m in result.records if m["phase"] in ("dropped", "idle"))
        raise RuntimeError(f"client {side.client} has no adapter for the secure sum of round {r}: {reasons}")
    upload = result.uploads[0]
    arrays = [upload.state.get(k, state[k]).detach().float().cpu().numpy() for k in names]
    sa = cfg.secure_aggregation
    largest = max(float(np.abs(a).max()) for a in arrays) * min(1.0, upload.num_examples / sa.max_weight)
    if largest > sa.clipping_range:
        raise RuntimeError(f"client {side.client}: a weighted adapter entry of {largest:.3g} exceeds "
                           f"secure_aggregation.clipping_range = {sa.clipping_range:g}; SecAgg+ would clip it")
    res = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(arrays), int(upload.num_examples),
                 {"records": json.dumps(result.records), "tokens": int(result.tokens)})
    return Message(compat.fitres_to_recorddict(res, keep_input=True), reply_to=msg)
