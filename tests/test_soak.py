"""A short soak: churning devices against a real `gateway serve`, memory and files sampled.

The long run is scripts/soak.py; this one is long enough to pass warm-up and show a
plateau on a quiet machine, and to catch a leak of open files outright. It runs on each
store backend; on Redis the gateway's pooled connections to it are counted apart.
"""

from __future__ import annotations

from scripts.kit.gateway_process import GatewayProcess, open_store
from scripts.kit.limits import raise_fd_limit
from scripts.soak import redis_servers, run_soak


async def test_a_short_soak_loses_nothing_and_plateaus(tmp_path, process_store):
    raise_fd_limit()
    async with open_store(process_store, tmp_path) as store:
        gateway = GatewayProcess(tmp_path / "gateway", store=store.toml)
        await gateway.astart()
        try:
            report = await run_soak(
                gateway,
                seconds=6.0,
                devices=30,
                sample_every=0.2,
                seed=3,
                redis=redis_servers(store),
            )
        finally:
            gateway.kill()

    assert report.failures(tolerance=0.25) == [], report.table()
    assert report.sessions > 60 and len(report.sent) > 100
    # Enough samples for the plateau check's thirds; fewer than the 30 asked for when the
    # machine is busy (a Redis Cluster sample reads three primaries).
    assert len(report.samples) >= 10
    assert report.device_sockets_after == 0
