"""Configuration and the command line: flags beat RELAY_* variables beat defaults; bad values
fail at start-up naming the setting; every setting is documented in ``--help``."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from relay import cli
from relay.config import SETTINGS, Config, ConfigError, env_name, parse


@pytest.mark.parametrize(
    ("argv", "environ", "field", "expected"),
    [
        pytest.param([], {}, "port", 4437, id="default-port"),
        pytest.param([], {}, "host", "127.0.0.1", id="default-host"),
        pytest.param([], {}, "long_poll_timeout", 30.0, id="default-long-poll"),
        pytest.param([], {}, "data_dir", "./data", id="default-data-dir"),
        pytest.param([], {"RELAY_PORT": "9000"}, "port", 9000, id="env-port"),
        pytest.param(["--port", "8000"], {"RELAY_PORT": "9000"}, "port", 8000, id="flag-wins"),
        pytest.param(
            ["--long-poll-timeout", "0.5"], {}, "long_poll_timeout", 0.5, id="decimal-seconds"
        ),
        pytest.param([], {"RELAY_DATA_DIR": "/srv/relay"}, "data_dir", "/srv/relay", id="env-dir"),
        pytest.param(
            [],
            {"RELAY_DATABASE_URL": "postgresql://x/y"},
            "database_url",
            "postgresql://x/y",
            id="env-database-url",
        ),
        pytest.param(["--log-level", "WARNING"], {}, "log_level", "warning", id="level-case"),
        pytest.param(["--max-body-bytes", "10"], {}, "max_body_bytes", 10, id="max-body-bytes"),
        pytest.param(
            [], {"RELAY_MAX_CHUNK_BYTES": "4096"}, "max_chunk_bytes", 4096, id="env-chunk"
        ),
        pytest.param([], {}, "log_format", "auto", id="default-log-format"),
        pytest.param([], {}, "access_log", True, id="default-access-log"),
        pytest.param(["--access-log", "off"], {}, "access_log", False, id="access-log-off"),
        pytest.param([], {"RELAY_ACCESS_LOG": "False"}, "access_log", False, id="env-access-log"),
    ],
)
def test_settings_resolve_in_order(
    argv: list[str], environ: dict[str, str], field: str, expected: object
) -> None:
    assert getattr(parse(argv, environ), field) == expected


@pytest.mark.parametrize(
    ("argv", "environ", "named"),
    [
        pytest.param(["--port", "70000"], {}, "--port", id="port-range"),
        pytest.param([], {"RELAY_PORT": "http"}, "RELAY_PORT", id="port-word"),
        pytest.param(["--long-poll-timeout", "0"], {}, "--long-poll-timeout", id="zero-timeout"),
        pytest.param(
            [], {"RELAY_LONG_POLL_TIMEOUT": "-1"}, "RELAY_LONG_POLL_TIMEOUT", id="negative"
        ),
        pytest.param(["--max-body-bytes", "1.5"], {}, "--max-body-bytes", id="int-decimal"),
        pytest.param(["--log-level", "loud"], {}, "--log-level", id="level-unknown"),
        pytest.param([], {"RELAY_LOG_FORMAT": "xml"}, "RELAY_LOG_FORMAT", id="format-unknown"),
        pytest.param(["--db-timeout", "-2"], {}, "--db-timeout", id="db-timeout"),
        pytest.param(["--access-log", "maybe"], {}, "--access-log", id="access-log-word"),
    ],
)
def test_bad_values_fail_naming_the_setting(
    argv: list[str], environ: dict[str, str], named: str
) -> None:
    with pytest.raises(ConfigError, match=named):
        parse(argv, environ)


def test_every_setting_has_a_config_field_a_flag_and_an_env_name() -> None:
    config = parse([], {})
    assert config == Config()
    for setting in SETTINGS:
        assert getattr(config, setting.name) == setting.default
        assert env_name(setting.name) == "RELAY_" + setting.name.upper()


def test_serve_help_documents_every_flag_and_its_variable() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "relay", "serve", "--help"], capture_output=True, text=True
    )
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    for setting in SETTINGS:
        assert "--" + setting.name.replace("_", "-") in text
        assert env_name(setting.name) in text


def test_a_bad_setting_stops_serve_with_exit_code_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["serve", "--port", "nope"]) == 2
    assert "--port" in capsys.readouterr().err


def test_migrate_without_a_database_url_explains_itself(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("RELAY_DATABASE_URL", raising=False)
    assert cli.main(["migrate"]) == 2
    assert "--database-url" in capsys.readouterr().err


def test_migrate_applies_the_schema(
    pg_url: str, capsys: pytest.CaptureFixture[str], restore_logging: None
) -> None:
    assert cli.main(["migrate", "--database-url", pg_url, "--log-format", "json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert {"event": "schema migrated", "version": 1}.items() <= lines[-1].items()
