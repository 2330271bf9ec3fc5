"""The `gateway` command: `serve`, `token`, `check-config` and `webpush-keygen`."""

from __future__ import annotations

import argparse
import gc
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from gateway.auth import mint_token
from gateway.errors import ConfigError, GatewayError
from gateway.logs import configure_logging
from gateway.settings import DEV_JWT_SECRET, Settings, load_settings, masked_url
from gateway.workers import check_workers, run_workers
from push.errors import CredentialsError
from push.providers import check_credentials
from push.vapid import generate_key_pem, load_private_key, public_key_b64

if TYPE_CHECKING:
    from gateway.server import GatewayServer


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `gateway` console script; returns the exit status."""
    parser = argparse.ArgumentParser(prog="gateway", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve devices (embedded defaults without --config)")
    serve.add_argument("--config", help="a TOML configuration file")
    serve.add_argument(
        "--workers",
        type=int,
        default=1,
        help="processes sharing the port with SO_REUSEPORT (needs [store] backend = redis)",
    )
    serve.add_argument("--worker", type=int, default=0, help=argparse.SUPPRESS)
    token = commands.add_parser("token", help="print a development JWT for a device")
    token.add_argument("--user", required=True)
    token.add_argument("--device", required=True)
    token.add_argument("--ttl", type=int, help="lifetime in seconds (default: [auth] token_ttl)")
    token.add_argument("--config", help="a TOML configuration file")
    check = commands.add_parser("check-config", help="validate a configuration file")
    check.add_argument("file")
    check.add_argument(
        "--workers", type=int, default=1, help="also check it for `serve --workers N`"
    )
    keygen = commands.add_parser("webpush-keygen", help="write a VAPID key pair for [push.webpush]")
    keygen.add_argument(
        "--out",
        default="vapid-private.pem",
        help="the private key file, for vapid_private_key_file (default: vapid-private.pem)",
    )
    keygen.add_argument("--force", action="store_true", help="overwrite existing files")
    args = parser.parse_args(argv)
    if args.command == "webpush-keygen":
        return _webpush_keygen(Path(args.out), force=args.force)
    try:
        if args.command == "serve":
            settings = load_settings(args.config)
            check_workers(settings, args.workers, args.config or "<defaults>")
            if args.workers > 1:
                configure_logging(settings)
                return run_workers(args.config, args.workers)
            return _serve(settings, worker=args.worker)
        if args.command == "token":
            settings = load_settings(args.config)
            print(mint_token(settings.auth, args.user, args.device, args.ttl))
            return 0
        settings = load_settings(args.file)
        check_workers(settings, args.workers, args.file)
        try:
            push = check_credentials(settings.push)  # loads every key file, connects nowhere
        except CredentialsError as exc:
            raise ConfigError(str(exc)) from None
        push_summary = f"push: {', '.join(push)}" if push else "push: log provider only"
        print(f"{args.file}: OK ({_summary(settings)}, {push_summary})")
        return 0
    except ConfigError as exc:
        print(f"gateway: configuration error: {exc}", file=sys.stderr)
        return 2
    except GatewayError as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        return 1


def _webpush_keygen(private_path: Path, *, force: bool) -> int:
    """Write a new P-256 key pair: the private key (mode 0600) and its public key beside it."""
    public_path = private_path.with_name(private_path.name.removesuffix(".pem") + ".pub.pem")
    if not force:
        for path in (private_path, public_path):
            if path.exists():
                print(f"gateway: {path} exists (--force to replace it)", file=sys.stderr)
                return 1
    private_pem, public_pem = generate_key_pem()
    try:
        private_path.unlink(missing_ok=True)
        fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as file:
            file.write(private_pem)
        public_path.write_bytes(public_pem)
    except OSError as exc:
        print(f"gateway: cannot write the key: {exc}", file=sys.stderr)
        return 1
    key = public_key_b64(load_private_key(private_path))
    print(f"wrote {private_path} (private: vapid_private_key_file) and {public_path}")
    print(f"application server key (for pushManager.subscribe): {key}")
    return 0


def _summary(settings: Settings) -> str:
    store = settings.store
    if store.backend == "memory":
        where = "store in memory (NOT durable: for tests and benchmarks)"
    else:
        path = store.path if store.backend == "sqlite" else masked_url(store.redis_url)
        cluster = " (Redis Cluster)" if store.backend == "redis" and store.redis_cluster else ""
        where = f"{store.backend} store at {path}{cluster}"
    return (
        f"{where}, devices on {settings.server.host}:"
        f"{settings.server.port}, {settings.auth.jwt_algorithm} tokens"
    )


def _serve(settings: Settings, *, worker: int = 0) -> int:
    """Serve in this process; `worker` > 0 is one of ``--workers N`` (SO_REUSEPORT).

    Worker K's admin API listens on ``[admin] port + K - 1``: probes and metrics are per
    process."""
    configure_logging(settings, worker=worker)
    if worker > 0 and settings.admin.port != 0:
        settings = settings.replace(admin={"port": settings.admin.port + worker - 1})
    if settings.auth.jwt_algorithm == "HS256" and settings.auth.jwt_secret == DEV_JWT_SECRET:
        logging.getLogger("gateway").warning(
            "using the development JWT secret; set [auth] jwt_secret before production"
        )
    _tune_garbage_collection()
    try:
        trio.run(_serve_until_signalled, settings, worker > 0)
    except BaseExceptionGroup as group:
        expected, unexpected = group.split(GatewayError)
        if expected is None or unexpected is not None:
            raise
        raise _first_leaf(expected) from None
    return 0


def _tune_garbage_collection() -> None:
    """Keep full collections rare and short.

    Thousands of long-lived connections are hundreds of thousands of tracked objects that
    are never garbage; with CPython's defaults every full collection rescans them all and
    stops the event loop for hundreds of milliseconds. Objects alive after start-up are
    frozen out of collection, and the young generation is collected less often. So
    garbage in reference cycles waits long for a full collection: a connection breaks
    its protocol's cycle when it ends (`gateway.edge`), and the rest goes by refcounting.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)


def _first_leaf(group: BaseExceptionGroup[GatewayError]) -> GatewayError:
    """The first exception in a (possibly nested) group from Trio's nurseries."""
    first = group.exceptions[0]
    return _first_leaf(first) if isinstance(first, BaseExceptionGroup) else first


async def _serve_until_signalled(settings: Settings, reuse_port: bool) -> None:
    from gateway.server import serve_gateway

    log = logging.getLogger("gateway")
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
        async with trio.open_nursery() as nursery:

            async def serve(task_status: trio.TaskStatus[GatewayServer]) -> None:
                await serve_gateway(settings, reuse_port=reuse_port, task_status=task_status)
                nursery.cancel_scope.cancel()  # done draining: stop watching signals

            server: GatewayServer = await nursery.start(serve)
            if reuse_port:  # a worker of `--workers N`: never outlive the supervisor
                nursery.start_soon(_drain_when_orphaned, server, os.getppid())
            async for signum in signals:
                if signum == signal.SIGHUP:
                    if server.tls is None:
                        log.info("SIGHUP: no TLS certificate to reload")
                    else:
                        server.reload_tls()
                    continue
                if server.shutting_down:
                    log.warning("second signal: stopping without draining")
                    nursery.cancel_scope.cancel()
                    return
                log.info("%s: draining", signal.Signals(signum).name)
                server.shutdown()


async def _drain_when_orphaned(server: GatewayServer, parent: int) -> None:
    """Drain once the supervising process is gone (killed without passing a signal on)."""
    while os.getppid() == parent:  # noqa: ASYNC110 - the OS offers no event for this
        await trio.sleep(1)
    logging.getLogger("gateway").warning("supervisor %d is gone: draining", parent)
    server.shutdown()


if __name__ == "__main__":
    sys.exit(main())
