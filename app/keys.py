"""API keys: the scopes, what a key looks like, and making, finding, listing and revoking keys.

A key is `fsk_` and 43 URL-safe characters (256 random bits). The database keeps its sha256
and its first characters (to tell keys apart in a listing), never the key: it is shown once,
when it is made. Used by the `featurescope keys` command and by the server's access checks
(`app.routes.access`); imports neither torch nor FastAPI.
"""

from __future__ import annotations

import datetime as dt
import enum
import hashlib
import secrets
from dataclasses import dataclass

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from app.db.tables import ApiKey, utcnow

KEY_START = "fsk_"
PREFIX_CHARS = 10
"""How much of a key its listing shows (`fsk_` and 6 random characters)."""
TOUCH_EVERY = dt.timedelta(minutes=1)
"""`last_used_at` is written at most this often per key, not on every request."""


class Scope(enum.StrEnum):
    """What a key may do. Each scope includes the ones before it."""

    read = "read"
    """read the pages and the API (open to anyone by default)"""
    live = "live"
    """run the model: activations, search by text, the try box, interventions"""
    write = "write"
    """write: lists, explanations by hand, imports"""
    admin = "admin"
    """change what others wrote (another key's lists)"""

    def covers(self, needed: Scope) -> bool:
        return _ORDER.index(self) >= _ORDER.index(needed)


_ORDER = list(Scope)


def parse_scope(text: str) -> Scope:
    try:
        return Scope(text.strip())
    except ValueError:
        raise ValueError(f"unknown scope {text!r}; the scopes are "
                         f"{', '.join(s.value for s in Scope)}") from None


def parse_scopes(text: str) -> frozenset[Scope]:
    """'read,live' -> {read, live}; '' -> none."""
    return frozenset(parse_scope(part) for part in text.split(",") if part.strip())


def new_secret() -> str:
    return KEY_START + secrets.token_urlsafe(32)


def digest(secret: str) -> str:
    """The sha256 of a key (hex), as stored. A key is 256 random bits, so a fast hash is as
    safe as a slow one: there is nothing to guess from it."""
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).hexdigest()


@dataclass(frozen=True)
class KeyInfo:
    """A valid key as a request's caller: which key, and what it may do."""

    id: int
    name: str
    scope: Scope


def _check_name(name: str) -> str:
    name = name.strip()
    if not 1 <= len(name) <= 128 or not name.isprintable():
        raise ValueError(f"a key's name is 1 to 128 printable characters, got {name!r}")
    return name


def create_key(session: Session, *, name: str, scope: str | Scope) -> tuple[ApiKey, str]:
    """A new key: its row (committed) and the key itself, which is not stored anywhere."""
    secret = new_secret()
    row = ApiKey(name=_check_name(name), scope=parse_scope(str(scope)).value,
                 prefix=secret[:PREFIX_CHARS], digest=digest(secret))
    session.add(row)
    session.commit()
    return row, secret


def list_keys(session: Session) -> list[ApiKey]:
    return list(session.scalars(select(ApiKey).order_by(ApiKey.id)))


def revoke_key(session: Session, *, key: str) -> ApiKey:
    """Revoke a key given by its id or its listed prefix (committed); a revoked key stays listed.
    ValueError when no key, or more than one, matches."""
    query = select(ApiKey)
    query = (query.where(ApiKey.id == int(key)) if key.isdigit()
             else query.where(ApiKey.prefix == key))
    rows = list(session.scalars(query.limit(2)))
    if len(rows) != 1:
        raise ValueError(f"no key {key!r}: give the id or the prefix `keys list` shows"
                         if not rows else f"{key!r} names more than one key: give its id")
    row = rows[0]
    if row.revoked_at is None:
        row.revoked_at = utcnow()
        session.commit()
    return row


def find_key(session: Session, *, secret: str) -> KeyInfo | None:
    """The key a request sent, if it is one and is not revoked. Marks it used (at most once a
    minute per key)."""
    if not secret.startswith(KEY_START) or len(secret) > 100:
        return None
    row = session.execute(select(ApiKey.id, ApiKey.name, ApiKey.scope, ApiKey.last_used_at)
                          .where(ApiKey.digest == digest(secret), ApiKey.revoked_at.is_(None))
                          ).first()
    if row is None:
        return None
    now = utcnow()
    last = row.last_used_at
    if last is not None and last.tzinfo is None:  # SQLite gives naive UTC
        last = last.replace(tzinfo=dt.UTC)
    if last is None or now - last > TOUCH_EVERY:
        session.execute(update(ApiKey).where(ApiKey.id == row.id).values(last_used_at=now))
        session.commit()
    return KeyInfo(id=row.id, name=row.name, scope=Scope(row.scope))
