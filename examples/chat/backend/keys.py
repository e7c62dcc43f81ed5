"""``python -m examples.chat.backend.keys DIR``: the example's credentials, made once.

Writes ``DIR/jwks.json`` (an HS256 key: the relay verifies browser tokens with it, the backend
signs them), ``DIR/api-keys.json`` (the SHA-256 of the backend's API key with its write grant,
for the relay's ``--auth-api-keys``) and ``DIR/backend.key`` (that key itself, for the backend
only). Existing files are kept, so tokens survive a restart.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
import sys
from pathlib import Path

BACKEND_GRANTS = [{"path": "chat/**", "actions": ["read", "append", "admin"]}]


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text)


def ensure_keys(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    jwks = directory / "jwks.json"
    if not jwks.exists():
        secret = base64.urlsafe_b64encode(secrets.token_bytes(32)).rstrip(b"=").decode()
        doc = {"keys": [{"kty": "oct", "kid": "chat-hs-1", "alg": "HS256", "k": secret}]}
        _write_private(jwks, json.dumps(doc))
    key_file, api_keys = directory / "backend.key", directory / "api-keys.json"
    if not key_file.exists() or not api_keys.exists():
        key = secrets.token_hex(32)
        digest = hashlib.sha256(key.encode()).hexdigest()
        entry = {"id": "chat-backend", "sha256": digest, "grants": BACKEND_GRANTS}
        key_file.unlink(missing_ok=True)
        api_keys.unlink(missing_ok=True)
        _write_private(key_file, key)
        _write_private(api_keys, json.dumps({"keys": [entry]}))


if __name__ == "__main__":
    ensure_keys(Path(sys.argv[1]))
