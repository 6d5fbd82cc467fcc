/* A Mamba1 decode step's kernels on CPU: the step between the input and output projections for a batch of
 * sequences in one call (causal convolution step, x_proj, dt_proj, softplus, the per-sequence Δ and A scales,
 * the state update, the D skip and the SiLU(z) gate), and the residual connection with the next RMSNorm in
 * another, instead of about thirty PyTorch operators whose fixed cost per call, not their arithmetic, is what a
 * decode step of a small model spends its time on.
 *
 * Compiled at first use by runtime/ops/cpu_kernels.py (cc -O3 -march=native -fopenmp). The decode step shares
 * its phases among `threads` (the calling thread's OpenMP team, torch's), two barriers for any batch:
 *   1. per (sequence, block of channels): the convolution window shifts in the new input,
 *      xc = SiLU(w · window + bias);
 *   2. per (x_proj row, sequence): proj = x_proj · xc, that is Δ's low-rank part, B and C;
 *   3. per (sequence, block of channels): Δ = softplus(dt_proj · proj[:r] + dt_bias) · Δ scale, then over the
 *      state h = exp(Δ A a_scale) h + Δ xc B, y = C · h + D xc, gated by SiLU(z).
 * The functions of one value per channel (SiLU, softplus) run as vector loops over a block of channels; the
 * state update as a vector loop over the state.
 *
 * Shapes: b sequences, d channels (d_inner), n d_state, r dt_rank, k conv width, e = r + 2n. Float32 but
 * for INT8 projections.
 *   x, z: (b, d) rows `x_stride` / `z_stride` floats apart (the two halves of in_proj's output);
 *   conv_state (rows, d, k-1) and h (rows, d, n): the sequences' rows are slots[i] (rows 0 … b-1 when slots is
 *   NULL), updated in place; conv_weight (d, k), conv_bias (d,) or NULL; x_proj (e, d), dt_proj (d, r):
 *   float32, or int8 when their row scales x_proj_scale (e,), dt_proj_scale (d,) are given; dt_bias (d,);
 *   A (d, n), negative; a_scale (b, d, n) or NULL; delta_scale (b, d) or NULL; D (d,);
 *   work: b·(d + e) floats of scratch; y (b, d) receives the gated output.
 */
#include <stdint.h>

#include "cpu_math.h"

#define BLOCK 64 /* channels per work item */

static inline float dot(const float *a, const float *b, int64_t m) {
    float acc = 0.0f;
    #pragma omp simd reduction(+ : acc)
    for (int64_t i = 0; i < m; i++)
        acc += a[i] * b[i];
    return acc;
}

/* Channels c0 … c1-1 of one sequence's convolution step before the SiLU: out = w · (window, input) + bias, and
 * the window (k-1 values per channel) shifts in the input. */
static inline void convolve(float *windows, const float *weight, const float *bias, const float *input, float *out,
                            int64_t c0, int64_t c1, int64_t k) {
    for (int64_t c = c0; c < c1; c++) {
        float *window = windows + c * (k - 1);
        const float *w = weight + c * k;
        float acc = bias ? bias[c] : 0.0f;
        for (int64_t j = 0; j < k - 1; j++)
            acc += w[j] * window[j];
        for (int64_t j = 0; j + 1 < k - 1; j++)
            window[j] = window[j + 1];
        if (k > 1)
            window[k - 2] = input[c];
        out[c] = acc + w[k - 1] * input[c];
    }
}

/* Row j of a weight (rows, m) dotted with v: float32 weights, or with `scale` int8 ones times their row's scale
 * (quant.py's INT8 weights, multiplied as torch._weight_int8pack_mm does). */
static inline float row_dot(const void *weight, const float *scale, int64_t j, const float *v, int64_t m) {
    if (!scale)
        return dot((const float *)weight + j * m, v, m);
    const int8_t *q = (const int8_t *)weight + j * m;
    float acc = 0.0f;
    #pragma omp simd reduction(+ : acc)
    for (int64_t i = 0; i < m; i++)
        acc += (float)q[i] * v[i];
    return acc * scale[j];
}

/* out[s · e + j] = row j of the weight · v[s] for the sequences s0 … min(s0 + 4, b) - 1: four sums at once, so
 * that the weight row is read once for four sequences and the sums do not wait on one another (a sequence
 * past b repeats s0's, its sum dropped). The weight as in row_dot. */
static inline void row_dots4(const void *weight, const float *scale, int64_t j, const float *v, int64_t m,
                             int64_t s0, int64_t b, float *out, int64_t e) {
    const float *v0 = v + s0 * m;
    const float *v1 = s0 + 1 < b ? v0 + m : v0, *v2 = s0 + 2 < b ? v0 + 2 * m : v0, *v3 = s0 + 3 < b ? v0 + 3 * m : v0;
    float a0 = 0.0f, a1 = 0.0f, a2 = 0.0f, a3 = 0.0f;
    if (!scale) {
        const float *w = (const float *)weight + j * m;
        #pragma omp simd reduction(+ : a0, a1, a2, a3)
        for (int64_t i = 0; i < m; i++) {
            a0 += w[i] * v0[i];
            a1 += w[i] * v1[i];
            a2 += w[i] * v2[i];
            a3 += w[i] * v3[i];
        }
    } else {
        const int8_t *q = (const int8_t *)weight + j * m;
        #pragma omp simd reduction(+ : a0, a1, a2, a3)
        for (int64_t i = 0; i < m; i++) {
            const float w = (float)q[i];
            a0 += w * v0[i];
            a1 += w * v1[i];
            a2 += w * v2[i];
            a3 += w * v3[i];
        }
        a0 *= scale[j], a1 *= scale[j], a2 *= scale[j], a3 *= scale[j];
    }
    const float sums[4] = {a0, a1, a2, a3};
    for (int64_t s = s0; s < s0 + 4 && s < b; s++)
        out[s * e + j] = sums[s - s0];
}

void mamba1_decode_f32(const float *x, int64_t x_stride, const float *z, int64_t z_stride, float *conv_state,
                       const float *conv_weight, const float *conv_bias, const void *x_proj,
                       const float *x_proj_scale, const void *dt_proj, const float *dt_proj_scale,
                       const float *dt_bias, float *h, const float *A, const float *a_scale,
                       const float *delta_scale, const float *D, const int64_t *slots, float *work, float *y,
                       int64_t b, int64_t d, int64_t n, int64_t r, int64_t k, int threads) {
    const int64_t e = r + 2 * n, blocks = (d + BLOCK - 1) / BLOCK;
    float *xc = work, *proj = work + b * d;  /* (b, d) convolved inputs, (b, e) x_proj's output */
    #pragma omp parallel num_threads(threads)
    {
        #pragma omp for collapse(2) schedule(static)
        for (int64_t s = 0; s < b; s++) {
            for (int64_t block = 0; block < blocks; block++) {
                const int64_t c0 = block * BLOCK, c1 = c0 + BLOCK < d ? c0 + BLOCK : d;
                float *row = xc + s * d;
                float *windows = conv_state + (slots ? slots[s] : s) * d * (k - 1);
                if (k == 4)  /* every Mamba's width: the window's loops unrolled */
                    convolve(windows, conv_weight, conv_bias, x + s * x_stride, row, c0, c1, 4);
                else
                    convolve(windows, conv_weight, conv_bias, x + s * x_stride, row, c0, c1, k);
                #pragma omp simd
                for (int64_t c = c0; c < c1; c++)
                    row[c] = silu(row[c]);
            }
        }
        /* row-major over x_proj: one weight row serves every sequence while it is in L1, four at a time */
        #pragma omp for collapse(2) schedule(static)
        for (int64_t j = 0; j < e; j++)
            for (int64_t s0 = 0; s0 < b; s0 += 4)
                row_dots4(x_proj, x_proj_scale, j, xc, d, s0, b, proj, e);
        #pragma omp for collapse(2) schedule(static)
        for (int64_t s = 0; s < b; s++) {
            for (int64_t block = 0; block < blocks; block++) {
                const int64_t c0 = block * BLOCK, width = c0 + BLOCK < d ? BLOCK : d - c0;
                const float *p = proj + s * e, *B = p + r, *C = p + r + n, *input = xc + s * d + c0;
                const float *zs = z + s * z_stride + c0, *scale = delta_scale ? delta_scale + s * d + c0 : 0;
                float *states = h + ((slots ? slots[s] : s) * d + c0) * n;
                float delta[BLOCK], gate[BLOCK];
                for (int64_t c = 0; c < width; c++)
                    delta[c] = row_dot(dt_proj, dt_proj_scale, c0 + c, p, r) + dt_bias[c0 + c];
                #pragma omp simd
                for (int64_t c = 0; c < width; c++) {
                    delta[c] = softplus(delta[c]) * (scale ? scale[c] : 1.0f);
                    gate[c] = silu(zs[c]);
                }
                for (int64_t c = 0; c < width; c++) {
                    const float *a = A + (c0 + c) * n, dx = delta[c] * input[c];
                    float *state = states + c * n, out = 0.0f;
                    if (a_scale) {
                        const float *as = a_scale + (s * d + c0 + c) * n;
                        #pragma omp simd reduction(+ : out)
                        for (int64_t i = 0; i < n; i++) {
                            state[i] = exp_nonpositive(delta[c] * (a[i] * as[i])) * state[i] + dx * B[i];
                            out += state[i] * C[i];
                        }
                    } else {
                        #pragma omp simd reduction(+ : out)
                        for (int64_t i = 0; i < n; i++) {
                            state[i] = exp_nonpositive(delta[c] * a[i]) * state[i] + dx * B[i];
                            out += state[i] * C[i];
                        }
                    }
                    y[s * d + c0 + c] = (out + D[c0 + c] * input[c]) * gate[c];
                }
            }
        }
    }
}

/* The residual connection and the next RMSNorm of a decode step: residual_out = residual + update (update NULL:
 * none), normed = residual_out / sqrt(mean(residual_out²) + eps) · weight. residual, update, residual_out,
 * normed: (b, m); weight (m,). Too small to share among threads. */
void add_rms_norm_f32(const float *residual, const float *update, const float *weight, float eps,
                      float *residual_out, float *normed, int64_t b, int64_t m) {
    for (int64_t s = 0; s < b; s++) {
        const float *in = residual + s * m;
        float *out = residual_out + s * m, *norm = normed + s * m;
        float squares = 0.0f;
        #pragma omp simd reduction(+ : squares)
        for (int64_t i = 0; i < m; i++) {
            out[i] = update ? in[i] + update[s * m + i] : in[i];
            squares += out[i] * out[i];
        }
        const float inverse = 1.0f / sqrtf(squares / (float)m + eps);
        #pragma omp simd
        for (int64_t i = 0; i < m; i++)
            norm[i] = out[i] * inverse * weight[i];
    }
}
