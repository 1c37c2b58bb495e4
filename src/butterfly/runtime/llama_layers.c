/* A llama-style stage's decoder layers over a few rows, in one call and one OpenMP
 * parallel region: the same computation as runtime/llama.py's forward (RMSNorm, fused
 * q/k/v product, optional per-head q/k norm, rotary embedding, the rows' keys and values
 * written into their KV caches, causal attention over each row's own cache, output
 * product, MLP), on weights in the blocked layout of blocked_linear.c.
 *
 * Why: once the products stream the weights at the memory's bandwidth, what is left of
 * a decode step is some forty small torch operations per layer, each a trip through
 * Python and the dispatcher, and one fork and join of the thread team per operation that
 * runs in parallel. Here a whole stage is one call: its threads meet at a barrier
 * between phases instead of being woken for each product. See runtime/fused_layers.py
 * for when it is used and how it is checked.
 *
 * Row m belongs to KV cache entry[m] and sits at position pos[m]; it attends to every
 * position of its entry up to and including its own, so decode rows, a speculative
 * verification's k + 1 rows and a prompt chunk packed with decode rows are all the same
 * call. Every row's keys and values are written before any row attends. */
#define _GNU_SOURCE /* sched_yield, sched_getcpu, sched_getaffinity, CPU_CLR */
#include <math.h>
#include <omp.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "vectors.h"

/* blocked_linear.c: up to 8 rows of x against one block of 16 output rows, fp32 or
 * bf16 weights */
void butterfly_blocked_tile(int n, const float *x, int64_t ldx, const float *p, int64_t K,
                            float *y, int64_t ldy);
void butterfly_blocked_tile_bf16(int n, const float *x, int64_t ldx, const uint16_t *p,
                                 int64_t K, float *y, int64_t ldy);
void butterfly_blocked_tile_i8(int n, const float *x, int64_t ldx, const int8_t *p,
                               int64_t K, float *y, int64_t ldy);
/* and int8 weights grouped for VNNI, against rows quantized into byte passes */
int butterfly_i8_group(int64_t K);
int butterfly_i8_passes(void);
void butterfly_quantize_rows(int n, const float *x, int64_t ldx, int64_t K, uint8_t *u, float *s);
void butterfly_blocked_tile_i8q(int n, const uint8_t *u, const float *s, const int8_t *p,
                                int64_t K, float *y, int64_t ldy);

enum { ATTN_NORM, WQKV, BQKV, WO, BO, MLP_NORM, W13, B13, W2, B2, Q_NORM, K_NORM,
       SQKV, SO, S13, S2, NPTR }; /* S*: int8 matrices' per-row scales (fp32), else 0 */
enum { F32, BF16, I8 }; /* a matrix's element type */
enum { SILU, GELU, GELU_TANH, RELU };

/* bf16 <-> fp32: a bf16 is the top half of an fp32; rounding to nearest, ties to even,
 * as torch's conversion does (for finite values) */
static inline float from_bf16(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}
static inline uint16_t to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40); /* NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

/* the 16 lanes' sum as a tree of 4 shuffles and adds: summed one lane after another, GCC
 * may not reorder the additions and made a chain of 15 dependent adds, which an attention
 * score (a 64-wide dot product) then waited on */
static inline float hsum(v16 v) {
#if defined(__clang__) || __GNUC__ >= 12 /* __builtin_shufflevector: GCC 12 on */
    v = v + __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7);
    v = v + __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11);
    v = v + __builtin_shufflevector(v, v, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13);
    v = v + __builtin_shufflevector(v, v, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14);
    return v[0];
#else
    float s = 0;
    for (int i = 0; i < 16; i++) s += v[i];
    return s;
#endif
}

/* e^x in 16 lanes (Cephes' expf: x = n ln 2 + r, a degree-5 polynomial in r, times 2^n),
 * within 2 ulp of expf for x in [-87.3, 88.3]; x is held to that range, so e^x is never 0
 * or infinite (1.2e-38 and 2.4e38 at its ends), and a NaN stays NaN. libm's expf, one
 * element at a time, took about a tenth of the compiled layers' own time in int8 decode
 * (softmax and SiLU; perf, 2-core AMD EPYC). */
static inline v16 exp16(v16 x) {
    typedef int32_t i16v __attribute__((vector_size(64)));
    const v16 zero = {0}, hi = zero + 88.3762626647949f, lo = zero - 87.3365447504f;
    i16v under = x < lo, over = x > hi;
    i16v bits = ((i16v)x & ~(under | over)) | ((i16v)lo & under) | ((i16v)hi & over);
    memcpy(&x, &bits, sizeof x);
    const float shift = 12582912.0f; /* 1.5 * 2^23: adding it rounds to an integer */
    v16 t = x * 1.44269504088896341f + shift;
    v16 n = t - shift;
    i16v e;
    memcpy(&e, &t, sizeof e);
    e = (e - 0x4b400000) + 127; /* the integer n, as a biased exponent */
    v16 r = x - n * 0.693359375f + n * 2.12194440e-4f;
    v16 p = 1.9875691500e-4f * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * (r * r) + r + 1.0f;
    e <<= 23;
    v16 scale;
    memcpy(&scale, &e, sizeof scale);
    return p * scale;
}

static float dot(const float *a, const float *b, int64_t n) {
    v16 acc = {0};
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) acc += ld(a + i) * ld(b + i);
    float s = hsum(acc);
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

/* the same against a bf16 row (a cached key), widened 16 at a time: summed one element
 * after another, as the loop first was, GCC may not reorder the additions and ran it
 * scalar, at one FMA's latency per element; bf16 decode then spent about a millisecond a
 * token of the small model in attention that fp32 did not (2 threads, AMD EPYC) */
static float dot_bf16(const float *a, const uint16_t *b, int64_t n) {
    v16 acc = {0};
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) acc += ld(a + i) * ld_bf16(b + i);
    float s = hsum(acc);
    for (; i < n; i++) s += a[i] * from_bf16(b[i]);
    return s;
}

/* out = weight * (x / sqrt(mean(x^2) + eps)), as runtime/llama.py's rms_norm */
static void rms_norm(const float *x, const float *weight, int64_t n, float eps, float *out) {
    float inv = 1.0f / sqrtf(dot(x, x, n) / (float)n + eps);
    for (int64_t i = 0; i < n; i++) out[i] = weight[i] * (x[i] * inv);
}

/* x * cos + rotate_half(x) * sin, rotate_half(x) = cat(-x2, x1) */
static void rope(float *x, const float *cos, const float *sin, int64_t n) {
    int64_t half = n / 2;
    for (int64_t i = 0; i < half; i++) {
        float a = x[i], b = x[i + half];
        x[i] = a * cos[i] - b * sin[i];
        x[i + half] = b * cos[i + half] + a * sin[i + half];
    }
}

static float activate(int64_t kind, float x) {
    switch (kind) {
    case SILU: return x / (1.0f + expf(-x));
    case GELU: return 0.5f * x * (1.0f + erff(x * 0.70710678118654752f));
    case GELU_TANH: {
        const float c = 0.7978845608028654f; /* sqrt(2 / pi) */
        return 0.5f * x * (1.0f + tanhf(c * (x + 0.044715f * x * x * x)));
    }
    default: return x > 0 ? x : 0;
    }
}

/* Where the region's threads meet between phases, instead of at OpenMP's own barrier:
 * at libgomp's, the last thread to arrive makes a futex system call every time, whether
 * or not anyone sleeps (strace of a node decoding the small model: about 120 a token,
 * 10 barriers a layer). Here they spin, and past SPINS rounds yield the core, so that a
 * thread the scheduler has taken away (other processes share the cores) is waited for
 * without holding a core from it. */
struct meeting {
    atomic_uint arrived, generation;
};
#define SPINS 4096
static inline void relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}
static void meet(struct meeting *at, unsigned threads) {
    if (threads < 2) return;
    unsigned generation = atomic_load_explicit(&at->generation, memory_order_acquire);
    if (atomic_fetch_add_explicit(&at->arrived, 1, memory_order_acq_rel) + 1 == threads) {
        atomic_store_explicit(&at->arrived, 0, memory_order_relaxed);
        atomic_fetch_add_explicit(&at->generation, 1, memory_order_release);
        return;
    }
    for (unsigned spin = 0;
         atomic_load_explicit(&at->generation, memory_order_acquire) == generation; spin++)
        if (spin < SPINS)
            relax();
        else
            sched_yield();
}

/* A thread of the team that the wake-up put on its master's CPU moves off it. Between a
 * node's steps (other nodes compute meanwhile) the team sleeps, and the kernel wakes a
 * thread where its waker runs: both threads then share one core while the other idles,
 * the master spinning at the first meeting, until the load balancer moves one some
 * milliseconds later. Measured on a 2-core AMD EPYC VM (GOMP_SPINCOUNT=20000, as nodes
 * run): four of the small model's layers on two threads took 7.3-8.2 ms after a 15 ms
 * pause against 3.0-3.7 ms back to back (3.9 ms on one thread), and 3.9-4.0 ms with
 * this. The thread takes the master's CPUs minus the
 * master's own (the process's, if the master is held to that one), so it stays off it
 * while the master stays; a master that moves is followed at the next call. Nothing is
 * moved where OpenMP binds threads itself (OMP_PROC_BIND, OMP_PLACES) or off Linux. */
#ifdef __linux__
struct away {
    int cpu; /* the master's, or -1: stay */
    cpu_set_t allowed;
};
static struct away away_from_master(void) {
    struct away a = {.cpu = -1};
    if (omp_get_max_threads() < 2 || omp_get_proc_bind() != omp_proc_bind_false) return a;
    const int cpu = sched_getcpu();
    if (cpu < 0 || sched_getaffinity(0, sizeof a.allowed, &a.allowed) != 0) return a;
    CPU_CLR(cpu, &a.allowed);
    if (CPU_COUNT(&a.allowed) == 0) {
        if (sched_getaffinity(getpid(), sizeof a.allowed, &a.allowed) != 0) return a;
        CPU_CLR(cpu, &a.allowed);
    }
    if (CPU_COUNT(&a.allowed) > 0) a.cpu = cpu;
    return a;
}
static void leave_master_cpu(const struct away *a) {
    if (a->cpu >= 0 && sched_getcpu() == a->cpu)
        sched_setaffinity(0, sizeof a->allowed, &a->allowed);
}
#else
struct away {
    int cpu;
};
static struct away away_from_master(void) { return (struct away){-1}; }
static void leave_master_cpu(const struct away *a) { (void)a; }
#endif

/* A product's blocks are handed out in chunks as threads ask (`schedule(dynamic)`), not
 * split in halves up front: a thread that loses its core for a while during a product
 * (other nodes share the 2 cores: the previous node's Python finishing its send, a
 * heartbeat) leaves the rest of its share to the other thread instead of making it wait
 * at the meeting. (A thread woken late is waited for at the meeting before the first
 * product all the same.) Each thread's share comes in about this many chunks, each a run
 * of whole blocks read in order. Every block is computed the same way whichever thread
 * takes it: the same result. Measured against static halves (bench/hops.py A/B, Intel
 * Xeon, thirty-first session): 4 small-model nodes 0.98x the time per token (0.95-1.01;
 * again 0.98x, 0.91-1.02, in a second run of 2 x 6 rounds), one node 0.98-0.99x; the tiny
 * model, whose weights a core's cache could keep across steps under static halves, 0.97x
 * on 4 nodes (0.87-1.15) and 1.06x on one (0.81-1.30). */
#define CHUNKS_PER_THREAD 8

/* A thread's scratch for x's byte passes (int8 weights on VNNI, blocked_linear.c). */
struct passes {
    uint8_t *u;
    float *s;
};

/* y[M, N] = x[M, K] @ W^T + bias, or y += that with `accumulate` (a residual); W of
 * element type `type`, an int8 one times its rows' `scale`. Must be reached by every
 * thread of the team: the blocks are shared out among them, who then meet. For grouped
 * int8 weights each thread splits x into byte passes itself (a microsecond a row at
 * these widths), which costs less than one more meeting. */
static void product(const float *x, int64_t M, int64_t K, const void *w, int type,
                    const float *scale, int64_t N, const float *bias, float *y,
                    int accumulate, struct meeting *at, unsigned threads, struct passes q) {
    const int64_t NB = (N + 15) / 16;
    const int grouped = type == I8 && butterfly_i8_group(K) == 4;
    const int64_t P = butterfly_i8_passes();
    if (grouped) butterfly_quantize_rows((int)M, x, K, K, q.u, q.s);
    const int64_t chunk = NB / (CHUNKS_PER_THREAD * (int64_t)threads) > 1
                              ? NB / (CHUNKS_PER_THREAD * (int64_t)threads)
                              : 1;
#pragma omp for schedule(dynamic, chunk) nowait
    for (int64_t b = 0; b < NB; b++) {
        float tmp[8 * 16] __attribute__((aligned(64)));
        int64_t cols = N - b * 16 < 16 ? N - b * 16 : 16;
        for (int64_t m = 0; m < M; m += 8) {
            int n = M - m < 8 ? (int)(M - m) : 8;
            if (type == BF16)
                butterfly_blocked_tile_bf16(n, x + m * K, K, (const uint16_t *)w + b * K * 16,
                                            K, tmp, 16);
            else if (grouped)
                butterfly_blocked_tile_i8q(n, q.u + m * P * K, q.s + m * P,
                                           (const int8_t *)w + b * K * 16, K, tmp, 16);
            else if (type == I8)
                butterfly_blocked_tile_i8(n, x + m * K, K, (const int8_t *)w + b * K * 16, K,
                                          tmp, 16);
            else
                butterfly_blocked_tile(n, x + m * K, K, (const float *)w + b * K * 16, K, tmp,
                                       16);
            if (scale)
                for (int r = 0; r < n; r++)
                    for (int64_t c = 0; c < cols; c++) tmp[r * 16 + c] *= scale[b * 16 + c];
            for (int r = 0; r < n; r++) {
                float *out = y + (m + r) * N + b * 16;
                for (int64_t c = 0; c < cols; c++) {
                    float v = bias ? tmp[r * 16 + c] + bias[b * 16 + c] : tmp[r * 16 + c];
                    out[c] = accumulate ? out[c] + v : v;
                }
            }
        }
    }
    meet(at, threads);
}

/* out[0, Dh) = sum over s of p[s] v[s] for rows v[s] of Dh values (bf16 with `bf16`),
 * summed in order of s: up to 64 of a row's values kept in four vectors across every
 * position, not read and written back at each; values past a multiple of 16 as before
 * this existed, position by position (a loop over positions per value, as GCC vectorizes
 * it, multiplies and adds apart where the rest fuses them: other roundings). */
#define VALUE_SUMS(NAME, T, LOAD, WIDEN)                                                   \
    static void NAME(const float *p, const T *v, int64_t last, int64_t Dh, float *out) {   \
        int64_t d = 0;                                                                     \
        for (; d + 16 <= Dh; d += 64) {                                                    \
            const int64_t n = (Dh - d) / 16 < 4 ? (Dh - d) / 16 : 4;                        \
            v16 a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};                                    \
            for (int64_t s = 0; s <= last; s++) {                                          \
                const T *row = v + s * Dh + d;                                             \
                a0 += p[s] * LOAD(row);                                                    \
                if (n > 1) a1 += p[s] * LOAD(row + 16);                                    \
                if (n > 2) a2 += p[s] * LOAD(row + 32);                                    \
                if (n > 3) a3 += p[s] * LOAD(row + 48);                                    \
            }                                                                              \
            st(out + d, a0);                                                               \
            if (n > 1) st(out + d + 16, a1);                                               \
            if (n > 2) st(out + d + 32, a2);                                               \
            if (n > 3) st(out + d + 48, a3);                                               \
            d += (n - 4) * 16; /* the next chunk starts where this one ended */            \
        }                                                                                  \
        const int64_t tail = d;                                                            \
        for (; d < Dh; d++) out[d] = 0;                                                    \
        for (int64_t s = 0; tail < Dh && s <= last; s++)                                   \
            for (int64_t e = tail; e < Dh; e++) out[e] += p[s] * WIDEN(v[s * Dh + e]);     \
    }
static inline float same(float x) { return x; }
VALUE_SUMS(value_sums, float, ld, same)
VALUE_SUMS(value_sums_bf16, uint16_t, ld_bf16, from_bf16)

/* Attention of one row's query head against positions [0, last] of its cache head:
 * softmax(q k^T / sqrt(Dh)) v; the cache fp32, or bf16 with `bf16`. The cache's rows
 * were last read a step ago and the weights' stream has flushed them since: each row's
 * key is fetched a few rows ahead and its value beside it, for the sums after. With
 * that and the value sums in registers, each thread's attention in a small-model decode
 * step at 128-192 positions took 0.28 ms instead of 0.34 (bf16) and 0.36 instead of 0.40
 * (fp32 cache); fetching 8 or 16 rows ahead gave the same (AMD EPYC, nineteenth session,
 * docs/PERFORMANCE-LOG.md). What is left is mostly the cache's own reads. */
#define AHEAD_ROWS 4
static void attend(const float *q, const void *keys, const void *values, int bf16,
                   int64_t last, int64_t Dh, float *scores, float *out) {
    const float scale = 1.0f / sqrtf((float)Dh);
    const int64_t row = Dh * (bf16 ? (int64_t)sizeof(uint16_t) : (int64_t)sizeof(float));
    float top = -INFINITY;
    for (int64_t s = 0; s <= last; s++) {
        if (s + AHEAD_ROWS <= last)
            for (int64_t b = 0; b < row; b += 64) {
                __builtin_prefetch((const char *)keys + (s + AHEAD_ROWS) * row + b, 0, 3);
                __builtin_prefetch((const char *)values + (s + AHEAD_ROWS) * row + b, 0, 3);
            }
        if (bf16) {
            scores[s] = dot_bf16(q, (const uint16_t *)keys + s * Dh, Dh) * scale;
        } else {
            scores[s] = dot(q, (const float *)keys + s * Dh, Dh) * scale;
        }
        if (scores[s] > top) top = scores[s];
    }
    float sum = 0;
    int64_t s = 0;
    v16 sums = {0};
    for (; s + 16 <= last + 1; s += 16) {
        v16 e = exp16(ld(scores + s) - top);
        st(scores + s, e);
        sums += e;
    }
    sum = hsum(sums);
    for (; s <= last; s++) sum += scores[s] = expf(scores[s] - top);
    for (s = 0; s <= last; s++) scores[s] /= sum;
    if (bf16)
        value_sums_bf16(scores, (const uint16_t *)values, last, Dh, out);
    else
        value_sums(scores, (const float *)values, last, Dh, out);
}

/* one head's Dh values into a cache row */
static void store(void *cache, int bf16, int64_t at, const float *x, int64_t Dh) {
    if (bf16)
        for (int64_t d = 0; d < Dh; d++) ((uint16_t *)cache)[at + d] = to_bf16(x[d]);
    else
        memcpy((float *)cache + at, x, sizeof(float) * Dh);
}

/* h [M, D] in place through L layers. layers [L][NPTR] holds each layer's tensors
 * (0 for an absent bias or q/k norm; norms and biases fp32, the four matrices blocked);
 * caches [L][E][2] the key and value tensors of each entry, [H_kv, capacity[e], Dh]
 * each; cos, sin [positions][Dh] the rotary tables, row pos[m] for row m; trace
 * [L][M][D] receives h after each layer when not NULL. With `bf16` the caches are bf16
 * (keys and values rounded as they are cached); `wtype` is the matrices' element type
 * (F32, BF16, or I8 with scales). The arithmetic stays fp32.
 * Returns 0, or -1 if scratch memory could not be had (h untouched). */
int butterfly_llama_layers_f32(float *h, int64_t M, int64_t D, int64_t L, const int64_t *layers,
                               int64_t H, int64_t Hkv, int64_t Dh, int64_t I,
                               const int64_t *caches, int64_t E, const int64_t *capacity,
                               const int64_t *entry, const int64_t *pos, const float *cos,
                               const float *sin, float eps, int64_t act, float *trace,
                               int64_t bf16, int64_t wtype) {
    const int64_t Nqkv = (H + 2 * Hkv) * Dh, group = H / Hkv, pieces = (I + 15) / 16;
    int64_t longest = 0;
    for (int64_t m = 0; m < M; m++)
        if (pos[m] + 1 > longest) longest = pos[m] + 1;
    const int threads = omp_get_max_threads();
    float *a = malloc(sizeof(float) * M * D), *qkv = malloc(sizeof(float) * M * Nqkv);
    float *att = malloc(sizeof(float) * M * H * Dh), *mid = malloc(sizeof(float) * M * 2 * I);
    float *gated = malloc(sizeof(float) * M * I);
    float *scores = malloc(sizeof(float) * threads * longest);
    /* each thread's byte passes of the widest input (int8 weights on VNNI only) */
    const int64_t widest = D > H * Dh ? (D > I ? D : I) : (H * Dh > I ? H * Dh : I);
    const int64_t passes = wtype == I8 ? butterfly_i8_passes() : 0;
    uint8_t *qu = malloc((size_t)(threads * M * passes * widest) + 1);
    float *qs = malloc(sizeof(float) * (size_t)(threads * M * passes) + 1);
    int ok = a && qkv && att && mid && gated && scores && qu && qs;
    struct meeting meeting = {0, 0};
    const struct away away = away_from_master();
    if (ok) {
#pragma omp parallel
        {
            if (omp_get_thread_num() != 0) leave_master_cpu(&away);
            float *mine = scores + omp_get_thread_num() * longest;
            const struct passes q = {qu + omp_get_thread_num() * M * passes * widest,
                                     qs + omp_get_thread_num() * M * passes};
            const unsigned team = (unsigned)omp_get_num_threads();
            for (int64_t l = 0; l < L; l++) {
                const int64_t *t = layers + l * NPTR;
#define T(i) ((const float *)(intptr_t)t[i])
#define W(i) ((const void *)(intptr_t)t[i])
#define CACHE(e, kv) ((void *)(intptr_t)caches[(l * E + (e)) * 2 + (kv)])
#pragma omp for schedule(static) nowait
                for (int64_t m = 0; m < M; m++) rms_norm(h + m * D, T(ATTN_NORM), D, eps, a + m * D);
                meet(&meeting, team);
                product(a, M, D, W(WQKV), (int)wtype, T(SQKV), Nqkv, T(BQKV), qkv, 0, &meeting, team, q);
#pragma omp for schedule(static) nowait
                for (int64_t j = 0; j < M * (H + Hkv); j++) { /* each q and k head */
                    int64_t m = j / (H + Hkv), head = j % (H + Hkv);
                    float *x = qkv + m * Nqkv + head * Dh;
                    const float *norm = head < H ? T(Q_NORM) : T(K_NORM);
                    if (norm) rms_norm(x, norm, Dh, eps, x);
                    rope(x, cos + pos[m] * Dh, sin + pos[m] * Dh, Dh);
                    if (head >= H) {
                        int64_t g = head - H, e = entry[m];
                        int64_t at = (g * capacity[e] + pos[m]) * Dh;
                        store(CACHE(e, 0), bf16, at, x, Dh);
                        store(CACHE(e, 1), bf16, at, x + Hkv * Dh, Dh);
                    }
                }
                meet(&meeting, team);
#pragma omp for schedule(static) nowait
                for (int64_t j = 0; j < M * H; j++) {
                    int64_t m = j / H, head = j % H, e = entry[m];
                    int64_t at = (head / group) * capacity[e] * Dh;
                    size_t size = bf16 ? sizeof(uint16_t) : sizeof(float);
                    attend(qkv + m * Nqkv + head * Dh, (char *)CACHE(e, 0) + at * size,
                           (char *)CACHE(e, 1) + at * size, bf16, pos[m], Dh, mine,
                           att + m * H * Dh + head * Dh);
                }
                meet(&meeting, team);
                product(att, M, H * Dh, W(WO), (int)wtype, T(SO), D, T(BO), h, 1, &meeting, team, q);
#pragma omp for schedule(static) nowait
                for (int64_t m = 0; m < M; m++) rms_norm(h + m * D, T(MLP_NORM), D, eps, a + m * D);
                meet(&meeting, team);
                product(a, M, D, W(W13), (int)wtype, T(S13), 2 * I, T(B13), mid, 0, &meeting, team, q);
#pragma omp for schedule(static) nowait
                for (int64_t j = 0; j < M * pieces; j++) { /* 16 of a row's I at a time */
                    int64_t m = j / pieces, i = j % pieces * 16;
                    const float *g = mid + m * 2 * I, *u = g + I;
                    if (act == SILU && i + 16 <= I) {
                        v16 x = ld(g + i);
                        st(gated + m * I + i, x / (1.0f + exp16(-x)) * ld(u + i));
                    } else {
                        for (int64_t k = i; k < i + 16 && k < I; k++)
                            gated[m * I + k] = activate(act, g[k]) * u[k];
                    }
                }
                meet(&meeting, team);
                product(gated, M, I, W(W2), (int)wtype, T(S2), D, T(B2), h, 1, &meeting, team, q);
                if (trace) {
#pragma omp for schedule(static) nowait
                    for (int64_t m = 0; m < M; m++)
                        memcpy(trace + (l * M + m) * D, h + m * D, sizeof(float) * D);
                    meet(&meeting, team);
                }
#undef T
#undef W
#undef CACHE
            }
        }
    }
    free(a); free(qkv); free(att); free(mid); free(gated); free(scores); free(qu); free(qs);
    return ok ? 0 : -1;
}

/* A first stage's rows from its embedding table [vocab, D], fp32 or bf16 (widened,
 * exactly): h [M, D] = table[ids]. The ids are the caller's to check against the table. */
void butterfly_embed_rows(const int64_t *ids, int64_t M, const void *table, int64_t bf16,
                          int64_t D, float *h) {
    for (int64_t m = 0; m < M; m++) {
        if (bf16) {
            const uint16_t *row = (const uint16_t *)table + ids[m] * D;
            for (int64_t d = 0; d < D; d++) h[m * D + d] = from_bf16(row[d]);
        } else {
            memcpy(h + m * D, (const float *)table + ids[m] * D, sizeof(float) * D);
        }
    }
}

/* round to bf16 and back: where torch's bf16 operations store their result */
static inline float bf16_round(float x) { return from_bf16(to_bf16(x)); }

/* The final norm of a last stage, as runtime/llama.py's rms_norm computes it: with
 * `bf16`, on the stage's output rounded to bf16, the normalized row rounded before the
 * norm's weight multiplies it and the product rounded again, as torch's bf16 operations
 * do; the variance in fp32 either way. */
static void final_norm(const float *x, const float *weight, int64_t n, float eps, int bf16,
                       float *out) {
    if (!bf16) {
        rms_norm(x, weight, n, eps, out);
        return;
    }
    for (int64_t i = 0; i < n; i++) out[i] = bf16_round(x[i]);
    float inv = 1.0f / sqrtf(dot(out, out, n) / (float)n + eps);
    for (int64_t i = 0; i < n; i++) out[i] = bf16_round(weight[i] * bf16_round(out[i] * inv));
}

/* A last stage's end in one call: out [R, N] = head(rms_norm(h[rows[r]])) for r < R, h
 * [*, D] fp32 (the layers' output), the head of element type `wtype` (times `scale` for
 * int8) in the blocked layout. With `bf16` the norm rounds as final_norm says and out is
 * bf16, each logit summed in fp32 and rounded once (as runtime/native.py's product);
 * else out is fp32. Only the rows asked for are computed: a prompt chunk's last row,
 * not its 64. Why: on torch, the norm's five operations and the head's product around
 * its kernel took 0.2 ms of a bf16 decode step (small model, AMD EPYC, nineteenth
 * session). Returns 0, or -1 if scratch memory could not be had (out untouched). */
int butterfly_llama_head(const float *h, int64_t D, const int64_t *rows, int64_t R,
                         const float *norm, float eps, const void *w, int64_t wtype,
                         const float *scale, int64_t N, int64_t bf16, void *out) {
    const int threads = omp_get_max_threads();
    const int64_t passes = wtype == I8 ? butterfly_i8_passes() : 0;
    float *a = malloc(sizeof(float) * R * D);
    float *y = bf16 ? malloc(sizeof(float) * R * N) : (float *)out;
    uint8_t *qu = malloc((size_t)(threads * R * passes * D) + 1);
    float *qs = malloc(sizeof(float) * (size_t)(threads * R * passes) + 1);
    int ok = a && y && qu && qs;
    struct meeting meeting = {0, 0};
    const struct away away = away_from_master();
    if (ok) {
#pragma omp parallel
        {
            if (omp_get_thread_num() != 0) leave_master_cpu(&away);
            const struct passes q = {qu + omp_get_thread_num() * R * passes * D,
                                     qs + omp_get_thread_num() * R * passes};
            const unsigned team = (unsigned)omp_get_num_threads();
#pragma omp for schedule(static) nowait
            for (int64_t r = 0; r < R; r++)
                final_norm(h + rows[r] * D, norm, D, eps, (int)bf16, a + r * D);
            meet(&meeting, team);
            product(a, R, D, w, (int)wtype, scale, N, NULL, y, 0, &meeting, team, q);
            if (bf16) {
#pragma omp for schedule(static)
                for (int64_t i = 0; i < R * N; i++) ((uint16_t *)out)[i] = to_bf16(y[i]);
            }
        }
    }
    free(a); free(qu); free(qs);
    if (bf16) free(y);
    return ok ? 0 : -1;
}
