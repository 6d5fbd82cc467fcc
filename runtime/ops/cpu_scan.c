/* Mamba1 selective scan on CPU, without autograd: h_t = exp(Δ_t A) h_t-1 + Δ_t x_t B_t, y_t = C_t · h_t.
 *
 * Compiled at first use by runtime/ops/cpu_scan.py (cc -O3 -march=native -fopenmp). The PyTorch scan keeps
 * (tokens, d, n) intermediates and passes over them about a dozen times, so at d_state 48 it is bound by
 * memory traffic; here a channel's state (n floats) stays in cache while the tokens stream past once, a chunk
 * at a time so that the chunk's B and C rows stay in cache for all the channels, and the loop over the state
 * is vectorised. The channels are shared among `threads` OpenMP threads: the library links libgomp.so.1,
 * which is torch's own copy once torch is loaded, so the kernel uses the calling thread's OpenMP team as
 * torch's operators do (a second pool of threads would contend with that team's spinning workers: measured
 * 25 s against 15 s for a 60k-token prompt's first token through the server on 2 cores).
 *
 * All arrays are float32, contiguous: delta, x, y (b, l, d); A, h (b, d, n); B, C (b, l, n). h holds the
 * initial state and receives the last one. y receives the scan's output without the D skip and the gate.
 */
#include <stdint.h>

#include "cpu_math.h"

#define CHUNK 64 /* tokens whose B and C rows (CHUNK * n floats each) stay in L1/L2 for every channel */

void mamba1_scan_f32(const float *delta, const float *x, const float *A, const float *B, const float *C,
                     float *h, float *y, int64_t b, int64_t l, int64_t d, int64_t n, int threads) {
    #pragma omp parallel num_threads(threads)
    for (int64_t s = 0; s < b; s++) {
        for (int64_t t0 = 0; t0 < l; t0 += CHUNK) {
            const int64_t t1 = t0 + CHUNK < l ? t0 + CHUNK : l;
            #pragma omp for schedule(static)
            for (int64_t c = 0; c < d; c++) {
                const float *a = A + (s * d + c) * n;
                float *state = h + (s * d + c) * n;
                for (int64_t t = t0; t < t1; t++) {
                    const int64_t at = (s * l + t) * d + c;
                    const float dt = delta[at], dtx = dt * x[at];
                    const float *bt = B + (s * l + t) * n, *ct = C + (s * l + t) * n;
                    float out = 0.0f;
                    #pragma omp simd reduction(+ : out)
                    for (int64_t i = 0; i < n; i++) {
                        state[i] = exp_nonpositive(dt * a[i]) * state[i] + dtx * bt[i];
                        out += state[i] * ct[i];
                    }
                    y[at] = out;
                }
            }
        }
    }
}
