"""Who may do what on the bus: one NATS user per role, with the subjects its work needs.

Every permission is built from :class:`voxbus.subjects.Subjects` (a session or replica id
position becomes ``*``), so the permissions cannot drift from the subjects the services use.
``voxbus up`` generates a password per role and starts its nats-server with
:func:`server_config`; deployments render the same permissions (``deploy/``) and pass each
service its credentials by environment (:class:`voxbus.config.NatsAuth`).
"""

from __future__ import annotations

import json
import secrets
import ssl
from collections.abc import Iterable, Mapping
from typing import Any

from voxbus.config import NatsAuth
from voxbus.subjects import Event, Stage, Subjects

ROLES = ("stt", "llm", "tts", "orchestrator", "gateway", "control", "post_call", "client",
         "admin")
"""``client``: ``voxbus talk``, ``replay``, ``sessions`` and ``record`` (the CLI, any session);
``admin``: set-up (``voxbus up`` itself: the recording stream) and nothing a service does."""

STAGE_ROLES = {Stage.STT: "stt", Stage.LLM: "llm", Stage.TTS: "tts",
               Stage.ORCHESTRATOR: "orchestrator", Stage.GATEWAY: "gateway",
               Stage.CONTROL: "control", Stage.POST_CALL: "post_call"}
"""The role each stage's replicas connect as."""

INBOX = "_INBOX"
"""nats-py's default inbox prefix. A connection as one of :data:`ROLES` uses its own below it
(:func:`inbox_prefix`) and may subscribe only there, so no role reads another's replies."""

_ANY = "ANY0x2A"
"""A valid id that stands for "any" while a subject is built; it becomes ``*``."""

JS_API = "$JS.API"


def inbox_prefix(role: str) -> str:
    """Where ``role``'s request replies, JetStream API answers and KV watches arrive:
    ``_INBOX.<role>`` (nats-py adds ``.<nuid>...``): still under the usual ``_INBOX`` root, and
    a role name is never a 22-character nuid, so it cannot collide with a default inbox."""
    return f"{INBOX}.{role}"


def inbox(role: str) -> str:
    """The subscribe permission for ``role``'s own inboxes and nobody else's."""
    return f"{inbox_prefix(role)}.>"


def _every(subject: str) -> str:
    return ".".join("*" if part == _ANY else part for part in subject.split("."))


def _stream_api(stream: str, *, write: bool = True, admin: bool = False) -> list[str]:
    """The JetStream API subjects of one stream that nats-py uses: create/bind, read messages
    (direct or not), consumers for watching and exporting (ordered, pull), flow control."""
    api = [f"{JS_API}.STREAM.INFO.{stream}", f"{JS_API}.STREAM.CREATE.{stream}",
           f"{JS_API}.STREAM.MSG.GET.{stream}", f"{JS_API}.DIRECT.GET.{stream}",
           f"{JS_API}.DIRECT.GET.{stream}.>", f"{JS_API}.CONSUMER.CREATE.{stream}",
           f"{JS_API}.CONSUMER.CREATE.{stream}.>", f"{JS_API}.CONSUMER.INFO.{stream}.*",
           f"{JS_API}.CONSUMER.DELETE.{stream}.*", f"{JS_API}.CONSUMER.MSG.NEXT.{stream}.*",
           f"$JS.FC.{stream}.>"]
    if write:
        api.append(f"{JS_API}.STREAM.UPDATE.{stream}")
    if admin:
        api += [f"{JS_API}.STREAM.DELETE.{stream}", f"{JS_API}.STREAM.PURGE.{stream}",
                f"{JS_API}.STREAM.MSG.DELETE.{stream}", f"{JS_API}.CONSUMER.LIST.{stream}",
                f"{JS_API}.CONSUMER.NAMES.{stream}"]
    return api


def _kv_stream(bucket: str) -> str:
    return f"KV_{bucket}"


def _kv_keys(bucket: str) -> str:
    return f"$KV.{bucket}.>"


def permissions(role: str, prefix: str = "vox") -> dict[str, Any]:
    """The NATS permissions of ``role`` for subject prefix ``prefix``, as nats-server's
    ``permissions`` block takes them: ``publish``/``subscribe`` allow lists and
    ``allow_responses`` (a replica may answer the requests it receives, once each, on the
    requester's inbox, without any right to publish on inboxes in general). Every role may
    subscribe to its own inboxes (:func:`inbox`) only: ``_INBOX.>`` would let one role read
    the replies another role's requests get."""
    if role not in ROLES:
        raise ValueError(f"unknown NATS role {role!r}: one of {', '.join(ROLES)}")
    s = Subjects(prefix)
    any_ = _ANY
    pub: list[str] = []
    sub: list[str] = []

    def replica(stage: Stage) -> None:
        """What every replica of a stage does: heartbeats, its own control subject, errors."""
        pub.extend([s.heartbeat(stage), s.errors(), _every(s.event(any_, Event.ERROR))])
        sub.append(_every(s.worker_ctl(any_)))

    def takes_work(stage: Stage) -> None:
        sub.extend([s.work(stage), _every(s.work_direct(stage, any_))])

    def sends_work(*stages: Stage) -> None:
        for stage in stages:
            pub.extend([s.work(stage), _every(s.work_direct(stage, any_)),
                        _every(s.work_copy(any_, stage))])

    if role == "stt":
        replica(Stage.STT)
        takes_work(Stage.STT)
        sub += [_every(s.audio_in(any_)), _every(s.event(any_, Event.VAD)),
                _every(s.ctl(any_)), _every(s.claim(any_, Stage.STT))]
        pub += [_every(s.event(any_, Event.TRANSCRIPT)), _every(s.event(any_, Event.METRIC)),
                _every(s.claim(any_, Stage.STT))]
    elif role in ("llm", "tts"):
        stage = Stage(role)
        replica(stage)
        takes_work(stage)
        sub.append(s.all_ctl())  # Cancel
        pub.append(_every(s.replies(any_, stage)))
    elif role == "orchestrator":
        replica(Stage.ORCHESTRATOR)
        takes_work(Stage.ORCHESTRATOR)
        sends_work(Stage.STT, Stage.LLM, Stage.TTS)
        sub += [_every(s.audio_in(any_)), _every(s.event(any_, Event.TRANSCRIPT)),
                _every(s.ctl(any_)), _every(s.replies(any_, Stage.LLM)),
                _every(s.replies(any_, Stage.TTS))]
        sub += [s.heartbeat(st) for st in (Stage.ORCHESTRATOR, Stage.STT, Stage.LLM, Stage.TTS)]
        pub += [_every(s.audio_out(any_)), _every(s.ctl(any_))]
        pub += [_every(s.event(any_, kind))
                for kind in (Event.VAD, Event.TURN, Event.BOT, Event.METRIC)]
        bucket = s.sessions_bucket()
        pub += [_kv_keys(bucket), *_stream_api(_kv_stream(bucket))]
    elif role == "gateway":
        replica(Stage.GATEWAY)
        sends_work(Stage.ORCHESTRATOR)
        sub += [_every(s.audio_out(any_)), _every(s.events(any_)),
                _every(s.ctl(any_)),  # SessionEnd: the agent or an operator hung up
                s.heartbeat(Stage.ORCHESTRATOR)]  # placement: the least-loaded orchestrator
        pub += [_every(s.audio_in(any_)), _every(s.ctl(any_))]
    elif role == "control":
        replica(Stage.CONTROL)
        sub += [s.all_heartbeats(), s.errors()]
        sub += [s.all_events(kind) for kind in (Event.METRIC, Event.TURN, Event.ERROR)]
        pub += [_every(s.ctl(any_)), _every(s.worker_ctl(any_))]  # EndSession, DrainWorker
        pub += _stream_api(_kv_stream(s.sessions_bucket()), write=False)  # reads the bucket
        pub += _stream_api(_kv_stream(s.post_call_bucket()), write=False)  # GetSession's
    elif role == "post_call":
        # Session ends and transcripts from the recording (its durable consumer, acks), the
        # extraction through the LLM stage (Cancel on ctl when a hedged attempt is dropped),
        # results in its bucket and on its delivery subjects.
        replica(Stage.POST_CALL)
        sends_work(Stage.LLM)
        sub.append(_every(s.replies(any_, Stage.LLM)))
        pub += [_every(s.ctl(any_)), s.all_post_call_deliveries()]
        rec, durable = s.recording_stream(), s.post_call_consumer()
        pub += [*_stream_api(rec, write=False), f"$JS.ACK.{rec}.{durable}.>"]
        bucket = s.post_call_bucket()
        pub += [_kv_keys(bucket), *_stream_api(_kv_stream(bucket))]
    elif role == "client":
        # voxbus talk and live replay: a session's audio in, its end, everything it carries;
        # stage replay: one stage's work, and the VAD events an STT replica follows.
        sends_work(Stage.ORCHESTRATOR, Stage.STT, Stage.LLM, Stage.TTS)
        sub.append(s.all_sessions())
        pub += [_every(s.audio_in(any_)), _every(s.ctl(any_)), _every(s.event(any_, Event.VAD)),
                s.errors(), _every(s.event(any_, Event.ERROR))]
        pub += _stream_api(s.recording_stream())  # voxbus sessions / record [--enable]
        pub += _stream_api(_kv_stream(s.post_call_bucket()), write=False)  # post-call results
        sub.append(s.all_post_call_deliveries())
    else:  # admin
        pub += [f"{prefix}.>", f"{JS_API}.INFO", f"{JS_API}.STREAM.NAMES",
                f"{JS_API}.STREAM.LIST", _kv_keys(s.sessions_bucket())]
        pub.append(_kv_keys(s.post_call_bucket()))
        for stream in (s.recording_stream(), _kv_stream(s.sessions_bucket()),
                       _kv_stream(s.post_call_bucket())):
            pub += _stream_api(stream, admin=True)
        sub.append(f"{prefix}.>")
    sub.append(inbox(role))  # a role that makes no requests today has nothing there to read
    return {"publish": {"allow": _unique(pub)}, "subscribe": {"allow": _unique(sub)},
            "allow_responses": True}


def _unique(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(items))


def new_passwords(roles: Iterable[str] = ROLES) -> dict[str, str]:
    """A random password per role (``voxbus up``: new ones every run)."""
    return {role: secrets.token_urlsafe(24) for role in roles}


def server_config(passwords: Mapping[str, str], prefix: str = "vox") -> str:
    """nats-server's ``authorization`` block: one user per role, named after it, with its
    password and :func:`permissions`. JSON values are valid nats-server syntax."""
    users = [{"user": role, "password": password, "permissions": permissions(role, prefix)}
             for role, password in passwords.items()]
    body = ",\n".join(f"    {json.dumps(user)}" for user in users)
    return f"authorization {{\n  users = [\n{body}\n  ]\n}}\n"


def role_env(role: str, password: str) -> dict[str, str]:
    """The environment that makes a process connect as ``role`` (what ``voxbus up`` gives each
    child; a deployment sets the same variables)."""
    return {"VOXBUS_NATS_USER": role, "VOXBUS_NATS_PASSWORD": password}


def connect_options(auth: NatsAuth) -> dict[str, Any]:
    """nats-py ``connect()`` keywords for ``auth``: its own user/password, token, ``.creds``
    and NKey support, and an ``ssl.SSLContext`` for TLS.

    A user named after a role gets that role's inbox prefix: the permissions belong to the
    user, so the inbox follows the user, not the program (``voxbus record`` run as ``admin``
    uses ``_INBOX.admin``). Other credentials keep nats-py's ``_INBOX``: voxbus generates no
    permissions for them."""
    options: dict[str, Any] = {}
    if auth.user:
        options.update(user=auth.user, password=auth.password)
        if auth.user in ROLES:
            options["inbox_prefix"] = inbox_prefix(auth.user)
    elif auth.token:
        options["token"] = auth.token
    elif auth.creds:
        options["user_credentials"] = auth.creds
    elif auth.nkey:
        options["nkeys_seed"] = auth.nkey
    if auth.tls:
        context = ssl.create_default_context(cafile=auth.tls_ca or None)
        if auth.tls_cert:
            context.load_cert_chain(auth.tls_cert, auth.tls_key)
        options["tls"] = context
    return options


def tls_failure(e: ssl.SSLError, auth: NatsAuth) -> str | None:
    """What a failed TLS handshake means, as the end of one line (the server's certificate is
    not trusted, it wants ours, it refused ours); None for a failure worth retrying (the
    server went away mid-handshake). Retrying cannot change a certificate."""
    if isinstance(e, ssl.SSLCertVerificationError):
        why = e.verify_message or e.reason or str(e)
        if auth.tls_ca:
            return (f"its certificate is not trusted by the CA in VOXBUS_NATS_TLS_CA "
                    f"({auth.tls_ca}): {why}")
        return (f"its certificate is not trusted ({why}): set VOXBUS_NATS_TLS_CA to the PEM "
                "CA bundle that signed it")
    reason = (e.reason or "").upper()
    said = reason.lower().replace("_", " ")
    if "CERTIFICATE" in reason and ("REQUIRED" in reason or not auth.tls_cert):
        return ("it requires a client certificate (mutual TLS): set VOXBUS_NATS_TLS_CERT and "
                "VOXBUS_NATS_TLS_KEY")
    if "CERTIFICATE" in reason or "UNKNOWN_CA" in reason:
        return (f"it refused the client certificate in VOXBUS_NATS_TLS_CERT ({auth.tls_cert}): "
                f"{said}")
    if "ALERT" in reason or "WRONG_VERSION" in reason or "UNSUPPORTED" in reason:
        return f"the handshake failed: {said}"
    return None


def describe(auth: NatsAuth) -> str:
    """How a connection authenticated, for an error line (never the secret)."""
    if auth.user:
        return f"as user {auth.user!r}"
    if auth.token:
        return "with VOXBUS_NATS_TOKEN"
    if auth.creds:
        return f"with the credentials in {auth.creds}"
    if auth.nkey:
        return f"with the NKey seed in {auth.nkey}"
    return "without credentials"
