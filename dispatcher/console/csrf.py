"""CSRF protection of the console's forms: a signed double-submit token.

Each page sets a random nonce in a cookie (when the browser has none) and puts in every
form a token that signs (nonce, user) with a key kept in Redis, so every API process
shares it and nobody has to configure one. A POST passes only when its form's token has a
valid signature, is younger than `TOKEN_MAX_AGE_S`, names the caller, and names the nonce
of the cookie the browser sent. Another site can make a browser send the cookie but can
neither read it nor sign a token for it.
"""

from __future__ import annotations

import hmac
import secrets
from typing import TYPE_CHECKING

from itsdangerous import BadSignature, URLSafeTimedSerializer

from dispatcher.errors import Forbidden

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from starlette.requests import Request
    from starlette.responses import Response

    from dispatcher.keys import Keys

__all__ = ["COOKIE", "FIELD", "TOKEN_MAX_AGE_S", "Csrf"]

COOKIE = "dispatcher_console_csrf"
FIELD = "csrf_token"
TOKEN_MAX_AGE_S = 12 * 3600
_SALT = "dispatcher-console-csrf"
_NONCE_BYTES = 16


async def _signer(redis: Redis, name: str) -> URLSafeTimedSerializer:
    """The serializer keyed by the shared key `name` (made by the first process that needs
    it)."""
    key = await redis.get(name)
    if key is None:
        await redis.set(name, secrets.token_hex(32), nx=True)
        key = await redis.get(name)
    return URLSafeTimedSerializer(key, salt=_SALT)


def _cookie_nonce(request: Request) -> str | None:
    nonce = request.cookies.get(COOKIE, "")
    return nonce if 16 <= len(nonce) <= 64 and nonce.isascii() else None


class Csrf:
    """The token of one request: made for pages, checked for forms."""

    def __init__(self, request: Request, redis: Redis, keys: Keys, uid: str) -> None:
        self.request = request
        self.redis = redis
        self.key_name = keys.CONSOLE_CSRF_KEY
        self.uid = uid
        self.nonce = _cookie_nonce(request)
        self.new_nonce = self.nonce is None

    async def token(self) -> str:
        """The token the page's forms carry (a new nonce when the browser sent none)."""
        if self.nonce is None:
            self.nonce = secrets.token_urlsafe(_NONCE_BYTES)
        signed: str = (await _signer(self.redis, self.key_name)).dumps([self.uid, self.nonce])
        return signed

    def set_cookie(self, response: Response, path: str) -> None:
        """Set the nonce cookie when this request made a new one."""
        if self.new_nonce and self.nonce is not None:
            response.set_cookie(
                COOKIE,
                self.nonce,
                path=path,
                httponly=True,
                samesite="lax",
                secure=self.request.url.scheme == "https",
            )

    async def check(self, token: str) -> None:
        """Refuse (403) a form whose token is missing, forged, expired, or not this
        caller's and this browser's."""
        if not token:
            raise Forbidden("the form has no CSRF token: reload the page and try again")
        if self.nonce is None:
            raise Forbidden("no CSRF cookie came with the form: reload the page and try again")
        try:
            uid, nonce = (await _signer(self.redis, self.key_name)).loads(
                token, max_age=TOKEN_MAX_AGE_S
            )
        except (BadSignature, ValueError, TypeError):
            raise Forbidden(
                "the form's CSRF token is invalid or expired: reload the page and try again"
            ) from None
        same_nonce = hmac.compare_digest(str(nonce).encode(), self.nonce.encode())
        if not (same_nonce and hmac.compare_digest(str(uid).encode(), self.uid.encode())):
            raise Forbidden("the form's CSRF token is not this session's: reload the page")
