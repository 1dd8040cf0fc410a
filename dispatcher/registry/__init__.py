"""The callback registry: who wants which event, at which URL, at every level.

- `store.py`: `Registry` (register, batch, list, get, delete, enable/disable, secrets at
  rest, the layout upgrade);
- `confirmed.py`: `ConfirmedRegistry`, the `Registry` of `Services`, whose acknowledged
  changes the replicas `DISPATCHER_REDIS_MIN_REPLICAS` asks for confirm first;
- `match.py`: an event's callbacks over the platform, project and pipeline levels, a chunk
  at a time, one delivery per URL;
- `rules.py`: what a registration must satisfy (URL, ids, token, events per level);
- `options.py`: the receiver controls a registration may add (limits, filter);
- `registration.py`: a registration as front ends make it, carried whole;
- `rows.py`: a callback's hash as a registration writes it and the API shows it;
- `scripts.py`: the Lua scripts behind them.
"""

from dispatcher.registry.match import CallbackTarget, Chunk, ChunkQuery
from dispatcher.registry.options import Options
from dispatcher.registry.registration import Registration
from dispatcher.registry.rules import MAX_URL_LENGTH, url_problem, validate_url
from dispatcher.registry.store import Registry

__all__ = [
    "MAX_URL_LENGTH",
    "CallbackTarget",
    "Chunk",
    "ChunkQuery",
    "Options",
    "Registration",
    "Registry",
    "url_problem",
    "validate_url",
]
