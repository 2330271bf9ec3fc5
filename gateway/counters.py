"""The plain counters the gateway keeps about itself, read by `/metrics` at scrape time.

Nothing on the hot path touches Prometheus objects: the edge, the router and the cluster
link add to these integers and `Counter`s, and `gateway.metrics` turns them into
metric families when scraped.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass
class Counters:
    """Counters of one gateway process."""

    connections_opened: int = 0
    messages_in: int = 0
    messages_out: int = 0
    frames_in: int = 0
    frames_out: int = 0
    sends: Counter[str] = field(default_factory=Counter)
    rate_limited: int = 0
    shed: Counter[str] = field(default_factory=Counter)
    closes: Counter[int] = field(default_factory=Counter)
    # Redis backend and cluster bus: errors, recoveries, doorbells and kicks across nodes.
    redis: Counter[str] = field(default_factory=Counter)
