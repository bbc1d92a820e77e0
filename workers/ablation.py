"""Ablation: the next-token loss of a text with features turned off (or held at a value), next to
the clean model's, and the tokens whose log-probability moved most.

At every position of the text, a feature's activation a is replaced by r (0, its mean over the
harvest, or a value the caller gives):
- a neuron: its activation at `blocks.L.mlp.hook_post` is set to r;
- an SAE feature: (a - r) x its decoder contribution is subtracted from the hook point's
  activation, where a is the SAE's encoding of that activation. The rest of the SAE's
  reconstruction and its error stay as they were, so nothing else changes. (For SAEs that
  normalise their input, the decoder row is scaled back to the activation's space.)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from app.inference_errors import BadInput
from workers.inference import ServedModel


@dataclass(frozen=True)
class Ablation:
    """One feature and the value its activation is replaced by."""

    source: str
    index: int
    replacement: float = 0.0


@dataclass
class AblationResult:
    """Per token i (of T): the loss of predicting token i from the tokens before it, clean and
    ablated (entry 0, which nothing predicts, is NaN), and the `top` tokens of the vocabulary
    whose log-probability at that prediction moved most (by |ablated - clean|)."""

    loss_clean: np.ndarray
    """[T] float32"""
    loss_ablated: np.ndarray
    moved_ids: np.ndarray
    """[T, top] int64 (row 0 empty: -1)"""
    moved_clean: np.ndarray
    """[T, top] float32: their clean log-probabilities"""
    moved_ablated: np.ndarray


def _source_edit(served: ServedModel, slug: str, items: list[Ablation]
                 ) -> Callable[[Tensor], Tensor]:
    src = served.source(slug)
    for a in items:
        if not 0 <= a.index < src.n_features:
            raise BadInput(f"{served.slug}/{slug} has no feature {a.index}: it has features 0 "
                           f"to {src.n_features - 1}")
    idx = torch.tensor([a.index for a in items], device=served.lm.device)
    repl = torch.tensor([a.replacement for a in items], dtype=torch.float32,
                        device=served.lm.device)
    sae = src.sae
    if sae is None:
        def edit(act: Tensor) -> Tensor:
            out = act.clone()
            out[..., idx] = repl.to(act.dtype)
            return out
        return edit
    w_dec = sae.output_directions()[idx]  # [n, d_in]

    def edit(act: Tensor) -> Tensor:
        f = sae.encode(act)[..., idx]
        delta = (f - repl.to(f.dtype)) @ w_dec
        _, undo = sae._normalize(act.to(sae.W_enc.dtype))
        if undo is not None:
            delta = delta * undo[0]
        return act - delta.to(act.dtype)

    return edit


def ablation_edits(served: ServedModel, ablations: list[Ablation]
                   ) -> dict[str, Callable[[Tensor], Tensor]]:
    """{hook point: edit} for `LoadedModel.editing`; sources sharing a hook point apply in the
    order they first appear."""
    by_source: dict[str, list[Ablation]] = {}
    for a in ablations:
        by_source.setdefault(a.source, []).append(a)
    by_hook: dict[str, list[Callable[[Tensor], Tensor]]] = {}
    for slug, items in by_source.items():
        by_hook.setdefault(served.source(slug).hook_name, []).append(
            _source_edit(served, slug, items))

    def chain(fns: list[Callable[[Tensor], Tensor]]) -> Callable[[Tensor], Tensor]:
        def edit(act: Tensor) -> Tensor:
            for fn in fns:
                act = fn(act)
            return act
        return edit

    return {hook: fns[0] if len(fns) == 1 else chain(fns) for hook, fns in by_hook.items()}


def _logprobs(served: ServedModel, ids: Tensor) -> Tensor:
    with torch.inference_mode():
        logits = served.lm.hf_model(input_ids=ids, use_cache=False).logits
    return torch.log_softmax(logits[0].float(), dim=-1)


def ablate(served: ServedModel, ids: list[int], ablations: list[Ablation], *, top: int = 5
           ) -> AblationResult:
    """The text (token ids, run as given) through the clean model and with `ablations`."""
    if len(ids) < 2:
        raise BadInput("the text needs at least two tokens: a loss is the prediction of a token "
                       "from the ones before it")
    if not ablations:
        raise BadInput("no features to ablate")
    served.check_ids(ids)
    edits = ablation_edits(served, ablations)
    x = torch.tensor([ids], device=served.lm.device)
    clean = _logprobs(served, x)
    with served.lm.editing(edits):
        ablated = _logprobs(served, x)
    nxt = x[0, 1:, None]
    nan = torch.full((1,), float("nan"))
    loss_clean = torch.cat([nan, -clean[:-1].gather(1, nxt)[:, 0].cpu()])
    loss_ablated = torch.cat([nan, -ablated[:-1].gather(1, nxt)[:, 0].cpu()])
    k = min(top, served.lm.vocab_size)
    moved = (ablated[:-1] - clean[:-1]).abs().topk(k, dim=-1).indices  # [T-1, k]
    pad = torch.full((1, k), -1, dtype=torch.long, device=moved.device)
    moved_ids = torch.cat([pad, moved])
    safe = moved_ids.clamp(min=0)
    moved_clean = torch.cat([clean[:1] * 0, clean[:-1]]).gather(1, safe)
    moved_ablated = torch.cat([ablated[:1] * 0, ablated[:-1]]).gather(1, safe)
    return AblationResult(loss_clean.numpy(), loss_ablated.numpy(), moved_ids.cpu().numpy(),
                          moved_clean.cpu().numpy(), moved_ablated.cpu().numpy())
