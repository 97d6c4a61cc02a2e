/* y = x W^T + b with W kept in GGUF's quantized blocks (llama.cpp's layouts), for the few
 * rows (<= 64) of a decode step on x86 CPUs.
 *
 * Why: decode is a stream over the weights, so the bytes read set the speed. fp32 reads
 * 4 bytes a weight; Q8_0 8.5 bits, Q4_0 4.5, Q6_K 6.56, Q4_K 4.5. We read the blocks as
 * they are on disk and never expand them to floats in memory.
 *
 * How, as ggml does: each row of x is rounded to int8 once per call, in blocks of 32
 * (a scale each) for the 32-weight formats and of 256 for the K-quants; each weight
 * block's integer dot product with a row's block is exact, and becomes float once, times
 * the two scales. Q4_0's and Q5_0's offsets (-8, -16) are subtracted from the weights as
 * they are unpacked; Q6_K's (-32) and the mins (Q4_1, Q5_1, Q4_K, Q5_K) are applied
 * through the sums of each activation block, computed once per row.
 * F16 and BF16 weights multiply fp32 x directly. A weight block is unpacked once and used
 * for every row (rows inside, blocks outside); threads split the output rows.
 *
 * Paths, picked at run time per format (qkv_quant_path): AVX-512 VNNI (for rows repacked
 * sixteen at a time, quant_linear_x16.c), AVX-512 (F, BW, VL), AVX2 (+FMA, F16C; the build's
 * baseline), and a portable scalar reference the tests check the others against. Within
 * one path a row's result is bitwise the same alone or in any batch: its sums run in one
 * fixed order whatever n_rows is.
 *
 * qkv_quant_dequantize expands rows of blocks to fp32 for the many rows of a prefill,
 * where a tile of dequantized weights is reused by every row of x (a GEMM) and the int8
 * matvec would be slower. Each weight is gguf.quants.dequantize's value bit for bit: its
 * products (d * q, d * sc * q, dmin * m) are exact in fp32, so the one rounding step left,
 * the sum with the min, gives the same float in any order and with or without FMA.
 *
 * Another C file may #include this one (as decode_layer_f32.c includes linear_f32.c):
 * everything but the qkv_quant_* functions is static and prefixed ql_ / QL_.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "simd.h"

/* gguf.GGMLQuantizationType values */
enum {
  QL_F32 = 0, QL_F16 = 1, QL_Q4_0 = 2, QL_Q4_1 = 3, QL_Q5_0 = 6, QL_Q5_1 = 7, QL_Q8_0 = 8,
  QL_Q4_K = 12, QL_Q5_K = 13, QL_Q6_K = 14, QL_BF16 = 30,
};
enum { QL_ISA_REF = 0, QL_ISA_AVX2 = 1, QL_ISA_AVX512 = 2, QL_ISA_AVX512_VNNI = 3 };
enum { QL_OK = 0, QL_ERR_QTYPE = 1, QL_ERR_SHAPE = 2, QL_ERR_ISA = 3, QL_ERR_MEMORY = 4 };
enum { QL_FAMILY_NONE = -1, QL_FAMILY_32 = 0, QL_FAMILY_K = 1, QL_FAMILY_F = 2 };
#define QL_MAX_ROWS 64

static inline int ql_family(int fmt) {
  switch (fmt) {
    case QL_Q8_0: case QL_Q4_0: case QL_Q4_1: case QL_Q5_0: case QL_Q5_1: return QL_FAMILY_32;
    case QL_Q4_K: case QL_Q5_K: case QL_Q6_K: return QL_FAMILY_K;
    case QL_F16: case QL_BF16: return QL_FAMILY_F;
    default: return QL_FAMILY_NONE;
  }
}

static inline int64_t ql_block_size(int fmt) {
  const int f = ql_family(fmt);
  return f == QL_FAMILY_32 ? 32 : f == QL_FAMILY_K ? 256 : 1;
}

static inline int64_t ql_block_bytes(int fmt) {
  switch (fmt) {
    case QL_Q8_0: return 34;  /* d, qs[32] */
    case QL_Q4_0: return 18;  /* d, qs[16] */
    case QL_Q4_1: return 20;  /* d, m, qs[16] */
    case QL_Q5_0: return 22;  /* d, qh[4], qs[16] */
    case QL_Q5_1: return 24;  /* d, m, qh[4], qs[16] */
    case QL_Q4_K: return 144; /* d, dmin, scales[12], qs[128] */
    case QL_Q5_K: return 176; /* d, dmin, scales[12], qh[32], qs[128] */
    case QL_Q6_K: return 210; /* ql[128], qh[64], scales[16], d */
    default: return 2;        /* F16, BF16 */
  }
}

/* The rows of x rounded to int8, per block of 32 (or 256 for K-quants):
 * x_j ~= q_j * d, d = max|x| / 127 over the block. */
typedef struct {
  int8_t* q;      /* (n_rows, n_in) */
  float* d;       /* (n_rows, nb) */
  float* s;       /* (n_rows, nb), 32-blocks: d * sum of the block's q */
  int16_t* sum16; /* (n_rows, nb, 16), K-quants: the sum of each 16 q */
  int64_t n_in, nb;
} ql_act;

/* One block of x as int8; a block holding inf or NaN gets scale NaN, so its outputs are NaN. */
static void ql_round_block(const float* x, int64_t n, int8_t* q, float* d) {
  float amax = 0.0f;
  int finite = 1;
  for (int64_t j = 0; j < n; ++j) {
    finite &= isfinite(x[j]) != 0;
    amax = fabsf(x[j]) > amax ? fabsf(x[j]) : amax;
  }
  const float id = finite && amax > 0.0f ? 127.0f / amax : 0.0f;
  *d = finite ? amax / 127.0f : NAN;
  for (int64_t j = 0; j < n; ++j) {
    const float v = nearbyintf(x[j] * id);
    q[j] = (int8_t)(v > 127.0f ? 127.0f : v < -127.0f ? -127.0f : v);
  }
}

/* Fills a (its buffers in one allocation, *mem, for the caller to free); 0, or QL_ERR_MEMORY. */
static int ql_round_rows(const float* x, int64_t n_rows, int64_t n_in, int fmt, int n_threads, ql_act* a,
                         void** mem) {
  const int f = ql_family(fmt);
  memset(a, 0, sizeof *a);
  a->n_in = n_in;
  *mem = 0;
  if (f == QL_FAMILY_F) return QL_OK;
  const int64_t bs = ql_block_size(fmt), nb = n_in / bs;
  a->nb = nb;
  const size_t nq = (size_t)(n_rows * n_in + 63) & ~(size_t)63, nd = (size_t)(n_rows * nb);
  char* buf = malloc(nq + nd * sizeof(float) * 2 + (size_t)(n_rows * n_in / 16) * sizeof(int16_t));
  if (!buf) return QL_ERR_MEMORY;
  *mem = buf;
  a->q = (int8_t*)buf;
  a->d = (float*)(buf + nq);
  a->s = a->d + nd;
  a->sum16 = (int16_t*)(a->s + nd);
#pragma omp parallel for schedule(static) num_threads(n_threads) if (n_rows >= 8)
  for (int64_t r = 0; r < n_rows; ++r) {
    for (int64_t b = 0; b < nb; ++b) {
      const int64_t at = r * n_in + b * bs;
      ql_round_block(x + at, bs, a->q + at, a->d + r * nb + b);
      int32_t total = 0;
      for (int64_t g = 0; g < bs / 16; ++g) {
        int32_t sum = 0;
        for (int j = 0; j < 16; ++j) sum += a->q[at + 16 * g + j];
        a->sum16[at / 16 + g] = (int16_t)sum;
        total += sum;
      }
      a->s[r * nb + b] = a->d[r * nb + b] * (float)total;
    }
  }
  return QL_OK;
}

/* ---- the portable reference: llama.cpp's dequantization formulas, in integers ---- */

static inline uint16_t ql_u16(const uint8_t* p) {
  uint16_t v;
  memcpy(&v, p, 2);
  return v;
}

static inline float ql_fp16(uint16_t h) {
  const uint32_t exp = (h >> 10) & 0x1F, man = h & 0x3FF;
  float v;
  if (exp == 0)
    v = ldexpf((float)man, -24); /* zero or subnormal */
  else if (exp == 31)
    v = man ? NAN : INFINITY;
  else
    v = ldexpf((float)(man | 0x400), (int)exp - 25);
  return (h & 0x8000) ? -v : v;
}

static inline float ql_wide_ref(int fmt, const uint8_t* p) {
  const uint16_t h = ql_u16(p);
  if (fmt == QL_F16) return ql_fp16(h);
  const uint32_t bits = (uint32_t)h << 16;
  float v;
  memcpy(&v, &bits, 4);
  return v;
}

/* A 32-weight block as integers: weight j = d * q[j] + m. */
static void ql_ints32_ref(int fmt, const uint8_t* p, int q[32], float* d, float* m) {
  *d = ql_fp16(ql_u16(p));
  *m = 0.0f;
  if (fmt == QL_Q8_0) {
    for (int j = 0; j < 32; ++j) q[j] = (int8_t)p[2 + j];
    return;
  }
  const uint8_t* qs = p + (fmt == QL_Q4_0 ? 2 : fmt == QL_Q4_1 ? 4 : fmt == QL_Q5_0 ? 6 : 8);
  uint32_t qh = 0;
  if (fmt == QL_Q5_0 || fmt == QL_Q5_1) memcpy(&qh, p + (fmt == QL_Q5_0 ? 2 : 4), 4);
  const int five = fmt == QL_Q5_0 || fmt == QL_Q5_1;
  for (int j = 0; j < 16; ++j) {
    q[j] = (qs[j] & 0xF) | (five ? (int)((qh >> j) & 1) << 4 : 0);
    q[j + 16] = (qs[j] >> 4) | (five ? (int)((qh >> (j + 16)) & 1) << 4 : 0);
  }
  const int offset = fmt == QL_Q4_0 ? 8 : fmt == QL_Q5_0 ? 16 : 0;
  for (int j = 0; j < 32; ++j) q[j] -= offset;
  if (fmt == QL_Q4_1 || fmt == QL_Q5_1) *m = ql_fp16(ql_u16(p + 2));
}

/* The 6-bit scale and min of sub-block j of a Q4_K/Q5_K superblock (llama.cpp's get_scale_min_k4). */
static inline void ql_scale_min_k4(int j, const uint8_t* s, uint8_t* sc, uint8_t* m) {
  if (j < 4) {
    *sc = s[j] & 63, *m = s[j + 4] & 63;
  } else {
    *sc = (s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4);
    *m = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
  }
}

/* A K-quant superblock as integers: weight j = d * sc[j/16] * q[j] - dmin * mn[j/16]. */
static void ql_intsK_ref(int fmt, const uint8_t* p, int q[256], int sc[16], int mn[16], float* d, float* dmin) {
  if (fmt == QL_Q6_K) {
    *d = ql_fp16(ql_u16(p + 208)), *dmin = 0.0f;
    for (int e = 0; e < 256; ++e) {
      const int n = e / 128, c = (e % 128) / 32, i = e % 32;
      const uint8_t lo = p[64 * n + 32 * (c & 1) + i], hi = p[128 + 32 * n + i];
      q[e] = (((c < 2 ? lo : lo >> 4) & 0xF) | (((hi >> (2 * c)) & 3) << 4)) - 32;
    }
    for (int g = 0; g < 16; ++g) sc[g] = (int8_t)p[192 + g], mn[g] = 0;
    return;
  }
  *d = ql_fp16(ql_u16(p)), *dmin = ql_fp16(ql_u16(p + 2));
  const uint8_t* qs = p + (fmt == QL_Q5_K ? 48 : 16);
  for (int e = 0; e < 256; ++e) {
    const int j = e / 64, l = e % 64, c = e / 32; /* c: the 32-weight sub-block */
    q[e] = (l < 32 ? qs[32 * j + l] : qs[32 * j + l - 32] >> 4) & 0xF;
    if (fmt == QL_Q5_K) q[e] |= ((p[16 + e % 32] >> c) & 1) << 4;
  }
  for (int c = 0; c < 8; ++c) {
    uint8_t s, m;
    ql_scale_min_k4(c, p + 4, &s, &m);
    sc[2 * c] = sc[2 * c + 1] = s, mn[2 * c] = mn[2 * c + 1] = m;
  }
}

static void ql_row_ref(int fmt, const uint8_t* w, const ql_act* a, const float* x, int64_t nr, float* out) {
  const int f = ql_family(fmt);
  const int64_t bytes = ql_block_bytes(fmt);
  for (int64_t r = 0; r < nr; ++r) {
    float acc = 0.0f;
    if (f == QL_FAMILY_F) {
      for (int64_t i = 0; i < a->n_in; ++i) acc = fmaf(ql_wide_ref(fmt, w + 2 * i), x[r * a->n_in + i], acc);
    } else if (f == QL_FAMILY_32) {
      for (int64_t b = 0; b < a->nb; ++b) {
        int q[32], isum = 0, ysum = 0;
        float d, m;
        ql_ints32_ref(fmt, w + b * bytes, q, &d, &m);
        const int8_t* y = a->q + r * a->n_in + b * 32;
        for (int j = 0; j < 32; ++j) isum += q[j] * y[j], ysum += y[j];
        const float dx = a->d[r * a->nb + b];
        acc = fmaf(d * dx, (float)isum, acc);
        acc = fmaf(m * dx, (float)ysum, acc);
      }
    } else {
      for (int64_t B = 0; B < a->nb; ++B) {
        int q[256], sc[16], mn[16];
        int32_t isum = 0, imin = 0;
        float d, dmin;
        ql_intsK_ref(fmt, w + B * bytes, q, sc, mn, &d, &dmin);
        const int8_t* y = a->q + r * a->n_in + B * 256;
        for (int g = 0; g < 16; ++g) {
          int32_t dot = 0, sum = 0;
          for (int j = 16 * g; j < 16 * g + 16; ++j) dot += q[j] * y[j], sum += y[j];
          isum += sc[g] * dot, imin += mn[g] * sum;
        }
        const float dx = a->d[r * a->nb + B];
        acc = fmaf(d * dx, (float)isum, acc);
        acc = fmaf(-dmin * dx, (float)imin, acc);
      }
    }
    out[r] = acc;
  }
}

/* One weight row of n_in weights as fp32, as gguf.quants.dequantize computes them. The
 * symmetric formats never add their (zero) min: -0.0 + 0.0 would turn d * 0 with d < 0 into +0. */
static void ql_deq_row_ref(int fmt, const uint8_t* w, int64_t n_in, float* out) {
  const int f = ql_family(fmt);
  const int64_t bytes = ql_block_bytes(fmt);
  if (fmt == QL_F32) {
    memcpy(out, w, (size_t)n_in * sizeof(float));
  } else if (f == QL_FAMILY_F) {
    for (int64_t i = 0; i < n_in; ++i) out[i] = ql_wide_ref(fmt, w + 2 * i);
  } else if (f == QL_FAMILY_32) {
    const int asym = fmt == QL_Q4_1 || fmt == QL_Q5_1;
    for (int64_t b = 0; b < n_in / 32; ++b) {
      int q[32];
      float d, m;
      ql_ints32_ref(fmt, w + b * bytes, q, &d, &m);
      for (int j = 0; j < 32; ++j) out[32 * b + j] = asym ? d * (float)q[j] + m : d * (float)q[j];
    }
  } else {
    for (int64_t B = 0; B < n_in / 256; ++B) {
      int q[256], sc[16], mn[16];
      float d, dmin;
      ql_intsK_ref(fmt, w + B * bytes, q, sc, mn, &d, &dmin);
      for (int e = 0; e < 256; ++e) {
        const float step = d * (float)sc[e / 16];
        out[256 * B + e] = fmt == QL_Q6_K ? step * (float)q[e] : step * (float)q[e] - dmin * (float)mn[e / 16];
      }
    }
  }
}

/* One weight row of n_in weights (w) into n_in floats (out). */
typedef void (*ql_deq_fn)(int fmt, const uint8_t* w, int64_t n_in, float* out);

/* One weight row (w) times rows 0..nr-1 of x (or of its int8 form a) into out[0..nr). */
typedef void (*ql_row_fn)(int fmt, const uint8_t* w, const ql_act* a, const float* x, int64_t nr, float* out);

#include "quant_linear_avx2.c"
#include "quant_linear_avx512.c"
#include "quant_linear_x16.c"

static int ql_best_isa(void) {
  static int best = -1; /* the CPU does not change: look once (threads may race to the same value) */
  if (best < 0) {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl"))
      best = __builtin_cpu_supports("avx512vnni") ? QL_ISA_AVX512_VNNI : QL_ISA_AVX512;
    else if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
      best = QL_ISA_AVX2;
    else
      best = QL_ISA_REF;
  }
  return best;
}

/* The newest path this CPU runs: 0 portable, 1 AVX2, 2 AVX-512, 3 AVX-512 VNNI. */
int qkv_quant_isa(void) { return ql_best_isa(); }

/* The path qkv_quant_linear takes for a format. The 32-weight formats keep the AVX2 code
 * on AVX-512 CPUs: its eight-rows-per-pass kernel (quant_linear_avx2.c) beat the AVX-512
 * one, which pairs two blocks of one weight row per 512-bit multiply, at every row count on
 * Skylake-SP (bench_quant_kernels.py --paths avx2 avx512: Q4_0 2.85x fp32 vs 2.07x at 1
 * row, 1.31x vs 0.85x at 16); the K-quants and F16/BF16 gain from AVX-512.
 * The choice is per format, never per batch size, so rows stay batch-invariant. */
int qkv_quant_path(int qtype) {
  const int best = ql_best_isa();
  if (ql_is_x16(qtype)) return best;
  const int plain = best > QL_ISA_AVX512 ? QL_ISA_AVX512 : best; /* VNNI code exists for repacked rows only */
  return ql_family(qtype) == QL_FAMILY_32 && plain == QL_ISA_AVX512 ? QL_ISA_AVX2 : plain;
}

/* qkv_quant_linear_isa for Q8_0 / Q4_0 / Q5_0 repacked sixteen rows at a time (quant_linear_x16.c;
 * fmt the base format): the groups through the sixteen-row kernel, threads splitting them (a
 * group's outputs are 64 bytes of each row of y, so threads never share a cache line when y is
 * aligned), then the last n_out % 16 rows, which are in the file's layout, through the
 * eight-row AVX2 kernel (or the reference). */
static int ql_linear_x16(const float* x, int64_t n_rows, int64_t n_in, const void* w, int fmt, int64_t n_out,
                         const float* bias, float* y, int n_threads, int isa) {
  if (n_rows < 0 || n_rows > QL_MAX_ROWS || n_in <= 0 || n_in % 32 != 0) return QL_ERR_SHAPE;
  if (isa < QL_ISA_REF || isa > ql_best_isa()) return QL_ERR_ISA;
  if (n_rows == 0 || n_out <= 0) return QL_OK;
  ql_act a;
  void* mem;
  if (ql_round_rows(x, n_rows, n_in, fmt, n_threads, &a, &mem) != QL_OK) return QL_ERR_MEMORY;
  const int64_t row_bytes = n_in / 32 * ql_block_bytes(fmt), n_groups = n_out / QL_IL;
  const uint8_t* wb = (const uint8_t*)w;
  const ql_x16_fn fn = ql_pick_x16(fmt, isa);
#pragma omp parallel for schedule(static) num_threads(n_threads) if (n_groups > 1)
  for (int64_t g = 0; g < n_groups; ++g) {
    const uint8_t* at = wb + g * QL_IL * row_bytes;
    if (fn)
      fn(at, &a, n_rows, g * QL_IL, n_out, bias, y);
    else
      ql_x16_ref(fmt, at, &a, n_rows, g * QL_IL, n_out, bias, y);
  }
  for (int64_t o = n_groups * QL_IL; o < n_out; o += QL_GROUP) { /* the tail, in the file's layout */
    if (isa == QL_ISA_REF) {
      float out[QL_MAX_ROWS];
      for (int64_t i = o; i < n_out && i < o + QL_GROUP; ++i) {
        ql_row_ref(fmt, wb + i * row_bytes, &a, x, n_rows, out);
        for (int64_t r = 0; r < n_rows; ++r) y[r * n_out + i] = out[r] + (bias ? bias[i] : 0.0f);
      }
    } else {
      ql_group_rows(ql_pick_group_avx2(fmt), wb, row_bytes, o, n_out, &a, n_rows, bias, y);
    }
  }
  free(mem);
  return QL_OK;
}

/* Several matrices of one repacked format that read the same x (q/k/v, gate/up), each as
 * qkv_quant_linear would compute it: x rounded to 8 bits once, and one parallel region over
 * all their sixteen-row groups. A call's fixed cost (the region's fork and join, rounding x)
 * measured ~5 us on an AMD EPYC, where streaming a 192 x 576 Q4_0 matrix takes ~2. Returns QL_ERR_QTYPE when qtype is not a repacked
 * format and QL_ERR_SHAPE when a matrix has a tail (n_out % 16), which the caller then runs
 * one matrix at a time; else as qkv_quant_linear. */
int qkv_quant_linear_many(const float* x, int64_t n_rows, int64_t n_in, int n, const void* const* w, int qtype,
                          const int64_t* n_out, const float* const* bias, float* const* y, int n_threads) {
  if (!ql_is_x16(qtype) || n < 1 || n > 8) return QL_ERR_QTYPE;
  if (n_rows < 0 || n_rows > QL_MAX_ROWS || n_in <= 0 || n_in % 32 != 0) return QL_ERR_SHAPE;
  int64_t first[9] = {0}; /* matrix m's groups are first[m] .. first[m + 1] - 1 */
  for (int m = 0; m < n; ++m) {
    if (n_out[m] < 0 || n_out[m] % QL_IL) return QL_ERR_SHAPE;
    first[m + 1] = first[m] + n_out[m] / QL_IL;
  }
  if (n_rows == 0) return QL_OK;
  const int fmt = qtype & 0xFF, isa = qkv_quant_path(qtype);
  ql_act a;
  void* mem;
  if (ql_round_rows(x, n_rows, n_in, fmt, n_threads, &a, &mem) != QL_OK) return QL_ERR_MEMORY;
  const int64_t row_bytes = n_in / 32 * ql_block_bytes(fmt);
  const ql_x16_fn fn = ql_pick_x16(fmt, isa);
#pragma omp parallel for schedule(static) num_threads(n_threads) if (first[n] > 1)
  for (int64_t t = 0; t < first[n]; ++t) {
    int m = 0;
    while (t >= first[m + 1]) ++m;
    const int64_t o = (t - first[m]) * QL_IL;
    const uint8_t* at = (const uint8_t*)w[m] + o * row_bytes;
    if (fn)
      fn(at, &a, n_rows, o, n_out[m], bias[m], y[m]);
    else
      ql_x16_ref(fmt, at, &a, n_rows, o, n_out[m], bias[m], y[m]);
  }
  free(mem);
  return QL_OK;
}

/* y = x W^T + bias through one path (isa as qkv_quant_isa numbers it). x: (n_rows, n_in)
 * fp32; w: n_out rows of n_in / block_size blocks of format qtype (a gguf
 * GGMLQuantizationType); bias: (n_out,) or NULL; y: (n_rows, n_out). Returns 0, or
 * QL_ERR_QTYPE (unsupported format), QL_ERR_SHAPE (n_rows not in 0..64, or n_in not a
 * positive multiple of the block size), QL_ERR_ISA (this CPU lacks the path),
 * QL_ERR_MEMORY. */
int qkv_quant_linear_isa(const float* x, int64_t n_rows, int64_t n_in, const void* w, int qtype, int64_t n_out,
                         const float* bias, float* y, int n_threads, int isa) {
  if (ql_is_x16(qtype)) return ql_linear_x16(x, n_rows, n_in, w, qtype & 0xFF, n_out, bias, y, n_threads, isa);
  if (ql_family(qtype) == QL_FAMILY_NONE) return QL_ERR_QTYPE;
  if (n_rows < 0 || n_rows > QL_MAX_ROWS || n_in <= 0 || n_in % ql_block_size(qtype) != 0) return QL_ERR_SHAPE;
  if (isa < QL_ISA_REF || isa > ql_best_isa()) return QL_ERR_ISA;
  if (n_rows == 0 || n_out <= 0) return QL_OK;
  /* VNNI code exists for repacked rows only: rows in the file's layout take the AVX-512 code there */
  const ql_row_fn row = isa >= QL_ISA_AVX512 ? ql_pick_avx512(qtype) : isa == QL_ISA_AVX2 ? ql_pick_avx2(qtype)
                                                                                          : ql_row_ref;
  ql_act a;
  void* mem;
  if (ql_round_rows(x, n_rows, n_in, qtype, n_threads, &a, &mem) != QL_OK) return QL_ERR_MEMORY;
  const int64_t row_bytes = n_in / ql_block_size(qtype) * ql_block_bytes(qtype);
  const uint8_t* wb = (const uint8_t*)w;
  const ql_group_fn group = isa == QL_ISA_AVX2 ? ql_pick_group_avx2(qtype) : 0;
  if (group && row_bytes * (QL_GROUP - 1) <= INT32_MAX) { /* the gather's offsets are int32 */
#pragma omp parallel for schedule(static) num_threads(n_threads)
    for (int64_t g = 0; g < (n_out + QL_GROUP - 1) / QL_GROUP; ++g)
      ql_group_rows(group, wb, row_bytes, g * QL_GROUP, n_out, &a, n_rows, bias, y);
    free(mem);
    return QL_OK;
  }
#pragma omp parallel for schedule(static) num_threads(n_threads)
  for (int64_t o = 0; o < n_out; ++o) {
    float out[QL_MAX_ROWS];
    row(qtype, wb + o * row_bytes, &a, x, n_rows, out);
    for (int64_t r = 0; r < n_rows; ++r) y[r * n_out + o] = out[r] + (bias ? bias[o] : 0.0f);
  }
  free(mem);
  return QL_OK;
}

/* The same through the path qkv_quant_path picks for the format. */
int qkv_quant_linear(const float* x, int64_t n_rows, int64_t n_in, const void* w, int qtype, int64_t n_out,
                     const float* bias, float* y, int n_threads) {
  return qkv_quant_linear_isa(x, n_rows, n_in, w, qtype, n_out, bias, y, n_threads, qkv_quant_path(qtype));
}

/* qkv_quant_dequantize_isa for a repacked Q8_0 / Q4_0 / Q5_0 matrix of n_rows rows (fmt the base
 * format): each row of a group unpacked to the file's layout, then dequantized as there. */
static int ql_dequantize_x16(const void* w, int fmt, int64_t n_rows, int64_t n_in, float* out, int n_threads,
                             int isa) {
  if (n_rows < 0 || n_in <= 0 || n_in % 32 != 0) return QL_ERR_SHAPE;
  if (isa < QL_ISA_REF || isa > ql_best_isa()) return QL_ERR_ISA;
  const ql_deq_fn deq = isa == QL_ISA_REF ? ql_deq_row_ref : ql_pick_deq_avx2(fmt);
  const int64_t nb = n_in / 32, row_bytes = nb * ql_block_bytes(fmt), n_groups = n_rows / QL_IL;
  const uint8_t* wb = (const uint8_t*)w;
  int failed = 0;
#pragma omp parallel num_threads(n_threads) if (n_rows * n_in >= 65536)
  {
    uint8_t* row = malloc((size_t)row_bytes);
    if (!row) {
#pragma omp atomic write
      failed = 1;
    }
#pragma omp for schedule(static)
    for (int64_t r = 0; r < n_rows; ++r) {
      if (!row) continue;
      if (r < n_groups * QL_IL) {
        ql_x16_unpack_row(fmt, wb + r / QL_IL * QL_IL * row_bytes, nb, (int)(r % QL_IL), row);
        deq(fmt, row, n_in, out + r * n_in);
      } else {
        deq(fmt, wb + r * row_bytes, n_in, out + r * n_in);
      }
    }
    free(row);
  }
  return failed ? QL_ERR_MEMORY : QL_OK;
}

/* Rows of a Q8_0 / Q4_0 / Q5_0 matrix (n_rows rows of n_in weights, format fmt) between the
 * file's layout and the sixteen-row one, in place (qkv.quant.repack defines the same byte
 * permutation in torch; this is the fast one): pack 1 file -> x16, 0 x16 -> file. Returns 0, or
 * QL_ERR_QTYPE, QL_ERR_SHAPE, QL_ERR_MEMORY. */
int qkv_quant_repack(void* w, int fmt, int64_t n_rows, int64_t n_in, int pack, int n_threads) {
  if (!ql_is_x16(fmt | QL_X16)) return QL_ERR_QTYPE;
  if (n_rows < 0 || n_in <= 0 || n_in % 32 != 0) return QL_ERR_SHAPE;
  const int64_t nb = n_in / 32, bytes = ql_block_bytes(fmt), row_bytes = nb * bytes, group = QL_IL * row_bytes;
  const int64_t qs = ql_qs_in_row(fmt), at = ql_qs_in_group(fmt);
  uint8_t* wb = (uint8_t*)w;
  int failed = 0;
#pragma omp parallel num_threads(n_threads) if (n_rows * row_bytes >= (1 << 20))
  {
    uint8_t* tmp = malloc((size_t)group);
    if (!tmp) {
#pragma omp atomic write
      failed = 1;
    }
#pragma omp for schedule(static)
    for (int64_t g = 0; g < n_rows / QL_IL; ++g) {
      if (!tmp) continue;
      uint8_t* src = wb + g * group;
      memcpy(tmp, src, (size_t)group);
      for (int i = 0; i < QL_IL; ++i)
        for (int64_t b = 0; b < nb; ++b) {
          /* row i's block b in the file's layout (f) and in the group's (x); tmp holds the source */
          uint8_t* f = (pack ? tmp : src) + i * row_bytes + b * bytes;
          uint8_t* x = (pack ? src : tmp) + b * QL_IL * bytes;
          if (pack) {
            memcpy(x + 2 * i, f, 2);
            if (fmt == QL_Q5_0) memcpy(x + 32 + 4 * i, f + 2, 4);
            for (int64_t c = 0; c < (bytes - qs) / 4; ++c) memcpy(x + at + 64 * c + 4 * i, f + qs + 4 * c, 4);
          } else {
            memcpy(f, x + 2 * i, 2);
            if (fmt == QL_Q5_0) memcpy(f + 2, x + 32 + 4 * i, 4);
            for (int64_t c = 0; c < (bytes - qs) / 4; ++c) memcpy(f + qs + 4 * c, x + at + 64 * c + 4 * i, 4);
          }
        }
    }
    free(tmp);
  }
  return failed ? QL_ERR_MEMORY : QL_OK;
}

/* Rows idx[0..n) (negative: from the end) of a matrix of n_rows rows (kernel type code: a gguf
 * id, or a repacked one) in the file's layout, into out (n, row_bytes): an embedding lookup. Returns 0, or
 * QL_ERR_QTYPE, QL_ERR_SHAPE (n_in not whole blocks, an index outside 0..n_rows). */
int qkv_quant_rows(const void* w, int code, int64_t n_rows, int64_t n_in, const int64_t* idx, int64_t n,
                   uint8_t* out) {
  const int fmt = code & 0xFF, x16 = ql_is_x16(code);
  if (!x16 && (code & ~0xFF || ql_family(fmt) == QL_FAMILY_NONE)) return QL_ERR_QTYPE;
  if (n_in <= 0 || n_in % ql_block_size(fmt) != 0) return QL_ERR_SHAPE;
  const int64_t row_bytes = n_in / ql_block_size(fmt) * ql_block_bytes(fmt), full = x16 ? n_rows / QL_IL * QL_IL : 0;
  const uint8_t* wb = (const uint8_t*)w;
  for (int64_t k = 0; k < n; ++k) {
    const int64_t r = idx[k] < 0 ? idx[k] + n_rows : idx[k]; /* negative: from the end, as torch indexes */
    if (r < 0 || r >= n_rows) return QL_ERR_SHAPE;
    if (r < full)
      ql_x16_unpack_row(fmt, wb + r / QL_IL * QL_IL * row_bytes, n_in / 32, (int)(r % QL_IL), out + k * row_bytes);
    else
      memcpy(out + k * row_bytes, wb + r * row_bytes, (size_t)row_bytes);
  }
  return QL_OK;
}

/* n_rows weight rows of n_in weights each (w: n_rows * row_bytes bytes of format qtype) as
 * fp32 into out (n_rows, n_in), through one path (isa as qkv_quant_isa numbers it; AVX-512
 * CPUs take the AVX2 code: storing the floats, not decoding, bounds this). Bitwise the same
 * on every path and as gguf.quants.dequantize. Returns 0, or QL_ERR_QTYPE, QL_ERR_SHAPE
 * (n_rows < 0, or n_in not a positive multiple of the block size), QL_ERR_ISA. */
int qkv_quant_dequantize_isa(const void* w, int qtype, int64_t n_rows, int64_t n_in, float* out, int n_threads,
                             int isa) {
  if (ql_is_x16(qtype)) return ql_dequantize_x16(w, qtype & 0xFF, n_rows, n_in, out, n_threads, isa);
  if (ql_family(qtype) == QL_FAMILY_NONE && qtype != QL_F32) return QL_ERR_QTYPE;
  const int64_t block = qtype == QL_F32 ? 1 : ql_block_size(qtype);
  if (n_rows < 0 || n_in <= 0 || n_in % block != 0) return QL_ERR_SHAPE;
  if (isa < QL_ISA_REF || isa > ql_best_isa()) return QL_ERR_ISA;
  const ql_deq_fn deq = isa == QL_ISA_REF || qtype == QL_F32 ? ql_deq_row_ref : ql_pick_deq_avx2(qtype);
  const int64_t row_bytes = n_in / block * (qtype == QL_F32 ? 4 : ql_block_bytes(qtype));
  const uint8_t* wb = (const uint8_t*)w;
  /* a thread per few rows only where there is enough work to pay for waking the team */
#pragma omp parallel for schedule(static) num_threads(n_threads) if (n_rows * n_in >= 65536)
  for (int64_t r = 0; r < n_rows; ++r) deq(qtype, wb + r * row_bytes, n_in, out + r * n_in);
  return QL_OK;
}

/* The same through the fastest path this CPU runs. */
int qkv_quant_dequantize(const void* w, int qtype, int64_t n_rows, int64_t n_in, float* out, int n_threads) {
  const int isa = ql_best_isa() >= QL_ISA_AVX2 ? QL_ISA_AVX2 : QL_ISA_REF;
  return qkv_quant_dequantize_isa(w, qtype, n_rows, n_in, out, n_threads, isa);
}
