"""The backend's settings: one frozen dataclass, read once from flags and ``CHAT_*`` variables
(flags win)."""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parent.parent  # examples/chat


@dataclass(frozen=True, slots=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 8080
    relay_url: str = "http://127.0.0.1:4437"  # how the backend reaches the relay
    public_relay_url: str = ""  # how browsers reach it (default: relay_url)
    relay_api_key: str = ""  # the backend's write credential; set CHAT_RELAY_API_KEY, not the flag
    relay_api_key_file: str = ""  # or a file holding it (argv is visible to every local user)
    jwt_keys: str = ""  # the relay's --auth-jwt-keys file; its HS256 key signs browser tokens
    jwt_audience: str = ""  # the relay's --auth-audience, if it sets one
    token_lifetime: float = 300.0  # seconds a browser's read-only token lives
    database_url: str = ""  # Postgres; empty: SQLite at sqlite_path
    sqlite_path: str = str(EXAMPLE / "data" / "chat.sqlite")
    web_dir: str = str(EXAMPLE / "web" / "dist")
    model: str = "deterministic"  # or "openai"
    tokens_per_second: float = 30.0
    reply_tokens: int = 120
    first_token_delay: float = 0.0  # seconds the local model thinks before its first token
    openai_url: str = "https://api.openai.com/v1"
    openai_key: str = ""
    openai_model: str = "gpt-4o-mini"
    linger: float = 0.005  # seconds the producer gathers tokens into one POST


class SettingsError(ValueError):
    """A setting that cannot be used; the message names it."""


def read_settings(
    argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
) -> Settings:
    env = os.environ if environ is None else environ
    parser = argparse.ArgumentParser(
        prog="python -m examples.chat.backend",
        description="The Relay chat example's backend (every flag is also a CHAT_<NAME> variable).",
    )
    defaults = Settings()
    for f in fields(Settings):
        flag = "--" + f.name.replace("_", "-")
        default = env.get("CHAT_" + f.name.upper(), getattr(defaults, f.name))
        parser.add_argument(flag, default=default, help=f"default: {getattr(defaults, f.name)!r}")
    args = vars(parser.parse_args(argv))
    values: dict[str, object] = {}
    for f in fields(Settings):
        kind = type(getattr(defaults, f.name))
        try:
            values[f.name] = kind(args[f.name])
        except ValueError:
            raise SettingsError(f"--{f.name.replace('_', '-')}: not a {kind.__name__}") from None
    settings = Settings(**values)  # type: ignore[arg-type]
    if settings.model not in ("deterministic", "openai"):
        raise SettingsError("--model: deterministic or openai")
    if not settings.jwt_keys:
        raise SettingsError("--jwt-keys: the JWK Set file the relay verifies browser tokens with")
    return _with_api_key(settings)


def _with_api_key(settings: Settings) -> Settings:
    """The relay API key from ``--relay-api-key-file`` or ``CHAT_RELAY_API_KEY`` (the flag
    works too, but any local user's ``ps`` shows it)."""
    path = settings.relay_api_key_file
    if path and settings.relay_api_key:
        raise SettingsError("--relay-api-key-file: give it or --relay-api-key, not both")
    if path:
        try:
            key = Path(path).read_text().strip()
        except OSError as exc:
            why = exc.strerror
            raise SettingsError(f"--relay-api-key-file: cannot read {path}: {why}") from None
        if not key:
            raise SettingsError(f"--relay-api-key-file: {path} is empty")
        settings = replace(settings, relay_api_key=key)
    if not settings.relay_api_key:
        raise SettingsError(
            "--relay-api-key-file (or CHAT_RELAY_API_KEY): the backend's write credential"
        )
    return settings
