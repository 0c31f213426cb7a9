/* Weight-quantized matmul for tierlm's CPU path: y = x W^T (+ b) with W in 4-bit or 8-bit groups.
 *
 * One format covers GGUF's Q4_0, Q4_1 and Q8_0 blocks and tierlm's own int4 (group 32/64/128) and int8
 * (per output channel) weights: every weight is an unsigned code u (4 or 8 bits) with a per-group fp16
 * scale d and fp16 offset m, value = d * u + m. Q4_1 is exactly that (m is its stored min); Q4_0 is
 * m = -8 d and Q8_0 is u = q + 128, m = -128 d, both exact in fp16 (a power-of-two multiple of d).
 *
 * Layout (tierlm/quant/weights.py packs it): output rows in tiles of 16, a tile's codes interleaved so
 * that one 64-byte load holds 16 rows x 4 consecutive inputs, one 32-bit lane per row:
 *   8-bit: w[((tile * K/4 + c) * 16 + r) * 4 + j] = u(row tile*16 + r, input 4c + j)
 *   4-bit: w[((tile * K/8 + c) * 16 + r) * 4 + j] = u(.., 8c + j) | u(.., 8c + 4 + j) << 4
 *   scales, mins: [tile][K/G][16] fp16.
 * N is padded to a multiple of 16 with zero rows (d = m = 0); the store of the last tile is masked.
 *
 * The activations are quantized per row on the fly, per block of 32 inputs, as llama.cpp does:
 * dx = amax / 127, q = round(x / dx) (nearest even) in int8. Then for a group g of G inputs
 *   y[n] += d[n,g] * sum_b dx_b * dot_b(u, q) + m[n,g] * sum_b dx_b * sum(q_b)
 * with dot_b the exact int32 dot product of block b. On AVX-512 VNNI, vpdpbusd multiplies the unsigned
 * codes by the signed activations, 4 products into each of 16 row lanes, with the 4 activations
 * broadcast: one instruction is 64 multiply-adds, with no horizontal sums. A tile's unpacked codes are
 * reused by up to 4 activation rows at a time. The portable loop below does the same arithmetic in the
 * same order (fmaf), so the two paths agree bit for bit.
 *
 * tierlm_qmatmul_f32 is the exact variant: fp32 activations times the codes widened to fp32 in registers,
 *   y[n] += d[n,g] * sum_k u[n,k] x[k] + m[n,g] * sum_k x[k]     (over the group's inputs k)
 * i.e. the dequantized fp32 weight's product up to summation order (greedy tokens match the fp32 path), at
 * about four times the instructions of the int8 path (one FMA per 16 products instead of 64).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#define QBLOCK 32
#define TILE 16
#define MR 8
#define QINLINE static inline __attribute__((always_inline))

static float half_to_float_q(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
    if (exp == 0) {
        if (man == 0) {
            bits = sign;
        } else {  /* subnormal: renormalize */
            exp = 127 - 15 + 1;
            while (!(man & 0x400)) { man <<= 1; exp--; }
            bits = sign | (exp << 23) | ((man & 0x3ff) << 13);
        }
    } else if (exp == 0x1f) {
        bits = sign | 0x7f800000u | (man << 13);
    } else {
        bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

/* x [M, K] -> integer activations, dx [M, K/32], gs [M, K/G] (sum over the group's blocks of dx_b * sum(q_b)).
 * act_bits 8: q int8 [M, K], levels 127. act_bits 16: Q = round(x / dx) with levels 32512, stored as two int8
 * planes [2, M, K] with Q = 256 hi + lo (hi = floor((Q + 128) / 256) in -127..127, lo in -128..127), so the
 * 16-bit product runs as two vpdpbusd (see tile_rows_vnni16). */
static void quantize_rows(const float *x, int64_t ldx, int64_t M, int64_t K, int64_t G, int act_bits, int8_t *q,
                          float *dx, float *gs) {
    const int64_t nb = K / QBLOCK, bpg = G / QBLOCK;
    const float levels = act_bits == 8 ? 127.0f : 32512.0f;
    for (int64_t m = 0; m < M; m++) {
        const float *xr = x + m * ldx;
        for (int64_t b = 0; b < nb; b++) {
            const float *xb = xr + b * QBLOCK;
            float amax = 0.0f;
            for (int i = 0; i < QBLOCK; i++) amax = fmaxf(amax, fabsf(xb[i]));
            const float d = amax / levels, id = d != 0.0f ? 1.0f / d : 0.0f;
            int32_t sum = 0;
            for (int i = 0; i < QBLOCK; i++) {
                const int32_t v = (int32_t)nearbyintf(xb[i] * id);
                const int64_t at = m * K + b * QBLOCK + i;
                if (act_bits == 8) {
                    q[at] = (int8_t)v;
                } else {
                    const int32_t hi = (v + 128) >> 8;  /* arithmetic shift: floor */
                    q[at] = (int8_t)hi;
                    q[M * K + at] = (int8_t)(v - 256 * hi);
                }
                sum += v;
            }
            dx[m * nb + b] = d;
            const int64_t g = b / bpg;
            const float term = d * (float)sum;
            gs[m * (K / G) + g] = (b % bpg == 0) ? term : gs[m * (K / G) + g] + term;
        }
    }
}

/* Activation k of row m: the int8 value, or the 16-bit one rebuilt from its two planes (plane = M * K). */
static inline int32_t act_at(const int8_t *q, int64_t plane, int64_t at, int act_bits) {
    return act_bits == 8 ? q[at] : 256 * (int32_t)q[at] + q[plane + at];
}

/* The portable loop: one row tile, all M rows, the same arithmetic and order as the vector path. */
static void tile_portable(const int8_t *q, int64_t plane, int act_bits, const float *dx, const float *gs, const uint8_t *w,
                          const uint16_t *sc, const uint16_t *mn, int64_t M, int64_t K, int64_t G, int bits,
                          float out[][TILE]) {
    const int64_t nb = K / QBLOCK, bpg = G / QBLOCK, ng = K / G;
    for (int64_t m = 0; m < M; m++) {
        for (int r = 0; r < TILE; r++) {
            float acc = 0.0f;
            for (int64_t g = 0; g < ng; g++) {
                float gacc = 0.0f;
                for (int64_t b = g * bpg; b < (g + 1) * bpg; b++) {
                    int32_t dot = 0;
                    for (int j = 0; j < 8; j++) {  /* 8 groups of 4 inputs: k = 32 b + 4 j + t */
                        for (int t = 0; t < 4; t++) {
                            const int64_t k = b * QBLOCK + 4 * j + t;
                            int32_t u;
                            if (bits == 8) {
                                u = w[((k / 4) * TILE + r) * 4 + t];
                            } else {
                                const uint8_t byte = w[((k / 8) * TILE + r) * 4 + t];
                                u = (j & 1) ? byte >> 4 : byte & 0x0f;
                            }
                            dot += u * act_at(q, plane, m * K + k, act_bits);
                        }
                    }
                    gacc = fmaf((float)dot, dx[m * nb + b], gacc);
                }
                acc = fmaf(gacc, half_to_float_q(sc[g * TILE + r]), acc);
                acc = fmaf(half_to_float_q(mn[g * TILE + r]), gs[m * ng + g], acc);
            }
            out[m][r] = acc;
        }
    }
}

#if defined(__AVX512F__) && defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define QMATMUL_VNNI 1
/* The end of group g for R rows: facc += acc * d + m * sums (d, m: the 16 rows' fp16 scale and offset; sums: per
 * row, the group's activation term, sum over blocks of dx * sum(q), or sum(x) for fp32 activations). */
QINLINE void group_epilogue(const uint16_t *sc, const uint16_t *mn, int64_t g, const float *sums, int64_t ng, int R,
                            const __m512 *acc, __m512 *facc) {
    const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(sc + g * TILE)));
    const __m512 m = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(mn + g * TILE)));
    for (int i = 0; i < R; i++) {
        facc[i] = _mm512_fmadd_ps(acc[i], d, facc[i]);
        facc[i] = _mm512_fmadd_ps(m, _mm512_set1_ps(sums[i * ng + g]), facc[i]);
    }
}

/* The last tile's rows past N are not stored. */
QINLINE __mmask16 tile_mask(int64_t n0, int64_t N) {
    return (N - n0) >= TILE ? (__mmask16)0xffff : (__mmask16)((1u << (N - n0)) - 1);
}

/* y rows m0 .. m0+R-1 of one tile = facc + bias. */
QINLINE void store_rows(float *y, int64_t ldy, int64_t m0, int64_t R, int64_t n0, __mmask16 mask, const float *bias,
                        const __m512 *facc) {
    const __m512 bv = bias ? _mm512_maskz_loadu_ps(mask, bias + n0) : _mm512_setzero_ps();
    for (int64_t i = 0; i < R; i++) _mm512_mask_storeu_ps(y + (m0 + i) * ldy + n0, mask, _mm512_add_ps(facc[i], bv));
}

/* The 32 inputs of block b as 8 vectors of 16 rows x 4 codes. */
QINLINE void unpack_block(const uint8_t *w, int64_t b, int bits, __m512i *wv) {
    if (bits == 8) {
        const uint8_t *p = w + b * 8 * 64;
        for (int j = 0; j < 8; j++) wv[j] = _mm512_loadu_si512((const void *)(p + 64 * j));
    } else {
        const uint8_t *p = w + b * 4 * 64;
        const __m512i low = _mm512_set1_epi8(0x0f);
        for (int c = 0; c < 4; c++) {
            const __m512i v = _mm512_loadu_si512((const void *)(p + 64 * c));
            wv[2 * c] = _mm512_and_si512(v, low);
            wv[2 * c + 1] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
        }
    }
}

/* Rows m0 .. m0+R-1 of one tile; R is a constant in each instance, so the accumulators stay in registers. */
QINLINE void tile_rows_vnni(const int8_t *q, const float *dx, const float *gs, const uint8_t *w, const uint16_t *sc,
                            const uint16_t *mn, int64_t K, int64_t G, int bits, int R, __m512 *facc) {
    const int64_t nb = K / QBLOCK, bpg = G / QBLOCK, ng = K / G;
    for (int i = 0; i < R; i++) facc[i] = _mm512_setzero_ps();
    for (int64_t g = 0; g < ng; g++) {
        __m512 gacc[MR];
        for (int i = 0; i < R; i++) gacc[i] = _mm512_setzero_ps();
        for (int64_t b = g * bpg; b < (g + 1) * bpg; b++) {
            __m512i wv[8];
            unpack_block(w, b, bits, wv);
            for (int i = 0; i < R; i++) {
                const int32_t *qa = (const int32_t *)(q + i * K + b * QBLOCK);
                __m512i dot = _mm512_setzero_si512();
                for (int j = 0; j < 8; j++) dot = _mm512_dpbusd_epi32(dot, wv[j], _mm512_set1_epi32(qa[j]));
                gacc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_set1_ps(dx[i * nb + b]), gacc[i]);
            }
        }
        group_epilogue(sc, mn, g, gs, ng, R, gacc, facc);
    }
}

/* The 16-bit variant: the same unsigned-by-signed vpdpbusd, once with the high and once with the low int8 plane
 * of each activation (two independent chains), combined exactly as 256 dot_hi + dot_lo before the float step. */
QINLINE void tile_rows_vnni16(const int8_t *q, int64_t plane, const float *dx, const float *gs, const uint8_t *w,
                              const uint16_t *sc, const uint16_t *mn, int64_t K, int64_t G, int bits, int R,
                              __m512 *facc) {
    const int64_t nb = K / QBLOCK, bpg = G / QBLOCK, ng = K / G;
    for (int i = 0; i < R; i++) facc[i] = _mm512_setzero_ps();
    for (int64_t g = 0; g < ng; g++) {
        __m512 gacc[4];
        for (int i = 0; i < R; i++) gacc[i] = _mm512_setzero_ps();
        for (int64_t b = g * bpg; b < (g + 1) * bpg; b++) {
            __m512i wv[8];
            unpack_block(w, b, bits, wv);
            for (int i = 0; i < R; i++) {
                const int32_t *qh = (const int32_t *)(q + i * K + b * QBLOCK), *ql = (const int32_t *)(q + plane + i * K + b * QBLOCK);
                __m512i dh = _mm512_setzero_si512(), dl = _mm512_setzero_si512();
                for (int j = 0; j < 8; j++) {
                    dh = _mm512_dpbusd_epi32(dh, wv[j], _mm512_set1_epi32(qh[j]));
                    dl = _mm512_dpbusd_epi32(dl, wv[j], _mm512_set1_epi32(ql[j]));
                }
                const __m512i dot = _mm512_add_epi32(_mm512_slli_epi32(dh, 8), dl);
                gacc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_set1_ps(dx[i * nb + b]), gacc[i]);
            }
        }
        group_epilogue(sc, mn, g, gs, ng, R, gacc, facc);
    }
}

static void tile_vnni16(const int8_t *q, int64_t plane, const float *dx, const float *gs, const uint8_t *w, const uint16_t *sc,
                        const uint16_t *mn, int64_t M, int64_t K, int64_t G, int bits, const float *bias, float *y,
                        int64_t ldy, int64_t n0, int64_t N) {
    const int64_t nb = K / QBLOCK, ng = K / G;
    const __mmask16 mask = tile_mask(n0, N);
    for (int64_t m0 = 0; m0 < M; m0 += 4) {
        const int64_t R = M - m0 < 4 ? M - m0 : 4;
        __m512 facc[4];
        const int8_t *qm = q + m0 * K;
        const float *dxm = dx + m0 * nb, *gsm = gs + m0 * ng;
        switch (R) {
            case 4: tile_rows_vnni16(qm, plane, dxm, gsm, w, sc, mn, K, G, bits, 4, facc); break;
            case 3: tile_rows_vnni16(qm, plane, dxm, gsm, w, sc, mn, K, G, bits, 3, facc); break;
            case 2: tile_rows_vnni16(qm, plane, dxm, gsm, w, sc, mn, K, G, bits, 2, facc); break;
            default: tile_rows_vnni16(qm, plane, dxm, gsm, w, sc, mn, K, G, bits, 1, facc); break;
        }
        store_rows(y, ldy, m0, R, n0, mask, bias, facc);
    }
}

static void tile_vnni(const int8_t *q, const float *dx, const float *gs, const uint8_t *w, const uint16_t *sc,
                      const uint16_t *mn, int64_t M, int64_t K, int64_t G, int bits, const float *bias, float *y,
                      int64_t ldy, int64_t n0, int64_t N) {
    const int64_t nb = K / QBLOCK, ng = K / G;
    const __mmask16 mask = tile_mask(n0, N);
    for (int64_t m0 = 0; m0 < M; m0 += MR) {
        const int64_t R = M - m0 < MR ? M - m0 : MR;
        __m512 facc[MR];
        const int8_t *qm = q + m0 * K;
        const float *dxm = dx + m0 * nb, *gsm = gs + m0 * ng;
        switch (R) {  /* constant R per call: the loops over rows unroll */
            case 8: tile_rows_vnni(qm, dxm, gsm, w, sc, mn, K, G, bits, 8, facc); break;
            case 7: tile_rows_vnni(qm, dxm, gsm, w, sc, mn, K, G, bits, 7, facc); break;
            case 6: tile_rows_vnni(qm, dxm, gsm, w, sc, mn, K, G, bits, 6, facc); break;
            case 5: tile_rows_vnni(qm, dxm, gsm, w, sc, mn, K, G, bits, 5, facc); break;
            case 4: tile_rows_vnni(qm, dxm, gsm, w, sc, mn, K, G, bits, 4, facc); break;
            case 3: tile_rows_vnni(qm, dxm, gsm, w, sc, mn, K, G, bits, 3, facc); break;
            case 2: tile_rows_vnni(qm, dxm, gsm, w, sc, mn, K, G, bits, 2, facc); break;
            default: tile_rows_vnni(qm, dxm, gsm, w, sc, mn, K, G, bits, 1, facc); break;
        }
        store_rows(y, ldy, m0, R, n0, mask, bias, facc);
    }
}
#endif

/* ---- fp32 activations -------------------------------------------------------------------------------- */
/* Code (row r, input k) of a tile, either width. */
static inline int32_t code_at(const uint8_t *w, int64_t k, int r, int bits) {
    if (bits == 8) return w[((k / 4) * TILE + r) * 4 + (k % 4)];
    const uint8_t byte = w[((k / 8) * TILE + r) * 4 + (k % 4)];
    return (k % 8) < 4 ? byte & 0x0f : byte >> 4;
}

static void tile_portable_f32(const float *x, int64_t ldx, const float *xs, const uint8_t *w, const uint16_t *sc,
                              const uint16_t *mn, int64_t M, int64_t K, int64_t G, int bits, float out[][TILE]) {
    const int64_t ng = K / G;
    for (int64_t m = 0; m < M; m++) {
        for (int r = 0; r < TILE; r++) {
            float acc = 0.0f;
            for (int64_t g = 0; g < ng; g++) {
                float s = 0.0f;
                for (int64_t k = g * G; k < (g + 1) * G; k++) s = fmaf((float)code_at(w, k, r, bits), x[m * ldx + k], s);
                acc = fmaf(s, half_to_float_q(sc[g * TILE + r]), acc);
                acc = fmaf(half_to_float_q(mn[g * TILE + r]), xs[m * ng + g], acc);
            }
            out[m][r] = acc;
        }
    }
}

#ifdef QMATMUL_VNNI
/* Inputs k0 .. k0+3 of rows m0.. of a tile: v holds 16 rows x 4 codes (one byte each, 32-bit lanes). */
QINLINE void fma4(__m512i v, const float *x, int64_t ldx, int64_t k0, int R, __m512 *s) {
    const __m512i byte = _mm512_set1_epi32(0xff);
    const __m512 w0 = _mm512_cvtepi32_ps(_mm512_and_si512(v, byte));
    const __m512 w1 = _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srli_epi32(v, 8), byte));
    const __m512 w2 = _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srli_epi32(v, 16), byte));
    const __m512 w3 = _mm512_cvtepi32_ps(_mm512_srli_epi32(v, 24));
    for (int i = 0; i < R; i++) {
        const float *xi = x + i * ldx + k0;
        s[i] = _mm512_fmadd_ps(w0, _mm512_set1_ps(xi[0]), s[i]);
        s[i] = _mm512_fmadd_ps(w1, _mm512_set1_ps(xi[1]), s[i]);
        s[i] = _mm512_fmadd_ps(w2, _mm512_set1_ps(xi[2]), s[i]);
        s[i] = _mm512_fmadd_ps(w3, _mm512_set1_ps(xi[3]), s[i]);
    }
}

QINLINE void tile_rows_f32(const float *x, int64_t ldx, const float *xs, const uint8_t *w, const uint16_t *sc,
                           const uint16_t *mn, int64_t K, int64_t G, int bits, int R, __m512 *facc) {
    const int64_t ng = K / G;
    for (int i = 0; i < R; i++) facc[i] = _mm512_setzero_ps();
    for (int64_t g = 0; g < ng; g++) {
        __m512 s[MR];
        for (int i = 0; i < R; i++) s[i] = _mm512_setzero_ps();
        if (bits == 8) {
            for (int64_t c = g * G / 4; c < (g + 1) * G / 4; c++)
                fma4(_mm512_loadu_si512((const void *)(w + c * 64)), x, ldx, 4 * c, R, s);
        } else {
            const __m512i low = _mm512_set1_epi8(0x0f);
            for (int64_t c = g * G / 8; c < (g + 1) * G / 8; c++) {
                const __m512i v = _mm512_loadu_si512((const void *)(w + c * 64));
                fma4(_mm512_and_si512(v, low), x, ldx, 8 * c, R, s);
                fma4(_mm512_and_si512(_mm512_srli_epi16(v, 4), low), x, ldx, 8 * c + 4, R, s);
            }
        }
        group_epilogue(sc, mn, g, xs, ng, R, s, facc);
    }
}

static void tile_f32(const float *x, int64_t ldx, const float *xs, const uint8_t *w, const uint16_t *sc,
                     const uint16_t *mn, int64_t M, int64_t K, int64_t G, int bits, const float *bias, float *y,
                     int64_t ldy, int64_t n0, int64_t N) {
    const int64_t ng = K / G;
    const __mmask16 mask = tile_mask(n0, N);
    for (int64_t m0 = 0; m0 < M; m0 += 4) {
        const int64_t R = M - m0 < 4 ? M - m0 : 4;
        __m512 facc[MR];
        const float *xm = x + m0 * ldx, *xsm = xs + m0 * ng;
        switch (R) {
            case 4: tile_rows_f32(xm, ldx, xsm, w, sc, mn, K, G, bits, 4, facc); break;
            case 3: tile_rows_f32(xm, ldx, xsm, w, sc, mn, K, G, bits, 3, facc); break;
            case 2: tile_rows_f32(xm, ldx, xsm, w, sc, mn, K, G, bits, 2, facc); break;
            default: tile_rows_f32(xm, ldx, xsm, w, sc, mn, K, G, bits, 1, facc); break;
        }
        store_rows(y, ldy, m0, R, n0, mask, bias, facc);
    }
}
#endif

/* A portable tile's rows into y (+ bias), rows past N not stored; frees `out`. */
static void store_portable(float (*out)[TILE], const float *bias, float *y, int64_t ldy, int64_t M, int64_t n0,
                           int64_t N) {
    for (int64_t m = 0; m < M; m++)
        for (int64_t r = 0; r < TILE && n0 + r < N; r++) y[m * ldy + n0 + r] = out[m][r] + (bias ? bias[n0 + r] : 0.0f);
    free(out);
}

/* The activations a tile loop reads: integer (act_bits 8 or 16: q, its low plane, dx) or fp32 (act_bits 32: x);
 * sums: per row and group, the offset term's activation sum (sum of dx * sum(q), or sum(x)). */
typedef struct {
    int act_bits;
    const int8_t *q;
    int64_t plane;
    const float *dx, *x, *sums;
    int64_t ldx;
} acts_t;

/* y = x W^T + bias over every tile (OpenMP over tiles): the VNNI path where it exists, else the portable loop. */
static int run_tiles(const acts_t *a, const uint8_t *w, const uint16_t *scales, const uint16_t *mins,
                     const float *bias, float *y, int64_t ldy, int64_t M, int64_t N, int64_t K, int64_t G, int bits,
                     int force_portable) {
    const int64_t ng = K / G, tiles = (N + TILE - 1) / TILE, tile_bytes = TILE * K * bits / 8;
    int vector = 0;
#ifdef QMATMUL_VNNI
    vector = !force_portable;
#endif
    int failed = 0;
#pragma omp parallel for schedule(static) reduction(| : failed)
    for (int64_t t = 0; t < tiles; t++) {
        const uint8_t *wt = w + t * tile_bytes;
        const uint16_t *st = scales + t * ng * TILE, *mt = mins + t * ng * TILE;
        const int64_t n0 = t * TILE;
#ifdef QMATMUL_VNNI
        if (vector) {
            if (a->act_bits == 8) tile_vnni(a->q, a->dx, a->sums, wt, st, mt, M, K, G, bits, bias, y, ldy, n0, N);
            else if (a->act_bits == 16)
                tile_vnni16(a->q, a->plane, a->dx, a->sums, wt, st, mt, M, K, G, bits, bias, y, ldy, n0, N);
            else tile_f32(a->x, a->ldx, a->sums, wt, st, mt, M, K, G, bits, bias, y, ldy, n0, N);
            continue;
        }
#endif
        float (*out)[TILE] = malloc(sizeof(float) * TILE * (size_t)M);
        if (!out) {
            failed = 1;
            continue;
        }
        if (a->act_bits == 32) tile_portable_f32(a->x, a->ldx, a->sums, wt, st, mt, M, K, G, bits, out);
        else tile_portable(a->q, a->plane, a->act_bits, a->dx, a->sums, wt, st, mt, M, K, G, bits, out);
        store_portable(out, bias, y, ldy, M, n0, N);
    }
    (void)vector;
    return failed ? -1 : 0;
}

/* As tierlm_qmatmul with fp32 activations (exact up to summation order). */
int tierlm_qmatmul_f32(const float *x, int64_t ldx, const uint8_t *w, const uint16_t *scales, const uint16_t *mins,
                       const float *bias, float *y, int64_t ldy, int64_t M, int64_t N, int64_t K, int64_t G, int bits,
                       int force_portable) {
    if (M <= 0 || N <= 0 || K <= 0 || G <= 0 || G % QBLOCK || K % G || (bits != 4 && bits != 8)) return -1;
    const int64_t ng = K / G;
    float *xs = malloc(sizeof(float) * (size_t)(M * ng));
    if (!xs) return -1;
    for (int64_t m = 0; m < M; m++)
        for (int64_t g = 0; g < ng; g++) {
            float s = 0.0f;
            for (int64_t k = g * G; k < (g + 1) * G; k++) s += x[m * ldx + k];
            xs[m * ng + g] = s;
        }
    const acts_t a = {.act_bits = 32, .x = x, .ldx = ldx, .sums = xs};
    const int rc = run_tiles(&a, w, scales, mins, bias, y, ldy, M, N, K, G, bits, force_portable);
    free(xs);
    return rc;
}

/* The transposed fp32 weight out [K, N] (row-major, so x @ out = x W^T) = d * u + m, rounded twice (mul, then
 * add) as the PyTorch definition and gguf-py compute it: for a GEMM library when many rows share the weight
 * (prefill). One tile's 16 rows are 16 adjacent columns, so each input k is one 16-float store. */
#ifdef QMATMUL_VNNI
QINLINE void dequant_store(__m512i codes, __m512 d, __m512 m, float *dst, __mmask16 mask) {
    _mm512_mask_storeu_ps(dst, mask, _mm512_add_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(codes), d), m));
}
#endif

int tierlm_qdequant_t(const uint8_t *w, const uint16_t *scales, const uint16_t *mins, float *out, int64_t N,
                      int64_t K, int64_t G, int bits, int force_portable) {
    if (N <= 0 || K <= 0 || G <= 0 || G % QBLOCK || K % G || (bits != 4 && bits != 8)) return -1;
    const int64_t ng = K / G, nb = K / QBLOCK, tiles = (N + TILE - 1) / TILE, tile_bytes = TILE * K * bits / 8;
    (void)force_portable;
    /* Threads split the inputs (32 at a time) and walk every tile, so each writes whole rows of W^T, one band of
     * memory after another (by tiles, each store would land N * 4 bytes from the last: a page apart). */
#pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < nb; b++) {
        const int64_t g = b * QBLOCK / G;
        for (int64_t t = 0; t < tiles; t++) {
            const uint8_t *wt = w + t * tile_bytes;
            const uint16_t *st = scales + t * ng * TILE, *mt = mins + t * ng * TILE;
            const int64_t n0 = t * TILE, rows = N - n0 < TILE ? N - n0 : TILE;
#ifdef QMATMUL_VNNI
            if (!force_portable) {
                const __mmask16 mask = rows == TILE ? (__mmask16)0xffff : (__mmask16)((1u << rows) - 1);
                const __m512i byte = _mm512_set1_epi32(0xff), low = _mm512_set1_epi8(0x0f);
                const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(st + g * TILE)));
                const __m512 m = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(mt + g * TILE)));
                const int64_t per = bits == 8 ? 4 : 8;  /* inputs per 64-byte code vector */
                for (int64_t c = b * QBLOCK / per; c < (b + 1) * QBLOCK / per; c++) {
                    const __m512i v = _mm512_loadu_si512((const void *)(wt + c * 64));
                    for (int half = 0; half < (bits == 8 ? 1 : 2); half++) {
                        const __m512i u = bits == 8 ? v : (half ? _mm512_and_si512(_mm512_srli_epi16(v, 4), low)
                                                                : _mm512_and_si512(v, low));
                        float *dst = out + (c * per + 4 * half) * N + n0;
                        dequant_store(_mm512_and_si512(u, byte), d, m, dst, mask);
                        dequant_store(_mm512_and_si512(_mm512_srli_epi32(u, 8), byte), d, m, dst + N, mask);
                        dequant_store(_mm512_and_si512(_mm512_srli_epi32(u, 16), byte), d, m, dst + 2 * N, mask);
                        dequant_store(_mm512_srli_epi32(u, 24), d, m, dst + 3 * N, mask);
                    }
                }
                continue;
            }
#endif
            for (int r = 0; r < rows; r++) {
                const float d = half_to_float_q(st[g * TILE + r]), m = half_to_float_q(mt[g * TILE + r]);
                for (int64_t k = b * QBLOCK; k < (b + 1) * QBLOCK; k++)
                    out[k * N + n0 + r] = d * (float)code_at(wt, k, r, bits) + m;
            }
        }
    }
    return 0;
}

int tierlm_qmatmul_vector(void) {
#ifdef QMATMUL_VNNI
    return 1;
#else
    return 0;
#endif
}

/* y [M, N] (row stride ldy) = x [M, K] (row stride ldx) W^T + bias. bits 4 or 8; G a multiple of 32 dividing
 * K; w / scales / mins in the layout above with ceil(N / 16) tiles; act_bits 8 or 16: the activations' integer
 * width. force_portable: the portable loop even where the vector path exists (for the tests). Returns 0, or -1
 * on bad arguments / no memory. */
int tierlm_qmatmul(const float *x, int64_t ldx, const uint8_t *w, const uint16_t *scales, const uint16_t *mins,
                   const float *bias, float *y, int64_t ldy, int64_t M, int64_t N, int64_t K, int64_t G, int bits,
                   int act_bits, int force_portable) {
    if (M <= 0 || N <= 0 || K <= 0 || G <= 0 || G % QBLOCK || K % G || (bits != 4 && bits != 8)
        || (act_bits != 8 && act_bits != 16)) return -1;
    const int64_t nb = K / QBLOCK, ng = K / G;
    int8_t *q = malloc((size_t)(M * K * (act_bits / 8)));
    float *dx = malloc(sizeof(float) * (size_t)(M * nb)), *gs = malloc(sizeof(float) * (size_t)(M * ng));
    int rc = -1;
    if (q && dx && gs) {
        quantize_rows(x, ldx, M, K, G, act_bits, q, dx, gs);
        const acts_t a = {.act_bits = act_bits, .q = q, .plane = M * K, .dx = dx, .sums = gs};
        rc = run_tiles(&a, w, scales, mins, bias, y, ldy, M, N, K, G, bits, force_portable);
    }
    free(q); free(dx); free(gs);
    return rc;
}

/* ---- FP8 (e4m3) weights ---------------------------------------------------------------------------------
 * Layout: codes [tile][K][16] (one byte per weight; for each input, the tile's 16 rows side by side), scales fp32
 * [tile][ceil(K / 128)][16] (each row's scale for each block of 128 inputs; the last block may be shorter).
 * value = e4m3(u) * s. An e4m3 byte s eeee mmm moved into fp16 bits s 0eeee mmm0000000 is the same number times
 * 2^-8 exactly, subnormals included (both put their subnormal step at the bottom exponent), so the vector path
 * widens 16 codes with one vcvtph2ps and the 2^8 goes into the block scale. (e4m3fn's NaN, 0x7f, reads as 480:
 * quantizers clamp to +-448 and never produce it.) Activations are fp32: per row and block
 *   y[n] += (s[n, b] * 256) * sum_k half(u[n, k]) x[k]
 * the dequantized weight's product up to summation order; the portable loop does the same operations in the same
 * order, so the two agree bit for bit. */
#define FP8_BLOCK 128

static inline uint16_t e4m3_as_half(uint8_t b) { return (uint16_t)(((b & 0x80u) << 8) | ((b & 0x7fu) << 7)); }

static inline float e4m3_scaled(uint8_t b) { return half_to_float_q(e4m3_as_half(b)); }  /* e4m3(b) * 2^-8 */

static void fp8_tile_portable(const float *x, int64_t ldx, const uint8_t *w, const float *sc, int64_t M, int64_t K,
                              float out[][TILE]) {
    const int64_t nkb = (K + FP8_BLOCK - 1) / FP8_BLOCK;
    for (int64_t m = 0; m < M; m++)
        for (int r = 0; r < TILE; r++) {
            float acc = 0.0f;
            for (int64_t b = 0; b < nkb; b++) {
                const int64_t k1 = (b + 1) * FP8_BLOCK < K ? (b + 1) * FP8_BLOCK : K;
                float c[4] = {0.0f, 0.0f, 0.0f, 0.0f};  /* four chains, input k into chain k % 4 */
                for (int64_t k = b * FP8_BLOCK; k < k1; k++)
                    c[k % 4] = fmaf(e4m3_scaled(w[k * TILE + r]), x[m * ldx + k], c[k % 4]);
                acc = fmaf((c[0] + c[1]) + (c[2] + c[3]), sc[b * TILE + r] * 256.0f, acc);
            }
            out[m][r] = acc;
        }
}

#ifdef QMATMUL_VNNI
/* Inputs k and k + 1 of a tile (32 codes) -> two vectors of 16 rows, each value times 2^-8. */
QINLINE void e4m3_pair(const uint8_t *p, __m512 *w0, __m512 *w1) {
    /* u << 7 puts eeeemmm at bits 13..7 and the sign at bit 14; adding the sign bit to itself moves it to bit 15 */
    const __m512i v = _mm512_slli_epi16(_mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)p)), 7);
    const __m512i h = _mm512_add_epi16(v, _mm512_and_si512(v, _mm512_set1_epi16(0x4000)));
    *w0 = _mm512_cvtph_ps(_mm512_castsi512_si256(h));
    *w1 = _mm512_cvtph_ps(_mm512_extracti64x4_epi64(h, 1));
}

/* Rows m0 .. m0+R-1 of one tile. Each row keeps four independent FMA chains (input k into chain k % 4), so the
 * loop is not bound by the FMA latency at batch 1; the chains are summed pairwise at the end of each block. */
QINLINE void fp8_rows(const float *x, int64_t ldx, const uint8_t *w, const float *sc, int64_t K, int R, __m512 *facc) {
    const int64_t nkb = (K + FP8_BLOCK - 1) / FP8_BLOCK;
    for (int i = 0; i < R; i++) facc[i] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nkb; b++) {
        const int64_t k1 = (b + 1) * FP8_BLOCK < K ? (b + 1) * FP8_BLOCK : K;
        __m512 c[4][4];
        for (int i = 0; i < R; i++)
            for (int j = 0; j < 4; j++) c[i][j] = _mm512_setzero_ps();
        for (int64_t k = b * FP8_BLOCK; k < k1; k += 4) {
            __m512 w0, w1, w2, w3;
            e4m3_pair(w + k * TILE, &w0, &w1);
            e4m3_pair(w + (k + 2) * TILE, &w2, &w3);
            for (int i = 0; i < R; i++) {
                const float *xi = x + i * ldx + k;
                c[i][0] = _mm512_fmadd_ps(w0, _mm512_set1_ps(xi[0]), c[i][0]);
                c[i][1] = _mm512_fmadd_ps(w1, _mm512_set1_ps(xi[1]), c[i][1]);
                c[i][2] = _mm512_fmadd_ps(w2, _mm512_set1_ps(xi[2]), c[i][2]);
                c[i][3] = _mm512_fmadd_ps(w3, _mm512_set1_ps(xi[3]), c[i][3]);
            }
        }
        const __m512 d = _mm512_mul_ps(_mm512_loadu_ps(sc + b * TILE), _mm512_set1_ps(256.0f));
        for (int i = 0; i < R; i++) {
            const __m512 s = _mm512_add_ps(_mm512_add_ps(c[i][0], c[i][1]), _mm512_add_ps(c[i][2], c[i][3]));
            facc[i] = _mm512_fmadd_ps(s, d, facc[i]);
        }
    }
}

static void fp8_tile(const float *x, int64_t ldx, const uint8_t *w, const float *sc, int64_t M, int64_t K,
                     const float *bias, float *y, int64_t ldy, int64_t n0, int64_t N) {
    const __mmask16 mask = tile_mask(n0, N);
    for (int64_t m0 = 0; m0 < M; m0 += 4) {
        const int64_t R = M - m0 < 4 ? M - m0 : 4;
        __m512 facc[4];
        const float *xm = x + m0 * ldx;
        switch (R) {
            case 4: fp8_rows(xm, ldx, w, sc, K, 4, facc); break;
            case 3: fp8_rows(xm, ldx, w, sc, K, 3, facc); break;
            case 2: fp8_rows(xm, ldx, w, sc, K, 2, facc); break;
            default: fp8_rows(xm, ldx, w, sc, K, 1, facc); break;
        }
        store_rows(y, ldy, m0, R, n0, mask, bias, facc);
    }
}
#endif

/* y [M, N] = x [M, K] W^T + bias with W in the FP8 layout above (K a multiple of 32). Returns 0, or -1 on bad
 * arguments / no memory. */
int tierlm_fp8_matmul(const float *x, int64_t ldx, const uint8_t *w, const float *scales, const float *bias, float *y,
                      int64_t ldy, int64_t M, int64_t N, int64_t K, int force_portable) {
    if (M <= 0 || N <= 0 || K <= 0 || K % QBLOCK) return -1;
    const int64_t tiles = (N + TILE - 1) / TILE, nkb = (K + FP8_BLOCK - 1) / FP8_BLOCK;
    int failed = 0;
    (void)force_portable;
#pragma omp parallel for schedule(static) reduction(| : failed)
    for (int64_t t = 0; t < tiles; t++) {
        const uint8_t *wt = w + t * TILE * K;
        const float *st = scales + t * nkb * TILE;
        const int64_t n0 = t * TILE;
#ifdef QMATMUL_VNNI
        if (!force_portable) {
            fp8_tile(x, ldx, wt, st, M, K, bias, y, ldy, n0, N);
            continue;
        }
#endif
        float (*out)[TILE] = malloc(sizeof(float) * TILE * (size_t)M);
        if (!out) {
            failed = 1;
            continue;
        }
        fp8_tile_portable(x, ldx, wt, st, M, K, out);
        store_portable(out, bias, y, ldy, M, n0, N);
    }
    return failed ? -1 : 0;
}

/* The transposed fp32 weight out [K, N] = e4m3(u) * s (one rounding: (e4m3 * 2^-8) * (s * 2^8) is the same
 * product), as quant.weights.dequantize computes it; for prefill's GEMM. */
int tierlm_fp8_dequant_t(const uint8_t *w, const float *scales, float *out, int64_t N, int64_t K, int force_portable) {
    if (N <= 0 || K <= 0 || K % QBLOCK) return -1;
    const int64_t tiles = (N + TILE - 1) / TILE, nkb = (K + FP8_BLOCK - 1) / FP8_BLOCK;
    (void)force_portable;
#pragma omp parallel for schedule(static)
    for (int64_t kc = 0; kc < K / QBLOCK; kc++) {  /* by 32 inputs, every tile: whole rows of W^T per thread */
        const int64_t b = kc * QBLOCK / FP8_BLOCK;
        for (int64_t t = 0; t < tiles; t++) {
            const uint8_t *wt = w + t * TILE * K;
            const float *st = scales + t * nkb * TILE;
            const int64_t n0 = t * TILE, rows = N - n0 < TILE ? N - n0 : TILE;
#ifdef QMATMUL_VNNI
            if (!force_portable) {
                const __mmask16 mask = tile_mask(n0, N);
                const __m512 d = _mm512_mul_ps(_mm512_loadu_ps(st + b * TILE), _mm512_set1_ps(256.0f));
                for (int64_t k = kc * QBLOCK; k < (kc + 1) * QBLOCK; k += 2) {
                    __m512 w0, w1;
                    e4m3_pair(wt + k * TILE, &w0, &w1);
                    _mm512_mask_storeu_ps(out + k * N + n0, mask, _mm512_mul_ps(w0, d));
                    _mm512_mask_storeu_ps(out + (k + 1) * N + n0, mask, _mm512_mul_ps(w1, d));
                }
                continue;
            }
#endif
            for (int r = 0; r < rows; r++)
                for (int64_t k = kc * QBLOCK; k < (kc + 1) * QBLOCK; k++)
                    out[k * N + n0 + r] = e4m3_scaled(wt[k * TILE + r]) * (st[b * TILE + r] * 256.0f);
        }
    }
    return 0;
}

/* Rows rows[0..R) of the fp32 weight, out [R, K] (an embedding lookup), as tierlm_fp8_dequant_t. */
int tierlm_fp8_dequant_rows(const uint8_t *w, const float *scales, const int64_t *rows, int64_t R, float *out,
                            int64_t N, int64_t K) {
    if (N <= 0 || K <= 0 || K % QBLOCK) return -1;
    const int64_t nkb = (K + FP8_BLOCK - 1) / FP8_BLOCK;
    for (int64_t i = 0; i < R; i++)
        if (rows[i] < 0 || rows[i] >= N) return -1;
    for (int64_t i = 0; i < R; i++) {
        const int64_t t = rows[i] / TILE;
        const int r = (int)(rows[i] % TILE);
        const uint8_t *wt = w + t * TILE * K;
        const float *st = scales + t * nkb * TILE;
        for (int64_t k = 0; k < K; k++)
            out[i * K + k] = e4m3_scaled(wt[k * TILE + r]) * (st[(k / FP8_BLOCK) * TILE + r] * 256.0f);
    }
    return 0;
}

/* One quantized linear's fixed arguments, built once by the caller (kernels/quant.py QLinearPlan), so a decode
 * step's call crosses the language boundary with four arguments instead of fifteen. act_bits 8, 16, or 32
 * (fp32 activations); fp8: the FP8 layout (scales are fp32, mins unused, fp32 activations). */
typedef struct {
    const uint8_t *w;
    const uint16_t *scales, *mins;
    const float *bias;
    int64_t n, k, group;
    int32_t bits, act_bits, fp8;
} tierlm_qlinear;

int tierlm_qlinear_run(const tierlm_qlinear *L, const float *x, float *y, int64_t M) {
    if (L->fp8)
        return tierlm_fp8_matmul(x, L->k, L->w, (const float *)L->scales, L->bias, y, L->n, M, L->n, L->k, 0);
    if (L->act_bits == 32)
        return tierlm_qmatmul_f32(x, L->k, L->w, L->scales, L->mins, L->bias, y, L->n, M, L->n, L->k, L->group, L->bits, 0);
    return tierlm_qmatmul(x, L->k, L->w, L->scales, L->mins, L->bias, y, L->n, M, L->n, L->k, L->group, L->bits,
                          L->act_bits, 0);
}

/* Rows rows[0..R) of the fp32 weight (an embedding lookup), out [R, K] = d * u + m (rounded twice, as
 * tierlm_qdequant_t). Returns 0, or -1 on bad arguments (a row id outside [0, N)). */
int tierlm_qdequant_rows(const uint8_t *w, const uint16_t *scales, const uint16_t *mins, const int64_t *rows,
                         int64_t R, float *out, int64_t N, int64_t K, int64_t G, int bits) {
    if (N <= 0 || K <= 0 || G <= 0 || G % QBLOCK || K % G || (bits != 4 && bits != 8)) return -1;
    const int64_t ng = K / G, tile_bytes = TILE * K * bits / 8;
    for (int64_t i = 0; i < R; i++)
        if (rows[i] < 0 || rows[i] >= N) return -1;
    for (int64_t i = 0; i < R; i++) {
        const int64_t t = rows[i] / TILE;
        const int r = (int)(rows[i] % TILE);
        const uint8_t *wt = w + t * tile_bytes;
        const uint16_t *st = scales + t * ng * TILE, *mt = mins + t * ng * TILE;
        for (int64_t g = 0; g < ng; g++) {
            const float d = half_to_float_q(st[g * TILE + r]), m = half_to_float_q(mt[g * TILE + r]);
            for (int64_t k = g * G; k < (g + 1) * G; k++) out[i * K + k] = d * (float)code_at(wt, k, r, bits) + m;
        }
    }
    return 0;
}

#pragma omp declare simd notinbranch
float expf(float);

/* A gated MLP on quantized weights in one call: y = down(silu(g) * u) with [g | u] = gate_up(x), for the decode
 * path (one language crossing and no intermediate tensors instead of two linears and three elementwise ops).
 * gate_up: n = 2 I outputs (gate first); down: k = I. Returns 0, or -1 on bad arguments / no memory. */
int tierlm_qmlp_run(const tierlm_qlinear *gate_up, const tierlm_qlinear *down, const float *x, float *y, int64_t M) {
    const int64_t inter = down->k;
    if (gate_up->n != 2 * inter) return -1;
    float *h = malloc(sizeof(float) * (size_t)(M * 2 * inter)), *a = malloc(sizeof(float) * (size_t)(M * inter));
    int rc = (h && a) ? tierlm_qlinear_run(gate_up, x, h, M) : -1;
    if (rc == 0) {
        for (int64_t m = 0; m < M; m++) {
            const float *g = h + m * 2 * inter, *u = g + inter;
            float *am = a + m * inter;
#pragma omp simd
            for (int64_t i = 0; i < inter; i++) am[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
        }
        rc = tierlm_qlinear_run(down, a, y, M);
    }
    free(h);
    free(a);
    return rc;
}

/* ---- a decode step's decoder layers in one call ------------------------------------------------------------
 * For a Llama-family model on quantized weights with fp32 KV, every row a decode (one new token per sequence):
 * per layer, the same operations as the Python path (models/llama.py) in the same order, so the result is the
 * same bit for bit: residual add + RMSNorm (cpu.c), the fused q/k/v linear, RoPE on q and k (x * cos + swap(x)
 * * sin, with RotaryEmbedding's tables: separate multiplies and add, as torch computes it; -std=c11 keeps the
 * compiler from contracting them), the new K/V written at their cache slots, paged decode attention (cpu.c),
 * o_proj, residual add + RMSNorm, and the gated MLP. What it saves is the dispatch between them: about a dozen
 * Python and torch calls per layer. */
int tierlm_paged_decode_fits(int64_t hq, int64_t d, int64_t bs);
int tierlm_paged_decode_f32(const float *q, const float *kv_cache, const int64_t *block_tables,
                            const int64_t *seq_lens, float *out, int64_t nd, int64_t hq, int64_t hkv, int64_t d,
                            int64_t num_blocks, int64_t bs, int64_t max_blocks, float scale,
                            const float *spill, int64_t num_spill);
void tierlm_add_rms_norm_f32(const float *x, const float *res, const float *w, float *out, float *res_out,
                             int64_t rows, int64_t dim, float eps);

typedef struct {
    const tierlm_qlinear *qkv, *o, *gate_up, *down;
    const float *ln_in, *ln_post;  /* input_layernorm, post_attention_layernorm weights */
    float *kv;  /* this layer's cache [2, num_blocks, bs, hkv, d] */
} tierlm_layer_args;

typedef struct {
    int64_t layers, hidden, hq, hkv, d, num_blocks, bs;
    float eps, scale;
} tierlm_stack_dims;

/* x [M, hidden]: the embeddings in, the last layer's MLP output out; residual [M, hidden]: the residual stream
 * before that output is added (the caller's final norm adds it). cos, sin [M, d]: the rows' RoPE tables; slots
 * [M]: each new token's cache slot; tables [M, max_blocks], lens [M]: the sequences' blocks and lengths with the
 * new token. Returns 0, 1 when the attention kernel does not take the shape (nothing is touched: use the Python
 * path), or -1 on no memory / bad arguments. */
int tierlm_decode_layers(const tierlm_stack_dims *S, const tierlm_layer_args *L, float *x, float *residual,
                         const float *cos, const float *sin, const int64_t *slots, const int64_t *tables,
                         int64_t max_blocks, const int64_t *lens, int64_t M) {
    const int64_t H = S->hidden, hq = S->hq, hkv = S->hkv, d = S->d, half = d / 2, width = (hq + 2 * hkv) * d;
    if (M <= 0 || d % 2 || !tierlm_paged_decode_fits(hq, d, S->bs)) return 1;
    float *h = malloc(sizeof(float) * (size_t)(M * H)), *qkv = malloc(sizeof(float) * (size_t)(M * width));
    float *q = malloc(sizeof(float) * (size_t)(M * hq * d)), *att = malloc(sizeof(float) * (size_t)(M * hq * d));
    float *rot = malloc(sizeof(float) * (size_t)d);
    int rc = (h && qkv && q && att && rot) ? 0 : -1;
    const int64_t plane = S->num_blocks * S->bs * hkv * d;  /* K rows, then V rows */
    for (int64_t l = 0; l < S->layers && rc == 0; l++) {
        const tierlm_layer_args *a = L + l;
        if (l == 0) {
            memcpy(residual, x, sizeof(float) * (size_t)(M * H));
            tierlm_add_rms_norm_f32(x, NULL, a->ln_in, h, NULL, M, H, S->eps);
        } else {
            tierlm_add_rms_norm_f32(x, residual, a->ln_in, h, residual, M, H, S->eps);
        }
        if ((rc = tierlm_qlinear_run(a->qkv, h, qkv, M)) != 0) break;
        for (int64_t m = 0; m < M; m++) {
            float *row = qkv + m * width;
            const float *c = cos + m * d, *s = sin + m * d;
            for (int64_t head = 0; head < hq + hkv; head++) {  /* q heads, then k heads */
                float *v = row + head * d;
                for (int64_t j = 0; j < d; j++) {
                    const float swapped = j < half ? v[j + half] : v[j - half];
                    rot[j] = v[j] * c[j] + swapped * s[j];
                }
                memcpy(head < hq ? q + (m * hq + head) * d : v, rot, sizeof(float) * (size_t)d);
            }
            memcpy(a->kv + slots[m] * hkv * d, row + hq * d, sizeof(float) * (size_t)(hkv * d));
            memcpy(a->kv + plane + slots[m] * hkv * d, row + (hq + hkv) * d, sizeof(float) * (size_t)(hkv * d));
        }
        if (tierlm_paged_decode_f32(q, a->kv, tables, lens, att, M, hq, hkv, d, S->num_blocks, S->bs, max_blocks,
                                    S->scale, NULL, 0) != 0) { rc = -1; break; }
        if ((rc = tierlm_qlinear_run(a->o, att, x, M)) != 0) break;
        tierlm_add_rms_norm_f32(x, residual, a->ln_post, h, residual, M, H, S->eps);
        if ((rc = tierlm_qmlp_run(a->gate_up, a->down, h, x, M)) != 0) break;
    }
    free(h); free(qkv); free(q); free(att); free(rot);
    return rc;
}
