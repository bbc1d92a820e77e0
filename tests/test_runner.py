"""The harvest runner on a tiny model: what it plans, writes, skips, reports, and how it leaves
a run that fails or is interrupted."""

from __future__ import annotations

import pytest
from sqlalchemy import create_engine, text

from workers.harvest import HarvestConfig
from workers.runner import HarvestRunner, RunConfig, parse_layers
from workers.store import StoreError

HARVEST = HarvestConfig(top_k=4, n_ranges=2, per_range=2, window=8, shard_sequences=8,
                        compile=False)


def config(tmp_path, model_dir, **kw) -> RunConfig:
    base = dict(db_url=f"sqlite:///{tmp_path / 'fs.db'}", model=str(model_dir),
                dataset="pydoc", layers="0-1", max_tokens=40 * 16, seq_len=16,
                harvest=HARVEST, batch_size=4, checkpoint_dir=tmp_path / "checkpoints",
                progress_bar=False)
    return RunConfig(**{**base, **kw})


def statuses(cfg: RunConfig) -> dict[str, tuple[str, int, str | None]]:
    eng = create_engine(cfg.db_url)
    with eng.connect() as conn:
        rows = conn.execute(text("SELECT slug, status, progress_tokens, error FROM sources"))
        out = {r.slug: (r.status, r.progress_tokens, r.error) for r in rows}
    eng.dispose()
    return out


def test_runs_writes_and_then_skips(tmp_path, tiny_gpt2_dir):
    seen = []
    cfg = config(tmp_path, tiny_gpt2_dir)
    got = HarvestRunner(cfg, on_progress=lambda done, total: seen.append((done, total))).run()
    assert (got.written, got.skipped, got.n_tokens) == (["0-mlp", "1-mlp"], [], 40 * 16)
    assert got.database == cfg.db_url
    assert seen[-1] == (40 * 16, 40 * 16) and [d for d, _ in seen] == sorted(d for d, _ in seen)
    assert statuses(cfg) == {"0-mlp": ("ready", 640, None), "1-mlp": ("ready", 640, None)}
    assert not list((tmp_path / "checkpoints").glob("*/state.pt"))

    again = HarvestRunner(config(tmp_path, tiny_gpt2_dir, layers="all",
                                 skip_existing=True)).run()
    assert (again.written, again.skipped) == ([], ["0-mlp", "1-mlp"])
    with pytest.raises(StoreError, match="--replace"):
        HarvestRunner(cfg).run()
    assert HarvestRunner(config(tmp_path, tiny_gpt2_dir, layers="1",
                                replace=True)).run().written == ["1-mlp"]


def test_a_failing_run_marks_its_sources_failed(tmp_path, tiny_gpt2_dir):
    def fail(shard: int) -> None:
        if shard == 2:
            raise RuntimeError("out of memory")

    cfg = config(tmp_path, tiny_gpt2_dir)
    with pytest.raises(RuntimeError, match="out of memory"):
        HarvestRunner(cfg, after_shard=fail).run()
    assert {s for s, (status, _, error) in statuses(cfg).items()
            if status == "failed" and error == "RuntimeError: out of memory"} == {"0-mlp", "1-mlp"}


def test_an_interrupted_run_stays_building_and_resumes(tmp_path, tiny_gpt2_dir, caplog):
    def interrupt(shard: int) -> None:
        if shard == 1:
            raise KeyboardInterrupt

    cfg = config(tmp_path, tiny_gpt2_dir)
    with pytest.raises(KeyboardInterrupt):
        HarvestRunner(cfg, after_shard=interrupt).run()
    assert {status for status, _, _ in statuses(cfg).values()} == {"building"}
    ran = []
    with caplog.at_level("INFO", logger="workers.harvest"):
        assert HarvestRunner(cfg, after_shard=ran.append).run().written == ["0-mlp", "1-mlp"]
    assert "resuming: 2 of 5 shards already done" in caplog.text
    assert ran == [2, 3, 4]


@pytest.mark.parametrize("kw, message", [
    ({"backend": "spark"}, "backend"), ({"layers": "0;1"}, "--layers"),
    ({"batch_size": 0}, "batch_size"), ({"max_tokens": 0}, "max_tokens"),
    ({"seq_len": 1}, "seq_len"), ({"ray_workers": 0}, "ray_workers"),
])
def test_config_is_validated(tmp_path, kw, message):
    with pytest.raises(ValueError, match=message):
        RunConfig(db_url="sqlite://", **kw)


def test_layers_out_of_range_are_refused_once_the_model_is_known(tmp_path, tiny_gpt2_dir):
    with pytest.raises(ValueError, match="layers 0..1"):
        HarvestRunner(config(tmp_path, tiny_gpt2_dir, layers="0-2")).run()
    assert parse_layers("none", 2) == [] and parse_layers(" 0, 1 ", 2) == [0, 1]
