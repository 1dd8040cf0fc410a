"""The delivery worker: the job loop (`loop.py`) over the delivery machinery (`engine.py`)."""

from dispatcher.worker.engine import Engine
from dispatcher.worker.loop import create_worker, worker_settings

__all__ = ["Engine", "create_worker", "worker_settings"]
