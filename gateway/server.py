"""The gateway process: services, the WebSocket listener, and graceful shutdown.

```
serve_gateway
└─ services nursery: store writer (group commit), push dispatcher
   └─ background nursery: expiry sweeper, load probe, presence clock, heartbeat, cluster
      link, admin API, the device listeners
      └─ connections nursery: one task per connection; short flush tasks while other
         tasks have queued output for one
```

Start it with ``server = await nursery.start(serve_gateway, settings)``; the `GatewayServer`
handed back knows the real port (port 0 picks a free one) and can `shutdown()` gracefully.
"""

from __future__ import annotations

import logging
import secrets
from typing import Any

import trio

from gateway.admin import serve_admin
from gateway.admission import Admission
from gateway.auth import TokenVerifier
from gateway.clock import now_ms
from gateway.cluster import ClusterLink
from gateway.cluster_presence import ClusterPresence
from gateway.connection import CLOSE_TIMEOUT, EdgeContext
from gateway.counters import Counters
from gateway.edge import WS_PATH, Edge
from gateway.errors import GatewayError, StoreError
from gateway.frames import FrameParser
from gateway.heartbeat import Heartbeat
from gateway.listener import AcceptStats, EdgeListener
from gateway.overload import LoadMonitor
from gateway.presence_link import build_presence
from gateway.registry import Registry
from gateway.router import Router
from gateway.sessions import Sessions
from gateway.settings import Settings
from gateway.store import MessageStore, open_store
from gateway.store.redis import RedisStore
from gateway.tls import TlsCertificate
from gateway.workers import open_reuseport_listeners
from push.dispatcher import PushDispatcher
from push.providers import build_providers
from push.waker import Waker

log = logging.getLogger(__name__)

class Gateway:
    """The components one gateway process shares between its connections."""

    def __init__(self, settings: Settings, *, waker: Waker | None = None) -> None:
        self.settings = settings
        self.metrics = Counters()
        self.push: PushDispatcher | None = None  # None when the caller brings its own waker
        if waker is None:
            waker = self.push = PushDispatcher(settings.push, build_providers(settings.push))
        self.registry = Registry(waker)
        self.node_id = secrets.token_hex(6)  # this process, among nodes sharing Redis
        self.store: MessageStore = open_store(
            settings, self.registry.ring, counters=self.metrics.redis, node_id=self.node_id
        )
        self.cluster: ClusterLink | None = None
        if isinstance(self.store, RedisStore):
            self.cluster = ClusterLink(self, self.store)
        self.verifier = TokenVerifier(settings.auth)
        self.load = LoadMonitor(settings.server.overload_lag)
        self.admission = Admission(settings.limits, now=trio.current_time())
        self.accepts = AcceptStats()
        self.tls = _tls_certificate(settings)
        self.cluster_presence: ClusterPresence | None = None  # set by build_presence
        self.presence = build_presence(self)
        self.router = Router(
            self.store,
            self.registry,
            self.presence,
            self.metrics,
            clock=now_ms,
            max_ttl=settings.server.max_ttl,
        )
        self.parser = FrameParser(max_ttl=settings.server.max_ttl)
        self.sessions = Sessions(
            self.verifier, self.store, self.registry, self.presence, self.cluster
        )
        self.heartbeat = Heartbeat(settings.server.heartbeat)
        self.edge: Edge | None = None  # once the connections nursery is open

    @property
    def connections(self) -> dict[int, Any]:
        """Live connections by id, including those before `hello`."""
        return self.edge.connections if self.edge is not None else {}

    @property
    def draining(self) -> bool:
        """Whether a graceful shutdown has begun."""
        return self.edge is not None and self.edge.draining

    async def wait_for_close(self, user: str, device: str) -> int:
        """Wait until the next connection of (user, device) ends; return its close code."""
        assert self.edge is not None
        return await self.edge.wait_for_close(user, device)


class GatewayServer:
    """A running gateway, as handed back by ``nursery.start(serve_gateway, ...)``."""

    def __init__(self, gateway: Gateway, port: int) -> None:
        self.gateway = gateway
        self.port = port
        self.admin_port: int | None = None  # None while the admin port cannot be bound
        self._shutdown = trio.Event()

    @property
    def url(self) -> str:
        """The device endpoint, for clients on this host."""
        server = self.gateway.settings.server
        scheme = "wss" if server.tls_cert else "ws"
        host = server.host if server.host not in ("0.0.0.0", "::", "") else "127.0.0.1"
        host = f"[{host}]" if ":" in host else host
        return f"{scheme}://{host}:{self.port}{WS_PATH}"

    @property
    def admin_url(self) -> str:
        """The admin and backend API, for clients on this host."""
        admin = self.gateway.settings.admin
        host = admin.host if admin.host not in ("0.0.0.0", "::", "") else "127.0.0.1"
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{self.admin_port}"

    @property
    def shutting_down(self) -> bool:
        """Whether `shutdown` has been called."""
        return self._shutdown.is_set()

    def shutdown(self) -> None:
        """Begin a graceful shutdown; `serve_gateway` returns once it is done."""
        self._shutdown.set()

    def reload_tls(self) -> bool:
        """Load the TLS certificate and key again from their files (what SIGHUP does).

        Returns:
            True if new handshakes now use the files' contents; False if TLS is off or the
            files could not be loaded (the previous certificate stays in use).
        """
        tls = self.gateway.tls
        return tls.reload() if tls is not None else False


async def serve_gateway(
    settings: Settings,
    *,
    waker: Waker | None = None,
    reuse_port: bool = False,
    task_status: trio.TaskStatus[GatewayServer] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve devices until `GatewayServer.shutdown` is called or the task is cancelled.

    Resource handling: the store file, the listening sockets and every connection are
    owned here and closed on the way out, cancelled or not.

    Error handling: a connection's failure closes that connection with 1011 and is logged.
    A failure of the store or the listener ends the whole gateway with the exception, so
    that the process supervisor restarts it.

    Args:
        settings: The configuration.
        waker: Where wake-up decisions go (default: a `PushDispatcher` built from `[push]`).
        reuse_port: Bind the device port with SO_REUSEPORT, shared with the other
            processes of ``gateway serve --workers N``.
        task_status: Receives the `GatewayServer` once the port is listening.
    """
    gateway = Gateway(settings, waker=waker)
    server_settings = settings.server
    async with trio.open_nursery() as services:
        await services.start(gateway.store.run)
        if gateway.push is not None:
            await services.start(gateway.push.run, gateway.store)
        async with trio.open_nursery() as background:
            background.start_soon(_sweep_expired, gateway)
            await background.start(gateway.load.run)
            await background.start(gateway.presence.run)
            if gateway.cluster is not None:
                await background.start(gateway.cluster.run)
                if gateway.cluster_presence is not None:
                    await background.start(gateway.cluster_presence.run)
            if gateway.tls is not None and server_settings.tls_watch > 0:
                await background.start(gateway.tls.watch, server_settings.tls_watch)
            await background.start(gateway.heartbeat.run)
            async with trio.open_nursery() as connections:
                listeners = await _open_listeners(settings, reuse_port)
                port = listeners[0].socket.getsockname()[1]
                context = EdgeContext(
                    server=server_settings,
                    limits=settings.limits,
                    parser=gateway.parser,
                    router=gateway.router,
                    sessions=gateway.sessions,
                    queue=gateway.store,
                    heartbeat=gateway.heartbeat,
                    counters=gateway.metrics,
                    flushes=connections,
                )
                edge = gateway.edge = Edge(context, gateway.admission)
                edges = [
                    EdgeListener(lst, tls=gateway.tls, stats=gateway.accepts) for lst in listeners
                ]
                listener_scope = trio.CancelScope()
                background.start_soon(_listen, edge, edges, connections, listener_scope)
                server = GatewayServer(gateway, port)
                server.admin_port = await background.start(serve_admin, gateway)
                log.info("gateway listening on %s", server.url)
                task_status.started(server)
                await server._shutdown.wait()
                deadline = trio.current_time() + server_settings.shutdown_timeout
                services.cancel_scope.deadline = deadline
                connections.cancel_scope.deadline = deadline
                await edge.drain(server_settings.drain_seconds)
                listener_scope.cancel()
                # Only sockets still in their handshake (or being refused) are left: they
                # are no one's connection yet, so they are not waited for.
                connections.cancel_scope.cancel()
            background.cancel_scope.cancel()  # the sweeper, load probe and presence clock
        if gateway.push is not None:
            with trio.move_on_at(deadline - CLOSE_TIMEOUT):
                await gateway.push.wait_idle()  # wake-ups already queued go out
            gateway.push.close()  # what is still unsent is dropped; its items stay stored
        gateway.store.close()  # flushes what was submitted, then store.run returns
    log.info("gateway stopped")


async def _open_listeners(settings: Settings, reuse_port: bool) -> list[trio.SocketListener]:
    server = settings.server
    try:
        if reuse_port:
            return await open_reuseport_listeners(server.host, server.port)
        return await trio.open_tcp_listeners(server.port, host=server.host)
    except OSError as exc:
        raise GatewayError(
            f"cannot listen on {server.host}:{server.port}: {exc.strerror or exc}"
        ) from None


async def _listen(
    edge: Edge,
    listeners: list[EdgeListener],
    connections: trio.Nursery,
    scope: trio.CancelScope,
) -> None:
    """Accept connections until `scope` is cancelled (the start of a graceful shutdown)."""
    with scope:
        await edge.serve(listeners, connections)


async def _sweep_expired(gateway: Gateway) -> None:
    """Delete expired items every `sweep_interval` seconds."""
    interval = gateway.settings.store.sweep_interval
    while True:
        try:
            removed = await gateway.store.sweep_expired(now_ms())
        except StoreError as exc:
            log.warning("expiry sweep failed: %s", exc)
        else:
            if removed:
                log.info("expiry sweep removed %d items", removed)
        await trio.sleep(interval)


def _tls_certificate(settings: Settings) -> TlsCertificate | None:
    server = settings.server
    if server.tls_cert is None or server.tls_key is None:
        return None
    try:
        return TlsCertificate(server.tls_cert, server.tls_key)
    except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
        raise GatewayError(f"[server] tls_cert/tls_key cannot be loaded: {exc}") from None
