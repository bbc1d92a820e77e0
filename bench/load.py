"""Load: the explorer's reads under many connections, over a database of 100,000 features, and
the endpoints that run the model under many clients.

    .venv/bin/python bench/load.py [--features 100000] [--seconds 60] [--connections 64]
                                   [--skip-postgres] [--rebuild] [--live-clients 16]
                                   [--live-readers 8] [--live-seconds 30] [--only-live]

First (unless --live-clients 0), the live mix: the tests' tiny Llama harvested with a TopK SAE
into a fresh SQLite file and PostgreSQL database (fs_bench_live), served by `featurescope serve
--live` with keys needed from loopback too; --live-clients connections post activations,
searches, Neuronpedia's activation/new and search-topk-by-token, steering and ablation, each
with one of two live keys (rate limits as shipped), beside --live-readers connections reading
feature pages. It prints each kind's answers by status and p50/p99; the target is only 200, 429
or 503 for the live requests, only 200 for the pages, and no 500 in the server's log.

Then the reads: builds once (then reuses) a source of N features in SQLite (data/bench/load.db) and in
PostgreSQL (database fs_bench_load on FEATURESCOPE_TEST_PG_URL), written by bench/scale.py's
synthetic harvest (20 top, 20 bottom and 25 quantile examples of 64 tokens per feature). For each
it starts `featurescope serve` (one uvicorn worker, reading open, as shipped) in a subprocess
and holds N keep-alive connections for the given seconds after 2 s of warm-up, each sending its
next request as soon as the last answer is in: a random feature's page, its JSON, or its
Neuronpedia-shaped `/api/feature`, in equal parts. It prints requests per second, p50 and p99
latency per kind and overall, and every answer that was not a 200 (the target is none). The
client runs in this process on the same machine: it takes a share of the CPUs the server would
otherwise have, so the figures are a floor. The exit status is 1 when a target is missed.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import random
import statistics
import sys
import tempfile
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


def get(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()


def post(path: str, body: dict, key: str) -> bytes:
    data = json.dumps(body).encode()
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\nx-api-key: {key}\r\n\r\n").encode() + data


async def _client(port: int, pick, deadline: float, out: list, codes: Counter) -> None:
    """One keep-alive connection sending pick()'s (kind, request) until the deadline; records
    (kind, status, seconds) in `out` and counts each kind's statuses in `codes`."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        while time.perf_counter() < deadline:
            kind, request = pick()
            t0 = time.perf_counter()
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length:"))
            await reader.readexactly(length)
            status = int(head[9:12])
            out.append((kind, status, time.perf_counter() - t0))
            codes[kind, status] += 1
    finally:
        writer.close()


def run_load(port: int, picks: list, seconds: float, *, warm_up: float = 2.0
             ) -> tuple[list, Counter, float]:
    """One connection per pick function, for `seconds` after `warm_up` seconds."""
    async def phase(duration: float):
        out, codes = [], Counter()
        t0 = time.perf_counter()
        await asyncio.gather(*(_client(port, pick, t0 + duration, out, codes)
                               for pick in picks))
        return out, codes, time.perf_counter() - t0

    if warm_up:
        asyncio.run(phase(warm_up))  # connections, caches, the vocabulary
    return asyncio.run(phase(seconds))


def _quantiles(lat: list[float]) -> tuple[float, float]:
    q = statistics.quantiles(lat, n=100, method="inclusive")
    return q[49] * 1e3, q[98] * 1e3


def reader_pick(rng: random.Random, model: str, source: str, n: int) -> tuple[str, bytes]:
    """A random feature's page, its JSON or its /api/feature, in equal parts."""
    kind, i = rng.choice(KINDS), rng.randrange(n)
    page = f"/{model}/{source}/{i}"
    return kind, get({"page": page, "json": page + ".json",
                      "api/feature": f"/api/feature/{model}/{source}/{i}"}[kind])


def log_errors(log) -> int:
    """Lines of a server's log that tell of a 500 or a traceback."""
    log.seek(0)
    return sum(1 for line in log if " 500 " in line or "Traceback" in line)


def serve_and_load(url: str, model: str, n: int, args) -> dict:
    serve_bench = _module("serve")
    rng = random.Random(0)

    def pick():
        return reader_pick(rng, model, "0-big", n)

    with serve_bench.serving(url) as (port, pid, log):
        cpu0 = serve_bench.cpu_seconds(pid)
        out, codes, wall = run_load(port, [pick] * args.connections, args.seconds)
        cpu1 = serve_bench.cpu_seconds(pid)
    per_kind = {k: [t for kind, _, t in out if kind == k] for k in KINDS}
    return {"n": len(out), "rps": len(out) / wall, "all": _quantiles([t for _, _, t in out]),
            "kinds": {k: (len(v) / wall, *_quantiles(v)) for k, v in per_kind.items() if v},
            "codes": Counter(c for _, c, _ in out), "log_errors": log_errors(log),
            "cpu_ms": (cpu1 - cpu0) / len(out) * 1e3 if cpu0 is not None else None}


LIVE_SAE = "1-res-sae-48"
LIVE_OK = {200, 429, 503}


def live_requests(model: str) -> list[tuple[str, str, dict]]:
    """(kind, path, body) of what the live clients post: each runs the tiny Llama once."""
    text = "def add(a, b):\n    return a + b"
    return [
        ("activations", "/api/v1/activations",
         {"model": model, "source": "0-mlp", "index": 3, "text": text}),
        ("search", "/api/v1/search", {"model": model, "text": text}),
        ("activation/new", "/api/activation/new",
         {"feature": {"modelId": model, "source": LIVE_SAE, "index": "3"}, "customText": text}),
        ("topk-by-token", "/api/search-topk-by-token",
         {"modelId": model, "source": LIVE_SAE, "text": text}),
        ("steer", "/api/v1/steer", {"model": model, "prompt": text, "n_tokens": 8,
                                    "features": [{"source": LIVE_SAE, "index": 3,
                                                  "strength": 8}]}),
        ("ablate", "/api/v1/ablate",
         {"model": model, "text": text, "features": [{"source": "1-mlp", "index": 4}]}),
    ]


def build_live(url: str, tmp: Path) -> tuple[str, list[str]]:
    """The tests' tiny Llama saved in `tmp`, harvested at `url` with a TopK SAE read from its
    files (tests/support.py LiveWorld), and two keys with the live scope: (model slug, keys)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from sqlalchemy.orm import Session
    from support import LiveWorld, build_tiny_llama, gpt2_tokenizer

    from app.keys import create_key

    model_dir = tmp / "tiny-llama"
    build_tiny_llama().save_pretrained(model_dir)
    gpt2_tokenizer().save_pretrained(model_dir)
    world = LiveWorld(model_dir, tmp, url)
    with Session(world.engine) as session:
        keys = [create_key(session, name=f"bench {i}", scope="live")[1] for i in range(2)]
    world.engine.dispose()
    return world.lm.slug, keys


def _live_pick(rng: random.Random, requests: list, key: str):
    def pick() -> tuple[str, bytes]:
        kind, path, body = rng.choice(requests)
        return kind, post(path, body, key)
    return pick


def live_load(url: str, args) -> dict:
    """`serve --live` over the tiny Llama at `url`, as shipped but with keys needed from
    loopback too (so the rate limits apply): `--live-clients` connections post the live mix,
    each with one of two keys, beside `--live-readers` connections reading feature pages."""
    serve_bench = _module("serve")
    if url.startswith("sqlite:///"):  # built afresh
        path = Path(url.split("///", 1)[1])
        path.parent.mkdir(parents=True, exist_ok=True)
        path.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        model, keys = build_live(url, Path(tmp))
        requests = live_requests(model)
        picks = [_live_pick(random.Random(i), requests, keys[i % 2])
                 for i in range(args.live_clients)]
        for i in range(args.live_readers):
            rng = random.Random(1000 + i)
            picks.append(lambda rng=rng: reader_pick(rng, model, "1-mlp", 96))
        env = {"FEATURESCOPE_LOOPBACK_OPEN": "false", "OMP_NUM_THREADS": "1"}
        with serve_bench.serving(url, "--live", env=env) as (port, _, log):
            out, codes, wall = run_load(port, picks, args.live_seconds, warm_up=0)
    return {"out": out, "codes": codes, "wall": wall, "log_errors": log_errors(log)}


def print_live(rows: list[tuple[str, dict]], args) -> bool:
    """The live figures; True when an answer was not one of LIVE_OK (readers: not a 200)."""
    print(f"\nfeaturescope serve --live (tiny Llama, CPU): {args.live_clients} clients posting "
          f"{', '.join(k for k, _, _ in live_requests(''))} with 2 live keys (rate limits as "
          f"shipped), beside {args.live_readers} readers of feature pages, "
          f"{args.live_seconds:g} s\n")
    print(f"{'database':<12}{'kind':<16}{'answers':<34}{'p50 ms':>9}{'p99 ms':>9}")
    failed = False
    for name, r in rows:
        for kind in dict.fromkeys(k for k, _, _ in r["out"]):
            lat = [t for k, _, t in r["out"] if k == kind]
            codes = {c: n for (k, c), n in sorted(r["codes"].items()) if k == kind}
            ok = {200} if kind in KINDS else LIVE_OK
            failed |= not set(codes) <= ok
            p50, p99 = _quantiles(lat) if len(lat) > 1 else (lat[0] * 1e3,) * 2
            print(f"{name:<12}{kind:<16}{str(codes):<34}{p50:>9.1f}{p99:>9.1f}")
        print(f"{'':<12}{len(r['out']):,} answers in {r['wall']:.0f} s; errors in the server's "
              f"log: {r['log_errors']}")
        failed |= r["log_errors"] > 0
    return failed


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--features", type=int, default=100_000)
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--connections", type=int, default=64)
    p.add_argument("--skip-postgres", action="store_true")
    p.add_argument("--rebuild", action="store_true")
    p.add_argument("--live-clients", type=int, default=16,
                   help="clients posting to the endpoints that run the model (0: none)")
    p.add_argument("--live-readers", type=int, default=8)
    p.add_argument("--live-seconds", type=float, default=30.0)
    p.add_argument("--only-live", action="store_true", help="skip the 100,000-feature reads")
    args = p.parse_args()
    scale = _module("scale")
    failed = False
    if args.live_clients > 0:
        live_rows = [("SQLite", live_load(f"sqlite:///{ROOT / 'data' / 'bench' / 'live.db'}",
                                          args))]
        pg = None if args.skip_postgres else scale.fresh_pg("fs_bench_live")
        if pg is not None:
            live_rows.append(("PostgreSQL", live_load(pg, args)))
        failed |= print_live(live_rows, args)
    if args.only_live:
        return 1 if failed else 0
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
