"""The harvest against a brute-force computation over every token, on tiny real models."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from support import assert_states_equal

from app.histogram import HIST_BINS, histogram_edges
from workers.accumulate import window_start
from workers.corpus import load_dataset
from workers.harvest import (
    Checkpoint,
    HarvestConfig,
    Harvester,
    merge_states,
    neuron_sources,
    run_harvest,
)
from workers.heads import head_sources
from workers.loading import load_model
from workers.state import sample_keys

CFG = dict(top_k=5, n_ranges=2, per_range=3, window=16, batch_size=4, shard_sequences=8)


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def setup(request, tiny_gpt2_dir, tiny_llama_dir):
    path = {"gpt2": tiny_gpt2_dir, "llama": tiny_llama_dir}[request.param]
    lm = load_model(str(path))
    ds = load_dataset("pydoc", lm.tokenizer, seq_len=32, max_tokens=40 * 32)
    specs = neuron_sources(lm, list(range(lm.n_layers)))
    return lm, ds, specs


def harvest(lm, ds, specs, **overrides):
    cfg = HarvestConfig(**{**CFG, **overrides})
    h = Harvester(lm, ds.tokens, specs, cfg, bos_first=ds.bos_policy == "bos-prepended")
    return run_harvest(h), cfg


def brute_force_acts(lm, tokens, hook_name):
    """Activations at a hook for every token, from one plain forward pass: [N, T, F]."""
    out = {}
    lm.run_with_hooks(tokens, [hook_name], lambda name, a: out.__setitem__(name, a.clone()))
    return out[hook_name]


def ranked(values, k):
    """Brute-force ranking of per-sequence candidates [N, F]: per feature, the sequence indices
    of the k best with value > 0, by (value desc, sequence asc)."""
    res = []
    for f in range(values.shape[1]):
        cands = [(-values[s, f].item(), s) for s in range(values.shape[0]) if values[s, f] > 0]
        res.append([s for _, s in sorted(cands)[:k]])
    return res


def test_top_bottom_and_windows_equal_brute_force(setup):
    lm, ds, specs = setup
    states, cfg = harvest(lm, ds, specs)
    assert ds.bos_policy == "bos-prepended"
    for spec in specs:
        st = states[spec.slug]
        acts = brute_force_acts(lm, ds.tokens, spec.hook_name)
        body = acts[:, 1:, :]  # the BOS position is never a peak
        peak, ppos = body.max(1)
        trough, tpos = body.min(1)
        want_top = ranked(peak, cfg.top_k)
        want_bottom = ranked(-trough, cfg.top_k)
        t = acts.shape[1]
        for f in range(spec.n_features):
            got = [s for s in st.top.seq[:, f].tolist() if s < len(ds.tokens)]
            assert got == want_top[f], f"{spec.slug} feature {f} top sequences"
            for r, s in enumerate(got):
                assert st.top.value[r, f].item() == pytest.approx(peak[s, f].item(), rel=1e-5,
                                                                  abs=1e-6)
                assert st.top.pos[r, f].item() == ppos[s, f].item() + 1
                start = window_start(st.top.pos[r, f].long(), t, cfg.window).item()
                want = acts[s, start:start + cfg.window, f].half().float()
                torch.testing.assert_close(st.top.windows[r, f].float(), want,
                                           rtol=2e-3, atol=1e-4)
            got_b = [s for s in st.bottom.seq[:, f].tolist() if s < len(ds.tokens)]
            assert got_b == want_bottom[f], f"{spec.slug} feature {f} bottom sequences"
            for r, s in enumerate(got_b):
                assert st.bottom.value[r, f].item() == pytest.approx(trough[s, f].item(),
                                                                     rel=1e-5, abs=1e-6)
                assert st.bottom.pos[r, f].item() == tpos[s, f].item() + 1
        assert (st.top.pos >= 1).all() and (st.bottom.pos >= 1).all()
        # the neurons really do fire at both signs, so both rankings are exercised
        assert torch.isfinite(st.top.score).any() and torch.isfinite(st.bottom.score).any()


def test_stats_equal_brute_force(setup):
    lm, ds, specs = setup
    states, _ = harvest(lm, ds, specs)
    edges = torch.tensor(histogram_edges(), dtype=torch.float64)
    for spec in specs:
        st = states[spec.slug].stats
        a = brute_force_acts(lm, ds.tokens, spec.hook_name)[:, 1:, :].reshape(-1, spec.n_features)
        assert st.n_tokens == a.shape[0]
        assert torch.equal(st.n_active, (a > 0).sum(0))
        torch.testing.assert_close(st.max, a.max(0).values, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(st.min, a.min(0).values, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(st.mean.float(), a.double().mean(0).float(), rtol=1e-4,
                                   atol=1e-6)
        torch.testing.assert_close(st.std.float(), a.double().std(0, correction=0).float(),
                                   rtol=1e-3, atol=1e-5)
        # histogram: bin i holds edges[i] <= a < edges[i+1], with everything <= edges[1] in bin 0
        idx = torch.bucketize(a.double(), edges[1:-1], right=True)
        want = torch.zeros(spec.n_features, HIST_BINS, dtype=torch.int64)
        want.scatter_add_(1, idx.T.contiguous(), torch.ones_like(idx.T, dtype=torch.int64))
        assert (st.hist - want).abs().sum() <= 2  # float32 rounding at an edge, at most
        assert torch.equal(st.hist.sum(1), torch.full((spec.n_features,), a.shape[0]))


def test_sample_is_the_priority_sample_of_fired_sequences(setup):
    lm, ds, specs = setup
    states, cfg = harvest(lm, ds, specs)
    spec = specs[0]
    st = states[spec.slug]
    peak = brute_force_acts(lm, ds.tokens, spec.hook_name)[:, 1:, :].max(1).values
    keys = sample_keys(torch.arange(len(ds.tokens)), spec.n_features, cfg.seed)
    want = ranked(torch.where(peak > 0, keys + 1, torch.zeros_like(keys)), cfg.sample_size)
    for f in range(spec.n_features):
        got = [s for s in st.sample.seq[:, f].tolist() if s < len(ds.tokens)]
        assert got == want[f]
        assert len(got) == min(cfg.sample_size, int((peak[:, f] > 0).sum()))


def test_zero_is_the_priority_sample_of_sequences_that_never_fired(setup):
    lm, ds, specs = setup
    states, cfg = harvest(lm, ds, specs, n_zero=4)
    keys = sample_keys(torch.arange(len(ds.tokens)), specs[0].n_features, cfg.seed)
    n_some = 0
    for spec in specs:
        st = states[spec.slug]
        acts = brute_force_acts(lm, ds.tokens, spec.hook_name)
        peak, ppos = acts[:, 1:, :].max(1)
        want = ranked(torch.where(peak > 0, torch.zeros_like(keys), keys + 1), cfg.n_zero)
        t = acts.shape[1]
        for f in range(spec.n_features):
            got = [s for s in st.zero.seq[:, f].tolist() if s < len(ds.tokens)]
            assert got == want[f], f"{spec.slug} feature {f} zero sequences"
            n_some += bool(got)
            for r, s in enumerate(got):
                assert (acts[s, 1:, f] <= 0).all()
                assert st.zero.value[r, f].item() == pytest.approx(peak[s, f].item(), abs=1e-6)
                start = window_start(st.zero.pos[r, f].long(), t, cfg.window).item()
                torch.testing.assert_close(st.zero.windows[r, f].float(),
                                           acts[s, start:start + cfg.window, f].half().float(),
                                           rtol=2e-3, atol=1e-4)
    assert n_some  # some features of these sources do have non-activating sequences


def test_no_zero_sample_when_n_zero_is_0(setup):
    lm, ds, specs = setup
    states, _ = harvest(lm, ds, specs, n_zero=0)
    assert all(st.zero is None and "zero" not in st.rankings() for st in states.values())


def test_two_shards_merged_equal_one_pass_in_either_order(setup):
    lm, ds, specs = setup
    one, _ = harvest(lm, ds, specs, shard_sequences=len(ds.tokens))
    cfg = HarvestConfig(**{**CFG, "shard_sequences": 20})
    h = Harvester(lm, ds.tokens, specs, cfg, bos_first=True)
    assert h.n_shards == 2
    a, b = h.run_shard(0), h.run_shard(1)
    assert_states_equal(merge_states(a, b), one)
    assert_states_equal(merge_states(b, a), one)
    with pytest.raises(ValueError, match="merged twice"):
        merge_states(a, a)


def test_the_gpu_path_without_host_syncs_gives_the_same_state(setup):
    lm, ds, specs = setup
    pooled, _ = harvest(lm, ds, specs, sync_free=False)
    sync_free, _ = harvest(lm, ds, specs, sync_free=True)
    assert_states_equal(sync_free, pooled)


def test_the_native_cpu_path_gives_the_same_state(setup):
    """compile=True on the CPU reduces and ranks with the C loops of workers/native.py: the same
    state as eager torch (which the tests above check against brute force)."""
    from support import needs_c_compiler

    needs_c_compiler()
    lm, ds, specs = setup
    eager, _ = harvest(lm, ds, specs, compile=False)
    fused, cfg = harvest(lm, ds, specs, compile=True)
    h = Harvester(lm, ds.tokens, specs, cfg, bos_first=True)
    assert h.native
    assert_states_equal(fused, eager)


def test_interrupted_run_resumes_to_the_same_result(setup, tmp_path):
    """Through the checkpoint and back: every part of the state (neurons with their zero
    sample and co-firing statistics, and a heads source's metric sums)."""
    lm, ds, specs = setup
    specs = specs + head_sources(lm, [0])
    cfg = HarvestConfig(**CFG, relations=True)
    whole, _ = harvest(lm, ds, specs, relations=True)
    assert all(whole[s.slug].cofire is not None for s in specs if s.kind == "neurons")
    assert whole[specs[-1].slug].sums and whole[specs[0].slug].zero is not None

    class Killed(Exception):
        pass

    def kill_after_second(shard):
        if shard == 1:
            raise Killed

    ckpt = Checkpoint(tmp_path, "run")
    h = Harvester(lm, ds.tokens, specs, cfg, bos_first=True)
    with pytest.raises(Killed):
        run_harvest(h, ckpt, after_shard=kill_after_second)
    assert ckpt.load()[specs[0].slug].shards == {0, 1}
    ran = []
    resumed = run_harvest(h, ckpt, after_shard=ran.append)
    assert ran == list(range(2, h.n_shards))
    assert_states_equal(resumed, whole)


class _RunsCode:
    """A pickle that would run code when loaded: it writes its marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "ran"))


def test_a_checkpoint_cannot_run_code(tmp_path, caplog):
    """What a checkpoint holds is read back as tensors and plain values only; a pickle of
    anything else is not run, and the run starts afresh."""
    ckpt = Checkpoint(tmp_path, "evil")
    ckpt.dir.mkdir(parents=True)
    marker = tmp_path / "marker"
    torch.save({"0-mlp": _RunsCode(marker)}, ckpt.path)
    with caplog.at_level(logging.WARNING):
        assert ckpt.load() is None
    assert not marker.exists() and "starting afresh" in caplog.text


def test_config_is_validated():
    with pytest.raises(ValueError, match="top_k"):
        HarvestConfig(top_k=0)
