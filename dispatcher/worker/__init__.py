"""The delivery worker: the job loop (`loop.py`) with its claims (`claims.py`) and its
writes (`writer.py`), over the delivery machinery (`engine.py`)."""

from dispatcher.worker.engine import Engine
from dispatcher.worker.loop import Worker, create_worker

__all__ = ["Engine", "Worker", "create_worker"]
