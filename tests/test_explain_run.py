"""`featurescope explain` on a tiny real harvest: the tokens explainer against a brute-force
summary of the harvest, feature ranges, resume after a kill, and clear errors."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from explain_world import SAE_SOURCE, Harvested, copy_db, explanations, harvest_db
from sqlalchemy import create_engine, text

from app.cli import main
from workers.explain.run import parse_features
from workers.explain.tokens import show

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def harvested(tmp_path_factory, tiny_llama_dir) -> Harvested:
    return harvest_db(tiny_llama_dir, tmp_path_factory.mktemp("explain"))


def brute_force_summary(tokens, st, f: int, texts: list[str]) -> str:
    """The tokens explainer's line for feature f, from the harvest state and the corpus."""
    fired = [(s, p) for s, p, sc in zip(st.top.seq[:, f].tolist(), st.top.pos[:, f].tolist(),
                                         st.top.score[:, f].tolist(), strict=True)
             if sc != float("-inf")]
    if not fired:
        return "never fires on the harvested text"
    peaks = Counter(tokens[s, p].item() for s, p in fired)
    top = sorted(peaks.items(), key=lambda tc: (-tc[1], tc[0]))[:5]
    merged = Counter()
    for t, c in top:
        merged[texts[t]] += c
    left = Counter(texts[tokens[s, p - 1].item()] for s, p in fired if p > 1)  # BOS: none
    parts = ["peaks on " + ", ".join(f"{show(t)} ({c})" for t, c in merged.most_common(3))]
    if left:
        parts.append("after " + ", ".join(f"{show(t)} ({c})" for t, c in left.most_common(2)))
    return "; ".join(parts)


@pytest.mark.parametrize("source", ["1-mlp", SAE_SOURCE])
def test_tokens_explanations_equal_a_brute_force_summary(harvested, tmp_path, capsys, source):
    h = harvested
    db = copy_db(h.db, tmp_path)
    url = f"sqlite:///{db}"
    assert main(["explain", "--model", h.model, "--source", source, "--features", "0-39",
                 "--db", url, "-q"]) == 0
    out = capsys.readouterr().out
    assert "explained 40 features" in out
    rows = explanations(db)
    assert [r[1] for r in rows] == list(range(40))
    assert {r[3:] for r in rows} == {("tokens", "", "tokens-v1")}
    for _, f, line, *_ in rows:
        want = brute_force_summary(h.tokens, h.states[source], f, h.texts)
        assert line.startswith(want), (f, line, want)
        assert ("promotes " in line) == (want != "never fires on the harvested text")
    # a second run skips them all; a wider range explains only the new ones
    assert main(["explain", "--model", h.model, "--source", source, "--features", "30-45",
                 "--db", url, "-q"]) == 0
    assert f"explained 6 features of {h.model}/{source} (10 already explained)" in \
        capsys.readouterr().out
    assert [r[1] for r in explanations(db)] == list(range(46))


@pytest.mark.parametrize("spec, want", [("all", list(range(6))), ("3", [3]),
                                        ("1-3", [1, 2, 3]), ("0,2-3,2", [0, 2, 3])])
def test_parse_features(spec, want):
    assert parse_features(spec, 6) == want


@pytest.mark.parametrize("args, message", [
    (["--source", "9-mlp"], "no source tiny-llama/9-mlp"),
    (["--source", "1-mlp", "--features", "90-200"], "not within 0-95"),
    (["--source", "1-mlp", "--features", "x"], "--features expects"),
    (["--source", "1-mlp", "--scorer", "vibes"], "--scorer expects"),
    (["--source", "1-mlp", "--explainer", "openai"], "needs --base-url"),
    (["--source", "1-mlp", "--device", "tpu"], "unknown device 'tpu'"),
    pytest.param(["--source", "1-mlp", "--explainer", "local", "--device", "cuda"],
                 "no CUDA GPU is usable here", id="cuda-without-a-gpu",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here")),
])
def test_bad_input_gets_one_clear_error(harvested, tmp_path, capsys, args, message):
    db = copy_db(harvested.db, tmp_path)
    assert main(["explain", "--model", harvested.model, "--db", f"sqlite:///{db}", "-q",
                 *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message.replace("tiny-llama", harvested.model) in err, err
    assert explanations(db) == []


def explain_cmd(model: str, db: Path) -> list[str]:
    return [sys.executable, "-m", "app.cli", "explain", "--model", model, "--source", "0-mlp",
            "--batch-size", "1", "--db", f"sqlite:///{db}", "-q"]


def count(db: Path) -> int:
    eng = create_engine(f"sqlite:///{db}")
    try:
        with eng.connect() as conn:
            return conn.scalar(text("SELECT count(*) FROM explanations"))
    except Exception:  # the tables are not made yet
        return 0
    finally:
        eng.dispose()


def test_killed_explain_resumes_to_the_uninterrupted_result(harvested, tmp_path):
    a, b = copy_db(harvested.db, tmp_path / "a"), copy_db(harvested.db, tmp_path / "b")
    env = {**os.environ, "FEATURESCOPE_DATA_DIR": str(tmp_path / "data"),
           "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(explain_cmd(harvested.model, a), env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while count(a) < 3:
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline, "no explanation appeared"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    written = count(a)
    assert 3 <= written < 96, "killed mid-run"
    kept = explanations(a)
    resumed = subprocess.run(explain_cmd(harvested.model, a), env=env, cwd=REPO,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"explained {96 - written} features" in resumed.stdout
    whole = subprocess.run(explain_cmd(harvested.model, b), env=env, cwd=REPO,
                           capture_output=True, text=True, timeout=300)
    assert whole.returncode == 0, whole.stderr
    assert explanations(a)[:written] == kept  # nothing written before the kill is lost
    assert explanations(a) == explanations(b)  # and nothing is written twice
    assert [r[1] for r in explanations(a)] == list(range(96))


@pytest.mark.postgres
def test_explain_and_resume_on_postgres(tiny_llama_dir, tmp_path, capsys):
    from support import fresh_pg_url, needs_postgres

    needs_postgres()
    url = fresh_pg_url("fs_test_explain_run")
    h = harvest_db(tiny_llama_dir, tmp_path, url)
    for features, new, old in (("0-19", 20, 0), ("10-29", 10, 10)):
        assert main(["explain", "--model", h.model, "--source", SAE_SOURCE, "--features",
                     features, "--db", url, "-q"]) == 0
        assert f"explained {new} features of {h.model}/{SAE_SOURCE} ({old} already " \
            "explained)" in capsys.readouterr().out
    eng = create_engine(url)
    with eng.connect() as conn:
        rows = conn.execute(text("SELECT feature_idx, text FROM explanations "
                                 "ORDER BY feature_idx")).all()
    eng.dispose()
    assert [f for f, _ in rows] == list(range(30))
    for f, line in rows:
        assert line.startswith(brute_force_summary(h.tokens, h.states[SAE_SOURCE], f, h.texts))
