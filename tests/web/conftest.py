"""Fixtures of the web tests: tiny real models harvested once per session into a SQLite file
(neurons, an SAE-like source with metrics, a source still building, and a corpus full of HTML
and script payloads), the app over it, and a real uvicorn server for the browser."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from support import (
    BROWSER_ARGS,
    CHROMIUM,
    LOOPBACK,
    LiveWorld,
    disposing_engines,
    fresh_pg_url,
    needs_chromium,
    needs_postgres,
    serve_in_thread,
)

from app.config import Settings
from app.db.engine import make_engine, upgrade
from app.main import create_app

SEQ_LEN = 32
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"

# Payloads that must reach the page as plain text and run nothing.
XSS_LINES = [
    '<script>window.__pwned = 1; alert("xss")</script>',
    '<img src=x onerror="window.__pwned = 2">',
    "</textarea><script>document.title = 'pwned'</script>",
    "{{ 7 * 7 }} {% if true %}jinja{% endif %} ${7*7}",
    "\"double\" 'single' `back` &amp; &lt;b&gt; </title></style><svg onload=alert(3)>",
    "<a href=\"javascript:alert(4)\">link</a> <!-- comment --> ]]> </script>",
]


@dataclass
class Harvest:
    lm: object
    dataset: object
    specs: list
    states: dict
    cfg: object
    building: list  # specs registered but never finished


@dataclass
class WebDB:
    url: str
    engine: object
    llama: str  # model slugs
    gpt2: str


def fake_sae(lm, layer: int, n: int = 48, seed: int = 0):
    """An SAE-like source (ReLU encoder, random directions) on the residual stream: features
    that only fire positively, with sae_config metrics for the source page."""
    import torch

    from workers.harvest import SourceSpec

    g = torch.Generator().manual_seed(seed)
    w_enc = torch.randn(lm.d_model, n, generator=g) / lm.d_model**0.5
    w_dec = w_enc.T.contiguous()
    hook = f"blocks.{layer}.hook_resid_post"
    return SourceSpec(
        slug=f"{layer}-res-sae-{n}", kind="sae", hook_name=hook, layer=layer, n_features=n,
        bottom=False, encode=lambda x: torch.relu(x.float() @ w_enc - 0.2),
        directions=lambda: w_dec,
        sae_config={"architecture": "relu", "d_in": lm.d_model, "d_sae": n, "hook_name": hook,
                    "metrics": {"l0": 11.5, "variance_explained": 0.812,
                                "loss_recovered": 0.934, "dead_fraction": 0.0208}})


def _harvest(model_dir, corpus: str, max_tokens: int, layers, extra=(), building=()):
    from workers.corpus import load_dataset
    from workers.harvest import HarvestConfig, Harvester, neuron_sources, run_harvest
    from workers.loading import load_model

    cfg = HarvestConfig(top_k=6, n_ranges=3, per_range=3, window=16, batch_size=8,
                        shard_sequences=64, relations=True)
    lm = load_model(str(model_dir))
    ds = load_dataset(corpus, lm.tokenizer, seq_len=SEQ_LEN, max_tokens=max_tokens)
    specs = neuron_sources(lm, list(layers)) + [f(lm) for f in extra]
    states = run_harvest(Harvester(lm, ds.tokens, specs, cfg, bos_first=True))
    return Harvest(lm, ds, specs, states, cfg, [f(lm) for f in building])


@pytest.fixture(scope="session")
def harvests(tiny_llama_dir, tiny_gpt2_dir, tmp_path_factory) -> list[Harvest]:
    corpus = tmp_path_factory.mktemp("xss") / "payloads.txt"
    lines = [f"{i}: {line} The end of line {i}.\n\t" for i in range(12) for line in XSS_LINES]
    corpus.write_text("".join(lines), encoding="utf-8")
    return [
        _harvest(tiny_llama_dir, "pydoc", 40 * SEQ_LEN, [0, 1],
                 extra=[lambda lm: fake_sae(lm, 1)],
                 building=[lambda lm: fake_sae(lm, 0, n=32, seed=1)]),
        _harvest(tiny_gpt2_dir, str(corpus), 24 * SEQ_LEN, [0]),
    ]


def write_harvests(url: str, harvests: list[Harvest]) -> WebDB:
    from workers import store
    from workers.finalize import finalize

    engine = make_engine(url)
    upgrade(engine)
    for h in harvests:
        reg = store.begin(engine, h.lm, h.dataset, h.specs, h.cfg)
        store.write(engine, reg, finalize(h.lm, h.dataset, h.specs, h.states, h.cfg))
        if h.building:
            reg = store.begin(engine, h.lm, h.dataset, h.building, h.cfg)
            store.report_progress(engine, reg, h.dataset.n_tokens // 3)
    return WebDB(url=url, engine=engine, llama=harvests[0].lm.slug, gpt2=harvests[-1].lm.slug)


@pytest.fixture(scope="session")
def web_db(harvests, tmp_path_factory) -> WebDB:
    path = tmp_path_factory.mktemp("web") / "featurescope.db"
    return write_harvests(f"sqlite:///{path}", harvests)


@pytest.fixture(scope="session")
def app(web_db):
    return create_app(Settings(database_url=web_db.url), engine=web_db.engine)


@pytest.fixture(scope="session")
def client(app) -> TestClient:
    with TestClient(app) as c:
        yield c


@pytest.fixture(scope="module")
def local(app) -> TestClient:
    """A client on this machine (loopback): a server bound to loopback lets it run the model
    without a key, as `make run` does."""
    with TestClient(app, client=LOOPBACK) as c:
        yield c


@pytest.fixture(scope="session")
def live_server(app) -> str:
    """A real uvicorn server over the session's database, in a thread; yields its base URL."""
    with serve_in_thread(app) as url:
        yield url


@pytest.fixture(scope="session")
def browser():
    """Debian's headless Chromium; where it is missing the browser tests skip (in CI: fail)."""
    needs_chromium()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=BROWSER_ARGS, headless=True)
        yield b
        b.close()


@pytest.fixture(scope="session")
def artifacts() -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS


@pytest.fixture(scope="session")
def write_db(harvests):
    """Writes the session's harvests (by default all) into another database URL."""
    return lambda url, which=slice(None): write_harvests(url, harvests[which])


BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


def module_db_url(request, tmp: Path) -> str:
    """The database of a test module parametrized over BACKENDS: a SQLite file in `tmp`, or a
    fresh PostgreSQL database named after the module."""
    name = request.module.__name__.rsplit(".", 1)[-1]
    if request.param == "sqlite":
        return f"sqlite:///{tmp / 'featurescope.db'}"
    needs_postgres()
    return fresh_pg_url(f"fs_test_{name}")


@pytest.fixture(scope="module", params=BACKENDS)
def llama_db(request, write_db, tmp_path_factory) -> WebDB:
    """The tiny Llama's harvest (neurons, an SAE, a building source) in a SQLite file of the
    test module's own, and in a fresh PostgreSQL database: for tests that write."""
    url = module_db_url(request, tmp_path_factory.mktemp("llama"))
    with disposing_engines(url):
        yield write_db(url, slice(0, 1))


@pytest.fixture(scope="module", params=BACKENDS)
def live_world(request, tiny_llama_dir, tmp_path_factory) -> Iterator[LiveWorld]:
    """The tiny Llama's live world (`support.LiveWorld`) in a SQLite file of the test module's
    own, and in a fresh PostgreSQL database."""
    tmp = tmp_path_factory.mktemp("live")
    url = module_db_url(request, tmp)
    with disposing_engines(url):
        yield LiveWorld(tiny_llama_dir, tmp, url)
