"""Attention heads as sources: their patterns, their examples and their corpus metrics in a pass.

The heads of layer L are the source `{L}-attn` (kind `heads`) read at `blocks.{L}.attn.hook_pattern`;
its features are the layer's query heads. A head's value at a query token is the largest weight
it gives one key other than the BOS key, so the harvest's ranking of per-sequence peaks picks, per
head, the sequences with the largest attention from one query to one key. Each kept example's
window holds the attention row of its peak query (not the per-query maxima), followed by three
extra values the store does not keep in the record: the weight on the BOS key, and the peak key's
position as (pos // 2048, pos % 2048), exact in float16.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import lru_cache

import torch
from torch import Tensor

from workers.accumulate import Accumulator, window_start
from workers.harvest import SourceSpec
from workers.state import batch_reduce

HEAD_ARCHITECTURES = ("gpt2", "llama", "mistral", "qwen2", "qwen3")
"""Architectures whose patterns this module recomputes (plain causal softmax attention)."""
EXTRAS = 3
"""Values kept after each head example's window: BOS weight, peak key // 2048, % 2048."""
DIST_BINS = 13
"""Attention distance bins: 0, 1, 2-3, 4-7, ..., 2048 and more."""
METRIC_SUMS = ("previous-token", "self", "bos-sink", "distance", "entropy")


def pattern_hook(layer: int) -> str:
    return f"blocks.{layer}.attn.hook_pattern"


def distance_bins() -> list[list[int]]:
    """[lo, hi] (inclusive; hi -1: no end) of each attention distance bin."""
    return [[0, 0]] + [[1 << (i - 1), (1 << i) - 1] for i in range(1, DIST_BINS - 1)] + [
        [1 << (DIST_BINS - 2), -1]]


def distance_bin(d: Tensor) -> Tensor:
    """The bin of each distance d >= 0 (see distance_bins)."""
    bits = torch.where(d > 0, torch.floor(torch.log2(d.clamp(min=1).double())).long() + 1, 0)
    return bits.clamp(max=DIST_BINS - 1)


def _apply_rope(module: torch.nn.Module, q: Tensor, k: Tensor, kwargs: dict) -> tuple[Tensor, Tensor]:
    """RoPE as the model's own module applies it, from the cos and sin its layer was given."""
    cos, sin = kwargs["position_embeddings"]
    return sys.modules[type(module).__module__].apply_rotary_pos_emb(q, k, cos, sin)


def attention_pattern(lm, module: torch.nn.Module, proj: dict[str, Tensor], kwargs: dict
                      ) -> Tensor:
    """The attention probabilities [batch, n_heads, query, key] (float32) of one call of an
    attention module, from what its projections gave (`proj`: GPT-2's `qkv`, else `q` and `k`)
    with its own RoPE and scaling; grouped key/value heads serve their query heads as in the
    model."""
    dh = lm.d_head
    if lm.arch == "gpt2":
        qkv = proj["qkv"]
        b, t, _ = qkv.shape
        q, k, _v = qkv.split(module.split_size, dim=2)
        q, k = (x.view(b, t, -1, dh).transpose(1, 2) for x in (q, k))
    else:
        b, t, _ = proj["q"].shape
        q, k = (proj[x].view(b, t, -1, dh) for x in ("q", "k"))
        if getattr(module, "q_norm", None) is not None:
            q, k = module.q_norm(q), module.k_norm(k)
        q, k = _apply_rope(module, q.transpose(1, 2), k.transpose(1, 2), kwargs)
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    scores = (q.float() @ k.float().transpose(-1, -2)) * module.scaling
    future = torch.ones(t, t, dtype=torch.bool, device=q.device).triu(1)
    return scores.masked_fill(future, float("-inf")).softmax(-1)


def pattern_specs(lm, layer: int, deliver: Callable[[Tensor], None]) -> list[tuple]:
    """Hook specs (module, how, fn) for LoadedModel._hooks that hand deliver() the attention
    pattern of `layer` on every pass: the outputs of its query and key projections are kept as
    they pass (nothing is computed twice), the pattern made when the attention module returns."""
    attn = lm._attn(layer)
    projs = {"qkv": attn.c_attn} if lm.arch == "gpt2" else {"q": attn.q_proj, "k": attn.k_proj}
    seen: dict[str, Tensor] = {}

    def keep(name: str) -> Callable:
        def hook(module, args, out):
            seen[name] = out
        return hook

    def done(module, args, kwargs, output):
        pattern = attention_pattern(lm, module, seen, kwargs)
        seen.clear()
        deliver(pattern)

    return [*((m, "out", keep(n)) for n, m in projs.items()), (attn, "call", done)]


def head_sources(lm, layers: list[int]) -> list[SourceSpec]:
    if layers and lm.arch not in HEAD_ARCHITECTURES:
        from workers.runner import PlanError

        raise PlanError(f"attention heads are harvested on {', '.join(HEAD_ARCHITECTURES)}; "
                        f"{lm.slug} is {lm.arch}")
    return [SourceSpec(slug=f"{layer}-attn", kind="heads", hook_name=pattern_hook(layer),
                       layer=layer, n_features=lm.n_heads, bottom=False) for layer in layers]


@lru_cache(maxsize=8)
def _geometry(t: int, q0: int, device: str) -> tuple[Tensor, Tensor]:
    """For queries q0..t-1 and keys 0..t-1: the distance q - k (0 for future keys) [nq, t],
    and its distance bin one-hot, flattened [nq * t, DIST_BINS]."""
    qpos = torch.arange(q0, t, device=device)
    dist = (qpos[:, None] - torch.arange(t, device=device)[None, :]).clamp(min=0)
    onehot = torch.nn.functional.one_hot(distance_bin(dist), DIST_BINS).float()
    return dist.float(), onehot.view(-1, DIST_BINS)


def metric_sums(pattern: Tensor, tokens: Tensor, q0: int, k0: int) -> dict[str, Tensor]:
    """The per-head sums over queries q0.. of one batch's metrics (float64, [H]; the distance
    histogram [H, DIST_BINS]), and `queries` and `dup-queries` (how many queries, and how many
    of those whose token occurred before, at a key >= k0). pattern [b, H, T, T], tokens [b, T]."""
    b, h, t, _ = pattern.shape
    p = pattern[:, :, q0:, :]
    dist, onehot = _geometry(t, q0, str(pattern.device))
    kpos = torch.arange(t, device=pattern.device)
    qpos = kpos[q0:]
    same = (tokens[:, q0:, None] == tokens[:, None, :]) & (kpos[None, None, :] < qpos[None, :, None])
    same &= kpos[None, None, :] >= k0
    summed = p.sum(0)  # the metrics linear in the pattern, summed over the batch first
    f64 = torch.float64
    out = {
        "previous-token": pattern.diagonal(-1, 2, 3)[..., q0 - 1:].sum(dim=(0, 2), dtype=f64),
        "self": pattern.diagonal(0, 2, 3)[..., q0:].sum(dim=(0, 2), dtype=f64),
        "bos-sink": p[..., 0].sum(dim=(0, 2), dtype=f64),
        "distance": (summed * dist).sum(dim=(1, 2), dtype=f64),
        "entropy": -torch.special.xlogy(p, p).sum(dim=(0, 2, 3), dtype=f64),
        "duplicate-token": (p.reshape(b, h, -1) @ same.reshape(b, -1, 1).to(p.dtype)).sum(
            dim=(0, 2), dtype=f64),
        "distance-hist": (summed.reshape(h, -1) @ onehot).double(),
        "queries": torch.tensor([b * (t - q0)], dtype=f64, device=pattern.device),
        "dup-queries": same.any(-1).sum().double().reshape(1),
    }
    return out


_control: list = [None, None, None]
"""The last batch's tokens, settings and control sums: every layer's heads source of a batch
shares them (they depend on the tokens, not on the layer)."""


def control_sums(tokens: Tensor, q0: int, k0: int) -> dict[str, Tensor]:
    """metric_sums of uniform causal attention on these tokens, computed once per batch."""
    last, settings, sums = _control
    if settings != (q0, k0) or last is None or last.shape != tokens.shape or \
            last.device != tokens.device or not torch.equal(last, tokens):
        b, t = tokens.shape
        sums = metric_sums(uniform_pattern(t, tokens.device).expand(b, 1, t, t), tokens, q0, k0)
        _control[:] = [tokens, (q0, k0), sums]
    return sums


def uniform_pattern(t: int, device) -> Tensor:
    """Causal uniform attention [1, 1, t, t]: the control every metric is shown beside."""
    causal = torch.ones(t, t, device=device).tril()
    return (causal / causal.sum(-1, keepdim=True))[None, None]


class HeadAccumulator(Accumulator):
    """The Accumulator of a heads source: takes patterns [batch, H, T, T]; ranks the per-query
    maxima over non-BOS keys (queries from 1), keeps each example's peak-query row, and sums the
    corpus metrics of every head and of the uniform control (state.sums, `control:` names)."""

    def __init__(self, n_features: int, *, corpus: Tensor, bos_key: bool, **kw):
        kw.update(first=max(kw["first"], 1), reduce_fn=batch_reduce, sync_free=False,
                  native=False)
        super().__init__(n_features, **kw)
        self.corpus = corpus
        self.k0 = 1 if bos_key else 0
        self.width = self.window + EXTRAS
        self._pattern: Tensor | None = None

    def update(self, pattern: Tensor, seq0: int) -> None:
        b, _, t, _ = pattern.shape
        tokens = self.corpus[seq0:seq0 + b].to(pattern.device)
        rowmax = pattern[..., self.k0:].amax(-1) if self.k0 < t else pattern[..., 0] * 0
        self._pattern = pattern
        try:
            super().update(rowmax.transpose(1, 2).contiguous(), seq0)
        finally:
            self._pattern = None
        sums = metric_sums(pattern, tokens, self.first, self.k0)
        control = control_sums(tokens, self.first, self.k0)
        sums.update({f"control:{k}": v for k, v in control.items()})
        for name, v in sums.items():
            have = self.state.sums.get(name)
            self.state.sums[name] = v if have is None else have + v

    def _cut(self, acts: Tensor, b: Tensor, feats: Tensor, pos: Tensor) -> Tensor:
        rows = self._pattern[b, feats, pos]  # [n, T]: each entering example's peak-query row
        start = window_start(pos, rows.shape[1], self.window)
        win = rows.gather(1, start[:, None] + torch.arange(self.window, device=rows.device))
        key = rows[:, self.k0:].argmax(1) + self.k0
        extra = torch.stack([rows[:, 0], (key // 2048).float(), (key % 2048).float()], 1)
        return torch.cat([win, extra], 1).to(torch.float16)
