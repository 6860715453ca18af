"""The small JSON Schema subset an agent's ``post_call.schema`` may use, checked by hand.

A whole JSON Schema validator would accept schemas no small model can fill; this subset (an
object of named fields, each a string, integer, number, boolean, a string ``enum`` or an array
of one of those, with ``required`` and ``description``) is what an extraction prompt can
describe in a sentence per field, and what a receiver can store in columns.
"""

from __future__ import annotations

import json
import re
from typing import Any

SCALARS = ("string", "integer", "number", "boolean")
MAX_FIELDS = 32
_FIELD = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
_FIELD_KEYS = {"type", "description", "enum", "items"}


class SchemaError(ValueError):
    """A ``post_call.schema`` outside the subset: the message says which field and why."""


def check_schema(schema: Any) -> dict[str, Any]:
    """``schema`` if it is in the subset, else :class:`SchemaError` naming the problem."""
    if not isinstance(schema, dict):
        raise SchemaError(f"expected a mapping, got {type(schema).__name__}")
    unknown = set(schema) - {"type", "properties", "required", "description"}
    if unknown:
        raise SchemaError(f"unsupported keys {sorted(unknown)}: use type, properties, required")
    if schema.get("type", "object") != "object":
        raise SchemaError(f"type must be object, not {schema.get('type')!r}")
    props = schema.get("properties")
    if not isinstance(props, dict) or not props:
        raise SchemaError("properties: name at least one field")
    if len(props) > MAX_FIELDS:
        raise SchemaError(f"properties: {len(props)} fields, at most {MAX_FIELDS}")
    for name, spec in props.items():
        _check_field(name, spec)
    required = schema.get("required", [])
    if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
        raise SchemaError("required: a list of field names")
    missing = [r for r in required if r not in props]
    if missing:
        raise SchemaError(f"required names {missing}, not in properties")
    return schema


def _check_field(name: Any, spec: Any, *, item: bool = False) -> None:
    where = f"properties.{name}" + (".items" if item else "")
    if not item and not (isinstance(name, str) and _FIELD.match(name)):
        raise SchemaError(f"properties: field name {name!r}: use letters, digits and _")
    if not isinstance(spec, dict):
        raise SchemaError(f"{where}: expected a mapping with a type")
    unknown = set(spec) - _FIELD_KEYS
    if unknown:
        raise SchemaError(f"{where}: unsupported keys {sorted(unknown)}")
    kind = spec.get("type")
    allowed = SCALARS if item else (*SCALARS, "array")
    if kind not in allowed:
        raise SchemaError(f"{where}: type {kind!r} is not one of {', '.join(allowed)}")
    if "description" in spec and not isinstance(spec["description"], str):
        raise SchemaError(f"{where}: description must be text")
    if "enum" in spec:
        enum = spec["enum"]
        if kind != "string" or not isinstance(enum, list) or not enum or not all(
                isinstance(v, str) for v in enum):
            raise SchemaError(f"{where}: enum is a non-empty list of strings, on a string")
    if kind == "array":
        if "items" not in spec:
            raise SchemaError(f"{where}: an array names its items' type")
        _check_field(name, spec["items"], item=True)
    elif "items" in spec:
        raise SchemaError(f"{where}: items only belongs on an array")


def validate(schema: dict[str, Any], value: Any) -> list[str]:
    """What is wrong with ``value`` against ``schema`` (empty: valid). Missing optional fields
    are fine; fields the schema does not name are errors (a receiver's columns are fixed)."""
    if not isinstance(value, dict):
        return [f"expected a JSON object, got {_kind(value)}"]
    props = schema["properties"]
    errors = [f"{name}: required" for name in schema.get("required", []) if name not in value]
    errors += [f"{name}: not a field of the schema" for name in value if name not in props]
    for name, v in value.items():
        if name in props and not (v is None and name not in schema.get("required", [])):
            errors += [f"{name}{e}" for e in _errors(props[name], v)]
    return errors


def _errors(spec: dict[str, Any], v: Any) -> list[str]:
    kind = spec["type"]
    if kind == "array":
        if not isinstance(v, list):
            return [f": expected an array, got {_kind(v)}"]
        return [f"[{i}]{e}" for i, x in enumerate(v) for e in _errors(spec["items"], x)]
    ok = {"string": isinstance(v, str),
          "integer": isinstance(v, int) and not isinstance(v, bool),
          "number": isinstance(v, int | float) and not isinstance(v, bool),
          "boolean": isinstance(v, bool)}[kind]
    if not ok:
        return [f": expected {kind}, got {_kind(v)}"]
    if "enum" in spec and v not in spec["enum"]:
        return [f": {v!r} is not one of {spec['enum']}"]
    return []


def _kind(v: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", int: "integer",
            float: "number", type(None): "null"}.get(type(v), type(v).__name__)


def parse_reply(text: str) -> Any:
    """The JSON object in a model's reply: small models wrap it in prose or code fences, so
    the outermost ``{...}`` is taken. ValueError says why there is none."""
    start, end = text.find("{"), text.rfind("}")
    if start < 0 or end < start:
        raise ValueError(f"no JSON object in the reply {text[:120]!r}")
    try:
        return json.loads(text[start:end + 1])
    except json.JSONDecodeError as e:
        raise ValueError(f"the reply's JSON does not parse: {e.msg} at character {e.pos}"
                         ) from None


def describe(schema: dict[str, Any]) -> str:
    """The schema as the extraction prompt tells it: one line per field."""
    required = set(schema.get("required", []))
    lines = []
    for name, spec in schema["properties"].items():
        kind = spec["type"]
        if kind == "array":
            kind = f"array of {spec['items']['type']}"
        if "enum" in spec:
            kind = "one of " + ", ".join(json.dumps(v) for v in spec["enum"])
        need = "required" if name in required else "optional, null if unknown"
        about = f": {spec['description']}" if spec.get("description") else ""
        lines.append(f"- {name} ({kind}, {need}){about}")
    return "\n".join(lines)
