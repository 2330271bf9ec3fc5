"""Push configuration: `gateway check-config` loads the keys; a bad key never stops serving."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from gateway.cli import main
from gateway.client import connect
from gateway.settings import Settings, load_settings
from push.providers import BrokenProvider, build_providers
from push.settings import ApnsSettings
from scripts.fakes.credentials import make_p8
from tests.conftest import make_settings, running_server

REPO = Path(__file__).resolve().parent.parent


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_check_config_names_an_apns_key_that_is_not_a_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write(tmp_path / "AuthKey.p8", "-----BEGIN PRIVATE KEY-----\nnot base64\n")
    config = write(
        tmp_path / "gw.toml",
        '[push.apns]\nkey_file = "AuthKey.p8"\nkey_id = "K"\nteam_id = "T"\ntopic = "a.b"\n',
    )
    assert main(["check-config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "[push.apns] key_file" in err and "AuthKey.p8" in err


def test_check_config_names_a_broken_service_account_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write(tmp_path / "sa.json", '{"type": "service_account"}')
    config = write(tmp_path / "gw.toml", '[push.fcm]\nservice_account_file = "sa.json"\n')
    assert main(["check-config", str(config)]) == 2
    assert "[push.fcm] service_account_file" in capsys.readouterr().err


def test_check_config_names_a_missing_key_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write(
        tmp_path / "gw.toml",
        '[push.apns]\nkey_file = "gone.p8"\nkey_id = "K"\nteam_id = "T"\ntopic = "a.b"\n',
    )
    assert main(["check-config", str(config)]) == 2
    assert "[push.apns] key_file: file not found" in capsys.readouterr().err


def test_check_config_accepts_good_credentials(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    make_p8(tmp_path / "AuthKey.p8")
    config = write(
        tmp_path / "gw.toml",
        '[push.apns]\nkey_file = "AuthKey.p8"\nkey_id = "K"\nteam_id = "T"\ntopic = "a.b"\n',
    )
    assert main(["check-config", str(config)]) == 0
    assert "push: apns" in capsys.readouterr().out


def test_the_embedded_default_uses_the_log_provider_only(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert build_providers(Settings().push) == {}
    assert main(["check-config", str(REPO / "config" / "default.toml")]) == 0
    assert "push: log provider only" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["push-production.example.toml", "push-sandbox.example.toml"])
def test_the_examples_only_lack_their_placeholder_files(name: str) -> None:
    from gateway.errors import ConfigError

    with pytest.raises(ConfigError, match="file not found"):
        load_settings(REPO / "config" / name)


async def test_a_bad_key_at_start_up_is_loud_but_the_gateway_serves(
    tmp_path: Path, token: object, caplog: pytest.LogCaptureFixture
) -> None:
    bad = write(tmp_path / "AuthKey.p8", "garbage")
    apns = ApnsSettings(key_file=bad, key_id="K", team_id="T", topic="a.b")
    settings = make_settings(tmp_path, push={"apns": apns})
    with caplog.at_level(logging.ERROR, logger="push.providers"):
        async with running_server(settings) as server:
            assert server.push is not None
            assert isinstance(server.push.providers["apns"], BrokenProvider)
            from gateway.auth import mint_token

            async with connect(server.url, mint_token(settings.auth, "bob", "phone")) as bob:
                await bob.send("bob", b"to myself")
    assert "[push.apns] key_file" in caplog.text
