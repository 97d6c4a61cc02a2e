/* Decode attention straight from the KV cache (paged or contiguous), fp32 or int8 K/V, AVX2 + FMA.
 *
 * Why: in a decode step every sequence adds one query, and attention must read that
 * sequence's keys and values from blocks scattered through the pool. Gathering them
 * into a padded batch first (then SDPA) copies every K/V byte once more and pads short
 * sequences to the longest. Here each (sequence, KV head) task walks its own block
 * table and reads each key and value once, for all the query heads that share them
 * (GQA), with no copies and no padding: what vLLM's paged-attention kernel does.
 *
 * Per task: scores s[g][j] = scale * q[g] . k[j] for the G query heads of one KV head
 * and the visible keys j, a softmax over j, then out[g] = sum_j p[g][j] v[j].
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#include "simd.h"

/* The 8 horizontal sums of a[0..7], as one vector. */
static inline __m256 hsum8(const __m256* a) {
  __m256 s01 = _mm256_hadd_ps(a[0], a[1]), s23 = _mm256_hadd_ps(a[2], a[3]);
  __m256 s45 = _mm256_hadd_ps(a[4], a[5]), s67 = _mm256_hadd_ps(a[6], a[7]);
  __m256 s0123 = _mm256_hadd_ps(s01, s23), s4567 = _mm256_hadd_ps(s45, s67);
  /* lanes: s0123 = [0 1 2 3 | 0 1 2 3] halves of the sums, likewise s4567 */
  __m256 lo = _mm256_permute2f128_ps(s0123, s4567, 0x20), hi = _mm256_permute2f128_ps(s0123, s4567, 0x31);
  return _mm256_add_ps(lo, hi);
}

/* In place, for each of the G rows of p (n visible scores, padded to n_pad, a multiple of
 * 8, in a 32-byte aligned buffer): p = softmax(p); the padding ends up 0. */
static void softmax_rows(float* p, int64_t G, int64_t n, int64_t n_pad) {
  for (int64_t g = 0; g < G; ++g) {
    float* pg = p + g * n_pad;
    for (int64_t j = n; j < n_pad; ++j) pg[j] = -INFINITY;
    __m256 mx = _mm256_set1_ps(-INFINITY);
    for (int64_t j = 0; j < n_pad; j += 8) mx = _mm256_max_ps(mx, _mm256_load_ps(pg + j));
    mx = _mm256_max_ps(mx, _mm256_permute2f128_ps(mx, mx, 1));
    mx = _mm256_max_ps(mx, _mm256_shuffle_ps(mx, mx, 0x4E));
    mx = _mm256_max_ps(mx, _mm256_shuffle_ps(mx, mx, 0xB1));
    __m256 sum = _mm256_setzero_ps();
    for (int64_t j = 0; j < n_pad; j += 8) {
      __m256 e = exp_nonpositive(_mm256_sub_ps(_mm256_load_ps(pg + j), mx));
      e = _mm256_and_ps(e, _mm256_cmp_ps(_mm256_load_ps(pg + j), _mm256_set1_ps(-INFINITY), _CMP_NEQ_OQ));
      _mm256_store_ps(pg + j, e);
      sum = _mm256_add_ps(sum, e);
    }
    const __m256 inv = _mm256_set1_ps(1.0f / hsum(sum));
    for (int64_t j = 0; j < n_pad; j += 8) _mm256_store_ps(pg + j, _mm256_mul_ps(_mm256_load_ps(pg + j), inv));
  }
}

/* q, out: (B, H, D). Key j of row b, KV head h starts at
 *   k + tables[b * max_blocks + j / block_size] * block_stride + (j % block_size) * token_stride + h * head_stride
 * (v alike): the paged pool (num_blocks, block_size, Hkv, D) has block_stride =
 * block_size * Hkv * D, token_stride = Hkv * D, head_stride = D; a contiguous cache
 * (B, Hkv, S, D) is one "block" per row. total: (B,) keys each row sees (its new token
 * included, already written); window: keys more than window-1 behind the query are
 * hidden (0 = no window). D must be a multiple of 8. Returns 0, or -1 if out of memory. */
int qkv_decode_attention_f32(const float* q, const float* k, const float* v, const int32_t* tables,
                             int64_t max_blocks, const int32_t* total, float* out, int64_t B, int64_t H,
                             int64_t Hkv, int64_t D, int64_t block_size, int64_t block_stride,
                             int64_t token_stride, int64_t head_stride, float scale, int64_t window,
                             int n_threads) {
  const int64_t G = H / Hkv;
  int failed = 0;
#pragma omp parallel for schedule(dynamic, 1) num_threads(n_threads)
  for (int64_t task = 0; task < B * Hkv; ++task) {
    const int64_t b = task / Hkv, h = task % Hkv, S = total[b];
    const int64_t j0 = (window > 0 && S > window) ? S - window : 0, n = S - j0;
    const int32_t* table = tables + b * max_blocks;
    const float* qb = q + (b * H + h * G) * D;
    float* ob = out + (b * H + h * G) * D;
#define KEY(base, j) ((base) + table[(j) / block_size] * block_stride + ((j) % block_size) * token_stride + h * head_stride)
    const int64_t n_pad = (n + 7) & ~(int64_t)7;
    float* p = aligned_alloc(32, sizeof(float) * G * (n_pad > 0 ? n_pad : 8));
    if (!p) { failed = 1; continue; }
    /* scores, 8 keys at a time: each key is read once for the G query heads */
    int64_t jj = 0;
    for (; jj + 8 <= n; jj += 8) {
      const float* kj[8];
      for (int u = 0; u < 8; ++u) kj[u] = KEY(k, j0 + jj + u);
      for (int64_t g = 0; g < G; ++g) {
        __m256 acc[8];
        for (int u = 0; u < 8; ++u) acc[u] = _mm256_setzero_ps();
        for (int64_t d = 0; d < D; d += 8) {
          const __m256 qv = _mm256_loadu_ps(qb + g * D + d);
          for (int u = 0; u < 8; ++u) acc[u] = _mm256_fmadd_ps(qv, _mm256_loadu_ps(kj[u] + d), acc[u]);
        }
        _mm256_store_ps(p + g * n_pad + jj, _mm256_mul_ps(hsum8(acc), _mm256_set1_ps(scale)));
      }
    }
    for (; jj < n; ++jj) {
      const float* kj = KEY(k, j0 + jj);
      for (int64_t g = 0; g < G; ++g) {
        __m256 acc = _mm256_setzero_ps();
        for (int64_t d = 0; d < D; d += 8)
          acc = _mm256_fmadd_ps(_mm256_loadu_ps(qb + g * D + d), _mm256_loadu_ps(kj + d), acc);
        p[g * n_pad + jj] = hsum(acc) * scale;
      }
    }
    softmax_rows(p, G, n, n_pad);
    /* out = p v, 64 dims (8 registers) at a time: each value row is read once per head */
    for (int64_t g = 0; g < G; ++g) {
      const float* pg = p + g * n_pad;
      for (int64_t d0 = 0; d0 < D; d0 += 64) {
        if (D - d0 >= 64) {
          __m256 acc[8];
          for (int c = 0; c < 8; ++c) acc[c] = _mm256_setzero_ps();
          for (int64_t j = 0; j < n; ++j) {
            const float* vj = KEY(v, j0 + j) + d0;
            const __m256 pj = _mm256_set1_ps(pg[j]);
            for (int c = 0; c < 8; ++c) acc[c] = _mm256_fmadd_ps(pj, _mm256_loadu_ps(vj + 8 * c), acc[c]);
          }
          for (int c = 0; c < 8; ++c) _mm256_storeu_ps(ob + g * D + d0 + 8 * c, acc[c]);
        } else {
          for (int64_t d = d0; d < D; d += 8) {
            __m256 acc = _mm256_setzero_ps();
            for (int64_t j = 0; j < n; ++j)
              acc = _mm256_fmadd_ps(_mm256_set1_ps(pg[j]), _mm256_loadu_ps(KEY(v, j0 + j) + d), acc);
            _mm256_storeu_ps(ob + g * D + d, acc);
          }
        }
      }
    }
#undef KEY
    free(p);
  }
  return failed ? -1 : 0;
}

/* One key or value vector of D floats into the int8 cache format (infer/kv_quant.py's
 * `quantize`, bitwise: the fused decode block writes what the PyTorch path writes):
 * scale = max|x| / 127, q = x * (1 / scale) rounded half to even (the default rounding
 * mode of nearbyintf, as torch.round) and clamped to +-127; an all-zero vector gets scale 0. */
static void qkv_quantize_kv_vector(const float* x, int8_t* q, float* scale, int64_t D) {
  float amax = 0.0f;
  for (int64_t d = 0; d < D; ++d) amax = fmaxf(amax, fabsf(x[d]));
  const float s = amax / 127.0f, inv = s > 0.0f ? 1.0f / s : 0.0f;
  for (int64_t d = 0; d < D; ++d) q[d] = (int8_t)fminf(fmaxf(nearbyintf(x[d] * inv), -127.0f), 127.0f);
  *scale = s;
}

/* n vectors of D floats (x: (n, D)) into int8s q (n, D) and scales (n,): what the fused
 * decode block writes, callable alone so the tests hold its rounding to kv_quant.quantize. */
void qkv_quantize_kv_f32(const float* x, int8_t* q, float* scale, int64_t n, int64_t D) {
  for (int64_t i = 0; i < n; ++i) qkv_quantize_kv_vector(x + i * D, q + i * D, scale + i, D);
}

/* 8 int8 values widened to fp32. */
static inline __m256 load8_i8(const int8_t* x) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)x)));
}

/* The same attention over an int8 cache: each key and value vector of D int8s has one fp32
 * scale (vector = scale * int8s), stored in k_scale / v_scale at the vector's element offset
 * divided by D (the scales have the cache's layout without the head_dim axis). Reads a
 * quarter of the bytes of the fp32 kernel, plus 4 bytes a vector. Same arguments otherwise.
 *
 * Each int8 key and value is widened to fp32 once per task, into a small scratch that the G
 * query heads sharing it then read (widening inside the per-head loops cost G times the
 * conversions, which made a GQA decode step compute-bound). Widening is exact, and each
 * output is the same sequence of FMAs as the per-head loops, so the results are unchanged. */
enum { Q8_ROWS = 32 }; /* value rows widened at a time */

int qkv_decode_attention_q8(const float* q, const int8_t* k, const int8_t* v, const float* k_scale,
                            const float* v_scale, const int32_t* tables, int64_t max_blocks, const int32_t* total,
                            float* out, int64_t B, int64_t H, int64_t Hkv, int64_t D, int64_t block_size,
                            int64_t block_stride, int64_t token_stride, int64_t head_stride, float scale,
                            int64_t window, int n_threads) {
  const int64_t G = H / Hkv;
  int failed = 0;
#pragma omp parallel for schedule(dynamic, 1) num_threads(n_threads)
  for (int64_t task = 0; task < B * Hkv; ++task) {
    const int64_t b = task / Hkv, h = task % Hkv, S = total[b];
    const int64_t j0 = (window > 0 && S > window) ? S - window : 0, n = S - j0;
    const int32_t* table = tables + b * max_blocks;
    const float* qb = q + (b * H + h * G) * D;
    float* ob = out + (b * H + h * G) * D;
#define OFFSET(j) (table[(j) / block_size] * block_stride + ((j) % block_size) * token_stride + h * head_stride)
    const int64_t n_pad = (n + 7) & ~(int64_t)7;
    const int64_t p_len = G * (n_pad > 0 ? n_pad : 8);
    /* scores, then the widened rows: 8 keys, or Q8_ROWS values (D is a multiple of 8) */
    float* p = aligned_alloc(32, sizeof(float) * (p_len + Q8_ROWS * D));
    if (!p) { failed = 1; continue; }
    float* wide = p + p_len;
    for (int64_t jj = 0; jj < n; jj += 8) {
      const int m = n - jj < 8 ? (int)(n - jj) : 8;
      float ks[8] = {0};
      for (int u = 0; u < 8; ++u) {
        const int64_t off = OFFSET(j0 + jj + (u < m ? u : 0));
        for (int64_t d = 0; d < D; d += 8) _mm256_store_ps(wide + u * D + d, load8_i8(k + off + d));
        if (u < m) ks[u] = k_scale[off / D] * scale;
      }
      for (int64_t g = 0; g < G; ++g) {
        __m256 acc[8];
        for (int u = 0; u < 8; ++u) acc[u] = _mm256_setzero_ps();
        for (int64_t d = 0; d < D; d += 8) {
          const __m256 qv = _mm256_loadu_ps(qb + g * D + d);
          for (int u = 0; u < 8; ++u) acc[u] = _mm256_fmadd_ps(qv, _mm256_load_ps(wide + u * D + d), acc[u]);
        }
        float s[8];
        _mm256_storeu_ps(s, _mm256_mul_ps(hsum8(acc), _mm256_loadu_ps(ks)));
        for (int u = 0; u < m; ++u) p[g * n_pad + jj + u] = s[u];
      }
    }
    softmax_rows(p, G, n, n_pad);
    /* out = p v, Q8_ROWS value rows at a time; the sums carry over in out between them */
    for (int64_t i = 0; i < G * D; ++i) ob[i] = 0.0f;
    for (int64_t jb = 0; jb < n; jb += Q8_ROWS) {
      const int rows = n - jb < Q8_ROWS ? (int)(n - jb) : Q8_ROWS;
      float vs[Q8_ROWS];
      for (int r = 0; r < rows; ++r) {
        const int64_t off = OFFSET(j0 + jb + r);
        for (int64_t d = 0; d < D; d += 8) _mm256_store_ps(wide + r * D + d, load8_i8(v + off + d));
        vs[r] = v_scale[off / D];
      }
      for (int64_t g = 0; g < G; ++g) {
        const float* pg = p + g * n_pad + jb;
        for (int64_t d0 = 0; d0 < D; d0 += 64) {
          const int chunks = D - d0 >= 64 ? 8 : (int)((D - d0) / 8);
          __m256 acc[8];
          for (int c = 0; c < chunks; ++c) acc[c] = _mm256_loadu_ps(ob + g * D + d0 + 8 * c);
          for (int r = 0; r < rows; ++r) {
            const __m256 pj = _mm256_set1_ps(pg[r] * vs[r]);
            for (int c = 0; c < chunks; ++c)
              acc[c] = _mm256_fmadd_ps(pj, _mm256_load_ps(wide + r * D + d0 + 8 * c), acc[c]);
          }
          for (int c = 0; c < chunks; ++c) _mm256_storeu_ps(ob + g * D + d0 + 8 * c, acc[c]);
        }
      }
    }
#undef OFFSET
    free(p);
  }
  return failed ? -1 : 0;
}
