/* y = x @ W^T for a weight held as NB blocks of [K][16]: block b holds output rows
 * 16b..16b+15 interleaved, so a decode product (one to a few rows of x) reads the
 * weight as one sequential stream, 64 bytes (one cache line) per input position.
 * See runtime/native.py for why this exists and how it is built.
 *
 * GCC's vector extensions, not intrinsics: compiled with -march=native on the machine
 * that runs it, the same source becomes AVX-512, AVX2 or SSE code. The OpenMP loop runs
 * on torch's own OpenMP runtime (the library is linked against torch's libgomp), so it
 * uses the calling thread's torch thread count and torch's thread team. */
#include <stdint.h>
#include <string.h>

typedef float v16 __attribute__((vector_size(64)));
#define TILE 8

static inline v16 ld(const float *p) { v16 v; memcpy(&v, p, sizeof v); return v; }
static inline void st(float *p, v16 v) { memcpy(p, &v, sizeof v); }

/* One row against one block: four accumulators, so FMA latency does not bound the
 * stream. */
static void one_row(const float *x, const float *p, int64_t K, float *y) {
    v16 a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
    int64_t k = 0;
    for (; k + 4 <= K; k += 4) {
        a0 += ld(p + k * 16) * x[k];
        a1 += ld(p + (k + 1) * 16) * x[k + 1];
        a2 += ld(p + (k + 2) * 16) * x[k + 2];
        a3 += ld(p + (k + 3) * 16) * x[k + 3];
    }
    for (; k < K; k++) a0 += ld(p + k * 16) * x[k];
    st(y, (a0 + a1) + (a2 + a3));
}

/* R rows (R fixed, so the accumulators stay in registers) against one block: each
 * 16-wide slice of the weight is loaded once for all R rows. */
#define ROWS(R)                                                                          \
    static void rows_##R(const float *x, int64_t ldx, const float *p, int64_t K,        \
                         float *y, int64_t ldy) {                                        \
        v16 a[R];                                                                        \
        for (int r = 0; r < R; r++) a[r] = (v16){0};                                    \
        for (int64_t k = 0; k < K; k++) {                                                \
            v16 w = ld(p + k * 16);                                                      \
            _Pragma("GCC unroll 8") for (int r = 0; r < R; r++) a[r] += w * x[r * ldx + k]; \
        }                                                                                \
        for (int r = 0; r < R; r++) st(y + r * ldy, a[r]);                              \
    }
ROWS(2) ROWS(3) ROWS(4) ROWS(5) ROWS(6) ROWS(7) ROWS(8)

/* Up to 8 rows of x against one block; llama_layers.c uses it too. */
__attribute__((visibility("hidden"))) void butterfly_blocked_tile(int n, const float *x,
                                                                 int64_t ldx, const float *p,
                                                                 int64_t K, float *y,
                                                                 int64_t ldy) {
    switch (n) {
    case 1: one_row(x, p, K, y); break;
    case 2: rows_2(x, ldx, p, K, y, ldy); break;
    case 3: rows_3(x, ldx, p, K, y, ldy); break;
    case 4: rows_4(x, ldx, p, K, y, ldy); break;
    case 5: rows_5(x, ldx, p, K, y, ldy); break;
    case 6: rows_6(x, ldx, p, K, y, ldy); break;
    case 7: rows_7(x, ldx, p, K, y, ldy); break;
    default: rows_8(x, ldx, p, K, y, ldy); break;
    }
}

/* x [M, K] row-major, w [NB][K][16], y [M, NB * 16] row-major. Blocks are shared out
 * among the threads; each block is read from memory once and reused from the cache for
 * every tile of rows. */
void butterfly_blocked_linear_f32(const float *x, int64_t M, int64_t K, const float *w,
                                  int64_t NB, float *y) {
    const int64_t N = NB * 16;
#pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < NB; b++) {
        const float *p = w + b * K * 16;
        for (int64_t m = 0; m < M; m += TILE) {
            int n = M - m < TILE ? (int)(M - m) : TILE;
            butterfly_blocked_tile(n, x + m * K, K, p, K, y + m * N + b * 16, N);
        }
    }
}
