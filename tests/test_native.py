"""workers/native.py: the C reduction and ranking insertion against their torch definitions
(batch_reduce, Ranked.offer) on data full of ties, zeros, negatives and infinities."""

from __future__ import annotations

import logging
import os
import re
import stat

import pytest
import torch
from support import needs_c_compiler

from workers import native
from workers.accumulate import window_start
from workers.state import EMPTY_SEQ, Ranked, batch_reduce


@pytest.fixture(autouse=True, scope="module")
def _compiled():
    needs_c_compiler()


def tricky(b: int, t: int, f: int, seed: int) -> torch.Tensor:
    """Activations on a coarse grid (many ties), with runs of zeros, all-negative features,
    tiny and huge values, and infinities."""
    g = torch.Generator().manual_seed(seed)
    a = (torch.randint(-6, 7, (b, t, f), generator=g).float() / 4) ** 3
    if f > 5:
        a[:, :, 0] = -1.0  # a feature that never fires
        a[:, :, 1] = 0.0
        a[:, :, 2] = torch.rand(b, t, generator=g) * 1e-5  # below the first histogram edge
        a[0, 1, 3] = float("inf")
        a[-1, -1, 4] = float("-inf")
        a[:, :, 5] = 3000.0  # above the last edge
    return a


@pytest.mark.parametrize("shape", [(8, 33, 70), (3, 5, 1), (2, 9, 32), (4, 16, 129)])
@pytest.mark.parametrize("first", [0, 1])
def test_reduce_equals_batch_reduce(shape, first):
    a = tricky(*shape, seed=sum(shape) + first)
    want = batch_reduce(a, first)
    got = native.native_reduce(a, first)
    names = ("max", "argmax", "min", "argmin", "sum", "sumsq", "n_active", "hist")
    for name, w, g in zip(names, want, got, strict=True):
        assert g.shape == w.shape and g.dtype == w.dtype, name
        if name in ("sum", "sumsq"):
            torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12, equal_nan=True)
        else:
            assert torch.equal(g, w), name


def test_reduce_refuses_what_it_cannot_take():
    with pytest.raises(RuntimeError):
        native.native_reduce(torch.zeros(2, 3, 4, dtype=torch.float64), 0)
    with pytest.raises(ValueError):
        native.native_reduce(torch.zeros(2, 1, 4), 1)


def test_float16_conversion_rounds_like_torch():
    """Every float16 value, every midpoint between two, and their neighbours, through a window."""
    halves = torch.arange(0, 1 << 16, dtype=torch.int32).to(torch.int16).view(torch.float16)
    x = halves.float()
    x = x[torch.isfinite(x)]
    mids = (x[:-1].double() + x[1:].double()) / 2
    vals = torch.cat([x, mids.float(), torch.nextafter(mids.float(), torch.tensor(0.0)),
                      torch.nextafter(mids.float(), torch.tensor(1e9)),
                      torch.tensor([7e4, -7e4, 65519.0, 65520.0, float("inf"), 1e-30])])
    n = vals.numel()
    r = Ranked.empty(1, n)
    score = torch.ones(1, n)
    feats, _, _, win = native.native_offer(r, score, torch.zeros(1, n, dtype=torch.long),
                                           score, 0, 0, vals.view(1, 1, n), window=1)
    assert torch.equal(feats, torch.arange(n))
    assert torch.equal(win[:, 0].view(torch.int16), vals.to(torch.float16).view(torch.int16))


def test_reduce_of_a_non_contiguous_tensor():
    a = tricky(4, 12, 40, seed=3).transpose(0, 1).contiguous().transpose(0, 1)
    assert not a.is_contiguous()
    for w, g in zip(batch_reduce(a, 1), native.native_reduce(a, 1), strict=True):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=0)


@pytest.mark.parametrize("seed", range(6))
def test_offer_equals_ranked_offer(seed):
    """Batches in sequence order into a ranking, by the C insertion and by Ranked.offer: the same
    entries in the same order, and every entry that came in on a batch is reported."""
    g = torch.Generator().manual_seed(seed)
    size, f, b = 5, 23, 4
    ref, nat = Ranked.empty(size, f), Ranked.empty(size, f)
    kept = []  # every batch's windows, checked again at the end: the C loop reuses its buffers
    for step in range(12):
        seq0 = step * b
        score = (torch.randint(0, 5, (b, f), generator=g).float() / 2)  # many ties
        score[torch.rand(b, f, generator=g) < 0.4] = float("-inf")
        pos = torch.randint(0, 30, (b, f), generator=g)
        value = torch.randn(b, f, generator=g)
        seq = torch.arange(seq0, seq0 + b)[:, None].expand(b, f)
        ok = torch.isfinite(score)
        cand = Ranked(score=score, seq=torch.where(ok, seq, EMPTY_SEQ), pos=pos.int(),
                      value=value, slot=torch.full_like(seq, -1))
        new = ref.offer(cand)
        acts = torch.randn(b, 30, f, generator=g) * 300  # past float16's range now and then
        acts[0, 0, 0] = 1e-6  # a float16 subnormal
        if step % 2:  # laid out [batch, F, seq], as the accumulator passes it early in a pass
            acts = acts.transpose(1, 2).contiguous().transpose(1, 2)
        feats, rows, at, win = native.native_offer(nat, score, pos, value, seq0,
                                                   slot0=1000 * step, acts=acts, window=7)
        start = window_start(at, 30, 7)
        tok = start[:, None] + torch.arange(7)
        want = acts[rows[:, None], tok, feats[:, None]].to(torch.float16)
        assert torch.equal(win, want)
        kept.append((win, want))
        for name in ("score", "seq", "pos", "value"):
            assert torch.equal(getattr(nat, name), getattr(ref, name)), (step, name)
        # every entry that is new after the batch was inserted by it; give it, in the torch
        # ranking, the slot the C loop gave it: then every slot agrees
        slots = {(int(fi), int(ri)): (int(pi), 1000 * step + n)
                 for n, (fi, ri, pi) in enumerate(zip(feats, rows, at, strict=True))}
        for r, fe in zip(*new.nonzero(as_tuple=True), strict=True):
            p, slot = slots[(int(fe), int(ref.seq[r, fe]) - seq0)]
            assert p == int(ref.pos[r, fe])
            ref.slot[r, fe] = slot
        assert torch.equal(nat.slot, ref.slot)
        assert len(slots) >= int(new.sum())
    assert all(torch.equal(win, want) for win, want in kept)


def test_the_c_source_ships_in_the_wheel_and_builds_from_the_installed_package(tmp_path):
    """A wheel of the project holds workers/native.c; installed from it (unpacked, away from the
    source tree), the kernel reads its source from the package and compiles it."""
    import os
    import shutil
    import subprocess
    import sys
    import zipfile
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    tree = tmp_path / "tree"
    for name in ("app", "workers"):
        shutil.copytree(root / name, tree / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(root / name, tree / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-index",
                    "--no-build-isolation", "-w", str(tmp_path / "dist"), str(tree)],
                   check=True, capture_output=True, text=True, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("featurescope-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        assert zf.read("workers/native.c") == (root / "workers" / "native.c").read_bytes()
        zf.extractall(tmp_path / "site")
    code = ("from workers import native; print(native.__file__); "
            "print(native.load() is not None and native.source() == open(0).read())")
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site"),
           "FEATURESCOPE_NATIVE_CACHE": str(tmp_path / "cache")}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, check=True,
                         input=(root / "workers" / "native.c").read_text(), capture_output=True,
                         text=True, timeout=300).stdout.split()
    assert out == [str(tmp_path / "site" / "workers" / "native.py"), "True"]
    assert len(list((tmp_path / "cache").glob("reduce-*.so"))) == 1


# ---------------------------------------------------------------- the cache folder


def test_the_cache_folder_is_made_private(tmp_path, monkeypatch):
    monkeypatch.setenv("FEATURESCOPE_NATIVE_CACHE", str(tmp_path / "native"))
    monkeypatch.setattr(native, "_tried", False)
    monkeypatch.setattr(native, "_lib", None)
    assert native.load() is not None
    folder = tmp_path / "native"
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert [p.suffix for p in folder.iterdir()] == [".so"]


@pytest.mark.parametrize("spoil, message", [
    (lambda p: p.mkdir(mode=0o777) or p.chmod(0o777), "may be written by others (mode 777)"),
    (lambda p: p.mkdir() or p.chmod(0o770), "may be written by others (mode 770)"),
    (lambda p: p.symlink_to(p.parent), "is not a folder"),
    (lambda p: p.mkdir(mode=0o700) or os.chown(p, os.getuid() + 1, -1)
     if os.getuid() == 0 else pytest.skip("chown needs root"), "belongs to uid"),
])
def test_a_cache_folder_others_can_write_to_is_refused(tmp_path, monkeypatch, caplog, spoil,
                                                       message):
    """The library is then neither built nor loaded there: the harvest reduces with torch."""
    folder = tmp_path / "native"
    spoil(folder)
    monkeypatch.setenv("FEATURESCOPE_NATIVE_CACHE", str(folder))
    with pytest.raises(native.UnsafeCacheDir, match=re.escape(message)):
        native._cache_dir()
    monkeypatch.setattr(native, "_tried", False)
    monkeypatch.setattr(native, "_lib", None)
    with caplog.at_level(logging.WARNING, logger=native.__name__):
        assert native.load() is None
    assert message in caplog.text and "using torch" in caplog.text
    assert not list(folder.glob("*.so"))
