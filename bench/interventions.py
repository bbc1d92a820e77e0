"""Steered generation against plain generation, and a batched residual patching sweep against
the forward passes it needs.

    .venv/bin/python bench/interventions.py [--tokens 64] [--repeats 5] [--batch 32]

Generation: the same prompt, seed and number of tokens (no stop token), plain and with an
SAE feature and a neuron steered (additive, at two hook points), alternating, so that both see
the same machine load; prints the time per generated token of each and their ratio (median of
the repeats). Patching: the indirect-object prompts; a full residual sweep (every layer x
every position, none skipped), batched, against (layers x positions + 2) single forward passes
(LM head at the last position, as the sweep computes it), and the sweep as it runs on the server
(residual patches before the first differing token skipped).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from app.config import DEFAULT_MODEL, default_cache_dir
from app.intervention_schemas import IOI
from workers.generation import generate
from workers.inference import ServedModel, ServedSource
from workers.loading import load_model
from workers.patching import Site, run_patches, sweep
from workers.sae import SAE, SAEConfig
from workers.steering import SteerFeature, steering_edits


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--tokens", type=int, default=64, help="tokens generated per run")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--batch", type=int, default=32, help="rows per patching pass")
    p.add_argument("--cache-dir", default=str(default_cache_dir()))
    args = p.parse_args()

    torch.set_grad_enabled(False)
    lm = load_model(args.model, cache_dir=Path(args.cache_dir))
    layer = lm.n_layers // 2
    g = torch.Generator().manual_seed(0)
    sae = SAE(SAEConfig(d_in=lm.d_model, d_sae=1024, hook_name=f"blocks.{layer}.hook_resid_post",
                        k=32))
    sae.W_dec.data = torch.randn(1024, lm.d_model, generator=g) / lm.d_model**0.5
    served = ServedModel(lm, {
        "mlp": ServedSource("mlp", "neurons", f"blocks.{layer}.mlp.hook_post", lm.d_mlp),
        "sae": ServedSource("sae", "sae", sae.cfg.hook_name, 1024, encode=sae.encode, sae=sae)})
    edits = steering_edits(served, [SteerFeature("sae", 3, 8.0), SteerFeature("mlp", 7, 2.0)],
                           method="additive", normalize=False)
    prompt = served.tokenize("Once upon a time, in a small town by the sea,")
    kw = dict(n_tokens=args.tokens, temperature=0.7, seed=1)

    def steered():
        with lm.editing(edits):
            generate(lm, prompt, **kw)

    generate(lm, prompt, n_tokens=4, temperature=0.7, seed=1)  # warm-up
    plain_t, steer_t = [], []
    for _ in range(args.repeats):
        plain_t.append(timed(lambda: generate(lm, prompt, **kw)) / args.tokens)
        steer_t.append(timed(steered) / args.tokens)
    plain, steer = statistics.median(plain_t), statistics.median(steer_t)

    clean, corrupted = served.tokenize(IOI["clean"]), served.tokenize(IOI["corrupted"])
    a, w = served.tokenize(IOI["answer"])[-1], served.tokenize(IOI["wrong"])[-1]
    n = len(clean)
    every = [(Site(f"blocks.{L}.hook_resid_pre", position=q),) for L in range(lm.n_layers)
             for q in range(n)]
    x = torch.tensor([corrupted])

    def one_pass():
        with torch.inference_mode():
            lm.hf_model(input_ids=x, use_cache=False, logits_to_keep=1)

    one_pass()
    single, full, served_sweep = [], [], []
    for _ in range(args.repeats):
        single.append(statistics.median(timed(one_pass) for _ in range(5)))
        full.append(timed(lambda: run_patches(lm, clean, corrupted, a, w, every,
                                              batch_size=args.batch)))
        served_sweep.append(timed(lambda: sweep(lm, clean, corrupted, a, w, kinds=["resid"],
                                                batch_size=args.batch)))
    one, whole, skipped = (statistics.median(v) for v in (single, full, served_sweep))
    needed = len(every) + 2
    sw = sweep(lm, clean, corrupted, a, w, kinds=["resid"], batch_size=args.batch)

    ms = 1000
    print(f"model {lm.slug} on {lm.device}, {torch.get_num_threads()} threads; "
          f"median of {args.repeats} repeats")
    print(f"generation, {args.tokens} tokens: plain {plain * ms:.1f} ms/token, steered "
          f"(2 features, 2 hook points) {steer * ms:.1f} ms/token")
    print(f"ratio steered / plain generation per token: {steer / plain:.3f}   (target <= 1.2)")
    print(f"patching, {n} tokens x {lm.n_layers} layers: one forward pass {one * ms:.1f} ms; "
          f"full residual sweep ({len(every)} runs, {args.batch} rows per pass) "
          f"{whole:.2f} s; {needed} passes needed one by one")
    print(f"ratio full sweep / ({needed} x one forward pass): {whole / (needed * one):.3f}   "
          "(target <= 1.0)")
    print(f"the sweep as served ({sw.runs} runs, positions before {sw.first_diff} skipped, "
          f"{sw.passes} passes): {skipped:.2f} s, ratio {skipped / (needed * one):.3f}")


if __name__ == "__main__":
    main()
