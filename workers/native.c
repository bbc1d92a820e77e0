/* The harvest's fused CPU loops (workers/native.py compiles this file and loads it with ctypes).

   fs_reduce_f32: one batch's per-feature statistics, peaks and histogram in one read.
   fs_offer: insertion of a batch's candidates into a ranking, cutting their float16 windows.

   The histogram's constants come from app/histogram.py as -D defines: SHIFT, BASE, NBINS. */
#if !defined(SHIFT) || !defined(BASE) || !defined(NBINS)
#error "compile with -DSHIFT=... -DBASE=... -DNBINS=... (the histogram's constants)"
#endif

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
   [B, T, F] (strides sb, st, sf; starting `before` tokens ahead of its position, kept inside
   the sequence) is written as float16 to win[slot - slot0]. (feature, row, position) of each
   go to out_f, out_b, out_pos (room for B * F). Returns how many were inserted. */
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
