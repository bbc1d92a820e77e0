"""Latency of POST /api/v1/activations against the bare forward pass of the same text.

    .venv/bin/python bench/live.py [--requests 200] [--tokens 64] [--layer 6] [--sae DIR]

Harvests a small slice of the corpus into a temporary SQLite file (the server needs stored
sources to serve), starts the real server with the model loaded (`serve --live` in a thread),
then sends texts of --tokens tokens one request at a time over HTTP. Each request alternates
with the model's own forward pass over the same token ids (LM head included) and with the
bare truncated pass (blocks up to the hook point, which is all a request needs), and with the
live pass in-process (the same, with the hook and the copy out), so all see the same machine
load. Prints p50 and p99 of each, and the request's ratios to the bare passes.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import torch
import uvicorn

from app.config import DEFAULT_MODEL, Settings, default_cache_dir
from app.db.engine import make_engine, upgrade
from app.main import create_app
from app.model_queue import InferenceLimits, ModelQueue
from workers import store
from workers.corpus import load_dataset
from workers.finalize import finalize
from workers.harvest import HarvestConfig, Harvester, neuron_sources, run_harvest
from workers.inference import ServedModels
from workers.loading import load_model


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def serve(app) -> tuple[str, uvicorn.Server, threading.Thread]:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    return f"http://127.0.0.1:{port}", server, thread


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--dataset", default="pydoc")
    p.add_argument("--layer", type=int, default=6, help="the neuron source the requests read")
    p.add_argument("--sae", default=None, help="also serve this SAE; requests read it instead")
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--tokens", type=int, default=64, help="tokens per text, BOS included")
    p.add_argument("--cache-dir", default=str(default_cache_dir()))
    args = p.parse_args()

    torch.set_grad_enabled(False)
    cache = Path(args.cache_dir)
    lm = load_model(args.model, cache_dir=cache)
    ds = load_dataset(args.dataset, lm.tokenizer, seq_len=128, max_tokens=16 * 128,
                      cache_dir=cache)
    specs = neuron_sources(lm, [args.layer])
    if args.sae:
        from workers.sae import sae_sources

        specs += sae_sources(lm, [args.sae])
    cfg = HarvestConfig(batch_size=8, shard_sequences=16)
    states = run_harvest(Harvester(lm, ds.tokens, specs, cfg, bos_first=True))
    source = specs[-1]

    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{Path(tmp) / 'live.db'}"
        engine = make_engine(url)
        upgrade(engine)
        store.write(engine, store.begin(engine, lm, ds, specs, cfg),
                    finalize(lm, ds, specs, states, cfg))
        models = ServedModels.load(engine, device="cpu", cache_dir=cache)
        live_lm = models.model(lm.slug)
        app = create_app(Settings(database_url=url), engine=engine,
                         live=ModelQueue(models, InferenceLimits()))
        base, server, thread = serve(app)

        # Texts of exactly --tokens tokens: corpus windows that tokenize back to themselves.
        texts = []
        for row in ds.tokens.tolist():
            for start in range(1, 128 - args.tokens, 16):
                text = lm.tokenizer.decode(row[start:start + args.tokens - 1])
                if len(live_lm.tokenize(text)) == args.tokens:
                    texts.append(text)
        if not texts:
            sys.exit("no corpus window tokenizes back to itself")
        ids = [live_lm.tokenize(t) for t in texts]

        http, full, trunc, bare = [], [], [], []
        last = max(sp.layer for sp in specs)
        with httpx.Client(base_url=base, timeout=60) as client:
            for i in range(args.requests + 10):
                j = i % len(texts)
                body = {"model": lm.slug, "source": source.slug, "index": 0, "text": texts[j]}
                t0 = time.perf_counter()
                r = client.post("/api/v1/activations", json=body)
                t1 = time.perf_counter()
                r.raise_for_status()
                x = torch.tensor([ids[j]])
                t2 = time.perf_counter()
                lm.hf_model(input_ids=x, use_cache=False)
                t3 = time.perf_counter()
                live_lm.run(ids[j], [source.slug])
                t4 = time.perf_counter()
                lm.forward_to(x, last)
                t5 = time.perf_counter()
                if i >= 10:  # warm-up left out
                    http.append(t1 - t0)
                    full.append(t3 - t2)
                    trunc.append(t4 - t3)
                    bare.append(t5 - t4)
        server.should_exit = True
        thread.join(timeout=10)

    ms = 1000
    print(f"model {lm.slug} on cpu, {torch.get_num_threads()} threads; source {source.slug} "
          f"({source.hook_name}); {args.requests} requests of {args.tokens} tokens, one at a time")
    for name, xs in (("POST /api/v1/activations", http), ("model forward (LM head)", full),
                     (f"bare forward to layer {last}", bare), ("live pass in-process", trunc)):
        print(f"{name:26s} p50 {pct(xs, .5) * ms:7.1f} ms   p99 {pct(xs, .99) * ms:7.1f} ms   "
              f"mean {statistics.fmean(xs) * ms:7.1f} ms")
    print(f"ratio p50 request / p50 bare forward to layer {last}: "
          f"{pct(http, .5) / pct(bare, .5):.2f}   (the pass a request needs)")
    print(f"ratio p99 request / p50 bare forward to layer {last}: "
          f"{pct(http, .99) / pct(bare, .5):.2f}")
    print(f"ratio p50 request / p50 model forward: {pct(http, .5) / pct(full, .5):.2f}   "
          "(a request stops after its layer)")


if __name__ == "__main__":
    main()
