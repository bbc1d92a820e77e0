"""`featurescope demo` on a tiny model: its steps in order, a rerun that does nothing, resume
after an interrupt, and the server it starts before it harvests and stops when interrupted."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from sqlalchemy import create_engine, text
from support import free_port

from app.config import Settings
from workers.demo import Demo, DemoConfig

REPO = Path(__file__).resolve().parents[1]
TINY = dict(dataset="pydoc", max_tokens=600 * 32, seq_len=32, first_layers="0",
            first_tokens=96 * 32,
            sae_hook="blocks.1.hook_resid_post", sae_features=32, sae_k=4,
            sae_train_tokens=16 * 32, device="cpu", local_explanations=0, progress_bar=False)
SAE = "1-res-sae-32"


def sources(settings: Settings) -> dict[str, tuple[str, object]]:
    """slug -> (status, finished_at) of every source in the database."""
    eng = create_engine(settings.db_url)
    with eng.connect() as conn:
        rows = conn.execute(text("SELECT slug, status, finished_at FROM sources")).all()
    eng.dispose()
    return {r.slug: (r.status, r.finished_at) for r in rows}


def ready(settings: Settings) -> set[str]:
    return {slug for slug, (status, _) in sources(settings).items() if status == "ready"}


def total_tokens(settings: Settings) -> dict[str, int]:
    eng = create_engine(settings.db_url)
    with eng.connect() as conn:
        rows = conn.execute(text("SELECT slug, total_tokens FROM sources")).all()
    eng.dispose()
    return dict(rows)


def test_steps_run_first_layers_first_and_a_rerun_does_nothing(tmp_path, tiny_llama_dir):
    """The first layers over a slice of the corpus first, then again over all of it."""
    settings = Settings(data_dir=tmp_path)
    cfg = DemoConfig(model=str(tiny_llama_dir), **TINY)
    readable, harvested = [], []

    def after(step, _):
        readable.append(ready(settings))
        harvested.append(total_tokens(settings).get("0-mlp"))

    done = Demo(cfg, settings).run(after)
    sae_dir = tmp_path / "saes" / SAE
    assert [outcome for _, outcome in done] == [
        "harvested 0-mlp", "harvested 0-mlp", "harvested 1-mlp", f"trained into {sae_dir}",
        f"harvested {SAE}", f"explained {96 + 96 + 32} features", "left out"]
    # what a reader of the database could open after each step, and over how many tokens
    everything = {"0-mlp", "1-mlp", SAE}
    assert readable == [{"0-mlp"}, {"0-mlp"}, {"0-mlp", "1-mlp"}, {"0-mlp", "1-mlp"},
                        everything, everything, everything]
    assert harvested == [TINY["first_tokens"]] + [TINY["max_tokens"]] * 6
    eng = create_engine(settings.db_url)
    with eng.connect() as conn:
        explained = conn.execute(text(
            "SELECT s.slug, count(*), min(e.explainer) FROM explanations e JOIN sources s "
            "ON s.id = e.source_id GROUP BY s.slug")).all()
    eng.dispose()
    assert sorted(explained) == [("0-mlp", 96, "tokens"), ("1-mlp", 96, "tokens"),
                                 (SAE, 32, "tokens")]
    assert (sae_dir / "cfg.json").is_file()
    before = sources(settings)

    again = Demo(cfg, settings).run()
    assert [outcome for _, outcome in again] == [
        "already harvested", "already harvested", "already harvested", "already trained",
        "already harvested", "already explained", "left out"]
    assert sources(settings) == before  # nothing written again


def test_an_interrupted_demo_resumes_where_it_stopped(tmp_path, tiny_llama_dir, caplog):
    settings = Settings(data_dir=tmp_path)
    cfg = DemoConfig(model=str(tiny_llama_dir), **TINY)
    shards = []

    def interrupt_in_third_step(shard: int) -> None:  # (0-mlp is building in the second)
        shards.append(shard)
        if ready(settings) == {"0-mlp"} and shard == 0:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        Demo(cfg, settings, after_shard=interrupt_in_third_step).run()
    assert {s: st for s, (st, _) in sources(settings).items()} == {
        "0-mlp": "ready", "1-mlp": "building"}
    assert list((tmp_path / "checkpoints").glob("*/state.pt"))
    with caplog.at_level(logging.INFO, logger="workers.harvest"):
        done = Demo(cfg, settings).run()
    assert "resuming: 1 of 3 shards already done" in caplog.text
    assert [outcome for _, outcome in done][:3] == ["already harvested", "already harvested",
                                                    "harvested 1-mlp"]
    assert ready(settings) == {"0-mlp", "1-mlp", SAE}
    assert not list((tmp_path / "checkpoints").glob("*/state.pt"))


def _interruptible() -> None:
    """In the demo's process before it starts: Ctrl-C (SIGINT) delivered as a terminal delivers
    it, whatever the test process does with it (an ignored or blocked signal is inherited)."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start_demo(data_dir: Path, model_dir: Path, port: int) -> tuple[subprocess.Popen, str]:
    """`featurescope demo` in a process of its own, read until its steps are done: (process,
    what it printed)."""
    env = {**os.environ, "FEATURESCOPE_DATA_DIR": str(data_dir), "PYTHONPATH": str(REPO)}
    small = {**TINY, "max_tokens": 48 * 32}
    args = [f"--{k.replace('_', '-')}={v}" for k, v in small.items() if k != "progress_bar"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "demo", "--model", str(model_dir), *args,
         "--port", str(port), "-q"], cwd=REPO, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, start_new_session=True,
        preexec_fn=_interruptible)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if "the demo is done" in line:
            break
    return proc, "".join(lines)


def port_closes(port: int) -> bool:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        except OSError:
            return True
        time.sleep(0.1)
    return False


def test_demo_serves_before_it_harvests_and_stops_its_server(tmp_path, tiny_llama_dir):
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc, out = start_demo(tmp_path, tiny_llama_dir, port)
    try:
        assert "the demo is done" in out, out
        # the server's own start-up line comes before the first step: it listened first
        assert f"on {base}" in out and "demo step 1:" in out, out
        assert out.index(f"on {base}") < out.index("demo step 1:"), out
        home = httpx.get(f"{base}/.json").json()
        slug = home["models"][0]["slug"]
        assert {s["slug"] for s in home["models"][0]["sources"]} == {"0-mlp", "1-mlp", SAE}
        assert httpx.get(f"{base}/{slug}/0-mlp/3").status_code == 200
        assert httpx.get(f"{base}/{slug}/{SAE}/3").status_code == 200
        proc.send_signal(signal.SIGINT)  # the demo only: it stops its server
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert port_closes(port)

    # Run again: everything is there, so it only serves. `kill` on its process group (as a
    # service manager stops it) ends both quietly.
    proc, out = start_demo(tmp_path, tiny_llama_dir, port)
    try:
        assert out.count(": already ") == 6, out
        assert httpx.get(f"{base}/{slug}/1-mlp/3").status_code == 200
        os.killpg(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert port_closes(port)

    # A server that dies ends the demo, with an error; a demo killed outright takes its server
    # with it.
    proc, out = start_demo(tmp_path, tiny_llama_dir, port)
    try:
        server = int(Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()[0])
        os.kill(server, signal.SIGKILL)
        rest, _ = proc.communicate(timeout=60)
        assert proc.returncode == 2 and "the server stopped (exit status -9)" in rest, rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    proc, out = start_demo(tmp_path, tiny_llama_dir, port)
    proc.kill()
    proc.wait()
    assert port_closes(port)
