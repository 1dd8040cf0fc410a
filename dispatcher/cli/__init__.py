"""The `dispatcher` command: a thin typer layer over the services (`services.py`) and the
long-running processes (`serve.py`). Each module adds its commands to `app`."""

from __future__ import annotations

# importing these modules registers their commands on `app`
from dispatcher.cli import deliveries, processes  # noqa: F401
from dispatcher.cli.callbacks import callbacks_app, roles_app, tokens_app
from dispatcher.cli.common import app
from dispatcher.cli.history import db_app, history_app
from dispatcher.cli.shards import shards_app

__all__ = ["app", "main"]

app.add_typer(callbacks_app, name="callbacks")
app.add_typer(roles_app, name="roles")
app.add_typer(tokens_app, name="tokens")
app.add_typer(history_app, name="history")
app.add_typer(db_app, name="db")
app.add_typer(shards_app, name="shards")


def main() -> None:
    app()
