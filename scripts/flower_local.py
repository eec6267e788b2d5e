#!/usr/bin/env python
"""A local Flower deployment for fltac: one SuperLink and N SuperNodes on 127.0.0.1, then `flwr run`.

    python scripts/flower_local.py --nodes 2 --config configs/text5.yaml \
        --overrides '{"partition.n_clients": 2, "train.rounds": 2, "output_dir": "/abs/results/flower"}'

Each SuperNode gets ``--node-config "partition-id=<i> num-partitions=<N>"`` and loads its own partition;
``--nodes`` must equal the run's ``partition.n_clients``. Every process is started in its own process group
and stopped by that id at the end (SIGTERM, then SIGKILL after a grace period), whatever happened.
Flower state (connections in config.toml, the SuperLink's database, logs) goes under ``--flwr-home``
(default: a fresh temporary folder). Telemetry, update checks and runtime dependency installation are
off. Insecure (plain HTTP on loopback) unless ``--tls``: then a throw-away CA and server certificate are
made with openssl and the SuperLink, the SuperNodes and the CLI use them (see docs/flower.md).

Exit code: that of ``flwr run`` (2 when a process did not come up, 124 on --timeout).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
APP = REPO / "flower_app"
ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
       "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}


def make_certs(folder: Path) -> Path:
    """A throw-away CA and a server certificate for 127.0.0.1/localhost, signed by it (openssl)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n")
    for cmd in (["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-keyout", "ca.key", "-out", "ca.pem",
                 "-subj", "/CN=fltac-local-ca"],
                ["req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr",
                 "-subj", "/CN=localhost"],
                ["x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                 "-days", "2", "-out", "server.pem", "-extfile", "ext.cnf"]):
        subprocess.run(["openssl", *cmd], cwd=folder, check=True, capture_output=True)
    return folder


def wait_healthy(port: int, proc: subprocess.Popen, seconds: float, certs: Path | None = None) -> bool:
    import ssl

    context = ssl.create_default_context(cafile=str(certs / "ca.pem")) if certs else None
    url = f"{'https' if certs else 'http'}://127.0.0.1:{port}/health"
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with urllib.request.urlopen(url, timeout=1, context=context) as resp:
                if resp.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(0.3)
    return False


def stop(procs: list[subprocess.Popen], grace: float = 10.0) -> None:
    """SIGTERM each started process group (nodes before the link), then SIGKILL what is left."""
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + grace
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
        try:  # the group may hold children (superexec, clientapp processes) that outlived the leader
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nodes", type=int, default=2, help="SuperNodes (= partition.n_clients)")
    ap.add_argument("--port", type=int, default=39100, help="SuperLink port; SuperNode i uses port + 11 + i")
    ap.add_argument("--config", default="", help="fltac YAML config (read by the ServerApp)")
    ap.add_argument("--overrides", default="{}", help="JSON object of dotted config keys")
    ap.add_argument("--overwrite", action="store_true", help="replace a run already in output_dir")
    ap.add_argument("--flwr-home", help="Flower's state folder (default: a new temporary one)")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds before everything is stopped")
    ap.add_argument("--tls", action="store_true", help="TLS: make a CA and a server certificate for 127.0.0.1 "
                                                       "with openssl (in FLWR_HOME/certs) and use them")
    args = ap.parse_args(argv)

    home = Path(args.flwr_home or tempfile.mkdtemp(prefix="fltac-flwr-"))
    home.mkdir(parents=True, exist_ok=True)
    certs = make_certs(home / "certs") if args.tls else None
    security = f'root-certificates = "{certs / "ca.pem"}"' if certs else "insecure = true"
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "fltac-local"\n\n[superlink.fltac-local]\n'
        f'address = "127.0.0.1:{args.port}"\n{security}\n')
    link_security = (["--ssl-certfile", str(certs / "server.pem"), "--ssl-keyfile", str(certs / "server.key"),
                      "--ssl-ca-certfile", str(certs / "ca.pem")] if certs else ["--insecure"])
    node_security = ["--root-certificates", str(certs / "ca.pem")] if certs else ["--insecure"]
    bindir = str(Path(sys.executable).parent)
    env = {**os.environ, **ENV, "FLWR_HOME": str(home), "PATH": bindir + os.pathsep + os.environ.get("PATH", "")}
    config = str(Path(args.config).resolve()) if args.config else ""
    json.loads(args.overrides)  # fail here, not inside the ServerApp

    logs = home / "logs"
    logs.mkdir(exist_ok=True)
    procs: list[subprocess.Popen] = []

    def start(name: str, cmd: list[str]) -> subprocess.Popen:
        out = open(logs / f"{name}.log", "w")
        p = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        procs.insert(0, p)  # stopped in reverse start order
        return p

    t0 = time.monotonic()
    try:
        link = start("superlink", [f"{bindir}/flower-superlink", *link_security, "--host", "127.0.0.1",
                                   "--port", str(args.port), "--database", str(home / "state.db"),
                                   "--disable-runtime-dependency-installation"])
        if not wait_healthy(args.port, link, 120, certs):
            print(f"flower_local: the SuperLink did not come up; see {logs / 'superlink.log'}", file=sys.stderr)
            return 2
        for i in range(args.nodes):
            start(f"supernode{i}", [f"{bindir}/flower-supernode", *node_security, "--superlink",
                                    f"127.0.0.1:{args.port}", "--node-config",
                                    f"partition-id={i} num-partitions={args.nodes}", "--port",
                                    str(args.port + 11 + i)])
        run_config = (f"config='{config}' overrides='{args.overrides}' "
                      f"overwrite={'true' if args.overwrite else 'false'}")
        print(f"flower_local: SuperLink on 127.0.0.1:{args.port}, {args.nodes} SuperNode(s); FLWR_HOME={home}",
              flush=True)
        left = args.timeout - (time.monotonic() - t0)
        try:
            return subprocess.run([f"{bindir}/flwr", "run", str(APP), "fltac-local", "--stream", "-c", run_config],
                                  env=env, timeout=max(left, 1.0)).returncode
        except subprocess.TimeoutExpired:
            print(f"flower_local: stopped after --timeout {args.timeout:g} s", file=sys.stderr)
            return 124
    finally:
        stop(procs)


if __name__ == "__main__":
    raise SystemExit(main())
