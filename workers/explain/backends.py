"""Builds the explainer and scorers a run asks for by name, sharing one loaded model."""

from __future__ import annotations

from pathlib import Path

from workers.explain.explainers import LLMExplainer
from workers.explain.run import Explainer, Scorer
from workers.explain.scorers import Detection, Fuzzing, Simulation
from workers.explain.tokens import TokensExplainer

_LOADED: dict[tuple, object] = {}


def backend(model: str | None, base_url: str | None, cache_dir: Path | None,
            device: str = "cpu"):
    """The chat backend of `model`: at `base_url` (openai) or loaded in this process (local,
    on `device`), loaded once per process."""
    key = (model, base_url, None if base_url else device)
    if key not in _LOADED:
        if base_url:
            from workers.explain.remote import OpenAIChat

            _LOADED[key] = OpenAIChat(base_url, model)
        else:
            from workers.explain.local import LocalLM

            _LOADED[key] = LocalLM(model, cache_dir=cache_dir, device=device)
    return _LOADED[key]


def make_explainer(name: str, *, model: str | None = None, base_url: str | None = None,
                   cache_dir: Path | None = None, device: str = "cpu") -> Explainer:
    if name == "tokens":
        return TokensExplainer()
    if name == "local":
        return LLMExplainer(name, backend(model, None, cache_dir, device))
    if name == "openai":
        if not base_url:
            raise ValueError("the openai explainer needs --base-url")
        return LLMExplainer(name, backend(model, base_url, cache_dir))
    raise ValueError(f"unknown explainer {name!r}")


def make_scorers(names: list[str], *, model: str | None = None, base_url: str | None = None,
                 cache_dir: Path | None = None, seed: int = 0, n_examples: int = 5,
                 device: str = "cpu") -> list[Scorer]:
    """The scorers `names`, on the endpoint at base_url when given, else on a local model (on
    `device`)."""
    if not names:
        return []
    lm = backend(model, base_url, cache_dir, device)
    if base_url:
        lm.require_logprobs()
    out: list[Scorer] = []
    for name in names:
        if name == "detection":
            out.append(Detection(lm, n_examples=n_examples, seed=seed))
        elif name == "fuzzing":
            out.append(Fuzzing(lm, n_examples=n_examples, seed=seed))
        elif name == "simulation":
            if base_url:
                raise ValueError("the simulation scorer needs log-probabilities at every token, "
                                 "which chat endpoints do not give: run it locally")
            out.append(Simulation(lm, n_examples=n_examples, seed=seed))
        else:
            raise ValueError(f"unknown scorer {name!r}")
    return out
