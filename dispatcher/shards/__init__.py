"""Projects spread over shards: independent Redis servers, or one Redis Cluster: what
the operators and the front ends use.

A shard is a key namespace on one Redis client (`dispatcher/shard.py`: its position, its
`Keys`); the services of a shard are today's `Services`, unchanged in shape. A project
lives on one shard: its registry, queue, leases, progress and Redis history. Which one is
the placement's answer (`dispatcher/placement.py`: rendezvous hashing over the shards, and
explicit per-project placements that `dispatcher shards move` writes); the clients come
from `dispatcher/topology.py`. Those three sit low in the flow (the producer and the
worker use them); this package sits above the services. The router (`router.py`) is the
only layer the front ends call: it hands out a project's shard, writes the platform-wide
callbacks (`DEVOPS_ALL_PROJECT`) to every shard (`platform.py`), and adds up the
operator's views over all shards (`views.py`). Growing is a move of the projects whose
shard changes (`move.py`).

Modules are imported by their full name (`dispatcher.shards.router`): this package imports
nothing itself.
"""
