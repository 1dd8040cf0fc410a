"""Benchmarks of callback-dispatcher: `python -m bench` (full) or `python -m bench --quick`.

Everything runs on this machine: a private redis-server, a minimal HTTP receiver in its own
process (not project code), workers and load generators in their own processes. See
bench/README.md.
"""

from __future__ import annotations
