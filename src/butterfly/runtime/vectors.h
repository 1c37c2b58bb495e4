/* 16 fp32 lanes in GCC's vector extensions, and their loads, for both kernel files
 * (blocked_linear.c, llama_layers.c): compiled with -march=native on the machine that
 * runs them, the same source becomes AVX-512, AVX2 or SSE code (runtime/native.py). */
#ifndef BUTTERFLY_VECTORS_H
#define BUTTERFLY_VECTORS_H

#include <stdint.h>
#include <string.h>

typedef float v16 __attribute__((vector_size(64)));
typedef uint16_t h16 __attribute__((vector_size(32)));
typedef uint32_t u32x16 __attribute__((vector_size(64)));

static inline v16 ld(const float *p) { v16 v; memcpy(&v, p, sizeof v); return v; }
static inline void st(float *p, v16 v) { memcpy(p, &v, sizeof v); }

/* 16 bf16 values widened to fp32: a bf16 is the top half of the fp32 it rounds */
static inline v16 ld_bf16(const uint16_t *p) {
    h16 h;
    memcpy(&h, p, sizeof h);
    u32x16 u = __builtin_convertvector(h, u32x16) << 16;
    v16 v;
    memcpy(&v, &u, sizeof v);
    return v;
}

#endif
