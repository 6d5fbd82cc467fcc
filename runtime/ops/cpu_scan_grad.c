/* The Mamba1 selective scan on CPU with its backward pass, for calibration by back-propagation
 * (runtime/ops/cpu_scan_grad.py registers them as an autograd function).
 *
 * PyTorch's autograd over the blocked scan (torch_ops) keeps several (b, l, d, n) intermediates for the
 * backward pass; here the forward pass keeps only the state entering each chunk of CHUNK tokens, (b, l/CHUNK,
 * d, n), and the backward pass recomputes a chunk's states from it into per-thread scratch that stays in cache,
 * then walks the chunk backwards. Channels are shared among OpenMP threads as in cpu_scan.c (torch's team).
 *
 * Built for float32 (calibration) and float64 (gradcheck), from one body (cpu_scan_grad.h). All arrays
 * contiguous, of the precision the suffix names.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_math.h"

#define CHUNK 64 /* tokens a channel's states are recomputed for at once: CHUNK * n values per thread */

#define REAL float
#define EXP exp_nonpositive
#define NAME(f) f##_f32
#include "cpu_scan_grad.h"
#undef REAL
#undef EXP
#undef NAME

#define REAL double
#define EXP exp
#define NAME(f) f##_f64
#include "cpu_scan_grad.h"
