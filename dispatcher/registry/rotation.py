"""A key rotation of the stored secrets (`dispatcher tokens rotate`): every callback's
token, previous token and auth header value re-encrypted with the cipher's first key,
each written only while it is still what was read."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import structlog
from cryptography.fernet import InvalidToken

from dispatcher.lua import ArgList, Key, Script

if TYPE_CHECKING:
    from redis.asyncio import Redis

    from dispatcher.keys import Keys
    from dispatcher.tokens import TokenCipher

__all__ = ["SECRET_FIELDS", "Reencrypt", "rotate_all"]

SECRET_FIELDS = ("secretToken", "previousToken", "authHeaderValue")

log = structlog.get_logger("dispatcher.registry")


@dataclass
class Reencrypt(Script):
    """The new ciphertexts of `callback`'s secrets: `changes` holds (as read, new) pairs;
    each of its `SECRET_FIELDS` that holds a value as read gets its new ciphertext,
    whichever field it was read from (a secret rotation that landed since the read moved
    the token to `previousToken`: it is re-encrypted there; a delete leaves nothing to
    write). Returns
    {fields written, fields holding a value that was not read (written since)}."""

    LUA = (
        "local fields = {'"
        + "', '".join(SECRET_FIELDS)
        + """'}
local written, unread = 0, 0
for _, field in ipairs(fields) do
  local now = redis.call('HGET', callback, field)
  if now and now ~= '' then
    local new = nil
    for i = 1, #changes, 2 do
      if changes[i] == now then new = changes[i + 1] end
    end
    if new then
      redis.call('HSET', callback, field, new)
      written = written + 1
    else
      unread = unread + 1
    end
  end
end
return {written, unread}
"""
    )
    callback: Key
    changes: ArgList


async def rotate_all(redis: Redis, keys: Keys, cipher: TokenCipher) -> int:
    """Re-encrypt every stored secret with `cipher`'s first key; returns how many."""
    rotated = 0
    prefix = keys.CALLBACK_PREFIX.encode()
    async for key in redis.scan_iter(match=f"{keys.CALLBACK_PREFIX}*", count=500):
        if key[len(prefix) :].isdigit():  # else not a callback: an index of them
            rotated += await _rotate_one(redis, key.decode(), cipher)
    return rotated


async def _rotate_one(redis: Redis, key: str, cipher: TokenCipher, tries: int = 5) -> int:
    """Re-encrypt one callback's secrets; read again while one changed since its read (a
    value written meanwhile may be under the old key: a platform copy's, say)."""
    rotated = 0
    for _ in range(tries):
        stored = await redis.hmget(key, list(SECRET_FIELDS))  # type: ignore[misc]  # sync|async
        read = {value.decode() for value in stored if value}
        changes = [
            part for value in read if (new := _rotated(key, value, cipher)) for part in (value, new)
        ]
        if not changes:
            break
        written, unread = await Reencrypt(key, changes).run(redis)
        rotated += int(written)
        if not unread:
            break
    return rotated


def _rotated(key: str, value: str, cipher: TokenCipher) -> str | None:
    """`value` under the first key, or None (logged) when no key decrypts it: a value that
    only looks encrypted (stored as given while no key was set), or one under a key dropped
    since. It stays as it is and the rotation goes on: it stopped there with a traceback,
    every callback after it left under the old key, at every run again (review)."""
    try:
        return cipher.rotate(value)
    except InvalidToken:
        log.warning("tokens.rotate_unreadable", callback=key, reason="no key decrypts it")
        return None
