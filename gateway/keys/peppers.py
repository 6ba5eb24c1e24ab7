"""Where the pepper comes from: config, or (embedded SQLite only) a 0600 file made on first run."""

from __future__ import annotations

import logging
import os
import secrets
from pathlib import Path
from urllib.parse import urlsplit

from gateway.config.schema import KeysConfig
from gateway.keys.digest import Pepper, Peppers

log = logging.getLogger("gateway.keys")


class PepperMissing(Exception):
    pass


def sqlite_path(store_url: str) -> Path | None:
    """The database file of a sqlite:/// URL, or None for :memory: and other stores."""
    parts = urlsplit(store_url)
    if parts.scheme != "sqlite":
        return None
    path = parts.path[1:] if parts.path.startswith("/") else parts.path
    if not path or path == ":memory:":
        return None
    return Path(path)


def load_peppers(keys: KeysConfig, store_url: str) -> Peppers:
    """The configured pepper; with SQLite and none configured, one generated beside the database."""
    secret = keys.pepper.encode()
    if not secret:
        db = sqlite_path(store_url)
        if urlsplit(store_url).scheme != "sqlite":
            raise PepperMissing(
                "keys.pepper is empty: with PostgreSQL the pepper must come from config "
                "(e.g. GATEWAY_KEY_PEPPER), so every replica digests keys alike"
            )
        secret = _pepper_file(db).encode() if db is not None else b"in-memory-store-pepper"
    older = [Pepper(p.secret.encode(), p.version) for p in keys.old_peppers]
    return Peppers(Pepper(secret, keys.pepper_version), older)


def _pepper_file(db: Path) -> str:
    path = db.with_name(db.name + ".pepper")
    if path.exists():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    value = secrets.token_urlsafe(32)
    # Written whole under a private name, then linked into place: a process starting at the same
    # moment either wins the link or reads the complete file the other one linked, never half a file.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(value + "\n")
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            return path.read_text().strip()
    finally:
        tmp.unlink(missing_ok=True)
    log.warning("generated a key pepper into %s (mode 0600); keep it with the database and back it up", path)
    return value
