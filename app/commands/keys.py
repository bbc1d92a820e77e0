"""`featurescope keys create|list|revoke`: the API keys that let callers run the model (`live`),
write (`write`) or change what others wrote (`admin`). A key is printed once, when it is made;
the database keeps its sha256."""

from __future__ import annotations

import argparse

from app.config import Settings
from app.keys import Scope


def _session(args: argparse.Namespace, settings: Settings):
    from sqlalchemy.orm import Session

    from app.db.engine import make_engine, upgrade

    engine = make_engine(args.db or settings.db_url)
    upgrade(engine)
    return Session(engine)


def _when(t) -> str:
    return t.strftime("%Y-%m-%d %H:%M") if t is not None else "-"


def cmd_create(args: argparse.Namespace, settings: Settings) -> int:
    from app.keys import create_key

    with _session(args, settings) as session:
        row, secret = create_key(session, name=args.name, scope=args.scope)
        print(f"key {row.id} ({row.name!r}, scope {row.scope}):\n{secret}\n"
              "Keep it: it is shown only now. Send it as the x-api-key header or as "
              "Authorization: Bearer.")
    return 0


def cmd_list(args: argparse.Namespace, settings: Settings) -> int:
    from app.keys import list_keys

    with _session(args, settings) as session:
        rows = list_keys(session)
        if not rows:
            print("no keys (featurescope keys create --name NAME --scope SCOPE)")
            return 0
        print(f"{'id':>4}  {'prefix':<12}{'scope':<7}{'created':<18}{'last used':<18}"
              f"{'status':<9}name")
        for r in rows:
            status = "revoked" if r.revoked_at else "active"
            print(f"{r.id:>4}  {r.prefix + '…':<12}{r.scope:<7}{_when(r.created_at):<18}"
                  f"{_when(r.last_used_at):<18}{status:<9}{r.name}")
    return 0


def cmd_revoke(args: argparse.Namespace, settings: Settings) -> int:
    from app.keys import revoke_key

    with _session(args, settings) as session:
        row = revoke_key(session, key=args.key)
        print(f"key {row.id} ({row.name!r}) is revoked")
    return 0


def register(sub) -> None:
    k = sub.add_parser("keys", help="make, list and revoke API keys")
    ks = k.add_subparsers(dest="keys_command", required=True)
    c = ks.add_parser("create", help="make a key and print it (once)")
    c.add_argument("--name", required=True, help="who or what the key is for")
    c.add_argument("--scope", required=True, choices=[s.value for s in Scope],
                   help="read < live (run the model) < write (lists, imports) < admin; "
                   "each includes the ones before it")
    c.set_defaults(func=cmd_create)
    ls = ks.add_parser("list", help="the keys, by id (never the keys themselves)")
    ls.set_defaults(func=cmd_list)
    r = ks.add_parser("revoke", help="revoke a key: requests with it are refused at once")
    r.add_argument("key", help="the key's id or prefix, as `keys list` shows them")
    r.set_defaults(func=cmd_revoke)
    for p in (c, ls, r):
        p.add_argument("--db", default=None, help="database URL (default: "
                       "FEATURESCOPE_DATABASE_URL or the SQLite file in the data directory)")
