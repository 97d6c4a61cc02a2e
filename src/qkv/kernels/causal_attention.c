/* Causal self-attention for training, forward and backward, AVX2 + FMA, all arithmetic in
 * fp32 whether q/k/v are fp32 or bf16 (bf16 is widened on load, results rounded on store).
 *
 * Why: torch's CPU flash-attention kernel, which SDPA picks for training, runs its backward
 * at ~40 GFLOP/s on the small blocks a 256-token context gives (a GPT-2-small-like model spent
 * ~30% of a bf16 training step there). Here one (batch, head) at a time keeps its K and V,
 * widened to fp32, in L2, and every product is one register-tiled loop (six rows by sixteen
 * columns), skipping the keys a tile's rows cannot see.
 *
 * Layouts: q (B, H, T, D), k and v (B, Hkv, S, D) with any strides but a contiguous last
 * axis (given in elements as {batch, head, position}); query i sits at position S - T + i and
 * sees keys 0 .. S - T + i. H is a multiple of Hkv (grouped-query attention: query head h
 * reads K/V head h / (H / Hkv)). Outputs are written contiguous in the projections' layout:
 * o and dq (B, T, H, D), dk and dv (B, S, Hkv, D), lse (B, H, T) fp32.
 *
 * Forward: o = softmax(scale q kᵀ) v, with each row's log-sum-exp kept for the backward.
 * Backward (recomputing the probabilities p from lse): dv = pᵀ do, dp = do vᵀ,
 * ds = scale p (dp - rowsum(p * dp)), dq = ds k, dk = dsᵀ q. (rowsum(p * dp) equals
 * rowsum(do * o), which flash kernels use, but needs no o: a bf16 o would carry its rounding
 * into every gradient.)
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "simd.h"

enum { F32 = 0, BF16 = 1 };

#define TILE_ROWS 6
#define BLOCK_ROWS 32 /* query rows per backward block (dk/dv accumulate over them) */

static inline int64_t round16(int64_t n) { return (n + 15) & ~(int64_t)15; }
static inline int64_t clamp(int64_t x, int64_t lo, int64_t hi) { return x < lo ? lo : x > hi ? hi : x; }

/* n elements at src + offset (fp32 or bf16) as fp32. */
static void load_f32(const void* src, int dtype, int64_t offset, int64_t n, float* dst) {
  if (dtype == F32) {
    memcpy(dst, (const float*)src + offset, (size_t)n * sizeof(float));
    return;
  }
  const uint16_t* s = (const uint16_t*)src + offset;
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(dst + i, widen8(s + i));
  for (; i < n; ++i) dst[i] = bf16_to_f32(s[i]);
}

static void store_f32(const float* src, int64_t n, int dtype, void* dst, int64_t offset) {
  if (dtype == F32) {
    memcpy((float*)dst + offset, src, (size_t)n * sizeof(float));
    return;
  }
  uint16_t* d = (uint16_t*)dst + offset;
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm_storeu_si128((__m128i*)(d + i), narrow8(_mm256_loadu_ps(src + i)));
  for (; i < n; ++i) d[i] = f32_to_bf16(src[i]);
}

/* C[r][c] (+)= sum_k A[r*ar + k*ak] * M[k*ms + c] for r < R (R <= TILE_ROWS), c < n (a
 * multiple of 8): R rows of A broadcast against 16 (then 8) columns of M at a time. */
static inline __attribute__((always_inline)) void tile(const int R, int64_t n, int64_t kn, const float* A, int64_t ar,
                                                       int64_t ak, const float* M, int64_t ms, float* C, int64_t cs,
                                                       int accumulate) {
  int64_t c = 0;
  for (; c + 16 <= n; c += 16) {
    __m256 acc[TILE_ROWS][2];
    for (int r = 0; r < R; ++r) {
      acc[r][0] = accumulate ? _mm256_loadu_ps(C + r * cs + c) : _mm256_setzero_ps();
      acc[r][1] = accumulate ? _mm256_loadu_ps(C + r * cs + c + 8) : _mm256_setzero_ps();
    }
    for (int64_t k = 0; k < kn; ++k) {
      const __m256 m0 = _mm256_loadu_ps(M + k * ms + c), m1 = _mm256_loadu_ps(M + k * ms + c + 8);
      for (int r = 0; r < R; ++r) {
        const __m256 a = _mm256_broadcast_ss(A + r * ar + k * ak);
        acc[r][0] = _mm256_fmadd_ps(a, m0, acc[r][0]);
        acc[r][1] = _mm256_fmadd_ps(a, m1, acc[r][1]);
      }
    }
    for (int r = 0; r < R; ++r) {
      _mm256_storeu_ps(C + r * cs + c, acc[r][0]);
      _mm256_storeu_ps(C + r * cs + c + 8, acc[r][1]);
    }
  }
  if (c < n) { /* the last 8 columns */
    __m256 acc[TILE_ROWS];
    for (int r = 0; r < R; ++r) acc[r] = accumulate ? _mm256_loadu_ps(C + r * cs + c) : _mm256_setzero_ps();
    for (int64_t k = 0; k < kn; ++k) {
      const __m256 m0 = _mm256_loadu_ps(M + k * ms + c);
      for (int r = 0; r < R; ++r) acc[r] = _mm256_fmadd_ps(_mm256_broadcast_ss(A + r * ar + k * ak), m0, acc[r]);
    }
    for (int r = 0; r < R; ++r) _mm256_storeu_ps(C + r * cs + c, acc[r]);
  }
}

/* The same for any number of rows: tiles of TILE_ROWS, then the remainder. */
static void matmul(int64_t rows, int64_t n, int64_t kn, const float* A, int64_t ar, int64_t ak, const float* M,
                   int64_t ms, float* C, int64_t cs, int accumulate) {
  int64_t r = 0;
  for (; r + TILE_ROWS <= rows; r += TILE_ROWS)
    tile(TILE_ROWS, n, kn, A + r * ar, ar, ak, M, ms, C + r * cs, cs, accumulate);
  const float* a = A + r * ar;
  float* c = C + r * cs;
  switch (rows - r) {
    case 5: tile(5, n, kn, a, ar, ak, M, ms, c, cs, accumulate); break;
    case 4: tile(4, n, kn, a, ar, ak, M, ms, c, cs, accumulate); break;
    case 3: tile(3, n, kn, a, ar, ak, M, ms, c, cs, accumulate); break;
    case 2: tile(2, n, kn, a, ar, ak, M, ms, c, cs, accumulate); break;
    case 1: tile(1, n, kn, a, ar, ak, M, ms, c, cs, accumulate); break;
    default: break;
  }
}

/* dst[i][j] = src[j][i] for an 8 x 8 block (row strides ss, ds). */
static inline void transpose8(const float* src, int64_t ss, float* dst, int64_t ds) {
  __m256 r[8], t[8];
  for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(src + i * ss);
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    r[i] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    r[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    r[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    r[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int i = 0; i < 4; ++i) {
    _mm256_storeu_ps(dst + i * ds, _mm256_permute2f128_ps(r[i], r[i + 4], 0x20));
    _mm256_storeu_ps(dst + (i + 4) * ds, _mm256_permute2f128_ps(r[i], r[i + 4], 0x31));
  }
}

/* n rows of D values at base + j * stride (fp32 or bf16) as fp32 rows of dst, the rows a few
 * ahead prefetched: they sit a whole (position) stride apart in the projections' layout. */
static void load_rows(const void* x, int dtype, int64_t base, int64_t stride, int64_t n, int64_t D, float* dst) {
  const int64_t bytes = dtype == F32 ? 4 : 2;
  for (int64_t j = 0; j < n; ++j) {
    if (j + 4 < n) {
      const char* ahead = (const char*)x + (base + (j + 4) * stride) * bytes;
      for (int64_t c = 0; c < D * bytes; c += 64) _mm_prefetch(ahead + c, _MM_HINT_T0);
    }
    load_f32(x, dtype, base + j * stride, D, dst + j * D);
  }
}

/* One (batch, kv head)'s K or V rows widened: row-major (S, D) into rm and, when tr is not
 * NULL, transposed (D, S16), zero past S, into tr. */
static void widen_kv(const void* x, int dtype, int64_t base, int64_t stride, int64_t S, int64_t D, float* rm, float* tr) {
  const int64_t S16 = round16(S);
  load_rows(x, dtype, base, stride, S, D, rm);
  if (!tr) return;
  int64_t j = 0;
  for (; j + 8 <= S; j += 8)
    for (int64_t d = 0; d < D; d += 8) transpose8(rm + j * D + d, D, tr + d * S16 + j, S16);
  for (; j < S; ++j)
    for (int64_t d = 0; d < D; ++d) tr[d * S16 + j] = rm[j * D + d];
  for (int64_t d = 0; d < D; ++d)
    for (j = S; j < S16; ++j) tr[d * S16 + j] = 0.0f;
}

static void* alloc_floats(int64_t n) { return aligned_alloc(32, (size_t)round16(n) * sizeof(float)); }

/* Returns 0, or 2 when scratch memory could not be had. */
int qkv_causal_attention_fwd(const void* q, const void* k, const void* v, int dtype, int64_t B, int64_t H,
                             int64_t Hkv, int64_t T, int64_t S, int64_t D, const int64_t* qs, const int64_t* ks,
                             const int64_t* vs, float scale, void* o, float* lse, int n_threads) {
  const int64_t G = H / Hkv, S16 = round16(S), off = S - T;
  int failed = 0;
#pragma omp parallel num_threads(n_threads)
  {
    float* kf = alloc_floats(S * D);   /* K: (S, D) */
    float* kt = alloc_floats(D * S16); /* K transposed: (D, S16) */
    float* vf = alloc_floats(S * D);   /* V: (S, D) */
    float* qb = alloc_floats(TILE_ROWS * D);
    float* p = alloc_floats(TILE_ROWS * S16); /* scores, then probabilities */
    float* ob = alloc_floats(TILE_ROWS * D);
    const int ok = kf && kt && vf && qb && p && ob;
    if (!ok) {
#pragma omp atomic write
      failed = 1;
    }
#pragma omp for schedule(dynamic)
    for (int64_t item = 0; item < B * H; ++item) {
      if (!ok) continue;
      const int64_t b = item / H, h = item % H, hk = h / G;
      widen_kv(k, dtype, b * ks[0] + hk * ks[1], ks[2], S, D, kf, kt);
      widen_kv(v, dtype, b * vs[0] + hk * vs[1], vs[2], S, D, vf, NULL);
      for (int64_t i0 = 0; i0 < T; i0 += TILE_ROWS) {
        const int64_t R = T - i0 < TILE_ROWS ? T - i0 : TILE_ROWS;
        const int64_t kend = clamp(off + i0 + R, 0, S); /* keys the tile's last row sees */
        float inv_sum[TILE_ROWS];
        load_rows(q, dtype, b * qs[0] + h * qs[1] + i0 * qs[2], qs[2], R, D, qb);
        matmul(R, round16(kend), D, qb, D, 1, kt, S16, p, S16, 0);
        for (int64_t r = 0; r < R; ++r) {
          float* pr = p + r * S16;
          const int64_t n = clamp(off + i0 + r + 1, 0, S); /* keys this row sees */
          /* scale and max, then exp and sum; the 1 / sum goes on the output row, not on p */
          const __m256 sc = _mm256_set1_ps(scale);
          __m256 mx = _mm256_set1_ps(-INFINITY);
          int64_t j = 0;
          for (; j + 8 <= n; j += 8) {
            const __m256 x = _mm256_mul_ps(_mm256_loadu_ps(pr + j), sc);
            _mm256_storeu_ps(pr + j, x);
            mx = _mm256_max_ps(mx, x);
          }
          float m = hmax(mx);
          for (; j < n; ++j) pr[j] *= scale, m = pr[j] > m ? pr[j] : m;
          const __m256 mv = _mm256_set1_ps(m);
          __m256 sv = _mm256_setzero_ps();
          for (j = 0; j + 8 <= n; j += 8) {
            const __m256 e = exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(pr + j), mv));
            _mm256_storeu_ps(pr + j, e);
            sv = _mm256_add_ps(sv, e);
          }
          float sum = hsum(sv);
          for (; j < n; ++j) pr[j] = expf(pr[j] - m), sum += pr[j];
          for (; j < kend; ++j) pr[j] = 0.0f;
          inv_sum[r] = n ? 1.0f / sum : 0.0f;
          lse[(b * H + h) * T + i0 + r] = n ? m + logf(sum) : INFINITY; /* a row that sees nothing: p = 0 */
        }
        matmul(R, D, kend, p, S16, 1, vf, D, ob, D, 0);
        for (int64_t r = 0; r < R; ++r) {
          for (int64_t d = 0; d < D; ++d) ob[r * D + d] *= inv_sum[r];
          store_f32(ob + r * D, D, dtype, o, ((b * T + i0 + r) * H + h) * D);
        }
      }
    }
    free(kf), free(kt), free(vf), free(qb), free(p), free(ob);
  }
  return failed ? 2 : 0;
}

int qkv_causal_attention_bwd(const void* q, const void* k, const void* v, const void* dout, int dtype,
                             int64_t B, int64_t H, int64_t Hkv, int64_t T, int64_t S, int64_t D, const int64_t* qs,
                             const int64_t* ks, const int64_t* vs, const int64_t* dos, const float* lse, float scale,
                             void* dq, void* dk, void* dv, int n_threads) {
  const int64_t G = H / Hkv, S16 = round16(S), off = S - T;
  int failed = 0;
#pragma omp parallel num_threads(n_threads)
  {
    float* kf = alloc_floats(S * D);  /* K: (S, D) */
    float* kt = alloc_floats(D * S16); /* K transposed */
    float* vt = alloc_floats(D * S16); /* V transposed */
    float* dk_acc = alloc_floats(S * D);
    float* dv_acc = alloc_floats(S * D);
    float* qb = alloc_floats(BLOCK_ROWS * D);
    float* dob = alloc_floats(BLOCK_ROWS * D);
    float* dqb = alloc_floats(BLOCK_ROWS * D);
    float* p = alloc_floats(BLOCK_ROWS * S16);
    float* ds = alloc_floats(BLOCK_ROWS * S16);
    const int ok = kf && kt && vt && dk_acc && dv_acc && qb && dob && dqb && p && ds;
    if (!ok) {
#pragma omp atomic write
      failed = 1;
    }
#pragma omp for schedule(dynamic)
    for (int64_t item = 0; item < B * Hkv; ++item) {
      if (!ok) continue;
      const int64_t b = item / Hkv, hk = item % Hkv;
      widen_kv(k, dtype, b * ks[0] + hk * ks[1], ks[2], S, D, kf, kt);
      widen_kv(v, dtype, b * vs[0] + hk * vs[1], vs[2], S, D, dv_acc, vt); /* dv_acc: scratch until zeroed */
      memset(dk_acc, 0, (size_t)(S * D) * sizeof(float));
      memset(dv_acc, 0, (size_t)(S * D) * sizeof(float));
      for (int64_t h = hk * G; h < (hk + 1) * G; ++h) {
        for (int64_t i0 = 0; i0 < T; i0 += BLOCK_ROWS) {
          const int64_t R = T - i0 < BLOCK_ROWS ? T - i0 : BLOCK_ROWS;
          const int64_t kend = clamp(off + i0 + R, 0, S); /* keys the block's last row sees */
          load_rows(q, dtype, b * qs[0] + h * qs[1] + i0 * qs[2], qs[2], R, D, qb);
          load_rows(dout, dtype, b * dos[0] + h * dos[1] + i0 * dos[2], dos[2], R, D, dob);
          for (int64_t t0 = 0; t0 < R; t0 += TILE_ROWS) {
            const int64_t Rt = R - t0 < TILE_ROWS ? R - t0 : TILE_ROWS;
            const int64_t tend = clamp(off + i0 + t0 + Rt, 0, S);
            matmul(Rt, round16(tend), D, qb + t0 * D, D, 1, kt, S16, p + t0 * S16, S16, 0);  /* scores */
            matmul(Rt, round16(tend), D, dob + t0 * D, D, 1, vt, S16, ds + t0 * S16, S16, 0); /* dp */
            for (int64_t r = t0; r < t0 + Rt; ++r) {
              float *pr = p + r * S16, *dr = ds + r * S16;
              const int64_t n = clamp(off + i0 + r + 1, 0, S);
              const float l = lse[(b * H + h) * T + i0 + r];
              const __m256 lv = _mm256_set1_ps(l), sc = _mm256_set1_ps(scale);
              /* p from the scores and lse; rowsum(p * dp), which is rowsum(do * o) for the
               * exact o (the stored o is rounded to the input dtype) */
              __m256 acc = _mm256_setzero_ps();
              int64_t j = 0;
              for (; j + 8 <= n; j += 8) {
                const __m256 pv = exp_nonpositive(_mm256_fmsub_ps(_mm256_loadu_ps(pr + j), sc, lv));
                _mm256_storeu_ps(pr + j, pv);
                acc = _mm256_fmadd_ps(pv, _mm256_loadu_ps(dr + j), acc);
              }
              float dsum = hsum(acc);
              for (; j < n; ++j) pr[j] = expf(fminf(pr[j] * scale - l, 0.0f)), dsum += pr[j] * dr[j];
              const __m256 dv8 = _mm256_set1_ps(dsum);
              for (j = 0; j + 8 <= n; j += 8)
                _mm256_storeu_ps(dr + j, _mm256_mul_ps(sc, _mm256_mul_ps(_mm256_loadu_ps(pr + j),
                                                                         _mm256_sub_ps(_mm256_loadu_ps(dr + j), dv8))));
              for (; j < n; ++j) dr[j] = scale * pr[j] * (dr[j] - dsum);
              for (; j < round16(kend); ++j) pr[j] = 0.0f, dr[j] = 0.0f;
            }
            matmul(Rt, D, tend, ds + t0 * S16, S16, 1, kf, D, dqb + t0 * D, D, 0); /* dq = ds k */
          }
          for (int64_t r = 0; r < R; ++r) store_f32(dqb + r * D, D, dtype, dq, ((b * T + i0 + r) * H + h) * D);
          matmul(kend, D, R, ds, 1, S16, qb, D, dk_acc, D, 1); /* dk += dsᵀ q */
          matmul(kend, D, R, p, 1, S16, dob, D, dv_acc, D, 1); /* dv += pᵀ do */
        }
      }
      for (int64_t j = 0; j < S; ++j) {
        store_f32(dk_acc + j * D, D, dtype, dk, ((b * S + j) * Hkv + hk) * D);
        store_f32(dv_acc + j * D, D, dtype, dv, ((b * S + j) * Hkv + hk) * D);
      }
    }
    free(kf), free(kt), free(vt), free(dk_acc), free(dv_acc), free(qb), free(dob), free(dqb), free(p), free(ds);
  }
  return failed ? 2 : 0;
}
