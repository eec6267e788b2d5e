"""The Flower engine: message codec, in-process vs Flower simulation equivalence, a real local deployment.

Everything that starts Ray or a SuperLink/SuperNodes runs in a fresh network namespace that has only
loopback (``unshare -n``; root only), so no connection can leave 127.0.0.1; the tests check that with
``ss -tn`` while the run is going. Select them with ``pytest -m flower``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import yaml
from conftest import tiny_config_overrides

from fltac.config import load_config, set_dotted
from fltac.engines.inprocess import run
from fltac.models.backbone import bf16_support

pytestmark = pytest.mark.flower

REPO = Path(__file__).resolve().parents[1]
NETNS = os.geteuid() == 0 and shutil.which("unshare") is not None and shutil.which("ip") is not None
needs_netns = pytest.mark.skipif(not NETNS, reason="needs root and unshare/ip to keep Flower on loopback")
BF16 = bf16_support(torch.device("cpu"))[0]
needs_bf16 = pytest.mark.skipif(not BF16, reason="the CPU reports no bf16 units (AMX / AVX512-BF16)")
FLOWER_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
              "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}


def _overrides(tiny_bert, csv_scenario, out, **extra) -> dict:
    return {**tiny_config_overrides(tiny_bert, out), "method": "fltac", "data.scenario": "custom",
            "data.custom_tasks": csv_scenario["tasks"], **extra}


def _write_config(path: Path, overrides: dict) -> Path:
    nested: dict = {}
    for key, value in overrides.items():
        set_dotted(nested, key, value)
    path.write_text(yaml.safe_dump(nested))
    return path


def in_loopback_netns(command: str, scratch: Path, timeout: float, setup: str = "") -> subprocess.CompletedProcess:
    """Run ``command`` (bash) in a new network namespace with only ``lo`` up (then ``setup``); sample
    ``ss -tn`` (established, into ss.txt) and ``ss -ltnup`` (listening, into listen.txt) every 0.5 s
    until it ends."""
    script = (f"ip link set lo up; {setup + ';' if setup else ''} (while true; do "
              f"ss -tn state established >> {scratch}/ss.txt; ss -Hltnup >> {scratch}/listen.txt; sleep 0.5; done) "
              f"& SAMPLER=$!; {command}; rc=$?; kill $SAMPLER 2>/dev/null; exit $rc")
    ray_tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths have a length limit
    env = {**os.environ, **FLOWER_ENV, "FLWR_HOME": str(scratch / "flwr_home"), "RAY_TMPDIR": ray_tmp,
           "PYTHONPATH": str(REPO / "src")}
    try:
        return subprocess.run(["unshare", "-n", "bash", "-c", script], env=env, capture_output=True, text=True,
                              timeout=timeout, cwd=REPO, check=False)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


def only_loopback(ss_file: Path) -> list[str]:
    """Established connections in the sample whose addresses are not on 127.0.0.0/8 (expected: none)."""
    bad, lines = [], ss_file.read_text().splitlines() if ss_file.exists() else []
    for line in lines:
        fields = line.split()
        if len(fields) >= 4 and fields[0] != "Recv-Q":
            addrs = fields[-2:]
            if not all(a.startswith(("127.", "[::1]", "[::ffff:127.")) for a in addrs):
                bad.append(line)
    return bad


def not_loopback_listeners(listen_file: Path) -> tuple[list[str], set[str]]:
    """(sampled listening sockets whose local address is not on 127.0.0.0/8 or ::1, the processes seen listening)."""
    bad, processes = [], set()
    for line in listen_file.read_text().splitlines() if listen_file.exists() else []:
        fields = line.split()
        if len(fields) < 5:
            continue
        processes.update(p.split('"')[1] for p in line.split("((")[1:] if '"' in p)
        if not fields[4].startswith(("127.", "[::1]", "[::ffff:127.")):
            bad.append(line)
    return bad, processes


# ---- codec (no Ray) ------------------------------------------------------------------------------------

def test_codec_roundtrip_shares_cluster_adapters():
    from fltac.engines.flower import (
        decode_broadcasts,
        decode_result,
        encode_broadcasts,
        encode_result,
    )
    from fltac.client.round import ClientResult
    from fltac.wire import Broadcast, Upload

    slot0 = {"q.lora_A": torch.randn(2, 4), "q.lora_B": torch.randn(4, 2)}
    slot1 = {"q.lora_A": torch.randn(2, 4), "q.lora_B": torch.randn(4, 2)}
    sent = {"a0": Broadcast(slot0), "a1": Broadcast(slot1, {"proximal_mu": 0.1}), "a2": Broadcast(slot0)}
    content, sizes = encode_broadcasts(3, sent)
    assert sorted(content.array_records) == ["adapter.0", "adapter.1"]  # a0 and a2 share their cluster's adapter
    assert len(sizes) == 2 and all(s >= 2 * 8 * 4 for s in sizes.values())
    r, got = decode_broadcasts(content)
    assert r == 3 and list(got) == ["a0", "a1", "a2"] and got["a1"].config == {"proximal_mu": 0.1}
    for key in sent:
        assert all(torch.equal(got[key].state[k], sent[key].state[k]) for k in slot0)

    up = ClientResult([{"phase": "local", "round": 3, "loss": 0.5}], [
        Upload("a0", slot0, 7), Upload("a1", slot1, 5, {"q.idx": torch.tensor([0, 1], dtype=torch.int32)})], 99)
    back, wire = decode_result(encode_result(up))
    assert back.records == up.records and back.tokens == 99 and not back.failed
    assert [(u.key, u.num_examples) for u in back.uploads] == [("a0", 7), ("a1", 5)]
    assert torch.equal(back.uploads[1].state["q.lora_A"], slot1["q.lora_A"])
    assert back.uploads[1].extras["q.idx"].dtype == torch.int32 and back.uploads[0].extras == {}
    assert wire >= 2 * 2 * 8 * 4 + 8


# ---- simulation vs in-process ----------------------------------------------------------------------------

def _same_adapter_files(a: Path, b: Path) -> None:
    """Every adapter file of run ``a`` (global adapters per round, FL-TAC's submissions) is byte-identical in ``b``."""
    names = sorted(f.name for f in (a / "adapters").glob("*.safetensors"))
    assert names and names == sorted(f.name for f in (b / "adapters").glob("*.safetensors"))
    for name in names:
        assert (a / "adapters" / name).read_bytes() == (b / "adapters" / name).read_bytes(), name


@needs_netns
@pytest.mark.parametrize("dtype", ["float32", pytest.param("bfloat16", marks=needs_bf16)])
def test_flower_sim_matches_inprocess(dtype, tiny_bert, csv_scenario, tmp_path):
    """Ray simulation vs the in-process engine (all clients in shared passes), at the default layout
    (``train.batching: routed``): the same adapters, byte for byte, in fp32 and in bf16."""
    ref_out, sim_out = tmp_path / "inprocess", tmp_path / "flower"
    ref = run(load_config(None, _overrides(tiny_bert, csv_scenario, ref_out, dtype=dtype)), quiet=True)
    config = _write_config(tmp_path / "tiny.yaml", _overrides(tiny_bert, csv_scenario, sim_out, dtype=dtype))
    proc = in_loopback_netns(f"{sys.executable} -m fltac run --config {config} --engine flower-sim --quiet",
                             tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert not only_loopback(tmp_path / "ss.txt")

    sim = json.loads((sim_out / "summary.json").read_text())
    assert sim["tasks"] == ref["tasks"]
    for task, acc in ref["per_task_accuracy"].items():
        assert sim["per_task_accuracy"][task] == pytest.approx(acc, abs=1e-6)
        assert sim["personalized_accuracy"][task] == pytest.approx(ref["personalized_accuracy"][task], abs=1e-6)
    ref_clusters = [json.loads(line) for line in (ref_out / "cluster_assignments.jsonl").read_text().splitlines()]
    sim_clusters = [json.loads(line) for line in (sim_out / "cluster_assignments.jsonl").read_text().splitlines()]
    assert [c["assignments"] for c in sim_clusters] == [c["assignments"] for c in ref_clusters]

    ref_lines = [json.loads(line) for line in (ref_out / "metrics.jsonl").read_text().splitlines()]
    sim_lines = [json.loads(line) for line in (sim_out / "metrics.jsonl").read_text().splitlines()]
    assert [(m["phase"], m["round"]) for m in sim_lines] == [(m["phase"], m["round"]) for m in ref_lines]
    for a, b in zip(ref_lines, sim_lines):
        if a["phase"] == "local":
            assert (a["client"], a["key"], a["task"], a["step"]) == (b["client"], b["key"], b["task"], b["step"])
            assert b["loss"] == pytest.approx(a["loss"], abs=1e-4)
    rounds = [m for m in sim_lines if m["phase"] == "round"]
    assert all(m["uplink_bytes"] > 0 and m["downlink_bytes"] > 0 and m["dropped"] == 0 for m in rounds)
    assert sim["uplink_bytes"] == sum(m["uplink_bytes"] for m in rounds)
    _same_adapter_files(ref_out, sim_out)


@needs_netns
def test_flower_sim_keeps_ray_on_loopback(tiny_bert, csv_scenario, tmp_path):
    """Ray binds only 127.0.0.1 although the host has a routable address and a default route.

    The namespace stands for a host with a routable interface: 192.0.2.10 (TEST-NET-1) on its loopback
    device with the default route through it, so Ray's own address probe (a UDP connect to 8.8.8.8)
    answers 192.0.2.10, and without fltac's settings Ray listens there and on all addresses. Every
    packet stays inside the namespace. Every listening socket sampled during the run must be on loopback.
    """
    config = _write_config(tmp_path / "tiny.yaml", _overrides(tiny_bert, csv_scenario, tmp_path / "flower"))
    routable = "ip addr add 192.0.2.10/24 dev lo && ip route add default dev lo"
    # RAY_memory_monitor_refresh_ms=0: on a shared test machine Ray's out-of-memory killer measures the whole
    # machine and may kill this tiny run's actor for others' memory; the test is about sockets
    proc = in_loopback_netns(f"RAY_memory_monitor_refresh_ms=0 {sys.executable} -m fltac run --config {config} "
                             f"--engine flower-sim --quiet", tmp_path, timeout=600, setup=routable)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    bad, processes = not_loopback_listeners(tmp_path / "listen.txt")
    assert {"gcs_server", "raylet"} <= processes, processes  # the sample saw Ray running
    assert not bad, bad
    assert not only_loopback(tmp_path / "ss.txt")


# ---- a real local deployment -----------------------------------------------------------------------------

@needs_netns
def test_local_deployment_runs_two_fltac_rounds(tiny_bert, csv_scenario, tmp_path):
    """SuperLink + two SuperNodes on 127.0.0.1 (scripts/flower_local.py), two FL-TAC rounds via `flwr run`."""
    out = tmp_path / "deployed"
    overrides = json.dumps({**_overrides(tiny_bert, csv_scenario, out), "train.rounds": 2})
    cmd = (f"{sys.executable} {REPO / 'scripts' / 'flower_local.py'} --nodes 2 --port 39100 --timeout 420 "
           f"--flwr-home {tmp_path / 'flwr_home'} --overrides '{overrides}'")
    proc = in_loopback_netns(cmd, tmp_path, timeout=480)
    logs = "".join(p.read_text()[-2000:] for p in sorted((tmp_path / "flwr_home" / "logs").glob("*.log")))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:] + logs
    assert (out / "summary.json").exists(), proc.stdout[-3000:] + logs
    assert not only_loopback(tmp_path / "ss.txt")

    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == 2 and summary["uplink_bytes"] > 0 and summary["downlink_bytes"] > 0
    clusters = [json.loads(line) for line in (out / "cluster_assignments.jsonl").read_text().splitlines()]
    assert [c["round"] for c in clusters] == [1, 2]
    assert {a["client"] for a in clusters[-1]["assignments"]} == {0, 1}  # both nodes' adapters came back
    rounds = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["round"] for m in rounds if m["phase"] == "round"] == [1, 2]


# ---- failed nodes (a scripted Grid, the real ClientApp, no Ray) -------------------------------------------

class ScriptedGrid:
    """A Grid that delivers each message to the real ClientApp in this process, except where ``fail`` says:
    ``{(round, client): 'error' | 'silent'}`` (an error reply from the SuperLink, or no reply at all). In a SecAgg+
    round the failure hits the stage that trains (collect masked vectors), after the keys were shared."""

    def __init__(self, n: int, fail: dict):
        from flwr.app import Context, RecordDict

        self.fail, self.sent = fail, 0
        self.nodes = {1000 + i: Context(run_id=1, node_id=1000 + i, state=RecordDict(), run_config={},
                                        node_config={"partition-id": i, "num-partitions": n}) for i in range(n)}

    def get_node_ids(self):
        return list(self.nodes)

    def send_and_receive(self, messages, *, timeout=None):
        from flwr.app import Error, Message

        from fltac.engines.flower import client_app

        replies = []
        for m in messages:
            self.sent += 1
            m.metadata.__dict__["_message_id"] = f"msg{self.sent}"  # the SuperLink sets it on push
            ctx = self.nodes[m.metadata.dst_node_id]
            what = None
            secagg = m.content.config_records.get("secaggplus_configs")
            if m.metadata.message_type == "train" and secagg is None:
                r = int(m.content.config_records["config"]["round"])
                what = self.fail.get((r, int(ctx.node_config["partition-id"])))
            elif m.metadata.message_type == "train" and secagg.get("stage") == "collect_masked_vectors":
                what = self.fail.get((int(m.metadata.group_id), int(ctx.node_config["partition-id"])))
            if what == "silent":
                continue
            replies.append(Message(Error(code=5, reason="node unavailable"), reply_to=m) if what == "error"
                           else client_app(m if secagg is None else over_the_wire(m), ctx))
        return replies


def over_the_wire(message):
    """The message as a node receives it: through Flower's protobuf codec, so the node gets its own copy (SecAgg+
    sends one content object to every node, and secaggplus_mod edits what it receives in place)."""
    from flwr.common.serde import message_from_proto, message_to_proto

    return message_from_proto(message_to_proto(message))


@pytest.fixture
def task_identity():
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1  # set in a running ServerApp
    yield
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = None, None, None


def test_failed_and_silent_nodes_are_dropped_and_logged(tiny_bert, csv_scenario, tmp_path, task_identity):
    from fltac.engines.flower import FlowerEngine

    cfg = load_config(None, _overrides(tiny_bert, csv_scenario, tmp_path / "run", **{
        "train.rounds": 3, "reliability.client_timeout_s": 30.0}))
    grid = ScriptedGrid(2, {(1, 1): "error", (2, 1): "silent"})
    summary = FlowerEngine(cfg, grid, quiet=True).run()
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    dropped = [m for m in lines if m["phase"] == "dropped"]
    assert {(m["round"], m["client"], m["kind"]) for m in dropped} == {(1, 1, "crash"), (2, 1, "timeout")}
    assert all("flower error 5" in m["reason"] for m in dropped if m["round"] == 1)
    rounds = {m["round"]: m for m in lines if m["phase"] == "round"}
    assert rounds[1]["accepted"] < rounds[3]["accepted"] and rounds[3]["dropped"] == 0
    assert summary["rounds"] == 3 and summary["dropped_submissions"] == rounds[1]["dropped"] + rounds[2]["dropped"]
    # the run config reached each node once, in the setup query, and stays in its context.state
    assert all("fltac" in ctx.state.config_records for ctx in grid.nodes.values())


def test_too_few_clients_stops_the_flower_run(tiny_bert, csv_scenario, tmp_path, task_identity):
    from fltac.engines.flower import FlowerEngine
    from fltac.engines.inprocess import TooFewClients

    cfg = load_config(None, _overrides(tiny_bert, csv_scenario, tmp_path / "run", **{
        "reliability.min_clients_per_round": 2}))
    with pytest.raises(TooFewClients, match="round 1: only 1 of 2"):
        FlowerEngine(cfg, ScriptedGrid(2, {(1, 0): "error"}), quiet=True).run()


@pytest.mark.parametrize("method", ["fltac", "fedit", "hafl", "hetlora", "flexlora", "flora", "safedlora",
                                    "fedavg_full"])
def test_every_method_gives_the_inprocess_result_through_flower_messages(method, tiny_bert, csv_scenario, tmp_path,
                                                                         task_identity):
    """Each method's broadcasts and submissions survive the Message layout: same adapters, same accuracies."""
    from safetensors.torch import load_file

    from fltac.engines.flower import FlowerEngine

    # one adapter per pass in both: Flower clients train one by one, and this test is about the Message layer
    extra = {"method": method, "train.rounds": 2, "num_threads": 1, "train.adapters_per_pass": 1}
    if method == "safedlora":  # one initiating round, then one annealing round
        extra.update({"safedlora.rank_init": 4, "safedlora.target_rank": 1, "safedlora.cool_rounds": 0})
    ref = run(load_config(None, _overrides(tiny_bert, csv_scenario, tmp_path / "ref", **extra)), quiet=True)
    cfg = load_config(None, _overrides(tiny_bert, csv_scenario, tmp_path / "flower", **extra))
    got = FlowerEngine(cfg, ScriptedGrid(2, {}), quiet=True).run()
    for task, acc in ref["per_task_accuracy"].items():
        assert got["per_task_accuracy"][task] == pytest.approx(acc, abs=1e-6)
    a, b = (load_file(tmp_path / d / "adapters" / "round_2.safetensors") for d in ("ref", "flower"))
    assert sorted(a) == sorted(b)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5)
    assert got["uplink_bytes"] >= ref["uplink_bytes"] > 0  # wire bytes: the tensors plus their names


@pytest.mark.parametrize("method", ["fltac", "fedit"])
def test_ffa_lora_and_fedprox_give_the_inprocess_result_through_flower_messages(method, tiny_bert, csv_scenario,
                                                                               tmp_path, task_identity):
    """``lora.freeze_A`` and ``train.prox_mu`` reach Flower clients in the run config (no broadcast): the
    uploads without lora_A decode, the server puts A back, and every adapter file is the in-process run's,
    byte for byte (fp32, routed: each Flower client alone gives the bytes it gets in the shared passes)."""
    from fltac.engines.flower import FlowerEngine

    extra = {"method": method, "lora.freeze_A": True, "train.prox_mu": 0.01}
    ref = run(load_config(None, _overrides(tiny_bert, csv_scenario, tmp_path / "ref", **extra)), quiet=True)
    cfg = load_config(None, _overrides(tiny_bert, csv_scenario, tmp_path / "flower", **extra))
    got = FlowerEngine(cfg, ScriptedGrid(2, {}), quiet=True).run()
    _same_adapter_files(tmp_path / "ref", tmp_path / "flower")
    assert got["uplink_bytes"] >= ref["uplink_bytes"] > 0


@pytest.mark.parametrize("method, rule, optimizer", [("fltac", "geometric_median", "fedadam"),
                                                     ("fedit", "multi_krum", "fedavgm")])
def test_server_rules_and_optimizers_give_the_inprocess_result_through_flower_messages(
        method, rule, optimizer, tiny_bert, csv_scenario, tmp_path, task_identity):
    """A robust rule and a server optimizer live in the strategy, which knows no engine: through Flower's
    Messages every adapter file is the in-process run's, byte for byte, the optimizer's moments included."""
    from safetensors.torch import load_file

    from fltac.engines.flower import FlowerEngine

    extra = {"method": method, "train.rounds": 2, "reliability.aggregation": rule, "server.optimizer": optimizer}
    run(load_config(None, _overrides(tiny_bert, csv_scenario, tmp_path / "ref", **extra)), quiet=True)
    cfg = load_config(None, _overrides(tiny_bert, csv_scenario, tmp_path / "flower", **extra))
    FlowerEngine(cfg, ScriptedGrid(2, {}), quiet=True).run()
    _same_adapter_files(tmp_path / "ref", tmp_path / "flower")
    ref, got = (load_file(tmp_path / d / "checkpoint" / "round_2.safetensors") for d in ("ref", "flower"))
    moments = sorted(k for k in ref if "server_memory/" in k)
    assert moments and moments == sorted(k for k in got if "server_memory/" in k)
    for k in moments:
        assert torch.equal(got[k], ref[k]), k


def test_local_dp_noise_is_added_by_the_flower_client(tiny_bert, csv_scenario, tmp_path, task_identity):
    """privacy.mode local: the ClientApp's reply already carries the noise (every uploaded entry of B, zero when
    sent in round 1, is off by about sigma C), and the run's adapter files are the in-process run's, byte for byte."""
    from fltac.engines.flower import FlowerEngine, decode_result

    extra = {"method": "fltac", "privacy.mode": "local", "privacy.noise_multiplier": 2.0, "privacy.clip_norm": 0.1}
    run(load_config(None, _overrides(tiny_bert, csv_scenario, tmp_path / "ref", **extra)), quiet=True)
    grid, replies = ScriptedGrid(2, {}), []
    send = grid.send_and_receive

    def recording(messages, *, timeout=None):
        got = send(messages, timeout=timeout)
        replies.extend(rep for m, rep in zip(messages, got) if m.metadata.message_type == "train")
        return got

    grid.send_and_receive = recording
    cfg = load_config(None, _overrides(tiny_bert, csv_scenario, tmp_path / "flower", **extra))
    FlowerEngine(cfg, grid, quiet=True).run()
    _same_adapter_files(tmp_path / "ref", tmp_path / "flower")
    round_1 = [decode_result(m.content)[0] for m in replies[:2]]
    entries = torch.cat([u.state[k].flatten() for res in round_1 for u in res.uploads for k in u.state
                         if k.endswith("lora_B.weight")]).double()
    assert float(entries.std()) == pytest.approx(0.2, rel=0.15)


@needs_bf16
@pytest.mark.parametrize("method", ["fltac", "fedit"])
def test_flower_clients_give_the_inprocess_adapters_byte_for_byte_in_bf16(method, tiny_bert, csv_scenario, tmp_path,
                                                                          task_identity):
    """The defaults (routed batches, fast path) on a bf16 backbone: the in-process engine trains every client
    of a round in shared passes, each Flower client (the real ClientApp) its own adapters alone; every
    adapter file is the same bytes. 4 skewed clients, so clients hold different numbers of tasks."""
    tasks = [{k: v for k, v in t.items() if k != "client_column"} for t in csv_scenario["tasks"]]
    from fltac.engines.flower import FlowerEngine

    extra = {"method": method, "dtype": "bfloat16", "data.custom_tasks": tasks, "partition.n_clients": 4,
             "partition.alpha": 0.3}
    run(load_config(None, _overrides(tiny_bert, csv_scenario, tmp_path / "ref", **extra)), quiet=True)
    cfg = load_config(None, _overrides(tiny_bert, csv_scenario, tmp_path / "flower", **extra))
    assert cfg.train.batching == "routed" and cfg.train.adapters_per_pass > 1
    FlowerEngine(cfg, ScriptedGrid(4, {}), quiet=True).run()
    _same_adapter_files(tmp_path / "ref", tmp_path / "flower")


def test_centralized_is_refused_before_flower_starts(tmp_path):
    from fltac.engines.flower import run_simulation
    from fltac.engines.inprocess import RunError

    with pytest.raises(RunError, match="--engine inprocess"):
        run_simulation(load_config(None, {"method": "centralized", "output_dir": str(tmp_path)}))


def test_each_node_builds_exactly_its_share_of_the_inprocess_data(tiny_bert, csv_scenario, tmp_path):
    """A SuperNode's own jobs and tokenised rows equal its share of the in-process experiment (4 clients,
    skewed: some clients hold no row of a task)."""
    from fltac.experiment import build_client, build_experiment

    tasks = [{k: v for k, v in t.items() if k != "client_column"} for t in csv_scenario["tasks"]]
    cfg = load_config(None, {**_overrides(tiny_bert, csv_scenario, tmp_path), "data.custom_tasks": tasks,
                             "partition.n_clients": 4, "partition.alpha": 0.1})
    exp = build_experiment(cfg)
    assert len({j.client for j in exp.jobs if j.key == "a1"}) < 4  # the skew this test is about
    for client in range(4):
        side = build_client(cfg, client)
        mine = [j for j in exp.jobs if j.client == client]
        assert [(j.key, j.tasks, j.steps, j.num_examples) for j in side.jobs] == [
            (j.key, j.tasks, j.steps, j.num_examples) for j in mine]
        for a, b in zip(mine, side.jobs):
            assert (exp.train_store.ids[a.rows] == side.train_store.ids[b.rows]).all()
            assert (exp.train_store.labels[a.rows] == side.train_store.labels[b.rows]).all()


def test_auto_k_with_a_late_task_runs_the_same_through_flower(tiny_bert, csv_scenario, tmp_path, task_identity):
    """``server.n_clusters: auto`` grows the slots and ``data.task_start_round`` withholds a task's jobs on the
    server side only: through Flower messages (the real ClientApp, no Ray) the run gives the in-process run's
    cluster records (K chosen, slots) and adapters, byte for byte."""
    from fltac.engines.flower import FlowerEngine

    extra = {"train.rounds": 3, "server.n_clusters": "auto", "data.task_start_round": {"topics": 2}}
    run(load_config(None, _overrides(tiny_bert, csv_scenario, tmp_path / "inprocess", **extra)), quiet=True)
    cfg = load_config(None, _overrides(tiny_bert, csv_scenario, tmp_path / "flower", **extra))
    FlowerEngine(cfg, ScriptedGrid(2, {}), quiet=True).run()
    records = [(tmp_path / d / "cluster_assignments.jsonl").read_text() for d in ("inprocess", "flower")]
    assert records[0] == records[1]
    assert all("n_clusters" in json.loads(line) for line in records[0].splitlines())
    assert {a["task"] for a in json.loads(records[0].splitlines()[0])["assignments"]} == {"reviews"}
    _same_adapter_files(tmp_path / "inprocess", tmp_path / "flower")
