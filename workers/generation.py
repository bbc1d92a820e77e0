"""Text generation with a KV cache: seeded sampling (greedy at temperature 0), each token's
log-probability and the top alternatives.

Edits to the model's activations (steering) apply when the caller runs `generate` inside
`LoadedModel.editing`: the prompt's pass and every generated token's pass go through the hooks,
and the cached keys and values are the edited ones, so every position is edited exactly once.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch

from app.inference_errors import BadInput, TooLong
from workers.models import LoadedModel


@dataclass
class Generation:
    """The tokens a model generated after a prompt, and how likely it found each."""

    ids: list[int]
    logprobs: list[float]
    """log p(token) under the model's own distribution (temperature 1, no penalty)"""
    top_ids: list[list[int]] = field(default_factory=list)
    """per token, the most likely tokens at that step, most likely first"""
    top_logprobs: list[list[float]] = field(default_factory=list)


def context_length(lm: LoadedModel) -> int | None:
    """The longest sequence the model takes (its position embeddings), where its config says."""
    cfg = lm.hf_model.config
    return getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)


def check_room(lm: LoadedModel, n_prompt: int, n_tokens: int) -> None:
    """TooLong when the prompt and the tokens to generate do not fit the model's context."""
    room = context_length(lm)
    if room is not None and n_prompt + n_tokens > room:
        raise TooLong(f"the prompt ({n_prompt} tokens) and {n_tokens} tokens to generate are "
                      f"over the {room} positions {lm.slug} takes")


def _cache_arg(model) -> str:
    """The keyword a causal LM takes its KV cache by (`cache` in recent transformers)."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def generate(lm: LoadedModel, prompt: list[int], *, n_tokens: int, temperature: float, seed: int,
             top_logprobs: int = 0, freq_penalty: float = 0.0,
             stop_ids: tuple[int, ...] = ()) -> Generation:
    """Up to `n_tokens` tokens after `prompt` (token ids), stopping after one of `stop_ids`.

    Each step samples from softmax((logits - freq_penalty * count) / temperature) with a
    torch.Generator seeded with `seed` (the same arguments give the same tokens), or takes the
    argmax (the lowest id among ties) at temperature 0; `count` is how often each token occurs
    in the prompt and the tokens so far. The log-probabilities reported are the model's own.
    """
    if not prompt:
        raise BadInput("the prompt has no tokens")
    if n_tokens < 1 or temperature < 0:
        raise BadInput("n_tokens must be at least 1 and temperature at least 0")
    check_room(lm, len(prompt), n_tokens)
    model, device = lm.hf_model, lm.device
    gen = torch.Generator(device=device).manual_seed(seed)
    key = _cache_arg(model)
    counts = torch.zeros(lm.vocab_size, dtype=torch.float32, device=device)
    counts.index_add_(0, torch.tensor(prompt, device=device),
                      torch.ones(len(prompt), device=device))
    out = Generation([], [])
    with torch.inference_mode():
        step = model(input_ids=torch.tensor([prompt], device=device), use_cache=True,
                     logits_to_keep=1)
        for _ in range(n_tokens):
            logits = step.logits[0, -1].float()
            logp = torch.log_softmax(logits, dim=-1)
            scores = logits - freq_penalty * counts if freq_penalty else logits
            if temperature == 0:
                tok = int(torch.argmax(scores))
            else:
                probs = torch.softmax(scores / temperature, dim=-1)
                tok = int(torch.multinomial(probs, 1, generator=gen))
            out.ids.append(tok)
            out.logprobs.append(float(logp[tok]))
            if top_logprobs:
                top = torch.topk(logp, top_logprobs)
                out.top_ids.append(top.indices.tolist())
                out.top_logprobs.append(top.values.tolist())
            counts[tok] += 1
            if tok in stop_ids or len(out.ids) == n_tokens:
                break
            cache = step["cache"] if "cache" in step else step["past_key_values"]
            step = model(input_ids=torch.tensor([[tok]], device=device), use_cache=True,
                         **{key: cache})
    return out
