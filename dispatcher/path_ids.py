"""Numeric ids in URL paths (`/callbacks/{callbackId:id}`, the console's too): the `id`
convertor, registered with Starlette when this module is imported (before the routes that
use it are built).

At most 19 digits (a 64-bit id). Starlette's `int` takes any number of digits, and past
4,300 of them Python refuses to read them: a 500 before any check. A longer id is no
route: a 404 in the envelope.
"""

from __future__ import annotations

from starlette.convertors import Convertor, register_url_convertor

__all__ = ["IdConvertor"]


class IdConvertor(Convertor[int]):
    regex = "[0-9]{1,19}"

    def convert(self, value: str) -> int:
        return int(value)

    def to_string(self, value: int) -> str:
        return str(value)


register_url_convertor("id", IdConvertor())
