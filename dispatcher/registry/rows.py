"""A callback's hash (`dispatcher:cb:{id}`): what a registration writes (`Upsert`), and the
`Callback` the front ends show of it (`to_callback`), secrets left out."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from dispatcher import keys
from dispatcher.clock import now_ms
from dispatcher.failing import failing_names
from dispatcher.models import Callback, Event, Level, Region
from dispatcher.registry.options import Options
from dispatcher.registry.rules import level_of
from dispatcher.registry.scripts import UpsertCallback

if TYPE_CHECKING:
    from collections.abc import Mapping

    from dispatcher.headers import AuthHeader
    from dispatcher.keys import Keys

__all__ = ["Upsert", "to_callback"]


@dataclass(frozen=True, slots=True)
class Upsert:
    """One registration, checked, its secrets as stored (encrypted when keys are set): the
    callback's identity, written when it is created, and what every registration sets
    (which ends a rotation in progress: the token given is the only one that signs)."""

    project_id: str
    pipeline_id: str | None
    level: Level
    url: str
    region: Region
    token: str
    auth_header: AuthHeader | None
    creator: str
    options: Options

    def script(
        self, k: Keys, event: Event, now_ms: int, id_floor: int, limit: int
    ) -> UpsertCallback:
        """The write of this registration for `event` (see `scripts.UpsertCallback`), a new
        callback refused when its project already holds `limit` (0: no limit)."""
        scope = keys.scope(self.project_id, self.pipeline_id)
        listings = [k.project_callbacks(self.project_id)]
        if self.pipeline_id:
            listings.append(k.pipeline_callbacks(self.project_id, self.pipeline_id))
        once, every = self.pairs(event)
        return UpsertCallback(
            unique=k.callback_unique(scope),
            counter=k.CALLBACK_SEQ,
            match=k.match(scope, event.value),
            disabled=k.CALLBACKS_DISABLED,
            **failing_names(k),
            ordered_flag=k.lanes_ordered(self.project_id),
            version=k.registry_version(self.project_id),
            frozen=k.callbacks_frozen(self.project_id),
            listings=listings,
            field=keys.callback_unique_field(event.value, self.url),
            now_ms=now_ms,
            callback_prefix=k.CALLBACK_PREFIX,
            health_prefix=k.HEALTH_PREFIX,
            filter_errors_prefix=k.FILTER_ERRORS_PREFIX,
            id_floor=id_floor,
            limit=limit,
            ordered="1" if self.options.order_by else "0",  # from now on, events numbered
            once=len(once) // 2,
            values=[*once, *every],
        )

    def pairs(self, event: Event) -> tuple[list[str], list[str]]:
        """The hash's field/value pairs for `event`: those written when the callback is
        created (its identity), and those every registration writes."""
        once = [
            "projectId",
            self.project_id,
            "url",
            self.url,
            "event",
            event.value,
            "pipelineId",
            self.pipeline_id or "",
            "level",
            self.level.value,
            "creator",
            self.creator,
        ]
        name, value = self.auth_header or ("", "")
        every = [
            "region",
            self.region.value,
            "secretToken",
            self.token,
            "previousToken",
            "",
            "previousTokenUntil",
            "",
            "authHeaderName",
            name,
            "authHeaderValue",
            value,
            *self.options.to_fields(),
        ]
        return once, every


def to_callback(row: Mapping[str, str]) -> Callback:
    """A callback's hash as the API shows it: whether it has secrets, never them; a
    rotation's end while the previous token still signs."""
    pipeline_id = row.get("pipelineId") or None
    options = Options.from_row(row)
    until = int(row.get("previousTokenUntil") or 0)
    rotating = bool(row.get("previousToken")) and until > now_ms()
    return Callback(
        id=int(row["id"]),
        project_id=row["projectId"],
        url=row["url"],
        event=Event(row["event"]),
        region=Region(row["region"]),
        level=Level(row.get("level") or level_of(row["projectId"], pipeline_id)),
        pipeline_id=pipeline_id,
        enabled=row.get("enabled") == "1",
        disabled_reason=row.get("disabledReason") or None,
        has_secret_token=bool(row.get("secretToken")),
        has_auth_header=bool(row.get("authHeaderName")),
        created_time=int(row["createdTime"]),
        updated_time=int(row["updatedTime"]),
        creator=row.get("creator") or None,
        max_per_second=options.max_per_second,
        max_in_flight=options.max_in_flight,
        filter=options.filter,
        order_by=options.order_by,
        rotation_end_time=until if rotating else None,
        filter_errors=int(row.get("filterErrors") or 0),
        filter_last_error=row.get("filterLastError") or None,
    )
