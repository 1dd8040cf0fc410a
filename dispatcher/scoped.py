"""Ids and fields made unique across projects, as keys and the scripts that read them
spell them (`dispatcher.keys` builds the keys around them)."""

from __future__ import annotations

__all__ = [
    "HISTORY_ID_WIDTH",
    "SEP",
    "UNIQUE_SEP",
    "callback_unique_field",
    "history_member",
    "project_scoped",
    "scope",
]

SEP = ":"
# between event and url in the upsert hash's field (a URL never holds white space)
UNIQUE_SEP = " "
# history ids are zero-padded in the index so that equal times order by id
HISTORY_ID_WIDTH = 15


def project_scoped(project_id: str, local_id: str) -> str:
    """An id made unique across projects: `{project}:{id}`. A project id holds no `:`, so
    the first `:` ends it whatever the local id holds (event ids may hold `:`)."""
    return f"{project_id}{SEP}{local_id}"


def scope(project_id: str, pipeline_id: str | None = None) -> str:
    """Whose callbacks: a project's own (the platform's too), or one pipeline's."""
    return f"{project_id}{SEP}{pipeline_id}" if pipeline_id else project_id


def callback_unique_field(event: str, url: str) -> str:
    return f"{event}{UNIQUE_SEP}{url}"


def history_member(record_id: int) -> str:
    """A record id as its index stores it."""
    return f"{record_id:0{HISTORY_ID_WIDTH}d}"
