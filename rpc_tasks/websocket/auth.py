"""Signed connection tokens for the WebSocket server.

A token is ``<payload>.<signature>``: the payload is base64url JSON
``{"sub": user_id, "exp": unix_seconds, "iat": unix_seconds}`` and the signature is
HMAC-SHA256 over the payload with the shared secret (``WebSocketRPCConfig.websocket_secret``).
Django mints one per user with :func:`make_token`; browsers pass it as ``?token=...``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from dataclasses import dataclass

from ..exceptions import RPCConfigurationError, RPCException

#: Largest token accepted (bytes).
MAX_TOKEN_LENGTH = 2048


class TokenError(RPCException):
    """A token is missing, malformed, badly signed or expired; ``reason`` says which."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


@dataclass(frozen=True)
class TokenClaims:
    """What a valid token proves."""

    user_id: str
    expires_at: int
    issued_at: int


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _key(secret: str | bytes | None) -> bytes:
    if not secret:
        raise RPCConfigurationError("a websocket_secret is needed to sign/verify connection tokens")
    return secret.encode() if isinstance(secret, str) else secret


def make_token(
    user_id: str, secret: str | bytes | None = None, *, ttl: int = 3600, now: float | None = None
) -> str:
    """Mint a token for ``user_id`` valid ``ttl`` seconds (secret: the config's by default)."""
    if secret is None:
        from ..config import get_config

        configured = get_config().websocket_secret
        secret = configured.get_secret_value() if configured is not None else None
    if not user_id or len(user_id) > 256:
        raise ValueError("user_id must be 1..256 characters")
    issued = int(time.time() if now is None else now)
    payload = _b64(
        json.dumps({"sub": user_id, "exp": issued + int(ttl), "iat": issued}, separators=(",", ":")).encode()
    )
    signature = _b64(hmac.new(_key(secret), payload.encode(), hashlib.sha256).digest())
    return f"{payload}.{signature}"


def verify_token(
    token: str | None, secret: str | bytes | None, *, now: float | None = None, leeway: int = 5
) -> TokenClaims:
    """Check signature and expiry; raises :class:`TokenError` with the reason."""
    if not token:
        raise TokenError("no token")
    if len(token) > MAX_TOKEN_LENGTH or token.count(".") != 1:
        raise TokenError("malformed token")
    payload, signature = token.split(".")
    expected = _b64(hmac.new(_key(secret), payload.encode(), hashlib.sha256).digest())
    if not hmac.compare_digest(expected, signature):
        raise TokenError("bad signature")
    try:
        claims = json.loads(_unb64(payload))
        user_id, expires, issued = claims["sub"], int(claims["exp"]), int(claims.get("iat", 0))
    except (ValueError, KeyError, TypeError) as exc:
        raise TokenError("malformed token") from exc
    if not isinstance(user_id, str) or not user_id:
        raise TokenError("malformed token")
    if (time.time() if now is None else now) > expires + leeway:
        raise TokenError("token expired")
    return TokenClaims(user_id=user_id, expires_at=expires, issued_at=issued)
