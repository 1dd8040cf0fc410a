"""The delivery worker: the job loop (`loop.py`) with its claims (`claims.py`) and its
writes (`writer.py`), over the delivery machinery (`engine.py`). Its names are imported
on first use (PEP 562), so the liveness probe (`liveness.py`) loads nothing else."""

from __future__ import annotations

from typing import TYPE_CHECKING

from dispatcher import lazy

if TYPE_CHECKING:
    from dispatcher.worker.engine import Engine
    from dispatcher.worker.loop import Worker, create_worker

__all__ = ["Engine", "Worker", "create_worker"]

_LOOP = "dispatcher.worker.loop"
_HOME = {"Engine": "dispatcher.worker.engine", "Worker": _LOOP, "create_worker": _LOOP}

if not TYPE_CHECKING:  # (for type checkers, the imports above: a misspelt name is an error)
    __getattr__, __dir__ = lazy.exports(__name__, _HOME)
