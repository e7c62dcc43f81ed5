"""Configuration and the command line: flags beat RELAY_* variables beat defaults; bad values
fail at start-up naming the setting; every setting is documented in ``--help``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from relay import cli
from relay.config import SETTINGS, Config, ConfigError, check_serving, env_name, parse


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
        pytest.param([], {}, "webhook_allow_loopback", True, id="default-loopback-allowed"),
        pytest.param(
            ["--webhook-allow-loopback", "false"], {}, "webhook_allow_loopback", False, id="no-lo"
        ),
        pytest.param(
            [],
            {"RELAY_WEBHOOK_ALLOWED_HOSTS": " Hooks.Example.com, *.partner.io ,"},
            "webhook_allowed_hosts",
            "hooks.example.com,*.partner.io",
            id="allowed-hosts-normalized",
        ),
        pytest.param([], {}, "log_format", "auto", id="default-log-format"),
        pytest.param([], {}, "commit_interval", 0.0, id="default-commit-at-once"),
        pytest.param(
            ["--commit-interval", "0.01"], {}, "commit_interval", 0.01, id="commit-interval"
        ),
        pytest.param([], {}, "commit_pipeline", 1, id="default-one-commit-at-a-time"),
        pytest.param([], {"RELAY_COMMIT_PIPELINE": "3"}, "commit_pipeline", 3, id="pipeline"),
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
        pytest.param(["--commit-pipeline", "0"], {}, "--commit-pipeline", id="pipeline-zero"),
        pytest.param(["--commit-pipeline", "17"], {}, "--commit-pipeline", id="pipeline-max"),
        pytest.param([], {"RELAY_PORT": "http"}, "RELAY_PORT", id="port-word"),
        pytest.param(["--long-poll-timeout", "0"], {}, "--long-poll-timeout", id="zero-timeout"),
        pytest.param(
            [], {"RELAY_LONG_POLL_TIMEOUT": "-1"}, "RELAY_LONG_POLL_TIMEOUT", id="negative"
        ),
        pytest.param(["--max-body-bytes", "1.5"], {}, "--max-body-bytes", id="int-decimal"),
        pytest.param(["--log-level", "loud"], {}, "--log-level", id="level-unknown"),
        pytest.param([], {"RELAY_LOG_FORMAT": "xml"}, "RELAY_LOG_FORMAT", id="format-unknown"),
        pytest.param(["--db-timeout", "-2"], {}, "--db-timeout", id="db-timeout"),
        pytest.param(
            ["--webhook-allow-loopback", "maybe"], {}, "--webhook-allow-loopback", id="bool"
        ),
        pytest.param(
            ["--webhook-allowed-hosts", "https://x.example/"],
            {},
            "--webhook-allowed-hosts",
            id="hosts-not-urls",
        ),
        pytest.param(["--webhook-concurrency", "0"], {}, "--webhook-concurrency", id="conc"),
        pytest.param(["--access-log", "maybe"], {}, "--access-log", id="access-log-word"),
        pytest.param(["--database-pooler", "session"], {}, "--database-pooler", id="pooler"),
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


def test_a_transaction_pooler_without_a_direct_url_is_refused_naming_the_setting() -> None:
    with pytest.raises(ConfigError, match="--direct-database-url"):
        parse(
            ["--database-url", "postgresql://pgbouncer/relay", "--database-pooler", "transaction"]
        )
    with pytest.raises(ConfigError, match="RELAY_DIRECT_DATABASE_URL"):
        parse([], {"RELAY_DATABASE_POOLER": "Transaction"})
    config = parse(
        ["--database-pooler", "transaction"],
        {"RELAY_DIRECT_DATABASE_URL": "postgresql://db/relay"},
    )
    assert (config.database_pooler, config.direct_database_url) == (
        "transaction",
        "postgresql://db/relay",
    )


def test_serve_refuses_a_transaction_pooler_without_a_direct_url(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("RELAY_DIRECT_DATABASE_URL", raising=False)
    argv = ["serve", "--database-url", "postgresql://x/y", "--database-pooler", "transaction"]
    assert cli.main(argv) == 2
    assert "--database-pooler transaction needs --direct-database-url" in capsys.readouterr().err


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
    from relay.store.common import numbered_sql

    newest = numbered_sql("postgres")[-1][0]
    assert {"event": "schema migrated", "version": newest}.items() <= lines[-1].items()


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({}, False),
        ({"RELAY_INSECURE_NO_AUTH": "true"}, True),
        ({"RELAY_INSECURE_NO_AUTH": "0"}, False),
    ],
)
def test_a_boolean_setting_reads_the_environment(environ: dict[str, str], expected: bool) -> None:
    assert parse([], environ).insecure_no_auth is expected
    # ``--workers`` hands settings on as str(value): the boolean survives the round trip.
    assert parse([], {"RELAY_INSECURE_NO_AUTH": str(expected)}).insecure_no_auth is expected


def test_a_boolean_flag_is_a_bare_switch() -> None:
    assert parse(["--insecure-no-auth"], {"RELAY_INSECURE_NO_AUTH": "false"}).insecure_no_auth
    with pytest.raises(ConfigError, match="RELAY_INSECURE_NO_AUTH"):
        parse([], {"RELAY_INSECURE_NO_AUTH": "maybe"})


@pytest.mark.parametrize(
    ("argv", "refused"),
    [
        (["--host", "0.0.0.0"], True),
        (["--host", "::"], True),
        (["--host", "relay.internal"], True),
        (["--host", "0.0.0.0", "--insecure-no-auth"], False),
        (["--host", "0.0.0.0", "--auth-api-keys", "/etc/relay/keys.json"], False),
        (["--host", "0.0.0.0", "--auth-jwks-url", "https://idp.example/jwks"], False),
        (["--host", "127.0.0.1"], False),
        (["--host", "127.0.0.5"], False),
        (["--host", "::1"], False),
        (["--host", "localhost"], False),
    ],
)
def test_serving_beyond_loopback_needs_credentials(argv: list[str], refused: bool) -> None:
    config = parse(argv, {})
    if refused:
        with pytest.raises(ConfigError, match="--insecure-no-auth"):
            check_serving(config)
    else:
        check_serving(config)


def test_serve_on_every_interface_without_keys_exits_2(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("RELAY_AUTH_API_KEYS", "RELAY_AUTH_JWT_KEYS", "RELAY_AUTH_JWKS_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("RELAY_INSECURE_NO_AUTH", raising=False)
    assert cli.main(["serve", "--host", "0.0.0.0", "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert "0.0.0.0" in err and "--auth-api-keys" in err and "--insecure-no-auth" in err


def test_an_unusable_key_file_stops_serve_with_exit_code_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    keys = tmp_path / "keys.json"
    keys.write_text('{"keys": [{"id": "a"}]}')
    argv = ["serve", "--port", "0", "--data-dir", str(tmp_path / "d"), "--auth-api-keys", str(keys)]
    assert cli.main(argv) == 2
    assert str(keys) in capsys.readouterr().err
