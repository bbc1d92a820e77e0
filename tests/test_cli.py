"""The `featurescope` command end to end: real processes, real kills, the real default model."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from sqlalchemy import create_engine, text
from support import LOOPBACK, stored_examples

from app.cli import main
from workers.runner import parse_layers

REPO = Path(__file__).resolve().parents[1]
SHARED_CACHE = REPO / "data" / "cache"


def harvest_cmd(model_dir: Path, db: Path) -> list[str]:
    return [sys.executable, "-m", "app.cli", "harvest", "--model", str(model_dir),
            "--dataset", "pydoc", "--max-tokens", str(480 * 32), "--seq-len", "32",
            "--batch-size", "4", "--shard-sequences", "16", "--top-k", "6", "--window", "12",
            "--no-compile", "--db", f"sqlite:///{db}", "-q"]


def dump(db: Path) -> tuple[list, list]:
    eng = create_engine(f"sqlite:///{db}")
    with eng.connect() as conn:
        feats = conn.execute(text(
            "SELECT s.slug, f.* FROM features f JOIN sources s ON s.id = f.source_id "
            "ORDER BY s.slug, f.idx")).all()
        exs = conn.execute(text(
            "SELECT s.slug, e.* FROM example_blocks e JOIN sources s ON s.id = e.source_id "
            "ORDER BY s.slug, e.feature_idx, e.\"group\"")).all()
        status = {r.status for r in conn.execute(text("SELECT status FROM sources"))}
    eng.dispose()
    assert status == {"ready"}
    # drop the source ids: the two databases number them independently
    return [tuple(r[:1]) + tuple(r[2:]) for r in feats], [tuple(r[:1]) + tuple(r[2:]) for r in exs]


def test_killed_harvest_resumes_to_the_uninterrupted_result(tmp_path, tiny_llama_dir):
    env = {**os.environ, "FEATURESCOPE_DATA_DIR": str(tmp_path / "a")}
    proc = subprocess.Popen(harvest_cmd(tiny_llama_dir, tmp_path / "a.db"), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO)
    ckpt_root = tmp_path / "a" / "checkpoints"
    deadline = time.monotonic() + 120
    while not list(ckpt_root.glob("*/state.pt")):
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    with create_engine(f"sqlite:///{tmp_path / 'a.db'}").connect() as conn:
        assert {r[0] for r in conn.execute(text("SELECT status FROM sources"))} == {"building"}

    resumed = subprocess.run(harvest_cmd(tiny_llama_dir, tmp_path / "a.db"), env=env,
                             capture_output=True, text=True, cwd=REPO, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming:" in resumed.stderr
    assert not list(ckpt_root.glob("*/state.pt")), "the checkpoint is cleared once stored"

    env_b = {**os.environ, "FEATURESCOPE_DATA_DIR": str(tmp_path / "b")}
    whole = subprocess.run(harvest_cmd(tiny_llama_dir, tmp_path / "b.db"), env=env_b,
                           capture_output=True, text=True, cwd=REPO, timeout=300)
    assert whole.returncode == 0, whole.stderr
    assert "resuming:" not in whole.stderr
    feats_a, ex_a = dump(tmp_path / "a.db")
    feats_b, ex_b = dump(tmp_path / "b.db")
    assert len(feats_a) == 2 * 96 and len(ex_a) > 1000
    assert feats_a == feats_b
    assert ex_a == ex_b


def test_rerun_of_a_finished_harvest_is_refused(tmp_path, tiny_gpt2_dir, capsys, monkeypatch):
    monkeypatch.setenv("FEATURESCOPE_DATA_DIR", str(tmp_path))
    args = ["harvest", "--model", str(tiny_gpt2_dir), "--dataset", "pydoc", "--max-tokens",
            "1024", "--seq-len", "32", "--layers", "1", "--no-compile", "-q"]
    assert main(args) == 0
    assert main(args) == 2
    assert "--replace" in capsys.readouterr().err
    assert main(args + ["--replace"]) == 0
    capsys.readouterr()
    assert main(args + ["--skip-existing"]) == 0
    assert "already harvested" in capsys.readouterr().out


@pytest.mark.parametrize("text_, want", [("all", [0, 1, 2, 3]), ("0,2", [0, 2]),
                                         ("1-3", [1, 2, 3]), ("0,2-3", [0, 2, 3]),
                                         ("none", [])])
def test_parse_layers(text_, want):
    assert parse_layers(text_, 4) == want


@pytest.mark.parametrize("bad", ["4", "x", "-1", "2-9", ""])
def test_parse_layers_refuses_bad_input(bad):
    with pytest.raises(ValueError, match="layers"):
        parse_layers(bad, 4)


@pytest.mark.slow
def test_default_model_end_to_end(tmp_path, monkeypatch):
    """A few thousand tokens of the real SmolLM2-135M through the CLI (compiled reductions), then
    the stored numbers of three layers against a brute-force pass over every token."""
    from workers.loading import load_model

    monkeypatch.setenv("FEATURESCOPE_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("FEATURESCOPE_CACHE", str(SHARED_CACHE))
    db = tmp_path / "e2e.db"
    assert main(["harvest", "--dataset", "pydoc", "--max-tokens", "3072", "--layers", "0,15,29",
                 "--db", f"sqlite:///{db}", "-q"]) == 0

    lm = load_model("smollm2-135m-instruct", cache_dir=SHARED_CACHE)
    eng = create_engine(f"sqlite:///{db}")
    with eng.connect() as conn:
        seqs = conn.execute(text("SELECT tokens FROM sequences ORDER BY idx")).scalars().all()
        tokens = torch.tensor(np.stack([np.frombuffer(b, dtype="<i4") for b in seqs])).long()
        assert tokens.shape == (24, 128)
        assert (tokens[:, 0] == lm.tokenizer.bos_token_id).all()
        for layer in (0, 15, 29):
            sid = conn.scalar(text("SELECT id FROM sources WHERE slug = :s"), {"s": f"{layer}-mlp"})
            captured = {}
            lm.run_with_hooks(tokens, [f"blocks.{layer}.mlp.hook_post"],
                              lambda n, a, out=captured: out.__setitem__("a", a.clone()))
            full = captured["a"]
            body = full[:, 1:, :]
            flat = body.reshape(-1, lm.d_mlp)
            feats = conn.execute(text(
                "SELECT idx, max_act, min_act, frac_active, top_logits FROM features "
                "WHERE source_id = :s ORDER BY idx"), {"s": sid}).all()
            assert len(feats) == 1536
            got_max = torch.tensor([f.max_act for f in feats])
            torch.testing.assert_close(got_max, flat.max(0).values, rtol=1e-4, atol=1e-4)
            got_frac = torch.tensor([f.frac_active for f in feats], dtype=torch.float64)
            want_frac = (flat > 0).double().mean(0)
            assert (got_frac - want_frac).abs().max() <= 1.5 / flat.shape[0]
            peak, ppos = body.max(1)
            effects = lm.logit_effects(lm.mlp_out_directions(layer)[[0, 100, 777, 1535]])
            for f, effect in zip((0, 100, 777, 1535), effects, strict=True):
                # direct logit attribution: the neuron's output direction through the unembedding
                top_logits = json.loads(feats[f].top_logits)
                assert [t for t, _ in top_logits] == effect.topk(10).indices.tolist()
                ex = stored_examples(conn, sid, f, 0)
                want = sorted((-peak[s, f].item(), s) for s in range(24) if peak[s, f] > 0)[:20]
                assert [e.seq_idx for e in ex] == [s for _, s in want]
                for e in ex:
                    assert e.peak_pos == ppos[e.seq_idx, f].item() + 1
                    assert e.peak_value == pytest.approx(peak[e.seq_idx, f].item(), rel=1e-4,
                                                         abs=1e-4)
                    window = np.frombuffer(e.acts, dtype="<f2").astype(np.float32)
                    want_w = full[e.seq_idx, e.start:e.start + len(window), f]
                    np.testing.assert_allclose(window, want_w.half().float().numpy(),
                                               rtol=2e-3, atol=2e-3)
    eng.dispose()
    live_answers_equal_stored_examples(db, tmp_path, lm, tokens)


def live_answers_equal_stored_examples(db: Path, tmp_path: Path, lm, tokens) -> None:
    """`serve --live` over the harvest loads the built-in model back from what the database
    recorded, and its answers for stored examples (sent as text) are the stored values."""
    from fastapi.testclient import TestClient

    from app.config import Settings
    from app.db.engine import make_engine
    from app.main import create_app
    from app.model_queue import start_live

    settings = Settings(data_dir=tmp_path, cache=SHARED_CACHE, database_url=f"sqlite:///{db}")
    engine = make_engine(settings.db_url)
    live = start_live(engine, settings)
    assert sorted(live.models.model(lm.slug).sources) == ["0-mlp", "15-mlp", "29-mlp"]
    with TestClient(create_app(settings, engine=engine, live=live), client=LOOPBACK) as client:
        as_text = 0
        for f in (100, 777):
            page = client.get(f"/{lm.slug}/15-mlp/{f}.json").json()
            for ex in page["top"][:3]:
                end = ex["start"] + len(ex["acts"])
                prefix = tokens[ex["seq_idx"], :end].tolist()
                out = client.post("/api/v1/activations", json={
                    "model": lm.slug, "source": "15-mlp", "index": f,
                    "text": lm.tokenizer.decode(prefix[1:])}).json()
                if out["token_ids"] != prefix:
                    continue
                as_text += 1
                got = np.asarray(out["values"][ex["start"]:end], dtype=np.float32)
                np.testing.assert_allclose(got, np.asarray(ex["acts"], dtype=np.float32),
                                           rtol=2e-3, atol=2e-3)
                assert out["values"][ex["peak_pos"]] == pytest.approx(ex["peak_value"],
                                                                      rel=1e-4, abs=1e-4)
        assert as_text >= 3
    engine.dispose()


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    """The exit status and stderr that the `featurescope` process ends with."""
    try:
        code = main(args)
    except SystemExit as exc:  # as the interpreter exits on it: a message is printed, status 1
        code, err = (1, exc.code + "\n") if isinstance(exc.code, str) else (exc.code, "")
        return code, err + capsys.readouterr().err
    return code, capsys.readouterr().err


def harvest_args(model_dir: Path, tmp_path: Path) -> list[str]:
    return ["harvest", "--model", str(model_dir), "--dataset", "pydoc", "--max-tokens", "256",
            "--seq-len", "32", "--no-compile", "-q", "--db", f"sqlite:///{tmp_path / 'fs.db'}"]


def _sae_dir(tmp_path: Path, spoil) -> str:
    """A TopK SAE on the tiny GPT-2's residual stream, saved, then spoiled by `spoil(weights)`."""
    from support import random_sae

    from workers.sae import WEIGHTS_FILE, save_sae

    out = save_sae(random_sae("topk", d_in=64, d_sae=32, hook="blocks.0.hook_resid_post"),
                   tmp_path / "sae")
    spoil(out / WEIGHTS_FILE)
    return str(out)


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def _nan(path: Path) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(path)
    tensors["W_enc"][3, 5] = float("nan")
    save_file(tensors, path)


def _offline(monkeypatch) -> None:
    """No network to the hub, as on a machine offline."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.mark.parametrize("extra, status, message", [
    (["--model", "/no/such/model"], 2, "no model at"),
    (["--dataset", "no-such-corpus"], 2, "unknown dataset"),
    (["--batch-size", "0"], 1, "--batch-size"),
    (["--layers", "7"], 1, "layers 0..1"),
    (["--layers", "none"], 1, "nothing to harvest"),
    (["--layers", "0;1"], 1, "--layers expects"),
    (["--window", "1000"], 2, "--window 1000 does not fit in a sequence of --seq-len 32"),
    (["--window", "0"], 2, "give 1 to 32"),
    (["--device", "cuda"], 2, "no CUDA GPU is usable here"),
    (["--device", "tpu9"], 2, "unknown device 'tpu9'"),
    (["--model", "gpt-7"], 2, "unknown model 'gpt-7': not the built-in"),
    (["--model", "nosuchorg/nosuchmodel"], 2, "huggingface.co is not reachable from here"),
    (["--layers", "none", "--sae", _truncate], 2, "not a readable safetensors file"),
    (["--layers", "none", "--sae", _nan], 2, "NaN or infinite values (W_enc: 1)"),
])
def test_bad_input_gets_a_clear_error(tmp_path, monkeypatch, capsys, tiny_gpt2_dir, extra,
                                      status, message):
    """One line on stderr, the exit status, and nothing written to the database."""
    if "cuda" in extra and torch.cuda.is_available():
        pytest.skip("a CUDA GPU is here")
    monkeypatch.setenv("FEATURESCOPE_DATA_DIR", str(tmp_path))
    _offline(monkeypatch)
    extra = [_sae_dir(tmp_path, x) if callable(x) else x for x in extra]
    code, err = run_cli(harvest_args(tiny_gpt2_dir, tmp_path) + extra, capsys)
    assert (code, err.count("\n"), err.startswith("error: ")) == (status, 1, True), err
    assert message in err and "Traceback" not in err and "huggingface.co/docs" not in err
    db = tmp_path / "fs.db"
    if db.exists():
        with create_engine(f"sqlite:///{db}").connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM sources")).scalar() == 0


def _pg_without_the_database() -> str:
    from support import PG_URL, needs_postgres

    needs_postgres()
    return PG_URL.rsplit("/", 1)[0] + "/fs_test_no_such_database"


BAD_DATABASES = [
    ("not a url at all", "'not a url at all' is not a database URL: give sqlite:///"),
    ("foo://bar/baz", "keeps its data in SQLite or PostgreSQL, not 'foo'"),
    (lambda tmp: f"sqlite:///{tmp}", "is a folder, not a SQLite file: name a file in it"),
    (lambda tmp: "sqlite:////proc/featurescope.db",
     "cannot open or write the SQLite database /proc/featurescope.db"),
    (lambda tmp: (tmp / "notes.db").write_text("not a database\n" * 100) and
     f"sqlite:///{tmp / 'notes.db'}", "notes.db is not a SQLite database"),
    ("postgresql://postgres@127.0.0.1:1/featurescope",
     'cannot use the database postgresql+psycopg://postgres@127.0.0.1:1/featurescope: '
     'connection to server at "127.0.0.1", port 1 failed: Connection refused'),
    pytest.param(lambda tmp: _pg_without_the_database(),
                 'database "fs_test_no_such_database" does not exist (create it: createdb',
                 marks=pytest.mark.postgres),
]


@pytest.mark.parametrize("command", ["harvest", "serve", "migrate"])
@pytest.mark.parametrize("db, message", BAD_DATABASES)
def test_a_database_that_cannot_be_used_gets_a_clear_error(tmp_path, monkeypatch, capsys,
                                                           tiny_gpt2_dir, command, db, message):
    import uvicorn

    monkeypatch.setenv("FEATURESCOPE_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setattr(uvicorn, "run", lambda *a, **kw: pytest.fail("it served"))
    url = db(tmp_path) if callable(db) else db
    args = (harvest_args(tiny_gpt2_dir, tmp_path)[:-2] if command == "harvest" else [command])
    code, err = run_cli([*args, "--db", url], capsys)
    assert (code, err.count("\n"), err.startswith("error: ")) == (2, 1, True), err
    assert message in err and "Traceback" not in err and "sqlalche.me" not in err


def test_a_bad_setting_in_the_environment_gets_a_clear_error(monkeypatch, capsys):
    monkeypatch.setenv("FEATURESCOPE_DATABASE_URL", "mysql://x@y/z")
    code, err = run_cli(["migrate"], capsys)
    assert code == 2 and err.count("\n") == 1
    assert "FEATURESCOPE_DATABASE_URL must be sqlite or postgresql" in err


def test_bfloat16_harvest_records_its_dtype_and_live_runs_in_it(tmp_path, monkeypatch,
                                                                tiny_llama_dir):
    """--dtype bfloat16: the model runs in bfloat16, so every stored peak is a bfloat16 value;
    the source records the dtype, and `serve --live` loads the model in it, so its values for
    a stored example are the stored ones."""
    from fastapi.testclient import TestClient

    from app.config import Settings
    from app.db.engine import make_engine
    from app.main import create_app
    from app.model_queue import start_live

    monkeypatch.setenv("FEATURESCOPE_DATA_DIR", str(tmp_path))
    db = tmp_path / "bf16.db"
    assert main(["harvest", "--model", str(tiny_llama_dir), "--dataset", "pydoc",
                 "--max-tokens", str(24 * 32), "--seq-len", "32", "--layers", "1",
                 "--dtype", "bfloat16", "--no-compile", "--db", f"sqlite:///{db}", "-q"]) == 0
    settings = Settings(data_dir=tmp_path, database_url=f"sqlite:///{db}")
    engine = make_engine(settings.db_url)
    with engine.connect() as conn:
        cfg = conn.execute(text("SELECT harvest_config FROM sources")).scalar()
        peaks = torch.tensor([e.peak_value for s in conn.execute(text(
            "SELECT id FROM sources")).scalars() for e in stored_examples(conn, s)])
        maxes = torch.tensor(conn.execute(text("SELECT max_act FROM features")).scalars().all())
        seqs = conn.execute(text("SELECT tokens FROM sequences ORDER BY idx")).scalars().all()
    assert '"dtype": "bfloat16"' in cfg or '"dtype":"bfloat16"' in cfg
    assert peaks.numel() > 0
    assert torch.equal(peaks, peaks.bfloat16().float())
    assert torch.equal(maxes, maxes.bfloat16().float())

    live = start_live(engine, settings)
    lm = next(iter(live.models.models.values())).lm
    assert lm.dtype == torch.bfloat16
    with TestClient(create_app(settings, engine=engine, live=live), client=LOOPBACK) as client:
        page = client.get(f"/{lm.slug}/1-mlp/5.json").json()
        ex = page["top"][0]
        prefix = np.frombuffer(seqs[ex["seq_idx"]], dtype="<i4")[:ex["start"] + len(ex["acts"])]
        out = client.post("/api/v1/activations", json={
            "model": lm.slug, "source": "1-mlp", "index": 5,
            "tokens": prefix.tolist()}).json()
        got = np.asarray(out["values"][ex["start"]:], dtype=np.float32)
        np.testing.assert_allclose(got, np.asarray(ex["acts"], dtype=np.float32), rtol=2**-6,
                                   atol=1e-3)
    engine.dispose()
