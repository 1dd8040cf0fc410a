"""A key rotation of the stored secrets (`dispatcher tokens rotate`): every callback's
token, previous token and auth header value re-encrypted with the cipher's first key,
each written only while it is still what was read."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from dispatcher.lua import ArgList, Key, Script

if TYPE_CHECKING:
    from redis.asyncio import Redis

    from dispatcher.keys import Keys
    from dispatcher.tokens import TokenCipher

__all__ = ["SECRET_FIELDS", "Reencrypt", "rotate_all"]

SECRET_FIELDS = ("secretToken", "previousToken", "authHeaderValue")


@dataclass
class Reencrypt(Script):
    """The new ciphertexts of `callback`'s secrets: `changes` holds (field, as read, new)
    triples, each written only while the field still holds what was read (a secret
    rotation or a delete that landed since the read wins: a deleted callback's field
    holds nothing). Returns how many were written."""

    LUA = """
local written = 0
for i = 1, #changes, 3 do
  if redis.call('HGET', callback, changes[i]) == changes[i + 1] then
    redis.call('HSET', callback, changes[i], changes[i + 2])
    written = written + 1
  end
end
return written
"""
    callback: Key
    changes: ArgList


async def rotate_all(redis: Redis, keys: Keys, cipher: TokenCipher) -> int:
    """Re-encrypt every stored secret with `cipher`'s first key; returns how many."""
    rotated = 0
    prefix = keys.CALLBACK_PREFIX.encode()
    async for key in redis.scan_iter(match=f"{keys.CALLBACK_PREFIX}*", count=500):
        if not key[len(prefix) :].isdigit():  # not a callback: an index of them
            continue
        stored = await redis.hmget(key, list(SECRET_FIELDS))  # type: ignore[misc]  # sync|async
        changes = [
            part
            for name, value in zip(SECRET_FIELDS, stored, strict=True)
            if value
            for part in (name, value.decode(), cipher.rotate(value.decode()))
        ]
        if changes:
            rotated += int(await Reencrypt(key.decode(), changes).run(redis))
    return rotated
