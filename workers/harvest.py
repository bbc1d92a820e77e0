"""The harvest: one streaming pass of a model over a dataset that fills one or more sources.

The corpus is cut into shards of whole batches (`Shards`). Each shard yields a finished state
per source; states merge exactly, whatever the order, so `harvest_shards` checkpoints the
merged state after every shard and a rerun resumes after the finished ones. A backend (this
process, or Ray actors in workers/ray_backend.py) only runs the shards it is given.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from torch import Tensor

from workers.accumulate import Accumulator
from workers.relations import CoFiring
from workers.state import Ranked, SourceState, SparseCodes, Stats, batch_reduce

log = logging.getLogger(__name__)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class HarvestConfig:
    """How a harvest runs. Saved with every source it fills."""

    top_k: int = 20
    """Top (and bottom) examples kept per feature, one per sequence."""
    n_ranges: int = 5
    """Quantile groups of examples across the activation range."""
    per_range: int = 5
    """Examples shown per quantile group."""
    n_zero: int = 10
    """Sequences kept per feature where it never fired (the group `zero`); 0 keeps none."""
    window: int = 64
    """Tokens of context stored around each example's peak (capped at seq_len)."""
    batch_size: int = 8
    shard_sequences: int = 256
    """Sequences per shard (rounded up to whole batches): the unit of checkpoints and merges."""
    seed: int = 0
    """Seed of the priority-sampling keys."""
    compile: bool = False
    """Fuse the per-batch reductions: a native C loop for float32 on the CPU (workers/native.py),
    torch.compile elsewhere; False runs them in eager torch."""
    dtype: str = "float32"
    """The model's dtype while harvesting (float32, bfloat16, float16): activations come in
    it; reductions accumulate in float32 and float64 whatever it is."""
    sync_free: bool | None = None
    """Keep the batch loop free of host synchronisations (cut every candidate's window and
    re-sort whole rankings on the device). None: on CUDA devices only."""
    sparse: bool = True
    """Fill SAE sources from their non-zero codes (workers/state.py sparse_reduce) instead of
    the dense [tokens, d_sae] codes; the same state. Not with `relations`, and on a device
    without host synchronisations only for topk SAEs (a fixed number of codes per token)."""
    relations: bool = False
    """Keep co-firing statistics for the Jaccard and Pearson lists of related features
    (workers/relations.py): dense [F, F] products per batch."""

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        for name in ("top_k", "n_ranges", "per_range", "window", "batch_size", "shard_sequences"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.n_zero < 0:
            raise ValueError(f"n_zero must be at least 0, got {self.n_zero}")

    @property
    def sample_size(self) -> int:
        return self.n_ranges * self.per_range

    @property
    def batches_per_shard(self) -> int:
        return -(-self.shard_sequences // self.batch_size)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Shards:
    """How a dataset of `n_sequences` sequences of `seq_len` tokens is cut into shards of
    `size` sequences (whole batches; the last shard may be shorter). Every shard range and
    token count comes from here."""

    n_sequences: int
    seq_len: int
    size: int

    @classmethod
    def of(cls, tokens: Tensor, cfg: HarvestConfig) -> Shards:
        return cls(int(tokens.shape[0]), int(tokens.shape[1]),
                   cfg.batches_per_shard * cfg.batch_size)

    def __len__(self) -> int:
        return -(-self.n_sequences // self.size)

    def range(self, shard: int) -> tuple[int, int]:
        """The sequences [lo, hi) of a shard."""
        if not 0 <= shard < len(self):
            raise IndexError(f"shard {shard} out of range: there are {len(self)}")
        return shard * self.size, min((shard + 1) * self.size, self.n_sequences)

    def tokens(self, shards: int | frozenset[int] | list[int]) -> int:
        """The tokens of one shard, or of several."""
        if isinstance(shards, int):
            lo, hi = self.range(shards)
            return (hi - lo) * self.seq_len
        return sum(self.tokens(s) for s in shards)


@dataclass
class SourceSpec:
    """A set of units read at one hook point: a layer's neurons or one SAE's features."""

    slug: str
    kind: str  # "neurons" | "sae" | "heads"
    hook_name: str
    layer: int
    n_features: int
    bottom: bool = True
    """Keep bottom examples (neurons can fire negatively; SAE features cannot)."""
    encode: Callable[[Tensor], Tensor] | None = field(default=None, repr=False)
    """For SAE sources: [batch, seq, d_in] -> [batch, seq, d_sae]."""
    encode_sparse: Callable[[Tensor], SparseCodes] | None = field(default=None, repr=False)
    """For SAE sources: [batch, seq, d_in] -> the non-zero codes of encode (flat tokens)."""
    directions: Callable[[], Tensor] | None = field(default=None, repr=False)
    """Each feature's output direction [F, d_model], for direct logit attribution
    (W_out rows for neurons, W_dec rows for SAE features)."""
    sae_config: dict | None = None


def auto_batch_size(lm, specs: list[SourceSpec], seq_len: int, *, cpu_default: int = 8,
                    max_batch: int = 512) -> int:
    """Sequences per batch: 8 on a CPU; on a GPU, what fits in half the free memory, counting
    the model's own activations and, per source, its activations and the reductions' copies."""
    device = torch.device(lm.device)
    if device.type != "cuda":
        return cpu_default
    free, _total = torch.cuda.mem_get_info(device)
    width = 4  # float32 reductions
    per_token = sum(s.n_features for s in specs) * width * 4
    per_token += lm.d_model * width * 16 + max(lm.d_mlp, lm.d_model) * width * 4
    per_token += lm.vocab_size * width if not specs else 0
    fit = int(free * 0.5) // (per_token * seq_len)
    return max(1, min(max_batch, fit))


def neuron_sources(lm, layers: list[int]) -> list[SourceSpec]:
    from workers.models import neuron_hook

    return [
        SourceSpec(slug=f"{layer}-mlp", kind="neurons", hook_name=neuron_hook(layer), layer=layer,
                   n_features=lm.d_mlp,
                   directions=lambda layer=layer: lm.mlp_out_directions(layer))
        for layer in layers
    ]


def compiled_reduce() -> Callable[[Tensor, int], tuple[Tensor, ...]]:
    """batch_reduce fused by torch.compile; falls back to eager if compiling fails (no C++
    compiler, unsupported device) so a harvest never dies of it."""
    compiled = torch.compile(batch_reduce)

    def reduce(acts: Tensor, first: int) -> tuple[Tensor, ...]:
        nonlocal compiled
        try:
            return compiled(acts, first)
        except Exception as exc:  # noqa: BLE001 - any compiler failure means "run eager"
            if compiled is batch_reduce:
                raise
            log.warning("torch.compile failed (%s: %s); using eager reductions",
                        type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
            compiled = batch_reduce
            return batch_reduce(acts, first)

    return reduce


def fast_reduce(device: torch.device | str) -> Callable[[Tensor, int], tuple[Tensor, ...]]:
    """The fastest exact batch_reduce for a device: the native C loop for float32 CPU tensors
    where a C compiler builds it, else batch_reduce fused by torch.compile."""
    compiled = compiled_reduce()
    if torch.device(device).type != "cpu":
        return compiled
    from workers import native

    if native.load() is None:
        return compiled

    def reduce(acts: Tensor, first: int) -> tuple[Tensor, ...]:
        if acts.dtype == torch.float32 and acts.device.type == "cpu":
            return native.native_reduce(acts, first)
        return compiled(acts, first)

    return reduce


class Harvester:
    """Runs shards of a tokenized dataset through a model and accumulates every source."""

    def __init__(self, lm, tokens: Tensor, sources: list[SourceSpec], cfg: HarvestConfig,
                 *, bos_first: bool):
        if not sources:
            raise ValueError("nothing to harvest: no sources")
        slugs = [s.slug for s in sources]
        if len(set(slugs)) != len(slugs):
            raise ValueError(f"duplicate source slugs: {slugs}")
        self.lm = lm
        self.tokens = tokens
        self.shards = Shards.of(tokens, cfg)
        self.sources = sources
        self.cfg = cfg
        self.first = 1 if bos_first else 0
        self.window = min(cfg.window, tokens.shape[1])
        self.hooks = sorted({s.hook_name for s in sources})
        device = torch.device(lm.device)
        self.sync_free = cfg.sync_free if cfg.sync_free is not None else device.type == "cuda"
        if device.type == "cuda":
            self.tokens = tokens.pin_memory()
        self.reduce_fn = fast_reduce(device) if cfg.compile else batch_reduce
        self.native = False
        if cfg.compile and device.type == "cpu":
            from workers import native

            self.native = native.load() is not None

    @property
    def n_shards(self) -> int:
        return len(self.shards)

    def _accumulator(self, spec: SourceSpec, device) -> Accumulator:
        kw = dict(top_k=self.cfg.top_k, sample_size=self.cfg.sample_size, window=self.window,
                  bottom=spec.bottom, first=self.first, seed=self.cfg.seed, device=device,
                  reduce_fn=self.reduce_fn, sync_free=self.sync_free, native=self.native)
        if spec.kind == "heads":
            from workers.heads import HeadAccumulator

            return HeadAccumulator(spec.n_features, corpus=self.tokens, bos_key=self.first == 1,
                                   **kw)
        return Accumulator(spec.n_features, cofire=self.cfg.relations,
                           zero_size=self.cfg.n_zero, **kw)

    def _sparse(self, spec: SourceSpec) -> bool:
        """Whether a source is filled from its sparse codes (HarvestConfig.sparse)."""
        if not self.cfg.sparse or spec.encode_sparse is None or self.cfg.relations:
            return False
        return not self.sync_free or (spec.sae_config or {}).get("architecture") == "topk"

    def run_shard(self, shard: int, progress: Callable[[int], None] | None = None
                  ) -> dict[str, SourceState]:
        device = self.lm.device
        accs = {s.slug: self._accumulator(s, device) for s in self.sources}
        by_hook: dict[str, list[SourceSpec]] = {}
        for s in self.sources:
            by_hook.setdefault(s.hook_name, []).append(s)
        sparse = {s.slug for s in self.sources if self._sparse(s)}

        lo, hi = self.shards.range(shard)
        for b0 in range(lo, hi, self.cfg.batch_size):
            b1 = min(b0 + self.cfg.batch_size, hi)
            ids = self.tokens[b0:b1].to(device, non_blocking=True)

            def on_activation(hook_name: str, act: Tensor, b0: int = b0) -> None:
                for spec in by_hook[hook_name]:
                    acc = accs[spec.slug]
                    if spec.slug in sparse:
                        acc.update_sparse(spec.encode_sparse(act), *act.shape[:2], b0)
                    else:
                        acc.update(act if spec.encode is None else spec.encode(act), b0)

            self.lm.run_with_hooks(ids, self.hooks, on_activation)
            if progress is not None:
                progress((b1 - b0) * ids.shape[1])
        states = {}
        for slug, acc in accs.items():
            st = acc.finish()
            st.shards = frozenset({shard})
            states[slug] = st
        return states


def merge_states(a: dict[str, SourceState] | None, b: dict[str, SourceState]
                 ) -> dict[str, SourceState]:
    if a is None:
        return b
    return {slug: a[slug].merge(b[slug]) for slug in a}


def _plain(state: SourceState) -> dict:
    """A state as tensors, numbers, lists and dicts only (what torch.load's weights_only reads)."""
    def ranked(r: Ranked | None) -> dict | None:
        return None if r is None else {f.name: getattr(r, f.name) for f in fields(Ranked)}

    cofire = state.cofire
    return {"top": ranked(state.top), "bottom": ranked(state.bottom),
            "sample": ranked(state.sample), "zero": ranked(state.zero),
            "stats": {f.name: getattr(state.stats, f.name) for f in fields(Stats)},
            "n_sequences": state.n_sequences, "shards": sorted(state.shards),
            "cofire": None if cofire is None else {f.name: getattr(cofire, f.name)
                                                   for f in fields(CoFiring)},
            "sums": dict(state.sums)}


def _from_plain(d: dict) -> SourceState:
    def ranked(r: dict | None) -> Ranked | None:
        return None if r is None else Ranked(**r)

    return SourceState(
        top=Ranked(**d["top"]), bottom=ranked(d["bottom"]), sample=Ranked(**d["sample"]),
        zero=ranked(d.get("zero")), stats=Stats(**d["stats"]), n_sequences=d["n_sequences"],
        shards=frozenset(d["shards"]),
        cofire=None if d.get("cofire") is None else CoFiring(**d["cofire"]),
        sums=d.get("sums", {}))


class Checkpoint:
    """The merged state of the finished shards of one run, saved atomically after each shard."""

    def __init__(self, directory: Path, key: str):
        self.dir = Path(directory) / key
        self.path = self.dir / "state.pt"

    @staticmethod
    def key_for(**parts) -> str:
        blob = json.dumps(parts, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def load(self) -> dict[str, SourceState] | None:
        """The saved states; None without a checkpoint, or with one this version cannot read
        (the run then starts afresh). Only tensors and plain values are read back
        (`weights_only`): a checkpoint cannot run code."""
        if not self.path.exists():
            return None
        try:
            saved = torch.load(self.path, map_location="cpu", weights_only=True)
            return {slug: _from_plain(d) for slug, d in saved.items()}
        except (pickle.UnpicklingError, RuntimeError, KeyError, TypeError, AttributeError) as exc:
            log.warning("the checkpoint %s is not one this version reads (%s); starting afresh",
                        self.path, str(exc).splitlines()[0][:200] if str(exc) else exc)
            return None

    def save(self, states: dict[str, SourceState]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        torch.save({k: _plain(v.to("cpu")) for k, v in states.items()}, tmp)
        os.replace(tmp, self.path)

    def clear(self) -> None:
        if self.path.exists():
            self.path.unlink()
        if self.dir.exists() and not any(self.dir.iterdir()):
            self.dir.rmdir()


class InProcessBackend:
    """Runs shards one after another in this process, on the harvester's device."""

    def __init__(self, harvester: Harvester):
        self.harvester = harvester

    def run(self, shards: list[int], progress: Callable[[int], None] | None = None
            ) -> Iterator[tuple[int, dict[str, SourceState]]]:
        """(shard, its states on the CPU) for each shard, in order; `progress` gets the tokens
        of every batch as it finishes."""
        for shard in shards:
            states = self.harvester.run_shard(shard, progress)
            yield shard, {k: v.to("cpu") for k, v in states.items()}


def harvest_shards(backend, shards: Shards, checkpoint: Checkpoint | None = None,
                   progress: Callable[[int], None] | None = None,
                   after_shard: Callable[[int], None] | None = None) -> dict[str, SourceState]:
    """Every shard not yet in the checkpoint, run by `backend` and merged into it (saved after
    each); returns the merged states of all shards, on the CPU. `progress` first gets the
    tokens of the shards the checkpoint already holds, then the backend's."""
    merged = checkpoint.load() if checkpoint else None
    done: frozenset[int] = next(iter(merged.values())).shards if merged else frozenset()
    if done:
        log.info("resuming: %d of %d shards already done", len(done), len(shards))
        if progress is not None:
            progress(shards.tokens(done))
    todo = [s for s in range(len(shards)) if s not in done]
    if todo:
        for shard, states in backend.run(todo, progress):
            merged = merge_states(merged, states)
            if checkpoint is not None:
                checkpoint.save(merged)
            if after_shard is not None:
                after_shard(shard)
    return merged


def run_harvest(harvester: Harvester, checkpoint: Checkpoint | None = None,
                progress: Callable[[int], None] | None = None,
                after_shard: Callable[[int], None] | None = None) -> dict[str, SourceState]:
    """Every shard of the harvester's dataset in this process (resumed from `checkpoint`)."""
    return harvest_shards(InProcessBackend(harvester), harvester.shards, checkpoint, progress,
                          after_shard)
