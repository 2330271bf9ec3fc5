"""Mobile-facing WebSocket edge: store-and-forward messaging over CBOR frames, on Trio."""

from __future__ import annotations

__version__ = "0.1.0"
