"""Credential verification without HTTP: key loading (file and URL), rotation, reloads,
revocation, and which reason each bad credential is refused for."""

from __future__ import annotations

import hashlib
import hmac
import re
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any

import jwt
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from cryptography.hazmat.primitives import serialization
from jwt.algorithms import OKPAlgorithm
from jwt.utils import base64url_encode

from relay.auth.authorizer import Authorizer
from relay.auth.errors import Reason, Unauthorized
from relay.auth.sources import AuthConfigError
from relay.config import Config
from tests.auth_helpers import (
    AUDIENCE,
    api_key_entry,
    ed_key,
    jwks,
    rsa_key,
    token,
    write_json,
)
from tests.waits import eventually

ServerFactory = Callable[[web.Application], Coroutine[Any, Any, TestServer]]


class Files:
    def __init__(self, root: Path) -> None:
        self.keys = root / "jwks.json"
        self.api_keys = root / "api-keys.json"
        self.revoked = root / "revoked.json"
        write_json(self.keys, jwks("hs-1", "rsa-1", "ed-1", "ed-2"))
        write_json(self.api_keys, {"keys": []})
        write_json(self.revoked, {"revoked": []})

    def config(self, **settings: Any) -> Config:
        defaults: dict[str, Any] = {
            "auth_jwt_keys": str(self.keys),
            "auth_api_keys": str(self.api_keys),
            "auth_revocations": str(self.revoked),
            "auth_audience": AUDIENCE,
        }
        return Config(**{**defaults, **settings})


@pytest.fixture
def files(tmp_path: Path) -> Files:
    return Files(tmp_path)


async def refused(auth: Authorizer, credential: str | None) -> Reason:
    header = None if credential is None else f"Bearer {credential}"
    with pytest.raises(Unauthorized) as caught:
        await auth.authenticate(header)
    return caught.value.reason


@pytest.mark.parametrize("kid", ["hs-1", "rsa-1", "ed-1"], ids=["HS256", "RS256", "EdDSA"])
async def test_each_algorithm_verifies(files: Files, kid: str) -> None:
    auth = Authorizer(files.config())
    principal = await auth.authenticate(f"Bearer {token(kid=kid, jti='t-1')}")
    assert principal.subject == "tester"
    assert principal.key_id == kid and principal.jti == "t-1"
    assert principal.grant_for("append", "chat/42") is not None
    assert principal.grant_for("append", "other/42") is None


async def test_two_keys_are_valid_at_once_and_a_token_without_kid_tries_each(
    files: Files,
) -> None:
    auth = Authorizer(files.config())
    for kid in ("ed-1", "ed-2"):
        await auth.authenticate(f"Bearer {token(kid=kid)}")
    await auth.authenticate(f"Bearer {token(kid=None, signer='ed-2')}")


@pytest.mark.parametrize(
    ("credential", "reason"),
    [
        pytest.param(lambda: token(kid="ed-1", signer="ed-2"), "bad_signature", id="other-key"),
        pytest.param(lambda: token(kid=None, signer="ed-9"), "bad_signature", id="no-kid-no-key"),
        pytest.param(lambda: token(kid="ed-9"), "unknown_key", id="unknown-kid"),
        pytest.param(lambda: token(lifetime=-120), "expired", id="expired"),
        pytest.param(lambda: token(nbf=int(time.time()) + 600), "expired", id="not-yet-valid"),
        pytest.param(lambda: token(aud="someone-else"), "wrong_audience", id="audience"),
        pytest.param(lambda: token(grants="everything"), "malformed", id="grants-not-a-list"),
        pytest.param(
            lambda: token(grants=[{"path": "a*", "actions": ["read"]}]), "malformed", id="glob"
        ),
        pytest.param(lambda: "not.a.jwt", "malformed", id="garbage-jwt"),
        pytest.param(lambda: "no-such-api-key", "unknown_key", id="unknown-api-key"),
        pytest.param(lambda: None, "missing", id="missing"),
    ],
)
async def test_bad_credentials_are_refused_for_their_reason(
    files: Files, credential: Callable[[], str | None], reason: Reason
) -> None:
    assert await refused(Authorizer(files.config()), credential()) == reason


async def test_the_issuer_is_checked_when_configured(files: Files) -> None:
    auth = Authorizer(files.config(auth_issuer="https://idp.example"))
    await auth.authenticate(f"Bearer {token(iss='https://idp.example')}")
    assert await refused(auth, token(iss="https://evil.example")) == "wrong_issuer"


async def test_clock_skew_accepts_a_just_expired_token(files: Files) -> None:
    just_expired = token(lifetime=-5)
    await Authorizer(files.config(auth_clock_skew=30)).authenticate(f"Bearer {just_expired}")
    assert await refused(Authorizer(files.config(auth_clock_skew=0)), just_expired) == "expired"


async def test_the_token_cannot_choose_how_a_key_is_used(files: Files) -> None:
    """HS256 "signed" with the RSA key's public PEM as the secret (the classic confusion; PyJWT
    refuses to sign that, so the token is built by hand) must not verify."""
    pem = (
        rsa_key()
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    header = base64url_encode(b'{"alg":"HS256","kid":"rsa-1","typ":"JWT"}')
    body = base64url_encode(b'{"aud":"relay-test","grants":[{"path":"**","actions":["admin"]}]}')
    signing_input = header + b"." + body
    signature = base64url_encode(hmac.new(pem, signing_input, hashlib.sha256).digest())
    forged = (signing_input + b"." + signature).decode()
    assert await refused(Authorizer(files.config()), forged) == "bad_signature"


async def test_the_jwk_file_rotates_without_a_restart(files: Files) -> None:
    auth = Authorizer(files.config())
    old = token(kid="ed-1")
    await auth.authenticate(f"Bearer {old}")
    write_json(files.keys, jwks("ed-2", "ed-3"))
    auth.reload_changed_files()
    assert await refused(auth, old) == "unknown_key"  # the cached verification is dropped too
    await auth.authenticate(f"Bearer {token(kid='ed-3')}")


async def test_api_keys_are_looked_up_by_hash_and_reloaded(files: Files) -> None:
    auth = Authorizer(files.config())
    assert await refused(auth, "sk-reader") == "unknown_key"
    grants = [{"path": "chat/**", "actions": ["read"], "public": True}]
    write_json(files.api_keys, {"keys": [api_key_entry("sk-reader", "reader-1", grants)]})
    assert "sk-reader" not in files.api_keys.read_text()
    auth.reload_changed_files()
    principal = await auth.authenticate("Bearer sk-reader")
    assert principal.key_id == "reader-1" and principal.kind == "api_key"
    grant = principal.grant_for("read", "chat/1")
    assert grant is not None and grant.public
    assert principal.grant_for("append", "chat/1") is None
    write_json(files.api_keys, {"keys": []})
    auth.reload_changed_files()
    assert auth.invalid_reason(principal) == "unknown_key"  # a live reader holding it stops
    assert await refused(auth, "sk-reader") == "unknown_key"


async def test_an_api_key_past_its_expiry_is_refused(files: Files) -> None:
    entries = [
        api_key_entry("sk-old", "old", [], expires_at="2020-01-01T00:00:00Z"),
        api_key_entry("sk-new", "new", [], expires_at="2999-01-01T00:00:00Z"),
    ]
    write_json(files.api_keys, {"keys": entries})
    auth = Authorizer(files.config())
    assert await refused(auth, "sk-old") == "expired"
    await auth.authenticate("Bearer sk-new")


async def test_revocation_file_reloads_by_jti_and_by_key_id(files: Files) -> None:
    write_json(files.api_keys, {"keys": [api_key_entry("sk-w", "writer-1", [])]})
    auth = Authorizer(files.config())
    by_jti, by_kid = token(jti="j-1"), token(kid="ed-2", jti="j-2")
    for credential in (by_jti, by_kid, "sk-w"):
        await auth.authenticate(f"Bearer {credential}")
    write_json(files.revoked, {"revoked": [{"jti": "j-1"}, {"kid": "ed-2"}, {"kid": "writer-1"}]})
    auth.reload_changed_files()
    for credential in (by_jti, by_kid, "sk-w"):
        assert await refused(auth, credential) == "revoked"
    await auth.authenticate(f"Bearer {token(jti='j-3')}")


async def test_a_broken_reload_keeps_the_last_good_file(files: Files) -> None:
    auth = Authorizer(files.config())
    files.keys.write_text("{not json")
    auth.reload_changed_files()
    await auth.authenticate(f"Bearer {token()}")


@pytest.mark.parametrize(
    ("which", "content", "named"),
    [
        ("keys", "{not json", "not JSON"),
        ("keys", '{"keys": [{"kty": "RSA"}]}', "keys[0]"),
        ("api_keys", '{"keys": [{"id": "a", "sha256": "xyz", "grants": []}]}', "sha256"),
        ("api_keys", '{"keys": [{"id": "a", "sha256": "' + "0" * 64 + '", "grants": {}}]}', "list"),
        ("revoked", '{"revoked": [{"sub": "x"}]}', "revoked[0]"),
    ],
)
def test_a_bad_file_stops_start_up_naming_it(
    files: Files, which: str, content: str, named: str
) -> None:
    path = {"keys": files.keys, "api_keys": files.api_keys, "revoked": files.revoked}[which]
    path.write_text(content)
    with pytest.raises(AuthConfigError, match=re.escape(named)) as caught:
        Authorizer(files.config())
    assert str(path) in str(caught.value)


@pytest.mark.parametrize(
    "header",
    ["Basic dXNlcjpwYXNz", "Bearer", "Bearer two words", "Bearer " + "a" * 9000, "bearer tök"],
)
async def test_malformed_authorization_headers(files: Files, header: str) -> None:
    with pytest.raises(Unauthorized) as caught:
        await Authorizer(files.config()).authenticate(header)
    assert caught.value.reason == "malformed" and caught.value.given


async def test_a_verified_token_is_not_verified_again(
    files: Files, monkeypatch: pytest.MonkeyPatch
) -> None:
    auth = Authorizer(files.config())
    calls = 0
    real = jwt.decode

    def counting(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(jwt, "decode", counting)
    credential = f"Bearer {token()}"
    for _ in range(50):
        await auth.authenticate(credential)
    assert calls == 1


@pytest.fixture
async def jwks_server(aiohttp_server: ServerFactory) -> AsyncIterator[JwksServer]:
    served = JwksServer()
    app = web.Application()
    app.router.add_get("/jwks.json", served.handle)
    server = await aiohttp_server(app)
    served.url = str(server.make_url("/jwks.json"))
    yield served


class JwksServer:
    def __init__(self) -> None:
        self.doc: dict[str, Any] = jwks("ed-1")
        self.fetches = 0
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        self.fetches += 1
        return web.json_response(self.doc)


async def test_jwks_url_is_fetched_and_refetched_for_an_unknown_kid(
    jwks_server: JwksServer,
) -> None:
    auth = Authorizer(Config(auth_jwks_url=jwks_server.url, auth_audience=AUDIENCE))
    await auth.open()
    try:
        assert jwks_server.fetches == 1
        await auth.authenticate(f"Bearer {token(kid='ed-1')}")
        jwks_server.doc = jwks("ed-1", "ed-2")  # the identity provider rotates in a new key
        auth.unknown_kid_refetch_seconds = 0
        await auth.authenticate(f"Bearer {token(kid='ed-2')}")
        assert jwks_server.fetches == 2
        auth.unknown_kid_refetch_seconds = 3600  # now rate-limited: no fetch per bad kid
        for _ in range(5):
            assert await refused(auth, token(kid="ed-9")) == "unknown_key"
        assert jwks_server.fetches == 2
    finally:
        await auth.close()


async def test_jwks_url_refreshes_in_the_background(jwks_server: JwksServer) -> None:
    auth = Authorizer(Config(auth_jwks_url=jwks_server.url, auth_audience=AUDIENCE))
    auth.jwks_refresh_seconds = 0.05
    await auth.open()
    try:
        jwks_server.doc = jwks("ed-2")
        auth.unknown_kid_refetch_seconds = 3600

        async def dropped() -> bool:
            return await _reason_or_none(auth, token(kid="ed-1")) is not None

        await eventually(dropped, interval=0.02, what="the removed key dropped")
        await auth.authenticate(f"Bearer {token(kid='ed-2')}")
    finally:
        await auth.close()


async def _reason_or_none(auth: Authorizer, credential: str) -> Reason | None:
    try:
        await auth.authenticate(f"Bearer {credential}")
    except Unauthorized as exc:
        return exc.reason
    return None


async def test_an_unreachable_jwks_url_does_not_stop_start_up() -> None:
    auth = Authorizer(Config(auth_jwks_url="http://127.0.0.1:9/jwks.json"))
    await auth.open()
    try:
        assert await refused(auth, token()) == "unknown_key"
    finally:
        await auth.close()


async def test_private_jwks_verify_with_their_public_half(tmp_path: Path) -> None:
    private = OKPAlgorithm.to_jwk(ed_key("ed-1"), as_dict=True)
    write_json(tmp_path / "k.json", {"keys": [{**private, "kid": "ed-1"}]})
    auth = Authorizer(Config(auth_jwt_keys=str(tmp_path / "k.json"), auth_audience=AUDIENCE))
    await auth.authenticate(f"Bearer {token()}")


async def test_the_shipped_example_key_file_works_as_documented() -> None:
    example = Path(__file__).resolve().parent.parent / "deploy" / "api-keys.example.json"
    auth = Authorizer(Config(auth_api_keys=str(example)))
    principal = await auth.authenticate("Bearer relay-dev-key-change-me")
    assert principal.grant_for("admin", "any/stream") is not None
