"""The `featurescope` command line. Imports torch only in the commands that run a model."""

from __future__ import annotations

import argparse
import logging
import sys

from pydantic import ValidationError
from sqlalchemy.exc import SQLAlchemyError

from app.commands import embed, explain, keys, llm_serve, match, transfer
from app.config import DEFAULT_DATASET, DEFAULT_MODEL, Settings

log = logging.getLogger("featurescope")


def _positive_int(text: str, flag: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise SystemExit(f"error: {flag} expects 'auto' or a positive integer, got {text!r}")
    return value


def _device(name: str) -> str:
    from workers.loading import resolve_device

    return resolve_device(name)


def cmd_harvest(args: argparse.Namespace, settings: Settings) -> int:
    from workers.runner import PlanError

    try:
        return _harvest(args, settings)
    except PlanError as exc:  # as argument errors: the message, exit status 1
        raise SystemExit(f"error: {exc}") from None


def _window(args: argparse.Namespace, default: int) -> int:
    """--window, or the default where it fits in a sequence; a window longer than a sequence
    is refused."""
    if args.window is None:
        return min(default, args.seq_len)
    if not 1 <= args.window <= args.seq_len:
        raise ValueError(f"--window {args.window} does not fit in a sequence of "
                         f"--seq-len {args.seq_len} tokens: give 1 to {args.seq_len}, or a "
                         "longer --seq-len")
    return args.window


def _harvest(args: argparse.Namespace, settings: Settings) -> int:
    from workers.harvest import HarvestConfig
    from workers.runner import HarvestRunner, RunConfig

    window = _window(args, HarvestConfig.window)
    if args.quiet:  # the model's loading bar too
        from transformers.utils.logging import disable_progress_bar

        disable_progress_bar()
    cfg = RunConfig(
        db_url=args.db or settings.db_url, model=args.model, dataset=args.dataset,
        layers=args.layers, saes=args.sae, heads=args.heads, max_tokens=args.max_tokens,
        seq_len=args.seq_len,
        harvest=HarvestConfig(top_k=args.top_k, shard_sequences=args.shard_sequences,
                              window=window, compile=not args.no_compile, dtype=args.dtype,
                              relations=args.relations),
        batch_size=(None if args.batch_size == "auto"
                    else _positive_int(args.batch_size, "--batch-size")),
        device=args.device, cache_dir=settings.cache_dir, checkpoint_dir=settings.checkpoint_dir,
        backend=args.backend, ray_address=args.ray_address, ray_workers=args.ray_workers,
        replace=args.replace, skip_existing=args.skip_existing, progress_bar=not args.quiet)
    try:
        result = HarvestRunner(cfg).run()
    except KeyboardInterrupt:
        print("interrupted: run the same command again to resume", file=sys.stderr)
        return 130
    if not result.written:
        print(f"every requested source of {result.model} is already harvested")
        return 0
    print(f"harvested {len(result.written)} sources of {result.model} over {result.n_tokens} "
          f"tokens of {result.dataset} into {result.database}")
    return 0


def cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    from app.db.engine import check_url
    from app.main import serve

    if args.db is not None:
        check_url(args.db)

    return serve(settings.with_options(host=args.host, port=args.port, database_url=args.db,
                                       live=True if args.live else None))


def cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    from app.db.engine import check_url
    from workers.demo import DemoConfig, run_demo

    if args.db is not None:
        check_url(args.db)

    cfg = DemoConfig(model=args.model, dataset=args.dataset, max_tokens=args.max_tokens,
                     seq_len=args.seq_len, first_layers=args.first_layers,
                     first_tokens=args.first_tokens, sae_hook=args.sae_hook,
                     sae_features=args.sae_features, sae_k=args.sae_k,
                     sae_train_tokens=args.sae_train_tokens, device=args.device,
                     local_explanations=args.local_explanations,
                     progress_bar=not args.quiet)
    settings = settings.with_options(host=args.host, port=args.port, database_url=args.db)
    return run_demo(cfg, settings, serve=not args.no_serve)


def cmd_train_sae(args: argparse.Namespace, settings: Settings) -> int:
    from workers.train import cmd_train_sae as run

    return run(args, settings, device=_device(args.device))


def cmd_migrate(args: argparse.Namespace, settings: Settings) -> int:
    from app.db.engine import make_engine, upgrade

    engine = make_engine(args.db or settings.db_url)
    upgrade(engine)
    print(f"database at {engine.url.render_as_string(hide_password=True)} is up to date")
    return 0


def cmd_prepare(args: argparse.Namespace, settings: Settings) -> int:
    """Fetch and cache the default model and corpora, so later runs need no network."""
    from workers.corpus import prepare_builtin
    from workers.loading import prepare_default_model

    path = prepare_default_model(settings.cache_dir)
    print(f"default model cached at {path}")
    for name in args.datasets:
        prepare_builtin(name, settings.cache_dir)
        print(f"dataset {name} ready")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="featurescope", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    h = sub.add_parser("harvest", help="run a model over a dataset and store its features")
    h.add_argument("--model", default=DEFAULT_MODEL,
                   help="built-in name, local HF folder, .gguf file or hub id")
    h.add_argument("--dataset", default=DEFAULT_DATASET,
                   help="built-in name (pydoc, austen), a .txt/.jsonl/.parquet file or hf:NAME")
    h.add_argument("--layers", default="all",
                   help="neurons of which layers: 'all', 'none', '0,5,11' or '2-4'")
    h.add_argument("--heads", default="none",
                   help="attention heads of which layers (sources {L}-attn): 'all', 'none', "
                   "'0,5,11' or '2-4'")
    h.add_argument("--sae", action="append", default=[], metavar="DIR",
                   help="an SAE folder (SAELens layout) or Gemma Scope params.npz; repeatable")
    h.add_argument("--max-tokens", type=int, default=None, help="cap on corpus tokens")
    h.add_argument("--seq-len", type=int, default=128)
    h.add_argument("--top-k", type=int, default=20)
    h.add_argument("--window", type=int, default=None,
                   help="tokens stored around each example (default: 64, at most --seq-len)")
    h.add_argument("--batch-size", default="auto",
                   help="sequences per batch; auto: 8 on a CPU, from free memory on a GPU")
    h.add_argument("--shard-sequences", type=int, default=256,
                   help="sequences per shard (the unit of checkpoint and resume)")
    h.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    h.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                   help="run the model (and keep its activations) in this dtype; "
                   "bfloat16 halves memory and time on GPUs")
    h.add_argument("--no-compile", action="store_true",
                   help="run the per-batch reductions in eager torch instead of fused (a C loop "
                   "on the CPU, torch.compile on a GPU)")
    h.add_argument("--relations", action="store_true",
                   help="also keep co-firing statistics, for each feature's Jaccard and Pearson "
                   "lists of related features (a dense [F, F] product per batch; sources of up "
                   "to 16,384 features)")
    h.add_argument("--db", default=None, help="database URL (default: FEATURESCOPE_DATABASE_URL "
                   "or a SQLite file in the data directory)")
    h.add_argument("--backend", choices=["inprocess", "ray"], default="inprocess",
                   help="run shards in this process, or on Ray actors (one GPU each)")
    h.add_argument("--ray-address", default=None,
                   help="Ray cluster to join (default: start a local one)")
    h.add_argument("--ray-workers", type=int, default=None,
                   help="actors to start (default: one per GPU, else one per CPU)")
    h.add_argument("--replace", action="store_true", help="harvest again sources that exist")
    h.add_argument("--skip-existing", action="store_true",
                   help="leave out sources that are already harvested")
    h.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    h.set_defaults(func=cmd_harvest)

    s = sub.add_parser("serve", help="serve the explorer and its JSON API")
    s.add_argument("--host", default=None)
    s.add_argument("--port", type=int, default=None)
    s.add_argument("--db", default=None)
    s.add_argument("--live", action="store_true",
                   help="load the models of the served sources to run your own text")
    s.set_defaults(func=cmd_serve)

    from dataclasses import fields

    from workers.demo import DemoConfig  # no torch at import

    demo = {f.name: f.default for f in fields(DemoConfig)}
    d = sub.add_parser("demo", help="serve at once and harvest the demo behind it (make run): "
                       "the first layers' neurons, every layer's, then an SAE trained on them")
    d.add_argument("--model", default=demo["model"])
    d.add_argument("--dataset", default=demo["dataset"])
    d.add_argument("--max-tokens", type=int, default=None, help="cap on corpus tokens")
    d.add_argument("--seq-len", type=int, default=demo["seq_len"])
    d.add_argument("--first-layers", default=demo["first_layers"],
                   help="the layers whose neurons are harvested first, alone (default: "
                   f"{demo['first_layers']})")
    d.add_argument("--first-tokens", type=int, default=demo["first_tokens"],
                   help="corpus tokens of that first harvest; then those layers again over the "
                   f"whole corpus (default: {demo['first_tokens']:,})")
    d.add_argument("--sae-hook", default=demo["sae_hook"],
                   help=f"where the demo SAE is trained (default: {demo['sae_hook']})")
    d.add_argument("--sae-features", type=int, default=demo["sae_features"])
    d.add_argument("--sae-k", type=int, default=demo["sae_k"],
                   help="active latents of the TopK SAE")
    d.add_argument("--sae-train-tokens", type=int, default=demo["sae_train_tokens"])
    d.add_argument("--device", default=demo["device"])
    d.add_argument("--local-explanations", type=int, default=demo["local_explanations"],
                   help="SAE features explained by the built-in instruct model after every "
                   f"feature is explained from its tokens (default: {demo['local_explanations']})")
    d.add_argument("--host", default=None)
    d.add_argument("--port", type=int, default=None)
    d.add_argument("--db", default=None)
    d.add_argument("--no-serve", action="store_true", help="harvest the demo without serving")
    d.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    d.set_defaults(func=cmd_demo)

    t = sub.add_parser("train-sae", help="train a sparse autoencoder on a hook point")
    t.add_argument("--model", default=DEFAULT_MODEL)
    t.add_argument("--dataset", default=DEFAULT_DATASET)
    t.add_argument("--hook", required=True, help="hook point, e.g. blocks.6.hook_resid_post")
    t.add_argument("--features", type=int, required=True, help="number of SAE latents")
    kind = t.add_mutually_exclusive_group()
    kind.add_argument("--k", type=int, default=None, help="TopK SAE with k active latents")
    kind.add_argument("--l1", type=float, default=None, help="ReLU SAE with this L1 coefficient")
    t.add_argument("--architecture", choices=["topk", "relu", "jumprelu"], default=None,
                   help="defaults to topk with --k and relu with --l1")
    t.add_argument("--max-tokens", type=int, default=None)
    t.add_argument("--seq-len", type=int, default=128)
    t.add_argument("--batch-size", type=int, default=8, help="sequences per model batch")
    t.add_argument("--lr", type=float, default=None)
    t.add_argument("--device", default="auto")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--out", required=True, help="folder to write (SAELens layout)")
    t.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    t.set_defaults(func=cmd_train_sae)

    m = sub.add_parser("migrate", help="create or upgrade the database schema")
    m.add_argument("--db", default=None)
    m.set_defaults(func=cmd_migrate)

    pr = sub.add_parser("prepare", help="cache the default model and built-in corpora")
    pr.add_argument("--datasets", nargs="*", default=[DEFAULT_DATASET])
    pr.set_defaults(func=cmd_prepare)
    embed.register(sub)
    explain.register(sub)
    keys.register(sub)
    llm_serve.register(sub)
    match.register(sub)
    transfer.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = Settings()
    except ValidationError as exc:  # FEATURESCOPE_* settings that do not fit
        print("error: " + "; ".join(e["msg"].removeprefix("Value error, ")
                                    for e in exc.errors()), file=sys.stderr)
        return 2
    try:
        return args.func(args, settings) or 0
    except SQLAlchemyError as exc:
        if args.verbose:
            raise
        from app.db.engine import database_problem

        url = getattr(args, "db", None) or settings.db_url
        print(f"error: {database_problem(url, exc)}", file=sys.stderr)
        return 2
    except (ValueError, RuntimeError, OSError) as exc:
        if args.verbose:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
