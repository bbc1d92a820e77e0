"""The harvest runner: one config and one `run()` that load the model, plan the sources, register
them, run the shards (resuming from the checkpoint) on a backend, finalize and write them.

    HarvestRunner(RunConfig(model="gpt2", dataset="pydoc", layers="0-3", db_url=...)).run()
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from app.config import DEFAULT_DATASET, DEFAULT_MODEL
from workers.harvest import HarvestConfig, SourceSpec

log = logging.getLogger(__name__)

BACKENDS = ("inprocess", "ray")
_LAYERS_RE = re.compile(r"all|none|\d+(-\d+)?(,\d+(-\d+)?)*")


class PlanError(ValueError):
    """The sources asked for do not fit the model, or there are none."""


def check_layers(text: str, flag: str = "--layers") -> str:
    """The layers spec without spaces, if it is 'all', 'none', '0,5,11' or '2-4' (mixed:
    '0,2-4'); raises PlanError otherwise."""
    if not isinstance(text, str) or not _LAYERS_RE.fullmatch(text.replace(" ", "")):
        raise PlanError(f"{flag} expects 'all', 'none', '0,5,11' or '2-4', got {text!r}")
    return text.replace(" ", "")


def check_cofiring(specs: list[SourceSpec], harvest: HarvestConfig) -> None:
    """Co-firing statistics hold two [F, F] matrices per source: refused (PlanError) for a
    source wider than MAX_COFIRING_FEATURES, before anything is registered."""
    from workers.relations import MAX_COFIRING_FEATURES

    if not harvest.relations:
        return
    wide = [s for s in specs if s.kind != "heads" and s.n_features > MAX_COFIRING_FEATURES]
    if wide:
        widest = max(s.n_features for s in wide)
        raise PlanError(
            f"--relations keeps [F, F] co-firing counts per source ({widest ** 2 * 12 / 1e9:,.0f} "
            f"GB for {widest:,} features): {', '.join(s.slug for s in wide)} "
            f"has more than {MAX_COFIRING_FEATURES:,} features; harvest it without --relations "
            "(its cosine lists are made either way)")


def parse_layers(text: str, n_layers: int, flag: str = "--layers") -> list[int]:
    """A layers spec (see check_layers) -> sorted layer indices, checked against n_layers."""
    text = check_layers(text, flag)
    if text in ("all", "none"):
        return list(range(n_layers)) if text == "all" else []
    layers: set[int] = set()
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        layers.update(range(int(lo), int(hi or lo) + 1))
    if not layers or max(layers) >= n_layers:
        raise PlanError(f"{flag}: the model has layers 0..{n_layers - 1}; got {text!r}")
    return sorted(layers)


@dataclass
class HarvestPlan:
    """What a harvest computes, in a form that travels: a worker process (a Ray actor, or this
    one) rebuilds the model and the sources from it."""

    model: str
    """Model spec as given to load_model (built-in name, folder, .gguf, hub id)."""
    layers: list[int]
    """Layers whose MLP neurons are harvested."""
    saes: list[str] = field(default_factory=list)
    """SAE folders (SAELens layout) or Gemma Scope params.npz files."""
    cfg: HarvestConfig = field(default_factory=HarvestConfig)
    heads: list[int] = field(default_factory=list)
    """Layers whose attention heads are harvested (sources `{L}-attn`)."""
    device: str = "cpu"
    cache_dir: str | None = None
    skip: list[str] = field(default_factory=list)
    """Source slugs to leave out (already harvested)."""

    def build(self):
        """(LoadedModel, [SourceSpec]) on this process's device."""
        from workers.harvest import DTYPES
        from workers.loading import load_model

        lm = load_model(self.model, device=self.device, dtype=DTYPES[self.cfg.dtype],
                        cache_dir=Path(self.cache_dir) if self.cache_dir else None)
        return lm, self.sources(lm)

    def sources(self, lm) -> list[SourceSpec]:
        from workers.harvest import neuron_sources
        from workers.heads import head_sources

        specs = neuron_sources(lm, self.layers) + head_sources(lm, self.heads)
        if self.saes:
            from workers.sae import sae_sources

            specs += sae_sources(lm, self.saes, device=self.device)
        return [s for s in specs if s.slug not in self.skip]


@dataclass
class RunConfig:
    """One harvest: which model, corpus and sources, how, and where it is written."""

    db_url: str
    """The database the sources are written to (SQLAlchemy URL)."""
    model: str = DEFAULT_MODEL
    """Built-in name, local HF folder, .gguf file or hub id (`org/name@revision`)."""
    dataset: str = DEFAULT_DATASET
    """Built-in corpus name, a .txt/.jsonl/.parquet file or folder, or hf:NAME."""
    layers: str = "all"
    """The layers whose neurons are harvested: 'all', 'none', '0,5,11' or '2-4'."""
    saes: list[str] = field(default_factory=list)
    """SAE folders (SAELens layout) or Gemma Scope params.npz files, one source each."""
    heads: str = "none"
    """The layers whose attention heads are harvested, as for `layers`."""
    max_tokens: int | None = None
    """Cap on the corpus tokens (None: all of it)."""
    seq_len: int = 128
    """Tokens per sequence (the BOS included where the tokenizer has one)."""
    harvest: HarvestConfig = field(default_factory=HarvestConfig)
    """How every shard is reduced (examples kept, window, shard size, dtype, ...); its
    batch_size is replaced by `batch_size`."""
    batch_size: int | None = None
    """Sequences per batch; None: 8 on a CPU, what fits in half the free memory on a GPU."""
    device: str = "auto"
    """auto (cuda when there is one), cpu, cuda, cuda:1, ..."""
    cache_dir: Path | None = None
    """Converted models and fetched corpora (None: data/cache)."""
    checkpoint_dir: Path | None = None
    """Where finished shards are checkpointed for resume (None: no checkpoints)."""
    backend: str = "inprocess"
    """Run the shards in this process, or on Ray actors ('ray', one GPU each)."""
    ray_address: str | None = None
    """The Ray cluster to join (None: start a local one)."""
    ray_workers: int | None = None
    """Ray actors to start (None: one per GPU, else one per CPU)."""
    replace: bool = False
    """Harvest again sources that are already harvested (else they are refused)."""
    skip_existing: bool = False
    """Leave out the sources that are already harvested."""
    progress_bar: bool = True
    """Show a progress bar on the terminal."""

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        self.layers = check_layers(self.layers)
        self.heads = check_layers(self.heads, "--heads")
        for name in ("batch_size", "max_tokens", "ray_workers"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        if self.seq_len < 2:
            raise ValueError(f"seq_len must be at least 2, got {self.seq_len}")
        self.saes = [str(s) for s in self.saes]


@dataclass
class RunResult:
    """What a run did."""

    model: str
    """The model's slug."""
    written: list[str]
    """The sources harvested and written."""
    skipped: list[str]
    """The requested sources left out because they were already harvested."""
    dataset: str | None = None
    """The corpus's name, when anything was harvested."""
    n_tokens: int = 0
    """The tokens harvested."""
    database: str = ""
    """The database written to (its URL, without a password)."""


class HarvestRunner:
    """Runs one harvest from its RunConfig: `HarvestRunner(cfg).run()`.

    `on_progress(done, total)` (optional) gets the tokens harvested so far, as the database does.
    """

    def __init__(self, cfg: RunConfig, *, on_progress: Callable[[int, int], None] | None = None,
                 after_shard: Callable[[int], None] | None = None):
        self.cfg = cfg
        self.on_progress = on_progress
        self.after_shard = after_shard

    def run(self) -> RunResult:
        """Harvest every planned source and write it; a KeyboardInterrupt leaves the checkpoint
        for a rerun to resume from, any other error marks the sources failed and is raised."""
        from app.db.engine import make_engine, upgrade
        from workers import store
        from workers.harvest import DTYPES
        from workers.loading import load_model, resolve_device

        cfg = self.cfg
        device = resolve_device(cfg.device)
        engine = make_engine(cfg.db_url)
        try:
            upgrade(engine)  # a database that cannot be used is refused before the model loads
            lm = load_model(cfg.model, device=device, dtype=DTYPES[cfg.harvest.dtype],
                            cache_dir=cfg.cache_dir)
            layers = parse_layers(cfg.layers, lm.n_layers)
            heads = parse_layers(cfg.heads, lm.n_layers, "--heads")
            ready = store.ready_sources(engine, lm.slug) if cfg.skip_existing else set()
            plan = HarvestPlan(model=cfg.model, layers=layers, saes=cfg.saes, cfg=cfg.harvest,
                               heads=heads,
                               device=device, cache_dir=None if cfg.cache_dir is None
                               else str(cfg.cache_dir))
            asked = plan.sources(lm)
            check_cofiring(asked, cfg.harvest)
            skipped = [s.slug for s in asked if s.slug in ready]
            specs = [s for s in asked if s.slug not in ready]
            if not specs:
                if skipped:
                    return RunResult(lm.slug, written=[], skipped=skipped,
                                     database=_shown(engine))
                raise PlanError("nothing to harvest: --layers none, --heads none and no --sae")
            return self._run(replace(plan, skip=skipped), lm, specs, skipped, engine)
        finally:
            engine.dispose()

    def _run(self, plan: HarvestPlan, lm, specs: list[SourceSpec], skipped: list[str],
             engine) -> RunResult:
        import torch

        from workers import store
        from workers.corpus import load_dataset
        from workers.finalize import add_direction_relations, finalize_source
        from workers.harvest import auto_batch_size

        cfg = self.cfg
        batch = cfg.batch_size or auto_batch_size(lm, specs, cfg.seq_len)
        plan = replace(plan, cfg=replace(cfg.harvest, batch_size=batch))
        dataset = load_dataset(cfg.dataset, lm.tokenizer, seq_len=cfg.seq_len,
                               max_tokens=cfg.max_tokens, cache_dir=cfg.cache_dir)
        log.info("%s on %s: %d sequences x %d tokens, %d sources, %d features, device %s",
                 lm.slug, dataset.slug, dataset.n_sequences, dataset.seq_len, len(specs),
                 sum(s.n_features for s in specs), plan.device)
        checkpoint = self._checkpoint(plan, lm, specs, dataset)
        reg = store.begin(engine, lm, dataset, specs, plan.cfg, replace=cfg.replace)
        try:
            with torch.inference_mode():
                states = self._harvest(plan, lm, specs, dataset, checkpoint,
                                       lambda n: store.report_progress(engine, reg, n))
                results = [finalize_source(s, states.pop(s.slug), lm=lm, dataset=dataset,
                                           cfg=plan.cfg)  # each state let go once finalized
                           for s in specs]
                add_direction_relations(specs, results)
            t0 = time.monotonic()
            store.write(engine, reg, results)
            log.info("written in %.1f s", time.monotonic() - t0)
        except Exception as exc:
            store.fail(engine, reg, f"{type(exc).__name__}: {exc}")
            raise
        if checkpoint is not None:
            checkpoint.clear()
        return RunResult(lm.slug, written=[s.slug for s in specs], skipped=skipped,
                         dataset=dataset.name, n_tokens=dataset.n_tokens,
                         database=_shown(engine))

    def _harvest(self, plan: HarvestPlan, lm, specs: list[SourceSpec], dataset, checkpoint,
                 report: Callable[[int], None]):
        """The states of every shard, merged: resumed from the checkpoint, the rest run on the
        configured backend; progress goes to `report` (every 2 s) and the terminal."""
        from tqdm import tqdm

        from workers.harvest import Harvester, InProcessBackend, Shards, harvest_shards

        cfg = self.cfg
        bos_first = dataset.bos_policy == "bos-prepended"
        if cfg.backend == "ray":
            from workers.ray_backend import RayBackend

            backend = RayBackend(plan, dataset.tokens, bos_first=bos_first,
                                 n_workers=cfg.ray_workers, address=cfg.ray_address)
        else:
            backend = InProcessBackend(Harvester(lm, dataset.tokens, specs, plan.cfg,
                                                 bos_first=bos_first))
        bar = tqdm(total=dataset.n_tokens, unit="tok", unit_scale=True, desc="harvest",
                   disable=not cfg.progress_bar, dynamic_ncols=True)
        done, last = 0, time.monotonic()

        def progress(n: int) -> None:
            nonlocal done, last
            done += n
            bar.update(n)
            if time.monotonic() - last > 2:
                last = time.monotonic()
                report(done)
            if self.on_progress is not None:
                self.on_progress(done, dataset.n_tokens)

        try:
            return harvest_shards(backend, Shards.of(dataset.tokens, plan.cfg), checkpoint,
                                  progress, self.after_shard)
        finally:
            bar.close()

    def _checkpoint(self, plan: HarvestPlan, lm, specs: list[SourceSpec], dataset):
        """The run's checkpoint: one per model, dataset, harvest config and set of sources."""
        from workers.harvest import Checkpoint

        if self.cfg.checkpoint_dir is None:
            return None
        return Checkpoint(self.cfg.checkpoint_dir, Checkpoint.key_for(
            model=lm.source, dataset=dataset.slug, cfg=plan.cfg.to_dict(),
            sources=[(s.slug, s.hook_name) for s in specs]))


def _shown(engine) -> str:
    return engine.url.render_as_string(hide_password=True)
