"""The control plane's protobuf and gRPC modules, generated at import from proto/.

Nothing generated is committed: ``grpc.protos_and_services`` runs grpc_tools' protoc in memory
on ``proto/voxbus_control.proto``, so the .proto file is the one source of truth.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import grpc

PROTO_DIR = Path(__file__).resolve().parents[2] / "proto"
PROTO_FILE = "voxbus_control.proto"
SERVICE_NAME = "voxbus.control.v1.Control"


def _generate() -> tuple[Any, Any]:
    # protoc resolves the file from sys.path entries: the folder is on it only for this call.
    entry = str(PROTO_DIR)
    added = entry not in sys.path
    if added:
        sys.path.append(entry)
    try:
        return grpc.protos_and_services(PROTO_FILE)
    finally:
        if added:
            sys.path.remove(entry)


pb, rpc = _generate()
"""``pb``: the messages (``pb.Session``...); ``rpc``: ``ControlServicer``, ``ControlStub``,
``add_ControlServicer_to_server``."""
