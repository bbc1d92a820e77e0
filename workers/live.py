"""Live inference for the server (`featurescope serve --live`): the models of the served sources
and their SAEs, loaded once, run on text the user sends.

Each source is computed exactly as the harvest computed it: the same hook point, the same SAE
encode, the same BOS policy, in float32. `LiveModels.load` checks that what it loads is what
was harvested (the tokenizer's hash, the SAE weights' sha256) and leaves out, with a warning,
any source it cannot reproduce.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from sqlalchemy import Engine, select

from app.db.engine import transaction
from app.db.tables import Model, Source, SourceStatus
from workers.corpus import _encode, tokenizer_hash
from workers.harvest import DTYPES
from workers.models import DEFAULT_MODEL, LoadedModel, load_model

log = logging.getLogger(__name__)


class LiveError(ValueError):
    """A request the loaded models cannot answer (unknown model or source); says why."""


@dataclass
class LiveSource:
    slug: str
    kind: str
    hook_name: str
    n_features: int
    encode: Callable[[torch.Tensor], torch.Tensor] | None = field(default=None, repr=False)
    """SAE sources: [..., d_in] -> [..., d_sae]; neurons read the hook point as it is."""


@dataclass
class LiveModel:
    lm: LoadedModel
    sources: dict[str, LiveSource]

    @property
    def slug(self) -> str:
        return self.lm.slug

    def tokenize(self, text: str) -> list[int]:
        """The token ids of a text as the harvest tokenized its corpus: BOS first when the
        tokenizer has one, no other special tokens added."""
        ids = list(_encode(self.lm.tokenizer, [text])[0])
        bos = self.lm.tokenizer.bos_token_id
        return ids if bos is None else [bos, *ids]

    @property
    def bos_id(self) -> int | None:
        return self.lm.tokenizer.bos_token_id

    @property
    def bos_first(self) -> bool:
        return self.bos_id is not None

    def source(self, slug: str) -> LiveSource:
        src = self.sources.get(slug)
        if src is None:
            raise LiveError(f"{self.slug} has no live source {slug!r}; live sources: "
                            + ", ".join(sorted(self.sources)))
        return src

    def run(self, ids: list[int], slugs: list[str]) -> dict[str, np.ndarray]:
        """Activations of every feature of each source at every token: {slug: [T, F] float32}."""
        wanted = [self.source(s) for s in dict.fromkeys(slugs)]
        by_hook: dict[str, list[LiveSource]] = {}
        for src in wanted:
            by_hook.setdefault(src.hook_name, []).append(src)
        out: dict[str, np.ndarray] = {}

        def take(name: str, act: torch.Tensor) -> None:
            for src in by_hook[name]:
                a = act if src.encode is None else src.encode(act)
                out[src.slug] = a[0].float().cpu().numpy()

        input_ids = torch.tensor([ids], dtype=torch.long, device=self.lm.device)
        with torch.inference_mode():
            self.lm.run_with_hooks(input_ids, list(by_hook), take)
        return out


@dataclass
class LiveModels:
    models: dict[str, LiveModel]

    def model(self, slug: str) -> LiveModel:
        m = self.models.get(slug)
        if m is None:
            raise LiveError(f"model {slug!r} is not loaded for live inference; loaded: "
                            + (", ".join(sorted(self.models)) or "none"))
        return m

    @classmethod
    def load(cls, engine: Engine, *, device: str = "cpu", cache_dir: Path | None = None
             ) -> LiveModels:
        """Every model with ready sources, with those sources (SAEs from the files they were
        harvested from)."""
        with transaction(engine) as session:
            rows = session.execute(
                select(Model.slug, Model.hub_id, Model.revision, Model.tokenizer_hash,
                       Source.slug, Source.kind, Source.hook_name, Source.n_features,
                       Source.sae_config, Source.harvest_config)
                .join(Source, Source.model_id == Model.id)
                .where(Source.status == SourceStatus.ready)
                .order_by(Model.slug, Source.layer, Source.slug)).all()
        grouped: dict[str, list] = {}
        for row in rows:
            grouped.setdefault(row[0], []).append(row)
        models = {}
        for slug, srcs in grouped.items():
            _, hub_id, revision, thash = srcs[0][:4]
            # the dtype it was harvested in, so that live values are the stored ones
            dtypes = sorted({(r.harvest_config or {}).get("dtype", "float32") for r in srcs})
            if len(dtypes) > 1:
                log.warning("live: %s was harvested in %s; running it in %s", slug,
                            " and ".join(dtypes), dtypes[0])
            try:
                lm = load_model(model_spec(slug, hub_id, revision), device=device,
                                dtype=DTYPES[dtypes[0]], cache_dir=cache_dir)
            except Exception as exc:  # noqa: BLE001 - one model that will not load spares the rest
                log.warning("live: %s is not served live: %s", slug, exc)
                continue
            if tokenizer_hash(lm.tokenizer) != thash:
                log.warning("live: %s loaded from %s has another tokenizer than the one it was "
                            "harvested with; not served live", slug, hub_id)
                continue
            sources = {}
            for *_, s_slug, kind, hook, n_features, sae_config, _cfg in srcs:
                try:
                    sources[s_slug] = _live_source(lm, s_slug, kind, hook, n_features,
                                                   sae_config, device)
                except Exception as exc:  # noqa: BLE001
                    log.warning("live: %s/%s is not served live: %s", slug, s_slug, exc)
            if sources:
                models[slug] = LiveModel(lm, sources)
                log.info("live: %s on %s with %d sources", slug, device, len(sources))
        return cls(models)


def model_spec(slug: str, hub_id: str, revision: str | None) -> str:
    """What to give load_model to get back the model stored as (slug, hub_id, revision)."""
    if slug == DEFAULT_MODEL and hub_id.startswith("pypi:"):
        return DEFAULT_MODEL
    return f"{hub_id}@{revision}" if revision and not Path(hub_id).exists() else hub_id


def _live_source(lm: LoadedModel, slug: str, kind: str, hook: str, n_features: int,
                 sae_config: dict | None, device: str) -> LiveSource:
    if kind == "neurons":
        if lm.hook_shape_dim(hook) != n_features:
            raise LiveError(f"{hook} of the loaded model has another width than {n_features}")
        return LiveSource(slug, kind, hook, n_features)
    from workers.sae import load_sae, sae_weights_sha256

    path = (sae_config or {}).get("path")
    if not path:
        raise LiveError("its SAE config does not say where the SAE was loaded from")
    sae = load_sae(f"{path}@{hook}", device=device)
    digest = sae_weights_sha256(Path(path))
    if sae_config.get("sha256") and digest != sae_config["sha256"]:
        raise LiveError(f"the SAE at {path} changed since the harvest (sha256 differs)")
    if sae.cfg.d_sae != n_features or sae.cfg.hook_name != hook:
        raise LiveError(f"the SAE at {path} does not match the source ({sae.cfg.hook_name}, "
                        f"{sae.cfg.d_sae} features)")
    sae = sae.to(device=device, dtype=lm.dtype)
    return LiveSource(slug, kind, hook, n_features, encode=sae.encode)
