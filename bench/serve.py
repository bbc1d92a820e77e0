"""Serving benchmark: the feature page and its JSON under load, against static files.

    .venv/bin/python bench/serve.py [--db data/bench/serve.db] [--seconds 5] [--connections 32]

Builds (once, then reuses) a SQLite database of 102,400 features in the real tables: an SAE
source of 65,536 features and a neurons source of 36,864, each feature with 35 to 45 examples
of 64 tokens over 4,096 sequences of 128, a 50,257-token vocabulary, histograms, logit tokens.
Then it starts `uvicorn` on 127.0.0.1 in a subprocess (one worker, like `featurescope serve`),
and for each of four targets runs a closed-loop load of N keep-alive connections for a few
seconds from this process: random feature pages, random feature JSON, and a static file of the
mean size of each, served by the same server. It prints requests per second, p50 and p99
latency, the server's CPU time per request (from /proc, steadier than wall-clock figures on a
shared machine), and each dynamic figure as a ratio to its static twin. It stops by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODEL = "bench-model"
SOURCES = [("6-res-sae-64k", "sae", 65_536, False), ("6-mlp", "neurons", 36_864, True)]
N_SEQ, SEQ_LEN, WINDOW, VOCAB = 4096, 128, 64, 50_257
TOP_K, N_RANGES, PER_RANGE, N_BOTTOM = 20, 3, 5, 10
MARK = "bench:serve:v3"


def build_db(path: Path) -> None:
    """The synthetic database, in the real tables (alembic schema), by bulk inserts."""
    import numpy as np
    from sqlalchemy import insert, select

    from app.db.engine import make_engine, upgrade
    from app.db.tables import Dataset, Model, Source, Vocabulary
    from app.histogram import HIST_BINS

    path.parent.mkdir(parents=True, exist_ok=True)
    for p in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
        p.unlink(missing_ok=True)
    engine = make_engine(f"sqlite:///{path}")
    upgrade(engine)
    rng = np.random.default_rng(0)
    t0 = time.monotonic()
    with engine.begin() as conn:
        mid = conn.execute(insert(Model).values(
            slug=MODEL, hub_id=MARK, arch="llama", n_layers=12, d_model=768, d_mlp=36_864,
            vocab_size=VOCAB, tokenizer_hash="bench")).inserted_primary_key[0]
        words = [f"{'Ġ' if i % 3 else ''}tok{i}" if i % 7 else f" word{i}\n" for i in range(VOCAB)]
        conn.execute(insert(Vocabulary).values(model_id=mid, tokens=words))
        did = conn.execute(insert(Dataset).values(
            slug="bench-corpus", name="bench corpus", source="synthetic", slice="all",
            n_sequences=N_SEQ, seq_len=SEQ_LEN, bos_policy="bos-prepended",
            tokenizer_hash="bench")).inserted_primary_key[0]
        toks = rng.integers(0, VOCAB, size=(N_SEQ, SEQ_LEN), dtype="<i4")
        conn.exec_driver_sql("INSERT INTO sequences (dataset_id, idx, tokens) VALUES (?, ?, ?)",
                             [(did, i, toks[i].tobytes()) for i in range(N_SEQ)])
        for slug, kind, n_feat, bottom in SOURCES:
            sid = conn.execute(insert(Source).values(
                model_id=mid, dataset_id=did, slug=slug, kind=kind, hook_name="blocks.6.hook_x",
                layer=6, n_features=n_feat, harvest_config={"top_k": TOP_K, "window": WINDOW},
                status="ready", progress_tokens=N_SEQ * SEQ_LEN, total_tokens=N_SEQ * SEQ_LEN,
                version_hash=f"bench-{slug}")).inserted_primary_key[0]
            for f0 in range(0, n_feat, 2048):
                _insert_chunk(conn, rng, sid, range(f0, min(f0 + 2048, n_feat)), bottom,
                              HIST_BINS)
    n = sum(s[2] for s in SOURCES)
    with engine.connect() as conn:
        assert conn.scalar(select(Model.hub_id)) == MARK
    engine.dispose()
    print(f"built {path} ({n:,} features) in {time.monotonic() - t0:.0f} s", flush=True)


def _insert_chunk(conn, rng, sid: int, feats: range, bottom: bool, hist_bins: int) -> None:
    import json

    import numpy as np

    from app.db.tables import example_record

    groups = [(0, TOP_K)] + ([(1, N_BOTTOM)] if bottom else []) + [
        (2 + g, PER_RANGE) for g in range(N_RANGES)]
    frows, erows = [], []
    for f in feats:
        mx = float(rng.gamma(4.0, 1.5))
        hist = np.bincount(rng.integers(0, hist_bins, 400), minlength=hist_bins).tolist()
        logits = [[int(t), round(float(v), 5)] for t, v in zip(
            rng.integers(0, VOCAB, 20), np.sort(rng.normal(0, 0.1, 20))[::-1], strict=True)]
        frows.append((sid, f, mx, -0.2 * mx, 0.05 * mx, 0.2 * mx, float(rng.uniform(1e-4, .1)),
                      1000, N_SEQ * SEQ_LEN, json.dumps(hist), json.dumps(logits[:10]),
                      json.dumps(logits[10:][::-1]), json.dumps([[int(t), 3] for t in
                                                                 rng.integers(0, VOCAB, 5)])))
        for code, n in groups:
            peaks = np.sort(rng.uniform(0.05, 1.0, n))[::-1] * mx * (-0.3 if code == 1 else 1)
            pos = rng.integers(1, SEQ_LEN, n)
            start = np.clip(pos - (WINDOW - WINDOW // 4 - 1), 0, SEQ_LEN - WINDOW)
            if bottom:  # neurons: every token has a small activation, of either sign
                acts = rng.normal(0, 0.08, (n, WINDOW)) * abs(peaks[:, None])
            else:  # SAE features: sparse and positive
                acts = ((rng.random((n, WINDOW)) < 0.15) * rng.uniform(0, 0.5, (n, WINDOW))
                        * peaks[:, None])
            acts[np.arange(n), pos - start] = peaks
            rec = np.empty(n, dtype=example_record(WINDOW))
            rec["acts"] = acts
            rec["seq_idx"], rec["start"], rec["peak_pos"], rec["peak_value"] = (
                rng.integers(0, N_SEQ, n), start, pos, peaks)
            erows.append((sid, f, code, n, WINDOW, rec.tobytes()))
    conn.exec_driver_sql(
        "INSERT INTO features (source_id, idx, max_act, min_act, mean_act, std_act, frac_active,"
        " n_active, n_tokens, histogram, top_logits, bottom_logits, top_tokens)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", frows)
    conn.exec_driver_sql(
        'INSERT INTO example_blocks (source_id, feature_idx, "group", n, "window", data)'
        " VALUES (?, ?, ?, ?, ?, ?)", erows)


def run_server(db: str, port: int, static_dir: str) -> None:
    """The server process: the app over `db`, plus the static files to compare with at /_bench."""
    import uvicorn
    from fastapi.staticfiles import StaticFiles

    from app.config import Settings
    from app.db.engine import make_engine
    from app.main import create_app

    app = create_app(Settings(database_url=f"sqlite:///{db}"), engine=make_engine(f"sqlite:///{db}"))
    app.mount("/_bench", StaticFiles(directory=static_dir), name="bench")
    app.router.routes.insert(0, app.router.routes.pop())  # before the /{model}/{source} route
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


async def _client(port: int, pick, deadline: float, lat: list[float], errors: list[int]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        while time.perf_counter() < deadline:
            t0 = time.perf_counter()
            writer.write(f"GET {pick()} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
            head = await reader.readuntil(b"\r\n\r\n")
            length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length:"))
            await reader.readexactly(length)
            lat.append(time.perf_counter() - t0)
            if head[9:12] != b"200":
                errors.append(int(head[9:12]))
    finally:
        writer.close()


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process so far (Linux /proc), or None elsewhere."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def load(port: int, pick, seconds: float, connections: int, pid: int) -> dict:
    """Closed-loop load: `connections` keep-alive connections, each sending its next request as
    soon as the answer to the last one is in, for `seconds` after one second of warm-up."""
    async def phase(duration: float) -> tuple[list[float], list[int], float]:
        lat, errors = [], []
        t0 = time.perf_counter()
        await asyncio.gather(*(_client(port, pick, t0 + duration, lat, errors)
                               for _ in range(connections)))
        return lat, errors, time.perf_counter() - t0

    asyncio.run(phase(1.0))
    cpu0 = cpu_seconds(pid)
    lat, errors, wall = asyncio.run(phase(seconds))
    cpu1 = cpu_seconds(pid)
    if errors:
        raise SystemExit(f"{len(errors)} non-200 answers, e.g. {errors[0]}")
    q = statistics.quantiles(lat, n=100, method="inclusive")
    cpu = (cpu1 - cpu0) / len(lat) * 1e3 if cpu0 is not None and cpu1 is not None else None
    return {"rps": len(lat) / wall, "p50": q[49] * 1e3, "p99": q[98] * 1e3, "n": len(lat),
            "cpu": cpu}


@contextmanager
def serving(url: str, *extra: str, env: dict[str, str] | None = None):
    """`featurescope serve --db URL [extra...]` in a subprocess on a free port (with `env` added
    to its environment), once it answers: yields (port, pid, log), the log being its stderr (a
    file); stopped at the end of the block."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tempfile.TemporaryFile(mode="w+")
    server = subprocess.Popen([sys.executable, "-m", "app.cli", "serve", "--db", url, "--port",
                               str(port), *extra], cwd=ROOT, stdout=subprocess.DEVNULL,
                              stderr=log, env={**os.environ, "PYTHONPATH": str(ROOT),
                                               **(env or {})})
    try:
        try:
            wait_until_up(port, server)
        except SystemExit:
            log.seek(0)
            print("the server's log ends with:\n" + "".join(log.readlines()[-40:]),
                  file=sys.stderr)
            raise
        yield port, server.pid, log
    finally:
        server.terminate()
        server.wait(timeout=30)


def _get(port: int, path: str) -> bytes:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
        return r.read()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--db", default=str(ROOT / "data" / "bench" / "serve.db"))
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--connections", type=int, default=32)
    p.add_argument("--rebuild", action="store_true")
    p.add_argument("--serve", nargs=2, metavar=("PORT", "STATIC_DIR"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve:
        run_server(args.db, int(args.serve[0]), args.serve[1])
        return 0
    db = Path(args.db)
    if args.rebuild or not db.exists() or not _is_bench_db(db):
        build_db(db)

    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as static_dir:
        server = subprocess.Popen([sys.executable, __file__, "--db", str(db), "--serve",
                                   str(port), static_dir], cwd=ROOT)
        try:
            return _measure(port, static_dir, args, server.pid)
        finally:
            server.terminate()
            server.wait(timeout=15)


def _is_bench_db(db: Path) -> bool:
    import sqlite3

    try:
        with sqlite3.connect(db) as conn:
            return conn.execute("SELECT hub_id FROM models").fetchone() == (MARK,)
    except sqlite3.Error:
        return False


def wait_until_up(port: int, server: subprocess.Popen | None = None) -> None:
    """Until the server on `port` answers (a minute at most, or until its process ends)."""
    deadline = time.monotonic() + 60
    while True:
        try:
            _get(port, "/.json")
            return
        except OSError:
            if time.monotonic() > deadline or (server is not None and server.poll() is not None):
                raise SystemExit("the server did not start") from None
            time.sleep(0.2)


def _measure(port: int, static_dir: str, args, pid: int) -> int:
    wait_until_up(port)
    rng = random.Random(0)
    features = [(s, i) for s, _, n, _ in SOURCES for i in range(n)]

    def page() -> str:
        s, i = rng.choice(features)
        return f"/{MODEL}/{s}/{i}"

    sample = [page() for _ in range(100)]
    sizes = {kind: statistics.mean(len(_get(port, u + suffix)) for u in sample)
             for kind, suffix in (("html", ""), ("json", ".json"))}
    for kind, suffix in (("html", ""), ("json", ".json")):
        body = _get(port, sample[0] + suffix)
        n = round(sizes[kind])
        Path(static_dir, f"same-size.{kind}").write_bytes((body * (n // len(body) + 1))[:n])

    rows = []
    for label, kind, pick in (
            ("feature page (HTML)", "html", page), ("static file, same size", "html", None),
            ("feature JSON", "json", lambda: page() + ".json"),
            ("static file, same size", "json", None)):
        pick = pick or (lambda kind=kind: f"/_bench/same-size.{kind}")
        rows.append((label, kind, load(port, pick, args.seconds, args.connections, pid)))

    n = len(features)
    print(f"\nfeaturescope serve: {n:,} features (SQLite), uvicorn 1 worker, {args.connections} "
          f"connections, {args.seconds:g} s per target, {os.cpu_count()} CPUs, loopback\n")
    print(f"{'target':<24}{'size':>9}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'cpu ms':>9}"
          f"{'req/s ratio':>13}{'p50 ratio':>11}{'p99 ratio':>11}")
    for (label, kind, r), static in zip(rows, [rows[1], rows[1], rows[3], rows[3]], strict=True):
        st = static[2]
        ratio = "" if r is st else (f"{r['rps'] / st['rps']:>12.2f}x{r['p50'] / st['p50']:>10.2f}x"
                                    f"{r['p99'] / st['p99']:>10.2f}x")
        cpu = f"{r['cpu']:>9.2f}" if r["cpu"] is not None else f"{'n/a':>9}"
        print(f"{label:<24}{sizes[kind] / 1e3:>7.1f}kB{r['rps']:>9.0f}{r['p50']:>9.1f}"
              f"{r['p99']:>9.1f}{cpu} {ratio}")
    js, st = rows[2][2], rows[3][2]
    ok_rps, ok_p99 = js["rps"] >= 0.5 * st["rps"], js["p99"] < 50
    print(f"\ntargets: JSON throughput >= 0.5x static: {'met' if ok_rps else 'MISSED'} "
          f"({js['rps'] / st['rps']:.2f}x); JSON p99 < 50 ms: {'met' if ok_p99 else 'MISSED'} "
          f"({js['p99']:.1f} ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
