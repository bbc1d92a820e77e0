"""The per-batch reduction of the harvest as one C loop, for float32 activations on the CPU.

`batch_reduce` (workers/state.py) in torch reads the activations once per statistic and builds
the histogram with a scatter-add, which costs as much as the rest together. This kernel reads
each activation once and keeps every statistic of a block of 64 features in registers and L1:
the peak and trough per sequence (first position on ties, as torch's max and min), the sums
(float64, of each value and of its float32 square, as batch_reduce), the active count and the
histogram bin from the float's bits. It runs on the calling thread: a second thread of ours
would compete with torch's own spinning OpenMP workers on the same cores and gain nothing.

`native_offer` inserts one batch's candidates into a ranking (top, bottom or sample) in place:
per feature, each candidate that beats the last entry is inserted after the entries of equal
score (they come from earlier sequences), which is the (score desc, seq asc) order of
`Ranked.offer`, without building and sorting the merged columns.

It is compiled once with the system C compiler into a cache folder and loaded with ctypes (no
Python headers, no torch headers, no build step at install). Without a C compiler `load()`
returns None and the harvest uses torch.compile or eager torch instead.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch
from torch import Tensor

from app.histogram import HIST_BASE, HIST_BINS, HIST_SHIFT

log = logging.getLogger(__name__)

SOURCE = r"""
#include <stdint.h>
#include <string.h>
#include <math.h>

#define BLOCK 32

/* One block of nf features over every sequence; nf is a constant where it is BLOCK, so the
   compiler unrolls and vectorises the feature loops. */
static inline __attribute__((always_inline)) void
block(const float *a, int64_t B, int64_t T, int64_t F, int64_t first, int64_t fb, const int nf,
      float *mx, int64_t *amx, float *mn, int64_t *amn,
      double *sum, double *sumsq, int64_t *nact, int64_t *hist)
{
    double s[BLOCK], ss[BLOCK];
    int64_t na[BLOCK];
    int32_t h[BLOCK * NBINS];
    memset(h, 0, sizeof(h));
    for (int j = 0; j < nf; j++) { s[j] = 0.0; ss[j] = 0.0; na[j] = 0; }
    for (int64_t b = 0; b < B; b++) {
        float bm[BLOCK], bn[BLOCK];
        int32_t bam[BLOCK], ban[BLOCK];
        for (int j = 0; j < nf; j++) {
            bm[j] = -INFINITY; bn[j] = INFINITY; bam[j] = (int32_t)first; ban[j] = (int32_t)first;
        }
        for (int64_t t = first; t < T; t++) {
            const float *row = a + (b * T + t) * F + fb;
            uint8_t k8[BLOCK];
            for (int j = 0; j < nf; j++) {
                const float x = row[j];
                const int up = x > bm[j], down = x < bn[j];
                bm[j] = up ? x : bm[j];
                bam[j] = up ? (int32_t)t : bam[j];
                bn[j] = down ? x : bn[j];
                ban[j] = down ? (int32_t)t : ban[j];
                s[j] += (double)x;
                const float x2 = x * x;
                ss[j] += (double)x2;
                na[j] += x > 0.0f;
                int32_t bits;
                memcpy(&bits, row + j, 4);
                int32_t k = (bits >> SHIFT) - BASE;
                k = k < 0 ? 0 : (k >= NBINS ? NBINS - 1 : k);
                k8[j] = (uint8_t)k;
            }
            for (int j = 0; j < nf; j++) h[j * NBINS + k8[j]] += 1;
        }
        for (int j = 0; j < nf; j++) {
            mx[b * F + fb + j] = bm[j];
            amx[b * F + fb + j] = bam[j];
            mn[b * F + fb + j] = bn[j];
            amn[b * F + fb + j] = ban[j];
        }
    }
    for (int j = 0; j < nf; j++) {
        sum[fb + j] = s[j];
        sumsq[fb + j] = ss[j];
        nact[fb + j] = na[j];
    }
    for (int i = 0; i < nf * NBINS; i++) hist[fb * NBINS + i] = h[i];
}

#if defined(__x86_64__) && defined(__GNUC__) && defined(__linux__)
__attribute__((target_clones("avx2", "default")))  /* AVX2 where the CPU has it: 2x faster */
#endif
void fs_reduce_f32(const float *a, int64_t B, int64_t T, int64_t F, int64_t first,
                   int64_t f0, int64_t f1, float *mx, int64_t *amx, float *mn, int64_t *amn,
                   double *sum, double *sumsq, int64_t *nact, int64_t *hist)
{
    int64_t fb = f0;
    for (; fb + BLOCK <= f1; fb += BLOCK)
        block(a, B, T, F, first, fb, BLOCK, mx, amx, mn, amn, sum, sumsq, nact, hist);
    if (fb < f1)
        block(a, B, T, F, first, fb, (int)(f1 - fb), mx, amx, mn, amn, sum, sumsq, nact, hist);
}

/* float32 -> float16, round to nearest even (as torch's .to(torch.float16)); F. Giesen's
   float_to_half_fast3_rtne. NaN becomes the quiet NaN 0x7e00. */
static inline uint16_t to_half(float value)
{
    const uint32_t f32_inf = 255u << 23, f16_max = (127u + 16u) << 23;
    const uint32_t denorm_magic = ((127u - 15u) + (23u - 10u) + 1u) << 23;
    uint32_t f;
    memcpy(&f, &value, 4);
    const uint32_t sign = f & 0x80000000u;
    f ^= sign;
    uint16_t o;
    if (f >= f16_max) {
        o = f > f32_inf ? 0x7e00 : 0x7c00;
    } else if (f < (113u << 23)) {
        float v, magic;
        memcpy(&v, &f, 4);
        memcpy(&magic, &denorm_magic, 4);
        v += magic;
        uint32_t r;
        memcpy(&r, &v, 4);
        o = (uint16_t)(r - denorm_magic);
    } else {
        const uint32_t odd = (f >> 13) & 1u;
        f += ((uint32_t)(15 - 127) << 23) + 0xfffu;
        f += odd;
        o = (uint16_t)(f >> 13);
    }
    return o | (uint16_t)(sign >> 16);
}

static void copy_half_generic(const float *src, int64_t stride, int64_t n, uint16_t *dst)
{
    for (int64_t k = 0; k < n; k++)
        dst[k] = to_half(src[k * stride]);
}

#if defined(__x86_64__) && defined(__GNUC__)
#include <cpuid.h>
#include <immintrin.h>

/* The same conversion in one instruction per value where the CPU has F16C (imm 0: round to
   nearest even; every float16 value and midpoint is checked against torch in the tests). */
__attribute__((target("f16c"))) static void
copy_half_f16c(const float *src, int64_t stride, int64_t n, uint16_t *dst)
{
    for (int64_t k = 0; k < n; k++)
        dst[k] = (uint16_t)_cvtss_sh(src[k * stride], 0);
}

static void copy_half(const float *src, int64_t stride, int64_t n, uint16_t *dst)
{
    static int f16c = -1;
    if (f16c < 0) {
        unsigned a, b, c, d;
        f16c = __get_cpuid(1, &a, &b, &c, &d) && (c & bit_F16C) ? 1 : 0;
    }
    if (f16c)
        copy_half_f16c(src, stride, n, dst);
    else
        copy_half_generic(src, stride, n, dst);
}
#else
#define copy_half copy_half_generic
#endif

/* Insert candidates into a ranking of `size` rows per feature (row-major [size, F] arrays), in
   (score desc, seq asc) order. Candidate row i (sequence seq0 + i) of feature f: cscore, cpos,
   cvalue at [i * F + f]; a score that is not > the last entry's (-inf, NaN) never enters.
   Each inserted candidate gets the next slot id, and its window of W tokens of `acts`
   [B, T, F] (strides sb, st, sf; starting `before` tokens ahead of its position, kept inside the sequence) is
   written as float16 to win[slot - slot0]. (feature, row, position) of each go to out_f,
   out_b, out_pos (room for B * F). Returns how many were inserted. */
int64_t fs_offer(float *score, int64_t *seq, int32_t *pos, float *value, int64_t *slot,
                 int64_t size, int64_t F, const float *cscore, const int64_t *cpos,
                 const float *cvalue, int64_t B, int64_t seq0, int64_t slot0,
                 const float *acts, int64_t T, int64_t sb, int64_t st, int64_t sf,
                 int64_t W, int64_t before, uint16_t *win,
                 int64_t *out_f, int64_t *out_b, int64_t *out_pos)
{
    int64_t n = 0;
    for (int64_t f = 0; f < F; f++) {
        for (int64_t i = 0; i < B; i++) {
            const float x = cscore[i * F + f];
            if (!(x > score[(size - 1) * F + f]))
                continue;
            int64_t r = size - 1;
            while (r > 0 && score[(r - 1) * F + f] < x) {
                const int64_t to = r * F + f, from = (r - 1) * F + f;
                score[to] = score[from]; seq[to] = seq[from]; pos[to] = pos[from];
                value[to] = value[from]; slot[to] = slot[from];
                r--;
            }
            const int64_t p = cpos[i * F + f], at = r * F + f;
            score[at] = x; seq[at] = seq0 + i; pos[at] = (int32_t)p;
            value[at] = cvalue[i * F + f]; slot[at] = slot0 + n;
            int64_t start = p - before;
            start = start > T - W ? T - W : start;
            start = start < 0 ? 0 : start;
            copy_half(acts + i * sb + start * st + f * sf, st, W, win + n * W);
            out_f[n] = f; out_b[n] = i; out_pos[n] = p;
            n++;
        }
    }
    return n;
}
"""
# The histogram's constants (workers/state.py) are compiled in.
SOURCE = (f"#define SHIFT {HIST_SHIFT}\n#define BASE {HIST_BASE}\n#define NBINS {HIST_BINS}\n"
          + SOURCE)

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False


def _cache_dir() -> Path:
    base = os.environ.get("FEATURESCOPE_NATIVE_CACHE")
    return Path(base) if base else Path(tempfile.gettempdir()) / f"featurescope-native-{os.getuid()}"


def _build(cc: str, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        src = Path(tmp) / "reduce.c"
        src.write_text(SOURCE)
        so = Path(tmp) / out.name
        subprocess.run([cc, "-O3", "-fno-math-errno", "-fPIC", "-shared", "-o", str(so),
                        str(src)], check=True, capture_output=True, text=True, timeout=120)
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
        key = hashlib.sha256(f"{SOURCE}{cc}{platform.machine()}".encode()).hexdigest()[:16]
        path = _cache_dir() / f"reduce-{key}.so"
        try:
            if not path.exists():
                _build(cc, path)
            lib = ctypes.CDLL(str(path))
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
    before = window - window // 4 - 1  # as workers.accumulate.window_start
    n = lib.fs_offer(ranking.score.data_ptr(), ranking.seq.data_ptr(), ranking.pos.data_ptr(),
                     ranking.value.data_ptr(), ranking.slot.data_ptr(), size, f,
                     score.data_ptr(), pos.data_ptr(), value.data_ptr(), b, seq0, slot0,
                     acts.data_ptr(), t, sb, st, sf, window, before, win.data_ptr(),
                     out[0].data_ptr(), out[1].data_ptr(), out[2].data_ptr())
    return out[0, :n].clone(), out[1, :n].clone(), out[2, :n].clone(), win[:n].clone()
