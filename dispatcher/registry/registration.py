"""A registration, as every front end makes it (the API's routes, the console's form, the
CLI, the platform's copies): whose callback, where it sends, how it signs, with what
receiver controls. It travels whole from the front end through `Services.register` (and
the platform's `register`) to `Registry.register`; the event (one, or a comma-separated
batch) goes beside it."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dispatcher.headers import AuthHeader
    from dispatcher.models import Region
    from dispatcher.registry.options import Options

__all__ = ["Registration"]


@dataclass(frozen=True, slots=True)
class Registration:
    """One registration: a project's callback (a pipeline's with `pipeline_id`, the
    platform's with `DEVOPS_ALL_PROJECT`), registered by `creator`."""

    project_id: str
    url: str
    region: Region
    creator: str
    secret_token: str | None = None
    pipeline_id: str | None = None
    auth_header: AuthHeader | None = None
    options: Options | None = None

    def to(self, url: str) -> Registration:
        """The same registration to `url` (the URL as checked)."""
        return replace(self, url=url)
