"""The idle-device simulator: short end-to-end runs (a real gateway process, the fake APNs
and FCM, simulated phones) and its accounting."""

from __future__ import annotations

import json
import math
import random
import sys
from pathlib import Path
from typing import Any

import pytest
import trio

from push.vapid import generate_key_pem
from scripts.fakes.credentials import make_p8, make_service_account
from scripts.kit.gateway_process import GatewayProcess
from scripts.kit.loopback import free_port
from scripts.simulator.knobs import Distribution
from scripts.simulator.ledger import Ledger, Percentiles, PushRecord, failures

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ["-m", "scripts.simulate_idle_devices"]
SHORT = ["--devices", "12", "--rate", "8", "--duration", "3", "--no-live", "--seed", "7"]


async def simulate(tmp_path: Path, *extra: str) -> tuple[int, dict[str, Any], str]:
    """Run the simulator as a user would; return its exit status, JSON summary and output."""
    await trio.Path(tmp_path).mkdir(parents=True, exist_ok=True)
    out = tmp_path / "summary.json"
    with trio.fail_after(120):
        done = await trio.run_process(
            [sys.executable, *SCRIPT, *SHORT, "--json", str(out), *extra],
            cwd=ROOT,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    text = done.stdout.decode() + done.stderr.decode()
    assert out.exists(), text
    return done.returncode, json.loads(out.read_text()), text


async def test_a_short_scenario_delivers_everything_through_pushes(tmp_path: Path) -> None:
    status, summary, text = await simulate(tmp_path, "--plot", str(tmp_path / "sim.png"))
    assert status == 0, text
    m, r, p = summary["messages"], summary["receipts"], summary["pushes"]
    assert summary["ok"] and summary["failures"] == []
    assert m["sent"] > 0 and m["delivered"] == m["sent"]
    assert m["lost"] == 0 and m["unanswered"] == 0 and m["still_queued_at_end"] == 0
    assert summary["undrained_devices"] == {}
    assert r["delivered_arrived"] == r["delivered_expected"] == m["delivered"]
    assert r["read_arrived"] == r["read_expected"] > 0
    # Sleeping phones got messages, and wake-ups went out through both fake providers.
    assert m["to_idle_phones"] > 0
    kinds = p["by_provider_and_kind"]
    assert sum(kinds.values()) == p["total"] > 0
    assert {k.split()[0] for k in kinds} == {"apns", "fcm"}
    assert p["wakes"] > 0 and p["wakes"] <= p["total"] - p["lost_by_provider"]
    assert p["per_delivered_message"] == pytest.approx(p["total"] / m["delivered"])
    latency = summary["latency_s"]
    assert latency["end_to_end_active"]["n"] + latency["end_to_end_idle"]["n"] == m["delivered"]
    assert latency["end_to_end_idle"]["n"] == m["to_idle_phones"]
    assert latency["reconnect_to_drained"]["n"] <= latency["push_to_reconnect"]["n"] == p["wakes"]
    for row in latency.values():
        if row["n"]:
            assert 0 <= row["p50_ms"] <= row["p90_ms"] <= row["p99_ms"]
    assert "OK: nothing lost" in text
    assert (tmp_path / "sim.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


async def test_browser_devices_are_woken_through_the_fake_web_push(tmp_path: Path) -> None:
    status, summary, text = await simulate(tmp_path, "--web-share", "0.5")
    assert status == 0, text
    m, p = summary["messages"], summary["pushes"]
    assert summary["ok"] and m["delivered"] == m["sent"] > 0
    kinds = p["by_provider_and_kind"]
    assert {k.split()[0] for k in kinds} == {"apns", "fcm", "webpush"}, kinds
    # Every Web Push request passed the fake's VAPID check and decrypted to a wake-up.
    assert summary["errors"] == {} and p["rejected"] == 0
    assert "Web Push" in text


async def test_browser_devices_need_a_vapid_key_in_a_staging_configuration(
    tmp_path: Path,
) -> None:
    apns = 'key_file = "AuthKey_ABC123DEFG.p8"\nkey_id = "ABC123DEFG"\nteam_id = "DEF123GHIJ"\n'
    config = staging_files(tmp_path, apns + 'topic = "com.example.staging"')
    with trio.fail_after(60):
        done = await trio.run_process(
            [sys.executable, *SCRIPT, "--web-share", "0.2", "--config", str(config), "--no-live"],
            cwd=ROOT,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    assert done.returncode == 2
    assert b"--web-share needs [push.webpush] vapid_private_key_file" in done.stderr


async def test_a_message_deleted_from_the_store_fails_the_run(tmp_path: Path) -> None:
    # Every push is lost and nothing drops, so sleeping phones keep their items queued
    # until the final drain; one of them is deleted from the SQLite file behind the
    # gateway's back.
    status, summary, text = await simulate(
        tmp_path, "--fault", "delete-queued", "--push-loss", "1", "--alert-loss", "1",
        "--drops-per-minute", "0",
    )  # fmt: skip
    assert len(summary["faults_injected"]) == 1, text
    assert status == 1, text
    assert summary["messages"]["lost"] == 1
    assert summary["messages"]["delivered"] == summary["messages"]["sent"] - 1
    assert any("lost" in why for why in summary["failures"])
    assert "FAIL" in text


async def test_phones_left_asleep_fail_the_run_with_their_items_still_queued(
    tmp_path: Path,
) -> None:
    status, summary, text = await simulate(
        tmp_path, "--no-final-drain", "--push-loss", "1", "--alert-loss", "1",
        "--final-drain-timeout", "1",
    )  # fmt: skip
    assert status == 1, text
    m = summary["messages"]
    assert m["lost"] == 0  # stranded, not lost: the end-of-run check found them queued
    assert m["still_queued_at_end"] == m["sent"] - m["delivered"] > 0
    assert sum(summary["undrained_devices"].values()) >= m["still_queued_at_end"]
    assert any("left with" in why for why in summary["failures"])


def staging_files(directory: Path, apns: str, webpush: str = "") -> Path:
    """A staging configuration with credentials of the real kinds: an APNs `.p8` key and a
    Google service account whose token_uri is Google's own (and `webpush`, a
    `[push.webpush]` table's keys)."""
    make_p8(directory / "AuthKey_ABC123DEFG.p8")
    make_service_account(
        directory / "firebase.json", "https://oauth2.googleapis.com/token", "staging-project"
    )
    config = directory / "staging.toml"
    config.write_text(
        '[auth]\njwt_secret = "staging-secret"\n[store]\npath = "staging.db"\n'
        "[push]\nurgent_cooldown = 10.0\nbackground_cooldown = 1200.0\nlinger = 60.0\n"
        f"[push.apns]\n{apns}\n"
        '[push.fcm]\nservice_account_file = "firebase.json"\n'
        + (f"[push.webpush]\n{webpush}\n" if webpush else "")
    )
    return config


async def test_a_staging_configuration_runs_with_its_credentials_checked_by_the_fakes(
    tmp_path: Path,
) -> None:
    apns = 'key_file = "AuthKey_ABC123DEFG.p8"\nkey_id = "ABC123DEFG"\nteam_id = "DEF123GHIJ"\n'
    (tmp_path / "vapid.pem").write_bytes(generate_key_pem()[0])
    # The default allowed_hosts (the browsers' real push services) are replaced for the run.
    webpush = 'vapid_private_key_file = "vapid.pem"\nsubject = "mailto:ops@example.com"'
    config = staging_files(tmp_path, apns + 'topic = "com.example.staging"', webpush)
    status, summary, text = await simulate(tmp_path, "--config", str(config), "--web-share", "0.3")
    assert status == 0, text
    kinds = summary["pushes"]["by_provider_and_kind"]
    # Every provider accepted them; browsers subscribed with the file's VAPID public key,
    # so the fake Web Push refused anything signed with another.
    assert {k.split()[0] for k in kinds} == {"apns", "fcm", "webpush"}
    assert summary["pushes"]["rejected"] == 0 and summary["errors"] == {}
    assert not (tmp_path / "staging.db").exists()  # the run used its own SQLite file


async def test_a_running_gateway_is_simulated_through_a_written_configuration(
    tmp_path: Path,
) -> None:
    ports = [str(free_port()) for _ in range(3)]
    written = await trio.run_process(
        [sys.executable, *SCRIPT, "--write-config", str(tmp_path / "gw"),
         "--gateway-port", ports[0], "--apns-port", ports[1], "--fcm-port", ports[2]],
        capture_stdout=True, check=True, cwd=ROOT,
    )  # fmt: skip
    config = tmp_path / "gw" / "gateway.toml"
    assert str(config).encode() in written.stdout
    gateway = GatewayProcess(tmp_path / "gw", config_file=config, port=int(ports[0]))
    async with trio.open_nursery() as nursery:
        await nursery.start(gateway.run)
        for run, extra in (("first", []), ("second", ["--web-share", "0.3"])):
            # The same gateway, simulated twice: phones, then phones and browsers.
            status, summary, text = await simulate(
                tmp_path / run, "--url", gateway.url, "--config", str(config), *extra
            )
            assert status == 0, text
            assert summary["messages"]["delivered"] == summary["messages"]["sent"] > 0
            assert summary["pushes"]["total"] > 0
            providers = {k.split()[0] for k in summary["pushes"]["by_provider_and_kind"]}
            assert ("webpush" in providers) == bool(extra)
            assert summary["errors"] == {}
        nursery.cancel_scope.cancel()


async def test_certificate_auth_cannot_be_simulated_and_says_so(tmp_path: Path) -> None:
    (tmp_path / "apns-cert.pem").write_text("not used")
    config = staging_files(tmp_path, 'cert_file = "apns-cert.pem"\ntopic = "com.example.x"')
    with trio.fail_after(60):
        done = await trio.run_process(
            [sys.executable, *SCRIPT, "--config", str(config), "--no-live"],
            capture_stdout=True, capture_stderr=True, check=False, cwd=ROOT,
        )  # fmt: skip
    assert done.returncode == 2
    assert b"[push.apns] cert_file: certificate auth cannot be simulated" in done.stderr


def test_distributions_parse_and_stay_within_their_cap() -> None:
    rng = random.Random(1)
    lognormal = Distribution.parse("lognormal:0.4,0.6", cap=2.0)
    draws = [lognormal.draw(rng) for _ in range(2000)]
    assert all(0 <= d <= 2.0 for d in draws)
    assert 0.3 < sorted(draws)[1000] < 0.5  # the median is the first parameter
    assert Distribution.parse("fixed:1.5").draw(rng) == 1.5
    assert all(1 <= Distribution.parse("uniform:1,2").draw(rng) <= 2 for _ in range(100))
    assert str(lognormal) == "lognormal:0.4,0.6"
    for bad in ("gauss:1", "uniform:2,1", "exp:x", "fixed:1,2", "exp:-1", "fixed:inf"):
        with pytest.raises(ValueError):
            Distribution.parse(bad)


def test_percentiles_are_nearest_rank() -> None:
    p = Percentiles.of(float(i) for i in range(1, 101))
    assert (p.n, p.p50, p.p90, p.p99) == (100, 50.0, 90.0, 99.0)
    empty = Percentiles.of([])
    assert empty.n == 0 and math.isnan(empty.p50)


def test_the_ledger_tells_lost_from_duplicated_and_from_still_queued() -> None:
    ledger = Ledger()
    for n in range(4):
        ledger.note_send(f"m{n}", "alice", "bob", urgent=True, recipient_idle=n > 0)
        ledger.note_stored(f"m{n}")
    ledger.note_message("bob", "m0")
    ledger.note_message("bob", "m0")  # delivered again after a reset: a duplicate
    ledger.note_message("bob", "m1")
    ledger.note_found_at_end("bob", "m2")  # still queued: stranded, not lost
    ledger.note_receipt("alice", "delivered", ["m0", "m1"])
    ledger.note_push(PushRecord(1.0, "apns", "alert", "bob", 200, lost=True))
    summary = ledger.summary()
    m = summary["messages"]
    assert (m["sent"], m["delivered"], m["duplicated"], m["lost"], m["still_queued_at_end"]) == (
        4, 2, 1, 1, 1,
    )  # fmt: skip
    assert summary["pushes"]["lost_by_provider"] == 1
    assert summary["latency_s"]["message_to_push"]["n"] == 3  # m1..m3 went to a sleeper
    assert failures(summary) == ["1 message(s) lost"]
    assert not ledger.settled()


async def test_a_scenario_with_groups_delivers_every_members_copy(tmp_path: Path) -> None:
    status, summary, text = await simulate(tmp_path, "--groups", "2", "--group-size", "5")
    assert status == 0, text
    m, r = summary["messages"], summary["receipts"]
    assert m["group_sends"] > 0 and m["group_copies"] == 4 * m["group_sends"]
    assert m["delivered"] == m["sent"] and m["lost"] == 0
    assert r["delivered_arrived"] == r["delivered_expected"] == m["delivered"]
    assert summary["undrained_devices"] == {}
    assert summary["scenario"]["groups"] == 2


def test_the_ledger_follows_each_members_copy_of_a_group_message() -> None:
    ledger = Ledger()
    ledger.note_group_send("g1", "alice", "team", [("bob", False), ("carol", True)], True)
    ledger.note_stored("g1")  # one `sent` for every copy
    ledger.note_message("bob", "g1@bob")
    ledger.note_receipt("alice", "delivered", ["g1"], by="bob")
    summary = ledger.summary()
    m = summary["messages"]
    assert (m["sent"], m["delivered"], m["group_sends"], m["group_copies"]) == (2, 1, 1, 2)
    assert summary["receipts"]["delivered_arrived"] == 1
    assert failures(summary) == ["1 message(s) lost"]  # carol's copy never arrived


def test_the_fake_apns_drops_background_pushes_beyond_the_ios_budget(tmp_path: Path) -> None:
    from scripts.fakes import FakeApns, HttpRequest

    fake = FakeApns.create(tmp_path)
    fake.background_per_hour = 3

    def push(kind: str, at: float) -> Any:
        headers = {
            "apns-topic": "com.example.app",
            "apns-push-type": kind,
            "apns-priority": "5" if kind == "background" else "10",
        }
        path = "/3/device/" + "ab" * 32
        request = HttpRequest("POST", path, headers, b'{"aps": {}}', True, at, peer_cert={})
        assert fake.handle(request).status == 200  # accepted, as Apple accepts them
        return fake.records[-1]

    assert [push("background", t).throttled for t in (0, 10, 20, 30)] == [False] * 3 + [True]
    assert not push("alert", 40).throttled  # alerts are not throttled
    assert not push("background", 3600.5).throttled  # the one at 0 left the hour
    assert push("background", 3601).throttled
    fake.background_per_hour = 0
    assert not push("background", 3602).throttled


async def test_zombie_apps_and_reads_on_a_second_device(tmp_path: Path) -> None:
    status, summary, text = await simulate(
        tmp_path, "--zombie-share", "1", "--reader-share", "1", "--ios-background-per-hour", "0"
    )
    assert status == 0, text
    assert summary["zombies"]["suspended_with_socket_open"] > 0
    assert summary["read_elsewhere"]["reads"] > 0
    assert set(summary["gateway"]) == {
        "alert_retries", "retries_skipped", "zombie_rescues", "clears"
    }  # fmt: skip
    assert summary["pushes"]["throttled_by_ios"] == 0
