"""`featurescope demo` (`make run`): the explorer served at once, and the demo harvested behind it.

The steps come in the order a newcomer opens their results: the neurons of the first layers,
then those of every layer, then an SAE trained on the residual stream and its features. Each
step leaves out what is already there (and a harvest resumes from its checkpoint), so a rerun
goes on where an interrupted one stopped, and one after a finished run only serves.

The server is `featurescope serve` in a child process (it imports no torch and runs no harvest);
it reads the SQLite file (WAL) while the steps write it, and shows their progress on `/`.
"""

from __future__ import annotations

import _thread
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from app.config import DEFAULT_DATASET, DEFAULT_MODEL, Settings

log = logging.getLogger(__name__)


@dataclass
class DemoConfig:
    """What the demo harvests, and in which order."""

    model: str = DEFAULT_MODEL
    dataset: str = DEFAULT_DATASET
    max_tokens: int | None = None
    """Cap on the corpus tokens of every harvest (None: the whole corpus)."""
    seq_len: int = 128
    first_layers: str = "0-1"
    """The layers whose neurons are harvested first, alone: the first pages to browse."""
    first_tokens: int = 16_384
    """Corpus tokens of that first harvest (a slice, so the first pages come within minutes);
    the next step harvests those layers again over the whole corpus, replacing the slice."""
    sae_hook: str = "blocks.15.hook_resid_post"
    """Where the demo SAE is trained (a hook point of the model)."""
    sae_features: int = 4096
    sae_k: int = 32
    """Active latents of the (TopK) demo SAE."""
    sae_train_tokens: int = 98_304
    sae_dir: Path | None = None
    """Where the trained SAE is written (None: saes/{source slug} in the data directory)."""
    device: str = "auto"
    local_explanations: int = 300
    """SAE features explained with the `local` explainer (the built-in instruct model) after
    every feature is explained with `tokens`; 0: none."""
    progress_bar: bool = True

    def __post_init__(self) -> None:
        from workers.runner import check_layers
        from workers.sae import source_slug

        check_layers(self.first_layers)  # the range is checked once the model is loaded
        source_slug(self.sae_hook, self.sae_features)  # a known hook point
        for name in ("seq_len", "first_tokens", "sae_features", "sae_k", "sae_train_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}")

    @property
    def sae_slug(self) -> str:
        """The demo SAE's source slug, e.g. 15-res-sae-4k."""
        from workers.sae import source_slug

        return source_slug(self.sae_hook, self.sae_features)

    def sae_folder(self, settings: Settings) -> Path:
        return self.sae_dir or settings.data_dir / "saes" / self.sae_slug


@dataclass
class Step:
    """One step of the demo: `run()` does it, or finds it done, and says which."""

    name: str
    run: Callable[[], str]


class Demo:
    """The demo's steps over one database (settings.db_url), run in order by `run()`."""

    def __init__(self, cfg: DemoConfig, settings: Settings, *,
                 after_shard: Callable[[int], None] | None = None,
                 stop: threading.Event | None = None):
        self.cfg = cfg
        self.settings = settings
        self.after_shard = after_shard
        """Called after each finished shard of each harvest (tests interrupt a run with it)."""
        self.stop = stop or threading.Event()
        """Once set, the run ends with a KeyboardInterrupt at the next batch or step."""
        self.model_slug: str | None = None
        """Learned from the first harvest step (the model's slug in the database)."""

    def steps(self) -> list[Step]:
        cfg = self.cfg
        return [
            Step(f"neurons of layers {cfg.first_layers} over the first {cfg.first_tokens:,} "
                 "tokens", lambda: self._harvest(cfg.first_layers, max_tokens=self._first_cap())),
            Step(f"neurons of layers {cfg.first_layers} over the whole corpus",
                 self._harvest_sliced_again),
            Step("neurons of every layer", lambda: self._harvest("all")),
            Step(f"train the SAE {cfg.sae_slug} on {cfg.sae_hook}", self._train),
            Step(f"features of the SAE {cfg.sae_slug}",
                 lambda: self._harvest("none", (self.cfg.sae_folder(self.settings),))),
            Step("explain every feature (tokens)", lambda: self._explain("tokens")),
            Step(f"explain {cfg.local_explanations} SAE features (local)",
                 lambda: self._explain("local")),
        ]

    def run(self, on_step: Callable[[Step, str], None] | None = None) -> list[tuple[str, str]]:
        """Every step in order; returns (step, what it did) for each."""
        done = []
        for i, step in enumerate(self.steps(), 1):
            self._check_stop()
            log.info("demo step %d: %s", i, step.name)
            outcome = step.run()
            log.info("demo step %d: %s: %s", i, step.name, outcome)
            done.append((step.name, outcome))
            if on_step is not None:
                on_step(step, outcome)
        return done

    def _check_stop(self, *_progress: int) -> None:
        if self.stop.is_set():
            raise KeyboardInterrupt

    def _sae_harvested(self) -> bool:
        from app.db.engine import make_engine
        from workers import store

        engine = make_engine(self.settings.db_url)
        try:
            return self.cfg.sae_slug in store.ready_sources(engine, self.model_slug or "")
        finally:
            engine.dispose()

    def _first_cap(self) -> int:
        cap = self.cfg.max_tokens
        return self.cfg.first_tokens if cap is None else min(cap, self.cfg.first_tokens)

    def _sliced_layers(self) -> list[str]:
        """The layers whose neurons only the first step harvested, over its slice: sources that
        stopped at the slice's cap (a corpus shorter than the slice was harvested whole)."""
        from sqlalchemy import select

        from app.db.engine import make_engine, transaction
        from app.db.tables import Model, Source, SourceKind, SourceStatus

        cap, seq_len = self._first_cap(), self.cfg.seq_len
        engine = make_engine(self.settings.db_url)
        try:
            with transaction(engine) as session:
                rows = session.execute(
                    select(Source.layer, Source.total_tokens)
                    .join(Model, Model.id == Source.model_id)
                    .where(Model.slug == (self.model_slug or ""),
                           Source.kind == SourceKind.neurons,
                           Source.status == SourceStatus.ready)).all()
        finally:
            engine.dispose()
        return sorted(str(layer) for layer, n in rows if cap - seq_len < n <= cap)

    def _harvest_sliced_again(self) -> str:
        cap = self.cfg.max_tokens
        if cap is not None and cap <= self.cfg.first_tokens:
            return "already harvested"  # the first step's slice was all there is to harvest
        layers = self._sliced_layers()
        if not layers:
            return "already harvested"
        return self._harvest(",".join(layers), replace=True)

    def _harvest(self, layers: str, saes: tuple[Path, ...] = (), *,
                 max_tokens: int | None = None, replace: bool = False) -> str:
        from workers.runner import HarvestRunner, RunConfig

        if saes and self._sae_harvested():
            return "already harvested"
        settings, cfg = self.settings, self.cfg
        result = HarvestRunner(RunConfig(
            db_url=settings.db_url, model=cfg.model, dataset=cfg.dataset, layers=layers,
            saes=[str(s) for s in saes], max_tokens=max_tokens or cfg.max_tokens,
            seq_len=cfg.seq_len, device=cfg.device, cache_dir=settings.cache_dir,
            checkpoint_dir=settings.checkpoint_dir, skip_existing=not replace, replace=replace,
            progress_bar=cfg.progress_bar), after_shard=self.after_shard,
            on_progress=self._check_stop).run()
        self.model_slug = result.model
        if not result.written:
            return "already harvested"
        return f"harvested {', '.join(result.written)}"

    def _explain(self, explainer: str) -> str:
        """Every feature of every ready source with `tokens`; the first local_explanations
        features of the SAE with `local`. Features already explained are left out."""
        from app.db.engine import make_engine
        from workers import store
        from workers.explain.backends import make_explainer
        from workers.explain.run import ExplainRun
        from workers.loading import resolve_device

        n_local = self.cfg.local_explanations
        if explainer == "local" and not n_local:
            return "left out"
        engine = make_engine(self.settings.db_url)
        try:
            slugs = sorted(store.ready_sources(engine, self.model_slug or ""))
        finally:
            engine.dispose()
        if explainer == "local":
            slugs = [s for s in slugs if s == self.cfg.sae_slug]
        made = make_explainer(explainer, cache_dir=self.settings.cache_dir,
                              device=resolve_device(self.cfg.device))
        n = 0
        for slug in slugs:
            n += ExplainRun(db_url=self.settings.db_url, model=self.model_slug, source=slug,
                            explainer=made, batch_size=256 if explainer == "tokens" else 16,
                            features=(f"0-{min(n_local, self.cfg.sae_features) - 1}"
                                      if explainer == "local" else "all"),
                            progress_bar=self.cfg.progress_bar).run().explained
        return f"explained {n} features" if n else "already explained"

    def _train(self) -> str:
        from workers.loading import resolve_device
        from workers.sae import CFG_FILE
        from workers.train import TrainConfig, train_sae_on

        out = self.cfg.sae_folder(self.settings)
        if (out / CFG_FILE).is_file():
            return "already trained"
        if self._sae_harvested():
            return "already harvested"
        cfg = self.cfg
        train_sae_on(cfg.model, cfg.dataset, TrainConfig(
            hook_name=cfg.sae_hook, d_sae=cfg.sae_features, k=cfg.sae_k,
            max_tokens=cfg.sae_train_tokens), out, seq_len=cfg.seq_len,
            device=resolve_device(cfg.device), cache_dir=self.settings.cache_dir,
            progress=cfg.progress_bar)
        return f"trained into {out}"


class ServerStopped(RuntimeError):
    """The server child exited while the demo ran."""


_STOPPED_BY_SIGNAL = (0, -signal.SIGINT, -signal.SIGTERM)
"""How the server ends when Ctrl-C or `kill` reaches it too (uvicorn shuts down, then re-raises
the signal): an interruption of the demo, not a failure."""


@contextmanager
def serving(settings: Settings, stop: threading.Event, *, wait_s: float = 120
            ) -> Iterator[subprocess.Popen]:
    """`featurescope serve` on settings.host:port as a child process, listening when the block
    starts and stopped when it ends. If the server exits on its own meanwhile, `stop` is set
    and the block interrupted; `ServerStopped` is raised once it ends, unless the server was
    stopped by a signal (Ctrl-C, `kill`)."""
    host, port = settings.host, settings.port
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise ServerStopped(f"cannot serve on {host}:{port} ({exc.strerror}): set "
                                "FEATURESCOPE_PORT or pass --port") from None
    env = {**os.environ, "FEATURESCOPE_HOST": host, "FEATURESCOPE_PORT": str(port),
           "FEATURESCOPE_DATA_DIR": str(settings.data_dir), "FEATURESCOPE_ACCESS_LOG": "false"}
    if settings.database_url:
        env["FEATURESCOPE_DATABASE_URL"] = settings.database_url
    proc = subprocess.Popen([sys.executable, "-m", "app.cli", "serve"], env=env,
                            preexec_fn=_end_with_parent if sys.platform == "linux" else None)
    ending = threading.Event()
    stopped: list[int] = []

    def watch() -> None:
        code = proc.wait()
        if not ending.is_set():
            stopped.append(code)
            stop.set()
            _thread.interrupt_main()

    threading.Thread(target=watch, name="server-watch", daemon=True).start()
    try:
        _wait_listening(proc, host, port, wait_s)
        yield proc
    except KeyboardInterrupt:
        if stopped and stopped[0] not in _STOPPED_BY_SIGNAL:
            raise ServerStopped(f"the server stopped (exit status {stopped[0]})") from None
        raise
    finally:
        ending.set()
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _end_with_parent() -> None:
    """In the server child (Linux): SIGTERM when the demo dies, even of SIGKILL."""
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def _wait_listening(proc: subprocess.Popen, host: str, port: int, wait_s: float) -> None:
    addr = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    deadline = time.monotonic() + wait_s
    while True:
        try:
            with socket.create_connection((addr, port), timeout=1):
                return
        except OSError:
            if proc.poll() is not None:
                raise ServerStopped(f"the server did not start (exit status {proc.returncode})"
                                    ) from None
            if time.monotonic() > deadline:
                raise ServerStopped(f"the server did not listen on {host}:{port} within "
                                    f"{wait_s:.0f} s") from None
            time.sleep(0.1)


def run_demo(cfg: DemoConfig, settings: Settings, *, serve: bool = True) -> int:
    """`featurescope demo`: serve (unless not `serve`), run the steps, then keep serving until
    interrupted. Returns the exit status."""
    from app.db.engine import make_engine, upgrade

    engine = make_engine(settings.db_url)
    upgrade(engine)  # before the server starts: one migration, not two racing
    engine.dispose()
    stop = threading.Event()
    demo = Demo(cfg, settings, stop=stop)
    url = f"http://{settings.host}:{settings.port}"
    finished = False

    def on_sigterm(signum, frame) -> None:  # `kill` stops it like Ctrl-C
        stop.set()  # checked again at every batch: Python drops an exception raised from a
        raise KeyboardInterrupt  # signal handler that runs inside a finalizer

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        if not serve:
            demo.run()
            print("the demo is done")
            return 0
        with serving(settings, stop):
            print(f"serving {url} while the demo is harvested; Ctrl-C stops both", flush=True)
            demo.run()
            finished = True
            print(f"the demo is done; serving {url} until Ctrl-C", flush=True)
            stop.wait()
            raise KeyboardInterrupt
    except KeyboardInterrupt:
        if finished:
            return 0
        print("interrupted: run the same command again to resume", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0

