"""Platform-wide callbacks (project `DEVOPS_ALL_PROJECT`), with the operator token only:
register, list, show, delete, enable and disable, in the same envelope. They receive the
project events of every project, and any other event they subscribe to, of every project."""

from __future__ import annotations

from dispatcher.api.callbacks import callback_routes
from dispatcher.api.deps import platform_operator

__all__ = ["router"]

router = callback_routes(
    "/operator/callbacks", "platform callbacks", platform_operator, platform_operator
)
