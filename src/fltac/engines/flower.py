"""The Flower engine: the in-process engine's round loop, with clients reached through Flower (flwr >= 1.42).

This module and :mod:`fltac.engines.flower_secagg` (Flower's SecAgg+, ``secure_aggregation``) are fltac's only
``flwr`` imports. They carry messages and nothing else: the strategy (``configure``,
``expected_spec``, ``aggregate``), the client's training (:func:`fltac.client.round.train_client`), the
screening, evaluation, metrics, checkpoints and summary are the very code the in-process engine runs.
:class:`FlowerEngine` subclasses :class:`~fltac.engines.inprocess.InProcessEngine` and replaces its
transport (:class:`FlowerTransport`): "carry each sampled client its broadcasts and bring back its result"
becomes a Message exchange over a Flower ``Grid``; so metrics.jsonl, cluster_assignments.jsonl and
summary.json have the same form.

Messages (Flower Message API; one message per sampled client and round)
----------------------------------------------------------------------
query (server -> every node, once before round 1)
    ``config``: ConfigRecord ``run_config`` (the RunConfig as JSON). The node keeps it in
    ``context.state["fltac"]`` and answers ``node``: ConfigRecord ``partition_id``, ``keys`` (its
    adapters) and ``num_examples``, from its own partition (``node_config`` ``partition-id`` /
    ``num-partitions``). The server maps partitions to node ids with it.
train (server -> client)
    ``config``: ConfigRecord ``round``, ``keys`` (the client's adapters trained this round),
    ``adapter_of`` (per key, the index of its start adapter) and ``hooks`` (JSON: per key, the
    broadcast's hook settings). ``adapter.<i>``: one ArrayRecord per *distinct* start adapter (the global
    adapters of the client's clusters; two tasks in one cluster share one record), so each client receives
    its own, variable-size set.
train reply (client -> server)
    ``result``: ConfigRecord ``keys``, ``num_examples``, ``tokens``, ``failed``, ``records`` (JSON: the
    client's metrics.jsonl lines: local losses, injected faults, its own drop). ``adapter.<key>``: one
    ArrayRecord per trained adapter; ``extras.<key>``: the hooks' extra tensors, when there are any.

Client state between rounds is *sent with the message*, as in the in-process engine: the server's
strategy keeps which cluster each (client, adapter) belongs to and sends the matching adapters;
importance scores and masks travel in ``hooks`` and ``extras``; a fresh optimizer is made per job and
round. A node's ``context.state`` keeps only the run's config (from the query). Bytes on the wire are
``ArrayRecord.count_bytes()`` of the adapter records: ``downlink_bytes`` / ``uplink_bytes``.

With ``secure_aggregation.enabled`` each round's train exchange is Flower's SecAgg+ instead
(:class:`~fltac.engines.flower_secagg.SecAggTransport`: legacy fit messages through ``SecAggPlusWorkflow``, the
ClientApp's train function behind ``secaggplus_mod``); the server gets one mean, never a client's adapter.

Failed clients: an error reply (the ClientApp raised, the node went away) is a 'crash', no reply
within ``reliability.client_timeout_s`` + :data:`TRANSPORT_SLACK_S` a 'timeout'; the client is dropped
for the round and logged in metrics.jsonl like any other drop, and ``reliability.min_clients_per_round``
stops the run when too few remain.
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from fltac.client.round import ClientResult, dropped_result, train_client
from fltac.config import RunConfig, from_dict, load_config
from fltac.engines.flower_secagg import SecAggTransport, is_secagg, secagg_train, secagg_when_asked
from fltac.engines.inprocess import Delivery, InProcessEngine, RunError
from fltac.methods import method_of
from fltac.wire import Broadcast, Upload

#: Seconds a train round waits beyond ``reliability.client_timeout_s`` for a reply (transport, process start).
TRANSPORT_SLACK_S = 60.0
#: Environment every Flower process of fltac runs with: no telemetry, no update check, no ``uv sync`` of a
#: run's dependencies (a ``torch`` requirement would pull a multi-GB CUDA build).
FLOWER_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
              "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}


# ---- codec: Broadcast / ClientResult <-> records -----------------------------------------------------

def to_record(state: dict[str, torch.Tensor]) -> ArrayRecord:
    return ArrayRecord({k: Array(v.detach().cpu().contiguous()) for k, v in state.items()})


def from_record(rec: ArrayRecord) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(rec[k].numpy().copy()) for k in rec}


def encode_broadcasts(round_: int, broadcasts: dict) -> tuple[RecordDict, dict[int, int]]:
    """The train message's content for one client, and the bytes of each distinct adapter record sent."""
    distinct, adapter_of = {}, []
    for b in broadcasts.values():
        adapter_of.append(distinct.setdefault(id(b.state), len(distinct)))
    states = {i: broadcasts[k].state for k, i in zip(broadcasts, adapter_of)}
    content = RecordDict({"config": ConfigRecord({
        "round": round_, "keys": list(broadcasts), "adapter_of": adapter_of,
        "hooks": json.dumps({k: b.config for k, b in broadcasts.items()})})})
    sizes = {}
    for i, state in states.items():
        rec = to_record(state)
        content[f"adapter.{i}"] = rec
        sizes[i] = rec.count_bytes()
    return content, sizes


def decode_broadcasts(content: RecordDict) -> tuple[int, dict]:
    """(round, {key: Broadcast}) from a train message; keys sharing an adapter share one state dict."""
    cfg = content.config_records["config"]
    hooks = json.loads(cfg["hooks"])
    states = {}
    for i in set(cfg["adapter_of"]):
        states[i] = from_record(content.array_records[f"adapter.{i}"])
    return int(cfg["round"]), {k: Broadcast(states[i], hooks[k]) for k, i in zip(cfg["keys"], cfg["adapter_of"])}


def encode_result(result: ClientResult) -> RecordDict:
    content = RecordDict({"result": ConfigRecord({
        "keys": [u.key for u in result.uploads], "num_examples": [int(u.num_examples) for u in result.uploads],
        "tokens": int(result.tokens), "failed": bool(result.failed), "records": json.dumps(result.records)})})
    for u in result.uploads:
        content[f"adapter.{u.key}"] = to_record(u.state)
        if u.extras:
            content[f"extras.{u.key}"] = to_record(u.extras)
    return content


def decode_result(content: RecordDict) -> tuple[ClientResult, int]:
    """(the client's result, bytes of the adapter and extras records it sent)."""
    cfg = content.config_records["result"]
    arrays = content.array_records
    result = ClientResult(json.loads(cfg["records"]), [], int(cfg["tokens"]), bool(cfg["failed"]))
    for key, n in zip(cfg["keys"], cfg["num_examples"]):
        extras = from_record(arrays[f"extras.{key}"]) if f"extras.{key}" in arrays else {}
        result.uploads.append(Upload(key, from_record(arrays[f"adapter.{key}"]), int(n), extras))
    return result, sum(rec.count_bytes() for rec in arrays.values())


# ---- server side -------------------------------------------------------------------------------------

class FlowerEngine(InProcessEngine):
    """The in-process engine with its clients behind a Flower ``Grid`` (simulation or deployment).

    Parameters
    ----------
    cfg : RunConfig
        As for the in-process engine; ``partition.n_clients`` nodes must be connected.
    grid : flwr.serverapp.Grid
        The grid the ServerApp was handed.
    node_wait_s : float
        How long to wait for ``n_clients`` nodes to connect and answer the query.
    """

    offers_secure_aggregation = True  # its transport runs Flower's SecAgg+ (flower_secagg)

    def __init__(self, cfg: RunConfig, grid: Grid, node_wait_s: float = 300.0, **kwargs):
        super().__init__(cfg, **kwargs)
        refuse_unsupported(cfg)
        self.grid = grid
        self.node_wait_s = node_wait_s
        self.node_of: dict[int, int] = {}      # partition id (client) -> Flower node id
        self.reported: dict[int, dict] = {}    # client -> {key: num_examples}, as the node reported it

    def run(self) -> dict:
        self.discover()
        return super().run()

    def discover(self) -> None:
        """Wait for the nodes, send each the run config, learn which partition (client) each one holds."""
        n = self.cfg.partition.n_clients
        deadline = time.monotonic() + self.node_wait_s
        ids = sorted(self.grid.get_node_ids())
        while len(ids) < n and time.monotonic() < deadline:
            time.sleep(0.5)
            ids = sorted(self.grid.get_node_ids())
        if len(ids) < n:
            raise RunError(f"only {len(ids)} Flower node(s) connected within {self.node_wait_s:g} s; "
                           f"partition.n_clients = {n} are needed")
        run_config = json.dumps(self.cfg.to_dict())
        msgs = [Message(RecordDict({"config": ConfigRecord({"run_config": run_config})}), dst_node_id=i,
                        message_type="query") for i in ids]
        replies = list(self.grid.send_and_receive(msgs, timeout=self.node_wait_s))
        node_of_msg = {m.metadata.message_id: m.metadata.dst_node_id for m in msgs}
        for rep in replies:
            if rep.has_error():
                raise RunError(f"a node failed the setup query: flower error {rep.error.code}: "
                               f"{rep.error.reason.strip().splitlines()[-1] if rep.error.reason else ''}")
            node = rep.content.config_records["node"]
            pid = int(node["partition_id"])
            if pid in self.node_of:
                raise RunError(f"two Flower nodes hold partition-id {pid}")
            self.node_of[pid] = node_of_msg[rep.metadata.reply_to_message_id]
            self.reported[pid] = dict(zip(node["keys"], node["num_examples"]))
        missing = sorted(set(range(n)) - set(self.node_of))
        if missing:
            raise RunError(f"no Flower node answered for partition-id(s) {missing} (of num-partitions = {n})")
        self.log(f"[fltac] flower: {n} node(s) connected: " +
                 ", ".join(f"client {c} -> node {self.node_of[c]}" for c in sorted(self.node_of)))

    def check_reported(self, client: int, cjobs: list) -> None:
        """Stop the run when ``client``'s node reported other adapters or sample counts than the server planned."""
        planned = {j.key: j.num_examples for j in cjobs}
        if any(self.reported[client].get(k) != v for k, v in planned.items()):
            raise RunError(f"client {client}'s node holds other data than the server planned "
                           f"({self.reported[client]} vs {planned}): do all machines have the same task files?")

    def make_transport(self, exp) -> "FlowerTransport | SecAggTransport":
        if self.cfg.secure_aggregation.enabled:
            return SecAggTransport(self, reply_limit(self.cfg))
        return FlowerTransport(self)


def reply_limit(cfg: RunConfig) -> float | None:
    """Seconds a train exchange waits for replies: ``reliability.client_timeout_s`` + :data:`TRANSPORT_SLACK_S`."""
    timeout = cfg.reliability.client_timeout_s
    return None if timeout is None else timeout + TRANSPORT_SLACK_S


class FlowerTransport:
    """The round's broadcasts as one Flower ``train`` message per sampled client; replies decoded as results.

    A client whose node reported other data than the server planned stops the run; one whose reply is an
    error ('crash') or does not come within ``reliability.client_timeout_s`` + :data:`TRANSPORT_SLACK_S`
    ('timeout') is dropped for the round: its result holds one 'dropped' line per adapter.
    """

    def __init__(self, engine: FlowerEngine):
        self.engine = engine

    def exchange(self, round_, jobs_of, broadcasts, bar) -> Delivery:
        eng, r = self.engine, round_
        msgs, down = {}, 0
        for client, cjobs in jobs_of.items():
            eng.check_reported(client, cjobs)
            content, sizes = encode_broadcasts(r, broadcasts[client])
            down += sum(sizes.values())
            msgs[client] = Message(content, dst_node_id=eng.node_of[client], message_type="train")
        limit = reply_limit(eng.cfg)
        replies = list(eng.grid.send_and_receive(list(msgs.values()), timeout=limit))
        client_of = {m.metadata.message_id: c for c, m in msgs.items()}  # error replies come from the SuperLink
        got = {client_of[rep.metadata.reply_to_message_id]: rep for rep in replies
               if rep.metadata.reply_to_message_id in client_of}
        results, up = {}, 0
        for client, cjobs in jobs_of.items():
            rep = got.get(client)
            if rep is None or rep.has_error():
                if rep is None:
                    kind, reason = "timeout", f"timeout: no reply from node {eng.node_of[client]} within {limit:g} s"
                else:
                    last = rep.error.reason.strip().splitlines()[-1] if rep.error.reason else ""
                    kind, reason = "crash", f"crash: flower error {rep.error.code}: {last}"
                bar.step(sum(j.steps for j in cjobs), note=f"client {client} dropped")
                results[client] = dropped_result(r, client, cjobs, kind, reason)
                continue
            results[client], wire = decode_result(rep.content)
            up += wire
            bar.step(sum(j.steps for j in cjobs), note=f"client {client}")
        return Delivery(results, down, up)


def refuse_unsupported(cfg: RunConfig) -> None:
    """Stop a run whose method the registry does not allow on Flower (before any node is started)."""
    problem = method_of(cfg.method).engine_problem("flower")
    if problem:
        raise RunError(problem)


def make_server_app(cfg: RunConfig, outcome: dict | None = None, **engine_kwargs) -> ServerApp:
    """A ServerApp running ``cfg`` (for ``run_simulation``); the summary or the error goes into ``outcome``."""
    app = ServerApp()
    outcome = outcome if outcome is not None else {}

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            outcome["summary"] = FlowerEngine(cfg, grid, **engine_kwargs).run()
        except Exception as exc:  # noqa: BLE001  (handed back to the caller of run_simulation, which re-raises it)
            outcome["error"] = exc

    return app


#: The ServerApp ``flwr run`` starts (see flower_app/pyproject.toml). Run config keys: ``config`` (a YAML
#: path on the server's machine, '' = defaults), ``overrides`` (JSON object of dotted keys), ``overwrite``,
#: ``resume`` (booleans).
server_app = ServerApp()


@server_app.main()
def _server_main(grid: Grid, context: Context) -> None:
    rc = context.run_config
    cfg = load_config(str(rc.get("config", "")) or None, json.loads(str(rc.get("overrides", "{}"))))
    FlowerEngine(cfg, grid, overwrite=bool(rc.get("overwrite", False)), resume=bool(rc.get("resume", False))).run()


# ---- client side -------------------------------------------------------------------------------------

client_app = ClientApp()
#: One built client side per process: {(config JSON, partition id): ClientSide}. Only a speed-up: in
#: simulation one Ray actor serves many nodes (they share the backbone, as in-process clients do); in a
#: deployment every message runs in a fresh process and the side is rebuilt from the config each time.
_SIDES: dict = {}


def _client_side(run_config: str, pid: int):
    from fltac.experiment import build_client

    if (run_config, pid) not in _SIDES:
        shared = next((s for (rc, _), s in _SIDES.items() if rc == run_config), None)
        if shared is None:
            _SIDES.clear()  # a new run: drop the previous run's models
        _SIDES[(run_config, pid)] = build_client(from_dict(json.loads(run_config)), pid,
                                                 None if shared is None else (shared.model, shared.tokenizer),
                                                 None if shared is None else shared.tasks)
    return _SIDES[(run_config, pid)]


def _partition_id(context: Context, cfg: RunConfig) -> int:
    nc = context.node_config
    if "partition-id" not in nc or "num-partitions" not in nc:
        raise RuntimeError("the SuperNode needs --node-config \"partition-id=<i> num-partitions=<n>\"")
    pid, n = int(nc["partition-id"]), int(nc["num-partitions"])
    if n != cfg.partition.n_clients or not 0 <= pid < n:
        raise RuntimeError(f"node-config partition-id={pid} num-partitions={n} does not fit the run's "
                           f"partition.n_clients = {cfg.partition.n_clients}")
    return pid


@client_app.query()
def _client_query(msg: Message, context: Context) -> Message:
    run_config = str(msg.content.config_records["config"]["run_config"])
    cfg = from_dict(json.loads(run_config))
    pid = _partition_id(context, cfg)
    context.state["fltac"] = ConfigRecord({"run_config": run_config})
    side = _client_side(run_config, pid)
    node = ConfigRecord({"partition_id": pid, "keys": [j.key for j in side.jobs],
                         "num_examples": [j.num_examples for j in side.jobs]})
    return Message(RecordDict({"node": node}), reply_to=msg)


@client_app.train(mods=[secagg_when_asked])
def _client_train(msg: Message, context: Context) -> Message:
    if "fltac" not in context.state.config_records:
        raise RuntimeError("this node has no run config: it missed the run's setup query (restarted node?)")
    run_config = str(context.state.config_records["fltac"]["run_config"])
    cfg = from_dict(json.loads(run_config))
    side = _client_side(run_config, _partition_id(context, cfg))
    if is_secagg(msg):  # SecAgg+'s masked-vector stage: the mod masks what this returns
        return secagg_train(msg, cfg, side)
    r, broadcasts = decode_broadcasts(msg.content)
    jobs = {j.key: j for j in side.jobs}
    unknown = sorted(set(broadcasts) - set(jobs))
    if unknown:
        raise RuntimeError(f"the server sent adapter key(s) {unknown} this client does not hold")
    result = train_client(side.model, side.train_store, cfg, r, side.client, [jobs[k] for k in broadcasts],
                          broadcasts, side.task_names)
    return Message(encode_result(result), reply_to=msg)


# ---- simulation entry point ----------------------------------------------------------------------------

#: Environment that keeps the simulation's Ray on 127.0.0.1, set before Ray is imported. Ray 2.x takes the
#: node address from a UDP "connect" to 8.8.8.8:53 (the interface of the default route) and binds its GCS,
#: raylet and workers on all interfaces, even with ``_node_ip_address="127.0.0.1"`` (that address is itself
#: rewritten to the routable one). ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` turns off Ray's multi-node mode
#: (the default on Windows and macOS): the node address is then 127.0.0.1 and every port binds there
#: (measured on Ray 2.55: GCS, raylet, workers and the runtime-env agent all on 127.0.0.1). Usage reporting
#: off: it would query the cloud metadata address and send a report.
RAY_LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
#: ``ray.init`` arguments beside ``num_cpus``: the node on 127.0.0.1, no dashboard.
RAY_INIT_ARGS = {"_node_ip_address": "127.0.0.1", "include_dashboard": False}


def keep_ray_on_loopback() -> None:
    """Set :data:`RAY_LOOPBACK_ENV` (a simulation is single-machine: nothing of Ray needs another address);
    if Ray was already imported in this process, also set the flag it read at import."""
    os.environ.update(RAY_LOOPBACK_ENV)
    constants = sys.modules.get("ray._private.ray_constants")
    if constants is not None:
        constants.ENABLE_RAY_CLUSTER = False


# ---- the simulation ----------------------------------------------------------------------------

def run_simulation(cfg: RunConfig, resume: bool = False, overwrite: bool = False, quiet: bool = False,
                   log: tuple[str, ...] = (), num_cpus: int | None = None) -> dict:
    """Run ``cfg`` on Flower's simulation runtime (Ray): one virtual SuperNode per client.

    ``num_cpus``: CPUs given to each ClientApp actor (default: all of them, i.e. one actor, which trains
    clients one after another as the in-process engine does).
    """
    refuse_unsupported(cfg)
    InProcessEngine(cfg, resume=resume, overwrite=overwrite, quiet=True).check_output()  # before Ray starts
    for k, v in FLOWER_ENV.items():
        os.environ.setdefault(k, v)
    keep_ray_on_loopback()
    from flwr.simulation import run_simulation as flwr_run_simulation

    cpus = os.cpu_count() or 1
    per_actor = num_cpus or cpus
    outcome: dict = {}
    app = make_server_app(cfg, outcome, resume=resume, overwrite=overwrite, quiet=quiet, log=log)
    flwr_run_simulation(server_app=app, client_app=client_app, num_supernodes=cfg.partition.n_clients,
                        backend_config={"client_resources": {"num_cpus": per_actor, "num_gpus": 0.0},
                                        "init_args": {"num_cpus": cpus, **RAY_INIT_ARGS}})
    if "error" in outcome:
        raise outcome["error"]
    if "summary" not in outcome:
        raise RunError("the Flower simulation ended without finishing the run (see the log above)")
    return outcome["summary"]
