"""The `featurescope` command line. Imports torch only in the commands that run a model."""

from __future__ import annotations

import argparse
import logging
import sys
import time

from app.commands import embed, keys
from app.config import DEFAULT_DATASET, DEFAULT_MODEL, Settings

log = logging.getLogger("featurescope")


def parse_layers(text: str, n_layers: int) -> list[int]:
    """'all', '0,5,11' or '2-4' (mixed: '0,2-4') -> sorted layer indices, checked against n_layers."""
    if text == "all":
        return list(range(n_layers))
    layers: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        try:
            if "-" in part:
                lo, hi = (int(x) for x in part.split("-", 1))
                layers.update(range(lo, hi + 1))
            else:
                layers.add(int(part))
        except ValueError:
            raise SystemExit(
                f"error: --layers expects 'all', '0,5,11' or '2-4', got {text!r}") from None
    bad = [x for x in layers if not 0 <= x < n_layers]
    if bad or not layers:
        raise SystemExit(f"error: the model has layers 0..{n_layers - 1}; got {text!r}")
    return sorted(layers)


def _positive_int(text: str, flag: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise SystemExit(f"error: {flag} expects 'auto' or a positive integer, got {text!r}")
    return value


def _device(name: str) -> str:
    from workers.models import resolve_device

    return resolve_device(name)


def cmd_harvest(args: argparse.Namespace, settings: Settings) -> int:
    import torch
    from tqdm import tqdm

    from app.db.engine import make_engine, upgrade
    from workers import store
    from workers.corpus import load_dataset
    from workers.harvest import (
        DTYPES,
        Checkpoint,
        HarvestConfig,
        Harvester,
        auto_batch_size,
        run_harvest,
    )
    from workers.models import load_model
    from workers.plan import HarvestPlan

    device = _device(args.device)
    lm = load_model(args.model, device=device, dtype=DTYPES[args.dtype],
                    cache_dir=settings.cache_dir)
    layers = [] if args.layers == "none" else parse_layers(args.layers, lm.n_layers)
    cfg = HarvestConfig(top_k=args.top_k, batch_size=8, shard_sequences=args.shard_sequences,
                        window=args.window, compile=not args.no_compile, dtype=args.dtype)
    plan = HarvestPlan(model=args.model, layers=layers, saes=args.sae, cfg=cfg, device=device,
                       cache_dir=str(settings.cache_dir))
    engine = make_engine(args.db or settings.db_url)
    upgrade(engine)
    if args.skip_existing:
        plan.skip = sorted(store.ready_sources(engine, lm.slug))
    specs = plan.sources(lm)
    cfg.batch_size = (auto_batch_size(lm, specs, args.seq_len) if args.batch_size == "auto"
                      else _positive_int(args.batch_size, "--batch-size"))
    if not specs:
        if plan.skip:
            print(f"every requested source of {lm.slug} is already harvested")
            return 0
        raise SystemExit("error: nothing to harvest: --layers none and no --sae")
    dataset = load_dataset(args.dataset, lm.tokenizer, seq_len=args.seq_len,
                           max_tokens=args.max_tokens, cache_dir=settings.cache_dir)
    log.info("%s on %s: %d sequences x %d tokens, %d sources, %d features, device %s",
             lm.slug, dataset.slug, dataset.n_sequences, dataset.seq_len, len(specs),
             sum(s.n_features for s in specs), device)

    reg = store.begin(engine, lm, dataset, specs, cfg, replace=args.replace)
    bos_first = dataset.bos_policy == "bos-prepended"
    harvester = Harvester(lm, dataset.tokens, specs, cfg, bos_first=bos_first)
    ckpt = Checkpoint(settings.checkpoint_dir, Checkpoint.key_for(
        model=lm.source, dataset=dataset.slug, cfg=cfg.to_dict(),
        sources=[(s.slug, s.hook_name) for s in specs]))

    bar = tqdm(total=dataset.n_tokens, unit="tok", unit_scale=True, desc="harvest",
               disable=args.quiet, dynamic_ncols=True)
    done = 0
    last = time.monotonic()

    def progress(n: int) -> None:
        nonlocal done, last
        done += n
        bar.update(n)
        if time.monotonic() - last > 2:
            last = time.monotonic()
            store.report_progress(engine, reg, done)

    try:
        with torch.inference_mode():
            if args.backend == "ray":
                from workers.ray_backend import run_harvest_ray

                states = run_harvest_ray(plan, dataset.tokens, harvester.n_shards,
                                         bos_first=bos_first, n_workers=args.ray_workers,
                                         address=args.ray_address, checkpoint=ckpt,
                                         progress=progress)
            else:
                states = run_harvest(harvester, ckpt, progress)
        bar.close()
        t0 = time.monotonic()
        store.finish(engine, reg, lm, dataset, specs, states, cfg)
        log.info("written in %.1f s", time.monotonic() - t0)
    except KeyboardInterrupt:
        bar.close()
        print("interrupted: run the same command again to resume", file=sys.stderr)
        return 130
    except Exception as exc:
        bar.close()
        store.fail(engine, reg, f"{type(exc).__name__}: {exc}")
        raise
    ckpt.clear()
    print(f"harvested {len(specs)} sources of {lm.slug} over {dataset.n_tokens} tokens "
          f"of {dataset.name} into {engine.url.render_as_string(hide_password=True)}")
    return 0


def cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    from app.main import serve

    return serve(args, settings)


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
    from workers.models import prepare_default_model

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
    h.add_argument("--sae", action="append", default=[], metavar="DIR",
                   help="an SAE folder (SAELens layout) or Gemma Scope params.npz; repeatable")
    h.add_argument("--max-tokens", type=int, default=None, help="cap on corpus tokens")
    h.add_argument("--seq-len", type=int, default=128)
    h.add_argument("--top-k", type=int, default=20)
    h.add_argument("--window", type=int, default=64, help="tokens stored around each example")
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
    keys.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = Settings()
    try:
        return args.func(args, settings) or 0
    except (ValueError, RuntimeError, OSError) as exc:
        if args.verbose:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
