/* y = x @ W^T for a weight held as NB blocks of [K][16]: block b holds output rows
 * 16b..16b+15 interleaved, so a decode product (one to a few rows of x) reads the
 * weight as one sequential stream, 64 bytes (one cache line) per input position.
 * See runtime/native.py for why this exists and how it is built.
 *
 * The weight may also be bf16 (`_bf16`) or int8 (`_i8`, the caller applying each output
 * row's scale): widened to fp32 as it is loaded, so the stream is a half or a quarter of
 * the bytes and the arithmetic the same.
 *
 * GCC's vector extensions, not intrinsics: compiled with -march=native on the machine
 * that runs it, the same source becomes AVX-512, AVX2 or SSE code. The OpenMP loop runs
 * on torch's own OpenMP runtime (the library is linked against torch's libgomp), so it
 * uses the calling thread's torch thread count and torch's thread team. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "vectors.h"

#define TILE 8

/* Each kernel fetches its weight ahead of the stream, BUTTERFLY_AHEAD bytes ahead with
 * locality BUTTERFLY_HINT (__builtin_prefetch's: 0 is prefetchnta, 1 prefetcht2). Which
 * is best depends on the CPU, so runtime/native.py builds the library once per hint and
 * keeps the build that streams faster at load (`STREAMS` there says why each exists):
 *
 * - nta, 2 KiB ahead: the stream passes the caches by instead of evicting what the
 *   process runs between products and steps. On the AMD EPYC it made no difference to
 *   decode in one process; on 4 node processes of a 2-core machine taking turns, the
 *   small model's tokens took 0.90-0.93x the time (bench/hops.py A/B), the per-hop cost
 *   (Python and sockets on caches the weights had just flushed) down from 1.7-2.2 to
 *   1.0-1.5 ms; bf16 and int8 decode steps took 0.89-0.99x the time (twenty-first
 *   session, docs/PERFORMANCE-LOG.md).
 * - t2, 4 KiB ahead: on the Intel Xeon (AVX-512, AMX) a prefetchnta stream ran at half
 *   the memory's rate, fp32 12.0-12.5 GB/s, bf16 10.8-11.3 and int8 9.0-9.1 against
 *   23-28 for prefetcht2 4 KiB ahead and 23-24 for a plain sum of the same bytes (48-192
 *   matrices in a chain, two threads; thirtieth session). Likely why: there a
 *   prefetchnta fills the first-level cache alone, so a core has no more lines in
 *   flight than that cache's fill buffers.
 *
 * The widened int8 kernel (no VNNI, not measured since the fifth session) reads without
 * the prefetch. */
#ifndef BUTTERFLY_AHEAD
#define BUTTERFLY_AHEAD 2048
#endif
#ifndef BUTTERFLY_HINT
#define BUTTERFLY_HINT 0
#endif
#define STREAM(p, bytes, on)                                                               \
    do {                                                                                   \
        if (on)                                                                            \
            for (int o_ = 0; o_ < (bytes); o_ += 64)                                       \
                __builtin_prefetch((const char *)(p) + BUTTERFLY_AHEAD + o_, 0,             \
                                   BUTTERFLY_HINT);                                        \
    } while (0)

/* 16 int8 weights widened to fp32; the row's scale is applied to the sum */
#ifdef __AVX512F__
#include <immintrin.h>
/* GCC 12 turns the portable form below into 16 scalar loads and sign extensions */
static inline v16 ld_i8(const int8_t *p) {
    __m512 f = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
    v16 v;
    memcpy(&v, &f, sizeof v);
    return v;
}
#else
typedef int8_t c16 __attribute__((vector_size(16)));
typedef int16_t s16x16 __attribute__((vector_size(32)));
typedef int32_t i32x16 __attribute__((vector_size(64)));
static inline v16 ld_i8(const int8_t *p) {
    c16 c;
    memcpy(&c, p, sizeof c);
    s16x16 h = __builtin_convertvector(c, s16x16); /* one width at a time, as above */
    return __builtin_convertvector(__builtin_convertvector(h, i32x16), v16);
}
#endif

/* R rows (R fixed, so the accumulators stay in registers) against one block: each
 * 16-wide slice of the weight is loaded once for all R rows. */
#define ROWS(SUF, WT, LD, NT, R)                                                          \
    static void rows_##R##SUF(const float *x, int64_t ldx, const WT *p, int64_t K,      \
                              float *y, int64_t ldy) {                                  \
        v16 a[R];                                                                     \
        for (int r = 0; r < R; r++) a[r] = (v16){0};                                  \
        for (int64_t k = 0; k < K; k++) {                                             \
            if (k % (int64_t)(64 / (16 * sizeof(WT))) == 0) STREAM(p + k * 16, 64, NT); \
            v16 w = LD(p + k * 16);                                                   \
            _Pragma("GCC unroll 8") for (int r = 0; r < R; r++) a[r] += w * x[r * ldx + k]; \
        }                                                                             \
        for (int r = 0; r < R; r++) st(y + r * ldy, a[r]);                            \
    }

/* The kernels, once per weight type (fp32, or bf16 widened in registers: half the
 * bytes to stream, the same fp32 arithmetic). */
#define KERNELS(SUF, WT, LD, NT)                                                          \
    /* One row against one block: four accumulators, so FMA latency does not bound    \
     * the stream. */                                                                 \
    static void one_row##SUF(const float *x, const WT *p, int64_t K, float *y) {      \
        v16 a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};                                   \
        int64_t k = 0;                                                                \
        for (; k + 4 <= K; k += 4) {                                                  \
            STREAM(p + k * 16, 64 * (int)sizeof(WT), NT);                              \
            a0 += LD(p + k * 16) * x[k];                                              \
            a1 += LD(p + (k + 1) * 16) * x[k + 1];                                    \
            a2 += LD(p + (k + 2) * 16) * x[k + 2];                                    \
            a3 += LD(p + (k + 3) * 16) * x[k + 3];                                    \
        }                                                                             \
        for (; k < K; k++) a0 += LD(p + k * 16) * x[k];                               \
        st(y, (a0 + a1) + (a2 + a3));                                                 \
    }                                                                                 \
    ROWS(SUF, WT, LD, NT, 2) ROWS(SUF, WT, LD, NT, 3) ROWS(SUF, WT, LD, NT, 4)         \
    ROWS(SUF, WT, LD, NT, 5) ROWS(SUF, WT, LD, NT, 6) ROWS(SUF, WT, LD, NT, 7)         \
    ROWS(SUF, WT, LD, NT, 8)                                                          \
    __attribute__((visibility("hidden"))) void butterfly_blocked_tile##SUF(           \
        int n, const float *x, int64_t ldx, const WT *p, int64_t K, float *y,         \
        int64_t ldy) {                                                                \
        switch (n) {                                                                  \
        case 1: one_row##SUF(x, p, K, y); break;                                      \
        case 2: rows_2##SUF(x, ldx, p, K, y, ldy); break;                             \
        case 3: rows_3##SUF(x, ldx, p, K, y, ldy); break;                             \
        case 4: rows_4##SUF(x, ldx, p, K, y, ldy); break;                             \
        case 5: rows_5##SUF(x, ldx, p, K, y, ldy); break;                             \
        case 6: rows_6##SUF(x, ldx, p, K, y, ldy); break;                             \
        case 7: rows_7##SUF(x, ldx, p, K, y, ldy); break;                             \
        default: rows_8##SUF(x, ldx, p, K, y, ldy); break;                            \
        }                                                                             \
    }
KERNELS(, float, ld, 1)
KERNELS(_bf16, uint16_t, ld_bf16, 1)
KERNELS(_i8, int8_t, ld_i8, 0)

/* x [M, K] row-major, w [NB][K][16], y [M, NB * 16] row-major. Blocks are shared out
 * among the threads; each block is read from memory once and reused from the cache for
 * every tile of rows. */
#define PRODUCT(NAME, SUF, WT)                                                            \
    void NAME(const float *x, int64_t M, int64_t K, const WT *w, int64_t NB, float *y) { \
        const int64_t N = NB * 16;                                                    \
        _Pragma("omp parallel for schedule(static)") for (int64_t b = 0; b < NB; b++) { \
            const WT *p = w + b * K * 16;                                             \
            for (int64_t m = 0; m < M; m += TILE) {                                   \
                int n = M - m < TILE ? (int)(M - m) : TILE;                           \
                butterfly_blocked_tile##SUF(n, x + m * K, K, p, K, y + m * N + b * 16, N); \
            }                                                                         \
        }                                                                             \
    }
PRODUCT(butterfly_blocked_linear_f32, , float)
PRODUCT(butterfly_blocked_linear_bf16, _bf16, uint16_t)
PRODUCT(blocked_linear_i8_widened, _i8, int8_t)

/* Int8 weights on VNNI: `vpdpbusd` multiplies 64 bytes by 64 bytes and sums them in fours
 * into 16 int32 lanes, one instruction for what widening takes 12 (load, two widenings
 * and a multiply-add per 16 weights; on the AMD EPYC the widened product stayed near
 * 41 GB/s on two threads, short of the memory's 50-60). It needs the other operand in
 * bytes too, so each row of x is split into three byte-sized passes,
 *     x = s1 q1 + s2 q2 + s3 q3 + e,   q in [-127, 127],  s2 = s1 / 254,  s3 = s2 / 254,
 * each pass quantizing what the ones before left over, and |e| <= max|x| / 8.2e6: the
 * sums are fp32's within rounding, so this is the same product as the widened one, not a
 * lower precision. `vpdpbusd` takes unsigned bytes on one side, so the passes are held as
 * q + 128 and a fourth sum (of the weights against ones) removes the 128s.
 *
 * The layout groups four input positions: block b holds [K / 4][16][4], so one 64-byte
 * load is 16 outputs by 4 positions. Only where K is a multiple of 4, and the int32 sums
 * cannot overflow (K <= 65536); elsewhere, and on CPUs without AVX512-VNNI, the widened
 * kernel and its [K][16] layout. butterfly_i8_group says which, so the weight is packed
 * as the product will read it (runtime/native.py). */
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define VNNI 1
#else
#define VNNI 0
#endif
#define PASSES 3

int butterfly_i8_group(int64_t K) { return VNNI && K % 4 == 0 && K > 0 && K <= 65536 ? 4 : 1; }
int butterfly_i8_passes(void) { return PASSES; }

#if VNNI
/* Row r of x as u [r][PASSES][K] bytes and s [r][PASSES] scales; a row holding inf or
 * NaN gets NaN scales, so its outputs are NaN, as the widened product's would be. */
__attribute__((visibility("hidden"))) void butterfly_quantize_rows(int n, const float *x,
                                                                   int64_t ldx, int64_t K,
                                                                   uint8_t *u, float *s) {
    for (int r = 0; r < n; r++) {
        const float *row = x + r * ldx;
        __m512 big = _mm512_setzero_ps();
        __mmask16 nan = 0; /* max_ps passes a NaN on only as its second operand */
        int64_t k = 0;
        for (; k + 16 <= K; k += 16) {
            __m512 v = _mm512_loadu_ps(row + k);
            nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
            big = _mm512_max_ps(big, _mm512_abs_ps(v));
        }
        float m = _mm512_reduce_max_ps(big);
        for (; k < K; k++) {
            nan |= row[k] != row[k];
            m = m > __builtin_fabsf(row[k]) ? m : __builtin_fabsf(row[k]);
        }
        int finite = !nan && m - m == 0.0f; /* inf - inf is NaN */
        float scale = finite && m > 0.0f ? m / 127.0f : 1.0f;
        for (int p = 0; p < PASSES; p++) {
            s[r * PASSES + p] = finite ? scale : __builtin_nanf("");
            scale /= 254.0f;
        }
        uint8_t *q = u + (int64_t)r * PASSES * K;
        const __m512 lo = _mm512_set1_ps(-127.0f), hi = _mm512_set1_ps(127.0f);
        for (k = 0; k + 16 <= K; k += 16) {
            __m512 left = finite ? _mm512_loadu_ps(row + k) : _mm512_setzero_ps();
            for (int p = 0; p < PASSES; p++) {
                float sp = finite ? s[r * PASSES + p] : 1.0f;
                __m512 v = _mm512_roundscale_ps(_mm512_mul_ps(left, _mm512_set1_ps(1.0f / sp)),
                                                _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
                v = _mm512_min_ps(_mm512_max_ps(v, lo), hi);
                left = _mm512_fnmadd_ps(v, _mm512_set1_ps(sp), left); /* what is left, exactly */
                __m512i b = _mm512_add_epi32(_mm512_cvtps_epi32(v), _mm512_set1_epi32(128));
                _mm_storeu_si128((__m128i *)(q + p * K + k), _mm512_cvtepi32_epi8(b));
            }
        }
        for (; k < K; k++) {
            float left = finite ? row[k] : 0.0f;
            for (int p = 0; p < PASSES; p++) {
                float sp = finite ? s[r * PASSES + p] : 1.0f;
                float v = __builtin_rintf(left * (1.0f / sp));
                v = v < -127.0f ? -127.0f : v > 127.0f ? 127.0f : v;
                left -= v * sp;
                q[p * K + k] = (uint8_t)((int)v + 128);
            }
        }
    }
}

/* R quantized rows against one block of [K / 4][16][4] int8 weights: each 64-byte load
 * serves every row and pass; y gets the sums before the rows' scales, as the widened
 * kernel's. */
#define VNNI_ROWS(R)                                                                      \
    static void vnni_rows_##R(const uint8_t *u, const float *s, const int8_t *p,         \
                              int64_t K, float *y, int64_t ldy) {                        \
        __m512i a[R][PASSES], ones = _mm512_set1_epi8(1), sum = _mm512_setzero_si512(); \
        for (int r = 0; r < R; r++)                                                     \
            for (int q = 0; q < PASSES; q++) a[r][q] = _mm512_setzero_si512();          \
        for (int64_t g = 0; g < K / 4; g++) {                                           \
            STREAM(p + g * 64, 64, 1);                                                  \
            __m512i w = _mm512_loadu_si512(p + g * 64);                                 \
            sum = _mm512_dpbusd_epi32(sum, ones, w);                                    \
            _Pragma("GCC unroll 8") for (int r = 0; r < R; r++)                         \
                _Pragma("GCC unroll 3") for (int q = 0; q < PASSES; q++) {              \
                int32_t four;                                                           \
                memcpy(&four, u + ((int64_t)r * PASSES + q) * K + g * 4, 4);            \
                a[r][q] = _mm512_dpbusd_epi32(a[r][q], _mm512_set1_epi32(four), w);     \
            }                                                                           \
        }                                                                               \
        const __m512i bias = _mm512_slli_epi32(sum, 7); /* 128 times each row's sum */  \
        for (int r = 0; r < R; r++) {                                                   \
            __m512 out = _mm512_setzero_ps();                                           \
            for (int q = PASSES - 1; q >= 0; q--) /* smallest first */                 \
                out = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(a[r][q], bias)), \
                                      _mm512_set1_ps(s[r * PASSES + q]), out);          \
            _mm512_storeu_ps(y + r * ldy, out);                                         \
        }                                                                               \
    }
VNNI_ROWS(1) VNNI_ROWS(2) VNNI_ROWS(3) VNNI_ROWS(4)
VNNI_ROWS(5) VNNI_ROWS(6) VNNI_ROWS(7) VNNI_ROWS(8)

/* Up to 8 rows quantized by butterfly_quantize_rows against one grouped block. */
__attribute__((visibility("hidden"))) void butterfly_blocked_tile_i8q(
    int n, const uint8_t *u, const float *s, const int8_t *p, int64_t K, float *y,
    int64_t ldy) {
    switch (n) {
    case 1: vnni_rows_1(u, s, p, K, y, ldy); break;
    case 2: vnni_rows_2(u, s, p, K, y, ldy); break;
    case 3: vnni_rows_3(u, s, p, K, y, ldy); break;
    case 4: vnni_rows_4(u, s, p, K, y, ldy); break;
    case 5: vnni_rows_5(u, s, p, K, y, ldy); break;
    case 6: vnni_rows_6(u, s, p, K, y, ldy); break;
    case 7: vnni_rows_7(u, s, p, K, y, ldy); break;
    default: vnni_rows_8(u, s, p, K, y, ldy); break;
    }
}
#else
__attribute__((visibility("hidden"))) void butterfly_quantize_rows(int n, const float *x,
                                                                   int64_t ldx, int64_t K,
                                                                   uint8_t *u, float *s) {
    (void)n; (void)x; (void)ldx; (void)K; (void)u; (void)s; /* never called: group 1 */
}
__attribute__((visibility("hidden"))) void butterfly_blocked_tile_i8q(
    int n, const uint8_t *u, const float *s, const int8_t *p, int64_t K, float *y,
    int64_t ldy) {
    (void)n; (void)u; (void)s; (void)p; (void)K; (void)y; (void)ldy;
}
#endif

/* The int8 product, sums before the rows' scales: x quantized once, then the blocks
 * shared out as in PRODUCT. Returns -1 if scratch memory could not be had. */
int butterfly_blocked_linear_i8(const float *x, int64_t M, int64_t K, const int8_t *w,
                                int64_t NB, float *y) {
    if (butterfly_i8_group(K) == 1) {
        blocked_linear_i8_widened(x, M, K, w, NB, y);
        return 0;
    }
    const int64_t N = NB * 16;
    uint8_t *u = malloc((size_t)(M * PASSES * K));
    float *s = malloc(sizeof(float) * (size_t)(M * PASSES));
    if (!u || !s) {
        free(u); free(s);
        return -1;
    }
    butterfly_quantize_rows((int)M, x, K, K, u, s);
#pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < NB; b++)
        for (int64_t m = 0; m < M; m += TILE) {
            int n = M - m < TILE ? (int)(M - m) : TILE;
            butterfly_blocked_tile_i8q(n, u + m * PASSES * K, s + m * PASSES, w + b * K * 16, K,
                                       y + m * N + b * 16, N);
        }
    free(u); free(s);
    return 0;
}
