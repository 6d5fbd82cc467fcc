/* Branch-free float maths shared by the CPU kernels (cpu_scan.c, cpu_decode.c), inlined so that the loops
 * calling it vectorise. */
#ifndef CPU_MATH_H
#define CPU_MATH_H

#include <math.h>
#include <stdint.h>

/* exp(x) for x <= 0 (Δ >= 0, A < 0: a decay), branch-free so that the loop over the state vectorises:
 * 2^k · p(r) with x = k ln2 + r, |r| <= ln2 / 2, p the degree-6 Taylor polynomial (relative error below
 * 2e-7). k is rounded by adding 1.5 · 2^23 (its low bits then hold k) and 2^k applied by adding k to p's
 * exponent field. x is clamped at -87 (k >= -126), so that a decay too small for a float gives about 1e-38,
 * not garbage from an exponent field out of range. */
static inline float exp_nonpositive(float x) {
    const float log2e = 1.44269504088896341f, ln2_hi = 0.693359375f, ln2_lo = -2.12194440e-4f;
    const float shifter = 12582912.0f;  /* 1.5 · 2^23 */
    x = x < -87.0f ? -87.0f : x;
    union { float value; int32_t bits; } rounded = {x * log2e + shifter}, p;
    const float k = rounded.value - shifter;
    const float r = x - k * ln2_hi - k * ln2_lo;
    p.value = 1.0f + r * (1.0f + r * (0.5f + r * (1.0f / 6 + r * (1.0f / 24 + r * (1.0f / 120 + r * (1.0f / 720))))));
    p.bits += (int32_t)((uint32_t)rounded.bits << 23);  /* the shift keeps k's low bits: + k · 2^23 */
    return p.value;
}

/* log(1 + u) for u in [0, 1]: 2 atanh(t) with t = u / (2 + u) in [0, 1/3], its odd series to t^13 (relative
 * error below 2e-8), exact for small u as log1pf is. */
static inline float log1p_unit(float u) {
    const float t = u / (2.0f + u), t2 = t * t;
    const float odd = 1.0f / 7 + t2 * (1.0f / 9 + t2 * (1.0f / 11 + t2 * (1.0f / 13)));  /* t^6/7 onwards */
    return 2.0f * t * (1.0f + t2 * (1.0f / 3 + t2 * (1.0f / 5 + t2 * odd)));
}

/* softplus(v) = log(1 + e^v) = max(v, 0) + log(1 + e^-|v|); above 20 PyTorch's is v itself, which this equals
 * in float32 */
static inline float softplus(float v) {
    return (v > 0.0f ? v : 0.0f) + log1p_unit(exp_nonpositive(-fabsf(v)));
}

/* v · sigmoid(v), with e^-|v| only (no overflow for any v) */
static inline float silu(float v) {
    const float e = exp_nonpositive(-fabsf(v)), inverse = 1.0f / (1.0f + e);
    return v * (v >= 0.0f ? inverse : e * inverse);
}

#endif
