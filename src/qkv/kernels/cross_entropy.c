/* Cross-entropy of bf16 logits, one pass per row, AVX2 + FMA: the softmax step of the fused
 * linear + cross-entropy loss (model/loss.py) when training under bf16 autocast.
 *
 * Why: in PyTorch ops a chunk's step is four passes over its logits (widen to fp32,
 * log-softmax, exp, narrow the gradient to bf16), each reading and writing the whole chunk.
 * Here each row is widened once into a buffer that stays in L1/L2, and the loss
 * (logsumexp - x[target]) and the gradient (softmax - one_hot, rounded to bf16) come out of
 * it; the gradient may overwrite the logits (same size, the row is buffered first).
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#include "simd.h"

/* One row of v logits x: *loss = logsumexp(x) - x[t] and, when g is not NULL,
 * g = softmax(x) - one_hot(t) in bf16; an invalid row (valid = 0) gets loss 0 and g = 0.
 * buf: v floats of scratch, 32-byte aligned. */
static void ce_row(const uint16_t* x, int64_t v, int64_t t, int valid, float* buf, float* loss, uint16_t* g) {
  const int64_t v8 = v & ~(int64_t)7;
  __m256 mx = _mm256_set1_ps(-INFINITY);
  for (int64_t j = 0; j < v8; j += 8) {
    const __m256 xv = widen8(x + j);
    _mm256_store_ps(buf + j, xv);
    mx = _mm256_max_ps(mx, xv);
  }
  float m = hmax(mx);
  for (int64_t j = v8; j < v; ++j) buf[j] = bf16_to_f32(x[j]), m = fmaxf(m, buf[j]);
  const float xt = buf[t];
  const __m256 mv = _mm256_set1_ps(m);
  __m256 sv = _mm256_setzero_ps();
  for (int64_t j = 0; j < v8; j += 8) {
    const __m256 e = exp_nonpositive(_mm256_sub_ps(_mm256_load_ps(buf + j), mv));
    _mm256_store_ps(buf + j, e);
    sv = _mm256_add_ps(sv, e);
  }
  float sum = hsum(sv);
  for (int64_t j = v8; j < v; ++j) buf[j] = expf(buf[j] - m), sum += buf[j];
  *loss = valid ? m + logf(sum) - xt : 0.0f;
  if (!g) return;
  const float inv = valid ? 1.0f / sum : 0.0f;
  const __m256 iv = _mm256_set1_ps(inv);
  for (int64_t j = 0; j < v8; j += 8)
    _mm_storeu_si128((__m128i*)(g + j), narrow8(_mm256_mul_ps(_mm256_load_ps(buf + j), iv)));
  for (int64_t j = v8; j < v; ++j) g[j] = f32_to_bf16(buf[j] * inv);
  if (valid) g[t] = f32_to_bf16(buf[t] * inv - 1.0f);
}

/* For each of the n rows of logits (n, v) bf16: loss[r] as ce_row says and, when grad is not
 * NULL, the row's gradient into grad (n, v) bf16, which may be the logits themselves.
 * targets: n int64; valid: n bytes (0 or 1). Returns 0, 1 if a valid row's target is
 * outside [0, v), 2 if scratch memory could not be had. Rows are independent: the result
 * does not depend on n_threads. */
int qkv_cross_entropy_bf16(const uint16_t* logits, int64_t n, int64_t v, const int64_t* targets,
                           const uint8_t* valid, float* loss, uint16_t* grad, int n_threads) {
  for (int64_t r = 0; r < n; ++r)
    if (valid[r] && (targets[r] < 0 || targets[r] >= v)) return 1;
  int failed = 0;
  const size_t buf_bytes = (size_t)((v + 7) & ~(int64_t)7) * sizeof(float);
#pragma omp parallel num_threads(n_threads) if (n > 1)
  {
    float* buf = (float*)aligned_alloc(32, buf_bytes);
    if (!buf) {
#pragma omp atomic write
      failed = 1;
    }
#pragma omp for schedule(static)
    for (int64_t r = 0; r < n; ++r) {
      if (!buf) continue;
      const int ok = valid[r] != 0;
      ce_row(logits + r * v, v, ok ? targets[r] : 0, ok, buf, loss + r, grad ? grad + r * v : 0);
    }
    free(buf);
  }
  return failed ? 2 : 0;
}
