"""What a heads source adds when it is finalized: the induction score on repeated random tokens,
the OV circuit through the unembedding, and the per-head metrics JSON the store keeps.

Metric definitions (per head; means over every query from position 1, the BOS query excluded):
previous-token = weight on key q-1; self = weight on key q; bos-sink = weight on key 0;
distance = sum_k weight(k) * (q - k), with the attention mass per distance bin as its histogram;
entropy = -sum_k w log w (nats); duplicate-token = weight on earlier keys holding the query's own
token, over the queries whose token occurred before; induction = on sequences [BOS] + r + r of
random tokens, the weight from each token of the second copy on the token after its first
occurrence. Each comes with its control: the same metric of uniform causal attention.
The copying score is Elhage et al.'s: sum(eigenvalues) / sum(|eigenvalues|) of the full OV
circuit W_E W_V W_O W_U (final norm folded in as direct logit attribution folds it), in [-1, 1].
"""

from __future__ import annotations

import torch
from torch import Tensor

from workers.accumulate import window_start
from workers.finalize import N_LOGITS, _sig
from workers.heads import EXTRAS, METRIC_SUMS, distance_bins, pattern_hook, uniform_pattern

INDUCTION_SEQUENCES = 8
INDUCTION_MAX_HALF = 64
HOVER_EXAMPLES = 5
"""Top examples per head whose every query's attention row is stored (attention_rows)."""
REPLAY_CHUNK = 16


def induction_tokens(lm, seq_len: int, bos_id: int | None, seed: int) -> tuple[Tensor, int]:
    """[INDUCTION_SEQUENCES, first + 2 L] repeated random tokens ([BOS] + r + r) and L."""
    first = 0 if bos_id is None else 1
    half = min(INDUCTION_MAX_HALF, (seq_len - first) // 2)
    gen = torch.Generator().manual_seed(seed)
    r = torch.randint(0, lm.vocab_size, (INDUCTION_SEQUENCES, half), generator=gen)
    parts = [r, r] if bos_id is None else [torch.full((INDUCTION_SEQUENCES, 1), bos_id), r, r]
    return torch.cat(parts, 1), half


def induction_score(pattern: Tensor, half: int, first: int) -> Tensor:
    """Per head [H]: mean weight from position first + half + i to first + i + 1."""
    q = torch.arange(first + half, first + 2 * half, device=pattern.device)
    return pattern[:, :, q, q - half + 1].mean(dim=(0, 2), dtype=torch.float64)


def induction_scores(lm, layers: list[int], seq_len: int, bos_id: int | None, seed: int
                     ) -> tuple[dict[int, Tensor], float]:
    """{layer: induction score per head} and the uniform control's score."""
    ids, half = induction_tokens(lm, seq_len, bos_id, seed)
    first = 0 if bos_id is None else 1
    out: dict[int, Tensor] = {}
    hooks = {pattern_hook(layer): layer for layer in layers}
    lm.run_with_hooks(ids.to(lm.device), list(hooks), lambda name, p: out.__setitem__(
        hooks[name], induction_score(p, half, first).cpu()))
    control = induction_score(uniform_pattern(ids.shape[1], "cpu"), half, first)
    return out, float(control[0])


def ov_weights(lm, layer: int) -> tuple[Tensor, Tensor, int]:
    """W_V [H, d_model, d_head] and W_O [H, d_head, d_model] of every query head (float32; a
    grouped value head repeated for each query head that shares it), and how many query heads
    share each value head."""
    attn, h, dh, d = lm._attn(layer), lm.n_heads, lm.d_head, lm.d_model
    if lm.arch == "gpt2":  # Conv1D weights are [in, out]
        wv = attn.c_attn.weight[:, 2 * d:].float().view(d, h, dh).permute(1, 0, 2)
        return wv, attn.c_proj.weight.float().view(h, dh, d), 1
    v = attn.v_proj.weight.float()  # [kv * dh, d]
    group = h * dh // v.shape[0]
    wv = v.T.reshape(d, -1, dh).permute(1, 0, 2).repeat_interleave(group, 0)
    return wv, attn.o_proj.weight.float().T.reshape(h, dh, d), group


def ov_circuit(lm, layer: int, unembed: Tensor, embed_unembed: Tensor) -> tuple[Tensor, Tensor]:
    """Per head: the OV circuit's diagonal [H, vocab] (how much attending to token t raises t's
    own logit) and the copying score [H]. unembed: direct logit attribution of each residual
    basis vector [d_model, vocab]; embed_unembed: unembed @ W_E [d_model, d_model]."""
    wv, wo, group = ov_weights(lm, layer)
    wv, wo = wv.to(unembed.device), wo.to(unembed.device)
    embed = lm.hf_model.get_input_embeddings().weight.float()
    values = [embed @ wv[g * group] for g in range(len(wv) // group)]  # one per value head
    diag = torch.stack([(values[i // group] * (wo[i] @ unembed).T).sum(1)
                        for i in range(len(wv))])
    eig = torch.linalg.eigvals((wo @ embed_unembed @ wv).double())
    return diag, (eig.real.sum(-1) / eig.abs().sum(-1).clamp_min(1e-300)).float()


def unembedding(lm) -> tuple[Tensor, Tensor]:
    """(unembed, embed_unembed) for ov_circuit."""
    with torch.inference_mode():
        unembed = lm.logit_effects(torch.eye(lm.d_model, device=lm.device))
        embed = lm.hf_model.get_input_embeddings().weight.float()
        return unembed, unembed @ embed


def ov_logit_tables(diag: Tensor, k: int = N_LOGITS) -> tuple[list, list]:
    """The top and bottom k tokens of each head's OV diagonal, as logit_tables gives them."""
    out = []
    for largest in (True, False):
        v, i = diag.topk(k, dim=1, largest=largest)
        out.append([[[t, _sig(x)] for t, x in zip(ti, tv, strict=True)]
                    for ti, tv in zip(i.tolist(), v.tolist(), strict=True)])
    return out[0], out[1]


def _mean(sums: dict[str, Tensor], name: str, prefix: str = "") -> list[float]:
    n = sums[prefix + ("dup-queries" if name == "duplicate-token" else "queries")]
    return (sums[prefix + name] / n.clamp_min(1)).tolist()


def metrics_json(sums: dict[str, Tensor], induction: Tensor, induction_control: float,
                 copying: Tensor) -> dict:
    """The head_metrics JSON of one heads source, from its state's sums."""
    names = [*METRIC_SUMS, "duplicate-token"]
    metrics = {name: _mean(sums, name) for name in names}
    controls = {name: _mean(sums, name, "control:")[0] for name in names}
    metrics["induction"] = induction.tolist()
    controls["induction"] = induction_control
    metrics["copying"] = copying.tolist()
    controls["copying"] = 0.0
    hist = sums["distance-hist"]
    return {"metrics": metrics, "controls": controls, "distance_bins": distance_bins(),
            "distance_hist": (hist / hist.sum(1, keepdim=True).clamp_min(1e-300)).tolist()}


def split_extras(state, window: int) -> dict[str, Tensor]:
    """Cut the EXTRAS off every ranking's windows (in place): {ranking: [size, H, EXTRAS]}."""
    extras = {}
    for name, r in state.rankings().items():
        extras[name] = r.windows[..., window:window + EXTRAS].float()
        r.windows = r.windows[..., :window].contiguous()
    return extras


def example_extras(extras: Tensor, score: Tensor) -> list[list[list[float]]]:
    """Per head, [bos weight, peak key] of each example of a ranking that holds one."""
    key = (extras[..., 1] * 2048 + extras[..., 2]).round().long()
    out = []
    for h in range(extras.shape[1]):
        ok = torch.isfinite(score[:, h])
        out.append([[float(b), int(k)] for b, k in zip(extras[ok, h, 0].tolist(),
                                                      key[ok, h].tolist(), strict=True)])
    return out


def attention_rows(lm, layer: int, tokens: Tensor, top, window: int,
                   k: int = HOVER_EXAMPLES) -> list[tuple]:
    """(head, rank, window, data) of the first k top examples of every head of `layer`: data
    holds the attention row of each query of the example's window over the window's keys,
    [window, window] float16, from replaying the examples' sequences once."""
    ok = torch.isfinite(top.score[:k])
    wanted = sorted(set(top.seq[:k][ok].tolist()))
    t = tokens.shape[1]
    rows: dict[tuple[int, int], bytes] = {}
    for i in range(0, len(wanted), REPLAY_CHUNK):
        chunk = wanted[i:i + REPLAY_CHUNK]
        got: list[Tensor] = []
        lm.run_with_hooks(tokens[chunk].to(lm.device), [pattern_hook(layer)],
                          lambda name, p, got=got: got.append(p))
        where = {s: j for j, s in enumerate(chunk)}
        for rank, head in ok.nonzero().tolist():
            seq = int(top.seq[rank, head])
            if seq in where:
                start = int(window_start(top.pos[rank, head].long(), t, window))
                block = got[0][where[seq], head, start:start + window, start:start + window]
                rows[head, rank] = block.half().cpu().numpy().astype("<f2").tobytes()
    return [(h, r, window, data) for (h, r), data in sorted(rows.items())]


def finalize_heads(spec, state, *, lm, dataset, cfg):
    """finalize_source for a heads source: the OV circuit's tokens as its logits, and the
    metrics JSON (with the BOS weight and peak key of every top example) as head_metrics.
    What every layer shares is computed once per model and kept on it: the unembedding
    products, and the induction scores of all layers (one pass)."""
    from workers.finalize import finalize_source

    window = state.top.windows.shape[-1] - EXTRAS
    extras = split_extras(state, window)
    bos_id = int(dataset.tokens[0, 0]) if dataset.bos_policy == "bos-prepended" else None
    shared = lm.__dict__.setdefault("_head_shared", {})
    with torch.inference_mode():
        if "unembedding" not in shared:
            shared["unembedding"] = unembedding(lm)
        key = ("induction", dataset.seq_len, bos_id, cfg.seed)
        if key not in shared:
            shared[key] = induction_scores(lm, list(range(lm.n_layers)), dataset.seq_len,
                                           bos_id, cfg.seed)
        diag, copying = ov_circuit(lm, spec.layer, *shared["unembedding"])
    induction, control = shared[key]
    res = finalize_source(spec, state, lm=lm, dataset=dataset, cfg=cfg,
                          logits=ov_logit_tables(diag.cpu()))
    details = metrics_json(state.sums, induction[spec.layer], control, copying.cpu())
    details["top_examples"] = example_extras(extras["top"], state.top.score)
    res.head_metrics = details
    with torch.inference_mode():
        res.attention_rows = attention_rows(lm, spec.layer, dataset.tokens, state.top, window)
    return res
