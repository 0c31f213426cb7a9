/* tierlm's native CPU kernels (fp32), built at first use by tierlm/kernels/cpu.py and loaded with ctypes.
 *
 * 1. Paged decode attention: each decode query reads its sequence's K/V blocks in place.
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
 * 2. Fused residual add + RMSNorm (one pass instead of torch's add, pow, mean, rsqrt, mul, mul).
 *
 * Built at first use by tierlm.kernels.cpu with the system C compiler (-O3 -march=native
 * -fopenmp) and loaded with ctypes; OpenMP resolves to the runtime torch already loaded, so the kernel
 * shares torch's thread pool and thread count.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#define MAX_STACK_FLOATS 16384

/* glibc's libmvec has vector variants of expf (_ZGV*_expf); declaring them lets `omp simd` loops use them. */
#pragma omp declare simd notinbranch
float expf(float);

/* One sequence, all heads: each K/V row (all KV heads of one token) is read once, in order. Always
 * inlined, so the callers below can hand it a constant head dim and get fully unrolled dot products. */
static inline __attribute__((always_inline)) void one_sequence(const float *q, const float *k_base, const float *v_base, const int64_t *table,
                         int64_t len, int64_t bs, int64_t hkv, int64_t d, int64_t g, float scale, float *out,
                         float *scratch) {
    const int64_t hq = hkv * g;
    float *s = scratch;      /* [hq, bs] scores of the current block */
    float *m = s + hq * bs;  /* [hq] running max */
    float *l = m + hq;       /* [hq] running sum */
    float *acc = l + hq;     /* [hq, d] running numerator */
    const int64_t row = hkv * d;   /* floats between consecutive tokens of a block */
    const int64_t block = bs * row;
    for (int64_t j = 0; j < hq; j++) {
        m[j] = -INFINITY;
        l[j] = 0.0f;
    }
    for (int64_t x = 0; x < hq * d; x++) acc[x] = 0.0f;
    const int64_t nblocks = (len + bs - 1) / bs;
    for (int64_t b = 0; b < nblocks; b++) {
        const int64_t n_tok = (b == nblocks - 1) ? len - b * bs : bs;
        const float *kb = k_base + table[b] * block;
        const float *vb = v_base + table[b] * block;
        for (int64_t t = 0; t < n_tok; t++) {
            const float *kt = kb + t * row;
            for (int64_t h = 0; h < hq; h++) {
                const float *qh = q + h * d;
                const float *kh = kt + (h / g) * d;
                float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
                for (int64_t x = 0; x < d; x++) dot += qh[x] * kh[x];
                s[h * bs + t] = dot * scale;
            }
        }
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
        for (int64_t t = 0; t < n_tok; t++) {
            const float *vt = vb + t * row;
            for (int64_t h = 0; h < hq; h++) {
                const float p = s[h * bs + t];
                const float *vh = vt + (h / g) * d;
                float *ah = acc + h * d;
#pragma omp simd
                for (int64_t x = 0; x < d; x++) ah[x] += p * vh[x];
            }
        }
    }
    for (int64_t h = 0; h < hq; h++) {
        const float inv = 1.0f / l[h];
        for (int64_t x = 0; x < d; x++) out[h * d + x] = acc[h * d + x] * inv;
    }
}

/* Returns 0 on success, 1 if the per-sequence scratch would not fit (the caller falls back). */
int tierlm_paged_decode_f32(const float *q, const float *kv_cache, const int64_t *block_tables,
                            const int64_t *seq_lens, float *out, int64_t nd, int64_t hq, int64_t hkv, int64_t d,
                            int64_t num_blocks, int64_t bs, int64_t max_blocks, float scale) {
    const int64_t g = hq / hkv;
    const int64_t need = hq * bs + 2 * hq + hq * d;
    if (need > MAX_STACK_FLOATS) return 1;
    const float *k_base = kv_cache;
    const float *v_base = kv_cache + num_blocks * bs * hkv * d;
#pragma omp parallel for schedule(dynamic, 1)
    for (int64_t n = 0; n < nd; n++) {
        float scratch[MAX_STACK_FLOATS];
        const float *qn = q + n * hq * d;
        const int64_t *tn = block_tables + n * max_blocks;
        float *on = out + n * hq * d;
        if (d == 64)
            one_sequence(qn, k_base, v_base, tn, seq_lens[n], bs, hkv, 64, g, scale, on, scratch);
        else if (d == 128)
            one_sequence(qn, k_base, v_base, tn, seq_lens[n], bs, hkv, 128, g, scale, on, scratch);
        else
            one_sequence(qn, k_base, v_base, tn, seq_lens[n], bs, hkv, d, g, scale, on, scratch);
    }
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
