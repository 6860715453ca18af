"""Short-lived, single-use session tokens (JWT, HS256), as a LiveKit token server issues them.

A token names the session it admits and the agent to run; the gateway refuses an offer without
one, with an expired one, or with one already used, so a peer can only ever join the session its
token was minted for.
"""

from __future__ import annotations

import secrets
import time
import uuid
from dataclasses import dataclass

import jwt

ALGORITHM = "HS256"
AUDIENCE = "voxbus-gateway"


class TokenError(ValueError):
    """Why an offer's token was refused; the message is safe to show the client."""


@dataclass(frozen=True)
class Grant:
    session: str
    agent: str
    token_id: str
    expires_at: float


def generate_secret() -> str:
    return secrets.token_urlsafe(32)


class TokenAuthority:
    """Mints and checks tokens with one shared secret; remembers used ids until they expire."""

    def __init__(self, secret: str, ttl_s: float = 300.0):
        if len(secret.encode()) < 32:  # RFC 7518: an HS256 key at least as long as the hash
            raise ValueError("the gateway secret must be at least 32 bytes")
        self._secret = secret
        self.ttl_s = ttl_s
        self._used: dict[str, float] = {}

    def mint(self, agent: str = "chat", session: str | None = None) -> tuple[str, Grant]:
        now = time.time()
        grant = Grant(session=session or uuid.uuid4().hex[:12], agent=agent,
                      token_id=uuid.uuid4().hex, expires_at=float(int(now + self.ttl_s)))
        claims = {"sub": grant.session, "agent": agent, "jti": grant.token_id,
                  "iat": int(now), "exp": int(grant.expires_at), "aud": AUDIENCE}
        return jwt.encode(claims, self._secret, algorithm=ALGORITHM), grant

    def check(self, token: str | None) -> Grant:
        """Check a token without using it up (Pipecat's ``/start``; the offer then redeems it)."""
        claims = self._decode(token)
        if claims["jti"] in self._used:
            raise TokenError("session token already used")
        return _grant(claims)

    def redeem(self, token: str | None) -> Grant:
        """Check a token and mark it used; raises TokenError saying why it is refused."""
        claims = self._decode(token)
        now = time.time()
        self._used = {k: exp for k, exp in self._used.items() if exp > now}
        if claims["jti"] in self._used:
            raise TokenError("session token already used")
        self._used[claims["jti"]] = float(claims["exp"])
        return _grant(claims)

    def _decode(self, token: str | None) -> dict:
        if not token:
            raise TokenError("missing session token: get one from /api/token")
        try:
            return jwt.decode(token, self._secret, algorithms=[ALGORITHM], audience=AUDIENCE,
                              options={"require": ["sub", "jti", "exp"]})
        except jwt.ExpiredSignatureError:
            raise TokenError("session token expired") from None
        except jwt.InvalidTokenError as e:
            raise TokenError(f"invalid session token: {e}") from None


def _grant(claims: dict) -> Grant:
    return Grant(session=str(claims["sub"]), agent=str(claims.get("agent", "chat")),
                 token_id=claims["jti"], expires_at=float(claims["exp"]))
