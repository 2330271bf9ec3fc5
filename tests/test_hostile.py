"""Hostile clients against a real `gateway serve` process, all at once, at a small size.

Slowloris upgrades, a flood of upgrades that never say `hello`, a reader that never reads,
a ping flood and oversized messages run together while well-behaved pairs exchange
messages. Each hostile client must get the contract's treatment, and the well-behaved ones
must lose nothing and see no error, on each store backend (SQLite, and Redis on its own
redis-server). Latency under attack is measured by scripts/hostile.py.
"""

from __future__ import annotations

from scripts.hostile import GATEWAY_SERVER, HostileSizes, run_hostile
from scripts.kit.gateway_process import GatewayProcess, open_store
from scripts.kit.limits import raise_fd_limit


async def test_hostile_clients_get_their_close_and_others_lose_nothing(tmp_path, process_store):
    raise_fd_limit()
    sizes = HostileSizes(
        seconds=3.0, pairs=3, interval=0.02, slowloris=20, trickle=0.5, flood=200,
        stuck_messages=150, oversized=5,
    )  # fmt: skip
    async with open_store(process_store, tmp_path) as store:
        # 2 s handshake/hello/write timeouts
        gateway = GatewayProcess(tmp_path / "gateway", server=GATEWAY_SERVER, store=store.toml)
        await gateway.astart()
        try:
            report = await run_hostile(gateway, sizes)
            assert gateway.running
        finally:
            gateway.kill()

    assert report.well_behaved_errors == []
    assert len(report.latencies) > 50
    # The gateway hangs up on every one (a FIN, or a reset if more bytes were in flight).
    slowloris = report.closes["slowloris"]
    assert slowloris["closed"] + slowloris["reset"] == 20 and not slowloris["never closed"]
    assert max(report.slowloris_closed_after) < 2.0 + 3.0  # handshake_timeout + slack
    assert report.closes["no hello"] == {4008: 200}
    assert report.closes["oversized"] == {1009: 5}
    assert (
        report.closes["never reads"]["gateway: 1013: send blocked"]
        + report.closes["never reads"]["gateway: 1013: buffer full"]
        == 1
    ), report.closes["never reads"]
    assert report.never_reader_kept == report.never_reader_sent == 150  # nothing lost
    assert report.pings_answered > 0
    # Bounded memory: 200 idle upgrades and a 9 MB backlog cost far less than this.
    assert max(report.rss_kib) - report.rss_kib[0] < 64 * 1024
