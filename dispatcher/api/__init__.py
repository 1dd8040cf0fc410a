"""The HTTP API: the seed routes to the letter, their neighbours in the same envelope.

`create_app` builds it; each area is a router of its own (`callbacks`, `history`,
`events`, `operator`, `probes`), with the dependencies in `deps` and the envelope and
error handlers in `errors`.
"""

from dispatcher.api.app import create_app

__all__ = ["create_app"]
