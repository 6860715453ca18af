"""The webhook signature, the schema subset and its validation, and an agent's ``post_call:``
refused at load with the field and the reason: no bus, no models."""

from __future__ import annotations

import json

import pytest

from services.orchestrator.agent import AgentError, load_agent, load_agent_file
from services.post_call.schema import SchemaError, check_schema, parse_reply, validate
from services.post_call.signature import SignatureError, sign, verify
from tests.post_call.conftest import SCHEMA, write_agent

SECRET = "k" * 32
BODY = b'{"type": "post_call.completed", "fields": {"party_size": 4}}'


# --- signature ---------------------------------------------------------------------------


def test_a_signature_verifies_and_is_hmac_sha256_of_timestamp_dot_body():
    import hashlib
    import hmac

    header = sign(SECRET, BODY, timestamp=1_700_000_000)
    expected = hmac.new(SECRET.encode(), b"1700000000." + BODY, hashlib.sha256).hexdigest()
    assert header == f"t=1700000000,v1={expected}"
    assert verify(SECRET, BODY, header, now=1_700_000_100) == 1_700_000_000


@pytest.mark.parametrize("header, body, secret, now, why", [
    (None, BODY, SECRET, 1_700_000_000, "no Voxbus-Signature header"),
    ("v1=abc", BODY, SECRET, 1_700_000_000, "no t="),
    ("t=1700000000", BODY, SECRET, 1_700_000_000, "no v1="),
    ("SIGNED", BODY + b" ", SECRET, 1_700_000_000, "does not match"),
    ("SIGNED", BODY, "x" * 32, 1_700_000_000, "does not match"),
    ("SIGNED", BODY, SECRET, 1_700_000_301, "301 s from now"),
])
def test_a_bad_signature_is_refused_saying_why(header, body, secret, now, why):
    if header == "SIGNED":
        header = sign(SECRET, BODY, timestamp=1_700_000_000)
    with pytest.raises(SignatureError, match=why):
        verify(secret, body, header, now=now)


def test_a_rotated_secret_may_sign_twice():
    old = sign("o" * 32, BODY, timestamp=1_700_000_000).split(",")[1]
    header = sign(SECRET, BODY, timestamp=1_700_000_000) + "," + old
    assert verify("o" * 32, BODY, header, now=1_700_000_000) == 1_700_000_000


# --- schema ------------------------------------------------------------------------------


def test_values_are_checked_against_the_schema():
    assert validate(SCHEMA, {"party_size": 4, "day": "Friday"}) == []
    assert validate(SCHEMA, {"party_size": 4, "day": "Friday", "wants_callback": None}) == []
    assert validate(SCHEMA, {"party_size": True, "day": 3, "colour": "red"}) == [
        "colour: not a field of the schema", "party_size: expected integer, got boolean",
        "day: expected string, got integer"]
    assert validate(SCHEMA, {"day": "Friday"}) == ["party_size: required"]
    assert validate(SCHEMA, [1]) == ["expected a JSON object, got array"]
    tags = check_schema({"properties": {
        "tags": {"type": "array", "items": {"type": "string", "enum": ["a", "b"]}},
        "score": {"type": "number"}}})
    assert validate(tags, {"tags": ["a", "c"], "score": 1}) == [
        "tags[1]: 'c' is not one of ['a', 'b']"]


@pytest.mark.parametrize("schema, why", [
    ({"type": "array"}, "type must be object"),
    ({"properties": {}}, "name at least one field"),
    ({"properties": {"when": {"type": "date"}}}, "type 'date' is not one of"),
    ({"properties": {"x": {"type": "string", "format": "email"}}}, "unsupported keys"),
    ({"properties": {"x": {"type": "array"}}}, "names its items' type"),
    ({"properties": {"x": {"type": "integer", "enum": ["a"]}}}, "enum is a non-empty list"),
    ({"properties": {"bad name": {"type": "string"}}}, "field name 'bad name'"),
    ({"properties": {"x": {"type": "string"}}, "required": ["y"]}, "not in properties"),
    ({"properties": {"x": {"type": "string"}}, "$ref": "#/x"}, "unsupported keys"),
])
def test_schemas_outside_the_subset_are_refused(schema, why):
    with pytest.raises(SchemaError, match=why):
        check_schema(schema)


def test_the_json_object_is_found_inside_a_chatty_reply():
    assert parse_reply('Here you go:\n```json\n{"a": {"b": 1}}\n```') == {"a": {"b": 1}}
    with pytest.raises(ValueError, match="no JSON object"):
        parse_reply("four people on Friday")
    with pytest.raises(ValueError, match="does not parse"):
        parse_reply('{"a": 1,}')


# --- the agent file ----------------------------------------------------------------------


def test_an_agent_with_post_call_loads(tmp_path):
    write_agent(tmp_path, "ok", {"webhook": "https://example.com/hooks/voxbus"},
                llm={"max_tokens": 100})
    agent = load_agent("ok", str(tmp_path))
    assert agent.post_call.deliver.webhook == "https://example.com/hooks/voxbus"
    assert agent.post_call.schema_ == SCHEMA and agent.post_call.llm.max_tokens == 100
    assert load_agent("chat").post_call is None


@pytest.mark.parametrize("post_call, why", [
    ({"schema": SCHEMA}, "post_call.deliver: Field required"),
    ({"schema": SCHEMA, "deliver": {}}, "exactly one of webhook"),
    ({"schema": SCHEMA, "deliver": {"webhook": "https://x.io/h", "nats": "crm"}},
     "exactly one of webhook"),
    ({"schema": SCHEMA, "deliver": {"webhook": "ftp://x.io/h"}}, "not an http(s) URL"),
    ({"schema": SCHEMA, "deliver": {"nats": "crm.calls"}}, "is not a topic"),
    ({"schema": {"properties": {"d": {"type": "date"}}}, "deliver": {"nats": "crm"}},
     "post_call.schema: Value error, properties.d: type 'date'"),
    ({"schema": SCHEMA, "deliver": {"nats": "crm"}, "extract": "x"},
     "post_call.extract: Extra inputs are not permitted"),
    ({"deliver": {"nats": "crm"}}, "post_call.schema: Field required"),
])
def test_a_bad_post_call_is_refused_at_load_naming_the_field(tmp_path, post_call, why):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"name": "bad", "system_prompt": "Hi.",
                                "post_call": post_call}))
    with pytest.raises(AgentError) as refused:
        load_agent_file(path)
    assert str(refused.value).startswith(f"{path}: ")
    assert why in str(refused.value)
