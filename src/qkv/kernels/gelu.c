/* GELU with the tanh approximation (GPT-2's and Gemma's), forward and backward, AVX2 + FMA,
 * fp32 or bf16 in and out, arithmetic in fp32:
 *
 *   y = x/2 (1 + tanh(u)),  u = sqrt(2/pi) (x + 0.044715 x^3)
 *   dy/dx = (1 + tanh(u))/2 + x/2 (1 - tanh(u)^2) sqrt(2/pi) (1 + 3 * 0.044715 x^2)
 *
 * Why: PyTorch's CPU kernel for it took 5 ms for 4.7M bf16 values (12 x 256 x 1536, GPT-2-small's
 * MLP at batch 12) forward and 5 ms backward on 2 cores, four times its erf GELU: 10% of a bf16
 * training step. tanh(u) here is 1 - 2 / (exp(2u) + 1) through the shared exp polynomial, an
 * absolute error below 2e-7.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "simd.h"

enum { F32 = 0, BF16 = 1 };
#define CHUNK 4096 /* values per OpenMP work item */

static const float K0 = 0.7978845608028654f; /* sqrt(2/pi) */
static const float K1 = 0.044715f;

/* tanh(u) = sign(u) (1 - e) / (1 + e) with e = exp(-2|u|) <= 1. */
static inline __m256 tanh8(__m256 u) {
  const __m256 sign = _mm256_and_ps(u, _mm256_set1_ps(-0.0f));
  const __m256 a = _mm256_andnot_ps(_mm256_set1_ps(-0.0f), u);
  const __m256 e = exp_nonpositive(_mm256_mul_ps(a, _mm256_set1_ps(-2.0f)));
  const __m256 one = _mm256_set1_ps(1.0f);
  const __m256 t = _mm256_div_ps(_mm256_sub_ps(one, e), _mm256_add_ps(one, e));
  return _mm256_or_ps(t, sign);
}

static inline __m256 load8(const void* p, int dtype, int64_t i) {
  return dtype == F32 ? _mm256_loadu_ps((const float*)p + i) : widen8((const uint16_t*)p + i);
}

static inline void store8(void* p, int dtype, int64_t i, __m256 v) {
  if (dtype == F32)
    _mm256_storeu_ps((float*)p + i, v);
  else
    _mm_storeu_si128((__m128i*)((uint16_t*)p + i), narrow8(v));
}

/* The last n < 8 values through an 8-lane buffer. */
static void tail_load(const void* p, int dtype, int64_t i, int64_t n, float* buf) {
  memset(buf, 0, 8 * sizeof(float));
  for (int64_t j = 0; j < n; ++j)
    buf[j] = dtype == F32 ? ((const float*)p)[i + j] : bf16_to_f32(((const uint16_t*)p)[i + j]);
}

static void tail_store(void* p, int dtype, int64_t i, int64_t n, const float* buf) {
  for (int64_t j = 0; j < n; ++j) {
    if (dtype == F32)
      ((float*)p)[i + j] = buf[j];
    else
      ((uint16_t*)p)[i + j] = f32_to_bf16(buf[j]);
  }
}

static inline __m256 gelu8(__m256 x) {
  const __m256 x2 = _mm256_mul_ps(x, x);
  const __m256 u = _mm256_mul_ps(_mm256_mul_ps(x, _mm256_set1_ps(K0)),
                                 _mm256_fmadd_ps(x2, _mm256_set1_ps(K1), _mm256_set1_ps(1.0f)));
  const __m256 half_x = _mm256_mul_ps(x, _mm256_set1_ps(0.5f));
  return _mm256_fmadd_ps(half_x, tanh8(u), half_x);
}

static inline __m256 gelu_grad8(__m256 x, __m256 g) {
  const __m256 one = _mm256_set1_ps(1.0f), half = _mm256_set1_ps(0.5f);
  const __m256 x2 = _mm256_mul_ps(x, x);
  const __m256 u = _mm256_mul_ps(_mm256_mul_ps(x, _mm256_set1_ps(K0)), _mm256_fmadd_ps(x2, _mm256_set1_ps(K1), one));
  const __m256 t = tanh8(u);
  const __m256 du = _mm256_mul_ps(_mm256_set1_ps(K0), _mm256_fmadd_ps(x2, _mm256_set1_ps(3.0f * K1), one));
  const __m256 sech2 = _mm256_fnmadd_ps(t, t, one);
  const __m256 d = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_mul_ps(half, x), sech2), du, _mm256_mul_ps(half, _mm256_add_ps(one, t)));
  return _mm256_mul_ps(g, d);
}

void qkv_gelu_tanh_fwd(const void* x, void* y, int64_t n, int dtype, int n_threads) {
#pragma omp parallel for num_threads(n_threads) schedule(static) if (n > CHUNK)
  for (int64_t c = 0; c < n; c += CHUNK) {
    const int64_t end = c + CHUNK < n ? c + CHUNK : n;
    int64_t i = c;
    for (; i + 8 <= end; i += 8) store8(y, dtype, i, gelu8(load8(x, dtype, i)));
    if (i < end) {
      float buf[8];
      tail_load(x, dtype, i, end - i, buf);
      _mm256_storeu_ps(buf, gelu8(_mm256_loadu_ps(buf)));
      tail_store(y, dtype, i, end - i, buf);
    }
  }
}

/* dx = g * gelu'(x); dx may be g itself. */
void qkv_gelu_tanh_bwd(const void* g, const void* x, void* dx, int64_t n, int dtype, int n_threads) {
#pragma omp parallel for num_threads(n_threads) schedule(static) if (n > CHUNK)
  for (int64_t c = 0; c < n; c += CHUNK) {
    const int64_t end = c + CHUNK < n ? c + CHUNK : n;
    int64_t i = c;
    for (; i + 8 <= end; i += 8) store8(dx, dtype, i, gelu_grad8(load8(x, dtype, i), load8(g, dtype, i)));
    if (i < end) {
      float bx[8], bg[8];
      tail_load(x, dtype, i, end - i, bx);
      tail_load(g, dtype, i, end - i, bg);
      _mm256_storeu_ps(bx, gelu_grad8(_mm256_loadu_ps(bx), _mm256_loadu_ps(bg)));
      tail_store(dx, dtype, i, end - i, bx);
    }
  }
}
