/* y = x W^T + b for fp32 on x86 CPUs with AVX2 + FMA (AVX-512 where the CPU has it), for the
 * few rows of a decode step or a short prompt.
 *
 * Why: a decode step multiplies one (or a few) rows by every weight matrix, so it is a
 * stream over the weights. Each output is a dot product of one contiguous weight row
 * with x; we keep a tile of such dot products in vector registers so each weight vector
 * loaded from memory is used by every row of the tile and each x vector by every output
 * of it. The weights stay in PyTorch's (out, in) row-major layout: no repacking, no copies.
 *
 * AVX2 tiles are 4 rows x 3 outputs (1 x 8 below 4 rows) in 16 registers. AVX-512 has 32
 * registers of twice the width: tiles of 4 rows x 6 outputs (1 or 2 x 8 below 3 rows) load a
 * vector per 2.4 multiplies instead of per 1.7, which is what holds the few-row products
 * below the machine's GEMM rate. The CPU is asked once which to use.
 *
 * Every output is summed in the same order (8 or 16 lanes over `in`, then the lanes)
 * whatever the number of rows or the tile it falls in, so a request's logits are bitwise
 * the same alone or in a batch (on one machine: the two paths round differently).
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

/* A call's outputs are cut into tiles of `cols` outputs of one matrix, numbered across the
 * matrices; first_tile[m] is matrix m's first. Returns the number of tiles. */
static int64_t plan_tiles(int n_mats, const int64_t* n_out, int64_t cols, int64_t* first_tile) {
  first_tile[0] = 0;
  for (int m = 0; m < n_mats; ++m) first_tile[m + 1] = first_tile[m] + (n_out[m] + cols - 1) / cols;
  return first_tile[n_mats];
}

/* Tile t: its weight rows, bias, outputs (row 0's; row r's are r * N further), how many outputs
 * it has (cols, or fewer at a matrix's end) and N, its matrix's output count. */
typedef struct {
  const float* w;
  const float* b;
  float* y;
  int64_t n, N;
} out_tile;

static inline out_tile find_tile(int64_t t, int64_t n_in, const float* const* w, const float* const* bias,
                                 float* const* y, const int64_t* n_out, const int64_t* first_tile, int64_t cols) {
  int m = 0;
  while (t >= first_tile[m + 1]) ++m;
  const int64_t o = (t - first_tile[m]) * cols, N = n_out[m];
  out_tile T = {w[m] + o * n_in, bias[m] ? bias[m] + o : 0, y[m] + o, N - o < cols ? N - o : cols, N};
  return T;
}

/* The AVX2 path of qkv_linear_f32 (below). */
static void linear_f32_avx2(const float* x, int64_t n_rows, int64_t n_in, int n_mats, const float* const* w,
                            const float* const* bias, float* const* y, const int64_t* n_out, int n_threads) {
  int32_t lanes[8];
  for (int k = 0; k < 8; ++k) lanes[k] = (k < (n_in & 7)) ? -1 : 0;
  const __m256i tail_mask = _mm256_loadu_si256((const __m256i*)lanes);
  const int64_t cols = n_rows >= ROWS ? COLS : WIDE;
  int64_t first_tile[9];
  const int64_t n_tiles = plan_tiles(n_mats, n_out, cols, first_tile);
#pragma omp parallel for schedule(static) num_threads(n_threads)
  for (int64_t t = 0; t < n_tiles; ++t) {
    const out_tile T = find_tile(t, n_in, w, bias, y, n_out, first_tile, cols);
    if (T.n < cols) { /* the matrix's last few outputs, one at a time */
      for (int64_t c = 0; c < T.n; ++c)
        for (int64_t r = 0; r < n_rows; ++r)
          tile(x + r * n_in, 1, T.w + c * n_in, 1, n_in, T.b ? T.b + c : 0, T.y + r * T.N + c, T.N, tail_mask);
    } else if (cols == WIDE) {
      for (int64_t r = 0; r < n_rows; ++r) tile(x + r * n_in, 1, T.w, WIDE, n_in, T.b, T.y + r * T.N, T.N, tail_mask);
    } else {
      int64_t r = 0;
      for (; r + ROWS <= n_rows; r += ROWS)
        tile(x + r * n_in, ROWS, T.w, COLS, n_in, T.b, T.y + r * T.N, T.N, tail_mask);
      for (; r < n_rows; ++r) tile(x + r * n_in, 1, T.w, COLS, n_in, T.b, T.y + r * T.N, T.N, tail_mask);
    }
  }
}

/* ---- AVX-512 ---- */

#define F32_AVX512 __attribute__((target("avx2,fma,avx512f")))
#define ROWS16 4 /* x rows per tile */
#define COLS16 6 /* outputs per 4-row tile: 24 accumulators of 32 registers */
#define WIDE16 8 /* outputs per tile of 1 or 2 rows, read one weight row after another: one
                    sequential stream. Interleaving the 8 rows (8 streams of 36-96 cache lines)
                    read 16-20 GB/s of an AMD EPYC's 26-33 where the sequential order read 26-32 */

/* The sum of 16 lanes: the two halves added, then hsum's order. */
F32_AVX512 static inline float hsum16(__m512 v) {
  return hsum(_mm256_add_ps(_mm512_castps512_ps256(v), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1))));
}

F32_AVX512 static inline __attribute__((always_inline)) void tile16(const float* x, int64_t nr, const float* w,
                                                                    int64_t nc, int64_t n_in, const float* bias,
                                                                    float* y, int64_t n_out, __mmask16 tail) {
  __m512 acc[ROWS16][WIDE16];
  for (int r = 0; r < nr; ++r)
    for (int c = 0; c < nc; ++c) acc[r][c] = _mm512_setzero_ps();
  const int64_t n16 = n_in & ~(int64_t)15;
  for (int64_t i = 0; i < n16; i += 16) {
    __m512 wv[WIDE16];
    for (int c = 0; c < nc; ++c) wv[c] = _mm512_loadu_ps(w + c * n_in + i);
    /* ask for the weights ahead: with up to 8 rows streaming, the hardware prefetcher alone
     * leaves a tile's first pass waiting on memory (+5-30% at 2-16 rows, 512 bytes ahead). A
     * lone weight row (decode's 1-2 rows read one weight row after another, one stream) goes
     * 2 KB ahead: +11-16% read bandwidth over 512 bytes on an AMD EPYC, median of 21 passes
     * over SmolLM2-135M's matrices, where 1-3 KB measured alike */
    const int64_t ahead = nc == 1 ? 512 : 128;
    for (int c = 0; c < nc; ++c) _mm_prefetch((const char*)(w + c * n_in + i + ahead), _MM_HINT_T0);
    for (int r = 0; r < nr; ++r) {
      const __m512 xv = _mm512_loadu_ps(x + r * n_in + i);
      for (int c = 0; c < nc; ++c) acc[r][c] = _mm512_fmadd_ps(wv[c], xv, acc[r][c]);
    }
  }
  if (n16 < n_in) { /* the last partial vector, masked: same order as a full one */
    __m512 wv[WIDE16];
    for (int c = 0; c < nc; ++c) wv[c] = _mm512_maskz_loadu_ps(tail, w + c * n_in + n16);
    for (int r = 0; r < nr; ++r) {
      const __m512 xv = _mm512_maskz_loadu_ps(tail, x + r * n_in + n16);
      for (int c = 0; c < nc; ++c) acc[r][c] = _mm512_fmadd_ps(wv[c], xv, acc[r][c]);
    }
  }
  for (int r = 0; r < nr; ++r)
    for (int c = 0; c < nc; ++c) y[r * n_out + c] = hsum16(acc[r][c]) + (bias ? bias[c] : 0.0f);
}

/* Tile t of the call (see linear_f32_avx512), all rows. Its own function: the OpenMP body
 * does not inherit a target attribute. */
F32_AVX512 static void tile16_all_rows(const float* x, int64_t n_rows, int64_t n_in, const out_tile T, int64_t cols) {
  const __mmask16 tail = (__mmask16)((1u << (n_in & 15)) - 1u);
  if (T.n < cols) { /* the matrix's last few outputs, one at a time */
    for (int64_t c = 0; c < T.n; ++c)
      for (int64_t r = 0; r < n_rows; ++r)
        tile16(x + r * n_in, 1, T.w + c * n_in, 1, n_in, T.b ? T.b + c : 0, T.y + r * T.N + c, T.N, tail);
  } else if (cols == WIDE16) { /* 1 or 2 rows: the tile's weight rows one after another */
    for (int64_t c = 0; c < WIDE16; ++c) {
      const float* b = T.b ? T.b + c : 0;
      if (n_rows == 2) tile16(x, 2, T.w + c * n_in, 1, n_in, b, T.y + c, T.N, tail);
      else tile16(x, 1, T.w + c * n_in, 1, n_in, b, T.y + c, T.N, tail);
    }
  } else {
    int64_t r = 0;
    for (; r + ROWS16 <= n_rows; r += ROWS16)
      tile16(x + r * n_in, ROWS16, T.w, COLS16, n_in, T.b, T.y + r * T.N, T.N, tail);
    switch (n_rows - r) { /* the last 1-3 rows in one tile: constant sizes, so it unrolls */
      case 3: tile16(x + r * n_in, 3, T.w, COLS16, n_in, T.b, T.y + r * T.N, T.N, tail); break;
      case 2: tile16(x + r * n_in, 2, T.w, COLS16, n_in, T.b, T.y + r * T.N, T.N, tail); break;
      case 1: tile16(x + r * n_in, 1, T.w, COLS16, n_in, T.b, T.y + r * T.N, T.N, tail); break;
    }
  }
}

static void linear_f32_avx512(const float* x, int64_t n_rows, int64_t n_in, int n_mats, const float* const* w,
                              const float* const* bias, float* const* y, const int64_t* n_out, int n_threads) {
  const int64_t cols = n_rows >= 3 ? COLS16 : WIDE16;
  int64_t first_tile[9];
  const int64_t n_tiles = plan_tiles(n_mats, n_out, cols, first_tile);
#pragma omp parallel for schedule(static) num_threads(n_threads)
  for (int64_t t = 0; t < n_tiles; ++t)
    tile16_all_rows(x, n_rows, n_in, find_tile(t, n_in, w, bias, y, n_out, first_tile, cols), cols);
}

/* 2: AVX-512, 1: AVX2 (what the library is built for). Asked of the CPU once; tests may
 * pin the AVX2 path with qkv_linear_f32_set_isa to check it on an AVX-512 machine. */
static int f32_isa = 0;

static int linear_f32_isa(void) {
  if (f32_isa == 0) { /* threads may race here, to the same value */
    __builtin_cpu_init();
    f32_isa = __builtin_cpu_supports("avx512f") ? 2 : 1;
  }
  return f32_isa;
}

int qkv_linear_f32_isa(void) { return linear_f32_isa(); }

void qkv_linear_f32_set_isa(int isa) { f32_isa = isa == 2 && __builtin_cpu_supports("avx512f") ? 2 : 1; }

/* For each of n_mats matrices m: y[m] = x w[m]^T + bias[m], with x: (n_rows, n_in),
 * w[m]: (n_out[m], n_in), bias[m]: (n_out[m],) or NULL, y[m]: (n_rows, n_out[m]); all
 * contiguous. Several matrices that read the same x (q/k/v, gate/up) go in one call:
 * one parallel region, the threads split all their outputs, and no weight is copied.
 * Threads split the outputs, so each reads its share of the weights once. */
void qkv_linear_f32(const float* x, int64_t n_rows, int64_t n_in, int n_mats, const float* const* w,
                    const float* const* bias, float* const* y, const int64_t* n_out, int n_threads) {
  if (linear_f32_isa() == 2) linear_f32_avx512(x, n_rows, n_in, n_mats, w, bias, y, n_out, n_threads);
  else linear_f32_avx2(x, n_rows, n_in, n_mats, w, bias, y, n_out, n_threads);
}
