"""What goes out for an attempt: the callback checked (what an older version stored, the
egress policy for its address), then the request sent with its region's client, both
within the attempt's total timeout (a proxy region's own lookup of the host included).

What cannot be sent, or raises while being checked, fails that delivery alone, for good
(retrying it would fail the same way); a host whose lookup fails for now is tried again,
and so is a callback whose secrets this process cannot read (a key it lacks: a change of
`DISPATCHER_TOKEN_KEYS` rolling out; it failed for good, and counted toward disabling).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import structlog

from dispatcher.delivery import Attempted, AttemptResult, Limits, Outcome, Outgoing, attempt
from dispatcher.errors import InvalidUrl, describe
from dispatcher.headers import unsendable
from dispatcher.lookups import owned

if TYPE_CHECKING:
    from dispatcher.egress import AddressPolicy, Client
    from dispatcher.jobs import DeliveryJob
    from dispatcher.models import Region
    from dispatcher.registry import CallbackTarget
    from dispatcher.settings import Settings

__all__ = ["Sender"]

log = structlog.get_logger("dispatcher.worker")


class Sender:
    """A worker's requests: one client and one egress policy per region."""

    def __init__(
        self,
        settings: Settings,
        policies: dict[Region, AddressPolicy],
        clients: dict[Region, Client],
    ) -> None:
        self.settings, self.policies, self.clients = settings, policies, clients
        self.limits = Limits.of(settings)

    async def send(
        self, job: DeliveryJob, target: CallbackTarget, trace_headers: dict[str, str]
    ) -> Attempted:
        """The attempt and what came of it."""
        if target.problem is not None:  # its secrets unreadable here: a key rolling out
            log.warning("delivery.secrets_unreadable", callback_id=target.id,
                        delivery_id=job.delivery_id, problem=target.problem)  # fmt: skip
            return Attempted(AttemptResult.unsent(target.problem, Outcome.RETRY), [])
        problem = target.destination.problem or unsendable(target.secret_token, target.auth_header)
        if problem is not None:  # stored by an older version: nothing goes out
            return Attempted(AttemptResult.unsent(problem), [])
        limits, started = self.limits, time.monotonic()
        with owned(target.project_id):  # its name lookups count as its owner's
            try:
                refused = await self._refusal(target)
            except Exception as exc:
                refused = AttemptResult.unsent(f"the request could not be sent: {describe(exc)}")
            if refused is None and target.region in self.settings.region_proxies:
                spent = time.monotonic() - started  # its lookup: within the total timeout
                left = round(max(limits.total_timeout - spent, 0.01), 2)
                limits = replace(limits, total_timeout=left)
            out = Outgoing(
                target.url, job.body, job.event, job.delivery_id, job.emitter,
                target.secret_token, target.previous_token, target.auth_header, trace_headers,
            )  # fmt: skip
            return await attempt(self.clients[target.region], limits, out, refused=refused)

    async def _refusal(self, target: CallbackTarget) -> AttemptResult | None:
        """The egress policy's answer for the callback's address: None when it may go."""
        policy = self.policies[target.region]
        # Literal addresses, ports and metadata names: the resolver never sees them.
        refusal = policy.refusal_at(target.destination.hostname, target.destination.port)
        if refusal is None and target.region in self.settings.region_proxies:
            # Through a proxy the proxy resolves the host: check its addresses ourselves.
            enforced = target.region in self.settings.proxy_enforced_regions
            total = self.limits.total_timeout
            try:
                async with asyncio.timeout(total):  # within the attempt's (`send`)
                    await policy.check_resolved(target.url, must_resolve=not enforced)
            except TimeoutError:  # a hung resolver: try again later
                return _unresolved(target.url, OSError(0, f"timed out after {total:g}s"))
            except InvalidUrl as exc:
                refusal = exc.message
            except OSError as exc:  # a temporary lookup failure: try again later
                return _unresolved(target.url, exc)
        return None if refusal is None else AttemptResult.unsent(f"refused: {refusal}")


def _unresolved(url: str, exc: OSError) -> AttemptResult:
    """An attempt that sent nothing because the host's lookup failed for now: retried."""
    error = f"could not resolve host {urlsplit(url).hostname}: {exc.strerror or 'lookup failed'}"
    return AttemptResult.unsent(error, Outcome.RETRY)
