"""`featurescope embed-explanations`: store the embedding of every explanation that has none,
for search by meaning (`featurescope explain` does the same after writing explanations)."""

from __future__ import annotations

import argparse

from app.config import Settings


def cmd_embed(args: argparse.Namespace, settings: Settings) -> int:
    from sqlalchemy import select

    from app import embedding
    from app.db.engine import make_engine, upgrade
    from app.db.tables import Model, Source

    engine = make_engine(args.db or settings.db_url)
    upgrade(engine)
    source_id = None
    if args.model or args.source:
        if not (args.model and args.source):
            raise SystemExit("error: give both --model and --source, or neither")
        with engine.connect() as conn:
            source_id = conn.scalar(select(Source.id).join(Model, Model.id == Source.model_id)
                                    .where(Model.slug == args.model, Source.slug == args.source))
        if source_id is None:
            raise SystemExit(f"error: no source {args.model}/{args.source}")
    try:
        n = embedding.store_missing_vectors(engine, source_id=source_id)
    except embedding.EmbedderMissing as exc:
        raise SystemExit(f"error: {exc}") from None
    print(f"stored {n} explanation embeddings ({embedding.EMBEDDER})")
    return 0


def register(sub) -> None:
    e = sub.add_parser("embed-explanations",
                       help="store the embeddings of explanations that have none (search by "
                       "meaning)")
    e.add_argument("--model", default=None, help="only the explanations of this model's source")
    e.add_argument("--source", default=None)
    e.add_argument("--db", default=None)
    e.set_defaults(func=cmd_embed)
