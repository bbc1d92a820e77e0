"""The models of the served sources and their SAEs, loaded once for the server (`featurescope
serve --live`), run on text the user sends: one feature's values, or the features that fire most.

Each source is computed exactly as the harvest computed it: the same hook point, the same SAE
encode, the same BOS policy, in the dtype it was harvested in. `ServedModels.load` checks that
what it loads is what was harvested (the tokenizer's hash, the SAE weights' sha256) and leaves
out, with a warning, any source it cannot reproduce. What a request cannot get is raised as an
`app.inference_errors` error; results are plain data (numpy arrays, tuples of numbers).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch
from sqlalchemy import Engine, select

from app.config import DEFAULT_MODEL
from app.db.engine import transaction
from app.db.tables import Model, Source, SourceStatus
from app.inference_errors import BadInput, NotLoaded
from workers.corpus import _encode, tokenizer_hash
from workers.harvest import DTYPES
from workers.loading import load_model
from workers.models import LoadedModel

if TYPE_CHECKING:
    from workers.sae import SAE

log = logging.getLogger(__name__)


class Activations(NamedTuple):
    """One feature's values at every token of a text, and their peak."""

    values: np.ndarray
    """[T] float32"""
    max_value: float
    max_index: int


class FeatureHit(NamedTuple):
    """A feature that fired on a text: its peak there, and its values at every token."""

    source: str
    index: int
    max_value: float
    max_index: int
    values: list[float]


class TokenTop(NamedTuple):
    """One of the features that fire most at one token."""

    source: str
    index: int
    value: float


@dataclass
class Ranking:
    """The features that fire most on a text, and each token's top features."""

    features: list[FeatureHit]
    """highest peak first (ties: source order, then index)"""
    per_token: list[list[TokenTop]]
    """per token, highest value first; none for a leading BOS"""


def peak(values: np.ndarray, first: int) -> tuple[float, int]:
    """(value, position) of the max of `values[first:]` (all of them when that is empty)."""
    if len(values) <= first:
        first = 0
    at = first + int(np.argmax(values[first:]))
    return float(values[at]), at


@dataclass
class ServedSource:
    slug: str
    kind: str
    hook_name: str
    n_features: int
    encode: Callable[[torch.Tensor], torch.Tensor] | None = field(default=None, repr=False)
    """SAE sources: [..., d_in] -> [..., d_sae]; neurons read the hook point as it is."""
    sae: SAE | None = field(default=None, repr=False)
    """SAE sources: the loaded SAE (its decoder rows are the features' directions)."""


@dataclass
class ServedModel:
    lm: LoadedModel
    sources: dict[str, ServedSource]

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

    def body_start(self, ids: list[int]) -> int:
        """1 where the ids start with BOS and go on (a leading BOS is never a peak), else 0."""
        return 1 if self.bos_id is not None and len(ids) > 1 and ids[0] == self.bos_id else 0

    def source(self, slug: str) -> ServedSource:
        src = self.sources.get(slug)
        if src is None:
            raise NotLoaded.source(self.slug, slug, list(self.sources))
        return src

    def check_ids(self, ids: list[int]) -> None:
        """BadInput for no tokens, or for token ids out of the model's vocabulary."""
        if not ids:
            raise BadInput("no tokens to run")
        bad = [i for i in ids if not 0 <= i < self.lm.vocab_size]
        if bad:
            raise BadInput(f"token ids out of the vocabulary (0 to {self.lm.vocab_size - 1}): "
                           f"{bad[:5]}")

    def run(self, ids: list[int], slugs: list[str]) -> dict[str, np.ndarray]:
        """Activations of every feature of each source at every token: {slug: [T, F] float32}."""
        wanted = [self.source(s) for s in dict.fromkeys(slugs)]
        self.check_ids(ids)
        by_hook: dict[str, list[ServedSource]] = {}
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

    def activations(self, source: str, index: int, runs: list[list[int]]) -> list[Activations]:
        """One feature's values on each run of token ids, with their peak."""
        n = self.source(source).n_features
        if not 0 <= index < n:
            raise BadInput(f"{self.slug}/{source} has no feature {index}: it has features 0 to "
                           f"{n - 1}")
        out = []
        for ids in runs:
            values = self.run(ids, [source])[source][:, index]
            out.append(Activations(values, *peak(values, self.body_start(ids))))
        return out

    def search(self, ids: list[int], sources: list[str], *, top: int, per_token: int
               ) -> Ranking:
        """The `top` features of `sources` with the highest peak on the text (only those that
        fire), and each token's `per_token` highest features. Ties go to the earlier source in
        `sources`, then the lower index."""
        acts = self.run(ids, sources)
        first = self.body_start(ids)
        cands = []
        for order, slug in enumerate(sources):
            a = acts[slug][first:]
            mx, arg = a.max(0), a.argmax(0)
            best = np.argsort(-mx, kind="stable")[:top]
            cands += [(float(mx[f]), order, int(f), int(arg[f]) + first) for f in best if mx[f] > 0]
        cands.sort(key=lambda h: (-h[0], h[1], h[2]))
        features = [FeatureHit(sources[o], f, v, at, acts[sources[o]][:, f].tolist())
                    for v, o, f, at in cands[:top]]
        rows: list[list[TokenTop]] = [[] for _ in ids]
        if per_token:
            for t in range(first, len(ids)):
                here = []
                for order, slug in enumerate(sources):
                    row = acts[slug][t]
                    k = min(per_token, row.shape[0])
                    best = np.argpartition(-row, k - 1)[:k]
                    here += [(float(row[f]), order, int(f)) for f in best if row[f] > 0]
                here.sort(key=lambda c: (-c[0], c[1], c[2]))
                rows[t] = [TokenTop(sources[o], f, v) for v, o, f in here[:per_token]]
        return Ranking(features, rows)


@dataclass
class ServedModels:
    models: dict[str, ServedModel]

    def model(self, slug: str) -> ServedModel:
        m = self.models.get(slug)
        if m is None:
            raise NotLoaded.model(slug, list(self.models))
        return m

    @classmethod
    def load(cls, engine: Engine, *, device: str = "cpu", cache_dir: Path | None = None
             ) -> ServedModels:
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
                    sources[s_slug] = _served_source(lm, s_slug, kind, hook, n_features,
                                                     sae_config, device)
                except Exception as exc:  # noqa: BLE001
                    log.warning("live: %s/%s is not served live: %s", slug, s_slug, exc)
            if sources:
                models[slug] = ServedModel(lm, sources)
                log.info("live: %s on %s with %d sources", slug, device, len(sources))
        return cls(models)


def model_spec(slug: str, hub_id: str, revision: str | None) -> str:
    """What to give load_model to get back the model stored as (slug, hub_id, revision)."""
    if slug == DEFAULT_MODEL and hub_id.startswith("pypi:"):
        return DEFAULT_MODEL
    return f"{hub_id}@{revision}" if revision and not Path(hub_id).exists() else hub_id


def _served_source(lm: LoadedModel, slug: str, kind: str, hook: str, n_features: int,
                   sae_config: dict | None, device: str) -> ServedSource:
    if kind == "neurons":
        if lm.hook_shape_dim(hook) != n_features:
            raise ValueError(f"{hook} of the loaded model has another width than {n_features}")
        return ServedSource(slug, kind, hook, n_features)
    from workers.sae import load_sae, sae_weights_sha256

    path = (sae_config or {}).get("path")
    if not path:
        raise ValueError("its SAE config does not say where the SAE was loaded from")
    sae = load_sae(f"{path}@{hook}", device=device)
    digest = sae_weights_sha256(Path(path))
    if sae_config.get("sha256") and digest != sae_config["sha256"]:
        raise ValueError(f"the SAE at {path} changed since the harvest (sha256 differs)")
    if sae.cfg.d_sae != n_features or sae.cfg.hook_name != hook:
        raise ValueError(f"the SAE at {path} does not match the source ({sae.cfg.hook_name}, "
                         f"{sae.cfg.d_sae} features)")
    sae = sae.to(device=device, dtype=lm.dtype)
    return ServedSource(slug, kind, hook, n_features, encode=sae.encode, sae=sae)
