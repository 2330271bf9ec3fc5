"""The gateway process: the composition root, the services and graceful shutdown.

```
serve_gateway
└─ services nursery: store writer (group commit), push dispatcher
   └─ background nursery: expiry sweeper, load probe, presence clock, heartbeat, cluster
      link and cluster presence (Redis), TLS watcher, admin API, the device listeners
      └─ connections nursery: one task per connection; short flush tasks while other
         tasks have queued output for one
```

`serve_gateway` builds every component here, once, and hands each its collaborators as
constructor arguments; nothing else assembles the gateway. Start it with
``server = await nursery.start(serve_gateway, settings)``: the `GatewayServer` handed
back knows the real port (port 0 picks a free one), can `shutdown()` gracefully, and
holds the components for tools and tests.
"""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass
from functools import partial

import trio

from gateway.ack_watch import AckWatch
from gateway.admin import AdminApi, serve_admin
from gateway.admission import Admission
from gateway.auth import TokenVerifier
from gateway.backend import open_backend
from gateway.clock import now_ms
from gateway.connection import CLOSE_TIMEOUT, EdgeContext
from gateway.counters import Counters
from gateway.delivery_flush import DeliveryFlush
from gateway.edge import WS_PATH, Edge
from gateway.errors import GatewayError, StoreError
from gateway.frames import FrameParser
from gateway.heartbeat import Heartbeat
from gateway.listener import AcceptStats, EdgeListener
from gateway.metrics import MetricSources, gateway_registry
from gateway.overload import LoadMonitor
from gateway.presence_link import build_presence
from gateway.registry import Registry
from gateway.router import Router
from gateway.send_path import SendPath
from gateway.sessions import Sessions
from gateway.settings import Settings
from gateway.store import MessageStore
from gateway.tls import TlsCertificate
from gateway.wake import Waker
from gateway.workers import open_reuseport_listeners
from push.dispatcher import PushDispatcher
from push.providers import build_providers
from push.subscription import HostPolicy

log = logging.getLogger(__name__)

# On a shared store the sweeping node's lease lasts this many sweep intervals: a dead
# node's sweeps resume elsewhere within that time.
SWEEP_LEASE_INTERVALS = 3


@dataclass(eq=False)
class GatewayServer:
    """A running gateway, as handed back by ``nursery.start(serve_gateway, ...)``: where
    it listens, how to stop it, and its components (for tools and tests)."""

    settings: Settings
    port: int
    edge: Edge
    registry: Registry
    store: MessageStore
    router: Router
    counters: Counters
    admission: Admission
    push: PushDispatcher | None  # None when the caller brought its own waker
    tls: TlsCertificate | None
    node_id: str  # this process, among nodes sharing Redis
    admin_port: int | None = None  # None while the admin port cannot be bound

    def __post_init__(self) -> None:
        self._shutdown = trio.Event()

    @property
    def url(self) -> str:
        """The device endpoint, for clients on this host."""
        server = self.settings.server
        scheme = "wss" if server.tls_cert else "ws"
        host = server.host if server.host not in ("0.0.0.0", "::", "") else "127.0.0.1"
        host = f"[{host}]" if ":" in host else host
        return f"{scheme}://{host}:{self.port}{WS_PATH}"

    @property
    def admin_url(self) -> str:
        """The admin and backend API, for clients on this host."""
        admin = self.settings.admin
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
        return self.tls.reload() if self.tls is not None else False


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
    server_settings = settings.server
    counters = Counters()
    push: PushDispatcher | None = None
    if waker is None:
        waker = push = PushDispatcher(settings.push, build_providers(settings.push), wall_ms=now_ms)
    registry = Registry(waker)
    node_id = secrets.token_hex(6)
    backend = open_backend(settings, registry, counters, node_id=node_id)
    store, cluster, cluster_presence = backend.store, backend.cluster, backend.cluster_presence
    if push is not None and cluster is not None:
        push.on_alert_sent = cluster.announce_alert  # a read on any node clears it
    load = LoadMonitor(server_settings.overload_lag)
    presence = build_presence(
        settings.presence,
        registry,
        overloaded=lambda: load.overloaded,
        shed=counters.shed,
        state=cluster_presence.mirror if cluster_presence is not None else None,
        refresh=cluster_presence.refresh if cluster_presence is not None else None,
    )
    sends = SendPath(store, registry, counters, clock=now_ms)
    router = Router(store, sends, presence, counters, clock=now_ms, max_ttl=server_settings.max_ttl)
    sessions = Sessions(TokenVerifier(settings.auth), store, registry, presence, cluster)
    heartbeat = Heartbeat(server_settings.heartbeat)
    ack_watch = AckWatch(settings.push.ack_timeout, waker)
    deliveries = DeliveryFlush()
    admission = Admission(settings.limits, now=trio.current_time())
    accepts = AcceptStats()
    tls = _tls_certificate(settings)

    async with trio.open_nursery() as services:
        await services.start(store.run)
        if push is not None:
            await services.start(partial(push.run, store))
        async with trio.open_nursery() as background:
            background.start_soon(_sweep_expired, store, settings.store.sweep_interval)
            await background.start(load.run)
            await background.start(presence.run)
            await background.start(heartbeat.run)
            await background.start(ack_watch.run)
            await background.start(deliveries.run)
            if cluster is not None:
                await background.start(cluster.run)
            if cluster_presence is not None:
                await background.start(cluster_presence.run, presence)
            if tls is not None and server_settings.tls_watch > 0:
                await background.start(tls.watch, server_settings.tls_watch)
            async with trio.open_nursery() as connections:
                listeners = await _open_listeners(settings, reuse_port)
                edge = Edge(
                    EdgeContext(
                        server=server_settings,
                        limits=settings.limits,
                        parser=FrameParser(
                            max_ttl=server_settings.max_ttl,
                            webpush_hosts=HostPolicy(settings.push.webpush.allowed_hosts),
                        ),
                        router=router,
                        sessions=sessions,
                        queue=store,
                        heartbeat=heartbeat,
                        ack_watch=ack_watch,
                        deliveries=deliveries,
                        counters=counters,
                        flushes=connections,
                    ),
                    admission,
                )
                listener_scope = trio.CancelScope()
                edges = [EdgeListener(lst, tls=tls, stats=accepts) for lst in listeners]
                background.start_soon(_listen, edge, edges, connections, listener_scope)
                server = GatewayServer(
                    settings=settings,
                    port=listeners[0].socket.getsockname()[1],
                    edge=edge,
                    registry=registry,
                    store=store,
                    router=router,
                    counters=counters,
                    admission=admission,
                    push=push,
                    tls=tls,
                    node_id=node_id,
                )
                metrics = MetricSources(
                    counters, edge, registry, admission, accepts, tls, store, push, load
                )
                admin = AdminApi(
                    settings,
                    store=store,
                    sends=sends,
                    registry=registry,
                    edge=edge,
                    metrics=gateway_registry(metrics),
                    revocations=cluster,
                )
                server.admin_port = await background.start(serve_admin, admin)
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
        if push is not None:
            with trio.move_on_at(deadline - CLOSE_TIMEOUT):
                await push.wait_idle()  # wake-ups already queued go out
            push.close()  # what is still unsent is dropped; its items stay stored
        store.close()  # flushes what was submitted, then store.run returns
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


async def _sweep_expired(store: MessageStore, interval: float) -> None:
    """Delete expired items every `interval` seconds. On a shared store one node sweeps,
    holding a lease of `SWEEP_LEASE_INTERVALS` intervals that it renews at each sweep;
    the others ask again at each interval, and one takes over once a holder is gone."""
    lease_ms = int(interval * SWEEP_LEASE_INTERVALS * 1000)
    sweeping = False
    while True:
        try:
            held = await store.may_sweep(lease_ms)
            if held != sweeping:
                log.info("expiry sweeps %s on this node", "start" if held else "stop")
                sweeping = held
            if held:
                removed = await store.sweep_expired(now_ms())
                if removed:
                    log.info("expiry sweep removed %d items", removed)
        except StoreError as exc:
            log.warning("expiry sweep failed: %s", exc)
        await trio.sleep(interval)


def _tls_certificate(settings: Settings) -> TlsCertificate | None:
    server = settings.server
    if server.tls_cert is None or server.tls_key is None:
        return None
    try:
        return TlsCertificate(server.tls_cert, server.tls_key)
    except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
        raise GatewayError(f"[server] tls_cert/tls_key cannot be loaded: {exc}") from None
