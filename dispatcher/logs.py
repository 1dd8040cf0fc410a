"""structlog, configured once per entry point: JSON when not on a TTY, console otherwise."""

from __future__ import annotations

import logging
import sys
from typing import TYPE_CHECKING

import orjson
import structlog

if TYPE_CHECKING:
    from dispatcher.settings import Settings

__all__ = ["configure_logging"]


def configure_logging(settings: Settings) -> None:
    """Route structlog and the standard library (uvicorn, arq) through one renderer."""
    json_output = settings.log_format == "json" or (
        settings.log_format == "auto" and not sys.stderr.isatty()
    )
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    # plain tracebacks: the rich ones print every local of every frame, which can take
    # minutes for a deep async stack
    console = structlog.dev.ConsoleRenderer(exception_formatter=structlog.dev.plain_traceback)
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer() if json_output else console
    )
    level = logging.getLevelNamesMapping()[settings.log_level]
    structlog.configure(
        # a line per delivery attempt is the hot path: orjson straight to bytes
        processors=[
            *shared,
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(serializer=orjson.dumps) if json_output else console,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=(
            structlog.BytesLoggerFactory(sys.stderr.buffer)
            if json_output
            else structlog.PrintLoggerFactory(sys.stderr)
        ),
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                renderer,
            ],
            foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # arq logs a line per job start and end (~20% of a delivery's cost); we log one per
    # attempt ourselves, so keep only its warnings.
    logging.getLogger("arq").setLevel(max(level, logging.WARNING))
    logging.getLogger("uvicorn.access").setLevel(max(level, logging.WARNING))
