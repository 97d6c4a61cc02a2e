/* One whole transformer block of a decode step in one call (fp32, AVX2 + FMA):
 *
 *   x += post_norm(o_proj(attention(rope(qk_norm(q_proj(n))), rope(qk_norm(k_proj(n))), v_proj(n))))
 *                                                                        n = norm(x)
 *   x += post_norm(down_proj(silu(gate_proj(n)) * up_proj(n)))           n = norm(x)
 *     or down_proj(gelu(gate_proj(n)) * up_proj(n))                      (GeGLU, Gemma)
 *     or down_proj(gelu(up_proj(n)))                                     (GPT-2)
 *
 * with norm = RMSNorm or LayerNorm; qk_norm (an RMSNorm over each head) and the two
 * post-norms (Gemma's "sandwich") apply where their weights are given (not NULL).
 *
 * Why: at one token per sequence the arithmetic of a block is a stream over its weights,
 * but run op by op from Python a Llama block of ~20 small ops costs ~0.4 ms of dispatch
 * and allocation on this CPU, a third of a 100M model's step. Here the same ops run
 * back to back on scratch buffers: the linear, attention and norm/RoPE kernels of this
 * directory, unchanged (they are #included), so the numbers match the op-by-op path.
 * The K/V cache is fp32, or int8 with one scale per vector (infer/kv_quant.py): the new
 * rows are quantized as the PyTorch path quantizes them and attention reads the int8
 * cache in place (qkv_decode_attention_q8).
 * The Python model stays the reference (qkv/model); qkv/infer/fused_decode.py decides
 * when a model and cache fit this path.
 */
#include <string.h>

#include "linear_f32.c"
#include "decode_attention_f32.c"
#include "decode_ops_f32.c"
#include "quant_linear.c"

enum { RMS_NORM = 0, LAYER_NORM = 1 };
enum { SWIGLU = 0, GELU_TANH = 1, GELU_ERF = 2, GEGLU_TANH = 3, GEGLU_ERF = 4 };

typedef struct {
  int64_t d_model, n_head, n_kv_head, head_dim, d_ff;
  float eps, scale;
  int64_t window; /* sliding window (0 = none) */
  int64_t norm, mlp; /* the enums above */
  const float *attn_norm, *attn_norm_b;
  const void *wq, *wk, *wv;
  const float *bq, *bk, *bv;
  const void* wo;
  const float *bo, *mlp_norm, *mlp_norm_b;
  const void *w_gate, *w_up, *w_down;
  const float *b_gate, *b_up, *b_down;
  /* each projection's storage: 0 = fp32 (PyTorch's (out, in) layout), else the gguf
   * GGMLQuantizationType of its rows of blocks (quant_linear.c) */
  int64_t t_q, t_k, t_v, t_o, t_gate, t_up, t_down;
  /* optional (NULL = absent): RMSNorm weights over each q / k head (head_dim), and the
   * norms of the attention's and the MLP's outputs before their residual adds */
  const float *q_norm, *k_norm;
  const float *post_attn_norm, *post_attn_norm_b, *post_mlp_norm, *post_mlp_norm_b;
} qkv_block;

typedef struct { /* one layer's K/V, addressed like qkv_decode_attention_f32's */
  void *k, *v; /* fp32, or int8 when the scales are given */
  float *k_scale, *v_scale; /* int8 caches: one scale per vector, at its element offset / head_dim; else NULL */
  const int32_t* tables;
  int64_t max_blocks;
  const int32_t* total; /* (B,) keys each row sees, its new token included */
  int64_t block_size, block_stride, token_stride, head_stride;
} qkv_kv;

/* silu(g) * u, in place into g. sigmoid(g) = 1 / (1 + e^-g) = e^g / (1 + e^g): use the
 * form whose exponent is <= 0 so exp never overflows. */
static void silu_mul(float* g, const float* u, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 gv = _mm256_loadu_ps(g + i);
    const __m256 e = exp_nonpositive(_mm256_sub_ps(_mm256_setzero_ps(), _mm256_andnot_ps(_mm256_set1_ps(-0.0f), gv)));
    const __m256 one = _mm256_set1_ps(1.0f), inv = _mm256_div_ps(one, _mm256_add_ps(one, e));
    const __m256 sig = _mm256_blendv_ps(inv, _mm256_mul_ps(e, inv), gv); /* sign bit of g picks e/(1+e) */
    _mm256_storeu_ps(g + i, _mm256_mul_ps(_mm256_mul_ps(gv, sig), _mm256_loadu_ps(u + i)));
  }
  for (; i < n; ++i) g[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
}

/* GELU in place: x * Phi(x), with Phi exact (erf) or the tanh approximation GPT-2 uses;
 * tanh(y) = (1 - e^-2|y|) / (1 + e^-2|y|) with the sign of y, so exp never overflows. */
static void gelu(float* x, int64_t n, int exact) {
  if (exact) {
    for (int64_t i = 0; i < n; ++i) x[i] = 0.5f * x[i] * (1.0f + erff(x[i] * 0.70710678118654752f));
    return;
  }
  int64_t i = 0;
  const __m256 sign = _mm256_set1_ps(-0.0f), one = _mm256_set1_ps(1.0f), half = _mm256_set1_ps(0.5f);
  for (; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i);
    const __m256 y = _mm256_mul_ps(_mm256_set1_ps(0.7978845608028654f),
                                   _mm256_fmadd_ps(_mm256_mul_ps(_mm256_set1_ps(0.044715f), v), _mm256_mul_ps(v, v), v));
    const __m256 e = exp_nonpositive(_mm256_mul_ps(_mm256_set1_ps(-2.0f), _mm256_andnot_ps(sign, y)));
    const __m256 t = _mm256_or_ps(_mm256_div_ps(_mm256_sub_ps(one, e), _mm256_add_ps(one, e)), _mm256_and_ps(sign, y));
    _mm256_storeu_ps(x + i, _mm256_mul_ps(_mm256_mul_ps(half, v), _mm256_add_ps(one, t)));
  }
  for (; i < n; ++i) x[i] = 0.5f * x[i] * (1.0f + tanhf(0.7978845608028654f * (x[i] + 0.044715f * x[i] * x[i] * x[i])));
}

static void norm(const qkv_block* L, const float* x, const float* w, const float* b, float* y, int64_t B) {
  if (L->norm == LAYER_NORM) qkv_layer_norm_f32(x, w, b, y, B, L->d_model, L->eps);
  else qkv_rms_norm_f32(x, w, y, B, L->d_model, L->eps);
}

static void linear1(const float* x, int64_t rows, int64_t n_in, const float* w, const float* b, float* y,
                    int64_t n_out, int n_threads) {
  qkv_linear_f32(x, rows, n_in, 1, &w, &b, &y, &n_out, n_threads);
}

/* y = x W^T + b for one projection, fp32 or quantized; 0 or an error code. */
static int project(const float* x, int64_t B, int64_t n_in, const void* w, int64_t type, const float* b, float* y,
                   int64_t n_out, int n_threads) {
  if (type == 0) {
    linear1(x, B, n_in, (const float*)w, b, y, n_out, n_threads);
    return 0;
  }
  return qkv_quant_linear(x, B, n_in, w, (int)type, n_out, b, y, n_threads);
}

/* Several projections of the same x: one call when all are fp32 or all one repacked format. */
static int project_many(const float* x, int64_t B, int64_t n_in, int n, const void* const* w, const int64_t* type,
                        const float* const* b, float* const* y, const int64_t* n_out, int n_threads) {
  int all_f32 = 1;
  for (int i = 0; i < n; ++i) all_f32 &= type[i] == 0;
  if (all_f32) {
    qkv_linear_f32(x, B, n_in, n, (const float* const*)w, b, y, n_out, n_threads);
    return 0;
  }
  int same_type = 1; /* one repacked format: one parallel region (qkv_quant_linear_many) */
  for (int i = 1; i < n; ++i) same_type &= type[i] == type[0];
  if (same_type && qkv_quant_linear_many(x, B, n_in, n, w, (int)type[0], n_out, b, y, n_threads) == QL_OK) return 0;
  for (int i = 0; i < n; ++i) {
    const int rc = project(x, B, n_in, w[i], type[i], b[i], y[i], n_out[i], n_threads);
    if (rc) return rc;
  }
  return 0;
}

/* x: (B, d_model) residual stream, updated in place; cos/sin: (B, head_dim) angles at
 * each row's position, or NULL (no RoPE). The new K/V go to position total[b] - 1.
 * Returns 0, or -1 if out of memory (or a quantized projection refused its shape or type,
 * which the Python side checks first). */
int qkv_decode_block_f32(const qkv_block* L, const qkv_kv* kv, float* x, int64_t B, const float* cos,
                         const float* sin, int n_threads) {
  const int64_t d = L->d_model, H = L->n_head, Hkv = L->n_kv_head, D = L->head_dim, F = L->d_ff;
  const int64_t q_n = H * D, kv_n = Hkv * D;
  float* buf = malloc(sizeof(float) * B * (d + 2 * q_n + 2 * kv_n + 2 * F + q_n));
  if (!buf) return -1;
  float *n = buf, *q = n + B * d, *k = q + B * q_n, *v = k + B * kv_n, *qr = v + B * kv_n, *att = qr + B * q_n;
  float *gate = att + B * q_n, *up = gate + B * F;

  norm(L, x, L->attn_norm, L->attn_norm_b, n, B);
  {
    const void* w[3] = {L->wq, L->wk, L->wv};
    const int64_t t[3] = {L->t_q, L->t_k, L->t_v};
    const float* b[3] = {L->bq, L->bk, L->bv};
    float* y[3] = {q, k, v};
    const int64_t n_out[3] = {q_n, kv_n, kv_n};
    if (project_many(n, B, d, 3, w, t, b, y, n_out, n_threads)) goto fail;
  }
  /* rms_norm reduces a row before it writes it, so it may run in place */
  if (L->q_norm) qkv_rms_norm_f32(q, L->q_norm, q, B * H, D, L->eps);
  if (L->k_norm) qkv_rms_norm_f32(k, L->k_norm, k, B * Hkv, D, L->eps);
  if (cos) { /* rotate q into qr and k in place (through qr's tail: rope does not work in place) */
    qkv_rope_f32(q, cos, sin, qr, B, H, D, B);
    float* kr = att; /* att is free until attention */
    qkv_rope_f32(k, cos, sin, kr, B, Hkv, D, B);
    memcpy(k, kr, sizeof(float) * B * kv_n);
  } else {
    memcpy(qr, q, sizeof(float) * B * q_n);
  }
  for (int64_t r = 0; r < B; ++r) { /* store this token's K/V in the cache (int8: quantized) */
    const int64_t j = kv->total[r] - 1;
    const int64_t off = kv->tables[r * kv->max_blocks + j / kv->block_size] * kv->block_stride +
                        (j % kv->block_size) * kv->token_stride;
    for (int64_t h = 0; h < Hkv; ++h) {
      const int64_t at = off + h * kv->head_stride;
      const float *kh = k + r * kv_n + h * D, *vh = v + r * kv_n + h * D;
      if (kv->k_scale) {
        qkv_quantize_kv_vector(kh, (int8_t*)kv->k + at, kv->k_scale + at / D, D);
        qkv_quantize_kv_vector(vh, (int8_t*)kv->v + at, kv->v_scale + at / D, D);
      } else {
        memcpy((float*)kv->k + at, kh, sizeof(float) * D);
        memcpy((float*)kv->v + at, vh, sizeof(float) * D);
      }
    }
  }
  if (kv->k_scale
          ? qkv_decode_attention_q8(qr, kv->k, kv->v, kv->k_scale, kv->v_scale, kv->tables, kv->max_blocks, kv->total,
                                    att, B, H, Hkv, D, kv->block_size, kv->block_stride, kv->token_stride,
                                    kv->head_stride, L->scale, L->window, n_threads)
          : qkv_decode_attention_f32(qr, kv->k, kv->v, kv->tables, kv->max_blocks, kv->total, att, B, H, Hkv, D,
                                     kv->block_size, kv->block_stride, kv->token_stride, kv->head_stride, L->scale,
                                     L->window, n_threads))
    goto fail;
  if (project(att, B, q_n, L->wo, L->t_o, L->bo, n, d, n_threads)) goto fail; /* n <- attention output projected */
  if (L->post_attn_norm) norm(L, n, L->post_attn_norm, L->post_attn_norm_b, n, B);
  for (int64_t i = 0; i < B * d; ++i) x[i] += n[i];

  norm(L, x, L->mlp_norm, L->mlp_norm_b, n, B);
  if (L->mlp == GELU_TANH || L->mlp == GELU_ERF) { /* ungated */
    if (project(n, B, d, L->w_up, L->t_up, L->b_up, gate, F, n_threads)) goto fail;
    gelu(gate, B * F, L->mlp == GELU_ERF);
  } else { /* gated: act(gate_proj(n)) * up_proj(n) */
    const void* w[2] = {L->w_gate, L->w_up};
    const int64_t t[2] = {L->t_gate, L->t_up};
    const float* b[2] = {L->b_gate, L->b_up};
    float* y[2] = {gate, up};
    const int64_t n_out[2] = {F, F};
    if (project_many(n, B, d, 2, w, t, b, y, n_out, n_threads)) goto fail;
    if (L->mlp == SWIGLU) {
      silu_mul(gate, up, B * F);
    } else {
      gelu(gate, B * F, L->mlp == GEGLU_ERF);
      for (int64_t i = 0; i < B * F; ++i) gate[i] *= up[i];
    }
  }
  if (project(gate, B, F, L->w_down, L->t_down, L->b_down, n, d, n_threads)) goto fail;
  if (L->post_mlp_norm) norm(L, n, L->post_mlp_norm, L->post_mlp_norm_b, n, B);
  for (int64_t i = 0; i < B * d; ++i) x[i] += n[i];
  free(buf);
  return 0;
fail:
  free(buf);
  return -1;
}

/* Every block of a decode step, one after another, in one call (one ctypes call a step
 * instead of one a block). kv addresses layer 0's K/V; layer l's are layer_bytes[i] * l bytes further
 * (i: k, v, k_scale, v_scale; the scales only when kv has them). A block with a sliding
 * window rotates by local_cos/local_sin when the model has separate local angles (else
 * NULL: every block takes cos/sin). Returns 0, or the failing block's error. */
int qkv_decode_layers_f32(const qkv_block* blocks, int64_t n_layers, const qkv_kv* kv, const int64_t* layer_bytes,
                          float* x, int64_t B, const float* cos, const float* sin, const float* local_cos,
                          const float* local_sin, int n_threads) {
  for (int64_t l = 0; l < n_layers; ++l) {
    qkv_kv at = *kv;
    at.k = (char*)kv->k + l * layer_bytes[0];
    at.v = (char*)kv->v + l * layer_bytes[1];
    if (kv->k_scale) {
      at.k_scale = (float*)((char*)kv->k_scale + l * layer_bytes[2]);
      at.v_scale = (float*)((char*)kv->v_scale + l * layer_bytes[3]);
    }
    const int local = blocks[l].window != 0 && local_cos != 0;
    const int rc = qkv_decode_block_f32(&blocks[l], &at, x, B, local ? local_cos : cos, local ? local_sin : sin,
                                        n_threads);
    if (rc) return rc;
  }
  return 0;
}

/* The struct sizes, so the Python side (ctypes mirrors of these structs) can refuse to call
 * a library built from another version of this file. */
int64_t qkv_decode_block_sizeof(void) { return sizeof(qkv_block); }
int64_t qkv_decode_kv_sizeof(void) { return sizeof(qkv_kv); }
