/* tierlm's native CPU kernels, built at first use by tierlm/kernels/cpu.py and loaded with ctypes.
 *
 * 1. Paged decode attention (fp32 KV): each decode query reads its sequence's K/V blocks in place.
 *
 * The PyTorch path gathers every sequence's blocks into a dense [Nd, L, Hkv, D] copy and then calls
 * SDPA; for one query token per sequence that copy and SDPA's setup cost more than the arithmetic.
 * Here one work item is one sequence: it walks the block table, reading each token's K row (all KV
 * heads, contiguous) once, scores every query head against it, then folds the block into a running
 * (max, sum, accumulator) softmax per head, flash-decoding style, so scratch is bounded by one block.
 * (Software prefetch of the next block measured slower than the hardware prefetcher alone here.)
 *
 * Layout (one layer): kv_cache [2, num_blocks, block_size, Hkv, D] contiguous (K at 0, V at 1);
 * q and out [Nd, Hq, D] contiguous with Hq = Hkv * G (query head h uses KV head h / G);
 * block_tables [Nd, max_blocks] int64; seq_lens [Nd] int64 (context length including the new token).
 *
 * 2. Paged decode attention over an FP8 KV cache (tierlm_paged_decode_fp8), reading the FP8 bytes in
 * place: the same walk and the same fp32 math as 1., but each token's K (then V) row of Hkv * D bytes
 * is first widened into a small fp32 row buffer, dequantization scales applied, and every query head of
 * the KV head is scored against (accumulates) that buffer. A step reads a quarter of the fp32 bytes
 * (plus the scales). data: [2, num_blocks, block_size, Hkv, D] bytes, e4m3 (float8_e4m3fn) or e5m2
 * (float8_e5m2); value = fp8(byte) * scale, one scale per (K/V, block, token, KV head, group of D /
 * groups consecutive values), at scales + kv*s_kv + block*s_blk + tok*s_tok + head*s_head + group
 * (elements): per-token scales are [2, num_blocks, block_size, Hkv, groups]; static (calibrated) ones
 * [2, Hkv] with s_blk = s_tok = 0. Scales are fp32 or UE8M0 (one byte e: 2^(e - 127)).
 * Widening: e5m2 is the high byte of an IEEE fp16; e4m3 maps onto fp16 bits ((b & 0x80) << 8) |
 * ((b & 0x7f) << 7), which is the value times 2^-8 (subnormals included; the 2^8 is folded into the
 * scale); fp16 -> fp32 with _mm512_cvtph_ps (AVX-512F, 16 at a time), _mm256_cvtph_ps (F16C, 8 at a
 * time), else a 256-entry table per format built when the library is loaded.
 *
 * 3. Fused residual add + RMSNorm (one pass instead of torch's add, pow, mean, rsqrt, mul, mul).
 *
 * Built at first use by tierlm.kernels.cpu with the system C compiler (-O3 -march=native
 * -fopenmp) and loaded with ctypes; OpenMP resolves to the runtime torch already loaded, so the kernel
 * shares torch's thread pool and thread count.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512F__) || (defined(__F16C__) && defined(__AVX2__))
#include <immintrin.h>
#endif

#define MAX_STACK_FLOATS 16384

/* glibc's libmvec has vector variants of expf (_ZGV*_expf); declaring them lets `omp simd` loops use them. */
#pragma omp declare simd notinbranch
float expf(float);

/* The running-softmax steps one_sequence and one_sequence_fp8 share. Scratch per sequence: s [hq, bs] scores
 * of the current block, m [hq] running max, l [hq] running sum, acc [hq, d] running numerator. Always inlined,
 * so a caller with a constant head dim gets fully unrolled loops. */
#define ALWAYS_INLINE static inline __attribute__((always_inline))

ALWAYS_INLINE void softmax_init(float *m, float *l, float *acc, int64_t hq, int64_t d) {
    for (int64_t j = 0; j < hq; j++) {
        m[j] = -INFINITY;
        l[j] = 0.0f;
    }
    for (int64_t x = 0; x < hq * d; x++) acc[x] = 0.0f;
}

/* s[h, t] = scale * q_h . k_row[h / g] for every query head: token t's scores. */
ALWAYS_INLINE void score_token(const float *q, const float *krow, float *s, int64_t t, int64_t hq, int64_t g,
                               int64_t d, int64_t bs, float scale) {
    for (int64_t h = 0; h < hq; h++) {
        const float *qh = q + h * d;
        const float *kh = krow + (h / g) * d;
        float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
        for (int64_t x = 0; x < d; x++) dot += qh[x] * kh[x];
        s[h * bs + t] = dot * scale;
    }
}

/* The block's scores (row stride bs, n_tok of them) become weights under the new running max; l and acc are
 * rescaled to it. */
ALWAYS_INLINE void softmax_block(float *s, float *m, float *l, float *acc, int64_t hq, int64_t d, int64_t bs,
                                 int64_t n_tok) {
    for (int64_t h = 0; h < hq; h++) {
        float *sh = s + h * bs;
        float bmax = -INFINITY;
        for (int64_t t = 0; t < n_tok; t++) bmax = sh[t] > bmax ? sh[t] : bmax;
        const float new_m = bmax > m[h] ? bmax : m[h];
        const float corr = expf(m[h] - new_m); /* 0 on the first block (m = -inf) */
        float bsum = 0.0f;
#pragma omp simd reduction(+ : bsum)
        for (int64_t t = 0; t < n_tok; t++) {
            const float p = expf(sh[t] - new_m);
            sh[t] = p;
            bsum += p;
        }
        l[h] = l[h] * corr + bsum;
        m[h] = new_m;
        float *ah = acc + h * d;
#pragma omp simd
        for (int64_t x = 0; x < d; x++) ah[x] *= corr;
    }
}

/* acc[h] += weight[h, t] * v_row[h / g] for every query head. */
ALWAYS_INLINE void accumulate_token(const float *s, const float *vrow, float *acc, int64_t t, int64_t hq,
                                    int64_t g, int64_t d, int64_t bs) {
    for (int64_t h = 0; h < hq; h++) {
        const float p = s[h * bs + t];
        const float *vh = vrow + (h / g) * d;
        float *ah = acc + h * d;
#pragma omp simd
        for (int64_t x = 0; x < d; x++) ah[x] += p * vh[x];
    }
}

ALWAYS_INLINE void softmax_finish(float *out, const float *acc, const float *l, int64_t hq, int64_t d) {
    for (int64_t h = 0; h < hq; h++) {
        const float inv = 1.0f / l[h];
        for (int64_t x = 0; x < d; x++) out[h * d + x] = acc[h * d + x] * inv;
    }
}

/* One sequence, all heads: each K/V row (all KV heads of one token) is read once, in order. Always
 * inlined, so the callers below can hand it a constant head dim and get fully unrolled dot products. */
/* Where a block table's ids point: ids < nb are blocks of the device cache (region 0), the others spill ids,
 * blocks id - nb of the spill store (region 1, kvcache/spill.py), read in place the same way. */
typedef struct {
    const float *k[2], *v[2];
    int64_t nb;
} f32_regions;

static inline __attribute__((always_inline)) void one_sequence(const float *q, const f32_regions *r, const int64_t *table,
                         int64_t len, int64_t bs, int64_t hkv, int64_t d, int64_t g, float scale, float *out,
                         float *scratch) {
    const int64_t hq = hkv * g;
    float *s = scratch;      /* [hq, bs] scores of the current block */
    float *m = s + hq * bs;  /* [hq] running max */
    float *l = m + hq;       /* [hq] running sum */
    float *acc = l + hq;     /* [hq, d] running numerator */
    const int64_t row = hkv * d;   /* floats between consecutive tokens of a block */
    const int64_t block = bs * row;
    softmax_init(m, l, acc, hq, d);
    const int64_t nblocks = (len + bs - 1) / bs;
    for (int64_t b = 0; b < nblocks; b++) {
        const int64_t n_tok = (b == nblocks - 1) ? len - b * bs : bs;
        const int64_t id = table[b], sp = id >= r->nb, local = id - sp * r->nb;
        const float *kb = r->k[sp] + local * block;
        const float *vb = r->v[sp] + local * block;
        for (int64_t t = 0; t < n_tok; t++) score_token(q, kb + t * row, s, t, hq, g, d, bs, scale);
        softmax_block(s, m, l, acc, hq, d, bs, n_tok);
        for (int64_t t = 0; t < n_tok; t++) accumulate_token(s, vb + t * row, acc, t, hq, g, d, bs);
    }
    softmax_finish(out, acc, l, hq, d);
}

/* Returns 0 on success, 1 if the per-sequence scratch would not fit (the caller falls back). */
/* Whether tierlm_paged_decode_f32 takes this shape (its per-sequence scratch lives on the stack). */
int tierlm_paged_decode_fits(int64_t hq, int64_t d, int64_t bs) { return hq * bs + 2 * hq + hq * d <= MAX_STACK_FLOATS; }

int tierlm_paged_decode_f32(const float *q, const float *kv_cache, const int64_t *block_tables,
                            const int64_t *seq_lens, float *out, int64_t nd, int64_t hq, int64_t hkv, int64_t d,
                            int64_t num_blocks, int64_t bs, int64_t max_blocks, float scale,
                            const float *spill, int64_t num_spill) {
    const int64_t g = hq / hkv;
    const int64_t need = hq * bs + 2 * hq + hq * d;
    if (need > MAX_STACK_FLOATS) return 1;
    const int64_t block = bs * hkv * d;
    if (!spill) spill = kv_cache, num_spill = num_blocks;  /* no spill ids: region 1 is never chosen */
    const f32_regions reg = {{kv_cache, spill}, {kv_cache + num_blocks * block, spill + num_spill * block}, num_blocks};
    const f32_regions *r = &reg;
#pragma omp parallel for schedule(dynamic, 1)
    for (int64_t n = 0; n < nd; n++) {
        float scratch[MAX_STACK_FLOATS];
        const float *qn = q + n * hq * d;
        const int64_t *tn = block_tables + n * max_blocks;
        float *on = out + n * hq * d;
        if (d == 64)
            one_sequence(qn, r, tn, seq_lens[n], bs, hkv, 64, g, scale, on, scratch);
        else if (d == 128)
            one_sequence(qn, r, tn, seq_lens[n], bs, hkv, 128, g, scale, on, scratch);
        else
            one_sequence(qn, r, tn, seq_lens[n], bs, hkv, d, g, scale, on, scratch);
    }
    return 0;
}

/* ---- FP8 KV cache ------------------------------------------------------------------------------------
 * NaN encodings are not handled: the quantizer clamps to the format's max, so they never occur. e4m3's
 * NaNs (0x7f, 0xff) widen to +-480 here (torch: NaN); e5m2's inf/NaN widen to inf/NaN, as in torch. */
enum { FP8_E4M3 = 0, FP8_E5M2 = 1 };
enum { SCALE_F32 = 0, SCALE_UE8M0 = 1 };

/* The fp16 bit pattern a byte maps to: e5m2 exactly; e4m3 as its value times 2^-8. */
static inline uint16_t fp8_half_bits(uint8_t b, int kind) {
    return kind == FP8_E5M2 ? (uint16_t)(b << 8) : (uint16_t)(((b & 0x80) << 8) | ((b & 0x7f) << 7));
}

/* Portable fp16 -> fp32 (normals, subnormals, zeros, inf, NaN). */
static float half_to_float(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000) << 16;
    const uint32_t exp = (h >> 10) & 0x1f, man = h & 0x3ff;
    uint32_t bits;
    if (exp == 0x1f) {
        bits = sign | 0x7f800000u | (man << 13);
    } else if (exp != 0) {
        bits = sign | ((exp + 112) << 23) | (man << 13);
    } else {
        float f = (float)man * 0x1p-24f; /* subnormal (or zero): exact */
        memcpy(&bits, &f, 4);
        bits |= sign;
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

/* fp8 byte -> the fp32 the vector paths produce (e4m3 times 2^-8), per format; filled at load time. */
static float fp8_table[2][256];

__attribute__((constructor)) static void fp8_table_init(void) {
    for (int k = 0; k < 2; k++)
        for (int b = 0; b < 256; b++) fp8_table[k][b] = half_to_float(fp8_half_bits((uint8_t)b, k));
}

#if defined(__AVX512F__)
/* 16 bytes -> 16 floats (e4m3: times 2^-8). e5m2: the byte is the high byte of the fp16. e4m3: sign-extend
 * to 16 bits, shift left 7 and keep 0xbf80, which is ((b & 0x80) << 8) | ((b & 0x7f) << 7) in 3 ops. */
static inline __attribute__((always_inline)) __m512 widen16(const uint8_t *src, int kind) {
    const __m128i b = _mm_loadu_si128((const __m128i *)src);
    __m256i h;
    if (kind == FP8_E5M2)
        h = _mm256_slli_epi16(_mm256_cvtepu8_epi16(b), 8);
    else
        h = _mm256_and_si256(_mm256_slli_epi16(_mm256_cvtepi8_epi16(b), 7), _mm256_set1_epi16((short)0xbf80));
    return _mm512_cvtph_ps(h);
}
#endif

/* dst[i] = fp8(src[i]) * s for i < n, where s already holds the folded 2^8 for e4m3: 16 (AVX-512F) or 8
 * (F16C) at a time, the table for the rest. Used by the portable row kernel and tierlm_fp8_widen. */
static inline __attribute__((always_inline)) void widen(float *dst, const uint8_t *src, int64_t n, int kind,
                                                       float s) {
    int64_t i = 0;
#if defined(__AVX512F__)
    const __m512 vs = _mm512_set1_ps(s);
    for (; i + 16 <= n; i += 16) _mm512_storeu_ps(dst + i, _mm512_mul_ps(widen16(src + i, kind), vs));
#elif defined(__F16C__) && defined(__AVX2__)
    const __m256 vs = _mm256_set1_ps(s);
    for (; i + 8 <= n; i += 8) {
        const __m128i b = _mm_loadl_epi64((const __m128i *)(src + i));
        __m128i h; /* as widen16 */
        if (kind == FP8_E5M2)
            h = _mm_slli_epi16(_mm_cvtepu8_epi16(b), 8);
        else
            h = _mm_and_si128(_mm_slli_epi16(_mm_cvtepi8_epi16(b), 7), _mm_set1_epi16((short)0xbf80));
        _mm256_storeu_ps(dst + i, _mm256_mul_ps(_mm256_cvtph_ps(h), vs));
    }
#endif
    const float *table = fp8_table[kind];
    for (; i < n; i++) dst[i] = table[src[i]] * s;
}

/* One scale, as a float; the e4m3 fold (2^8) is applied by the caller. UE8M0 e in 0..254 (255, NaN in
 * the format, comes out as inf; the quantizer never writes it). */
static inline __attribute__((always_inline)) float load_scale(const void *scales, int64_t idx, int kind) {
    if (kind == SCALE_F32) return ((const float *)scales)[idx];
    const uint32_t e = ((const uint8_t *)scales)[idx];
    const uint32_t bits = e ? e << 23 : 0x00400000u; /* e = 0: 2^-127, a subnormal */
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

/* Widen one token's row (Hkv heads x D values) of K or V into buf, applying its scales. */
static inline __attribute__((always_inline)) void widen_row(float *buf, const uint8_t *row, const void *sc,
                                                           int64_t hkv, int64_t d, int64_t groups,
                                                           int64_t s_head, int fp8_kind, int scale_kind,
                                                           float fold) {
    const int64_t gs = d / groups;
    for (int64_t kh = 0; kh < hkv; kh++)
        for (int64_t gi = 0; gi < groups; gi++) {
            const int64_t off = kh * d + gi * gs;
            widen(buf + off, row + off, gs, fp8_kind, load_scale(sc, kh * s_head + gi, scale_kind) * fold);
        }
}

/* Whether the AVX-512 sequence kernel takes this head dim and group count. */
static inline int fp8_vector_path(int64_t d, int64_t groups) {
#if defined(__AVX512F__)
    return d % 16 == 0 && d <= 16 * 16 && (d / groups) % 16 == 0;
#else
    (void)d, (void)groups;
    return 0;
#endif
}

typedef struct {
    const void *scales;
    int64_t groups, s_kv, s_blk, s_tok, s_head;
} fp8_scales;

/* An FP8 table's two regions (see f32_regions): K and V bytes and their scales (byte pointers; static scales:
 * the same [2, Hkv] in both). */
typedef struct {
    const uint8_t *k[2], *v[2];
    const char *ks[2], *vs[2];
    int64_t nb;
} fp8_regions;

/* one_sequence over FP8 bytes (the portable path): the same loops and running softmax, each token's K or V
 * row widened into rowbuf first. */
static inline __attribute__((always_inline)) void one_sequence_fp8(
    const float *q, const fp8_regions *r, fp8_scales sc, int fp8_kind, int scale_kind, const int64_t *table,
    int64_t len, int64_t bs, int64_t hkv, int64_t d, int64_t g, float scale, float *out,
    float *scratch) {
    const int64_t hq = hkv * g;
    const float fold = fp8_kind == FP8_E4M3 ? 256.0f : 1.0f;
    float *rowbuf = scratch;      /* [hkv, d] the current token's widened K or V row (64-byte aligned) */
    float *s = rowbuf + hkv * d;  /* [hq, bs] scores of the current block */
    float *m = s + hq * bs;       /* [hq] running max */
    float *l = m + hq;            /* [hq] running sum */
    float *acc = l + hq;          /* [hq, d] running numerator */
    const int64_t row = hkv * d;  /* bytes between consecutive tokens of a block */
    const int64_t block = bs * row;
    const int64_t esz = scale_kind == SCALE_F32 ? 4 : 1;
    softmax_init(m, l, acc, hq, d);
    const int64_t nblocks = (len + bs - 1) / bs;
    for (int64_t b = 0; b < nblocks; b++) {
        const int64_t n_tok = (b == nblocks - 1) ? len - b * bs : bs;
        const int64_t id = table[b], sp = id >= r->nb, local = id - sp * r->nb;
        const uint8_t *kb = r->k[sp] + local * block;
        const uint8_t *vb = r->v[sp] + local * block;
        const int64_t sb = local * sc.s_blk * esz;
        const char *k_sc = r->ks[sp], *v_sc = r->vs[sp];
        for (int64_t t = 0; t < n_tok; t++) {
            widen_row(rowbuf, kb + t * row, k_sc + sb + t * sc.s_tok * esz, hkv, d, sc.groups, sc.s_head,
                      fp8_kind, scale_kind, fold);
            score_token(q, rowbuf, s, t, hq, g, d, bs, scale);
        }
        softmax_block(s, m, l, acc, hq, d, bs, n_tok);
        for (int64_t t = 0; t < n_tok; t++) {
            widen_row(rowbuf, vb + t * row, v_sc + sb + t * sc.s_tok * esz, hkv, d, sc.groups, sc.s_head,
                      fp8_kind, scale_kind, fold);
            accumulate_token(s, rowbuf, acc, t, hq, g, d, bs);
        }
    }
    softmax_finish(out, acc, l, hq, d);
}

#if defined(__AVX512F__)
/* r[i] = sum of the 16 lanes of v[i]: a transposing tree (45 ops for 16 sums instead of ~8 each). */
static inline __attribute__((always_inline)) __m512 hsum16(const __m512 *v) {
    __m512 a[8], b[4], c[2];
    for (int i = 0; i < 8; i++) /* per 128-bit lane: (v0[0]+v0[2], v1[0]+v1[2], v0[1]+v0[3], v1[1]+v1[3]) */
        a[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
    for (int i = 0; i < 4; i++) { /* per 128-bit lane: that lane's sums of v[4i .. 4i+3] */
        const __m512d x = _mm512_castps_pd(a[2 * i]), y = _mm512_castps_pd(a[2 * i + 1]);
        b[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
    }
    for (int i = 0; i < 2; i++) /* lanes (b0 L0+L1, b0 L2+L3, b1 L0+L1, b1 L2+L3) */
        c[i] = _mm512_add_ps(_mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                             _mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], _MM_SHUFFLE(3, 1, 3, 1)));
    return _mm512_add_ps(_mm512_shuffle_f32x4(c[0], c[1], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(c[0], c[1], _MM_SHUFFLE(3, 1, 3, 1)));
}

#define TILE 16
#define MAX_CHUNKS 16 /* d <= 256 on this path */

/* Widen one KV head's rows of up to TILE tokens (K or V) into buf [TILE, d], scales applied. */
static inline __attribute__((always_inline)) void widen_tile(float *buf, const uint8_t *rows, int64_t row,
                                                            const char *sc, int64_t s_tok_bytes, int64_t nt,
                                                            int64_t d, int64_t gs, int64_t groups, int fp8_kind,
                                                            int scale_kind, float fold) {
    for (int64_t t = 0; t < nt; t++) {
        const uint8_t *src = rows + t * row;
        const char *st = sc + t * s_tok_bytes;
        float *dst = buf + t * d;
        for (int64_t gi = 0; gi < groups; gi++) {
            const __m512 vs = _mm512_set1_ps(load_scale(st, gi, scale_kind) * fold);
            for (int64_t x = gi * gs; x < (gi + 1) * gs; x += 16)
                _mm512_store_ps(dst + x, _mm512_mul_ps(widen16(src + x, fp8_kind), vs));
        }
    }
}

/* one_sequence_fp8 on AVX-512 (d and the group size multiples of 16): per block, for each tile of up to 16
 * tokens and each KV head, the tile's rows are widened once into an aligned buffer; each query head of the
 * KV head then takes 16 FMA dot products (q held in registers) reduced together by hsum16, and for V its
 * accumulator stays in registers over the tile. Same running softmax as one_sequence. */
static inline __attribute__((always_inline)) void one_sequence_fp8_avx512(
    const float *q, const fp8_regions *r, fp8_scales sc, int fp8_kind, int scale_kind, const int64_t *table,
    int64_t len, int64_t bs, int64_t hkv, int64_t d, int64_t g, float scale, float *out,
    float *scratch) {
    const int64_t hq = hkv * g, nc = d / 16, gs = d / sc.groups;
    const int64_t bsp = (bs + TILE - 1) / TILE * TILE;
    const float fold = fp8_kind == FP8_E4M3 ? 256.0f : 1.0f;
    float *buf = scratch;       /* [TILE, d] one KV head's widened rows of a tile (64-byte aligned) */
    float *s = buf + TILE * d;  /* [hq, bsp] scores of the current block (64-byte aligned: d % 16 == 0) */
    float *acc = s + hq * bsp;  /* [hq, d] running numerator */
    float *m = acc + hq * d;    /* [hq] running max */
    float *l = m + hq;          /* [hq] running sum */
    const int64_t row = hkv * d, block = bs * row;
    const int64_t esz = scale_kind == SCALE_F32 ? 4 : 1;
    const __m512 vscale = _mm512_set1_ps(scale);
    softmax_init(m, l, acc, hq, d);
    const int64_t nblocks = (len + bs - 1) / bs;
    for (int64_t b = 0; b < nblocks; b++) {
        const int64_t n_tok = (b == nblocks - 1) ? len - b * bs : bs;
        const int64_t id = table[b], sp = id >= r->nb, local = id - sp * r->nb;
        const uint8_t *kb = r->k[sp] + local * block, *vb = r->v[sp] + local * block;
        const int64_t sb = local * sc.s_blk * esz;
        const char *k_sc = r->ks[sp], *v_sc = r->vs[sp];
        for (int64_t t0 = 0; t0 < n_tok; t0 += TILE) {
            const int64_t nt = n_tok - t0 < TILE ? n_tok - t0 : TILE;
            for (int64_t kh = 0; kh < hkv; kh++) {
                widen_tile(buf, kb + t0 * row + kh * d, row, k_sc + sb + (t0 * sc.s_tok + kh * sc.s_head) * esz,
                           sc.s_tok * esz, nt, d, gs, sc.groups, fp8_kind, scale_kind, fold);
                for (int64_t j = 0; j < g; j++) {
                    const int64_t h = kh * g + j;
                    __m512 qv[MAX_CHUNKS], part[TILE];
                    for (int64_t c = 0; c < nc; c++) qv[c] = _mm512_loadu_ps(q + h * d + c * 16);
                    for (int64_t t = 0; t < TILE; t++) {
                        __m512 a = _mm512_setzero_ps();
                        if (t < nt)
                            for (int64_t c = 0; c < nc; c++)
                                a = _mm512_fmadd_ps(qv[c], _mm512_load_ps(buf + t * d + c * 16), a);
                        part[t] = a;
                    }
                    _mm512_store_ps(s + h * bsp + t0, _mm512_mul_ps(hsum16(part), vscale));
                }
            }
        }
        softmax_block(s, m, l, acc, hq, d, bsp, n_tok);
        for (int64_t t0 = 0; t0 < n_tok; t0 += TILE) {
            const int64_t nt = n_tok - t0 < TILE ? n_tok - t0 : TILE;
            for (int64_t kh = 0; kh < hkv; kh++) {
                widen_tile(buf, vb + t0 * row + kh * d, row, v_sc + sb + (t0 * sc.s_tok + kh * sc.s_head) * esz,
                           sc.s_tok * esz, nt, d, gs, sc.groups, fp8_kind, scale_kind, fold);
                for (int64_t j = 0; j < g; j++) {
                    const int64_t h = kh * g + j;
                    __m512 av[MAX_CHUNKS];
                    for (int64_t c = 0; c < nc; c++) av[c] = _mm512_load_ps(acc + h * d + c * 16);
                    for (int64_t t = 0; t < nt; t++) {
                        const __m512 p = _mm512_set1_ps(s[h * bsp + t0 + t]);
                        for (int64_t c = 0; c < nc; c++)
                            av[c] = _mm512_fmadd_ps(p, _mm512_load_ps(buf + t * d + c * 16), av[c]);
                    }
                    for (int64_t c = 0; c < nc; c++) _mm512_store_ps(acc + h * d + c * 16, av[c]);
                }
            }
        }
    }
    softmax_finish(out, acc, l, hq, d);
}
#endif

/* One sequence, dispatched to a kernel instance with a constant format (it sits in the innermost widening
 * loop) and, on the vector path, a constant head dim for 64 and 128; the scale kind (read once per group)
 * stays a runtime value, and so does everything on the portable row path, which keeps the build small.
 * The dispatch sits inside the parallel loop because GCC outlines an OpenMP region before inlining:
 * constants passed to a function holding the region would not reach its body. */
static inline __attribute__((always_inline)) void one_sequence_fp8_any(
    int vec, const float *q, const fp8_regions *r, fp8_scales sc, int fp8_kind, int scale_kind, const int64_t *table,
    int64_t len, int64_t bs, int64_t hkv, int64_t d, int64_t g, float scale, float *out,
    float *scratch) {
#if defined(__AVX512F__)
#define FP8_VEC(FK, D) \
    one_sequence_fp8_avx512(q, r, sc, FK, scale_kind, table, len, bs, hkv, D, g, scale, out, scratch)
#define FP8_VEC_D(FK)         \
    do {                      \
        if (d == 64)          \
            FP8_VEC(FK, 64);  \
        else if (d == 128)    \
            FP8_VEC(FK, 128); \
        else                  \
            FP8_VEC(FK, d);   \
    } while (0)
    if (vec) {
        if (fp8_kind == FP8_E4M3)
            FP8_VEC_D(FP8_E4M3);
        else
            FP8_VEC_D(FP8_E5M2);
        return;
    }
#undef FP8_VEC_D
#undef FP8_VEC
#else
    (void)vec;
#endif
    one_sequence_fp8(q, r, sc, fp8_kind, scale_kind, table, len, bs, hkv, d, g, scale, out, scratch);
}

/* Returns 0 on success, 1 if the per-sequence scratch would not fit (the caller falls back), 2 for
 * arguments it does not take (unknown format or scale kind, groups not dividing d, hq not a multiple of
 * hkv). */
int tierlm_paged_decode_fp8(const float *q, const uint8_t *data, const void *scales, int scale_kind, int fp8_kind,
                            int64_t groups, int64_t s_kv, int64_t s_blk, int64_t s_tok, int64_t s_head,
                            const int64_t *block_tables, const int64_t *seq_lens, float *out, int64_t nd, int64_t hq,
                            int64_t hkv, int64_t d, int64_t num_blocks, int64_t bs, int64_t max_blocks,
                            float scale, const uint8_t *spill, const void *spill_scales, int64_t num_spill) {
    if ((fp8_kind != FP8_E4M3 && fp8_kind != FP8_E5M2) || (scale_kind != SCALE_F32 && scale_kind != SCALE_UE8M0) ||
        groups < 1 || d % groups || hkv < 1 || hq % hkv)
        return 2;
    /* the larger of the two sequence kernels' scratch: [hkv, d] or [16, d] row buffer, scores of a block
     * padded to 16, running max and sum, accumulators */
    const int64_t need = (hkv > 16 ? hkv : 16) * d + hq * ((bs + 15) / 16 * 16) + 2 * hq + hq * d;
    if (need > MAX_STACK_FLOATS) return 1;
    const fp8_scales sc = {scales, groups, s_kv, s_blk, s_tok, s_head};
    const int64_t g = hq / hkv;
    const int vec = fp8_vector_path(d, groups);
    const int64_t block = bs * hkv * d, esz = scale_kind == SCALE_F32 ? 4 : 1;
    if (!spill) spill = data, spill_scales = scales, num_spill = num_blocks;  /* no spill ids: region 1 unused */
    /* per-token scales: the store's V scales follow its K scales; static ones (s_blk == 0): one [2, Hkv] for all */
    const char *ks0 = (const char *)scales;
    const char *ks1 = spill_scales && s_blk ? (const char *)spill_scales : ks0;
    const int64_t s_kv1 = spill_scales && s_blk ? num_spill * s_blk : s_kv;
    const fp8_regions reg = {{data, spill}, {data + num_blocks * block, spill + num_spill * block},
                             {ks0, ks1}, {ks0 + s_kv * esz, ks1 + s_kv1 * esz}, num_blocks};
#pragma omp parallel for schedule(dynamic, 1)
    for (int64_t n = 0; n < nd; n++) {
        float scratch[MAX_STACK_FLOATS] __attribute__((aligned(64)));
        one_sequence_fp8_any(vec, q + n * hq * d, &reg, sc, fp8_kind, scale_kind, block_tables + n * max_blocks,
                             seq_lens[n], bs, hkv, d, g, scale, out + n * hq * d, scratch);
    }
    return 0;
}

/* Values the widening converts per vector instruction: 16 (AVX-512F), 8 (F16C), 1 (the table). */
int tierlm_fp8_vector_width(void) {
#if defined(__AVX512F__)
    return 16;
#elif defined(__F16C__) && defined(__AVX2__)
    return 8;
#else
    return 1;
#endif
}

/* The kernel's widening, exposed for the self-check and tests: dst[i] = fp8(src[i]) * scale (the true
 * value; 16 / 8 at a time on the vector paths, the table for the rest). Returns 2 for an unknown format. */
int tierlm_fp8_widen(const uint8_t *src, float *dst, int64_t n, int fp8_kind, float scale) {
    if (fp8_kind == FP8_E4M3)
        widen(dst, src, n, FP8_E4M3, scale * 256.0f);
    else if (fp8_kind == FP8_E5M2)
        widen(dst, src, n, FP8_E5M2, scale);
    else
        return 2;
    return 0;
}

/* Fused residual add + RMSNorm over rows of `dim` floats: res_out = x + res; out = w * (res_out * rsqrt(
 * mean(res_out^2) + eps)). With res NULL there is no add and res_out is not written. Rows run in parallel
 * only when there is enough work to pay for waking the thread pool. */
void tierlm_add_rms_norm_f32(const float *x, const float *res, const float *w, float *out, float *res_out,
                             int64_t rows, int64_t dim, float eps) {
#pragma omp parallel for schedule(static) if (rows * dim >= 262144)
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * dim;
        float *yr = out + r * dim;
        float sum = 0.0f;
        if (res) {
            const float *rr = res + r * dim;
            float *sr = res_out + r * dim;
#pragma omp simd reduction(+ : sum)
            for (int64_t i = 0; i < dim; i++) {
                const float v = xr[i] + rr[i];
                sr[i] = v;
                sum += v * v;
            }
            xr = sr;
        } else {
#pragma omp simd reduction(+ : sum)
            for (int64_t i = 0; i < dim; i++) sum += xr[i] * xr[i];
        }
        const float inv = 1.0f / sqrtf(sum / (float)dim + eps);
#pragma omp simd
        for (int64_t i = 0; i < dim; i++) yr[i] = w[i] * (xr[i] * inv);
    }
}

/* ---- Quest sparse block selection --------------------------------------------------------------------
 * The whole of attention/sparse.py's QuestSelector.select (its torch path is the reference) for a batch of
 * decode sequences, one work item per sequence, reading each block's key bounds in place through the block
 * table. Per sequence (len tokens, nblocks = ceil(len / bs) blocks):
 *   nblocks <= budget: every block, in order;
 *   else: the sink blocks (position < sink), the window blocks (position >= nblocks - window) and, of the
 *   candidates between, the budget - sink - window with the largest
 *       rel(j) = logsumexp_h(scale * (u_h(j) - max_j' u_h(j')))        (max over the candidates only)
 *       u_h(j) = sum_c max(q_hc lo_jc, q_hc hi_jc) = relu(q_h) . hi_j + min(q_h, 0) . lo_j
 *   (lo_j <= hi_j: query head h reads KV head h / g's bounds). The top-m is a quickselect of the m-th
 *   largest rel (the threshold), then a pass in position order that keeps every candidate above it and, of
 *   those equal to it, the lowest positions: ties go to the lower position (torch's topk leaves them
 *   unspecified). logsumexp subtracts the per-block max over heads first, as torch does.
 * Output: the kept block ids in position order, row n at out_tables + n * width, padded up to width with
 * the row's first table entry (as the torch path's gather of position 0 does), and out_lens[n] = (kept - 1)
 * * bs + the tokens of the last block. kept = min(nblocks, budget), so width >= min(max nblocks, budget).
 * Layout: q [n, hq, d]; key_min / key_max [num_blocks, hkv, d]; tables [n, max_blocks]; lens [n] (int64).
 */
#pragma omp declare simd notinbranch
float logf(float);

/* The m-th largest (m >= 1) of a[0 .. n), a reordered in place (Wirth's selection, descending). */
static float quest_kth_largest(float *a, int64_t n, int64_t m) {
    const int64_t k = m - 1;
    int64_t l = 0, r = n - 1;
    while (l < r) {
        const float x = a[k];
        int64_t i = l, j = r;
        do {
            while (a[i] > x) i++;
            while (x > a[j]) j--;
            if (i <= j) {
                const float t = a[i];
                a[i] = a[j];
                a[j] = t;
                i++;
                j--;
            }
        } while (i <= j);
        if (j < k) l = i;
        if (k < i) r = j;
    }
    return a[k];
}

/* u[h * nc + c] = the bound of query head h on candidate c (block table[c]). qp = relu(q), qm = min(q, 0). */
static inline __attribute__((always_inline)) void quest_bounds(const float *qp, const float *qm, const float *lo_base,
                                                              const float *hi_base, const int64_t *table, int64_t nc,
                                                              int64_t hkv, int64_t g, int64_t d, float *u) {
    const int64_t row = hkv * d;
    for (int64_t c = 0; c < nc; c++) {
        const float *lo = lo_base + table[c] * row, *hi = hi_base + table[c] * row;
        for (int64_t kh = 0; kh < hkv; kh++) {
            const float *lk = lo + kh * d, *hk = hi + kh * d;
            for (int64_t j = 0; j < g; j++) {
                const int64_t h = kh * g + j;
                const float *ph = qp + h * d, *mh = qm + h * d;
                float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
                for (int64_t x = 0; x < d; x++) acc += ph[x] * hk[x] + mh[x] * lk[x];
                u[h * nc + c] = acc;
            }
        }
    }
}

#if defined(__AVX512F__)
/* quest_bounds on AVX-512 (d % 16 == 0, d <= 256): candidates in tiles of 16; per query head, 16 FMA dot
 * products (16 independent accumulators, 16 channels at a time; the tile's rows come from L1 after the
 * first head of their KV head) reduced together by hsum16 into 16 consecutive u values. A short last tile
 * repeats its first block and stores only its own lanes. (Software prefetch of the next tile's rows
 * measured slower here.) */
static inline __attribute__((always_inline)) void quest_bounds_avx512(const float *qp, const float *qm,
                                                                     const float *lo_base, const float *hi_base,
                                                                     const int64_t *table, int64_t nc, int64_t hkv,
                                                                     int64_t g, int64_t d, float *u) {
    const int64_t row = hkv * d, nch = d / 16;
    for (int64_t c0 = 0; c0 < nc; c0 += TILE) {
        const int64_t nt = nc - c0 < TILE ? nc - c0 : TILE;
        int64_t off[TILE];
        for (int64_t t = 0; t < TILE; t++) off[t] = table[c0 + (t < nt ? t : 0)] * row;
        const __mmask16 keep = (__mmask16)((1u << nt) - 1u);
        for (int64_t kh = 0; kh < hkv; kh++) {
            const float *lo = lo_base + kh * d, *hi = hi_base + kh * d;
            for (int64_t j = 0; j < g; j++) {
                const int64_t h = kh * g + j;
                __m512 part[TILE];
#pragma GCC unroll 16
                for (int64_t t = 0; t < TILE; t++) part[t] = _mm512_setzero_ps();
                for (int64_t x = 0; x < nch; x++) { /* 16 independent FMA chains: throughput, not latency */
                    const __m512 vp = _mm512_loadu_ps(qp + h * d + x * 16), vm = _mm512_loadu_ps(qm + h * d + x * 16);
#pragma GCC unroll 16
                    for (int64_t t = 0; t < TILE; t++)
                        part[t] = _mm512_fmadd_ps(vp, _mm512_loadu_ps(hi + off[t] + x * 16),
                                                  _mm512_fmadd_ps(vm, _mm512_loadu_ps(lo + off[t] + x * 16), part[t]));
                }
                _mm512_mask_storeu_ps(u + h * nc + c0, keep, hsum16(part));
            }
        }
    }
}
#endif

/* One sequence's picks. scratch: 2 * hq * d + (hq + 3) * nc floats and nc bytes (nc = nblocks - sink - window,
 * candidates). Always inlined so the caller's constant head dims reach the bound loop. */
static inline __attribute__((always_inline)) void quest_one(const float *q, const float *lo_base, const float *hi_base,
                                                           const int64_t *table, int64_t len, int64_t bs,
                                                           int64_t hkv, int64_t g, int64_t d, int64_t sink,
                                                           int64_t window, int64_t budget, float scale,
                                                           int64_t width, int64_t *out, int64_t *out_len,
                                                           float *scratch) {
    const int64_t hq = hkv * g;
    const int64_t nblocks = (len + bs - 1) / bs;
    int64_t k = 0;
    if (nblocks <= budget) {
        for (; k < nblocks; k++) out[k] = table[k];
    } else {
        const int64_t nc = nblocks - sink - window, m = budget - sink - window; /* nc > m >= 0 */
        for (; k < sink; k++) out[k] = table[k];
        if (m > 0) {
            float *qp = scratch, *qm = qp + hq * d, *u = qm + hq * d;
            float *mx = u + hq * nc, *sum = mx + nc, *tmp = sum + nc;
            for (int64_t x = 0; x < hq * d; x++) {
                qp[x] = q[x] > 0.0f ? q[x] : 0.0f;
                qm[x] = q[x] < 0.0f ? q[x] : 0.0f;
            }
#if defined(__AVX512F__)
            if (d % 16 == 0 && d <= 16 * MAX_CHUNKS)
                quest_bounds_avx512(qp, qm, lo_base, hi_base, table + sink, nc, hkv, g, d, u);
            else
#endif
                quest_bounds(qp, qm, lo_base, hi_base, table + sink, nc, hkv, g, d, u);
            for (int64_t c = 0; c < nc; c++) {
                mx[c] = -INFINITY;
                sum[c] = 0.0f;
            }
            for (int64_t h = 0; h < hq; h++) { /* u becomes the gap (u - best) * scale; mx its max over heads */
                float *uh = u + h * nc;
                float best = -INFINITY;
#pragma omp simd reduction(max : best)
                for (int64_t c = 0; c < nc; c++) best = uh[c] > best ? uh[c] : best;
#pragma omp simd
                for (int64_t c = 0; c < nc; c++) {
                    const float gap = (uh[c] - best) * scale;
                    uh[c] = gap;
                    mx[c] = gap > mx[c] ? gap : mx[c];
                }
            }
            for (int64_t h = 0; h < hq; h++) {
                const float *uh = u + h * nc;
#pragma omp simd
                for (int64_t c = 0; c < nc; c++) sum[c] += expf(uh[c] - mx[c]);
            }
#pragma omp simd
            for (int64_t c = 0; c < nc; c++) {
                const float rel = logf(sum[c]) + mx[c];
                sum[c] = rel;
                tmp[c] = rel;
            }
            const float *rel = sum;
            const float t = quest_kth_largest(tmp, nc, m);
            int64_t ties = m;
            for (int64_t c = 0; c < nc; c++) ties -= rel[c] > t;
            for (int64_t c = 0; c < nc; c++)
                if (rel[c] > t || (rel[c] == t && ties-- > 0)) out[k++] = table[sink + c];
        }
        for (int64_t p = nblocks - window; p < nblocks; p++) out[k++] = table[p];
    }
    *out_len = k ? (k - 1) * bs + len - (nblocks - 1) * bs : 0;
    for (int64_t x = k; x < width; x++) out[x] = table[0];
}

/* The block selectors' shared argument check: every row's length >= 0, its blocks within max_blocks and its
 * kept blocks within width, its table ids in [0, num_ids). Returns the most blocks of any row past the budget
 * (0 if none), or -1 when a row fails. */
static int64_t select_rows_ok(const int64_t *block_tables, const int64_t *seq_lens, int64_t nd, int64_t max_blocks,
                              int64_t width, int64_t bs, int64_t budget, int64_t num_ids) {
    int64_t most = 0;
    for (int64_t n = 0; n < nd; n++) {
        const int64_t len = seq_lens[n], nblocks = (len + bs - 1) / bs;
        if (len < 0 || nblocks > max_blocks || (nblocks < budget ? nblocks : budget) > width) return -1;
        const int64_t *tn = block_tables + n * max_blocks;
        for (int64_t p = 0; p < nblocks; p++)
            if (tn[p] < 0 || tn[p] >= num_ids) return -1;
        if (nblocks > budget && nblocks > most) most = nblocks;
    }
    return most;
}

/* Returns 0 on success; 1 if scratch could not be allocated; 2 for arguments it does not take (hq not a
 * multiple of hkv, budget < sink + window, a negative length, a row needing more than max_blocks or width
 * entries, a block id outside [0, num_blocks)). Nothing is written on 2. */
int tierlm_quest_select(const float *q, const float *key_min, const float *key_max, const int64_t *block_tables,
                        const int64_t *seq_lens, int64_t *out_tables, int64_t *out_lens, int64_t nd, int64_t hq,
                        int64_t hkv, int64_t d, int64_t num_blocks, int64_t max_blocks, int64_t width, int64_t bs,
                        int64_t sink, int64_t window, int64_t budget, float scale) {
    if (hkv < 1 || hq % hkv || d < 1 || bs < 1 || sink < 0 || window < 0 || budget < sink + window || max_blocks < 1)
        return 2;
    int64_t most = select_rows_ok(block_tables, seq_lens, nd, max_blocks, width, bs, budget, num_blocks);
    if (most < 0) return 2;
    if (most) most -= sink + window; /* the most candidates of any row */
    const int64_t g = hq / hkv;
    const size_t scratch_floats = (size_t)(2 * hq * d + (hq + 3) * most);
    int failed = 0;
#pragma omp parallel if (nd > 1)
    {
        float *scratch = most ? malloc(scratch_floats * sizeof(float)) : NULL;
        if (most && !scratch) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t n = 0; n < nd; n++) {
            if (most && !scratch) continue;
            const float *qn = q + n * hq * d;
            const int64_t *tn = block_tables + n * max_blocks;
            int64_t *on = out_tables + n * width;
            if (d == 64)
                quest_one(qn, key_min, key_max, tn, seq_lens[n], bs, hkv, g, 64, sink, window, budget, scale, width,
                          on, out_lens + n, scratch);
            else if (d == 128)
                quest_one(qn, key_min, key_max, tn, seq_lens[n], bs, hkv, g, 128, sink, window, budget, scale, width,
                          on, out_lens + n, scratch);
            else
                quest_one(qn, key_min, key_max, tn, seq_lens[n], bs, hkv, g, d, sink, window, budget, scale, width,
                          on, out_lens + n, scratch);
        }
        free(scratch);
    }
    return failed;
}

/* 7. Index-key selection (attention/index_keys.py IndexKeySelector, whose torch path is the definition): the
 * blocks ranked by their attention mass over the FP8 e4m3 index keys.
 *
 * Per row with more blocks than the budget, every block p (sink, candidates, window) gets, per query head h,
 * lse_h(p) = log sum_{t in p} exp(scale * q_h . k~_t), k~ the index key widened with its per-token, per-head
 * fp32 scale; Z_h = logsumexp over those blocks, and a candidate (between the sink and the window) scores
 * max_h (lse_h(p) - Z_h). The best m = budget - sink - window candidates are kept (ties to the lower position);
 * output as tierlm_quest_select's. Layout, token-minor so 16 tokens' values of one channel are 16 adjacent
 * bytes: keys [num_ids, hkv, d, bs] bytes, scales [num_ids, hkv, bs] fp32. */

/* One block's n_tok index keys against every query head, the portable path: per head h, mx[h * nb] = the
 * largest scaled logit and sm[h * nb] = sum_t exp(logit_t - mx) (so lse_h = mx + log sm); s: [bs] scratch. */
static inline __attribute__((always_inline)) void index_block(const float *q, const uint8_t *kb, const float *ks,
                                                             int64_t n_tok, int64_t bs, int64_t hkv, int64_t g,
                                                             int64_t d, float scale, float *s, float *mx, float *sm,
                                                             int64_t nb) {
    const float *table = fp8_table[FP8_E4M3];
    for (int64_t kh = 0; kh < hkv; kh++)
        for (int64_t j = 0; j < g; j++) {
            const float *qh = q + (kh * g + j) * d;
            float m = -INFINITY;
            for (int64_t t = 0; t < n_tok; t++) {
                float acc = 0.0f;
                for (int64_t x = 0; x < d; x++) acc += qh[x] * table[kb[(kh * d + x) * bs + t]];
                s[t] = acc * ks[kh * bs + t] * 256.0f * scale;
                m = s[t] > m ? s[t] : m;
            }
            float sum = 0.0f;
            for (int64_t t = 0; t < n_tok; t++) sum += expf(s[t] - m);
            mx[(kh * g + j) * nb] = m;
            sm[(kh * g + j) * nb] = sum;
        }
}

#if defined(__AVX512F__)
__m512 _ZGVeN16v_expf(__m512); /* libmvec's 16-lane expf (linked: -lmvec), what `omp simd` loops call */

#define INDEX_HEADS 4 /* query heads of one KV head scored together: each widened vector feeds 4 x 2 FMA chains */

/* index_block on AVX-512 (bs a multiple of 16): per tile of 16 tokens and KV head, channel x of the 16 keys
 * is one 16-byte load widened to 16 floats, which meets up to INDEX_HEADS query heads' q[x] broadcast (two
 * FMA chains per head, even and odd channels): 16 logits per head with no horizontal sums and no buffer. The
 * keys' scales (with e4m3's 2^8 fold and the logit scale) apply once per logit; per head the tile's max and
 * exp-sum are kept (a block of several tiles folds them together). */
static inline __attribute__((always_inline)) void index_block_avx512(const float *q, const uint8_t *kb,
                                                                    const float *ks, int64_t n_tok, int64_t bs,
                                                                    int64_t hkv, int64_t g, int64_t d, float scale,
                                                                    float *mx, float *sm, int64_t nb) {
    for (int64_t t0 = 0; t0 < n_tok; t0 += TILE) {
        const int64_t nt = n_tok - t0 < TILE ? n_tok - t0 : TILE;
        const __mmask16 live = (__mmask16)((1u << nt) - 1u);
        for (int64_t kh = 0; kh < hkv; kh++) {
            const uint8_t *kk = kb + kh * d * bs + t0;
            const __m512 vs = _mm512_mul_ps(_mm512_loadu_ps(ks + kh * bs + t0), _mm512_set1_ps(256.0f * scale));
            for (int64_t j0 = 0; j0 < g; j0 += INDEX_HEADS) {
                const int64_t nh = g - j0 < INDEX_HEADS ? g - j0 : INDEX_HEADS;
                const float *qh = q + (kh * g + j0) * d;
                __m512 a0[INDEX_HEADS], a1[INDEX_HEADS];
                for (int64_t i = 0; i < INDEX_HEADS; i++) a0[i] = a1[i] = _mm512_setzero_ps();
                for (int64_t x = 0; x < d; x += 2) {
                    const __m512 k0 = widen16(kk + x * bs, FP8_E4M3), k1 = widen16(kk + (x + 1) * bs, FP8_E4M3);
                    for (int64_t i = 0; i < nh; i++) {
                        a0[i] = _mm512_fmadd_ps(_mm512_set1_ps(qh[i * d + x]), k0, a0[i]);
                        a1[i] = _mm512_fmadd_ps(_mm512_set1_ps(qh[i * d + x + 1]), k1, a1[i]);
                    }
                }
                for (int64_t i = 0; i < nh; i++) {
                    const int64_t h = kh * g + j0 + i;
                    const __m512 sv = _mm512_mask_mov_ps(_mm512_set1_ps(-INFINITY), live,
                                                         _mm512_mul_ps(_mm512_add_ps(a0[i], a1[i]), vs));
                    const float m = _mm512_reduce_max_ps(sv);
                    const float sum = _mm512_reduce_add_ps(_ZGVeN16v_expf(_mm512_sub_ps(sv, _mm512_set1_ps(m))));
                    if (t0 == 0) {
                        mx[h * nb] = m;
                        sm[h * nb] = sum;
                    } else { /* a block of more than 16 tokens: fold this tile in */
                        const float big = m > mx[h * nb] ? m : mx[h * nb];
                        sm[h * nb] = sm[h * nb] * expf(mx[h * nb] - big) + sum * expf(m - big);
                        mx[h * nb] = big;
                    }
                }
            }
        }
    }
}
#endif

/* One row's picks. scratch: bs + 2 * hq * nblocks + hq + 2 * nc floats. The
 * per-block maxima and exp-sums are kept head-major ([hq, nblocks]) so the logs, Z_h and the scores are
 * vector loops over the blocks. */
static inline __attribute__((always_inline)) void index_one(const float *q, const uint8_t *keys, const float *kscales,
                                                           const int64_t *table, int64_t len, int64_t bs, int64_t hkv,
                                                           int64_t g, int64_t d, int64_t sink, int64_t window,
                                                           int64_t budget, float scale, int64_t width, int64_t *out,
                                                           int64_t *out_len, float *scratch) {
    const int64_t hq = hkv * g, nblocks = (len + bs - 1) / bs;
    int64_t k = 0;
    if (nblocks <= budget) {
        for (; k < nblocks; k++) out[k] = table[k];
    } else {
        const int64_t nc = nblocks - sink - window, m = budget - sink - window; /* nc > m >= 0 */
        for (; k < sink; k++) out[k] = table[k];
        if (m > 0) {
            float *s = scratch, *lse = s + bs, *sm = lse + hq * nblocks;
            float *z = sm + hq * nblocks, *score = z + hq, *tmp = score + nc;
            for (int64_t p = 0; p < nblocks; p++) {
                const int64_t n_tok = p == nblocks - 1 ? len - p * bs : bs;
                const uint8_t *kb = keys + table[p] * bs * hkv * d;
                const float *ks = kscales + table[p] * bs * hkv;
#if defined(__AVX512F__)
                if (bs % 16 == 0 && d % 2 == 0)
                    index_block_avx512(q, kb, ks, n_tok, bs, hkv, g, d, scale, lse + p, sm + p, nblocks);
                else
#endif
                    index_block(q, kb, ks, n_tok, bs, hkv, g, d, scale, s, lse + p, sm + p, nblocks);
            }
            for (int64_t h = 0; h < hq; h++) { /* lse_h(p) = max + log sum, then Z_h = logsumexp_p lse_h(p) */
                float *lh = lse + h * nblocks;
                const float *sh = sm + h * nblocks;
                float big = -INFINITY;
#pragma omp simd reduction(max : big)
                for (int64_t p = 0; p < nblocks; p++) {
                    lh[p] += logf(sh[p]);
                    big = lh[p] > big ? lh[p] : big;
                }
                float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
                for (int64_t p = 0; p < nblocks; p++) sum += expf(lh[p] - big);
                z[h] = big + logf(sum);
            }
            for (int64_t c = 0; c < nc; c++) score[c] = -INFINITY;
            for (int64_t h = 0; h < hq; h++) {
                const float *lh = lse + h * nblocks + sink;
                const float zh = z[h];
#pragma omp simd
                for (int64_t c = 0; c < nc; c++) score[c] = lh[c] - zh > score[c] ? lh[c] - zh : score[c];
            }
            for (int64_t c = 0; c < nc; c++) tmp[c] = score[c];
            const float t = quest_kth_largest(tmp, nc, m);
            int64_t ties = m;
            for (int64_t c = 0; c < nc; c++) ties -= score[c] > t;
            for (int64_t c = 0; c < nc; c++)
                if (score[c] > t || (score[c] == t && ties-- > 0)) out[k++] = table[sink + c];
        }
        for (int64_t p = nblocks - window; p < nblocks; p++) out[k++] = table[p];
    }
    *out_len = k ? (k - 1) * bs + len - (nblocks - 1) * bs : 0;
    for (int64_t x = k; x < width; x++) out[x] = table[0];
}

/* Returns 0 on success; 1 if scratch could not be allocated; 2 for arguments it does not take (as
 * tierlm_quest_select's, num_ids for num_blocks). Nothing is written on 2. */
int tierlm_index_select(const float *q, const uint8_t *keys, const float *kscales, const int64_t *block_tables,
                        const int64_t *seq_lens, int64_t *out_tables, int64_t *out_lens, int64_t nd, int64_t hq,
                        int64_t hkv, int64_t d, int64_t num_ids, int64_t max_blocks, int64_t width, int64_t bs,
                        int64_t sink, int64_t window, int64_t budget, float scale) {
    if (hkv < 1 || hq % hkv || d < 1 || bs < 1 || sink < 0 || window < 0 || budget < sink + window || max_blocks < 1)
        return 2;
    const int64_t most = select_rows_ok(block_tables, seq_lens, nd, max_blocks, width, bs, budget, num_ids);
    if (most < 0) return 2;
    const int64_t g = hq / hkv;
    const size_t scratch_floats = (size_t)(bs + 2 * hq * most + hq + 2 * most);
    int failed = 0;
#pragma omp parallel if (nd > 1)
    {
        float *scratch = most ? malloc(scratch_floats * sizeof(float)) : NULL;
        if (most && !scratch) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t n = 0; n < nd; n++) {
            if (most && !scratch) continue;
            const float *qn = q + n * hq * d;
            const int64_t *tn = block_tables + n * max_blocks;
            int64_t *on = out_tables + n * width;
            if (d == 64)
                index_one(qn, keys, kscales, tn, seq_lens[n], bs, hkv, g, 64, sink, window, budget, scale, width, on,
                          out_lens + n, scratch);
            else
                index_one(qn, keys, kscales, tn, seq_lens[n], bs, hkv, g, d, sink, window, budget, scale, width, on,
                          out_lens + n, scratch);
        }
        free(scratch);
    }
    return failed;
}
