"""Scale figures, from one run:

    .venv/bin/python bench/scale.py [--features 100000] [--seconds 4] [--ray-tokens 8192]

1. Writing a source of N features (20 top, 20 bottom, 25 quantile examples of 64 tokens each)
   into SQLite and into PostgreSQL: the seconds of workers.finalize (direct logit attribution,
   top tokens, example blocks; before the transaction) and of workers.store.write (the
   transaction), features written per second, bytes on disk per feature (tables and indexes).
2. Feature-page and feature-JSON p50/p99 latency under 32 connections, served from each.
3. Harvest tokens per second of the default model with the Ray backend on 1 and 2 CPU workers.

Needs the local PostgreSQL server (FEATURESCOPE_TEST_PG_URL, default postgres@127.0.0.1/test);
without it, the PostgreSQL rows say why they are missing.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

from app.config import DEFAULT_MODEL, default_cache_dir
from app.db.engine import make_engine, upgrade
from app.histogram import HIST_BINS
from workers import store
from workers.corpus import load_dataset
from workers.finalize import finalize, logit_tables
from workers.harvest import HarvestConfig, SourceSpec
from workers.state import Ranked, SourceState, Stats

ROOT = Path(__file__).resolve().parents[1]
PG_URL = os.environ.get("FEATURESCOPE_TEST_PG_URL",
                        "postgresql+psycopg://postgres@127.0.0.1:5432/test")


def _serve_bench():
    spec = importlib.util.spec_from_file_location("serve_bench", ROOT / "bench" / "serve.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def synthetic_state(n_features: int, n_seq: int, seq_len: int, window: int, top_k: int,
                    sample: int, gen: torch.Generator) -> SourceState:
    """A finished state with every ranking full, as a long harvest of a dense source leaves it."""
    def ranking(size: int, sign: float) -> Ranked:
        value = torch.rand(size, n_features, generator=gen).sort(0, descending=True).values * 9
        seq = torch.stack([torch.randperm(n_seq, generator=gen)[:size] for _ in range(8)], 1)
        seq = seq.repeat(1, n_features // 8 + 1)[:, :n_features]
        pos = torch.randint(1, seq_len, (size, n_features), generator=gen, dtype=torch.int32)
        windows = (torch.randn(size, n_features, window, generator=gen) * 2).half()
        return Ranked(score=value, seq=seq, pos=pos, value=sign * value,
                      slot=torch.full((size, n_features), -1), windows=windows)

    hist = torch.randint(0, 1000, (n_features, HIST_BINS), generator=gen)
    stats = Stats(n_tokens=n_seq * (seq_len - 1), n_active=hist[:, 1:].sum(1),
                  sum=torch.rand(n_features, dtype=torch.float64, generator=gen),
                  sumsq=torch.rand(n_features, dtype=torch.float64, generator=gen) + 1,
                  max=torch.rand(n_features, generator=gen) * 9,
                  min=-torch.rand(n_features, generator=gen), hist=hist)
    return SourceState(top=ranking(top_k, 1.0), bottom=ranking(top_k, -1.0),
                       sample=ranking(sample, 1.0), stats=stats, n_sequences=n_seq)


def fresh_pg(name: str) -> str | None:
    import sqlalchemy as sa

    try:
        admin = sa.create_engine(PG_URL, isolation_level="AUTOCOMMIT",
                                 connect_args={"connect_timeout": 3})
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
        admin.dispose()
    except Exception as exc:  # noqa: BLE001 - report and go on without PostgreSQL
        print(f"PostgreSQL unavailable ({type(exc).__name__}); its rows are skipped")
        return None
    return PG_URL.rsplit("/", 1)[0] + f"/{name}"


def disk_bytes(url: str) -> dict[str, int]:
    import sqlalchemy as sa

    eng = make_engine(url, isolation_level="AUTOCOMMIT")
    with eng.connect() as conn:
        if url.startswith("sqlite"):
            conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
            out = {}
            for table in ("features", "example_blocks"):
                names = [r[0] for r in conn.execute(sa.text(
                    "SELECT name FROM sqlite_master WHERE tbl_name = :t"), {"t": table})]
                out[table] = sum(conn.execute(sa.text(
                    "SELECT SUM(pgsize) FROM dbstat WHERE name = :n"), {"n": n}).scalar() or 0
                    for n in names)
        else:
            conn.exec_driver_sql("VACUUM ANALYZE")  # settle the visibility map, counts
            out = {t: conn.execute(sa.text("SELECT pg_total_relation_size(:t)"),
                                   {"t": t}).scalar() for t in ("features", "example_blocks")}
    eng.dispose()
    return out


def write_source(url: str, lm, ds, state: SourceState, cfg: HarvestConfig, directions
                 ) -> tuple[float, float]:
    """(seconds to finalize, seconds to write) one source of the state's features."""
    n = state.stats.max.shape[0]
    spec = SourceSpec(slug="0-big", kind="neurons", hook_name="blocks.0.mlp.hook_post", layer=0,
                      n_features=n, directions=lambda: directions)
    engine = make_engine(url)
    upgrade(engine)
    reg = store.begin(engine, lm, ds, [spec], cfg)
    t0 = time.perf_counter()
    results = finalize(lm, ds, [spec], {"0-big": state}, cfg)
    t1 = time.perf_counter()
    store.write(engine, reg, results)
    t2 = time.perf_counter()
    engine.dispose()
    return t1 - t0, t2 - t1


def serve_latency(url: str, model: str, n: int, seconds: float, serve_bench) -> dict:
    with serve_bench.serving(url) as (port, pid, log):
        rng = random.Random(0)
        page = lambda: f"/{model}/0-big/{rng.randrange(n)}"  # noqa: E731
        try:
            html = serve_bench.load(port, page, seconds, 32, pid)
            js = serve_bench.load(port, lambda: page() + ".json", seconds, 32, pid)
        except SystemExit:
            log.seek(0)
            print("the server's log ends with:\n" + "".join(log.readlines()[-40:]),
                  file=sys.stderr)
            raise
    return {"html": html, "json": js}


def ray_tokens_per_second(n_tokens: int) -> list[tuple[int, float]]:
    import ray

    from workers.harvest import Shards, harvest_shards
    from workers.loading import load_model
    from workers.ray_backend import RayBackend
    from workers.runner import HarvestPlan

    cfg = HarvestConfig(batch_size=8, shard_sequences=16)
    plan = HarvestPlan(model=DEFAULT_MODEL, layers=list(range(6)), cfg=cfg,
                       cache_dir=str(default_cache_dir()))
    lm = load_model(plan.model, cache_dir=Path(plan.cache_dir))
    ds = load_dataset("pydoc", lm.tokenizer, max_tokens=n_tokens)
    out = []
    for workers in (1, 2):
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        warm = ds.tokens[:16]  # warm-up: one shard
        harvest_shards(RayBackend(plan, warm, bos_first=True, n_workers=workers),
                       Shards.of(warm, cfg))
        t0 = time.perf_counter()
        harvest_shards(RayBackend(plan, ds.tokens, bos_first=True, n_workers=workers),
                       Shards.of(ds.tokens, cfg))
        out.append((workers, ds.n_tokens / (time.perf_counter() - t0)))
        ray.shutdown()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--features", type=int, default=100_000)
    p.add_argument("--seconds", type=float, default=4.0)
    p.add_argument("--ray-tokens", type=int, default=8192)
    p.add_argument("--skip-ray", action="store_true")
    args = p.parse_args()
    torch.set_grad_enabled(False)
    serve_bench = _serve_bench()

    sys.path.insert(0, str(ROOT / "tests"))
    from support import build_tiny_gpt2, gpt2_tokenizer

    from workers.models import from_hf_model

    lm = from_hf_model(build_tiny_gpt2(), gpt2_tokenizer(), slug="bench-scale",
                       source="bench:scale")
    cfg = HarvestConfig()
    ds = load_dataset("pydoc", lm.tokenizer, max_tokens=4096 * 128)
    gen = torch.Generator().manual_seed(0)
    state = synthetic_state(args.features, ds.n_sequences, ds.seq_len, cfg.window, cfg.top_k,
                            cfg.sample_size, gen)
    directions = torch.randn(args.features, lm.d_model, generator=gen)
    t0 = time.perf_counter()
    logit_tables(lm, directions)
    t_dla = time.perf_counter() - t0

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        targets = [("SQLite", f"sqlite:///{Path(tmp) / 'scale.db'}"),
                   ("PostgreSQL", fresh_pg("fs_bench_scale"))]
        for name, url in targets:
            if url is None:
                continue
            t = write_source(url, lm, ds, state, cfg, directions)
            size = disk_bytes(url)
            lat = serve_latency(url, lm.slug, args.features, args.seconds, serve_bench)
            results.append((name, t, size, lat))

    n = args.features
    print(f"\nwriting one source of {n:,} features ({cfg.top_k} top, {cfg.top_k} bottom, "
          f"{cfg.sample_size} quantile examples of {cfg.window} tokens each)")
    print(f"  direct logit attribution, part of finalizing: {t_dla:.1f} s\n")
    print(f"{'database':<12}{'final. s':>9}{'write s':>9}{'feat/s':>9}{'B/feature':>11}"
          f"{'page p50':>10}{'page p99':>10}{'json p50':>10}{'json p99':>10}{'json req/s':>12}")
    for name, t, size, lat in results:
        h, j = lat["html"], lat["json"]
        print(f"{name:<12}{t[0]:>9.1f}{t[1]:>9.1f}{n / t[1]:>9.0f}"
              f"{(size['features'] + size['example_blocks']) / n:>11.0f}{h['p50']:>9.1f}m"
              f"{h['p99']:>9.1f}m{j['p50']:>9.1f}m{j['p99']:>9.1f}m{j['rps']:>12.0f}")
    if not args.skip_ray:
        runs = ray_tokens_per_second(args.ray_tokens)
        print(f"\nRay backend, default model, neurons of layers 0-5, {args.ray_tokens} tokens, "
              f"{os.cpu_count()} CPUs:")
        for workers, tps in runs:
            print(f"  {workers} worker(s): {tps:8.0f} tok/s")
        print(f"  scaling 2 vs 1 workers: {runs[1][1] / runs[0][1]:.2f}x")


if __name__ == "__main__":
    main()
