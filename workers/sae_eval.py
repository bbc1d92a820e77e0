"""An SAE spliced into its model: reconstruction metrics and the cross-entropy it recovers.

The SAE's reconstruction replaces the activation at its hook point in a full forward pass; the
next-token cross-entropy is compared with the clean model's and with the hook zero-ablated:
loss recovered = (CE_zero - CE_spliced) / (CE_zero - CE_clean).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import Tensor

from workers.sae import SAE


def splice(lm, hook_name: str, fn: Callable[[Tensor], Tensor]):
    """Replace the activation at hook_name by fn(act) in every forward pass inside the block."""
    return lm.editing({hook_name: fn})


@torch.inference_mode()
def evaluate(lm, sae: SAE, tokens: Tensor, *, first: int, batch_size: int) -> dict[str, float]:
    """Reconstruction (mse, variance explained, l0) and next-token cross-entropy of the clean
    model, with the SAE spliced in and with the hook zero-ablated, on tokens [n, seq].
    Positions before `first` (the BOS) are left untouched."""
    acc = dict.fromkeys(("se", "sumsq", "l0", "n", "ce_clean", "ce_spliced", "ce_zero", "n_ce"), 0.0)
    d = sae.cfg.d_in
    s = torch.zeros(d, dtype=torch.float64, device=lm.device)

    def recon(act: Tensor) -> Tensor:
        x = act[:, first:].float()
        f = sae.encode(x)
        x_hat = sae(x)
        acc["se"] += float((x_hat - x).double().pow(2).sum())
        acc["sumsq"] += float(x.double().pow(2).sum())
        acc["l0"] += float((f > 0).sum())
        acc["n"] += x.shape[0] * x.shape[1]
        s.add_(x.double().sum((0, 1)))
        return torch.cat([act[:, :first], x_hat.to(act.dtype)], dim=1)

    def zero(act: Tensor) -> Tensor:
        return torch.cat([act[:, :first], torch.zeros_like(act[:, first:])], dim=1)

    for b0 in range(0, tokens.shape[0], batch_size):
        ids = tokens[b0:b0 + batch_size].to(lm.device)
        for key, fn in (("ce_clean", None), ("ce_spliced", recon), ("ce_zero", zero)):
            with splice(lm, sae.cfg.hook_name, fn) if fn else nullcontext():
                logits = lm.hf_model(input_ids=ids, use_cache=False).logits
            acc[key] += float(F.cross_entropy(logits[:, :-1].flatten(0, 1).float(),
                                              ids[:, 1:].flatten(), reduction="sum"))
        acc["n_ce"] += ids[:, 1:].numel()
    n = max(acc["n"], 1)
    total_var = acc["sumsq"] - float(s.pow(2).sum()) / n
    ce = {k: acc[k] / acc["n_ce"] for k in ("ce_clean", "ce_spliced", "ce_zero")}
    gap = ce["ce_zero"] - ce["ce_clean"]
    return {"mse": acc["se"] / (n * d), "variance_explained": 1 - acc["se"] / max(total_var, 1e-12),
            "l0": acc["l0"] / n, "ce_clean": ce["ce_clean"], "ce_spliced": ce["ce_spliced"],
            "ce_zero_ablation": ce["ce_zero"],
            "loss_recovered": (ce["ce_zero"] - ce["ce_spliced"]) / gap if abs(gap) > 1e-9 else None}
