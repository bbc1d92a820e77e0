"""What a harvest computes, in a form that travels: a worker process (a Ray actor, or the
in-process runner) rebuilds the model and the sources from it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from workers.harvest import HarvestConfig, SourceSpec, neuron_sources


@dataclass
class HarvestPlan:
    model: str
    """Model spec as given to load_model (built-in name, folder, .gguf, hub id)."""
    layers: list[int]
    """Layers whose MLP neurons are harvested."""
    saes: list[str] = field(default_factory=list)
    """SAE folders (SAELens layout) or Gemma Scope params.npz files."""
    cfg: HarvestConfig = field(default_factory=HarvestConfig)
    device: str = "cpu"
    cache_dir: str | None = None
    skip: list[str] = field(default_factory=list)
    """Source slugs to leave out (already harvested)."""

    def build(self):
        """(LoadedModel, [SourceSpec]) on this process's device."""
        from workers.harvest import DTYPES
        from workers.models import load_model

        lm = load_model(self.model, device=self.device, dtype=DTYPES[self.cfg.dtype],
                        cache_dir=Path(self.cache_dir) if self.cache_dir else None)
        return lm, self.sources(lm)

    def sources(self, lm) -> list[SourceSpec]:
        specs = neuron_sources(lm, self.layers)
        if self.saes:
            from workers.sae import sae_sources

            specs += sae_sources(lm, self.saes, device=self.device)
        return [s for s in specs if s.slug not in self.skip]
