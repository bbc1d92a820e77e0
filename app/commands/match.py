"""`featurescope match A B`: match the features of two stored sources (`model/source`, of one
model or of two models that share a tokenizer) by activation correlation over the same tokens,
and store each feature's best match and a one-to-one matching."""

from __future__ import annotations

import argparse

from app import urls
from app.config import Settings


def cmd_match(args: argparse.Namespace, settings: Settings) -> int:
    from app.db.engine import make_engine, upgrade
    from workers.loading import resolve_device
    from workers.match import MatchError, run_match

    if args.max_tokens is not None and args.max_tokens < 1:
        raise SystemExit("error: --max-tokens must be at least 1")
    engine = make_engine(args.db or settings.db_url)
    try:
        upgrade(engine)
        a, b, corr, pairs = run_match(engine, args.a, args.b, max_tokens=args.max_tokens,
                                      batch_size=args.batch_size,
                                      device=resolve_device(args.device))
    except MatchError as exc:
        raise SystemExit(f"error: {exc}") from None
    finally:
        engine.dispose()
    best = corr.nan_to_num(nan=-1.0).max(dim=1).values
    strong = sum(1 for x, y in pairs if corr[x, y] >= args.threshold)
    print(f"{a.model}/{a.source} ({corr.shape[0]} features) vs {b.model}/{b.source} "
          f"({corr.shape[1]}): median best-match correlation {best.median().item():.3f}; "
          f"{strong} of {len(pairs)} one-to-one pairs at {args.threshold} or more")
    print(urls.compare(a.model, a.source, b.model, b.source))
    return 0


def register(sub) -> None:
    m = sub.add_parser("match", help="match two sources' features by activation correlation "
                       "(models must share a tokenizer)")
    m.add_argument("a", metavar="A", help="MODEL/SOURCE")
    m.add_argument("b", metavar="B", help="MODEL/SOURCE")
    m.add_argument("--max-tokens", type=int, default=None,
                   help="cap on the tokens of A's dataset run through both (default: all)")
    m.add_argument("--batch-size", type=int, default=8)
    m.add_argument("--device", default="auto", help="auto, cpu, cuda, ...")
    m.add_argument("--threshold", type=float, default=0.5,
                   help="correlation from which a pair counts as a counterpart in the summary")
    m.add_argument("--db", default=None)
    m.set_defaults(func=cmd_match)
