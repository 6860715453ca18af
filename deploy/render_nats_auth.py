#!/usr/bin/env python3
"""Write the NATS ``authorization`` block of a deployment: one user per voxbus role.

The subject permissions come from ``voxbus.nats_auth`` (the code that also secures ``voxbus
up``'s own nats-server), never from a hand-written list, so a deployment cannot drift from what
the services need; that includes each role's own inbox (``_INBOX.<role>.>``), which a service
connecting as that user uses for its replies. Passwords are not written: each user's password
is a NATS variable reference (``$NATS_STT_PASSWORD``), resolved from the nats-server's
environment when it starts.

    python deploy/render_nats_auth.py --out auth.conf        # the include file (no secrets)
    python deploy/render_nats_auth.py --new-env > .env       # fresh random secrets, one a line

Compose and Kubernetes run the first form in the voxbus image before each NATS node starts
(``deploy/compose/compose.yaml``: the ``nats-auth`` one-shot; ``deploy/k8s/nats.yaml``: an init
container), writing ``auth/auth.conf`` beside ``nats.conf``, which includes it.

It uses ``voxbus.nats_auth.permissions(role, prefix)`` for every role in
``voxbus.nats_auth.ROLES``; compose.yaml and k8s/nats.yaml pass each of those roles' password
variable to the NATS nodes (:data:`ROLES` here is that list, checked against the module).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import string
import sys

ROLES = ("stt", "llm", "tts", "orchestrator", "gateway", "control", "post_call", "client",
         "admin")
"""One NATS user each. ``client``: ``voxbus talk`` and other session clients; ``admin``: one-shot
set-up jobs and operators' ``voxbus record``/``sessions``/``replay``."""

CLUSTER_PASSWORD = "NATS_CLUSTER_PASSWORD"
"""The password NATS nodes use for their routes to each other."""

OTHER_SECRETS = ("VOXBUS_GATEWAY_SECRET", "VOXBUS_CONTROL_TOKEN", "VOXBUS_POST_CALL_SECRET")
"""Not NATS's, but generated with the rest: the gateways' token key, the control token and the
key post-call webhooks are signed with (give it to the webhook's receiver too)."""


_ALPHABET = string.ascii_letters + string.digits


def password_variable(role: str) -> str:
    """The environment variable holding ``role``'s NATS password (compose's .env, k8s Secret)."""
    return f"NATS_{role.upper()}_PASSWORD"


def render(prefix: str) -> str:
    """The ``authorization`` block for subject prefix ``prefix``, in nats-server's syntax."""
    try:
        from voxbus import nats_auth
    except ImportError as e:
        raise SystemExit(
            f"render_nats_auth: voxbus.nats_auth is not importable ({e}); the per-role "
            "permissions come from it, and this deployment refuses to start NATS without "
            "them") from None
    if tuple(nats_auth.ROLES) != ROLES:
        raise SystemExit(
            f"render_nats_auth: voxbus.nats_auth has roles {', '.join(nats_auth.ROLES)}; this "
            f"deployment knows {', '.join(ROLES)}: add the new role's password variable to "
            "deploy/compose/compose.yaml and deploy/k8s/nats.yaml, then to ROLES here")
    users = []
    for role in ROLES:
        perms = nats_auth.permissions(role, prefix)
        # JSON is valid nats-server syntax; the password stays a bare variable reference.
        users.append(f'    {{user: "{role}", password: ${password_variable(role)}, '
                     f"permissions: {json.dumps(perms, sort_keys=True)}}}")
    return ("# Rendered by deploy/render_nats_auth.py from voxbus.nats_auth "
            f"(prefix {prefix!r}); do not edit.\n"
            "authorization {\n  timeout: 2\n  users: [\n" + "\n".join(users) + "\n  ]\n}\n")


def new_secret() -> str:
    """43 random letters and digits (about 256 bits), starting with a letter.

    nats-server reads a variable's value as a config value, not as a string: ``4h...`` starts
    a duration and ``12e...`` a number, and either fails to parse. Letters and digits after a
    letter are always a plain string, and need no escaping in a route URL either.
    """
    first = secrets.choice(string.ascii_letters)
    return first + "".join(secrets.choice(_ALPHABET) for _ in range(42))


def new_env() -> str:
    """Fresh secrets in .env syntax: every role's password, the cluster's, the others."""
    names = [CLUSTER_PASSWORD, *(password_variable(r) for r in ROLES), *OTHER_SECRETS]
    return "".join(f"{name}={new_secret()}\n" for name in names)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", help="write the include file here (default: stdout)")
    p.add_argument("--prefix", default=os.environ.get("VOXBUS_PREFIX") or "vox",
                   help="subject prefix (default VOXBUS_PREFIX, or vox)")
    p.add_argument("--new-env", action="store_true",
                   help="print fresh random secrets for .env / a k8s Secret instead")
    args = p.parse_args(argv)
    text = new_env() if args.new_env else render(args.prefix)
    if args.out:
        tmp = f"{args.out}.tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, args.out)  # a NATS node never reads half a file
        print(f"render_nats_auth: wrote {args.out} ({len(ROLES)} users)", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
