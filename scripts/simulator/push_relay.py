"""The fake APNs, FCM and Web Push, served by the simulator, handing each wake-up to its phone.

The gateway pushes to `scripts.fakes.FakeApns` (HTTP/2 over TLS, provider JWT verified),
`scripts.fakes.FakeFcm` (OAuth, then HTTP v1) and `scripts.fakes.FakeWebPush` (VAPID
verified, payload decrypted) exactly as it would to Apple, Google and a browser's push
service. Each
request the fakes accept is recorded in the ledger and, unless the scenario's loss rate
drops it (the provider said 200 and the phone never heard of it), or the fake APNs's
iOS background throttle does (`ios_background_per_hour`), handed to the phone that
registered the token.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import trio

from push.vapid import generate_key_pem, load_private_key, public_key_b64
from scripts.fakes import FakeApns, FakeFcm, FakeWebPush, HttpRequest, HttpResponse
from scripts.simulator.knobs import Scenario
from scripts.simulator.ledger import Ledger, PushRecord
from scripts.simulator.phone import Phone

TOPIC = "com.example.simulator"
PROJECT = "simulator-project"
SUBJECT = "mailto:simulator@example.com"


class PushRelay:
    """The fakes, and the routing from a device token to its phone.

    Args:
        ledger: Where every push is recorded.
        scenario: The loss rates.
        apns: The fake APNs (`FakeApns.create` makes one with fresh credentials).
        fcm: The fake FCM.
        webpush: The fake Web Push service (served only when the fleet has browsers).
        vapid_key_file: The gateway's VAPID key, when it is not made for the run (a
            staging or running gateway's own); browsers then subscribe with its public
            half, so the fake refuses pushes signed with any other key.
    """

    def __init__(
        self,
        ledger: Ledger,
        scenario: Scenario,
        apns: FakeApns,
        fcm: FakeFcm,
        webpush: FakeWebPush | None = None,
        *,
        vapid_key_file: Path | None = None,
    ) -> None:
        self.ledger = ledger
        self.scenario = scenario
        self.apns = apns
        self.fcm = fcm
        self.webpush = webpush or FakeWebPush()
        self.vapid_key_file = vapid_key_file
        self.application_server_key = (
            None if vapid_key_file is None else public_key_b64(load_private_key(vapid_key_file))
        )
        self.phones: dict[str, Phone] = {}  # by push token
        apns.background_per_hour = scenario.ios_background_per_hour
        apns.handle = self._routed("apns", apns.handle)  # type: ignore[method-assign,assignment]
        fcm.handle = self._routed("fcm", fcm.handle)  # type: ignore[method-assign,assignment]
        self.webpush.handle = self._routed("webpush", self.webpush.handle)  # type: ignore[method-assign,assignment]

    @classmethod
    def create(cls, ledger: Ledger, scenario: Scenario, directory: Path) -> PushRelay:
        """A relay with fresh fake credentials written to `directory`."""
        return cls(ledger, scenario, FakeApns.create(directory), FakeFcm(project_id=PROJECT))

    async def serve(
        self, directory: Path, *, apns_port: int = 0, fcm_port: int = 0,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:  # fmt: skip
        """Serve the fakes on loopback until cancelled (Web Push on any free port: the
        browsers' subscriptions name it)."""
        async with trio.open_nursery() as nursery:
            await nursery.start(
                lambda task_status: self.apns.serve(port=apns_port, task_status=task_status)
            )
            await nursery.start(
                lambda task_status: self.fcm.serve(port=fcm_port, task_status=task_status)
            )
            if self.fcm.service_account is None:
                self.fcm.write_service_account(directory / "service-account.json")
            if self.scenario.web_share > 0:
                await nursery.start(lambda task_status: self.webpush.serve(task_status=task_status))
                if self.vapid_key_file is None:
                    self.write_vapid_key(directory / "vapid-private.pem")
            task_status.started()

    def write_vapid_key(self, path: Path) -> None:
        """Make the gateway's VAPID key for the run (`gateway_push_toml` names it)."""
        path.write_bytes(generate_key_pem()[0])
        self.vapid_key_file = path

    def add(self, phone: Phone) -> None:
        """Route pushes for the phone's token to it; a browser first gets its subscription
        from the fake Web Push service, as `pushManager.subscribe` would."""
        if phone.platform == "web":
            subscription = self.webpush.subscribe(self.application_server_key)
            phone.subscribe(subscription.id, subscription.to_json())
        self.phones[phone.push_token] = phone

    def gateway_push_toml(self) -> str:
        """The `[push.apns]`, `[push.fcm]` (and, with browsers, `[push.webpush]`) tables that
        point a gateway at these fakes."""
        assert self.fcm.service_account is not None
        apns = self.apns.files
        webpush = (
            "\n[push.webpush]\n"
            f'vapid_private_key_file = "{self.vapid_key_file}"\n'
            f'subject = "{SUBJECT}"\n'
            'allowed_hosts = ["127.0.0.1"]\n'
            if self.vapid_key_file is not None
            else ""
        )
        return (
            "[push.apns]\n"
            f'key_file = "{apns["key_file"]}"\n'
            f'key_id = "{self.apns.key_id}"\n'
            f'team_id = "{self.apns.team_id}"\n'
            f'topic = "{TOPIC}"\n'
            f'endpoint = "{self.apns.endpoint}"\n'
            f'ca_file = "{apns["ca_file"]}"\n'
            "\n[push.fcm]\n"
            f'service_account_file = "{self.fcm.service_account}"\n'
            f'endpoint = "{self.fcm.url}"\n'
        ) + webpush

    def _routed(
        self, provider: str, handle: Callable[[HttpRequest], HttpResponse]
    ) -> Callable[[HttpRequest], HttpResponse]:
        def handler(request: HttpRequest) -> HttpResponse:
            response = handle(request)
            if request.method == "POST" and not request.path.startswith(("/_fake/", "/token")):
                self._deliver(provider, request, response)
            return response

        return handler

    def _deliver(self, provider: str, request: HttpRequest, response: HttpResponse) -> None:
        if provider == "apns":
            token = request.path.rsplit("/", 1)[-1]
            kind = request.headers.get("apns-push-type", "?")
        elif provider == "webpush":
            token = request.path.rsplit("/", 1)[-1]
            kind = "alert" if request.headers.get("urgency") == "high" else "background"
            if response.status in (400, 401, 403):  # failed the fake's VAPID or crypto checks
                self.ledger.errors["Web Push request refused by the fake"] += 1
        else:
            try:
                message = json.loads(request.body)["message"]
                token = message["token"]
                kind = "alert" if message["android"]["priority"] == "high" else "background"
            except (ValueError, KeyError, TypeError):
                self.ledger.errors["unreadable FCM request"] += 1
                return
        phone = self.phones.get(token)
        if phone is None:
            self.ledger.errors["push to an unknown token"] += 1
            return
        loss = self.scenario.alert_loss if kind == "alert" else self.scenario.push_loss
        accepted = 200 <= response.status < 300
        lost = accepted and phone.push_rng.random() < loss
        throttled = False
        if provider == "apns" and self.apns.records and self.apns.records[-1].token == token:
            throttled = accepted and self.apns.records[-1].throttled  # just recorded
        self.ledger.note_push(
            PushRecord(
                request.arrived, provider, kind, phone.user, response.status, lost, throttled
            )
        )
        if accepted and not lost and not throttled:
            phone.on_push(request.arrived)
