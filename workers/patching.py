"""Activation patching: clean activations copied into the run of a corrupted prompt of the same
length, and how far that moves the answer's logit difference back towards the clean run.

The metric of a patched run is its normalised logit difference at the last position,
    (LD - LD_corrupted) / (LD_clean - LD_corrupted),    LD = logit(answer) - logit(wrong),
0 for the corrupted run and 1 for the clean one. A sweep patches, one run each:
- `resid`: the residual stream entering block L (`hook_resid_pre`) at one position;
- `heads`: one head's output before the output projection (`attn.hook_z`), at every position;
- `mlp`: the MLP's output of block L (`hook_mlp_out`), at every position.

The patched runs are batched: every forward pass holds the clean run (row 0, where the patches
copy from, in the same pass), the corrupted run (row 1) and up to `batch_size - 2` patched runs,
each normalised by the clean and corrupted runs of its own pass, so that patching every
position of a layer's residual stream gives exactly 1 and patching nothing exactly 0. A
residual patch at a position before the first token where the prompts differ copies an
activation equal to the one it replaces (attention is causal): it is not run, its value is 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from app.inference_errors import BadInput, TooLong
from workers.models import LoadedModel

KINDS = ("resid", "heads", "mlp")


@dataclass(frozen=True)
class Site:
    """Where one patch copies the clean activation: a hook point, at one position or all, and
    for `attn.hook_z` one head or all."""

    hook: str
    position: int | None = None
    head: int | None = None


@dataclass
class Sweep:
    resid: np.ndarray | None
    """[n_layers, T] float64, or None when not asked for"""
    heads: np.ndarray | None
    """[n_layers, n_heads]"""
    mlp: np.ndarray | None
    """[n_layers]"""
    logit_diff_clean: float
    logit_diff_corrupted: float
    first_diff: int
    """the first position where the prompts differ (residual patches before it are not run)"""
    runs: int
    """patched runs computed (the skipped ones not counted)"""
    passes: int
    """forward passes made"""


def sweep_size(lm: LoadedModel, n_tokens: int, kinds: list[str]) -> int:
    """How many patched runs a sweep of these kinds has (before any is skipped)."""
    per = {"resid": n_tokens, "heads": lm.n_heads, "mlp": 1}
    return lm.n_layers * sum(per[k] for k in kinds)


def _edit(sites: list[tuple[int, Site]], lm: LoadedModel):
    """The edit of one hook point: each (row, site) gets row 0's activation copied in."""
    def edit(act: Tensor) -> Tensor:
        out = act.clone()
        for row, s in sites:
            if s.head is not None:
                sl = slice(s.head * lm.d_head, (s.head + 1) * lm.d_head)
                out[row, :, sl] = act[0, :, sl]
            elif s.position is not None:
                out[row, s.position] = act[0, s.position]
            else:
                out[row] = act[0]
        return out
    return edit


def _same_length(clean: list[int], corrupted: list[int]) -> None:
    if len(clean) != len(corrupted):
        raise BadInput(f"the clean and corrupted prompts must have the same number of tokens; "
                       f"they have {len(clean)} and {len(corrupted)}")


def run_patches(lm: LoadedModel, clean: list[int], corrupted: list[int], answer: int, wrong: int,
                patches: list[tuple[Site, ...]], *, batch_size: int = 32
                ) -> tuple[np.ndarray, float, float, int]:
    """(normalised logit difference of each patched run [len(patches)], LD_clean,
    LD_corrupted, forward passes). A patch is a tuple of sites, all patched in one run."""
    _same_length(clean, corrupted)
    if batch_size < 3:
        raise ValueError("batch_size must be at least 3 (clean, corrupted and one patch)")
    device = lm.device
    per = batch_size - 2
    out = np.zeros(len(patches))
    baselines: tuple[float, float] | None = None
    passes = 0
    for b0 in range(0, max(len(patches), 1), per):
        chunk = patches[b0:b0 + per]
        ids = torch.tensor([clean, corrupted] + [corrupted] * len(chunk), device=device)
        by_hook: dict[str, list[tuple[int, Site]]] = {}
        for row, patch in enumerate(chunk, start=2):
            for s in patch:
                by_hook.setdefault(s.hook, []).append((row, s))
        with torch.inference_mode(), lm.editing({h: _edit(v, lm) for h, v in by_hook.items()}):
            logits = lm.hf_model(input_ids=ids, use_cache=False, logits_to_keep=1).logits
        passes += 1
        ld = (logits[:, -1, answer].float() - logits[:, -1, wrong].float()).double().cpu()
        ld_clean, ld_corr = float(ld[0]), float(ld[1])
        if ld_clean == ld_corr:
            raise BadInput("the clean and corrupted prompts give the same logit difference "
                           f"({ld_clean:.6g}): there is nothing to restore")
        baselines = baselines or (ld_clean, ld_corr)
        out[b0:b0 + len(chunk)] = ((ld[2:] - ld_corr) / (ld_clean - ld_corr)).numpy()
    return out, baselines[0], baselines[1], passes


def sweep(lm: LoadedModel, clean: list[int], corrupted: list[int], answer: int, wrong: int, *,
          kinds: list[str], batch_size: int = 32, max_runs: int | None = None) -> Sweep:
    """Every patch of the asked kinds (see the module docstring), batched; TooLong when it
    would need more than `max_runs` patched runs."""
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or not kinds:
        raise BadInput(f"unknown patch kinds {unknown}; known: {', '.join(KINDS)}")
    _same_length(clean, corrupted)
    size = sweep_size(lm, len(clean), kinds)
    if max_runs is not None and size > max_runs:
        raise TooLong(f"this sweep needs {size:,} patched runs; this server runs at most "
                      f"{max_runs:,} per request (shorter prompts or fewer kinds)")
    n_layers, n = lm.n_layers, len(clean)
    first = next((i for i, (a, b) in enumerate(zip(clean, corrupted, strict=True)) if a != b), n)
    coords: list[tuple[str, tuple[int, ...]]] = []
    patches: list[tuple[Site, ...]] = []
    for layer in range(n_layers):
        if "resid" in kinds:
            for pos in range(first, n):
                coords.append(("resid", (layer, pos)))
                patches.append((Site(f"blocks.{layer}.hook_resid_pre", position=pos),))
        if "heads" in kinds:
            for head in range(lm.n_heads):
                coords.append(("heads", (layer, head)))
                patches.append((Site(f"blocks.{layer}.attn.hook_z", head=head),))
        if "mlp" in kinds:
            coords.append(("mlp", (layer,)))
            patches.append((Site(f"blocks.{layer}.hook_mlp_out"),))
    values, ld_clean, ld_corr, passes = run_patches(lm, clean, corrupted, answer, wrong, patches,
                                                    batch_size=batch_size)
    grids = {"resid": np.zeros((n_layers, n)), "heads": np.zeros((n_layers, lm.n_heads)),
             "mlp": np.zeros(n_layers)}
    for (kind, at), v in zip(coords, values, strict=True):
        grids[kind][at] = v
    return Sweep(*(grids[k] if k in kinds else None for k in KINDS), logit_diff_clean=ld_clean,
                 logit_diff_corrupted=ld_corr, first_diff=first, runs=len(patches),
                 passes=passes)
