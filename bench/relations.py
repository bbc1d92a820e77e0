"""Cost of related features, measured in one run: the harvest with co-firing statistics
(`--relations`) over the harvest without, and the time to match two sources.

    .venv/bin/python bench/relations.py [--layer 15] [--batches 4] [--match-tokens 100000]

Harvest: one layer of neurons, and an SAE of the demo's shape (TopK, 4,096 features, k = 32, on
the residual stream after the layer; random weights: the cost depends on the shape and the
sparsity, not on training), each harvested with and without the statistics on the same
batches, alternating, best of --repeats. Match: two such SAEs (different seeds) on the same
hook point run over --match-tokens tokens (correlations, then the one-to-one matching).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from app.config import DEFAULT_MODEL, default_cache_dir
from workers.corpus import load_dataset
from workers.harvest import HarvestConfig, Harvester, SourceSpec, neuron_sources
from workers.loading import load_model
from workers.match import correlations, one_to_one
from workers.relations import cofiring_rows
from workers.sae import SAE, SAEConfig, source_slug


def demo_sae(lm, hook: str, n: int, k: int, seed: int) -> SourceSpec:
    """A TopK SAE of the demo's shape with random weights, as a harvest source."""
    g = torch.Generator().manual_seed(seed)
    sae = SAE(SAEConfig(d_in=lm.d_model, d_sae=n, hook_name=hook, architecture="topk", k=k))
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(lm.d_model, n, generator=g) / lm.d_model**0.5)
        sae.W_dec.copy_(sae.W_enc.T)
    sae = sae.requires_grad_(False).to(lm.device)
    return SourceSpec(slug=source_slug(hook, n), kind="sae", hook_name=hook,
                      layer=int(hook.split(".")[1]), n_features=n, bottom=False,
                      encode=sae.encode, directions=lambda: sae.W_dec)


def harvest_time(lm, tokens, spec: SourceSpec, cfg: HarvestConfig) -> tuple[float, dict]:
    h = Harvester(lm, tokens, [spec], cfg, bos_first=True)
    t0 = time.perf_counter()
    states = h.run_shard(0)
    return time.perf_counter() - t0, states


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--layer", type=int, default=15)
    p.add_argument("--batches", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--sae-features", type=int, default=4096)
    p.add_argument("--sae-k", type=int, default=32)
    p.add_argument("--match-tokens", type=int, default=100_000,
                   help="tokens the two sources are matched over (about 5 minutes on 2 cores)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--cache-dir", default=str(default_cache_dir()))
    args = p.parse_args()

    torch.set_grad_enabled(False)
    lm = load_model(args.model, device=args.device, cache_dir=Path(args.cache_dir))
    n_seq = args.batches * args.batch_size
    ds = load_dataset("pydoc", lm.tokenizer, seq_len=args.seq_len,
                      max_tokens=max(n_seq * args.seq_len, args.match_tokens),
                      cache_dir=Path(args.cache_dir))
    tokens = ds.tokens[:n_seq]
    hook = f"blocks.{args.layer}.hook_resid_post"
    sae = demo_sae(lm, hook, args.sae_features, args.sae_k, seed=0)
    print(f"model {lm.slug} on {args.device}, {torch.get_num_threads()} threads; "
          f"{args.batches} batches of {args.batch_size} x {args.seq_len} = "
          f"{n_seq * args.seq_len:,} tokens")
    with torch.inference_mode():
        for spec in (neuron_sources(lm, [args.layer])[0], sae):
            plain = HarvestConfig(batch_size=args.batch_size, shard_sequences=n_seq, compile=True)
            withr = HarvestConfig(**{**plain.to_dict(), "relations": True})
            harvest_time(lm, tokens[:args.batch_size], spec, withr)  # warm-up, compile
            t_plain, t_rel = [], []
            for _ in range(args.repeats):
                t_plain.append(harvest_time(lm, tokens, spec, plain)[0])
                t, states = harvest_time(lm, tokens, spec, withr)
                t_rel.append(t)
            t0 = time.perf_counter()
            cofiring_rows(spec.slug, states[spec.slug].cofire)
            t_lists = time.perf_counter() - t0
            a, b = min(t_plain), min(t_rel)
            print(f"{spec.slug:>16} ({spec.n_features:,} features): harvest {a:.2f} s, with "
                  f"co-firing statistics {b:.2f} s: ratio {b / a:.3f} (target <= 1.3); "
                  f"Jaccard and Pearson lists {t_lists:.2f} s  (runs: "
                  + ", ".join(f"{x:.2f}" for x in t_plain) + " / "
                  + ", ".join(f"{x:.2f}" for x in t_rel) + ")")

        other = demo_sae(lm, hook, args.sae_features, args.sae_k, seed=1)
        n_match = max(1, args.match_tokens // args.seq_len)
        t0 = time.perf_counter()
        corr, _ = correlations(lm, sae, lm, other, ds.tokens[:n_match], first=1,
                            batch_size=args.batch_size)
        t_corr = time.perf_counter() - t0
        t0 = time.perf_counter()
        pairs = one_to_one(corr)
        t_pairs = time.perf_counter() - t0
    print(f"match {sae.n_features:,} x {other.n_features:,} features over "
          f"{n_match * args.seq_len:,} tokens: correlations {t_corr:.1f} s (forward passes "
          f"included), one-to-one matching {t_pairs:.1f} s, {len(pairs):,} pairs")


if __name__ == "__main__":
    main()
