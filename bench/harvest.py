"""Harvest cost against the bare forward passes on the same batches, measured in one run.

    .venv/bin/python bench/harvest.py [--batches 8] [--layers all] [--heads none] [--no-compile]
    .venv/bin/python bench/harvest.py --sae [4k 16k 65k | DIR ...] [--batches 64] [--sae-layer 15]

Prints the harvest's wall time over two baselines on the same batches: the model's own forward
pass (`model(input_ids)`, LM head included), and the truncated pass the harvest runs (blocks up to
the last needed layer, no LM head, plus the SAE encode for SAE sources), whose ratio is the
bookkeeping's own overhead (with --heads, the recomputed attention patterns included:
`--layers none --heads all` measures the heads alone, target <= 1.5). Also tokens per second,
and bytes on disk per feature once written to a SQLite file. Bare and harvest passes alternate
and each figure is the best of --repeats rounds, so both see the same machine load.

With --sae, one SAE at a time (a width such as 16k: a TopK SAE with random weights at
--sae-layer's residual stream, initialised as train-sae initialises one; or an SAE folder): the
harvest's wall time (pass, the rows of every feature, the write to SQLite) over the bare cost of
the same batches (the forward pass to the hook and the SAE's encode), and the peak memory of
each step over what the process held before. The tables computed from the weights alone
(direct logit attribution over the vocabulary, the cosine lists) do not depend on the corpus
and are timed apart.
"""

from __future__ import annotations

import argparse
import gc
import os
import re
import sqlite3
import tempfile
import threading
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


def bare_pass(lm, batches, specs, run=None) -> float:
    """The same truncated pass the harvest runs (blocks up to the last needed one), bare.
    `run`: the model's run_with_hooks (a paired pass replaces the model's own)."""
    run = run or lm.run_with_hooks
    last = max(s.layer for s in specs)
    hooks = sorted({s.hook_name for s in specs if s.encode is not None})
    encoders = {s.hook_name: s.encode for s in specs if s.encode is not None}
    t0 = time.perf_counter()
    for ids in batches:
        if hooks:  # SAE encode is part of the bare cost
            run(ids, hooks + [f"blocks.{last}.hook_resid_post"],
                lambda name, a: encoders[name](a) if name in encoders else None)
        else:
            lm.forward_to(ids, last)
    return time.perf_counter() - t0


def paired_pass(lm, harvester, specs) -> tuple[float, float, dict]:
    """The harvest's pass over its one shard with the bare pass of each batch run beside it,
    before it on odd batches and after it on even ones: (bare seconds, harvest seconds, states).
    Paired batch by batch, a slow spell of a shared machine falls on both sides alike."""
    run = lm.run_with_hooks
    bare, n = 0.0, 0

    def paired(ids, hooks, callback):
        nonlocal bare, n
        n += 1
        if n % 2:
            bare += bare_pass(lm, [ids], specs, run)
        run(ids, hooks, callback)
        if not n % 2:
            bare += bare_pass(lm, [ids], specs, run)

    lm.run_with_hooks = paired
    try:
        t0 = time.perf_counter()
        states = harvester.run_shard(0)
        total = time.perf_counter() - t0
    finally:
        del lm.run_with_hooks
    return bare, total - bare, states


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
    p.add_argument("--sae", nargs="*", default=None, metavar="WIDTH|DIR",
                   help="SAE widths (4k, 16k, 65k: the default) or folders, one at a time")
    p.add_argument("--sae-layer", type=int, default=15)
    p.add_argument("--sae-k", type=int, default=32)
    p.add_argument("--dense", action="store_true",
                   help="fill SAE sources from their dense codes (HarvestConfig.sparse off)")
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
    if args.sae is not None:
        return sae_widths(args, lm, ds)
    specs = neuron_sources(lm, parse_layers(args.layers, lm.n_layers))
    specs += head_sources(lm, parse_layers(args.heads, lm.n_layers, "--heads"))
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

class PeakMemory:
    """The most resident memory of this process while a block runs, sampled every 5 ms, over
    what it held when the block began (host memory; on CUDA, the allocator's peak)."""

    def __init__(self, device: str):
        self.cuda = torch.device(device).type == "cuda"
        self.peak = 0

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self) -> PeakMemory:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return self
        self.base, self.peak, self.stop = self.rss(), self.rss(), threading.Event()

        def sample() -> None:
            while not self.stop.wait(0.005):
                self.peak = max(self.peak, self.rss())

        self.thread = threading.Thread(target=sample, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            self.peak = torch.cuda.max_memory_allocated()
            return
        self.stop.set()
        self.thread.join()
        self.peak = max(self.peak, self.rss())

    @property
    def grew(self) -> float:
        """GB over the start."""
        return (self.peak - self.base) / 1e9


def random_sae_folder(lm, batches, width: int, layer: int, k: int, out: Path) -> Path:
    """A TopK SAE of `width` features with random weights at blocks.{layer}.hook_resid_post,
    initialised as train-sae initialises one: unit decoder rows, the encoder their transpose,
    b_dec the mean activation of the first batch (so codes spread over the features)."""
    from workers.sae import SAE, save_sae
    from workers.sae_config import SAEConfig

    hook = f"blocks.{layer}.hook_resid_post"
    seen = []
    lm.run_with_hooks(batches[0], [hook],
                      lambda _n, a: seen.append(a[:, 1:].reshape(-1, a.shape[-1])))
    gen = torch.Generator().manual_seed(width)
    w = torch.randn(width, lm.d_model, generator=gen)
    w = w / w.norm(dim=1, keepdim=True)
    sae = SAE(SAEConfig(d_in=lm.d_model, d_sae=width, hook_name=hook, architecture="topk", k=k))
    with torch.no_grad():
        sae.W_dec.copy_(w)
        sae.W_enc.copy_(w.T)
        sae.b_dec.copy_(seen[0].float().mean(0).cpu())
    return save_sae(sae, out)


def parse_width(text: str) -> int | None:
    m = re.fullmatch(r"(\d+)([kK]?)", text)
    return None if m is None else int(m.group(1)) * (1024 if m.group(2) else 1)


def sae_widths(args, lm, ds) -> None:
    """One row per SAE: the harvest's steps against the bare forward and encode."""
    from workers.finalize import add_direction_relations, finalize_source, logit_tables
    from workers.sae import sae_sources

    n_seq = args.batches * args.batch_size
    batches = [ds.tokens[i:i + args.batch_size].to(args.device)
               for i in range(0, n_seq, args.batch_size)]
    cfg = HarvestConfig(batch_size=args.batch_size, shard_sequences=n_seq,
                        compile=not args.no_compile, sparse=not args.dense)
    n_tokens = n_seq * args.seq_len
    print(f"model {lm.slug} on {args.device}, {torch.get_num_threads()} threads; {args.batches} "
          f"batches of {args.batch_size} x {args.seq_len} = {n_tokens:,} tokens; "
          f"compile={not args.no_compile}; sparse={cfg.sparse}")
    print("bare = forward to the hook + the SAE's encode, batch by batch beside the pass; "
          "harvest = pass + rows + write; "
          "logits, cosine = tables of the weights alone (not of the corpus); memory: peak GB over "
          "the start, of the pass and of everything")
    print(f"{'SAE':>14} {'bare s':>8} {'pass s':>8} {'rows s':>7} {'write s':>8} "
          f"{'pass/bare':>9} {'harvest/bare':>12} {'logits s':>8} {'cosine s':>8} "
          f"{'mem pass':>8} {'mem all':>8}")
    with tempfile.TemporaryDirectory() as tmp:
        for i, entry in enumerate(args.sae or ["4k", "16k", "65k"]):
            width = parse_width(entry)
            folder = (random_sae_folder(lm, batches, width, args.sae_layer, args.sae_k,
                                        Path(tmp) / f"sae-{i}") if width else Path(entry))
            specs = sae_sources(lm, [str(folder)], device=args.device)
            spec = specs[0]
            harvester = Harvester(lm, ds.tokens[:n_seq], specs, cfg,
                                  bos_first=ds.bos_policy == "bos-prepended")
            with torch.inference_mode():
                bare_pass(lm, batches[:1], specs)  # warm-up
                Harvester(lm, ds.tokens[:args.batch_size], specs, cfg, bos_first=True).run_shard(0)
                bare, passes = [], []
                for _ in range(args.repeats):
                    states = None
                    gc.collect()
                    with PeakMemory(args.device) as mem_pass:
                        b, t, states = paired_pass(lm, harvester, specs)
                    bare.append(b)
                    passes.append(t)
                with PeakMemory(args.device) as mem_rest:
                    t0 = time.perf_counter()
                    logits = logit_tables(lm, spec.directions())
                    t_logits = time.perf_counter() - t0
                    t0 = time.perf_counter()
                    res = finalize_source(spec, states[spec.slug], lm=lm, dataset=ds, cfg=cfg,
                                          logits=logits)
                    t_rows = time.perf_counter() - t0
                    t0 = time.perf_counter()
                    add_direction_relations(specs, [res])
                    t_cos = time.perf_counter() - t0
                    path = Path(tmp) / f"bench-{i}.db"
                    engine = make_engine(f"sqlite:///{path}")
                    upgrade(engine)
                    reg = store.begin(engine, lm, ds, specs, cfg)
                    t0 = time.perf_counter()
                    store.write(engine, reg, [res])
                    t_write = time.perf_counter() - t0
                    engine.dispose()
            del states, res
            gc.collect()
            b, p_ = sum(bare) / len(bare), sum(passes) / len(passes)
            name = f"{spec.n_features // 1024}k topk" if width else spec.slug
            mem_all = (max(mem_pass.peak, mem_rest.peak) - mem_pass.base) / 1e9
            print(f"{name:>14} {b:8.2f} {p_:8.2f} {t_rows:7.2f} {t_write:8.2f} {p_ / b:9.3f} "
                  f"{(p_ + t_rows + t_write) / b:12.3f} {t_logits:8.2f} {t_cos:8.2f} "
                  f"{mem_pass.grew:8.2f} {mem_all:8.2f}", flush=True)


if __name__ == "__main__":
    main()
