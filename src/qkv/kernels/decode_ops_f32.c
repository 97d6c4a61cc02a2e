/* The small per-token ops of a decode step, fp32: RMSNorm, LayerNorm and RoPE.
 *
 * Why: in decode each is a few thousand flops, so PyTorch's dispatch and its several
 * intermediate tensors (x^2, mean, rsqrt, rotate-half, cat) cost ~20-30 us a call, about
 * 3 ms of a ~20 ms step of a 100M model. One pass in C costs ~1 us. Single-threaded:
 * the work is smaller than a thread hand-off.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>

/* y[r] = x[r] / sqrt(mean(x[r]^2) + eps) * w, for n_rows rows of dim floats. */
void qkv_rms_norm_f32(const float* x, const float* w, float* y, int64_t n_rows, int64_t dim, float eps) {
  for (int64_t r = 0; r < n_rows; ++r) {
    const float* xr = x + r * dim;
    float* yr = y + r * dim;
    double ss = 0.0; /* a double accumulator: as exact as PyTorch's fp32 reduction or better */
    for (int64_t i = 0; i < dim; ++i) ss += (double)xr[i] * xr[i];
    const float inv = 1.0f / sqrtf((float)(ss / dim) + eps);
    for (int64_t i = 0; i < dim; ++i) yr[i] = xr[i] * inv * w[i];
  }
}

/* y[r] = (x[r] - mean) / sqrt(var + eps) * w + b (b may be NULL), n_rows rows of dim. */
void qkv_layer_norm_f32(const float* x, const float* w, const float* b, float* y, int64_t n_rows, int64_t dim,
                        float eps) {
  for (int64_t r = 0; r < n_rows; ++r) {
    const float* xr = x + r * dim;
    float* yr = y + r * dim;
    double sum = 0.0, ss = 0.0;
    for (int64_t i = 0; i < dim; ++i) sum += xr[i];
    const double mean = sum / dim;
    for (int64_t i = 0; i < dim; ++i) ss += (xr[i] - mean) * (xr[i] - mean);
    const float inv = 1.0f / sqrtf((float)(ss / dim) + eps), m = (float)mean;
    for (int64_t i = 0; i < dim; ++i) yr[i] = (xr[i] - m) * inv * w[i] + (b ? b[i] : 0.0f);
  }
}

/* Rotary embedding, Llama's rotate-half layout: for each of n_rows rows (token) and
 * n_heads heads of head_dim D, with half = D/2,
 *   y[:half] = x[:half] cos - x[half:] sin,   y[half:] = x[half:] cos + x[:half] sin,
 * where cos/sin (n_angle_rows, D) hold the row's angles (row r uses r % n_angle_rows,
 * so one table can serve every sequence of a batch). */
void qkv_rope_f32(const float* x, const float* cos, const float* sin, float* y, int64_t n_rows,
                  int64_t n_heads, int64_t D, int64_t n_angle_rows) {
  const int64_t half = D / 2;
  for (int64_t r = 0; r < n_rows; ++r) {
    const float* c = cos + (r % n_angle_rows) * D;
    const float* s = sin + (r % n_angle_rows) * D;
    for (int64_t h = 0; h < n_heads; ++h) {
      const float* xh = x + (r * n_heads + h) * D;
      float* yh = y + (r * n_heads + h) * D;
      for (int64_t i = 0; i < half; ++i) {
        const float a = xh[i], b = xh[i + half];
        yh[i] = a * c[i] - b * s[i];
        yh[i + half] = b * c[i + half] + a * s[i + half];
      }
    }
  }
}
