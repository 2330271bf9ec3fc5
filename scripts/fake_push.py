"""Run the fake APNs, FCM and Web Push services on loopback, for trying wake-ups without a
real phone or browser.

    python -m scripts.fake_push [--dir fake-push] [--apns-port 8443] [--fcm-port 8444]
                                [--webpush-port 8445]

It writes throw-away credentials into --dir (a CA certificate, an APNs .p8 key, an APNs
client certificate, an FCM service-account file whose token_uri points at the fake, and a
VAPID key), plus ``gateway-push.toml``: the `[push.apns]`, `[push.fcm]` and
`[push.webpush]` tables that point a gateway at the fakes. Merge them into your
configuration (or pass the file to ``gateway serve --config``), register a token from a
device, disconnect it, send it a message, and watch the request arrive here. Every request
is logged as one line: status, push type (or Web Push urgency), priority and a hash of the
token. The fake Web Push answers 400, 401 or 403 (with the reason as the body) to a request
whose VAPID token, headers or encryption it cannot verify.

Script answers from a shell (the control API is served on the same ports):

    curl --cacert fake-push/ca.pem https://127.0.0.1:8443/_fake/script \\
         -d '{"token": null, "replies": [{"status": 410, "reason": "Unregistered"}]}'
    curl http://127.0.0.1:8444/_fake/script -d '{"replies": [{"reason": "UNREGISTERED"}]}'
    curl --cacert fake-push/ca.pem https://127.0.0.1:8443/_fake/requests
    curl -X POST http://127.0.0.1:8445/_fake/subscribe   # a Web Push subscription to register
    curl http://127.0.0.1:8445/_fake/script -d '{"replies": [{"status": 410}]}'

A reply is ``{"status": 429, "reason": "TooManyRequests", "retry_after": 5}``,
``{"status": 503, "reason": "ServiceUnavailable"}`` or ``{"hang": true}``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import trio

from push.notification import token_hash
from push.vapid import generate_key_pem
from scripts.fakes import FakeApns, FakeFcm, FakeWebPush, HttpRequest, HttpResponse

log = logging.getLogger("fake_push")


def _logged(name: str, handle: object) -> object:
    """Wrap a fake's handler to log one line per push request (never the token itself)."""

    def handler(request: HttpRequest) -> HttpResponse:
        response: HttpResponse = handle(request)  # type: ignore[operator]
        if not request.path.startswith(("/_fake/", "/token")):
            h = request.headers
            kind = {"apns": h.get("apns-push-type", "-"), "fcm": "fcm"}.get(
                name, f"urgency={h.get('urgency', '-')}"
            )
            token = request.path.rsplit("/", 1)[-1] if name in ("apns", "webpush") else ""
            if name == "fcm":
                try:
                    token = json.loads(request.body)["message"]["token"]
                except (ValueError, KeyError, TypeError):
                    token = ""
            log.info(
                "%s %s %s priority=%s token~%s%s",
                name,
                response.status,
                kind,
                h.get("apns-priority", "-"),
                token_hash(token),
                " (held)" if response.delay or response.gate else "",
            )
        return response

    return handler


def write_config(path: Path, apns: FakeApns, fcm: FakeFcm, vapid_key: Path | None = None) -> None:
    """The `[push.*]` tables that point a gateway at the fakes."""
    webpush = (
        "\n[push.webpush]\n"
        f'vapid_private_key_file = "{vapid_key}"\n'
        'subject = "mailto:ops@example.com"\n'
        'allowed_hosts = ["127.0.0.1"]\n'
        if vapid_key is not None
        else ""
    )
    path.write_text(
        "# Written by `python -m scripts.fake_push`: point a gateway at the fake push services.\n"
        "[push.apns]\n"
        f'key_file = "{apns.files["key_file"]}"\n'
        f'key_id = "{apns.key_id}"\n'
        f'team_id = "{apns.team_id}"\n'
        'topic = "com.example.app"\n'
        f'endpoint = "{apns.endpoint}"\n'
        f'ca_file = "{apns.files["ca_file"]}"\n'
        "\n[push.fcm]\n"
        f'service_account_file = "{fcm.service_account}"\n'
        f'endpoint = "{fcm.url}"\n' + webpush
    )


async def run(
    directory: Path, host: str, apns_port: int, fcm_port: int, webpush_port: int, ready_json: bool
) -> None:
    """Serve the three fakes until cancelled."""
    apns = FakeApns.create(directory)
    fcm = FakeFcm(project_id="fake-project")
    webpush = FakeWebPush()
    if log.isEnabledFor(logging.INFO):
        apns.handle = _logged("apns", apns.handle)  # type: ignore[method-assign,assignment]
        fcm.handle = _logged("fcm", fcm.handle)  # type: ignore[method-assign,assignment]
        webpush.handle = _logged("webpush", webpush.handle)  # type: ignore[method-assign,assignment]
    async with trio.open_nursery() as nursery:
        await nursery.start(
            lambda task_status: apns.serve(host=host, port=apns_port, task_status=task_status)
        )
        await nursery.start(
            lambda task_status: fcm.serve(host=host, port=fcm_port, task_status=task_status)
        )
        await nursery.start(
            lambda task_status: webpush.serve(host=host, port=webpush_port, task_status=task_status)
        )
        fcm.write_service_account(directory / "service-account.json")
        vapid_key = directory / "vapid-private.pem"
        vapid_key.write_bytes(generate_key_pem()[0])
        config = directory / "gateway-push.toml"
        write_config(config, apns, fcm, vapid_key)
        if ready_json:
            ready = {
                "apns": apns.port,
                "fcm": fcm.port,
                "webpush": webpush.port,
                "dir": str(directory),
            }
            print(json.dumps(ready), flush=True)
        else:
            print(f"fake APNs: {apns.endpoint} (HTTP/2 over TLS, CA {apns.files['ca_file']})")
            print(f"fake FCM:  {fcm.url} (OAuth at {fcm.token_uri})")
            print(f"fake Web Push: {webpush.origin} (POST /_fake/subscribe for a subscription)")
            print(f"gateway config: {config}")
            print("Ctrl-C to stop.", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: parse arguments and serve until interrupted."""
    parser = argparse.ArgumentParser(
        prog="python -m scripts.fake_push",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--dir", default="fake-push", help="where credentials are written")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--apns-port", type=int, default=8443, help="0 picks a free port")
    parser.add_argument("--fcm-port", type=int, default=8444, help="0 picks a free port")
    parser.add_argument("--webpush-port", type=int, default=8445, help="0 picks a free port")
    parser.add_argument(
        "--ready-json",
        action="store_true",
        help="print the ports as one JSON line once serving (for scripts)",
    )
    parser.add_argument("--quiet", action="store_true", help="do not log each request")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(asctime)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    directory = Path(args.dir).resolve()
    directory.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(KeyboardInterrupt):
        trio.run(
            run,
            directory,
            args.host,
            args.apns_port,
            args.fcm_port,
            args.webpush_port,
            args.ready_json,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
