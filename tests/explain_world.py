"""A tiny real harvest in a SQLite file for the tests of explainers and scorers (imported by
name, like `support`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from support import HOOK, random_sae

SEQ_LEN = 32
SAE_FEATURES = 48
SAE_SOURCE = "1-res-sae-48"


@dataclass(frozen=True)
class Harvested:
    db: Path
    model: str
    tokens: object  # [n, seq] token ids
    states: dict
    texts: list[str]  # the display text of every token id


def harvest_db(model_dir: Path, folder: Path, url: str | None = None) -> Harvested:
    """The neurons of layers 0 and 1 of the model at model_dir and a random TopK SAE on
    blocks.1.hook_resid_post (SAE_SOURCE, whose features have non-activating examples, which
    the always-firing gated neurons lack) over pydoc, stored in a SQLite file in `folder` (or
    the database at `url`)."""
    from app.db.engine import make_engine, upgrade
    from workers import store
    from workers.corpus import load_dataset
    from workers.finalize import finalize
    from workers.harvest import HarvestConfig, Harvester, neuron_sources, run_harvest
    from workers.loading import load_model
    from workers.sae import sae_sources, save_sae

    lm = load_model(str(model_dir))
    ds = load_dataset("pydoc", lm.tokenizer, seq_len=SEQ_LEN, max_tokens=48 * SEQ_LEN)
    sae = random_sae("topk", d_in=lm.d_model, d_sae=SAE_FEATURES, hook=HOOK, seed=3)
    specs = neuron_sources(lm, [0, 1]) + sae_sources(lm, [str(save_sae(sae, folder / "sae"))])
    cfg = HarvestConfig(top_k=5, n_ranges=2, per_range=2, window=12, batch_size=8, n_zero=4)
    states = run_harvest(Harvester(lm, ds.tokens, specs, cfg, bos_first=True))
    db = folder / "h.db"
    engine = make_engine(url or f"sqlite:///{db}")
    upgrade(engine)
    store.write(engine, store.begin(engine, lm, ds, specs, cfg),
                finalize(lm, ds, specs, states, cfg))
    engine.dispose()
    return Harvested(db, lm.slug, ds.tokens, states, lm.token_strings())


def copy_db(src: Path, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    dst = folder / "copy.db"
    dst.write_bytes(src.read_bytes())
    return dst


def query(db: Path, sql: str) -> list[tuple]:
    """The rows of one SQL query on the SQLite file `db`."""
    from sqlalchemy import create_engine, text

    eng = create_engine(f"sqlite:///{db}")
    try:
        with eng.connect() as conn:
            return [tuple(r) for r in conn.execute(text(sql))]
    finally:
        eng.dispose()


def explanations(db: Path) -> list[tuple]:
    """(source, feature, text, explainer, explainer model, prompt version) of every stored
    explanation, by source, feature and id."""
    return query(db, "SELECT s.slug, e.feature_idx, e.text, e.explainer, e.explainer_model, "
                 "e.prompt_version FROM explanations e JOIN sources s ON s.id = e.source_id "
                 "ORDER BY s.slug, e.feature_idx, e.id")
