"""`/metrics`: the gateway's counters and gauges as Prometheus text (prometheus-client).

Nothing on the hot path touches Prometheus objects: connections, the router, the store
and the push dispatcher keep plain integers and `Counter`s, and `GatewayCollector` reads
them when the endpoint is scraped. Each gateway has its own `CollectorRegistry`, so
several gateways in one process (as in the tests) never share a counter. docs/operations.md
describes every metric.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from gateway.admission import Admission
from gateway.counters import Counters
from gateway.listener import AcceptStats
from gateway.overload import LoadMonitor
from gateway.registry import Registry
from gateway.store.base import MessageStore
from gateway.tls import TlsCertificate

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _counter(
    name: str, doc: str, labels: Iterable[str], values: Iterable[tuple[tuple[str, ...], float]]
) -> CounterMetricFamily:
    family = CounterMetricFamily(name, doc, labels=list(labels))
    for label_values, value in values:
        family.add_metric(list(label_values), value)
    return family


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


class EdgeView(Protocol):
    """What the metrics read of the device edge."""

    @property
    def draining(self) -> bool:
        """Whether a graceful shutdown has begun."""
        ...

    def open_connections(self) -> int:
        """Open connections, including those before `hello`."""
        ...

    def outbox_depths(self) -> list[int]:
        """Frames buffered for each open connection."""
        ...


class PushView(Protocol):
    """What the metrics read of the push dispatcher."""

    @property
    def responses(self) -> Mapping[tuple[str, str, str], int]:
        """Final provider answers by (provider, outcome, the provider's reason)."""
        ...

    def metrics(self) -> dict[str, Any]:
        """Outcome counters by ``"provider:outcome"``, queue gauges and drop counts."""
        ...

    @property
    def answers(self) -> WakeAnswersView:
        """How soon woken devices connect."""
        ...


class WakeAnswersView(Protocol):
    """The wake-to-connect histogram the metrics export."""

    @property
    def latency(self) -> Histogram:
        """Seconds from an accepted wake-up to its device's next connection."""
        ...


@dataclass(frozen=True, slots=True)
class MetricSources:
    """The parts of a gateway that `/metrics` reads when scraped."""

    counters: Counters
    edge: EdgeView
    registry: Registry
    admission: Admission
    accepts: AcceptStats
    tls: TlsCertificate | None
    store: MessageStore
    push: PushView | None
    load: LoadMonitor


class GatewayCollector(Collector):
    """Reads a gateway's state at scrape time."""

    def __init__(self, sources: MetricSources) -> None:
        self.sources = sources

    def collect(self) -> Iterator[Metric]:
        """Every metric family, freshly read."""
        yield from self._connections()
        yield from self._traffic()
        yield from self._store()
        yield from self._push()
        yield from self._load()

    def _connections(self) -> Iterator[Metric]:
        gw = self.sources
        authenticated = len(gw.registry)
        states = GaugeMetricFamily(
            "gateway_connections", "Open device connections by state.", labels=["state"]
        )
        awaiting = gw.edge.open_connections() - authenticated
        states.add_metric(["awaiting_hello"], max(0, awaiting))
        states.add_metric(["authenticated"], authenticated)
        yield states
        yield _gauge(
            "gateway_connection_cap",
            "The global connection cap in force ([limits] max_connections, or automatic).",
            gw.admission.max_connections,
        )
        m = gw.counters
        yield _counter(
            "gateway_connections_opened",
            "WebSocket upgrades accepted.",
            [],
            [((), m.connections_opened)],
        )
        yield _counter(
            "gateway_connections_closed",
            "Connections closed, by WebSocket close code.",
            ["code"],
            [((str(code),), n) for code, n in sorted(m.closes.items())],
        )
        yield _counter(
            "gateway_connections_refused",
            "Upgrades refused before the WebSocket handshake, by reason.",
            ["reason"],
            [((reason,), n) for reason, n in sorted(gw.admission.refused.items())],
        )
        yield _counter(
            "gateway_accept_errors",
            "accept() failures for lack of file descriptors or socket memory.",
            [],
            [((), gw.accepts.capacity_errors)],
        )
        tls = gw.tls
        if tls is not None:
            yield _counter(
                "gateway_tls_reloads",
                "TLS certificate reloads, by result.",
                ["result"],
                [(("ok",), tls.reloads), (("failed",), tls.failed_reloads)],
            )
        yield _gauge(
            "gateway_draining", "1 while a graceful shutdown is draining.", gw.edge.draining
        )

    def _traffic(self) -> Iterator[Metric]:
        m = self.sources.counters
        yield _counter(
            "gateway_messages",
            "WebSocket messages (each one frame or a batch), by direction.",
            ["direction"],
            [(("in",), m.messages_in), (("out",), m.messages_out)],
        )
        yield _counter(
            "gateway_frames",
            "Protocol frames, by direction.",
            ["direction"],
            [(("in",), m.frames_in), (("out",), m.frames_out)],
        )
        outcomes = dict(m.sends)
        outcomes["rate_limited"] = m.rate_limited
        yield _counter(
            "gateway_sends",
            "Device and backend sends, by outcome.",
            ["outcome"],
            [((outcome,), n) for outcome, n in sorted(outcomes.items())],
        )
        yield _counter(
            "gateway_shed",
            "Ephemeral events dropped or deferred under load, by kind.",
            ["kind"],
            [((kind,), n) for kind, n in sorted(m.shed.items())],
        )
        if m.redis:
            yield _counter(
                "gateway_redis_events",
                "Redis backend and cluster bus events (errors, recoveries, doorbells, kicks).",
                ["event"],
                [((event,), n) for event, n in sorted(m.redis.items())],
            )
        depths = self.sources.edge.outbox_depths()
        yield _gauge(
            "gateway_outbox_frames",
            "Frames buffered for devices, summed over connections.",
            sum(depths),
        )
        yield _gauge(
            "gateway_outbox_frames_max",
            "The fullest connection's buffered frames (closed with 1013 at outbox_limit).",
            max(depths, default=0),
        )

    def _store(self) -> Iterator[Metric]:
        store = self.sources.store
        yield _gauge(
            "gateway_store_queue_depth", "Submissions waiting for a commit.", store.queue_depth()
        )
        yield from store.commit_stats.latency.collect()
        yield from store.commit_stats.batch_size.collect()

    def _push(self) -> Iterator[Metric]:
        push = self.sources.push
        if push is None:
            return
        stats = push.metrics()
        results = []
        for key, n in stats["outcomes"].items():
            provider, _, outcome = key.partition(":")
            results.append(((provider, outcome), n))
        yield _counter(
            "gateway_push_outcomes",
            "Wake-ups by provider and outcome (sent_alert, retried, token_cleared, ...).",
            ["provider", "outcome"],
            results,
        )
        yield _counter(
            "gateway_push_responses",
            "Final provider answers by provider, outcome and the provider's reason.",
            ["provider", "outcome", "reason"],
            [(key, n) for key, n in sorted(push.responses.items())],
        )
        yield _gauge("gateway_push_queue_depth", "Wake-ups waiting for a worker.", stats["queued"])
        yield _gauge(
            "gateway_push_queue_capacity", "The wake-up queue's size.", stats["queue_capacity"]
        )
        yield _gauge("gateway_push_in_flight", "Provider requests in flight.", stats["in_flight"])
        yield _counter(
            "gateway_push_dropped", "Wake-ups dropped: queue full.", [], [((), stats["dropped"])]
        )
        yield _counter(
            "gateway_push_coalesced",
            "Wake-ups merged into one already queued for the device.",
            [],
            [((), stats["coalesced"])],
        )
        yield from push.answers.latency.collect()
        unanswered = []
        for key, n in stats["unanswered"].items():
            provider, _, kind = key.partition(":")
            unanswered.append(((provider, kind), n))
        yield _counter(
            "gateway_push_unanswered",
            "Wake-ups the provider accepted that saw no connection of their device within 60 s.",
            ["provider", "kind"],
            unanswered,
        )
        yield _counter(
            "gateway_push_zombie_rescues",
            "Alert wake-ups to connected devices that left an urgent message unanswered and"
            " sent nothing for [push] ack_timeout.",
            [],
            [((), stats["zombie_rescues"])],
        )
        yield _counter(
            "gateway_push_clears",
            "Clear wake-ups: a device alerted since its last connection whose user read on"
            " another device.",
            [],
            [((), stats["clears"])],
        )
        yield _counter(
            "gateway_push_retries",
            "Alert wake-ups sent again: the device did not connect within [push] alert_retry.",
            [],
            [((), stats["alert_retries"])],
        )

    def _load(self) -> Iterator[Metric]:
        load = self.sources.load
        yield _gauge(
            "gateway_event_loop_lag_seconds",
            "How late the event loop woke the last probe (every 0.1 s).",
            load.lag,
        )
        yield _gauge(
            "gateway_event_loop_lag_average_seconds",
            "Moving average of the event-loop lag; over [server] overload_lag, load is shed.",
            load.average_lag,
        )
        yield _gauge(
            "gateway_event_loop_lag_max_seconds", "The largest lag seen since start.", load.max_lag
        )
        yield _gauge("gateway_overloaded", "1 while shedding load.", load.overloaded)


def gateway_registry(sources: MetricSources) -> CollectorRegistry:
    """A registry holding only this gateway's metrics."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(GatewayCollector(sources))
    return registry


def render(registry: CollectorRegistry) -> bytes:
    """The registry in the Prometheus text exposition format."""
    return generate_latest(registry)
