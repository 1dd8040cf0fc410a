"""A key rotation of the stored secrets (`dispatcher tokens rotate`): every callback's
token, previous token and auth header value re-encrypted with the cipher's first key,
each written only while it is still what was read.

The callbacks of a project frozen on the shard (`callbacks_frozen`: it is moving off it,
`dispatcher.shards.move`) are skipped, and counted: its move may have read them to copy
them, and its copy lands on the new shard as it was read, under the key the operator is
about to retire. The mover sets the mark before it copies, and it stays on the old shard
10 minutes after the move; a copy that lands on the new shard after the rotation passed
there read the old shard before the rotation reached it there, so the rotation either
skipped those callbacks or found them gone (the move ended) with the mark still set. So a
rotation also counts the marks left on the shard at the end of its pass: one that skipped
nothing and found no mark re-encrypted what any copy read; otherwise it must run again
once the moves end (the CLI says so)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import structlog
from cryptography.fernet import InvalidToken

from dispatcher.lua import ArgList, Key, Script
from dispatcher.registry.scripts import FROZEN

if TYPE_CHECKING:
    from redis.asyncio import Redis

    from dispatcher.keys import Keys
    from dispatcher.tokens import TokenCipher

__all__ = ["SECRET_FIELDS", "Reencrypt", "Rotated", "rotate_all"]

SECRET_FIELDS = ("secretToken", "previousToken", "authHeaderValue")

log = structlog.get_logger("dispatcher.registry")


class Rotated(NamedTuple):
    """A rotation's counts: secrets re-encrypted, callbacks of moving projects skipped,
    projects frozen on the shard at its end (moving off it, or moved in the last 10
    minutes), and the ids of the callbacks holding a secret no key decrypts (left as it
    is: `_rotated`)."""

    rotated: int
    skipped: int
    moving: int
    unreadable: tuple[str, ...] = ()


@dataclass
class Reencrypt(Script):
    """The new ciphertexts of `callback`'s secrets: `changes` holds (as read, new) pairs;
    each of its `SECRET_FIELDS` that holds a value as read gets its new ciphertext,
    whichever field it was read from (a secret rotation that landed since the read moved
    the token to `previousToken`: it is re-encrypted there; a delete leaves nothing to
    write). Returns
    {fields written, fields holding a value that was not read (written since)}, or
    {`FROZEN`, 0} (nothing written) while its project is `frozen` on this shard."""

    LUA = (
        f"if redis.call('EXISTS', frozen) == 1 then return {{{FROZEN}, 0}} end\n"
        + "local fields = {'"
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
    frozen: Key
    changes: ArgList


async def rotate_all(redis: Redis, keys: Keys, cipher: TokenCipher) -> Rotated:
    """Re-encrypt every stored secret with `cipher`'s first key; returns how many, how many
    callbacks of projects frozen here (moving) were skipped, and how many projects are
    frozen here at the end."""
    rotated = skipped = 0
    unreadable: dict[str, None] = {}  # callback ids, in the order met
    prefix = keys.CALLBACK_PREFIX.encode()
    async for key in redis.scan_iter(match=f"{keys.CALLBACK_PREFIX}*", count=500):
        if key[len(prefix) :].isdigit():  # else not a callback: an index of them
            done = await _rotate_one(redis, keys, key.decode(), cipher, unreadable)
            rotated, skipped = rotated + max(done, 0), skipped + (done == FROZEN)
    moving = 0
    async for _ in redis.scan_iter(match=f"{keys.CALLBACKS_FROZEN_PREFIX}*", count=500):
        moving += 1
    if skipped or moving:
        log.warning("tokens.rotate_skipped", callbacks=skipped, moving_projects=moving)
    return Rotated(rotated, skipped, moving, tuple(unreadable))


async def _rotate_one(
    redis: Redis,
    keys: Keys,
    key: str,
    cipher: TokenCipher,
    unreadable: dict[str, None],
    tries: int = 5,
) -> int:
    """Re-encrypt one callback's secrets (how many), or `FROZEN` when its project is frozen
    here; read again while one changed since its read (a value written meanwhile may be
    under the old key: a platform copy's, say). Its id goes into `unreadable` while a
    secret of it is one no key decrypts."""
    rotated = 0
    for _ in range(tries):
        *stored, project = await redis.hmget(key, [*SECRET_FIELDS, "projectId"])  # type: ignore[misc]  # sync|async
        read = {value.decode() for value in stored if value}
        unreadable.pop(key.removeprefix(keys.CALLBACK_PREFIX), None)  # as of this read
        changes = [
            part
            for value in read
            if (new := _rotated(key, value, cipher, keys, unreadable))
            for part in (value, new)
        ]
        if not changes or project is None:
            break
        frozen = keys.callbacks_frozen(project.decode())
        written, unread = await Reencrypt(key, frozen, changes).run(redis)
        if written == FROZEN:
            return FROZEN
        rotated += int(written)
        if not unread:
            break
    return rotated


def _rotated(
    key: str, value: str, cipher: TokenCipher, keys: Keys, unreadable: dict[str, None]
) -> str | None:
    """`value` under the first key, or None (logged, and its callback's id put in
    `unreadable`) when no key decrypts it: a value that only looks encrypted (stored as
    given while no key was set), or one under a key dropped since. It stays as it is and
    the rotation goes on: it stopped there with a traceback, every callback after it left
    under the old key, at every run again (review); the CLI names them and exits 1 (it
    said all was re-encrypted: review)."""
    try:
        return cipher.rotate(value)
    except InvalidToken:
        log.warning("tokens.rotate_unreadable", callback=key, reason="no key decrypts it")
        unreadable[key.removeprefix(keys.CALLBACK_PREFIX)] = None
        return None
