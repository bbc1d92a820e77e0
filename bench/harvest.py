"""Harvest cost against the bare forward passes on the same batches, measured in one run.

    .venv/bin/python bench/harvest.py [--batches 8] [--layers all] [--heads none] [--no-compile]
                                      [--sae DIR]

Prints the harvest's wall time over two baselines on the same batches: the model's own forward
pass (`model(input_ids)`, LM head included), and the truncated pass the harvest runs (blocks up to
the last needed layer, no LM head, plus the SAE encode for SAE sources), whose ratio is the
bookkeeping's own overhead (with --heads, the recomputed attention patterns included:
`--layers none --heads all` measures the heads alone, target <= 1.5). Also tokens per second,
and bytes on disk per feature once written to a SQLite file. Bare and harvest passes alternate
and each figure is the best of --repeats rounds, so both see the same machine load.
"""

from __future__ import annotations

import argparse
import sqlite3
import tempfile
import time
from pathlib import Path

import torch

from app.config import DEFAULT_MODEL, default_cache_dir
from app.db.engine import make_engine, upgrade
from workers import store
from workers.corpus import load_dataset
from workers.finalize import finalize
from workers.harvest import HarvestConfig, Harvester, neuron_sources
from workers.heads import head_sources
from workers.loading import load_model
from workers.runner import parse_layers


def full_pass(lm, batches) -> float:
    """The model's own forward pass, LM head included: what `model(input_ids)` costs."""
    t0 = time.perf_counter()
    for ids in batches:
        lm.hf_model(input_ids=ids, use_cache=False)
    return time.perf_counter() - t0


def bare_pass(lm, batches, specs) -> float:
    """The same truncated pass the harvest runs (blocks up to the last needed one), bare."""
    last = max(s.layer for s in specs)
    hooks = sorted({s.hook_name for s in specs if s.encode is not None})
    encoders = {s.hook_name: s.encode for s in specs if s.encode is not None}
    t0 = time.perf_counter()
    for ids in batches:
        if hooks:  # SAE encode is part of the bare cost
            lm.run_with_hooks(ids, hooks + [f"blocks.{last}.hook_resid_post"],
                              lambda name, a: encoders[name](a) if name in encoders else None)
        else:
            lm.forward_to(ids, last)
    return time.perf_counter() - t0


def harvest_pass(harvester) -> tuple[float, dict]:
    t0 = time.perf_counter()
    states = harvester.run_shard(0)
    return time.perf_counter() - t0, states


def sqlite_bytes(path: Path, table: str) -> int:
    """Bytes of a table and its indexes in a SQLite file (the dbstat virtual table)."""
    con = sqlite3.connect(path)
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    try:
        names = [r[0] for r in con.execute(
            "SELECT name FROM sqlite_master WHERE tbl_name = ?", (table,))]
        marks = ",".join("?" * len(names))
        return con.execute(f"SELECT SUM(pgsize) FROM dbstat WHERE name IN ({marks})",
                           names).fetchone()[0]
    finally:
        con.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--dataset", default="pydoc")
    p.add_argument("--layers", default="all")
    p.add_argument("--heads", default="none", help="layers whose attention heads are harvested")
    p.add_argument("--sae", action="append", default=[])
    p.add_argument("--batches", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--no-compile", action="store_true",
                   help="eager reductions (the CLI compiles them by default)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--cache-dir", default=str(default_cache_dir()))
    p.add_argument("--no-store", action="store_true", help="skip the bytes-on-disk measurement")
    args = p.parse_args()

    torch.set_grad_enabled(False)
    lm = load_model(args.model, device=args.device, cache_dir=Path(args.cache_dir))
    n_seq = args.batches * args.batch_size
    ds = load_dataset(args.dataset, lm.tokenizer, seq_len=args.seq_len,
                      max_tokens=n_seq * args.seq_len, cache_dir=Path(args.cache_dir))
    specs = neuron_sources(lm, parse_layers(args.layers, lm.n_layers))
    specs += head_sources(lm, parse_layers(args.heads, lm.n_layers, "--heads"))
    if args.sae:
        from workers.sae import sae_sources

        specs += sae_sources(lm, args.sae, device=args.device)
    cfg = HarvestConfig(batch_size=args.batch_size, shard_sequences=n_seq, compile=not args.no_compile)
    harvester = Harvester(lm, ds.tokens, specs, cfg, bos_first=ds.bos_policy == "bos-prepended")
    batches = [ds.tokens[i:i + args.batch_size].to(args.device)
               for i in range(0, n_seq, args.batch_size)]
    n_tokens = n_seq * args.seq_len
    n_features = sum(s.n_features for s in specs)

    with torch.inference_mode():
        bare_pass(lm, batches[:1], specs)  # warm-up (and compile, if asked)
        Harvester(lm, ds.tokens[:args.batch_size], specs, cfg, bos_first=True).run_shard(0)
        full_pass(lm, batches[:1])
        full, bare, harv = [], [], []
        for _ in range(args.repeats):
            full.append(full_pass(lm, batches))
            bare.append(bare_pass(lm, batches, specs))
            t, states = harvest_pass(harvester)
            harv.append(t)
    f, b, h = min(full), min(bare), min(harv)

    print(f"model {lm.slug} on {args.device}, {torch.get_num_threads()} threads; "
          f"{len(specs)} sources, {n_features:,} features; {args.batches} batches of "
          f"{args.batch_size} x {args.seq_len} = {n_tokens:,} tokens; compile={not args.no_compile}")
    print(f"model forward     {f:8.2f} s   {n_tokens / f:9.0f} tok/s   (runs: "
          + ", ".join(f"{x:.2f}" for x in full) + ")")
    print(f"truncated forward {b:8.2f} s   {n_tokens / b:9.0f} tok/s   (runs: "
          + ", ".join(f"{x:.2f}" for x in bare) + ")")
    print(f"harvest           {h:8.2f} s   {n_tokens / h:9.0f} tok/s   (runs: "
          + ", ".join(f"{x:.2f}" for x in harv) + ")")
    print(f"ratio harvest / model forward:     {h / f:.3f}   (target <= 1.2)")
    print(f"ratio harvest / truncated forward: {h / b:.3f}   (the bookkeeping's own overhead)")

    if args.no_store:
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.db"
        engine = make_engine(f"sqlite:///{path}")
        upgrade(engine)
        reg = store.begin(engine, lm, ds, specs, cfg)
        t0 = time.perf_counter()
        store.write(engine, reg, finalize(lm, ds, specs, states, cfg))
        t_write = time.perf_counter() - t0
        engine.dispose()
        con = sqlite3.connect(path)
        n_ex = con.execute("SELECT SUM(n) FROM example_blocks").fetchone()[0] or 0
        con.close()
        f_bytes = sqlite_bytes(path, "features") / n_features
        e_bytes = sqlite_bytes(path, "example_blocks") / max(n_ex, 1)
        print(f"write to SQLite   {t_write:8.2f} s   {n_features / t_write:9.0f} features/s")
        print(f"on disk           {f_bytes + e_bytes * n_ex / n_features:8.0f} B per feature "
              f"({f_bytes:.0f} B feature row + {n_ex / n_features:.1f} examples x "
              f"{e_bytes:.0f} B, blocks included; windows of {harvester.window} tokens; indexes included)")
        print(f"  a feature with 40 examples: {f_bytes + 40 * e_bytes:.0f} B (target <= 8192)")

if __name__ == "__main__":
    main()
