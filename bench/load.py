"""Load: the explorer's reads under many connections, over a database of 100,000 features.

    .venv/bin/python bench/load.py [--features 100000] [--seconds 60] [--connections 64]
                                   [--skip-postgres] [--rebuild]

Builds once (then reuses) a source of N features in SQLite (data/bench/load.db) and in
PostgreSQL (database fs_bench_load on FEATURESCOPE_TEST_PG_URL), written by bench/scale.py's
synthetic harvest (20 top, 20 bottom and 25 quantile examples of 64 tokens per feature). For each
it starts `featurescope serve` (one uvicorn worker, reading open, as shipped) in a subprocess
and holds N keep-alive connections for the given seconds after 2 s of warm-up, each sending its
next request as soon as the last answer is in: a random feature's page, its JSON, or its
Neuronpedia-shaped `/api/feature`, in equal parts. It prints requests per second, p50 and p99
latency per kind and overall, and every answer that was not a 200 (the target is none). The
client runs in this process on the same machine: it takes a share of the CPUs the server would
otherwise have, so the figures are a floor.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import os
import random
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
KINDS = ("page", "json", "api/feature")


def _module(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _built(url: str, n: int) -> str | None:
    """The model slug of a finished source of n features at url, if there is one."""
    import sqlalchemy as sa

    from app.db.engine import make_engine

    try:
        eng = make_engine(url)
        with eng.connect() as conn:
            row = conn.execute(sa.text(
                "SELECT m.slug FROM sources s JOIN models m ON m.id = s.model_id "
                "WHERE s.slug = '0-big' AND s.status = 'ready' AND s.n_features = :n"),
                {"n": n}).first()
        eng.dispose()
        return row[0] if row else None
    except sa.exc.SQLAlchemyError:
        return None


def build(url: str, n: int) -> str:
    """A source of n features at url (bench/scale.py's synthetic harvest); its model's slug."""
    import torch

    scale = _module("scale")
    sys.path.insert(0, str(ROOT / "tests"))
    from support import build_tiny_gpt2, gpt2_tokenizer

    from workers.corpus import load_dataset
    from workers.harvest import HarvestConfig
    from workers.models import from_hf_model

    torch.set_grad_enabled(False)
    lm = from_hf_model(build_tiny_gpt2(), gpt2_tokenizer(), slug="bench-load",
                       source="bench:load")
    cfg = HarvestConfig()
    ds = load_dataset("pydoc", lm.tokenizer, max_tokens=4096 * 128)
    gen = torch.Generator().manual_seed(0)
    state = scale.synthetic_state(n, ds.n_sequences, ds.seq_len, cfg.window, cfg.top_k,
                                  cfg.sample_size, gen)
    t0 = time.perf_counter()
    scale.write_source(url, lm, ds, state, cfg, torch.randn(n, lm.d_model, generator=gen))
    print(f"built {n:,} features at {url.split('@')[-1]} in {time.perf_counter() - t0:.0f} s",
          flush=True)
    return lm.slug


async def _client(port: int, pick, deadline: float, out: list, codes: Counter) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        while time.perf_counter() < deadline:
            kind, path = pick()
            t0 = time.perf_counter()
            writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
            head = await reader.readuntil(b"\r\n\r\n")
            length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length:"))
            await reader.readexactly(length)
            out.append((kind, time.perf_counter() - t0))
            codes[int(head[9:12])] += 1
    finally:
        writer.close()


def run_load(port: int, pick, seconds: float, connections: int) -> tuple[list, Counter, float]:
    async def phase(duration: float):
        out, codes = [], Counter()
        t0 = time.perf_counter()
        await asyncio.gather(*(_client(port, pick, t0 + duration, out, codes)
                               for _ in range(connections)))
        return out, codes, time.perf_counter() - t0

    asyncio.run(phase(2.0))  # warm-up: connections, caches, the vocabulary
    return asyncio.run(phase(seconds))


def _quantiles(lat: list[float]) -> tuple[float, float]:
    q = statistics.quantiles(lat, n=100, method="inclusive")
    return q[49] * 1e3, q[98] * 1e3


def serve_and_load(url: str, model: str, n: int, args) -> dict:
    serve_bench = _module("serve")
    rng = random.Random(0)

    def pick():
        kind, i = rng.choice(KINDS), rng.randrange(n)
        page = f"/{model}/0-big/{i}"
        return kind, {"page": page, "json": page + ".json",
                      "api/feature": f"/api/feature/{model}/0-big/{i}"}[kind]

    with serve_bench.serving(url) as (port, pid, log):
        cpu0 = serve_bench.cpu_seconds(pid)
        out, codes, wall = run_load(port, pick, args.seconds, args.connections)
        cpu1 = serve_bench.cpu_seconds(pid)
    log.seek(0)
    errors = [line for line in log if " 500 " in line or "Traceback" in line]
    per_kind = {k: [t for kind, t in out if kind == k] for k in KINDS}
    return {"n": len(out), "rps": len(out) / wall, "all": _quantiles([t for _, t in out]),
            "kinds": {k: (len(v) / wall, *_quantiles(v)) for k, v in per_kind.items() if v},
            "codes": codes, "log_errors": len(errors),
            "cpu_ms": (cpu1 - cpu0) / len(out) * 1e3 if cpu0 is not None else None}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--features", type=int, default=100_000)
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--connections", type=int, default=64)
    p.add_argument("--skip-postgres", action="store_true")
    p.add_argument("--rebuild", action="store_true")
    args = p.parse_args()
    scale = _module("scale")
    targets = [("SQLite", f"sqlite:///{ROOT / 'data' / 'bench' / 'load.db'}")]
    if not args.skip_postgres:
        targets.append(("PostgreSQL", scale.PG_URL.rsplit("/", 1)[0] + "/fs_bench_load"))
    rows = []
    for name, url in targets:
        model = None if args.rebuild else _built(url, args.features)
        if model is None:
            if name == "SQLite":
                Path(url.split("///", 1)[1]).unlink(missing_ok=True)
            elif scale.fresh_pg("fs_bench_load") is None:
                continue
            model = build(url, args.features)
        rows.append((name, serve_and_load(url, model, args.features, args)))

    print(f"\nfeaturescope serve: {args.features:,} features, uvicorn 1 worker, "
          f"{args.connections} connections, {args.seconds:g} s, {os.cpu_count()} CPUs "
          "(client on the same machine), loopback; page, JSON and /api/feature in equal parts\n")
    print(f"{'database':<12}{'target':<14}{'req/s':>8}{'p50 ms':>9}{'p99 ms':>9}")
    failed = False
    for name, r in rows:
        for kind, (rps, p50, p99) in r["kinds"].items():
            print(f"{name:<12}{kind:<14}{rps:>8.0f}{p50:>9.1f}{p99:>9.1f}")
        cpu = f", server CPU {r['cpu_ms']:.2f} ms/request" if r["cpu_ms"] is not None else ""
        print(f"{name:<12}{'all':<14}{r['rps']:>8.0f}{r['all'][0]:>9.1f}{r['all'][1]:>9.1f}"
              f"   {r['n']:,} requests{cpu}")
        bad = {c: k for c, k in r["codes"].items() if c != 200}
        print(f"{'':<12}answers: {dict(r['codes'])}; not 200: {sum(bad.values())}; "
              f"errors in the server's log: {r['log_errors']}")
        failed |= bool(bad) or r["log_errors"] > 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
