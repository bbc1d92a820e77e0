"""Causal LMs as featurescope runs them: hook points by name, edits, directions and logit effects.

Where a model comes from (built-in default, local HF folder, GGUF file, hub id) is
`workers.loading`.

Hook points use TransformerLens/SAELens names, `blocks.{L}.{kind}`:
- `mlp.hook_post`: the MLP hidden activation, the input of the down projection
  (`act(gate) * up` for gated MLPs), shape [batch, seq, d_mlp];
- `hook_resid_pre` / `hook_resid_post`: the residual stream entering / leaving block L;
- `hook_attn_out` / `hook_mlp_out`: what the attention / MLP sublayer adds to the residual
  stream (for Gemma 2/3 that is after their post-sublayer RMSNorm, as in TransformerLens);
all of those are [batch, seq, d_model]. Interventions may also edit `attn.hook_z`: the output of
every attention head before the output projection, [batch, seq, n_heads * d_head] (head h is
the slice `h * d_head : (h + 1) * d_head`), i.e. TransformerLens's hook_z with heads flattened.
Harvests may also read `blocks.{L}.attn.hook_pattern`: every query head's attention
probabilities [batch, n_heads, query, key] in float32, recomputed from the layer's own
projections (workers/heads.py) whatever attention implementation the model runs.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

SUPPORTED_ARCHITECTURES: tuple[str, ...] = (
    "gpt2", "llama", "mistral", "qwen2", "qwen3", "gpt_neox", "gemma", "gemma2", "gemma3_text",
)
HOOK_KINDS = ("mlp.hook_post", "hook_resid_pre", "hook_resid_post", "hook_mlp_out", "hook_attn_out")
# Module names that differ from the Llama family's (model.norm, mlp.down_proj, self_attn).
_FINAL_NORM = {"gpt2": "ln_f", "gpt_neox": "final_layer_norm"}
_DOWN_PROJ = {"gpt2": "c_proj", "gpt_neox": "dense_4h_to_h"}
_ATTN = {"gpt2": "attn", "gpt_neox": "attention"}
_O_PROJ = {"gpt2": "c_proj", "gpt_neox": "dense"}
# Architectures whose sublayer outputs pass through a norm before joining the residual stream.
_SANDWICH_NORMS = {"gemma2": ("post_attention_layernorm", "post_feedforward_layernorm"),
                   "gemma3_text": ("post_attention_layernorm", "post_feedforward_layernorm")}
_HOOK_RE = re.compile(r"blocks\.(\d+)\.(" + "|".join(re.escape(k) for k in HOOK_KINDS) + r")")
_Z_RE = re.compile(r"blocks\.(\d+)\.attn\.hook_z")
_PATTERN_RE = re.compile(r"blocks\.(\d+)\.attn\.hook_pattern")


class UnsupportedArchitecture(ValueError):
    """The model's `config.model_type` is not one this module knows how to hook."""

    def __init__(self, arch: str):
        super().__init__(f"unsupported architecture {arch!r}; supported: "
                         f"{', '.join(SUPPORTED_ARCHITECTURES)}")


class UnknownHookPoint(ValueError):
    """A hook name that is malformed or out of the model's layer range."""


class ModelLoadError(OSError):
    """A model spec that could not be resolved or loaded."""


class _StopForward(Exception):
    """Raised from a hook to end the forward pass once every requested activation was seen."""


def parse_hook_name(name: str) -> tuple[int, str]:
    """'blocks.5.mlp.hook_post' -> (5, 'mlp.hook_post'); raises UnknownHookPoint otherwise."""
    m = _HOOK_RE.fullmatch(name) if isinstance(name, str) else None
    if m is None:
        raise UnknownHookPoint(f"unknown hook point {name!r}: expected 'blocks.{{layer}}.{{kind}}' "
                               f"with kind one of {', '.join(HOOK_KINDS)}")
    return int(m.group(1)), m.group(2)


def neuron_hook(layer: int) -> str:
    return f"blocks.{layer}.mlp.hook_post"


def _slugify(text: str) -> str:
    slug = re.sub(r"[^a-z0-9._-]+", "-", text.lower().replace("/", "--")).strip("-.")
    return slug or "model"


def _first(x: Any) -> torch.Tensor:
    return x[0] if isinstance(x, tuple | list) else x


def _replacing(fn: Callable[[torch.Tensor], torch.Tensor], how: str) -> Callable:
    """A hook that hands fn the activation and puts what it returns in its place."""
    if how == "out":
        def hook(module, args, out):
            return (fn(out[0]), *out[1:]) if isinstance(out, tuple) else fn(out)
    else:
        def hook(module, args, kwargs):
            if args:
                return (fn(args[0]), *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": fn(kwargs["hidden_states"])}
    return hook


@dataclass
class LoadedModel:
    slug: str
    hf_model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    source: str
    revision: str | None
    arch: str
    n_layers: int
    d_model: int
    d_mlp: int
    vocab_size: int

    @property
    def device(self) -> torch.device:
        return next(self.hf_model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.hf_model.parameters()).dtype

    # ------------------------------------------------------------- module map
    def _blocks(self) -> torch.nn.ModuleList:
        base = self.hf_model.base_model
        return base.h if self.arch == "gpt2" else base.layers

    def _final_norm(self) -> torch.nn.Module:
        return getattr(self.hf_model.base_model, _FINAL_NORM.get(self.arch, "norm"))

    def _down_proj(self, layer: int) -> torch.nn.Module:
        return getattr(self._blocks()[layer].mlp, _DOWN_PROJ.get(self.arch, "down_proj"))

    def _attn(self, layer: int) -> torch.nn.Module:
        return getattr(self._blocks()[layer], _ATTN.get(self.arch, "self_attn"))

    def _o_proj(self, layer: int) -> torch.nn.Module:
        return getattr(self._attn(layer), _O_PROJ.get(self.arch, "o_proj"))

    @property
    def n_heads(self) -> int:
        return self.hf_model.config.num_attention_heads

    @property
    def d_head(self) -> int:
        return getattr(self.hf_model.config, "head_dim", None) or self.d_model // self.n_heads

    def _module_for(self, layer: int, kind: str) -> tuple[torch.nn.Module, str]:
        """(module, how): how is 'pre' (the module's input) or 'out' (its output)."""
        block = self._blocks()[layer]
        if kind == "mlp.hook_post":
            return self._down_proj(layer), "pre"
        if kind == "hook_resid_pre":
            return block, "pre"
        if kind == "hook_resid_post":
            return block, "out"
        attn_norm, mlp_norm = _SANDWICH_NORMS.get(self.arch, (None, None))
        if kind == "hook_mlp_out":
            return (getattr(block, mlp_norm) if mlp_norm else block.mlp), "out"
        return getattr(block, attn_norm or _ATTN.get(self.arch, "self_attn")), "out"

    def _check(self, name: str) -> tuple[int, str]:
        layer, kind = parse_hook_name(name)
        if layer >= self.n_layers:
            raise UnknownHookPoint(f"hook point {name!r} is out of range: {self.slug} has layers "
                                   f"0..{self.n_layers - 1}")
        return layer, kind

    def _check_read(self, name: str) -> tuple[int, str]:
        """_check, also accepting `blocks.{L}.attn.hook_pattern`."""
        m = _PATTERN_RE.fullmatch(name) if isinstance(name, str) else None
        if m is None:
            return self._check(name)
        return self._check(f"blocks.{m.group(1)}.hook_attn_out")[0], "attn.hook_pattern"

    def hook_shape_dim(self, hook_name: str) -> int:
        """The last dimension of the activation at `hook_name`: d_mlp or d_model."""
        return self.d_mlp if self._check(hook_name)[1] == "mlp.hook_post" else self.d_model

    # ------------------------------------------------------------- forward passes
    @contextmanager
    def _hooks(self, specs: list[tuple[torch.nn.Module, str, Callable]]) -> Iterator[None]:
        handles = []
        try:
            for module, how, fn in specs:
                if how == "out":
                    handles.append(module.register_forward_hook(fn))
                elif how == "call":  # fn(module, args, kwargs, output)
                    handles.append(module.register_forward_hook(fn, with_kwargs=True))
                else:
                    handles.append(module.register_forward_pre_hook(fn, with_kwargs=True))
            yield
        finally:
            for h in handles:
                h.remove()

    def _run(self, input_ids: torch.Tensor, specs: list) -> bool:
        """Forward under inference_mode with hooks; True if a hook stopped the pass early."""
        with torch.inference_mode(), self._hooks(specs):
            try:
                self.hf_model(input_ids=input_ids, use_cache=False)
            except _StopForward:
                return True
        return False

    def run_with_hooks(self, input_ids: torch.Tensor, hook_names: list[str],
                       callback: Callable[[str, torch.Tensor], None]) -> None:
        """Run input_ids [batch, seq] and call callback(name, act [batch, seq, dim]) per hook point.

        `act` is the live tensor (no copy). The pass stops as soon as every requested hook point
        has fired: later layers and the LM head never run.
        """
        parsed = [(name, *self._check_read(name)) for name in dict.fromkeys(hook_names)]
        if not parsed:
            return
        pending = {name for name, _, _ in parsed}

        def emit(name: str, act: torch.Tensor) -> None:
            callback(name, act)
            pending.discard(name)
            if not pending:
                raise _StopForward

        def make(name: str, how: str) -> Callable:
            def hook(module, args, third):  # third: the output, or the kwargs of a pre-hook
                if how == "out":
                    emit(name, _first(third))
                else:  # the hidden states come positionally or by keyword
                    emit(name, args[0] if args else third["hidden_states"])
            return hook

        specs = []
        for name, layer, kind in parsed:
            if kind == "attn.hook_pattern":
                from workers.heads import pattern_specs

                specs += pattern_specs(self, layer, lambda act, name=name: emit(name, act))
            else:
                module, how = self._module_for(layer, kind)
                specs.append((module, how, make(name, how)))
        if not self._run(input_ids, specs):
            raise RuntimeError(f"hook points never fired on {self.arch}: {sorted(pending)}")

    @contextmanager
    def editing(self, edits: dict[str, Callable[[torch.Tensor], torch.Tensor]]) -> Iterator[None]:
        """Inside the block, every forward pass replaces the activation at each hook point (the
        module docstring's names, and `blocks.L.attn.hook_z`) by edit(act): act is the live
        tensor [batch, seq, dim], edit returns the tensor to use instead. Validated before any
        hook is attached; the hooks are removed when the block ends, however it ends."""
        specs = []
        for name, edit in edits.items():
            m = _Z_RE.fullmatch(name)
            if m:
                layer = self._check(f"blocks.{m.group(1)}.hook_attn_out")[0]
                module, how = self._o_proj(layer), "pre"
            else:
                module, how = self._module_for(*self._check(name))
            specs.append((module, how, _replacing(edit, how)))
        with self._hooks(specs):
            yield

    def forward_to(self, input_ids: torch.Tensor, last_layer: int) -> None:
        """The bare truncated pass (blocks 0..last_layer, no callbacks) harvests compare against."""
        self._check(f"blocks.{last_layer}.hook_resid_post")

        def stop(module, args, out):
            raise _StopForward

        self._run(input_ids, [(self._blocks()[last_layer], "out", stop)])

    # ------------------------------------------------------------- vocabulary and weights
    def token_strings(self) -> list[str]:
        """Display text of every token id (len == vocab_size); ids the tokenizer lacks give ''."""
        n = min(len(self.tokenizer), self.vocab_size)
        texts = self.tokenizer.batch_decode([[i] for i in range(n)])
        return texts + [""] * (self.vocab_size - n)

    def mlp_out_directions(self, layer: int) -> torch.Tensor:
        """[d_mlp, d_model] float32: row i is neuron i's output direction (W_out[:, i] in TL)."""
        self._check(neuron_hook(layer))
        proj = self._down_proj(layer)
        w = proj.weight.detach()
        # nn.Linear stores [out=d_model, in=d_mlp]; GPT-2's Conv1D stores [in=d_mlp, out=d_model].
        return (w.T if isinstance(proj, torch.nn.Linear) else w).float().contiguous()

    def logit_effects(self, directions: torch.Tensor) -> torch.Tensor:
        """[n, d_model] -> [n, vocab] float32 direct logit attribution through final norm and W_U.

        LayerNorm: center, then scale by its weight. RMSNorm (every variant, e.g. Gemma's
        `1 + weight`): the effective gain is read off the module by feeding it a constant vector.
        """
        norm = self._final_norm()
        w_u = self.hf_model.get_output_embeddings().weight  # [vocab, d_model]
        with torch.inference_mode():
            d = directions.to(device=w_u.device, dtype=torch.float32)
            if isinstance(norm, torch.nn.LayerNorm):
                d = d - d.mean(dim=-1, keepdim=True)
                gain = norm.weight.float() if norm.weight is not None else 1.0
            else:
                probe = torch.full((1, self.d_model), 16.0, device=w_u.device, dtype=self.dtype)
                gain = norm(probe)[0].float()  # rms(probe) = 16 >> eps: the output is the gain
            return (d * gain) @ w_u.float().T


def from_hf_model(hf_model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, *, slug: str,
                  source: str, revision: str | None = None) -> LoadedModel:
    """Wrap an already-built causal LM (eval mode, no grads) as a LoadedModel."""
    cfg = hf_model.config
    if cfg.model_type not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedArchitecture(cfg.model_type)
    hf_model.eval().requires_grad_(False)
    lm = LoadedModel(slug=slug, hf_model=hf_model, tokenizer=tokenizer, source=source,
                     revision=revision, arch=cfg.model_type, n_layers=cfg.num_hidden_layers,
                     d_model=cfg.hidden_size, d_mlp=0,
                     vocab_size=hf_model.get_output_embeddings().weight.shape[0])
    proj = lm._down_proj(0)
    lm.d_mlp = proj.in_features if isinstance(proj, torch.nn.Linear) else proj.weight.shape[0]
    return lm
