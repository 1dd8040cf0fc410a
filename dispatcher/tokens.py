"""Secret tokens at rest: Fernet-encrypted when keys are configured, with key rotation.

`DISPATCHER_TOKEN_KEYS` is a comma-separated list of Fernet keys: the first encrypts, all
decrypt. To rotate, put a new key first, run `dispatcher tokens rotate` (re-encrypts every
stored token with it), then drop the old key. Without keys tokens are stored as given.
"""

from __future__ import annotations

from functools import lru_cache

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

__all__ = ["PREFIX", "NoKeys", "TokenCipher", "readable"]

PREFIX = "fernet:"


class NoKeys(ValueError):
    """A stored secret is encrypted, and this process has no `DISPATCHER_TOKEN_KEYS`: it
    sent the encrypted text as the token, and signed with it (review)."""

    def __init__(self) -> None:
        super().__init__(
            "the callback's secrets are encrypted, and this process has no "
            "DISPATCHER_TOKEN_KEYS: give it the fleet's keys (retried meanwhile)"
        )


class TokenCipher:
    """Encrypts tokens for storage and decrypts them for delivery."""

    def __init__(self, keys: list[str]) -> None:
        if not keys:
            raise ValueError("TokenCipher needs at least one Fernet key")
        fernets = []
        for position, key in enumerate(keys, 1):  # which one is wrong, never what it holds
            try:
                fernets.append(Fernet(key.strip().encode()))
            except (ValueError, TypeError) as exc:
                raise ValueError(
                    f"DISPATCHER_TOKEN_KEYS must be Fernet keys: key {position} of {len(keys)}"
                    f"{' is empty (a comma too many?)' if not key.strip() else ' is not one'}"
                    " (32 url-safe base64 bytes; make one with `dispatcher tokens new-key`)"
                ) from exc
        self._fernet = MultiFernet(fernets)
        self.decrypt = lru_cache(maxsize=4096)(self._decrypt)  # one decryption per token

    @classmethod
    def from_keys(cls, keys: str | None) -> TokenCipher | None:
        """The cipher of a comma-separated key list, or None when there is none."""
        if not keys:
            return None
        return cls(keys.split(","))

    @staticmethod
    def new_key() -> str:
        return Fernet.generate_key().decode()

    def encrypt(self, token: str) -> str:
        if not token:
            return ""
        return PREFIX + self._fernet.encrypt(token.encode()).decode()

    def _decrypt(self, stored: str) -> str:
        if not stored.startswith(PREFIX):
            return stored  # stored before encryption was configured
        try:
            return self._fernet.decrypt(stored[len(PREFIX) :].encode()).decode()
        except InvalidToken as exc:
            raise ValueError(
                "a stored token cannot be decrypted with DISPATCHER_TOKEN_KEYS"
            ) from exc

    def rotate(self, stored: str) -> str:
        """`stored` re-encrypted with the first key (plain tokens get encrypted)."""
        if not stored:
            return ""
        if not stored.startswith(PREFIX):
            return self.encrypt(stored)
        return PREFIX + self._fernet.rotate(stored[len(PREFIX) :].encode()).decode()


def readable(cipher: TokenCipher | None, stored: str) -> str:
    """A stored secret as sent; `NoKeys` for an encrypted one while there is no cipher
    (registration refuses the prefix in a token: no secret as given starts with it)."""
    if cipher is None:
        if stored.startswith(PREFIX):
            raise NoKeys
        return stored
    return cipher.decrypt(stored) if stored else stored
