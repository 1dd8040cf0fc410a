"""The delivery worker: the job loop (`loop.py`) with its claims (`claims.py`) and its
writes (`writer.py`), over the delivery machinery (`engine.py`). Its names are imported
on first use (PEP 562), so the liveness probe (`liveness.py`) loads nothing else."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dispatcher.worker.engine import Engine
    from dispatcher.worker.loop import Worker, create_worker

__all__ = ["Engine", "Worker", "create_worker"]

_HOME = {"Engine": "engine", "Worker": "loop", "create_worker": "loop"}


if not TYPE_CHECKING:  # (for type checkers, the imports above: a misspelt name is an error)

    def __getattr__(name: str) -> Any:
        home = _HOME.get(name)
        if home is None:
            raise AttributeError(f"module 'dispatcher.worker' has no attribute {name!r}")
        value = getattr(importlib.import_module(f"dispatcher.worker.{home}"), name)
        globals()[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted({*globals(), *__all__})
