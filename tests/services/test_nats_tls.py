"""TLS to NATS on real nats-servers with throwaway certificates: a service trusting the CA
(``VOXBUS_NATS_TLS_CA``) connects and does a round trip over TLS; an untrusted certificate, a
missing or refused client certificate, or a server without TLS is one clear line, at once."""

from __future__ import annotations

import datetime
import ipaddress
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.conftest import without_nats_credentials
from voxbus.bus import Bus, NatsTLSError
from voxbus.config import Settings
from voxbus.natsd import NatsServer, NatsTLS, free_port
from voxbus.runner import Service
from voxbus.subjects import Stage, Subjects
from voxbus.wire import Drain, Heartbeat

PREFIX = "tls" + uuid.uuid4().hex[:6]
S = Subjects(PREFIX)


# --- a throwaway PKI --------------------------------------------------------------------------


def _pem(folder: Path, name: str, cert: x509.Certificate, key) -> None:
    (folder / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (folder / f"{name}-key.pem").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))


def _certificate(subject: str, key, issuer: x509.Name | None, issuer_key, *,
                 ca: bool = False, server: bool = False) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (x509.CertificateBuilder().subject_name(name).issuer_name(issuer or name)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(hours=2))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if not ca:
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if server:
        builder = builder.add_extension(x509.SubjectAlternativeName([
            x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _authority(folder: Path, name: str) -> tuple[x509.Certificate, object]:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _certificate(f"voxbus test {name}", key, None, key, ca=True)
    _pem(folder, name, cert, key)
    return cert, key


def _leaf(folder: Path, name: str, ca: tuple, *, server: bool) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    _pem(folder, name, _certificate(name, key, ca[0].subject, ca[1], server=server), key)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> SimpleNamespace:
    """A CA with a server certificate (SAN 127.0.0.1 and localhost) and a client one, and a
    second CA, unrelated, with a client certificate of its own."""
    folder = tmp_path_factory.mktemp("pki")
    ca, other = _authority(folder, "ca"), _authority(folder, "other-ca")
    _leaf(folder, "server", ca, server=True)
    _leaf(folder, "client", ca, server=False)
    _leaf(folder, "stranger", other, server=False)
    return SimpleNamespace(**{name.replace("-", "_"): str(folder / f"{name}.pem") for name in
                              ("ca", "other-ca", "server", "client", "stranger")},
                           key=lambda name: str(folder / f"{name}-key.pem"))


@pytest.fixture(scope="module")
def tls_server(pki):
    with NatsServer(http_port=free_port(), tls=NatsTLS(pki.server, pki.key("server"))) as s:
        yield s


@pytest.fixture(scope="module")
def mtls_server(pki):
    """Mutual TLS: a client certificate signed by the CA, or no connection."""
    with NatsServer(http_port=free_port(), tls=NatsTLS(
            pki.server, pki.key("server"), ca=pki.ca, verify=True)) as s:
        yield s


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    """Only what a test sets: no VOXBUS_NATS_* from outside, no real ``voxbus up`` file."""
    without_nats_credentials(monkeypatch, tmp_path)
    monkeypatch.setenv("VOXBUS_PREFIX", PREFIX)


def tls_env(monkeypatch, server: NatsServer, ca: str = "", cert: str = "",
            key: str = "") -> None:
    """What a deployment sets: the URL and the TLS files, by environment."""
    monkeypatch.setenv("VOXBUS_NATS_URL", server.url)
    for name, value in (("CA", ca), ("CERT", cert), ("KEY", key)):
        if value:
            monkeypatch.setenv(f"VOXBUS_NATS_TLS_{name}", value)


class Probe(Service):
    """The smallest real service: the runner's own control subject answers a ``Drain`` with
    the replica's heartbeat, so one request is a round trip through both ends' TLS."""

    stage = Stage.LLM


async def round_trip(server: NatsServer, service_name: str = "tls-client") -> dict:
    """A Probe service and a client, both configured from the environment, over TLS; the
    server itself says each connection is TLS (``/connz``: returned, by connection name)."""
    probe = await Probe(Settings(heartbeat_s=0.2)).start()
    # start() flushes once; nats-py 2.16 can answer that flush before the server has the SUB
    # (its PING overtakes the queued SUB): a second flush follows it.
    await probe.bus.nc.flush()
    try:
        client = await Bus.connect(server.url, S, service_name, attempts=3)
        try:
            reply = await client.request(S.worker_ctl(probe.worker_id),
                                         Drain(worker=probe.worker_id, reason="tls test"),
                                         timeout=5)
            assert isinstance(reply, Heartbeat) and reply.worker == probe.worker_id, reply
            connz = server.monitor("/connz?auth=true") or {}  # with peer certificates
            seen = {c.get("name"): c for c in connz.get("connections", [])}
            for name in (f"voxbus-{probe.worker_id}", f"voxbus-{service_name}"):
                assert seen.get(name, {}).get("tls_version", "").startswith("1."), seen
            return seen
        finally:
            await client.close()
    finally:
        await probe.stop()


# --- server TLS -------------------------------------------------------------------------------


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
async def test_a_service_trusting_the_ca_connects_and_round_trips(
        tls_server, pki, monkeypatch, host):
    tls_env(monkeypatch, tls_server, ca=pki.ca)
    if host == "localhost":
        monkeypatch.setenv("VOXBUS_NATS_URL", tls_server.url.replace("127.0.0.1", host))
    assert tls_server.url.startswith("tls://")
    await round_trip(tls_server)


@pytest.mark.parametrize("ca, says", [
    ("", "its certificate is not trusted (unable to get local issuer certificate): set "
         "VOXBUS_NATS_TLS_CA to the PEM CA bundle that signed it"),
    ("other_ca", "its certificate is not trusted by the CA in VOXBUS_NATS_TLS_CA ({path}): "
                 "unable to get local issuer certificate"),
])
async def test_an_untrusted_server_certificate_is_one_line_at_once(
        tls_server, pki, monkeypatch, ca, says):
    path = getattr(pki, ca) if ca else ""
    tls_env(monkeypatch, tls_server, ca=path)
    started = time.monotonic()
    with pytest.raises(NatsTLSError) as failed:
        await Bus.connect(tls_server.url, S, "untrusting", attempts=20)
    assert time.monotonic() - started < 5  # a certificate does not change by retrying
    assert str(failed.value) == (f"TLS to NATS at {tls_server.url} failed: "
                                 + says.format(path=path))


def test_the_cli_says_it_in_one_line(tls_server, tmp_path):
    """No CA: one line naming the certificate and the variable to set, no traceback."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("VOXBUS_NATS_")}
    env.update(VOXBUS_PREFIX=PREFIX, VOXBUS_CONTROL_FILE=str(tmp_path / "none.json"))
    r = subprocess.run([sys.executable, "-m", "voxbus.cli", "sessions", "--nats",
                        tls_server.url], capture_output=True, text=True, timeout=60, env=env)
    lines = (r.stdout + r.stderr).splitlines()
    assert r.returncode == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f"voxbus sessions: TLS to NATS at {tls_server.url} failed: its "
                               "certificate is not trusted"), lines
    assert "VOXBUS_NATS_TLS_CA" in lines[0] and "is `voxbus up` running" not in lines[0]


async def test_a_server_without_tls_is_refused_when_tls_is_asked_for(nats_server, pki,
                                                                     monkeypatch):
    """nats-py upgrades only when the server asks; with a CA configured, plaintext is an
    error, not a quiet downgrade."""
    tls_env(monkeypatch, nats_server, ca=pki.ca)
    with pytest.raises(NatsTLSError) as failed:
        await Bus.connect(nats_server.url, S, "downgraded", attempts=3)
    assert str(failed.value).startswith(f"NATS at {nats_server.url} does not use TLS, but "
                                        "VOXBUS_NATS_TLS_CA")


# --- mutual TLS -------------------------------------------------------------------------------


async def test_mutual_tls_without_a_client_certificate_is_refused(mtls_server, pki,
                                                                  monkeypatch):
    tls_env(monkeypatch, mtls_server, ca=pki.ca)
    with pytest.raises(NatsTLSError) as failed:
        await Bus.connect(mtls_server.url, S, "no-cert", attempts=20)
    assert str(failed.value) == (f"TLS to NATS at {mtls_server.url} failed: it requires a "
                                 "client certificate (mutual TLS): set VOXBUS_NATS_TLS_CERT "
                                 "and VOXBUS_NATS_TLS_KEY")


async def test_mutual_tls_refuses_a_certificate_of_another_ca(mtls_server, pki, monkeypatch):
    tls_env(monkeypatch, mtls_server, ca=pki.ca, cert=pki.stranger, key=pki.key("stranger"))
    with pytest.raises(NatsTLSError) as failed:
        await Bus.connect(mtls_server.url, S, "stranger", attempts=20)
    assert str(failed.value).startswith(
        f"TLS to NATS at {mtls_server.url} failed: it refused the client certificate in "
        f"VOXBUS_NATS_TLS_CERT ({pki.stranger}): "), failed.value


async def test_mutual_tls_with_a_client_certificate_round_trips(mtls_server, pki, monkeypatch):
    tls_env(monkeypatch, mtls_server, ca=pki.ca, cert=pki.client, key=pki.key("client"))
    seen = await round_trip(mtls_server, "mtls-client")
    peer = [c.get("subject") for c in seen["voxbus-mtls-client"].get("tls_peer_certs") or []]
    assert peer[:1] == ["CN=client"], peer  # the server checked the certificate we sent


def test_mutual_tls_needs_the_client_ca():
    with pytest.raises(ValueError):
        NatsTLS("server.pem", "server-key.pem", verify=True)
