"""An SAE's cfg.json as SAELens writes it (flat before 6.0, with `metadata` since): the fields
that decide what the SAE computes, read and written back, and every key that would change what
`encode` computes or which activations it reads refused by name rather than ignored.

What each key means is SAELens 6's (`sae_lens.saes.sae.SAE.process_sae_in`, `TopKSAE.encode`):
    apply_b_dec_to_input         subtract b_dec from the input before the encoder
    normalize_activations        "none"; "constant_norm_rescale" (each token scaled to norm
                                 sqrt(d_in)); "layer_norm" (centred, divided by std + 1e-5);
                                 "expected_average_only_in" and "covariance_whitening" are
                                 training-time statistics SAELens folds into the weights when
                                 training ends, and its encode applies nothing for them
    rescale_acts_by_decoder_norm (topk) pre-activations times each decoder row's norm before
                                 the TopK; decode divides them back out
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields

ARCHITECTURES = ("standard", "topk", "jumprelu")
NORMALIZATIONS = ("none", "expected_average_only_in", "constant_norm_rescale", "layer_norm",
                  "covariance_whitening")
UNSCALED_NORMALIZATIONS = ("expected_average_only_in", "covariance_whitening")
"""Normalizations whose statistics are not in the files: encode runs on raw activations."""

_ACTIVATIONS = {"standard": ("relu",), "topk": ("topk", "relu"), "jumprelu": ("relu", "jumprelu")}
_RENAMED = {"hook_point": "hook_name", "hook_point_head_index": "hook_head_index",
            "activation_fn_str": "activation_fn"}


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
    rescale_acts_by_decoder_norm: bool = False
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
        if self.rescale_acts_by_decoder_norm and self.architecture != "topk":
            raise SAEFormatError("rescale_acts_by_decoder_norm is only defined for topk SAEs "
                                 f"(this one is {self.architecture})")

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
        """Any SAELens cfg.json: flat (before 6.0; `hook_point` before 3.0) or with `metadata`.
        A key that would change what encode computes, or which activations it reads, and that
        is not implemented here is refused by name."""
        meta = d.get("metadata") or d.get("meta") or {}
        flat = {_RENAMED.get(k, k): v for k, v in {**meta, **d}.items()}
        hook = flat.get("hook_name")
        arch = flat.get("architecture", "standard")
        act_fn = flat.get("activation_fn")
        k = flat.get("k") or (flat.get("activation_fn_kwargs") or {}).get("k")
        if arch == "standard" and act_fn == "topk":  # SAELens 4-5 stored TopK SAEs this way
            arch = "topk"
        _refuse_unimplemented(flat, "standard" if arch == "relu" else arch, act_fn)
        norm = flat.get("normalize_activations") or "none"
        if isinstance(norm, bool):
            norm = "expected_average_only_in" if norm else "none"
        missing = [n for n, v in (("d_in", d.get("d_in")), ("d_sae", d.get("d_sae")),
                                  ("hook_name", hook)) if v is None]
        if missing:
            raise SAEFormatError(f"cfg.json lacks {', '.join(missing)}")
        known = {f.name for f in fields(cls)} | {"hook_layer", "hook_point"}  # derived, renamed
        return cls(d_in=int(d["d_in"]), d_sae=int(d["d_sae"]), hook_name=hook, architecture=arch,
                   k=None if k is None else int(k),
                   apply_b_dec_to_input=bool(flat.get("apply_b_dec_to_input", True)),
                   normalize_activations=norm,
                   rescale_acts_by_decoder_norm=bool(flat.get("rescale_acts_by_decoder_norm")),
                   dtype=str(d.get("dtype") or "float32"),
                   extra={key: v for key, v in d.items() if key not in known})

    def to_dict(self) -> dict:
        """A flat SAELens cfg.json (SAELens 6 reads it through its pre-6.0 path)."""
        out = {**self.extra, "d_in": self.d_in, "d_sae": self.d_sae, "hook_name": self.hook_name,
               "hook_layer": self.layer, "architecture": self.architecture,
               "apply_b_dec_to_input": self.apply_b_dec_to_input,
               "normalize_activations": self.normalize_activations, "dtype": self.dtype}
        if self.architecture == "topk":
            out["k"] = self.k
            out["rescale_acts_by_decoder_norm"] = self.rescale_acts_by_decoder_norm
        return out


def _refuse_unimplemented(flat: dict, arch: str, act_fn: str | None) -> None:
    """SAELens keys that would make encode read other activations or compute something else
    than what `workers.sae.SAE` computes: an error naming the key, never a silent difference."""
    if flat.get("hook_head_index") is not None:
        raise SAEFormatError(f"hook_head_index={flat['hook_head_index']!r}: SAEs that read one "
                             "attention head are not supported (the hook would have to be cut "
                             "to that head)")
    if (flat.get("reshape_activations") or "none") != "none":
        raise SAEFormatError(f"reshape_activations={flat['reshape_activations']!r}: SAEs on "
                             "attention heads' outputs (hook_z) are not supported")
    if act_fn is not None and act_fn not in _ACTIVATIONS.get(arch, (act_fn,)):
        raise SAEFormatError(f"activation_fn={act_fn!r} is not supported for a {arch} SAE "
                             f"(supported: {', '.join(_ACTIVATIONS[arch])})")
    kwargs = set(flat.get("activation_fn_kwargs") or {}) - {"k"}
    if kwargs:
        raise SAEFormatError(f"activation_fn_kwargs {sorted(kwargs)} are not supported "
                             "(only k, for topk)")
