"""Steering: text generated with features' directions added, set or capped at their hook points,
next to the text the model generates without them.

A feature's direction lives in its hook point's space: an SAE feature's decoder row (what one
unit of its activation adds to the SAE's reconstruction), a neuron's basis vector at
`blocks.L.mlp.hook_post` (so the MLP's output moves by strength x the down projection's column).
With `normalize` the direction is scaled to unit norm first. At every position, prompt and
generated alike, with c = (x . v) / (v . v) the activation's coefficient along v:
- additive:   x + strength * v
- orthogonal: x + (strength - c) * v   (its component along v replaced by strength * v)
- cap:        x + (min(c, strength) - c) * v   (the component along v limited to strength * v)
Several features at one hook point apply in the order given.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from app.inference_errors import BadInput
from workers.generation import Generation, generate
from workers.inference import ServedModel

METHODS = ("additive", "orthogonal", "cap")


@dataclass(frozen=True)
class SteerFeature:
    source: str
    index: int
    strength: float


def direction(served: ServedModel, source: str, index: int) -> tuple[str, Tensor]:
    """(hook point, direction [dim] float32) of one feature (see the module docstring)."""
    src = served.source(source)
    if not 0 <= index < src.n_features:
        raise BadInput(f"{served.slug}/{source} has no feature {index}: it has features 0 to "
                       f"{src.n_features - 1}")
    if src.sae is not None:
        return src.hook_name, src.sae.output_directions()[index].detach().float()
    v = torch.zeros(served.lm.hook_shape_dim(src.hook_name), device=served.lm.device)
    v[index] = 1.0
    return src.hook_name, v


def steer_edit(vectors: list[tuple[Tensor, float]], method: str) -> Callable[[Tensor], Tensor]:
    """The edit of one hook point's activation [..., dim] by (direction, strength) pairs."""
    if method not in METHODS:
        raise BadInput(f"unknown steering method {method!r}; known: {', '.join(METHODS)}")

    def edit(act: Tensor) -> Tensor:
        for v, strength in vectors:
            if method == "additive":
                act = act + strength * v.to(act.dtype)
                continue
            coef = (act.float() @ v) / (v @ v)
            target = coef.clamp(max=strength) if method == "cap" else torch.full_like(coef, strength)
            act = act + ((target - coef).unsqueeze(-1) * v).to(act.dtype)
        return act

    return edit


def steering_edits(served: ServedModel, features: list[SteerFeature], *, method: str,
                   normalize: bool) -> dict[str, Callable[[Tensor], Tensor]]:
    """{hook point: edit} for `LoadedModel.editing`."""
    by_hook: dict[str, list[tuple[Tensor, float]]] = {}
    for f in features:
        hook, v = direction(served, f.source, f.index)
        if normalize:
            norm = v.norm()
            if not norm > 0:
                raise BadInput(f"{f.source}/{f.index} has a zero direction: it cannot be "
                               "normalized")
            v = v / norm
        by_hook.setdefault(hook, []).append((v, float(f.strength)))
    return {hook: steer_edit(vs, method) for hook, vs in by_hook.items()}


def steer(served: ServedModel, prompt: list[int], features: list[SteerFeature], *,
          method: str = "additive", normalize: bool = False, n_tokens: int, temperature: float,
          seed: int, top_logprobs: int = 0, freq_penalty: float = 0.0
          ) -> tuple[Generation, Generation]:
    """(default, steered): the same generation (same seed) without and with the features.
    Generation stops after the tokenizer's EOS token."""
    edits = steering_edits(served, features, method=method, normalize=normalize)
    eos = served.lm.tokenizer.eos_token_id
    kw = dict(n_tokens=n_tokens, temperature=temperature, seed=seed, top_logprobs=top_logprobs,
              freq_penalty=freq_penalty, stop_ids=() if eos is None else (eos,))
    default = generate(served.lm, prompt, **kw)
    with served.lm.editing(edits):
        steered = generate(served.lm, prompt, **kw)
    return default, steered
