"""`featurescope export`: one source in Neuronpedia's bulk layout or as parquet tables
(app/export.py); `featurescope import`: sources in Neuronpedia's layout or SAEDashboard's
batch-N.json output (app/imports.py)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from app.config import Settings


def cmd_export(args: argparse.Namespace, settings: Settings) -> int:
    from app.db.engine import make_engine
    from app.export import ExportError, export

    if args.batch_size < 1:
        raise SystemExit("error: --batch-size must be at least 1")
    engine = make_engine(args.db or settings.db_url)
    try:
        folder = export(engine, args.model, args.source, Path(args.out), args.format,
                        batch=args.batch_size)
    except ExportError as exc:
        raise SystemExit(f"error: {exc}") from None
    finally:
        engine.dispose()
    print(f"exported {args.model}/{args.source} ({args.format}) to {folder}")
    return 0


def cmd_import(args: argparse.Namespace, settings: Settings) -> int:
    from app.db.engine import make_engine, upgrade
    from app.imports import ImportFormatError, import_dir

    folder = Path(args.folder)
    if not folder.is_dir():
        raise SystemExit(f"error: {folder} is not a folder")
    engine = make_engine(args.db or settings.db_url)
    try:
        upgrade(engine)
        done = import_dir(engine, folder)
    except (ImportFormatError, KeyError, json.JSONDecodeError) as exc:
        raise SystemExit(f"error: {folder} is not a Neuronpedia export or SAEDashboard output this "
                         f"can read: "
                         f"{type(exc).__name__}: {exc}") from None
    finally:
        engine.dispose()
    for m in done:
        print(f"imported {m.model}: {', '.join(m.sources)} ({m.n_features} features)")
    return 0


def register(sub) -> None:
    e = sub.add_parser("export", help="write a source in Neuronpedia's bulk layout or as "
                       "parquet tables")
    e.add_argument("--model", required=True)
    e.add_argument("--source", required=True)
    e.add_argument("--format", choices=["neuronpedia", "parquet"], default="neuronpedia")
    e.add_argument("--out", required=True, help="folder; the source goes to OUT/MODEL/SOURCE")
    e.add_argument("--batch-size", type=int, default=1024,
                   help="features per batch file (neuronpedia)")
    e.add_argument("--db", default=None)
    e.set_defaults(func=cmd_export)
    i = sub.add_parser("import", help="read sources in Neuronpedia's bulk layout (from "
                       "featurescope export or Neuronpedia's exports) or SAEDashboard's "
                       "batch-N.json output into the database")
    i.add_argument("folder", metavar="DIR")
    i.add_argument("--db", default=None)
    i.set_defaults(func=cmd_import)
