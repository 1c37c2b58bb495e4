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
#include <string.h>

typedef float v16 __attribute__((vector_size(64)));
typedef uint16_t h16 __attribute__((vector_size(32)));
typedef uint32_t u32x16 __attribute__((vector_size(64)));
#define TILE 8

/* Reading an fp32 weight, the kernel prefetches 2 KiB ahead with the non-temporal hint
 * (prefetchnta), so the stream passes the caches by instead of evicting what the process
 * runs between products and steps. In one process it made no difference to decode; on
 * 4 node processes of a 2-core machine taking turns, the small model's tokens took
 * 0.90-0.93x the time (bench/hops.py A/B, AMD EPYC), with the per-hop cost (Python and
 * sockets on caches the weights had just flushed) down from 1.7-2.2 to 1.0-1.5 ms.
 * The same hint made bf16 tokens 1.08-1.10x slower (1 and 4 nodes) and bf16 + int8
 * ones 5-9% slower in one process: their kernels widen each weight before the
 * arithmetic, and read without it (docs/PERFORMANCE.md, fifth session). */
#define AHEAD 2048
#define STREAM(p, bytes, on)                                                               \
    do {                                                                                   \
        if (on)                                                                            \
            for (int o_ = 0; o_ < (bytes); o_ += 64)                                       \
                __builtin_prefetch((const char *)(p) + AHEAD + o_, 0, 0);                  \
    } while (0)

static inline v16 ld(const float *p) { v16 v; memcpy(&v, p, sizeof v); return v; }
static inline void st(float *p, v16 v) { memcpy(p, &v, sizeof v); }
/* 16 bf16 weights widened to fp32: a bf16 is the top half of the fp32 it rounds */
static inline v16 ld_bf16(const uint16_t *p) {
    h16 h;
    memcpy(&h, p, sizeof h);
    u32x16 u = __builtin_convertvector(h, u32x16) << 16;
    v16 v;
    memcpy(&v, &u, sizeof v);
    return v;
}

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
KERNELS(_bf16, uint16_t, ld_bf16, 0)
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
PRODUCT(butterfly_blocked_linear_i8, _i8, int8_t) /* sums before the rows' scales */
