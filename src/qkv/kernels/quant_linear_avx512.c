/* The AVX-512 (F, BW, VL) path of quant_linear.c (#included there, after the AVX2 path,
 * whose block decoding it reuses; not built on its own).
 *
 * Twice the AVX2 width: two 32-weight blocks (or two 32-weight chunks of a K-quant
 * superblock) per 512-bit multiply. Where the CPU has no AVX-512 these functions are
 * never called (quant_linear.c checks at run time).
 */

#define QL_AVX512 __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl")))

QL_AVX512 QL_INLINE __m512i ql_pair(__m256i lo, __m256i hi) {
  return _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
}

/* Two blocks' sums q_j y_j, 8 partial sums each (lanes 0-7 the first block); qa = |q|, and
 * y takes q's sign (a masked negation: AVX-512 has no vpsignb; where q = 0, qa = 0). */
QL_AVX512 QL_INLINE __m512 ql_dot64(const int fmt, __m512i q, __m512i qa, __m512i y) {
  if (ql_signed32(fmt)) y = _mm512_mask_sub_epi8(y, _mm512_movepi8_mask(q), _mm512_setzero_si512(), y);
  return _mm512_cvtepi32_ps(_mm512_madd_epi16(_mm512_maddubs_epi16(qa, y), _mm512_set1_epi16(1)));
}

QL_AVX512 QL_INLINE void ql_row32_avx512(const int fmt, const uint8_t* w, const ql_act* a, const int64_t nr,
                                         float* out) {
  __m512 acc[QL_MAX_ROWS];
  __m256 tail[QL_MAX_ROWS];
  float accs0[QL_MAX_ROWS], accs1[QL_MAX_ROWS];
  for (int64_t r = 0; r < nr; ++r)
    acc[r] = _mm512_setzero_ps(), tail[r] = _mm256_setzero_ps(), accs0[r] = accs1[r] = 0.0f;
  const __m512i halves = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
  const int64_t bytes = ql_block_bytes(fmt);
  int64_t b = 0;
  for (; b + 2 <= a->nb; b += 2) {
    const ql_blk32 k0 = ql_decode32(fmt, w + b * bytes), k1 = ql_decode32(fmt, w + (b + 1) * bytes);
    const __m512i q = ql_pair(k0.q, k1.q), qa = ql_pair(k0.qa, k1.qa);
    const __m128 wd = _mm_setr_ps(k0.d, k1.d, 0.0f, 0.0f);
    for (int64_t r = 0; r < nr; ++r) {
      const int64_t at = r * a->nb + b;
      const __m128 dd = _mm_mul_ps(wd, _mm_castsi128_ps(_mm_loadl_epi64((const __m128i*)(a->d + at))));
      const __m512 scale = _mm512_permutexvar_ps(halves, _mm512_castps128_ps512(dd));
      const __m512i y = _mm512_loadu_si512((const void*)(a->q + r * a->n_in + b * 32));
      acc[r] = _mm512_fmadd_ps(scale, ql_dot64(fmt, q, qa, y), acc[r]);
      if (!ql_signed32(fmt)) accs0[r] = fmaf(k0.m, a->s[at], accs0[r]), accs1[r] = fmaf(k1.m, a->s[at + 1], accs1[r]);
    }
  }
  if (b < a->nb) ql_step32_avx2(fmt, w, b, a, nr, tail, accs0); /* an odd last block */
  for (int64_t r = 0; r < nr; ++r) out[r] = _mm512_reduce_add_ps(acc[r]) + hsum(tail[r]) + (accs0[r] + accs1[r]);
}

/* The integer sums land in the same 8 lanes as on the AVX2 path, so K-quant results are
 * bitwise the same as AVX2's. */
QL_AVX512 QL_INLINE void ql_rowK_avx512(const int fmt, const uint8_t* w, const ql_act* a, const int64_t nr,
                                        float* out) {
  __m256 acc[QL_MAX_ROWS];
  for (int64_t r = 0; r < nr; ++r) acc[r] = _mm256_setzero_ps();
  ql_blkK k;
  __m512i q[4], sc[4];
  for (int64_t B = 0; B < a->nb; ++B) {
    ql_decodeK(fmt, w + B * ql_block_bytes(fmt), &k);
    for (int j = 0; j < 4; ++j) q[j] = ql_pair(k.q[2 * j], k.q[2 * j + 1]), sc[j] = ql_pair(k.sc[2 * j], k.sc[2 * j + 1]);
    for (int64_t r = 0; r < nr; ++r) {
      const int8_t* y = a->q + r * a->n_in + B * 256;
      __m512i isum = _mm512_setzero_si512();
      for (int j = 0; j < 4; ++j) {
        const __m512i p = _mm512_maddubs_epi16(q[j], _mm512_loadu_si512((const void*)(y + 64 * j)));
        isum = _mm512_add_epi32(isum, _mm512_madd_epi16(p, sc[j]));
      }
      const __m256i i8 = _mm256_add_epi32(_mm512_castsi512_si256(isum), _mm512_extracti64x4_epi64(isum, 1));
      acc[r] = ql_finishK(fmt, &k, i8, a->sum16 + (r * a->nb + B) * 16, a->d[r * a->nb + B], acc[r]);
    }
  }
  for (int64_t r = 0; r < nr; ++r) out[r] = hsum(acc[r]);
}

QL_AVX512 QL_INLINE __m512 ql_widen16(const int fmt, const uint8_t* p) {
  const __m256i h = _mm256_loadu_si256((const __m256i*)p);
  if (fmt == QL_F16) return _mm512_cvtph_ps(h);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

QL_AVX512 QL_INLINE void ql_rowF_avx512(const int fmt, const uint8_t* w, const float* x, int64_t n_in,
                                        const int64_t nr, float* out) {
  __m512 acc0[QL_MAX_ROWS], acc1[QL_MAX_ROWS];
  for (int64_t r = 0; r < nr; ++r) acc0[r] = acc1[r] = _mm512_setzero_ps();
  const int64_t n32 = n_in & ~(int64_t)31;
  for (int64_t i = 0; i < n32; i += 32) {
    const __m512 w0 = ql_widen16(fmt, w + 2 * i), w1 = ql_widen16(fmt, w + 2 * i + 32);
    for (int64_t r = 0; r < nr; ++r) {
      acc0[r] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x + r * n_in + i), acc0[r]);
      acc1[r] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x + r * n_in + i + 16), acc1[r]);
    }
  }
  for (int64_t r = 0; r < nr; ++r) out[r] = _mm512_reduce_add_ps(_mm512_add_ps(acc0[r], acc1[r]));
  for (int64_t i = n32; i < n_in; ++i) /* the last < 32 weights, in order */
    for (int64_t r = 0; r < nr; ++r) out[r] = fmaf(ql_wide_ref(fmt, w + 2 * i), x[r * n_in + i], out[r]);
}

#define QL_BODY32_AVX512(fmt, w, a, x, nr, out) ql_row32_avx512(fmt, w, a, nr, out)
#define QL_BODYK_AVX512(fmt, w, a, x, nr, out) ql_rowK_avx512(fmt, w, a, nr, out)
#define QL_BODYF_AVX512(fmt, w, a, x, nr, out) ql_rowF_avx512(fmt, w, x, (a)->n_in, nr, out)
QL_ROW_FN(QL_AVX512, ql_q8_0_avx512, QL_Q8_0, QL_BODY32_AVX512)
QL_ROW_FN(QL_AVX512, ql_q4_0_avx512, QL_Q4_0, QL_BODY32_AVX512)
QL_ROW_FN(QL_AVX512, ql_q4_1_avx512, QL_Q4_1, QL_BODY32_AVX512)
QL_ROW_FN(QL_AVX512, ql_q5_0_avx512, QL_Q5_0, QL_BODY32_AVX512)
QL_ROW_FN(QL_AVX512, ql_q5_1_avx512, QL_Q5_1, QL_BODY32_AVX512)
QL_ROW_FN(QL_AVX512, ql_q4_k_avx512, QL_Q4_K, QL_BODYK_AVX512)
QL_ROW_FN(QL_AVX512, ql_q5_k_avx512, QL_Q5_K, QL_BODYK_AVX512)
QL_ROW_FN(QL_AVX512, ql_q6_k_avx512, QL_Q6_K, QL_BODYK_AVX512)
QL_ROW_FN(QL_AVX512, ql_f16_avx512, QL_F16, QL_BODYF_AVX512)
QL_ROW_FN(QL_AVX512, ql_bf16_avx512, QL_BF16, QL_BODYF_AVX512)

static ql_row_fn ql_pick_avx512(int fmt) {
  switch (fmt) {
    case QL_Q8_0: return ql_q8_0_avx512;
    case QL_Q4_0: return ql_q4_0_avx512;
    case QL_Q4_1: return ql_q4_1_avx512;
    case QL_Q5_0: return ql_q5_0_avx512;
    case QL_Q5_1: return ql_q5_1_avx512;
    case QL_Q4_K: return ql_q4_k_avx512;
    case QL_Q5_K: return ql_q5_k_avx512;
    case QL_Q6_K: return ql_q6_k_avx512;
    case QL_F16: return ql_f16_avx512;
    case QL_BF16: return ql_bf16_avx512;
    default: return 0;
  }
}
