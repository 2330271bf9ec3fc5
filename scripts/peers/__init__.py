"""Peer systems and the load generator of scripts/bench_peers.py."""
