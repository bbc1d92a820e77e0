"""Sparse autoencoders: the three architectures, SAELens-layout load and save, Gemma Scope's
params.npz, and the SAE sources of a harvest.

An SAE reads activations x [..., d_in] at one hook point:
    pre  = norm(x) - b_dec * apply_b_dec_to_input
    h    = (pre @ W_enc + b_enc) * (|W_dec| if rescale_acts_by_decoder_norm)
    f    = ReLU(h) | TopK(k)(h) | ReLU(h) * (h > threshold)    (standard | topk | jumprelu)
    x̂    = unnorm((f / (|W_dec| if rescale_acts_by_decoder_norm)) @ W_dec + b_dec)
with W_enc [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, d_in], b_dec [d_in], |W_dec| [d_sae] the
norms of the decoder rows, and `norm` as SAELens defines normalize_activations (see
`workers.sae_config`, which reads cfg.json and refuses what is not implemented here).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from workers.harvest import SourceSpec
from workers.models import parse_hook_name
from workers.sae_config import UNSCALED_NORMALIZATIONS, SAEConfig, SAEFormatError
from workers.state import SparseCodes

log = logging.getLogger(__name__)

CFG_FILE, WEIGHTS_FILE, METRICS_FILE = "cfg.json", "sae_weights.safetensors", "training_metrics.json"
METRIC_KEYS = ("l0", "variance_explained", "loss_recovered", "dead_fraction", "mse", "ce_clean",
               "ce_spliced", "ce_zero_ablation", "n_tokens_trained")
_SLUG_KIND = {"hook_resid_post": "res", "hook_resid_pre": "res-pre", "hook_mlp_out": "mlp",
              "hook_attn_out": "att", "mlp.hook_post": "mlp-post"}
_GEMMA_SCOPE_KIND = {"res": "hook_resid_post", "mlp": "hook_mlp_out", "att": "attn.hook_z"}


class SAE(nn.Module):
    """One sparse autoencoder. encode: [..., d_in] -> [..., d_sae]; forward: [..., d_in] -> same."""

    def __init__(self, cfg: SAEConfig, *, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        self.cfg = cfg
        kw = dict(device=device, dtype=dtype)
        self.W_enc = nn.Parameter(torch.zeros(cfg.d_in, cfg.d_sae, **kw))
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae, **kw))
        self.W_dec = nn.Parameter(torch.zeros(cfg.d_sae, cfg.d_in, **kw))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in, **kw))
        self.threshold = (nn.Parameter(torch.zeros(cfg.d_sae, **kw))
                          if cfg.architecture == "jumprelu" else None)

    def tensors(self) -> dict[str, Tensor]:
        return {name: getattr(self, name) for name in self.cfg.tensor_names}

    def _normalize(self, x: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
        """x in the SAE's input space, and (scale, shift) to map a reconstruction back."""
        how = self.cfg.normalize_activations
        if how == "constant_norm_rescale":
            coeff = self.cfg.d_in**0.5 / x.norm(dim=-1, keepdim=True)
            return x * coeff, (1 / coeff, torch.zeros_like(coeff))
        if how == "layer_norm":
            mu = x.mean(dim=-1, keepdim=True)
            std = (x - mu).std(dim=-1, keepdim=True)
            return (x - mu) / (std + 1e-5), (std, mu)
        return x, None

    def decoder_norms(self) -> Tensor:
        """[d_sae]: the norm of each decoder row."""
        return self.W_dec.norm(dim=-1)

    def pre_acts(self, x: Tensor) -> Tensor:
        """[..., d_in] -> h [..., d_sae]: one matmul in the SAE's dtype (times the decoder
        norms for a topk SAE with rescale_acts_by_decoder_norm, as SAELens's TopKSAE does)."""
        x, _ = self._normalize(x.to(self.W_enc.dtype))
        if self.cfg.apply_b_dec_to_input:
            x = x - self.b_dec
        lead = x.shape[:-1]
        h = torch.addmm(self.b_enc, x.reshape(-1, self.cfg.d_in), self.W_enc)
        if self.cfg.rescale_acts_by_decoder_norm:
            h = h * self.decoder_norms()
        return h.view(*lead, self.cfg.d_sae)

    def activate(self, h: Tensor) -> Tensor:
        if self.cfg.architecture == "topk":
            top = h.topk(self.cfg.k, dim=-1, sorted=False)
            return torch.zeros_like(h).scatter_(-1, top.indices, top.values.relu())
        if self.cfg.architecture == "jumprelu":
            return h.relu() * (h > self.threshold)
        return h.relu()

    def encode(self, x: Tensor) -> Tensor:
        return self.activate(self.pre_acts(x))

    def encode_sparse(self, x: Tensor) -> SparseCodes:
        """encode's non-zero entries only, for x [..., d_in] flattened to tokens: the same
        values, without the dense [tokens, d_sae] result (a topk SAE never builds it; the other
        architectures read their pre-activations once to find the non-zeros). Every code is
        >= 0 (each architecture ends in a ReLU), so the zeros are all that is left out."""
        h = self.pre_acts(x)
        h = h.reshape(-1, self.cfg.d_sae)
        if self.cfg.architecture == "topk":
            top = h.topk(self.cfg.k, dim=-1, sorted=False)
            val = top.values.relu().flatten()
            tok = torch.arange(h.shape[0], device=h.device).repeat_interleave(self.cfg.k)
            return SparseCodes(h.shape[0], self.cfg.d_sae, tok, top.indices.flatten(), val)
        keep = h > 0
        if self.cfg.architecture == "jumprelu":
            keep &= h > self.threshold
        tok, feat = keep.nonzero(as_tuple=True)
        return SparseCodes(h.shape[0], self.cfg.d_sae, tok, feat, h[tok, feat])

    def decode(self, f: Tensor) -> Tensor:
        """[..., d_sae] -> [..., d_in], in the normalized space (see forward)."""
        if self.cfg.rescale_acts_by_decoder_norm:
            f = f / self.decoder_norms()
        return f @ self.W_dec + self.b_dec

    def output_directions(self) -> Tensor:
        """[d_sae, d_in]: what one unit of each feature's activation adds to the reconstruction
        (W_dec's rows, divided by their norms where the activations carry them)."""
        if self.cfg.rescale_acts_by_decoder_norm:
            return self.W_dec / self.decoder_norms()[:, None]
        return self.W_dec

    def forward(self, x: Tensor) -> Tensor:
        """The reconstruction of x [..., d_in], mapped back through normalize_activations."""
        _, undo = self._normalize(x.to(self.W_enc.dtype))
        out = self.decode(self.encode(x))
        return out if undo is None else out * undo[0] + undo[1]


# ------------------------------------------------------------------ files
def save_sae(sae: SAE, out: str | Path, *, metrics: dict | None = None) -> Path:
    """Write the SAELens layout (cfg.json, sae_weights.safetensors) and training_metrics.json.

    Written into a staging folder, then renamed: `out` never holds a half-written SAE. An existing
    non-empty `out` is refused.
    """
    from safetensors.torch import save_file

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not empty: choose another --out or remove it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".tmp-{out.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        tensors = {k: v.detach().contiguous().cpu() for k, v in sae.tensors().items()}
        save_file(tensors, tmp / WEIGHTS_FILE)
        (tmp / CFG_FILE).write_text(json.dumps(sae.cfg.to_dict(), indent=2))
        if metrics is not None:
            (tmp / METRICS_FILE).write_text(json.dumps({k: metrics[k] for k in METRIC_KEYS},
                                                       indent=2))
        if out.exists():
            out.rmdir()
        os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _build(cfg: SAEConfig, tensors: dict[str, Tensor], where: str, device) -> SAE:
    want = {"W_enc": (cfg.d_in, cfg.d_sae), "b_enc": (cfg.d_sae,), "W_dec": (cfg.d_sae, cfg.d_in),
            "b_dec": (cfg.d_in,), "threshold": (cfg.d_sae,)}
    missing = [n for n in cfg.tensor_names if n not in tensors]
    if missing:
        raise SAEFormatError(f"{where}: missing tensor {', '.join(missing)} (a {cfg.architecture} "
                             f"SAE needs {', '.join(cfg.tensor_names)})")
    for name in cfg.tensor_names:
        if tuple(tensors[name].shape) != want[name]:
            raise SAEFormatError(f"{where}: {name} has shape {tuple(tensors[name].shape)}, expected "
                                 f"{want[name]} for d_in={cfg.d_in}, d_sae={cfg.d_sae}")
    bad = {n: int((~torch.isfinite(tensors[n])).sum()) for n in cfg.tensor_names
           if tensors[n].is_floating_point()}
    bad = {n: k for n, k in bad.items() if k}
    if bad:
        raise SAEFormatError(f"{where}: the weights hold NaN or infinite values (" + ", ".join(
            f"{n}: {k:,}" for n, k in bad.items()) + "); an SAE needs finite weights")
    dtype = tensors["W_enc"].dtype
    sae = SAE(cfg, device=device, dtype=dtype)
    with torch.no_grad():
        for name, param in sae.tensors().items():
            param.copy_(tensors[name])
    return sae.requires_grad_(False)


def _gemma_scope_hook(path: Path) -> str:
    """The hook of a Gemma Scope params.npz, from its hub path (…-res/layer_12/width_16k/…)."""
    text = path.resolve().as_posix()
    layer = re.search(r"layer_(\d+)", text)
    kind = re.search(r"-(res|mlp|att)(?:[-/]|$)", text)
    if not layer:
        raise SAEFormatError(f"{path}: cannot tell the hook point of this params.npz from its path "
                             "(no layer_N folder); pass it as PATH@blocks.N.hook_resid_post")
    return f"blocks.{layer.group(1)}.{_GEMMA_SCOPE_KIND[kind.group(1) if kind else 'res']}"


def split_spec(spec: str | Path) -> tuple[Path, str | None]:
    """'PATH@HOOK' -> (PATH, HOOK); a plain path (even one containing '@') -> (path, None)."""
    text = str(spec)
    if "@" in text and not Path(text).exists():
        text, hook = text.rsplit("@", 1)
        return Path(text), hook
    return Path(text), None


def load_sae(spec: str | Path, *, device: str | torch.device = "cpu") -> SAE:
    """An SAELens folder, a Gemma Scope params.npz (or a folder holding one), optionally with the
    hook point given as `PATH@HOOK` (required for a params.npz outside Gemma Scope's layout)."""
    path, hook = split_spec(spec)
    if path.is_dir() and (path / CFG_FILE).is_file():
        try:
            raw = json.loads((path / CFG_FILE).read_text())
            cfg = SAEConfig.from_dict({**raw, **({"hook_name": hook} if hook else {})})
        except (json.JSONDecodeError, SAEFormatError, TypeError, ValueError) as exc:
            raise SAEFormatError(f"{path / CFG_FILE}: {exc}") from exc
        weights = path / WEIGHTS_FILE
        if not weights.is_file():
            raise SAEFormatError(f"{path}: missing {WEIGHTS_FILE} next to {CFG_FILE}")
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            tensors = load_file(weights)
        except (SafetensorError, OSError) as exc:
            raise SAEFormatError(f"{weights}: not a readable safetensors file ({exc}); is it "
                                 "truncated?") from None
        return _build(cfg, tensors, str(weights), device)
    npz = path / "params.npz" if path.is_dir() else path
    if npz.is_file() and npz.suffix == ".npz":
        with np.load(npz) as data:
            arrays = {k.lower(): torch.from_numpy(np.array(data[k])) for k in data.files}
        tensors = {name: arrays[name.lower()] for name in ("W_enc", "b_enc", "W_dec", "b_dec",
                                                            "threshold") if name.lower() in arrays}
        if "W_enc" not in tensors:
            raise SAEFormatError(f"{npz}: missing tensor W_enc (Gemma Scope params.npz holds W_enc, "
                                 "b_enc, W_dec, b_dec, threshold)")
        d_in, d_sae = tensors["W_enc"].shape
        cfg = SAEConfig(d_in=d_in, d_sae=d_sae, hook_name=hook or _gemma_scope_hook(npz),
                        architecture="jumprelu", apply_b_dec_to_input=False,
                        extra={"format": "gemma-scope", "model_name": None})
        return _build(cfg, tensors, str(npz), device)
    raise SAEFormatError(f"{spec}: not an SAE: expected a folder with {CFG_FILE} and "
                         f"{WEIGHTS_FILE} (SAELens layout) or a Gemma Scope params.npz")


# ------------------------------------------------------------------ harvest sources
def source_slug(hook_name: str, d_sae: int) -> str:
    """'blocks.6.hook_resid_post', 4096 -> '6-res-sae-4k'; 96 -> '6-res-sae-96'."""
    layer, kind = parse_hook_name(hook_name)
    size = f"{d_sae // 1024}k" if d_sae % 1024 == 0 else str(d_sae)
    return f"{layer}-{_SLUG_KIND[kind]}-sae-{size}"


def sae_weights_sha256(path: Path) -> str:
    """sha256 of the weights file of an SAE given as a folder or a file (what a source records,
    so that live inference can check it loads the same SAE)."""
    folder = path if path.is_dir() else path.parent
    weights = path if path.is_file() else (
        folder / WEIGHTS_FILE if (folder / CFG_FILE).is_file() else folder / "params.npz")
    return _sha256(weights)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_metrics(folder: Path) -> dict | None:
    path = Path(folder) / METRICS_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def sae_sources(lm, specs: list[str], *, device: str | torch.device = "cpu") -> list[SourceSpec]:
    """One harvest source per SAE, checked against the model (hook point and d_in)."""
    from workers.models import UnknownHookPoint

    out: list[SourceSpec] = []
    for spec in specs:
        sae = load_sae(spec, device=device)
        cfg, where = sae.cfg, str(spec)
        if cfg.normalize_activations in UNSCALED_NORMALIZATIONS:
            log.warning("%s: normalize_activations is %s: like SAELens, the activations are "
                        "encoded as they are (its statistics are not in the files; SAELens folds "
                        "them into the weights when training ends)", where,
                        cfg.normalize_activations)
        try:
            dim = lm.hook_shape_dim(cfg.hook_name)
        except UnknownHookPoint as exc:
            raise SAEFormatError(f"{where}: its hook_name {cfg.hook_name!r} does not fit "
                                 f"{lm.slug}: {exc}") from exc
        if dim != cfg.d_in:
            raise SAEFormatError(f"{where}: d_in is {cfg.d_in} but {cfg.hook_name} of {lm.slug} "
                                 f"has dimension {dim}: this SAE was trained on another model")
        sae = sae.to(device=device, dtype=lm.dtype)
        base = source_slug(cfg.hook_name, cfg.d_sae)
        taken = {s.slug for s in out}
        slug, n = base, 2
        while slug in taken:  # a second SAE of the same size at the same hook point
            slug, n = f"{base}-{n}", n + 1
        layer, kind = parse_hook_name(cfg.hook_name)

        def directions(sae=sae, layer=layer, kind=kind) -> Tensor:
            w = sae.output_directions().detach().float()
            return w @ lm.mlp_out_directions(layer).to(w.device) if kind == "mlp.hook_post" else w

        path = split_spec(spec)[0]
        folder = path if path.is_dir() else path.parent
        out.append(SourceSpec(
            slug=slug, kind="sae", hook_name=cfg.hook_name, layer=layer, n_features=cfg.d_sae,
            bottom=False, encode=sae.encode, encode_sparse=sae.encode_sparse,
            directions=directions,
            sae_config={**cfg.to_dict(), "metrics": read_metrics(folder),
                        "path": str(path.resolve()), "sha256": sae_weights_sha256(path)}))
    return out
