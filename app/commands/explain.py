"""`featurescope explain`: explain the features of a source (tokens, local or openai
explainer), score the explanations beside their controls, store them, then embed them."""

from __future__ import annotations

import argparse
import sys

from app.config import DEFAULT_MODEL, Settings

EXPLAINERS = ("tokens", "local", "openai")
SCORERS = ("detection", "fuzzing", "simulation")


def parse_scorers(text: str) -> list[str]:
    """'none' or a comma list of SCORERS, in the order given, each once."""
    if text == "none":
        return []
    names = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in names if s not in SCORERS]
    if bad or not names:
        raise ValueError(f"--scorer expects 'none' or a comma list of "
                         f"{', '.join(SCORERS)}, not {text!r}")
    return list(dict.fromkeys(names))


def cmd_explain(args: argparse.Namespace, settings: Settings) -> int:
    from workers.explain.backends import make_explainer, make_scorers
    from workers.explain.run import ExplainRun
    from workers.loading import resolve_device

    scorers = parse_scorers(args.scorer)
    device = resolve_device(args.device)
    try:
        explainer = make_explainer(args.explainer, model=args.explainer_model,
                                   base_url=args.base_url, cache_dir=settings.cache_dir,
                                   device=device)
        run = ExplainRun(
            db_url=args.db or settings.db_url, model=args.model, source=args.source,
            explainer=explainer, features=args.features, batch_size=args.batch_size,
            progress_bar=not args.quiet,
            scorers=make_scorers(scorers, model=args.scorer_model, base_url=args.base_url,
                                 cache_dir=settings.cache_dir, seed=args.seed,
                                 n_examples=args.score_examples, device=device))
        result = run.run()
    except KeyboardInterrupt:
        print("interrupted: what was written is kept; run the same command again to resume",
              file=sys.stderr)
        return 130
    for note in result.notes:
        print(note, file=sys.stderr)
    print(f"explained {result.explained} features of {args.model}/{args.source} "
          f"({result.skipped} already explained), stored {result.scored} scores and "
          f"{result.vectors} embeddings")
    return 0


def register(sub) -> None:
    e = sub.add_parser("explain", help="write, score and store explanations of features")
    e.add_argument("--model", default=DEFAULT_MODEL, help="the model's slug in the database")
    e.add_argument("--source", required=True, help="the source's slug, e.g. 3-mlp")
    e.add_argument("--features", default="all", help="'all', 'N', 'A-B' or a comma list")
    e.add_argument("--explainer", choices=EXPLAINERS, default="tokens")
    e.add_argument("--scorer", default="none",
                   help=f"'none' or a comma list of {', '.join(SCORERS)}")
    e.add_argument("--explainer-model", default=None,
                   help="local: a HF folder or .gguf (default: the built-in instruct model); "
                   "openai: the model name the endpoint serves")
    e.add_argument("--scorer-model", default=None,
                   help="as --explainer-model, for the scorers (default: the explainer's "
                   "model, or the built-in one)")
    e.add_argument("--base-url", default=None,
                   help="an OpenAI-compatible endpoint (.../v1): the openai explainer, and the "
                   "scorers run there too; key from FEATURESCOPE_LLM_API_KEY")
    e.add_argument("--device", default="auto",
                   help="where a local explainer or scorer model runs: auto (a GPU when there "
                   "is one), cpu, cuda, cuda:1, ...")
    e.add_argument("--batch-size", type=int, default=16, help="features per batch")
    e.add_argument("--score-examples", type=int, default=5,
                   help="activating examples per scorer and feature (and as many others)")
    e.add_argument("--seed", type=int, default=0, help="seed of the examples scorers draw")
    e.add_argument("--db", default=None)
    e.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    e.set_defaults(func=cmd_explain)
