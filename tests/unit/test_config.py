"""Settings from the environment: every spelling that parses, every kind of value that does not."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest

from voxbus.config import FALSE, TRUE, Settings, SettingsError

BOOLEANS = ("VOXBUS_RECORD", "VOXBUS_OPEN_TOKENS", "VOXBUS_STT_SHORT_WINDOW")
FIELD_OF = {"VOXBUS_RECORD": "record", "VOXBUS_OPEN_TOKENS": "open_tokens",
            "VOXBUS_STT_SHORT_WINDOW": "stt_short_window"}


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    """No VOXBUS_* variable of the machine running the tests leaks into them."""
    for name in list(os.environ):
        if name.startswith("VOXBUS_"):
            monkeypatch.delenv(name)


def _spellings(words: tuple[str, ...]) -> list[str]:
    out = []
    for w in words:
        out += [w, w.upper(), w.capitalize(), f"  {w} ", f"\t{w.upper()}\n"]
    return out


@pytest.mark.parametrize("name", BOOLEANS)
@pytest.mark.parametrize("raw", _spellings(TRUE))
def test_true_spellings(monkeypatch, name, raw):
    monkeypatch.setenv(name, raw)
    assert getattr(Settings(), FIELD_OF[name]) is True


@pytest.mark.parametrize("name", BOOLEANS)
@pytest.mark.parametrize("raw", _spellings(FALSE))
def test_false_spellings(monkeypatch, name, raw):
    monkeypatch.setenv(name, raw)
    assert getattr(Settings(), FIELD_OF[name]) is False


@pytest.mark.parametrize("name", BOOLEANS)
@pytest.mark.parametrize("raw", ["", "   "])
def test_blank_boolean_is_the_default(monkeypatch, name, raw):
    monkeypatch.setenv(name, raw)
    assert getattr(Settings(), FIELD_OF[name]) is True  # every boolean defaults to on


@pytest.mark.parametrize("name", BOOLEANS)
@pytest.mark.parametrize("raw", ["maybe", "2", "-1", "y", "n", "t", "f", "enabled", "o n",
                                 "truee", "1.0", "none"])
def test_bad_boolean(monkeypatch, capsys, name, raw):
    monkeypatch.setenv(name, raw)
    with pytest.raises(SettingsError) as err:
        Settings()
    message = err.value.message
    assert name in message and repr(raw) in message
    assert all(w in message for w in ("true", "false", "yes", "no", "on", "off", "1", "0"))
    assert err.value.code == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert message in line


BAD = [  # (variable, value, what the message must say)
    ("VOXBUS_HTTP_PORT", "80.5", "not an integer"),
    ("VOXBUS_HTTP_PORT", "abc", "not an integer"),
    ("VOXBUS_HTTP_PORT", "8e3", "not an integer"),
    ("VOXBUS_HTTP_PORT", "0x50", "not an integer"),
    ("VOXBUS_HTTP_PORT", "-1", "out of range"),
    ("VOXBUS_HTTP_PORT", "65536", "out of range"),
    ("VOXBUS_METRICS_PORT", "99999", "out of range"),
    ("VOXBUS_METRICS_PORT", "9090.0", "not an integer"),
    ("VOXBUS_HEARTBEAT_S", "-1", "out of range"),
    ("VOXBUS_HEARTBEAT_S", "0", "out of range"),
    ("VOXBUS_HEARTBEAT_S", "fast", "not a number"),
    ("VOXBUS_HEARTBEAT_S", "nan", "not a finite number"),
    ("VOXBUS_LEASE_S", "-3", "out of range"),
    ("VOXBUS_LEASE_S", "inf", "not a finite number"),
    ("VOXBUS_TOKEN_TTL_S", "-120", "out of range"),
    ("VOXBUS_TOKEN_TTL_S", "2 min", "not a number"),
    ("VOXBUS_GATEWAY_IDLE_S", "0", "out of range"),
    ("VOXBUS_VAD_STOP_S", "-0.2", "out of range"),
    ("VOXBUS_TURN_STOP_S", "0", "out of range"),
    ("VOXBUS_RECORD_MAX_AGE_S", "-1", "out of range"),
    ("VOXBUS_RECORD_MAX_AGE_S", "1d", "not a number"),
    ("VOXBUS_RECORD_MAX_BYTES", "1.5e9", "not an integer"),
    ("VOXBUS_RECORD_MAX_BYTES", "0", "out of range"),
    ("VOXBUS_RECORD_MAX_BYTES", "-2", "out of range"),
    ("VOXBUS_LLM_MAX_TOKENS", "0", "out of range"),
    ("VOXBUS_LLM_MAX_TOKENS", "80.5", "not an integer"),
    ("VOXBUS_LLM_TEMPERATURE", "-0.1", "out of range"),
    ("VOXBUS_LLM_TEMPERATURE", "3", "out of range"),
    ("VOXBUS_LLM_TEMPERATURE", "warm", "not a number"),
    ("VOXBUS_GATEWAY_MAX_SESSIONS", "0", "out of range"),
    ("VOXBUS_GATEWAY_MAX_SESSIONS", "8.5", "not an integer"),
    ("VOXBUS_GATEWAY_JITTER_FRAMES", "-1", "out of range"),
    ("VOXBUS_GATEWAY_JITTER_FRAMES", "100", "out of range"),
    ("VOXBUS_STT_DEVICE", "gpu", "not one of"),
    ("VOXBUS_PREFIX", "a b", "not a subject prefix"),
    ("VOXBUS_PREFIX", "vox.>", "not a subject prefix"),
    ("VOXBUS_PREFIX", "vox..x", "not a subject prefix"),
    ("VOXBUS_WORKER_ID", "a.b", "not a worker id"),
    ("VOXBUS_ICE_SERVERS", "stun:ok.example:3478, http://not-ice", "stun:"),
]


@pytest.mark.parametrize(("name", "raw", "says"), BAD, ids=[f"{n}={v}" for n, v, _ in BAD])
def test_bad_value_is_one_clear_line(monkeypatch, capsys, name, raw, says):
    monkeypatch.setenv(name, raw)
    with pytest.raises(SettingsError) as err:
        Settings()
    message = err.value.message
    assert says in message and name in message, message
    if name != "VOXBUS_ICE_SERVERS":
        assert repr(raw) in message, message
    assert "expected" in message or "one of" in message, message
    assert err.value.code == 2 and str(err.value) == message
    (line,) = capsys.readouterr().err.splitlines()
    assert line == f"voxbus: {message}"


def test_short_gateway_secret_is_refused_without_echoing_it(monkeypatch):
    monkeypatch.setenv("VOXBUS_GATEWAY_SECRET", "hunter2")
    with pytest.raises(SettingsError) as err:
        Settings()
    assert "VOXBUS_GATEWAY_SECRET" in err.value.message and "32" in err.value.message
    assert "hunter2" not in err.value.message


def test_lease_must_outlast_the_heartbeat(monkeypatch):
    monkeypatch.setenv("VOXBUS_HEARTBEAT_S", "2")
    monkeypatch.setenv("VOXBUS_LEASE_S", "1.5")
    with pytest.raises(SettingsError, match="VOXBUS_LEASE_S=1.5 .*VOXBUS_HEARTBEAT_S=2"):
        Settings()


GOOD = [  # (variable, value, field, parsed)
    ("VOXBUS_HTTP_PORT", " 8081 ", "http_port", 8081),
    ("VOXBUS_HTTP_PORT", "0", "http_port", 0),
    ("VOXBUS_METRICS_PORT", "65535", "metrics_port", 65535),
    ("VOXBUS_HEARTBEAT_S", "0.5", "heartbeat_s", 0.5),
    ("VOXBUS_LEASE_S", "10", "lease_s", 10.0),
    ("VOXBUS_RECORD_MAX_AGE_S", "0", "record_max_age_s", 0.0),
    ("VOXBUS_RECORD_MAX_BYTES", "-1", "record_max_bytes", -1),
    ("VOXBUS_RECORD_MAX_BYTES", "1073741824", "record_max_bytes", 1 << 30),
    ("VOXBUS_LLM_TEMPERATURE", "0", "llm_temperature", 0.0),
    ("VOXBUS_LLM_MAX_TOKENS", "400", "llm_max_tokens", 400),
    ("VOXBUS_GATEWAY_JITTER_FRAMES", "0", "gateway_jitter_frames", 0),
    ("VOXBUS_STT_DEVICE", "CUDA", "stt_device", "cuda"),
    ("VOXBUS_PREFIX", "team-a.vox", "prefix", "team-a.vox"),
    ("VOXBUS_WORKER_ID", "node_7", "worker_id", "node_7"),
    ("VOXBUS_ICE_SERVERS", "stun:stun.example.org:3478, turns:t.example.org",
     "ice_servers", "stun:stun.example.org:3478, turns:t.example.org"),
    ("VOXBUS_GATEWAY_SECRET", "x" * 32, "gateway_secret", "x" * 32),
    ("VOXBUS_HTTP_PORT", "", "http_port", 8080),  # blank = unset
]


@pytest.mark.parametrize(("name", "raw", "attr", "parsed"), GOOD,
                         ids=[f"{n}={v!r}" for n, v, _, _ in GOOD])
def test_good_values(monkeypatch, name, raw, attr, parsed):
    monkeypatch.setenv(name, raw)
    value = getattr(Settings(), attr)
    assert value == parsed and type(value) is type(parsed)


def test_defaults_without_environment():
    s = Settings()
    assert (s.prefix, s.http_port, s.metrics_port, s.heartbeat_s, s.lease_s) == (
        "vox", 8080, 0, 1.0, 3.0)
    assert s.record and s.open_tokens and s.stt_short_window
    assert len(s.worker_id) == 8


def test_code_still_builds_and_replaces_settings(monkeypatch):
    """Explicit values skip the environment, and replace() keeps working (stages use both)."""
    monkeypatch.setenv("VOXBUS_HEARTBEAT_S", "0.2")
    s = Settings(prefix="p1", heartbeat_s=0.5)
    assert s.heartbeat_s == 0.5
    t = dataclasses.replace(s, llm_temperature=0.9, llm_max_tokens=5)
    assert (t.prefix, t.llm_temperature, t.llm_max_tokens) == ("p1", 0.9, 5)
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.prefix = "other"  # type: ignore[misc]


def test_every_variable_is_documented_in_the_readme():
    import inspect
    import re
    from pathlib import Path

    import voxbus.config

    source = inspect.getsource(voxbus.config)
    names = set(re.findall(r'"((?:VOXBUS|OPENAI)_[A-Z_]+)"', source))
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    missing = sorted(n for n in names if f"`{n}`" not in readme)
    assert not missing, f"README's configuration table lacks {missing}"


@pytest.mark.parametrize("command", [["tts"], ["orchestrator"]])
def test_service_start_fails_with_one_line_and_status_2(command):
    """As an operator sees it: the real entry point, a bad variable, one line, exit status 2."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("VOXBUS_")}
    env["VOXBUS_RECORD"] = "maybe"
    proc = subprocess.run([sys.executable, "-m", "voxbus.cli", *command], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines == ["voxbus: VOXBUS_RECORD='maybe' is not a boolean: use one of 1/true/yes/on "
                     "or 0/false/no/off (any case)"], proc.stderr
