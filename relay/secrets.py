"""Upstream secrets at rest: channel `api_key`s (and secret-named `options` values) are stored as Fernet
tokens (`cryptography`), never in plaintext.

Keys: `RELAY_SECRET_KEY` (comma-separated Fernet keys; the first encrypts, all decrypt, so a key can be
rotated), else `RELAY_SECRET_KEY_FILE`, else — only for a SQLite database file, the embedded default — a key
generated once into `<database>.secret-key` beside it (mode 0600). Any other database needs the key set, the
same on every host. A database remembers a check value encrypted with its key, so a wrong key stops the
relay at start with a clear message instead of failing every request later."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from relay.settings import SecretKeyError  # defined without cryptography: the worker-only CLI catches it too

log = logging.getLogger("relay.secrets")

PREFIX = "enc:v1:"  # marks a stored value as encrypted (rows written before encryption have none)
CHECK_PLAINTEXT = "policy-relay secret check"
# Option names whose values (at any depth below them) carry credentials: aws_secret_access_key, api_keys: [...],
# and every header an operator adds (extra_headers: {"X-Custom": "Bearer ..."}).
SECRET_WORDS = re.compile(r"key|secret|token|password|credential|auth|cookie|headers", re.I)


class SecretBox:
    def __init__(self, keys: list[bytes]) -> None:
        try:
            self._fernet = MultiFernet([Fernet(k) for k in keys])
        except (ValueError, TypeError) as exc:
            raise SecretKeyError("RELAY_SECRET_KEY must be one or more comma-separated Fernet keys (32 url-safe "
                                 "base64-encoded bytes each); make one with `policy-relay secret-key`.") from exc

    def encrypt(self, plaintext: str) -> str:
        return PREFIX + self._fernet.encrypt(plaintext.encode()).decode()

    def decrypt(self, stored: str | None) -> str | None:
        if stored is None or not stored.startswith(PREFIX):
            return stored  # not encrypted (yet): written before the migration that encrypts
        try:
            return self._fernet.decrypt(stored[len(PREFIX):].encode()).decode()
        except InvalidToken:
            raise SecretKeyError("A stored secret does not decrypt with RELAY_SECRET_KEY: the database was "
                                 "encrypted with another key.") from None

    def seal(self, value: str | None) -> str | None:
        """Encrypt a plaintext; an already encrypted value stays as it is."""
        if value is None or value.startswith(PREFIX):
            return value
        return self.encrypt(value)

    def seal_options(self, options: Any) -> Any:
        """Secret-named string values, at any depth, encrypted."""
        return _walk(options, self.seal)

    def open_options(self, options: Any) -> Any:
        return _walk(options, self.decrypt)


def _walk(value: Any, fn, secret: bool = False) -> Any:
    """`fn` applied to every string at or below a secret-named key."""
    if isinstance(value, dict):
        return {k: _walk(v, fn, secret or bool(SECRET_WORDS.search(str(k)))) for k, v in value.items()}
    if isinstance(value, list):
        return [_walk(v, fn, secret) for v in value]
    return fn(value) if secret and isinstance(value, str) else value


def new_key() -> str:
    return Fernet.generate_key().decode()


def _sqlite_file(database_url: str) -> Path | None:
    for prefix in ("sqlite:///", "sqlite+pysqlite:///"):
        if database_url.startswith(prefix):
            path = database_url[len(prefix):].split("?", 1)[0]
            return Path(path) if path and path != ":memory:" else None
    return None


def _read_or_create(path: Path) -> str:
    if path.exists():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    key = new_key()
    # O_EXCL: two processes starting at once must not both write a different key.
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_text().strip()
    with os.fdopen(fd, "w") as f:
        f.write(key + "\n")
    log.warning("generated the key that encrypts upstream secrets: %s (keep it with the database; "
                "set RELAY_SECRET_KEY to use your own)", path.resolve())
    return key


def resolve_box(database_url: str, secret_key: str | None = None, secret_key_file: str | None = None) -> SecretBox:
    if secret_key:
        raw = secret_key
    elif secret_key_file:
        try:
            raw = Path(secret_key_file).read_text().strip()
        except OSError as exc:
            raise SecretKeyError(f"RELAY_SECRET_KEY_FILE={secret_key_file} cannot be read: {exc}") from None
    elif database_url.startswith("sqlite"):
        path = _sqlite_file(database_url)
        raw = _read_or_create(path.with_name(path.name + ".secret-key")) if path else new_key()
    else:
        raise SecretKeyError("Set RELAY_SECRET_KEY (the same on every gateway process and host) to encrypt "
                             "upstream secrets in this database; make one with `policy-relay secret-key`.")
    return SecretBox([k.strip().encode() for k in raw.split(",") if k.strip()])


def box_from_env(database_url: str) -> SecretBox:
    return resolve_box(database_url, os.environ.get("RELAY_SECRET_KEY") or None,
                       os.environ.get("RELAY_SECRET_KEY_FILE") or None)
