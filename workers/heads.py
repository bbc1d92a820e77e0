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


def attention_pattern(lm, module: torch.nn.Module, args: tuple, kwargs: dict) -> Tensor:
    """The attention probabilities [batch, n_heads, query, key] (float32) of one attention
    module's call, recomputed from its input with its own projections, RoPE and scaling (grouped
    key/value heads are shared by their query heads as the model shares them)."""
    h = args[0] if args else kwargs["hidden_states"]
    b, t, _ = h.shape
    dh = lm.d_head
    if lm.arch == "gpt2":
        q, k, _v = module.c_attn(h).split(module.split_size, dim=2)
        q, k = (x.view(b, t, -1, dh).transpose(1, 2) for x in (q, k))
    else:
        q, k = (proj(h).view(b, t, -1, dh) for proj in (module.q_proj, module.k_proj))
        if getattr(module, "q_norm", None) is not None:
            q, k = module.q_norm(q), module.k_norm(k)
        q, k = _apply_rope(module, q.transpose(1, 2), k.transpose(1, 2), kwargs)
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    scores = (q.float() @ k.float().transpose(-1, -2)) * module.scaling
    future = torch.ones(t, t, dtype=torch.bool, device=h.device).triu(1)
    return scores.masked_fill(future, float("-inf")).softmax(-1)


def head_sources(lm, layers: list[int]) -> list[SourceSpec]:
    if layers and lm.arch not in HEAD_ARCHITECTURES:
        from workers.runner import PlanError

        raise PlanError(f"attention heads are harvested on {', '.join(HEAD_ARCHITECTURES)}; "
                        f"{lm.slug} is {lm.arch}")
    return [SourceSpec(slug=f"{layer}-attn", kind="heads", hook_name=pattern_hook(layer),
                       layer=layer, n_features=lm.n_heads, bottom=False) for layer in layers]


def metric_sums(pattern: Tensor, tokens: Tensor, q0: int, k0: int) -> dict[str, Tensor]:
    """The per-head sums over queries q0.. of one batch's metrics (float64, [H]; the distance
    histogram [H, DIST_BINS]), and `queries` and `dup-queries` (how many queries, and how many
    of those whose token occurred before, at a key >= k0). pattern [b, H, T, T], tokens [b, T]."""
    b, _, t, _ = pattern.shape
    p = pattern[:, :, q0:, :]
    qpos = torch.arange(q0, t, device=pattern.device)
    kpos = torch.arange(t, device=pattern.device)
    dist = (qpos[:, None] - kpos[None, :]).clamp(min=0)
    onehot = torch.nn.functional.one_hot(distance_bin(dist), DIST_BINS).to(p.dtype)
    same = (tokens[:, q0:, None] == tokens[:, None, :]) & (kpos[None, None, :] < qpos[None, :, None])
    same &= kpos[None, None, :] >= k0
    has = same.any(-1)  # [b, nq]
    per_query = {
        "previous-token": pattern.diagonal(-1, 2, 3)[..., q0 - 1:],
        "self": pattern.diagonal(0, 2, 3)[..., q0:],
        "bos-sink": p[..., 0],
        "distance": (p * dist).sum(-1),
        "entropy": -(p * p.clamp_min(1e-30).log()).sum(-1),
        "duplicate-token": (p * same[:, None]).sum(-1) * has[:, None],
    }
    out = {name: v.sum(dim=(0, 2), dtype=torch.float64) for name, v in per_query.items()}
    out["distance-hist"] = torch.einsum("bhqk,qkn->hn", p, onehot).double()
    n = torch.tensor([b * (t - q0)], dtype=torch.float64, device=pattern.device)
    out["queries"] = n
    out["dup-queries"] = has.sum().double().reshape(1)
    return out


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
        control = metric_sums(uniform_pattern(t, pattern.device).expand(b, 1, t, t), tokens,
                              self.first, self.k0)
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
