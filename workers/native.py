"""The per-batch reduction of the harvest as one C loop, for float32 activations on the CPU.

`batch_reduce` (workers/state.py) in torch reads the activations once per statistic and builds
the histogram with a scatter-add, which costs as much as the rest together. This kernel reads
each activation once and keeps every statistic of a block of 32 features in registers and L1:
the peak and trough per sequence (first position on ties, as torch's max and min), the sums
(float64, of each value and of its float32 square, as batch_reduce), the active count and the
histogram bin from the float's bits. It runs on the calling thread: a second thread of ours
would compete with torch's own spinning OpenMP workers on the same cores and gain nothing.

`native_offer` inserts one batch's candidates into a ranking (top, bottom or sample) in place:
per feature, each candidate that beats the last entry is inserted after the entries of equal
score (they come from earlier sequences), which is the (score desc, seq asc) order of
`Ranked.offer`, without building and sorting the merged columns.

Both are in workers/native.c, shipped with the package. It is compiled once with the system C
compiler into a cache folder and loaded with ctypes (no Python headers, no torch headers, no
build step at install). Without a C compiler `load()` returns None and the harvest uses
torch.compile or eager torch instead.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.resources
import json
import logging
import os
import platform
import shutil
import stat
import subprocess
import tempfile
import threading
from pathlib import Path

import torch
from torch import Tensor

from app.histogram import HIST_BASE, HIST_BINS, HIST_SHIFT
from workers.accumulate import window_lead

log = logging.getLogger(__name__)

SOURCE_FILE = "native.c"
"""The C source, shipped beside this module as package data."""

DEFINES = {"SHIFT": HIST_SHIFT, "BASE": HIST_BASE, "NBINS": HIST_BINS}
"""The histogram's constants (app/histogram.py), compiled in as -D defines."""

FLAGS = ("-O3", "-fno-math-errno", "-fPIC", "-shared")


def source() -> str:
    """The text of the C source, read from the installed package."""
    return importlib.resources.files(__package__).joinpath(SOURCE_FILE).read_text()


_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False


class UnsafeCacheDir(OSError):
    """The folder the library would be loaded from is not the user's alone."""


def _cache_dir() -> Path:
    """The folder the library is compiled into and loaded from (FEATURESCOPE_NATIVE_CACHE, else
    one per user under the temporary folder): made private (0700) if it is missing, and refused
    (UnsafeCacheDir) unless it is a real folder of this user's that no one else may write to,
    since whoever can write there chooses the code that is loaded."""
    base = os.environ.get("FEATURESCOPE_NATIVE_CACHE")
    path = Path(base) if base else Path(tempfile.gettempdir()) / f"featurescope-native-{os.getuid()}"
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        path.mkdir(mode=0o700)
    except FileExistsError:
        pass
    st = path.lstat()
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafeCacheDir(f"{path} is not a folder (a link or a file is there): remove it, "
                             "or set FEATURESCOPE_NATIVE_CACHE to a private folder")
    if st.st_uid != os.getuid():
        raise UnsafeCacheDir(f"{path} belongs to uid {st.st_uid}, not to you (uid "
                             f"{os.getuid()}): set FEATURESCOPE_NATIVE_CACHE to a folder of yours")
    if st.st_mode & 0o022:
        raise UnsafeCacheDir(f"{path} may be written by others (mode "
                             f"{stat.S_IMODE(st.st_mode):o}): chmod 700 it, or set "
                             "FEATURESCOPE_NATIVE_CACHE to a private folder")
    return path


def _command(cc: str, src: Path, out: Path) -> list[str]:
    return [cc, *FLAGS, *(f"-D{k}={v}" for k, v in DEFINES.items()), "-o", str(out), str(src)]


def _build(cc: str, text: str, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        src = Path(tmp) / SOURCE_FILE
        src.write_text(text)
        so = Path(tmp) / out.name
        subprocess.run(_command(cc, src, so), check=True, capture_output=True, text=True,
                       timeout=120)
        os.replace(so, out)  # atomic: concurrent builders never load a half-written file


def load() -> ctypes.CDLL | None:
    """The compiled kernel, built on first use; None where no C compiler works."""
    global _lib, _tried
    with _lock:
        if _tried:
            return _lib
        _tried = True
        cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
        if not cc:
            log.info("no C compiler: the harvest reduces with torch")
            return None
        text = source()
        # The library's name covers what goes into it: the source, defines, flags and compiler.
        key = json.dumps([text, DEFINES, FLAGS, cc, platform.machine()])
        try:
            path = _cache_dir() / f"reduce-{hashlib.sha256(key.encode()).hexdigest()[:16]}.so"
            if not path.exists():
                _build(cc, text, path)
            lib = ctypes.CDLL(str(path))
        except UnsafeCacheDir as exc:
            log.warning("the native reduction is not loaded: %s; using torch", exc)
            return None
        except (OSError, subprocess.SubprocessError) as exc:
            err = getattr(exc, "stderr", "") or exc
            log.warning("the native reduction did not build (%s); using torch", str(err)[:300])
            return None
        fn = lib.fs_reduce_f32
        fn.restype = None
        i64, p = ctypes.c_int64, ctypes.c_void_p
        fn.argtypes = [p, i64, i64, i64, i64, i64, i64, p, p, p, p, p, p, p, p]
        off = lib.fs_offer
        off.restype = i64
        off.argtypes = [p, p, p, p, p, i64, i64, p, p, p, i64, i64, i64, p, i64, i64, i64, i64,
                        i64, i64, p, p, p, p]
        _lib = lib
        return lib


def native_reduce(acts: Tensor, first: int) -> tuple[Tensor, ...]:
    """batch_reduce's results for float32 CPU activations [batch, seq, F]."""
    lib = load()
    if lib is None or acts.device.type != "cpu" or acts.dtype != torch.float32:
        raise RuntimeError("the native reduction takes float32 CPU tensors")
    a = acts.contiguous()
    b, t, f = a.shape
    if t <= first:  # torch's max over an empty slice is an error too
        raise ValueError("no tokens after the BOS position")
    mx = torch.empty(b, f)
    mn = torch.empty(b, f)
    amx = torch.empty(b, f, dtype=torch.int64)
    amn = torch.empty(b, f, dtype=torch.int64)
    s = torch.empty(f, dtype=torch.float64)
    ss = torch.empty(f, dtype=torch.float64)
    nact = torch.empty(f, dtype=torch.int64)
    hist = torch.empty(f, HIST_BINS, dtype=torch.int64)
    ptrs = [x.data_ptr() for x in (mx, amx, mn, amn, s, ss, nact, hist)]

    lib.fs_reduce_f32(a.data_ptr(), b, t, f, first, 0, f, *ptrs)
    return mx, amx, mn, amn, s, ss, nact, hist


_scratch = threading.local()


def scratch(name: str, numel: int, dtype: torch.dtype) -> Tensor:
    """A buffer of at least numel items, kept per thread and reused across calls (contents are
    left over). Allocating a few MB per layer and batch instead, and freeing it, costs the
    harvest page faults and malloc trimming worth more than the work done in them."""
    bufs = _scratch.__dict__
    buf = bufs.get(name)
    if buf is None or buf.numel() < numel or buf.dtype != dtype:
        buf = bufs[name] = torch.empty(numel, dtype=dtype)
    return buf[:numel]


def native_offer(ranking, score: Tensor, pos: Tensor, value: Tensor, seq0: int, slot0: int,
                 acts: Tensor, window: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Insert a batch's candidates (score, pos, value: [batch, F], sequence seq0 + row) into a
    CPU `Ranked` in place; the inserted ones get slots slot0, slot0 + 1, ...

    Returns, in slot order, the feature, batch row and position of each inserted candidate and
    its window [n, window] (float16) of `acts` [batch, seq, F], cut where `window_start` cuts.
    `acts` may be any strided view: when many candidates enter, a copy laid out [batch, F, seq]
    (viewed back as [batch, seq, F]) makes each window one contiguous read.
    """
    lib = load()
    for t in (ranking.score, ranking.seq, ranking.pos, ranking.value, ranking.slot):
        if not t.is_contiguous():
            raise ValueError("the ranking's tensors must be contiguous")
    if acts.dtype != torch.float32 or acts.device.type != "cpu":
        raise ValueError("the native ranking takes float32 CPU activations")
    size, f = ranking.score.shape
    b, t, _ = acts.shape
    if not 1 <= window <= t:
        raise ValueError(f"window {window} does not fit sequences of {t}")
    sb, st, sf = acts.stride()
    score = score.contiguous().float()
    pos = pos.contiguous().long()
    value = value.contiguous().float()
    out = scratch("offer-out", 3 * b * f, torch.int64).view(3, b * f)
    win = scratch("offer-windows", b * f * window, torch.float16).view(b * f, window)
    before = window_lead(window)
    n = lib.fs_offer(ranking.score.data_ptr(), ranking.seq.data_ptr(), ranking.pos.data_ptr(),
                     ranking.value.data_ptr(), ranking.slot.data_ptr(), size, f,
                     score.data_ptr(), pos.data_ptr(), value.data_ptr(), b, seq0, slot0,
                     acts.data_ptr(), t, sb, st, sf, window, before, win.data_ptr(),
                     out[0].data_ptr(), out[1].data_ptr(), out[2].data_ptr())
    return out[0, :n].clone(), out[1, :n].clone(), out[2, :n].clone(), win[:n].clone()
