"""Loopback stand-ins for APNs, FCM and Web Push that speak the real wire protocols.

`FakeApns` is HTTP/2 over TLS with a self-signed CA made at start-up; it verifies the ES256
provider token (or a client certificate) and the request headers, records every request and
answers as scripted. `FakeFcm` serves the OAuth token endpoint named by the service-account
file it writes, verifies the signed assertion, and serves the HTTP v1 `messages:send`
endpoint. Both are used by the tests, the benchmark and ``python -m scripts.fake_push``.
`FakeWebPush` makes browser-like subscriptions, verifies VAPID and decrypts each wake-up.
"""

from scripts.fakes.apns import ApnsRecord, FakeApns
from scripts.fakes.fcm import FakeFcm, FcmRecord
from scripts.fakes.http import HttpRequest, HttpResponse, serve_http
from scripts.fakes.script import Reply, Script
from scripts.fakes.webpush import FakeSubscription, FakeWebPush, WebPushRecord

__all__ = [
    "ApnsRecord",
    "FakeApns",
    "FakeFcm",
    "FakeSubscription",
    "FakeWebPush",
    "FcmRecord",
    "HttpRequest",
    "HttpResponse",
    "Reply",
    "Script",
    "WebPushRecord",
    "serve_http",
]
