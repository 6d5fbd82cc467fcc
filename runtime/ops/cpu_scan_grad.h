/* The body of cpu_scan_grad.c, included once per precision: REAL (float or double), EXP (an exponential of
 * a non-positive argument) and NAME(f) (f with the precision's suffix) are defined by the includer. No
 * include guard: each inclusion defines the functions of one precision.
 *
 * Channels are split among the threads by `omp for schedule(static) nowait` in every chunk: the same loop
 * bounds under a static schedule give each thread the same channels every time (OpenMP guarantees it), so a
 * channel's chunks run in order on one thread and no barrier is needed between chunks (on a CPU shared with
 * other processes a barrier waits for a descheduled thread).
 *
 * Shapes as in cpu_scan.c: delta, x, y, dy, d_delta, d_x (b, l, d); A, h, dh, dA (b, d, n); B, C, dB, dC
 * (b, l, n); saved (b, chunks, d, n), the state entering each chunk of CHUNK tokens, chunks = ceil(l / CHUNK).
 */

/* One channel over tokens [t0, t1) from the state in states[0 .. n): writes the state after token t into
 * states[(t - t0 + 1) n ..] and exp(Δ_t A) into decays[(t - t0) n ..] when `decays` is not NULL, and y_t into
 * y when `y` is not NULL. `stride` is d: the distance between a channel's consecutive tokens in delta, x, y. */
static inline void NAME(advance)(const REAL *delta, const REAL *x, const REAL *a, const REAL *B, const REAL *C,
                                 REAL *states, REAL *decays, REAL *y, int64_t t0, int64_t t1, int64_t stride,
                                 int64_t n) {
    for (int64_t t = t0; t < t1; t++) {
        const REAL dt = delta[t * stride], dtx = dt * x[t * stride];
        const REAL *bt = B + t * n, *ct = C + t * n, *before = states + (t - t0) * n;
        REAL *after = states + (t - t0 + 1) * n, *decay = decays == NULL ? NULL : decays + (t - t0) * n;
        REAL out = 0;
        #pragma omp simd reduction(+ : out)
        for (int64_t i = 0; i < n; i++) {
            const REAL e = EXP(dt * a[i]);
            if (decay != NULL) decay[i] = e;
            after[i] = e * before[i] + dtx * bt[i];
            out += after[i] * ct[i];
        }
        if (y != NULL) y[t * stride] = out;
    }
}

/* The scan of cpu_scan.c (y without the D skip and gate; h: initial state in, last state out) that also
 * writes the state entering every chunk into `saved`, what the backward pass restarts from. */
void NAME(mamba1_scan_save)(const REAL *delta, const REAL *x, const REAL *A, const REAL *B, const REAL *C,
                            REAL *h, REAL *y, REAL *saved, int64_t b, int64_t l, int64_t d, int64_t n, int threads) {
    const int64_t chunks = (l + CHUNK - 1) / CHUNK;
    #pragma omp parallel num_threads(threads)
    {
        REAL *states = malloc((CHUNK + 1) * n * sizeof(REAL));  /* a channel's states over one chunk */
        for (int64_t s = 0; s < b; s++) {
            for (int64_t k = 0; k < chunks; k++) {
                const int64_t t0 = k * CHUNK, t1 = t0 + CHUNK < l ? t0 + CHUNK : l;
                #pragma omp for schedule(static) nowait
                for (int64_t c = 0; c < d; c++) {
                    REAL *state = h + (s * d + c) * n;
                    memcpy(saved + ((s * chunks + k) * d + c) * n, state, n * sizeof(REAL));
                    memcpy(states, state, n * sizeof(REAL));
                    NAME(advance)(delta + s * l * d + c, x + s * l * d + c, A + (s * d + c) * n, B + s * l * n,
                                  C + s * l * n, states, NULL, y + s * l * d + c, t0, t1, d, n);
                    memcpy(state, states + (t1 - t0) * n, n * sizeof(REAL));
                }
            }
        }
        free(states);
    }
}

/* The gradients of the scan's y and last state, given dy and dh (the last state's gradient, in; overwritten
 * with the initial state's). For each chunk, last first, every channel recomputes its CHUNK states and decays
 * from `saved` into per-thread scratch, then walks them backwards carrying g = ∂L/∂h_t:
 *     g_t = g_t+1-carried + dy_t C_t,  ∂L/∂(Δ_t x_t) = Σ g_t B_t,  dB_t += Δ_t x_t g_t,  dC_t += dy_t h_t,
 *     with e = exp(Δ_t A): ∂L/∂e = g_t h_t-1, dΔ_t += Σ ∂L/∂e · e · A, dA += ∂L/∂e · e · Δ_t, carried g = e g_t.
 * dB and dC sum over channels, which the threads share: each thread sums its channels' share of a chunk's
 * rows in its scratch and adds it in once per chunk. dB, dC must be zero on entry; every other output is
 * written whole. */
void NAME(mamba1_scan_backward)(const REAL *delta, const REAL *x, const REAL *A, const REAL *B, const REAL *C,
                                const REAL *saved, const REAL *dy, REAL *dh, REAL *d_delta, REAL *d_x, REAL *dA,
                                REAL *dB, REAL *dC, int64_t b, int64_t l, int64_t d, int64_t n, int threads) {
    const int64_t chunks = (l + CHUNK - 1) / CHUNK;
    #pragma omp parallel num_threads(threads)
    {
        /* states (CHUNK + 1) n, decays CHUNK n, this thread's dB and dC rows CHUNK n each */
        REAL *states = malloc((4 * CHUNK + 1) * n * sizeof(REAL));
        REAL *decays = states + (CHUNK + 1) * n, *dB_rows = decays + CHUNK * n, *dC_rows = dB_rows + CHUNK * n;
        for (int64_t s = 0; s < b; s++) {
            const REAL *delta_s = delta + s * l * d, *x_s = x + s * l * d, *dy_s = dy + s * l * d;
            const REAL *B_s = B + s * l * n, *C_s = C + s * l * n;
            for (int64_t k = chunks - 1; k >= 0; k--) {
                const int64_t t0 = k * CHUNK, t1 = t0 + CHUNK < l ? t0 + CHUNK : l;
                memset(dB_rows, 0, 2 * CHUNK * n * sizeof(REAL));
                #pragma omp for schedule(static) nowait
                for (int64_t c = 0; c < d; c++) {
                    const REAL *a = A + (s * d + c) * n;
                    REAL *g = dh + (s * d + c) * n, *da = dA + (s * d + c) * n;
                    if (k == chunks - 1) memset(da, 0, n * sizeof(REAL));
                    memcpy(states, saved + ((s * chunks + k) * d + c) * n, n * sizeof(REAL));
                    NAME(advance)(delta_s + c, x_s + c, a, B_s, C_s, states, decays, NULL, t0, t1, d, n);
                    for (int64_t t = t1 - 1; t >= t0; t--) {
                        const int64_t at = t * d + c;
                        const REAL dt = delta_s[at], dtx = dt * x_s[at], dyt = dy_s[at];
                        const REAL *bt = B_s + t * n, *ct = C_s + t * n, *e = decays + (t - t0) * n;
                        const REAL *before = states + (t - t0) * n, *after = before + n;
                        REAL *db = dB_rows + (t - t0) * n, *dc = dC_rows + (t - t0) * n;
                        REAL d_dtx = 0, d_dt = 0;
                        #pragma omp simd reduction(+ : d_dtx, d_dt)
                        for (int64_t i = 0; i < n; i++) {
                            const REAL gt = g[i] + dyt * ct[i];
                            const REAL de = gt * before[i] * e[i];  /* ∂L/∂(Δ_t A_i) */
                            dc[i] += dyt * after[i];
                            db[i] += dtx * gt;
                            d_dtx += gt * bt[i];
                            d_dt += de * a[i];
                            da[i] += de * dt;
                            g[i] = gt * e[i];
                        }
                        d_delta[s * l * d + at] = d_dt + d_dtx * x_s[at];
                        d_x[s * l * d + at] = d_dtx * dt;
                    }
                }
                #pragma omp critical
                for (int64_t i = 0; i < (t1 - t0) * n; i++) {
                    dB[(s * l + t0) * n + i] += dB_rows[i];
                    dC[(s * l + t0) * n + i] += dC_rows[i];
                }
            }
        }
        free(states);
    }
}
