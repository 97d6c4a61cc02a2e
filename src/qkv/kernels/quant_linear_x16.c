/* Q8_0, Q4_0 and Q5_0 weights repacked sixteen rows at a time (#included by quant_linear.c, after
 * the AVX2 and AVX-512 paths; not built on its own).
 *
 * Why: at one activation row the file's layout (one row's blocks after another) makes the
 * kernel multiply a row's block with the row of x and then fold that row's vector down to a
 * number: per row and block the fold and the float step cost as much as the multiply. As
 * llama.cpp's CPU "repack" buffers do, the weights are interleaved once at load so that one
 * vector load carries the same four weights of sixteen rows, lane i of every int32 result is
 * row i's, and the float step runs once per block for all sixteen rows: no fold at all.
 *
 * The layout (qkv.quant.repack writes and reads it; the type codes are the gguf ones plus
 * QL_X16): the first n_out / 16 * 16 weight rows go in groups of sixteen, each group taking the
 * bytes its sixteen rows took; the last n_out % 16 rows stay as in the file. Inside a group,
 * block b of all sixteen rows (16 * 18 bytes for Q4_0, 16 * 22 for Q5_0, 16 * 34 for Q8_0) is
 *     d[16]           the sixteen rows' fp16 scales (32 bytes)
 *     qh[16]          Q5_0 only: the sixteen rows' 4-byte qh words (64 bytes), row i at 4i
 *     qs, in chunks   chunk c (64 bytes) holds bytes 4c..4c+3 of each row's qs, row i at 4i
 * so it is a byte permutation of the file's bytes: nothing is widened or recoded. In a Q4_0 or
 * Q5_0 chunk the low nibbles are weights 4c..4c+3 of each row and the high ones 16+4c..16+4c+3;
 * Q5_0's fifth bits are spread from the row's qh word in the same lane.
 *
 * The arithmetic is the eight-row kernel's (quant_linear_avx2.c) in the same order: exact
 * integer block sums (Q4_0's offset 8 and Q5_0's 16 off through the block's sum of y), then per block
 * acc = fma(float(isum), d_w * d_x, acc). So a repacked row's output is bitwise the
 * file-layout AVX2 path's, on AVX2, AVX-512 and AVX-512 VNNI alike, and independent of n_rows.
 */

#define QL_X16 0x100 /* flag on a gguf type code: sixteen rows interleaved as above */
#define QL_IL 16

static inline int ql_is_x16(int fmt) {
  const int base = fmt & 0xFF;
  return (fmt & QL_X16) && (base == QL_Q8_0 || base == QL_Q4_0 || base == QL_Q5_0);
}

/* Where a block's qs start: in a file block (after d, and Q5_0's qh), and in a group's block
 * (after the sixteen scales, and Q5_0's sixteen qh words, row i's at 32 + 4i). */
static inline int64_t ql_qs_in_row(int fmt) { return fmt == QL_Q5_0 ? 6 : 2; }
static inline int64_t ql_qs_in_group(int fmt) { return fmt == QL_Q5_0 ? 96 : 32; }

/* Row i (0..15) of a group (nb blocks of base format fmt) in the file's layout, into out. */
static void ql_x16_unpack_row(int fmt, const uint8_t* group, int64_t nb, int i, uint8_t* out) {
  const int64_t bytes = ql_block_bytes(fmt), qs = ql_qs_in_row(fmt), at = ql_qs_in_group(fmt);
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* p = group + b * QL_IL * bytes;
    uint8_t* o = out + b * bytes;
    memcpy(o, p + 2 * i, 2);
    if (fmt == QL_Q5_0) memcpy(o + 2, p + 32 + 4 * i, 4);
    for (int64_t c = 0; c < (bytes - qs) / 4; ++c) memcpy(o + qs + 4 * c, p + at + 64 * c + 4 * i, 4);
  }
}

/* ---- AVX2: a 64-byte chunk is two vectors, rows 0-7 and rows 8-15 ---- */

/* Q5_0's fifth bits of weights j0..j0+3 of eight rows (qh: each row's 32-bit qh in its lane)
 * as 0x10 in bytes 0..3 of the lane: the byte holding them is copied to all four bytes, and
 * each byte keeps its own bit. */
QL_AVX2 QL_INLINE __m256i ql_x16_fifth_avx2(__m256i qh, int j0) {
  const char at = (char)(j0 / 8), sh = (char)(j0 % 8);
  const __m256i spread = _mm256_shuffle_epi8(
      qh, _mm256_set_epi8(12 + at, 12 + at, 12 + at, 12 + at, 8 + at, 8 + at, 8 + at, 8 + at, 4 + at, 4 + at, 4 + at,
                          4 + at, at, at, at, at, 12 + at, 12 + at, 12 + at, 12 + at, 8 + at, 8 + at, 8 + at, 8 + at,
                          4 + at, 4 + at, 4 + at, 4 + at, at, at, at, at));
  const __m256i bit = _mm256_set1_epi32((int)(0x08040201u << sh));
  return _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit), _mm256_set1_epi8(0x10));
}

/* Weight rows of one group times activation rows 0..nr-1 into out (nr, 2): lanes of out[2r]
 * are rows 0-7, of out[2r + 1] rows 8-15. */
QL_AVX2 QL_INLINE void ql_x16_avx2(const int fmt, const uint8_t* g, const ql_act* a, const int64_t nr, __m256* out) {
  const int64_t bytes = ql_block_bytes(fmt);
  const __m256i low4 = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  for (int64_t r = 0; r < 2 * nr; ++r) out[r] = _mm256_setzero_ps();
  for (int64_t b = 0; b < a->nb; ++b) {
    const uint8_t* p = g + b * QL_IL * bytes;
    const __m256 d0 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p));
    const __m256 d1 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(p + 16)));
    if (fmt == QL_Q4_0) {
      __m256i lo[8], hi[8]; /* [2c + h]: chunk c, half h */
      for (int k = 0; k < 8; ++k) {
        const __m256i v = _mm256_loadu_si256((const __m256i*)(p + 32 + 32 * k));
        lo[k] = _mm256_and_si256(v, low4), hi[k] = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
      }
      for (int64_t r = 0; r < nr; ++r) {
        const int64_t at = r * a->n_in + b * 32;
        const int8_t* y = a->q + at;
        __m256i s0 = _mm256_setzero_si256(), s1 = _mm256_setzero_si256();
        for (int c = 0; c < 4; ++c) { /* i16 sums: 8 pairs of at most 2 * 15 * 127 stay below 2^15 */
          int32_t ylo, yhi;
          memcpy(&ylo, y + 4 * c, 4), memcpy(&yhi, y + 16 + 4 * c, 4);
          const __m256i bl = _mm256_set1_epi32(ylo), bh = _mm256_set1_epi32(yhi);
          s0 = _mm256_add_epi16(s0, _mm256_add_epi16(_mm256_maddubs_epi16(lo[2 * c], bl),
                                                     _mm256_maddubs_epi16(hi[2 * c], bh)));
          s1 = _mm256_add_epi16(s1, _mm256_add_epi16(_mm256_maddubs_epi16(lo[2 * c + 1], bl),
                                                     _mm256_maddubs_epi16(hi[2 * c + 1], bh)));
        }
        const __m256i off = _mm256_set1_epi32(8 * (a->sum16[at / 16] + a->sum16[at / 16 + 1]));
        const __m256 dx = _mm256_set1_ps(a->d[r * a->nb + b]);
        const __m256i i0 = _mm256_sub_epi32(_mm256_madd_epi16(s0, ones), off);
        const __m256i i1 = _mm256_sub_epi32(_mm256_madd_epi16(s1, ones), off);
        out[2 * r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i0), _mm256_mul_ps(d0, dx), out[2 * r]);
        out[2 * r + 1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i1), _mm256_mul_ps(d1, dx), out[2 * r + 1]);
      }
    } else if (fmt == QL_Q5_0) {
      __m256i u[16]; /* [4c + 2h + k]: chunk c, half h, k 0 the low nibbles (+16: the high) */
      const __m256i qh[2] = {_mm256_loadu_si256((const __m256i*)(p + 32)),
                             _mm256_loadu_si256((const __m256i*)(p + 64))};
      for (int c = 0; c < 4; ++c)
        for (int h = 0; h < 2; ++h) {
          const __m256i v = _mm256_loadu_si256((const __m256i*)(p + 96 + 64 * c + 32 * h));
          u[4 * c + 2 * h] = _mm256_or_si256(_mm256_and_si256(v, low4), ql_x16_fifth_avx2(qh[h], 4 * c));
          u[4 * c + 2 * h + 1] =
              _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(v, 4), low4), ql_x16_fifth_avx2(qh[h], 16 + 4 * c));
        }
      for (int64_t r = 0; r < nr; ++r) {
        const int64_t at = r * a->n_in + b * 32;
        const int8_t* y = a->q + at;
        __m256i s0 = _mm256_setzero_si256(), s1 = _mm256_setzero_si256();
        for (int half = 0; half < 2; ++half) { /* i16 sums: 4 pairs of at most 2 * 31 * 127 stay below 2^15 */
          __m256i t0 = _mm256_setzero_si256(), t1 = _mm256_setzero_si256();
          for (int c = 2 * half; c < 2 * half + 2; ++c) {
            int32_t ylo, yhi;
            memcpy(&ylo, y + 4 * c, 4), memcpy(&yhi, y + 16 + 4 * c, 4);
            const __m256i bl = _mm256_set1_epi32(ylo), bh = _mm256_set1_epi32(yhi);
            t0 = _mm256_add_epi16(t0, _mm256_add_epi16(_mm256_maddubs_epi16(u[4 * c], bl),
                                                       _mm256_maddubs_epi16(u[4 * c + 1], bh)));
            t1 = _mm256_add_epi16(t1, _mm256_add_epi16(_mm256_maddubs_epi16(u[4 * c + 2], bl),
                                                       _mm256_maddubs_epi16(u[4 * c + 3], bh)));
          }
          s0 = _mm256_add_epi32(s0, _mm256_madd_epi16(t0, ones));
          s1 = _mm256_add_epi32(s1, _mm256_madd_epi16(t1, ones));
        }
        const __m256i off = _mm256_set1_epi32(16 * (a->sum16[at / 16] + a->sum16[at / 16 + 1]));
        const __m256 dx = _mm256_set1_ps(a->d[r * a->nb + b]);
        out[2 * r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(s0, off)), _mm256_mul_ps(d0, dx), out[2 * r]);
        out[2 * r + 1] =
            _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(s1, off)), _mm256_mul_ps(d1, dx), out[2 * r + 1]);
      }
    } else { /* Q8_0: maddubs wants one unsigned operand: |w|, and y takes w's sign */
      __m256i w[16], wa[16];
      for (int k = 0; k < 16; ++k) {
        w[k] = _mm256_loadu_si256((const __m256i*)(p + 32 + 32 * k));
        wa[k] = _mm256_sign_epi8(w[k], w[k]);
      }
      for (int64_t r = 0; r < nr; ++r) {
        const int8_t* y = a->q + r * a->n_in + b * 32;
        __m256i s0 = _mm256_setzero_si256(), s1 = _mm256_setzero_si256();
        for (int c = 0; c < 8; ++c) {
          int32_t yc;
          memcpy(&yc, y + 4 * c, 4);
          const __m256i bc = _mm256_set1_epi32(yc);
          s0 = _mm256_add_epi32(
              s0, _mm256_madd_epi16(_mm256_maddubs_epi16(wa[2 * c], _mm256_sign_epi8(bc, w[2 * c])), ones));
          s1 = _mm256_add_epi32(
              s1, _mm256_madd_epi16(_mm256_maddubs_epi16(wa[2 * c + 1], _mm256_sign_epi8(bc, w[2 * c + 1])), ones));
        }
        const __m256 dx = _mm256_set1_ps(a->d[r * a->nb + b]);
        out[2 * r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s0), _mm256_mul_ps(d0, dx), out[2 * r]);
        out[2 * r + 1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s1), _mm256_mul_ps(d1, dx), out[2 * r + 1]);
      }
    }
  }
}

/* Output rows [o0, o0 + 16) of y from one group (one copy per format; one activation row gets
 * its own, whose accumulators stay in registers). */
#define QL_X16_AVX2_FN(name, fmt)                                                                                  \
  QL_AVX2 static void name(const uint8_t* g, const ql_act* a, int64_t nr, int64_t o0, int64_t n_out,            \
                           const float* bias, float* y) {                                                         \
    __m256 out[2 * QL_MAX_ROWS];                                                                                  \
    if (nr == 1)                                                                                                  \
      ql_x16_avx2(fmt, g, a, 1, out);                                                                             \
    else                                                                                                          \
      ql_x16_avx2(fmt, g, a, nr, out);                                                                            \
    const __m256 b0 = bias ? _mm256_loadu_ps(bias + o0) : _mm256_setzero_ps();                                    \
    const __m256 b1 = bias ? _mm256_loadu_ps(bias + o0 + 8) : _mm256_setzero_ps();                                \
    for (int64_t r = 0; r < nr; ++r) {                                                                            \
      _mm256_storeu_ps(y + r * n_out + o0, _mm256_add_ps(out[2 * r], b0));                                        \
      _mm256_storeu_ps(y + r * n_out + o0 + 8, _mm256_add_ps(out[2 * r + 1], b1));                                \
    }                                                                                                             \
  }
QL_X16_AVX2_FN(ql_x16_q8_0_avx2, QL_Q8_0)
QL_X16_AVX2_FN(ql_x16_q4_0_avx2, QL_Q4_0)
QL_X16_AVX2_FN(ql_x16_q5_0_avx2, QL_Q5_0)

/* ---- AVX-512: a 64-byte chunk is one vector, lane i row i ---- */

/* Q5_0's fifth bits of weights j0..j0+3 of sixteen rows, as a mask over bytes 0..3 of each lane
 * (ql_x16_fifth_avx2's spread, then a per-byte bit test). */
QL_AVX512 QL_INLINE __mmask64 ql_x16_fifth_avx512(__m512i qh, int j0) {
  const char at = (char)(j0 / 8), sh = (char)(j0 % 8);
  const __m128i lane = _mm_set_epi8(12 + at, 12 + at, 12 + at, 12 + at, 8 + at, 8 + at, 8 + at, 8 + at, 4 + at, 4 + at,
                                    4 + at, 4 + at, at, at, at, at);
  const __m512i spread = _mm512_shuffle_epi8(qh, _mm512_broadcast_i32x4(lane));
  return _mm512_test_epi8_mask(spread, _mm512_set1_epi32((int)(0x08040201u << sh)));
}

QL_AVX512 QL_INLINE void ql_x16_avx512(const int fmt, const uint8_t* g, const ql_act* a, const int64_t nr,
                                       __m512* out) {
  const int64_t bytes = ql_block_bytes(fmt);
  const __m512i low4 = _mm512_set1_epi8(0x0F), ones = _mm512_set1_epi16(1), zero = _mm512_setzero_si512();
  for (int64_t r = 0; r < nr; ++r) out[r] = _mm512_setzero_ps();
  for (int64_t b = 0; b < a->nb; ++b) {
    const uint8_t* p = g + b * QL_IL * bytes;
    const __m512 dw = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p));
    if (fmt == QL_Q4_0) {
      __m512i lo[4], hi[4];
      for (int c = 0; c < 4; ++c) {
        const __m512i v = _mm512_loadu_si512((const void*)(p + 32 + 64 * c));
        lo[c] = _mm512_and_si512(v, low4), hi[c] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
      }
      for (int64_t r = 0; r < nr; ++r) {
        const int64_t at = r * a->n_in + b * 32;
        const int8_t* y = a->q + at;
        __m512i s = _mm512_setzero_si512();
        for (int c = 0; c < 4; ++c) { /* i16 sums: 8 pairs of at most 2 * 15 * 127 stay below 2^15 */
          int32_t ylo, yhi;
          memcpy(&ylo, y + 4 * c, 4), memcpy(&yhi, y + 16 + 4 * c, 4);
          s = _mm512_add_epi16(s, _mm512_add_epi16(_mm512_maddubs_epi16(lo[c], _mm512_set1_epi32(ylo)),
                                                   _mm512_maddubs_epi16(hi[c], _mm512_set1_epi32(yhi))));
        }
        const __m512i off = _mm512_set1_epi32(8 * (a->sum16[at / 16] + a->sum16[at / 16 + 1]));
        const __m512i isum = _mm512_sub_epi32(_mm512_madd_epi16(s, ones), off);
        out[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), _mm512_mul_ps(dw, _mm512_set1_ps(a->d[r * a->nb + b])),
                                 out[r]);
      }
    } else if (fmt == QL_Q5_0) {
      __m512i u[8]; /* [2c + k]: chunk c, k 0 the low nibbles (+16: the high) */
      const __m512i qh = _mm512_loadu_si512((const void*)(p + 32)), tens = _mm512_set1_epi8(0x10);
      for (int c = 0; c < 4; ++c) {
        const __m512i v = _mm512_loadu_si512((const void*)(p + 96 + 64 * c));
        const __m512i l = _mm512_and_si512(v, low4), h = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
        u[2 * c] = _mm512_mask_add_epi8(l, ql_x16_fifth_avx512(qh, 4 * c), l, tens);
        u[2 * c + 1] = _mm512_mask_add_epi8(h, ql_x16_fifth_avx512(qh, 16 + 4 * c), h, tens);
      }
      for (int64_t r = 0; r < nr; ++r) {
        const int64_t at = r * a->n_in + b * 32;
        const int8_t* y = a->q + at;
        __m512i s = _mm512_setzero_si512();
        for (int half = 0; half < 2; ++half) { /* i16 sums: 4 pairs of at most 2 * 31 * 127 stay below 2^15 */
          __m512i t = _mm512_setzero_si512();
          for (int c = 2 * half; c < 2 * half + 2; ++c) {
            int32_t ylo, yhi;
            memcpy(&ylo, y + 4 * c, 4), memcpy(&yhi, y + 16 + 4 * c, 4);
            t = _mm512_add_epi16(t, _mm512_add_epi16(_mm512_maddubs_epi16(u[2 * c], _mm512_set1_epi32(ylo)),
                                                     _mm512_maddubs_epi16(u[2 * c + 1], _mm512_set1_epi32(yhi))));
          }
          s = _mm512_add_epi32(s, _mm512_madd_epi16(t, ones));
        }
        const __m512i off = _mm512_set1_epi32(16 * (a->sum16[at / 16] + a->sum16[at / 16 + 1]));
        out[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(s, off)),
                                 _mm512_mul_ps(dw, _mm512_set1_ps(a->d[r * a->nb + b])), out[r]);
      }
    } else { /* Q8_0: |w| and y negated where w < 0 (AVX-512 has no vpsignb; w = 0 gives |w| = 0) */
      __m512i wa[8];
      __mmask64 neg[8];
      for (int c = 0; c < 8; ++c) {
        const __m512i w = _mm512_loadu_si512((const void*)(p + 32 + 64 * c));
        wa[c] = _mm512_abs_epi8(w), neg[c] = _mm512_movepi8_mask(w);
      }
      for (int64_t r = 0; r < nr; ++r) {
        const int8_t* y = a->q + r * a->n_in + b * 32;
        __m512i s = _mm512_setzero_si512();
        for (int c = 0; c < 8; ++c) {
          int32_t yc;
          memcpy(&yc, y + 4 * c, 4);
          const __m512i bc = _mm512_set1_epi32(yc);
          const __m512i sy = _mm512_mask_sub_epi8(bc, neg[c], zero, bc);
          s = _mm512_add_epi32(s, _mm512_madd_epi16(_mm512_maddubs_epi16(wa[c], sy), ones));
        }
        out[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), _mm512_mul_ps(dw, _mm512_set1_ps(a->d[r * a->nb + b])),
                                 out[r]);
      }
    }
  }
}

/* The 512-bit paths' group function (attr: the path's target; kernel: its ql_x16_* body). */
#define QL_X16_512_FN(attr, kernel, name, fmt)                                                                     \
  attr static void name(const uint8_t* g, const ql_act* a, int64_t nr, int64_t o0, int64_t n_out,               \
                        const float* bias, float* y) {                                                            \
    __m512 out[QL_MAX_ROWS];                                                                                      \
    if (nr == 1)                                                                                                  \
      kernel(fmt, g, a, 1, out);                                                                                  \
    else                                                                                                          \
      kernel(fmt, g, a, nr, out);                                                                                 \
    const __m512 b = bias ? _mm512_loadu_ps(bias + o0) : _mm512_setzero_ps();                                     \
    for (int64_t r = 0; r < nr; ++r) _mm512_storeu_ps(y + r * n_out + o0, _mm512_add_ps(out[r], b));              \
  }
QL_X16_512_FN(QL_AVX512, ql_x16_avx512, ql_x16_q8_0_avx512, QL_Q8_0)
QL_X16_512_FN(QL_AVX512, ql_x16_avx512, ql_x16_q4_0_avx512, QL_Q4_0)
QL_X16_512_FN(QL_AVX512, ql_x16_avx512, ql_x16_q5_0_avx512, QL_Q5_0)

/* ---- AVX-512 VNNI: vpdpbusd is maddubs + madd + add in one instruction ----
 * Its int32 sums of four u8 x s8 products are exact, and so are the AVX-512 code's (its i16
 * pair sums never saturate, see there): the same integers, the same float steps, so each
 * output is bitwise the AVX-512 and AVX2 paths'. Half the integer instructions per block,
 * which is what a many-row (batched decode) product is bound by. */

#define QL_VNNI __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")))

QL_VNNI QL_INLINE void ql_x16_vnni(const int fmt, const uint8_t* g, const ql_act* a, const int64_t nr, __m512* out) {
  const int64_t bytes = ql_block_bytes(fmt);
  const __m512i low4 = _mm512_set1_epi8(0x0F), zero = _mm512_setzero_si512();
  for (int64_t r = 0; r < nr; ++r) out[r] = _mm512_setzero_ps();
  for (int64_t b = 0; b < a->nb; ++b) {
    const uint8_t* p = g + b * QL_IL * bytes;
    const __m512 dw = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p));
    __m512i u[8]; /* Q4_0 / Q5_0: [2c + k], chunk c, k 0 the low nibbles (+16: the high) */
    __m512i wa[8];
    __mmask64 neg[8];
    if (fmt == QL_Q8_0) {
      for (int c = 0; c < 8; ++c) {
        const __m512i w = _mm512_loadu_si512((const void*)(p + 32 + 64 * c));
        wa[c] = _mm512_abs_epi8(w), neg[c] = _mm512_movepi8_mask(w);
      }
    } else {
      const int64_t qs = ql_qs_in_group(fmt);
      const __m512i qh = _mm512_loadu_si512((const void*)(p + 32)), tens = _mm512_set1_epi8(0x10);
      for (int c = 0; c < 4; ++c) {
        const __m512i v = _mm512_loadu_si512((const void*)(p + qs + 64 * c));
        const __m512i l = _mm512_and_si512(v, low4), h = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
        u[2 * c] = fmt == QL_Q5_0 ? _mm512_mask_add_epi8(l, ql_x16_fifth_avx512(qh, 4 * c), l, tens) : l;
        u[2 * c + 1] = fmt == QL_Q5_0 ? _mm512_mask_add_epi8(h, ql_x16_fifth_avx512(qh, 16 + 4 * c), h, tens) : h;
      }
    }
    for (int64_t r = 0; r < nr; ++r) {
      const int64_t at = r * a->n_in + b * 32;
      const int8_t* y = a->q + at;
      __m512i s = _mm512_setzero_si512();
      if (fmt == QL_Q8_0) {
        for (int c = 0; c < 8; ++c) {
          int32_t yc;
          memcpy(&yc, y + 4 * c, 4);
          const __m512i bc = _mm512_set1_epi32(yc);
          s = _mm512_dpbusd_epi32(s, wa[c], _mm512_mask_sub_epi8(bc, neg[c], zero, bc));
        }
      } else {
        for (int c = 0; c < 4; ++c) {
          int32_t ylo, yhi;
          memcpy(&ylo, y + 4 * c, 4), memcpy(&yhi, y + 16 + 4 * c, 4);
          s = _mm512_dpbusd_epi32(s, u[2 * c], _mm512_set1_epi32(ylo));
          s = _mm512_dpbusd_epi32(s, u[2 * c + 1], _mm512_set1_epi32(yhi));
        }
        const int offset = fmt == QL_Q5_0 ? 16 : 8;
        s = _mm512_sub_epi32(s, _mm512_set1_epi32(offset * (a->sum16[at / 16] + a->sum16[at / 16 + 1])));
      }
      out[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), _mm512_mul_ps(dw, _mm512_set1_ps(a->d[r * a->nb + b])), out[r]);
    }
  }
}

QL_X16_512_FN(QL_VNNI, ql_x16_vnni, ql_x16_q8_0_vnni, QL_Q8_0)
QL_X16_512_FN(QL_VNNI, ql_x16_vnni, ql_x16_q4_0_vnni, QL_Q4_0)
QL_X16_512_FN(QL_VNNI, ql_x16_vnni, ql_x16_q5_0_vnni, QL_Q5_0)

/* ---- the portable reference: each row unpacked to the file's layout, then ql_row_ref ---- */

static void ql_x16_ref(int fmt, const uint8_t* g, const ql_act* a, int64_t nr, int64_t o0, int64_t n_out,
                       const float* bias, float* y) {
  uint8_t* row = malloc((size_t)(a->nb * ql_block_bytes(fmt)));
  if (!row) abort(); /* a row's bytes; the caller checked n_in, so this is a few kilobytes */
  float out[QL_MAX_ROWS];
  for (int i = 0; i < QL_IL; ++i) {
    ql_x16_unpack_row(fmt, g, a->nb, i, row);
    ql_row_ref(fmt, row, a, 0, nr, out);
    for (int64_t r = 0; r < nr; ++r) y[r * n_out + o0 + i] = out[r] + (bias ? bias[o0 + i] : 0.0f);
  }
  free(row);
}

/* One group's outputs (activation rows 0..nr-1, output rows o0..o0+15). */
typedef void (*ql_x16_fn)(const uint8_t* g, const ql_act* a, int64_t nr, int64_t o0, int64_t n_out,
                          const float* bias, float* y);

static ql_x16_fn ql_pick_x16(int fmt, int isa) {
  if (isa == QL_ISA_AVX512_VNNI)
    return fmt == QL_Q8_0 ? ql_x16_q8_0_vnni : fmt == QL_Q4_0 ? ql_x16_q4_0_vnni : ql_x16_q5_0_vnni;
  if (isa == QL_ISA_AVX512)
    return fmt == QL_Q8_0 ? ql_x16_q8_0_avx512 : fmt == QL_Q4_0 ? ql_x16_q4_0_avx512 : ql_x16_q5_0_avx512;
  if (isa == QL_ISA_AVX2)
    return fmt == QL_Q8_0 ? ql_x16_q8_0_avx2 : fmt == QL_Q4_0 ? ql_x16_q4_0_avx2 : ql_x16_q5_0_avx2;
  return 0;
}
