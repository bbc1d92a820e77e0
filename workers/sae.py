"""Sparse autoencoders: the three architectures, SAELens-layout load and save, Gemma Scope's
params.npz, and the SAE sources of a harvest.

An SAE reads activations x [..., d_in] at one hook point:
    pre  = norm(x) - b_dec * apply_b_dec_to_input
    h    = pre @ W_enc + b_enc                      W_enc [d_in, d_sae], b_enc [d_sae]
    f    = ReLU(h) | TopK(k)(h) | ReLU(h) * (h > threshold)    (standard | topk | jumprelu)
    x̂    = unnorm(f @ W_dec + b_dec)                W_dec [d_sae, d_in], b_dec [d_in]
with `norm` as SAELens defines normalize_activations ("none" and "expected_average_only_in" are
the identity at inference, "constant_norm_rescale" scales each token to norm sqrt(d_in),
"layer_norm" centres and scales it).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from workers.harvest import SourceSpec
from workers.models import parse_hook_name

log = logging.getLogger(__name__)

CFG_FILE, WEIGHTS_FILE, METRICS_FILE = "cfg.json", "sae_weights.safetensors", "training_metrics.json"
ARCHITECTURES = ("standard", "topk", "jumprelu")
NORMALIZATIONS = ("none", "expected_average_only_in", "constant_norm_rescale", "layer_norm")
METRIC_KEYS = ("l0", "variance_explained", "loss_recovered", "dead_fraction", "mse", "ce_clean",
               "ce_spliced", "ce_zero_ablation", "n_tokens_trained")
_SLUG_KIND = {"hook_resid_post": "res", "hook_resid_pre": "res-pre", "hook_mlp_out": "mlp",
              "hook_attn_out": "att", "mlp.hook_post": "mlp-post"}
_GEMMA_SCOPE_KIND = {"res": "hook_resid_post", "mlp": "hook_mlp_out", "att": "attn.hook_z"}


class SAEFormatError(ValueError):
    """An SAE file that cannot be read, or that does not fit the model it is used with."""


@dataclass
class SAEConfig:
    """The fields of an SAELens cfg.json that decide what the SAE computes (others kept in
    `extra`, written back unchanged)."""

    d_in: int
    d_sae: int
    hook_name: str
    architecture: str = "topk"
    k: int | None = None
    apply_b_dec_to_input: bool = True
    normalize_activations: str = "none"
    dtype: str = "float32"
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.architecture == "relu":
            self.architecture = "standard"
        if self.architecture not in ARCHITECTURES:
            raise SAEFormatError(f"unsupported SAE architecture {self.architecture!r}; supported: "
                                 f"{', '.join(ARCHITECTURES)}")
        if self.d_in < 1 or self.d_sae < 1:
            raise SAEFormatError(f"d_in and d_sae must be positive, got {self.d_in}, {self.d_sae}")
        if self.architecture == "topk" and not (self.k and 0 < self.k <= self.d_sae):
            raise SAEFormatError(f"a topk SAE needs 1 <= k <= d_sae={self.d_sae}, got k={self.k}")
        if self.normalize_activations not in NORMALIZATIONS:
            raise SAEFormatError(f"unknown normalize_activations {self.normalize_activations!r}; "
                                 f"known: {', '.join(NORMALIZATIONS)}")

    @property
    def layer(self) -> int | None:
        m = re.match(r"blocks\.(\d+)\.", self.hook_name)
        return int(m.group(1)) if m else None

    @property
    def tensor_names(self) -> tuple[str, ...]:
        base = ("W_enc", "b_enc", "W_dec", "b_dec")
        return (*base, "threshold") if self.architecture == "jumprelu" else base

    @classmethod
    def from_dict(cls, d: dict) -> SAEConfig:
        """Any SAELens cfg.json: flat (before 6.0; `hook_point` before 3.0) or with `metadata`."""
        meta = d.get("metadata") or d.get("meta") or {}
        hook = d.get("hook_name") or d.get("hook_point") or meta.get("hook_name")
        arch = d.get("architecture", "standard")
        act_fn = d.get("activation_fn") or d.get("activation_fn_str")
        k = d.get("k") or (d.get("activation_fn_kwargs") or {}).get("k")
        if arch == "standard" and act_fn == "topk":  # SAELens 4-5 stored TopK SAEs this way
            arch = "topk"
        norm = d.get("normalize_activations") or "none"
        if isinstance(norm, bool):
            norm = "expected_average_only_in" if norm else "none"
        missing = [n for n, v in (("d_in", d.get("d_in")), ("d_sae", d.get("d_sae")),
                                  ("hook_name", hook)) if v is None]
        if missing:
            raise SAEFormatError(f"cfg.json lacks {', '.join(missing)}")
        known = {f.name for f in fields(cls)} | {"hook_layer", "hook_point"}  # derived, renamed
        return cls(d_in=int(d["d_in"]), d_sae=int(d["d_sae"]), hook_name=hook, architecture=arch,
                   k=None if k is None else int(k),
                   apply_b_dec_to_input=bool(d.get("apply_b_dec_to_input", True)),
                   normalize_activations=norm, dtype=str(d.get("dtype") or "float32"),
                   extra={key: v for key, v in d.items() if key not in known})

    def to_dict(self) -> dict:
        """A flat SAELens cfg.json (SAELens 6 reads it through its pre-6.0 path)."""
        out = {**self.extra, "d_in": self.d_in, "d_sae": self.d_sae, "hook_name": self.hook_name,
               "hook_layer": self.layer, "architecture": self.architecture,
               "apply_b_dec_to_input": self.apply_b_dec_to_input,
               "normalize_activations": self.normalize_activations, "dtype": self.dtype}
        if self.architecture == "topk":
            out["k"] = self.k
        return out


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

    def pre_acts(self, x: Tensor) -> Tensor:
        """[..., d_in] -> h [..., d_sae]: one matmul in the SAE's dtype."""
        x, _ = self._normalize(x.to(self.W_enc.dtype))
        if self.cfg.apply_b_dec_to_input:
            x = x - self.b_dec
        lead = x.shape[:-1]
        h = torch.addmm(self.b_enc, x.reshape(-1, self.cfg.d_in), self.W_enc)
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

    def decode(self, f: Tensor) -> Tensor:
        """[..., d_sae] -> [..., d_in], in the normalized space (see forward)."""
        return f @ self.W_dec + self.b_dec

    def output_directions(self) -> Tensor:
        """[d_sae, d_in]: what one unit of each feature's activation adds to the reconstruction
        (W_dec's rows)."""
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
        from safetensors.torch import load_file

        return _build(cfg, load_file(weights), str(weights), device)
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
        if cfg.normalize_activations == "expected_average_only_in":
            log.warning("%s: normalize_activations is expected_average_only_in: like SAELens, the "
                        "activations are encoded unscaled (fold the scaling factor first)", where)
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
            w = sae.W_dec.detach().float()
            return w @ lm.mlp_out_directions(layer).to(w.device) if kind == "mlp.hook_post" else w

        path = split_spec(spec)[0]
        folder = path if path.is_dir() else path.parent
        out.append(SourceSpec(
            slug=slug, kind="sae", hook_name=cfg.hook_name, layer=layer, n_features=cfg.d_sae,
            bottom=False, encode=sae.encode, directions=directions,
            sae_config={**cfg.to_dict(), "metrics": read_metrics(folder),
                        "path": str(path.resolve()), "sha256": sae_weights_sha256(path)}))
    return out
