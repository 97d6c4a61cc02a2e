/* y = x W^T + b for fp32 on x86 CPUs with AVX2 + FMA, for the few rows of a decode step.
 *
 * Why: a decode step multiplies one (or a few) rows by every weight matrix, so it is a
 * stream over the weights. Each output is a dot product of one contiguous weight row
 * with x; we keep a tile of 4 x 3 (or 1 x 8) such dot products in AVX registers so each
 * weight vector loaded from memory is used ROWS times and each x vector COLS times.
 * The weights stay in PyTorch's (out, in) row-major layout: no repacking, no copies.
 *
 * Every output is summed in the same order (8 lanes over `in`, then the lanes) whatever
 * the number of rows or the tile it falls in, so a request's logits are bitwise the
 * same alone or in a batch.
 */
#include <immintrin.h>
#include <stdint.h>

#include "simd.h"

#define ROWS 4 /* x rows per tile */
#define COLS 3 /* outputs (weight rows) per 4-row tile: 12 accumulators */
#define WIDE 8 /* outputs per tile when there are fewer than 4 rows: 8 weight streams
                  in flight reach the memory bandwidth (3 reach ~80% of it) */

/* nr x nc dot products; nr, nc are constants at each call site so the loops unroll
 * and the accumulators live in registers. */
static inline __attribute__((always_inline)) void tile(
    const float* x, int64_t nr, const float* w, int64_t nc, int64_t n_in,
    const float* bias, float* y, int64_t n_out, __m256i tail_mask) {
  __m256 acc[ROWS][WIDE];
  for (int r = 0; r < nr; ++r)
    for (int c = 0; c < nc; ++c) acc[r][c] = _mm256_setzero_ps();
  const int64_t n8 = n_in & ~(int64_t)7;
  for (int64_t i = 0; i < n8; i += 8) {
    __m256 wv[WIDE];
    for (int c = 0; c < nc; ++c) wv[c] = _mm256_loadu_ps(w + c * n_in + i);
    for (int r = 0; r < nr; ++r) {
      __m256 xv = _mm256_loadu_ps(x + r * n_in + i);
      for (int c = 0; c < nc; ++c) acc[r][c] = _mm256_fmadd_ps(wv[c], xv, acc[r][c]);
    }
  }
  if (n8 < n_in) { /* the last partial vector, masked: same order as a full one */
    __m256 wv[WIDE];
    for (int c = 0; c < nc; ++c) wv[c] = _mm256_maskload_ps(w + c * n_in + n8, tail_mask);
    for (int r = 0; r < nr; ++r) {
      __m256 xv = _mm256_maskload_ps(x + r * n_in + n8, tail_mask);
      for (int c = 0; c < nc; ++c) acc[r][c] = _mm256_fmadd_ps(wv[c], xv, acc[r][c]);
    }
  }
  for (int r = 0; r < nr; ++r)
    for (int c = 0; c < nc; ++c) y[r * n_out + c] = hsum(acc[r][c]) + (bias ? bias[c] : 0.0f);
}

/* For each of n_mats matrices m: y[m] = x w[m]^T + bias[m], with x: (n_rows, n_in),
 * w[m]: (n_out[m], n_in), bias[m]: (n_out[m],) or NULL, y[m]: (n_rows, n_out[m]); all
 * contiguous. Several matrices that read the same x (q/k/v, gate/up) go in one call:
 * one parallel region, the threads split all their outputs, and no weight is copied.
 * Threads split the outputs, so each reads its share of the weights once. */
void qkv_linear_f32(const float* x, int64_t n_rows, int64_t n_in, int n_mats,
                    const float* const* w, const float* const* bias, float* const* y,
                    const int64_t* n_out, int n_threads) {
  int32_t lanes[8];
  for (int k = 0; k < 8; ++k) lanes[k] = (k < (n_in & 7)) ? -1 : 0;
  const __m256i tail_mask = _mm256_loadu_si256((const __m256i*)lanes);
  const int64_t cols = n_rows >= ROWS ? COLS : WIDE;
  int64_t first_tile[9] = {0}; /* tile t belongs to matrix m when first_tile[m] <= t < first_tile[m+1] */
  for (int m = 0; m < n_mats; ++m) first_tile[m + 1] = first_tile[m] + (n_out[m] + cols - 1) / cols;
#pragma omp parallel for schedule(static) num_threads(n_threads)
  for (int64_t t = 0; t < first_tile[n_mats]; ++t) {
    int m = 0;
    while (t >= first_tile[m + 1]) ++m;
    const int64_t o = (t - first_tile[m]) * cols, N = n_out[m];
    const float* wo = w[m] + o * n_in;
    const float* bo = bias[m] ? bias[m] + o : 0;
    float* yo = y[m] + o;
    if (o + cols > N) { /* the matrix's last few outputs, one at a time */
      for (int64_t c = 0; c < N - o; ++c)
        for (int64_t r = 0; r < n_rows; ++r)
          tile(x + r * n_in, 1, wo + c * n_in, 1, n_in, bo ? bo + c : 0, yo + r * N + c, N, tail_mask);
    } else if (cols == WIDE) {
      for (int64_t r = 0; r < n_rows; ++r)
        tile(x + r * n_in, 1, wo, WIDE, n_in, bo, yo + r * N, N, tail_mask);
    } else {
      int64_t r = 0;
      for (; r + ROWS <= n_rows; r += ROWS)
        tile(x + r * n_in, ROWS, wo, COLS, n_in, bo, yo + r * N, N, tail_mask);
      for (; r < n_rows; ++r)
        tile(x + r * n_in, 1, wo, COLS, n_in, bo, yo + r * N, N, tail_mask);
    }
  }
}
