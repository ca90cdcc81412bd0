"""Connection tokens for the WebSocket server: standard HS256 JWTs (made and checked with PyJWT).

The secret is ``WebSocketRPCConfig.websocket_secret``. A token names its user in the claim
``user_id``, else ``sub``, else ``id`` (the first that is set; numbers become strings), as
django-ipc's tokens do, so tokens minted by either family work with both servers. ``exp`` is
checked when present (tokens made here always carry it); ``aud`` and ``iss`` are checked when the
server is configured with an audience or issuer.

Django mints one per user with :func:`make_token`; browsers pass it as ``?token=...``, in an
``Authorization: Bearer`` header, or as django-ipc's first text frame ``Bearer <token>``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from ..exceptions import RPCConfigurationError, RPCException

#: Largest token accepted (bytes).
MAX_TOKEN_LENGTH = 4096
#: The only signing algorithm (django-ipc's default).
ALGORITHM = "HS256"
#: Claims that may name the user, in the order they are looked at.
USER_CLAIMS = ("user_id", "sub", "id")


class TokenError(RPCException):
    """A token is missing, malformed, badly signed or expired; ``reason`` says which."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


@dataclass(frozen=True)
class TokenClaims:
    """What a valid token proves (``expires_at`` is 0 for a token without ``exp``)."""

    user_id: str
    expires_at: int
    issued_at: int


def _jwt() -> Any:
    try:
        import jwt
    except ImportError as exc:  # pragma: no cover - the websocket extra is missing
        raise RPCConfigurationError(
            "connection tokens need PyJWT: pip install 'rpc-tasks[websocket]'"
        ) from exc
    return jwt


def _key(secret: str | bytes | None) -> bytes:
    if not secret:
        raise RPCConfigurationError("a websocket_secret is needed to sign/verify connection tokens")
    return secret.encode() if isinstance(secret, str) else secret


def make_token(
    user_id: str,
    secret: str | bytes | None = None,
    *,
    ttl: int = 3600,
    now: float | None = None,
    audience: str | None = None,
    issuer: str | None = None,
) -> str:
    """Mint an HS256 JWT for ``user_id`` valid ``ttl`` seconds (secret: the config's by default).

    It carries ``user_id`` and ``sub`` (both the user), ``iat``, ``exp``, and ``aud``/``iss``
    when given.
    """
    if secret is None:
        from ..config import get_config

        configured = get_config().websocket_secret
        secret = configured.get_secret_value() if configured is not None else None
    if not user_id or len(user_id) > 256:
        raise ValueError("user_id must be 1..256 characters")
    issued = int(time.time() if now is None else now)
    claims: dict[str, Any] = {"user_id": user_id, "sub": user_id, "iat": issued, "exp": issued + int(ttl)}
    if audience is not None:
        claims["aud"] = audience
    if issuer is not None:
        claims["iss"] = issuer
    return str(_jwt().encode(claims, _key(secret), algorithm=ALGORITHM))


def verify_token(
    token: str | None,
    secret: str | bytes | None,
    *,
    now: float | None = None,
    leeway: int = 5,
    audience: str | None = None,
    issuer: str | None = None,
) -> TokenClaims:
    """Check signature, expiry (``exp``, when present) and, when given, audience and issuer.

    Raises :class:`TokenError` whose reason is one of ``no token``, ``malformed token``,
    ``bad signature``, ``token expired``, ``wrong audience``, ``wrong issuer``, ``no user
    claim``.
    """
    if not token:
        raise TokenError("no token")
    if len(token) > MAX_TOKEN_LENGTH or token.count(".") != 2:
        raise TokenError("malformed token")
    jwt = _jwt()
    options = {"verify_exp": False, "verify_iat": False, "verify_nbf": False, "verify_sub": False}
    try:
        claims = jwt.decode(
            token,
            _key(secret),
            algorithms=[ALGORITHM],
            audience=audience,
            issuer=issuer,
            options={**options, "verify_aud": audience is not None},
        )
    except jwt.InvalidSignatureError:
        raise TokenError("bad signature") from None
    except jwt.InvalidAudienceError:
        raise TokenError("wrong audience") from None
    except jwt.InvalidIssuerError:
        raise TokenError("wrong issuer") from None
    except jwt.MissingRequiredClaimError as exc:
        raise TokenError("wrong audience" if exc.claim == "aud" else "wrong issuer") from None
    except jwt.InvalidTokenError:
        raise TokenError("malformed token") from None
    user = next((claims[c] for c in USER_CLAIMS if claims.get(c) not in (None, "")), None)
    if user is None or isinstance(user, (dict, list, bool)):
        raise TokenError("no user claim")
    try:
        expires = int(claims.get("exp", 0) or 0)
        issued = int(claims.get("iat", 0) or 0)
    except (TypeError, ValueError):
        raise TokenError("malformed token") from None
    if expires and (time.time() if now is None else now) > expires + leeway:
        raise TokenError("token expired")
    user_id = str(user)
    if len(user_id) > 256:
        raise TokenError("malformed token")
    return TokenClaims(user_id=user_id, expires_at=expires, issued_at=issued)
