/* The AVX2 path of quant_linear.c (#included there; not built on its own).
 *
 * A weight block is unpacked once into bytes (unsigned 0..63, or signed for Q8_0) and
 * then multiplied with every row's int8 activations: maddubs (u8 x s8 -> pairs of i16,
 * which cannot saturate for these ranges) and madd (-> 8 x i32). A block's integer sums
 * are exact; each becomes float once, times the product of the two scales.
 */

#define QL_AVX2 __attribute__((target("avx2,fma,f16c")))
#define QL_INLINE static inline __attribute__((always_inline))

QL_AVX2 QL_INLINE float ql_h2f(const uint8_t* p) {
  uint16_t h;
  memcpy(&h, p, 2);
  return _cvtsh_ss(h);
}

/* 16 bytes of nibbles as 32 bytes: low nibbles are elements 0..15, high ones 16..31. The
 * broadcast load and the per-half shift keep the unpacking off the shuffle port. */
QL_AVX2 QL_INLINE __m256i ql_nibbles(const uint8_t* qs) {
  const __m256i b = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i*)qs));
  return _mm256_and_si256(_mm256_srlv_epi64(b, _mm256_set_epi64x(4, 4, 0, 0)), _mm256_set1_epi8(0x0F));
}

/* The 32 bits at p as 32 bytes, 0x10 where the bit is set (the fifth bit of Q5_0/Q5_1). */
QL_AVX2 QL_INLINE __m256i ql_fifth_bits(const uint8_t* p) {
  uint32_t bits;
  memcpy(&bits, p, 4);
  const __m256i spread = _mm256_shuffle_epi8(
      _mm256_set1_epi32((int)bits),
      _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202, 0x0101010101010101, 0x0000000000000000));
  /* byte j holds bit j%8 of its source byte: OR in every other bit, then all-ones means set */
  const __m256i set = _mm256_cmpeq_epi8(_mm256_or_si256(spread, _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe)),
                                        _mm256_set1_epi64x(-1));
  return _mm256_and_si256(set, _mm256_set1_epi8(0x10));
}

/* One 32-weight block: weights d * q + m. For the symmetric formats (Q8_0, Q4_0 and Q5_0,
 * their offsets 8 and 16 subtracted here) q is signed, and maddubs, which wants one
 * unsigned operand, gets |q| (qa, once per block) and each row's y with q's sign; for
 * Q4_1/Q5_1 q is unsigned (qa = q) and m is applied through the row's block sums. */
typedef struct {
  __m256i q, qa;
  float d, m;
} ql_blk32;

static inline int ql_signed32(int fmt) { return fmt == QL_Q8_0 || fmt == QL_Q4_0 || fmt == QL_Q5_0; }

QL_AVX2 QL_INLINE ql_blk32 ql_decode32(const int fmt, const uint8_t* p) {
  ql_blk32 k;
  k.d = ql_h2f(p), k.m = 0.0f;
  switch (fmt) {
    case QL_Q8_0: k.q = _mm256_loadu_si256((const __m256i*)(p + 2)); break;
    case QL_Q4_0: k.q = _mm256_sub_epi8(ql_nibbles(p + 2), _mm256_set1_epi8(8)); break;
    case QL_Q4_1: k.q = ql_nibbles(p + 4), k.m = ql_h2f(p + 2); break;
    case QL_Q5_0:
      k.q = _mm256_sub_epi8(_mm256_or_si256(ql_nibbles(p + 6), ql_fifth_bits(p + 2)), _mm256_set1_epi8(16));
      break;
    default: /* QL_Q5_1 */
      k.q = _mm256_or_si256(ql_nibbles(p + 8), ql_fifth_bits(p + 4)), k.m = ql_h2f(p + 2);
      break;
  }
  k.qa = ql_signed32(fmt) ? _mm256_sign_epi8(k.q, k.q) : k.q;
  return k;
}

/* sum q_j y_j as 8 partial sums (in float: exact, they are < 2^24). */
QL_AVX2 QL_INLINE __m256 ql_dot32(const int fmt, const ql_blk32* k, __m256i y) {
  if (ql_signed32(fmt)) y = _mm256_sign_epi8(y, k->q);
  return _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_maddubs_epi16(k->qa, y), _mm256_set1_epi16(1)));
}

/* Block b of one weight row times nr activation rows into acc (and Q4_1/Q5_1's min term into accs). */
QL_AVX2 QL_INLINE void ql_step32_avx2(const int fmt, const uint8_t* w, int64_t b, const ql_act* a, const int64_t nr,
                                      __m256* acc, float* accs) {
  const ql_blk32 k = ql_decode32(fmt, w + b * ql_block_bytes(fmt));
  for (int64_t r = 0; r < nr; ++r) {
    const __m256i y = _mm256_loadu_si256((const __m256i*)(a->q + r * a->n_in + b * 32));
    acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(k.d * a->d[r * a->nb + b]), ql_dot32(fmt, &k, y), acc[r]);
    if (!ql_signed32(fmt)) accs[r] = fmaf(k.m, a->s[r * a->nb + b], accs[r]);
  }
}

/* out[r] = (row r of x) . (one weight row) for the 32-weight block formats. Even and odd
 * blocks go to separate accumulators so one row has two independent FMA chains. */
QL_AVX2 QL_INLINE void ql_row32_avx2(const int fmt, const uint8_t* w, const ql_act* a, const int64_t nr, float* out) {
  __m256 acc0[QL_MAX_ROWS], acc1[QL_MAX_ROWS];
  float accs0[QL_MAX_ROWS], accs1[QL_MAX_ROWS];
  for (int64_t r = 0; r < nr; ++r) acc0[r] = acc1[r] = _mm256_setzero_ps(), accs0[r] = accs1[r] = 0.0f;
  int64_t b = 0;
  for (; b + 2 <= a->nb; b += 2) {
    ql_step32_avx2(fmt, w, b, a, nr, acc0, accs0);
    ql_step32_avx2(fmt, w, b + 1, a, nr, acc1, accs1);
  }
  if (b < a->nb) ql_step32_avx2(fmt, w, b, a, nr, acc0, accs0);
  for (int64_t r = 0; r < nr; ++r) out[r] = hsum(_mm256_add_ps(acc0[r], acc1[r])) + (accs0[r] + accs1[r]);
}

/* ---- eight weight rows per pass (the 32-weight formats) ----
 *
 * At one activation row the block-at-a-time kernel above spends most of its ~6 cycles per
 * block on work that does not depend on the weight row: loading and sign-adjusting y,
 * turning the integer sum into float, a scalar scale. So, as llama.cpp's repacked gemv
 * does, eight weight rows go through together: each row's block is unpacked to unsigned
 * bytes (Q8_0: |q|, y taking q's sign), multiplied with the shared y, and the eight integer
 * sums are folded (hadd) into the eight lanes of one vector, one lane per weight row. The
 * offset (Q4_0 8, Q5_0 16) comes off in integers, through the block's sum of y, and the
 * float step, scales and accumulation run once per block for all eight rows. The weights
 * stay in the file's layout: the eight scales are gathered.
 *
 * The integer sum of a block is exact, and each output takes one fma per block (two for
 * Q4_1/Q5_1: the min term in its own chain) in block order, so a row's result does not
 * depend on n_rows; the rows past n_out in the last group repeat the last weight row and
 * are not stored. */
#define QL_GROUP 8

/* A 32-weight block as unsigned bytes for maddubs: Q4_0/Q4_1 0..15, Q5_0/Q5_1 0..31, Q8_0 |q|
 * (its signed q in *sq for the sign trick). */
QL_AVX2 QL_INLINE __m256i ql_unsigned32(const int fmt, const uint8_t* p, __m256i* sq) {
  switch (fmt) {
    case QL_Q8_0: *sq = _mm256_loadu_si256((const __m256i*)(p + 2)); return _mm256_sign_epi8(*sq, *sq);
    case QL_Q4_0: return ql_nibbles(p + 2);
    case QL_Q4_1: return ql_nibbles(p + 4);
    case QL_Q5_0: return _mm256_or_si256(ql_nibbles(p + 6), ql_fifth_bits(p + 2));
    default: return _mm256_or_si256(ql_nibbles(p + 8), ql_fifth_bits(p + 4)); /* QL_Q5_1 */
  }
}

/* Lanes i of the eight 8 x i32 vectors p[i], summed: lane i of the result is sum(p[i]). */
QL_AVX2 QL_INLINE __m256i ql_fold8(const __m256i* p) {
  const __m256i a = _mm256_hadd_epi32(_mm256_hadd_epi32(p[0], p[1]), _mm256_hadd_epi32(p[2], p[3]));
  const __m256i b = _mm256_hadd_epi32(_mm256_hadd_epi32(p[4], p[5]), _mm256_hadd_epi32(p[6], p[7]));
  /* a: rows 0-3 (low half: the first 16 weights' sums, high half: the last 16's), b: rows 4-7 */
  return _mm256_add_epi32(_mm256_permute2x128_si256(a, b, 0x21), _mm256_blend_epi32(a, b, 0xF0));
}

/* The fp16 at byte `at` of each of eight rows (rows[i] = i * row_bytes), and the fp16 after
 * it (Q4_1/Q5_1's min) into *m when asked: one gather of 32 bits per row. */
QL_AVX2 QL_INLINE __m256 ql_gather_fp16(const uint8_t* at, __m256i rows, __m256* m) {
  const __m256i g = _mm256_i32gather_epi32((const int*)at, rows, 1);
  const __m256i lo = _mm256_set_epi8(-1, -1, -1, -1, -1, -1, -1, -1, 13, 12, 9, 8, 5, 4, 1, 0, -1, -1, -1, -1, -1,
                                     -1, -1, -1, 13, 12, 9, 8, 5, 4, 1, 0);
  if (m) {
    const __m256i hi = _mm256_shuffle_epi8(g, _mm256_set_epi8(-1, -1, -1, -1, -1, -1, -1, -1, 15, 14, 11, 10, 7, 6, 3, 2,
                                                              -1, -1, -1, -1, -1, -1, -1, -1, 15, 14, 11, 10, 7, 6, 3, 2));
    *m = _mm256_cvtph_ps(_mm256_castsi256_si128(_mm256_permute4x64_epi64(hi, 0x08)));
  }
  return _mm256_cvtph_ps(_mm256_castsi256_si128(_mm256_permute4x64_epi64(_mm256_shuffle_epi8(g, lo), 0x08)));
}

/* Weight rows w, w + row_bytes, ... (eight; `rows` their byte offsets) times activation rows
 * 0..nr-1 into out (nr, 8). */
QL_AVX2 QL_INLINE void ql_group32_avx2(const int fmt, const uint8_t* w, __m256i rows, const ql_act* a,
                                       const int64_t nr, __m256* out) {
  __m256 acc[QL_MAX_ROWS], accm[QL_MAX_ROWS];
  const int asym = fmt == QL_Q4_1 || fmt == QL_Q5_1;
  const int offset = fmt == QL_Q4_0 ? 8 : fmt == QL_Q5_0 ? 16 : 0;
  for (int64_t r = 0; r < nr; ++r) acc[r] = accm[r] = _mm256_setzero_ps();
  const int64_t bytes = ql_block_bytes(fmt);
  const __m256i ones = _mm256_set1_epi16(1);
  int row_at[QL_GROUP];
  _mm256_storeu_si256((__m256i*)row_at, rows);
  for (int64_t b = 0; b < a->nb; ++b) {
    const uint8_t* blk = w + b * bytes;
    __m256i u[QL_GROUP], sq[QL_GROUP];
    for (int i = 0; i < QL_GROUP; ++i) u[i] = ql_unsigned32(fmt, blk + row_at[i], &sq[i]);
    __m256 mw = _mm256_setzero_ps();
    const __m256 dw = ql_gather_fp16(blk, rows, asym ? &mw : 0);
    for (int64_t r = 0; r < nr; ++r) {
      const int64_t at = r * a->n_in + b * 32;
      const __m256i y = _mm256_loadu_si256((const __m256i*)(a->q + at));
      __m256i p[QL_GROUP];
      for (int i = 0; i < QL_GROUP; ++i)
        p[i] = _mm256_madd_epi16(_mm256_maddubs_epi16(u[i], fmt == QL_Q8_0 ? _mm256_sign_epi8(y, sq[i]) : y), ones);
      __m256i isum = ql_fold8(p);
      if (offset) isum = _mm256_sub_epi32(isum, _mm256_set1_epi32(offset * (a->sum16[at / 16] + a->sum16[at / 16 + 1])));
      const float dx = a->d[r * a->nb + b];
      acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), _mm256_mul_ps(dw, _mm256_set1_ps(dx)), acc[r]);
      if (asym) accm[r] = _mm256_fmadd_ps(mw, _mm256_set1_ps(a->s[r * a->nb + b]), accm[r]);
    }
  }
  for (int64_t r = 0; r < nr; ++r) out[r] = asym ? _mm256_add_ps(acc[r], accm[r]) : acc[r];
}

/* One group function per format; one activation row gets its own copy (accumulators in registers). */
typedef void (*ql_group_fn)(const uint8_t* w, __m256i rows, const ql_act* a, int64_t nr, __m256* out);
#define QL_GROUP_FN(name, fmt)                                                                          \
  QL_AVX2 static void name(const uint8_t* w, __m256i rows, const ql_act* a, int64_t nr, __m256* out) { \
    if (nr == 1)                                                                                        \
      ql_group32_avx2(fmt, w, rows, a, 1, out);                                                         \
    else                                                                                                \
      ql_group32_avx2(fmt, w, rows, a, nr, out);                                                        \
  }
QL_GROUP_FN(ql_group_q8_0_avx2, QL_Q8_0)
QL_GROUP_FN(ql_group_q4_0_avx2, QL_Q4_0)
QL_GROUP_FN(ql_group_q4_1_avx2, QL_Q4_1)
QL_GROUP_FN(ql_group_q5_0_avx2, QL_Q5_0)
QL_GROUP_FN(ql_group_q5_1_avx2, QL_Q5_1)

static ql_group_fn ql_pick_group_avx2(int fmt) {
  switch (fmt) {
    case QL_Q8_0: return ql_group_q8_0_avx2;
    case QL_Q4_0: return ql_group_q4_0_avx2;
    case QL_Q4_1: return ql_group_q4_1_avx2;
    case QL_Q5_0: return ql_group_q5_0_avx2;
    case QL_Q5_1: return ql_group_q5_1_avx2;
    default: return 0;
  }
}

/* Output rows [o0, o0 + 8) of y (clamped to n_out) through a group function. */
QL_AVX2 static void ql_group_rows(ql_group_fn fn, const uint8_t* w, int64_t row_bytes, int64_t o0, int64_t n_out,
                                  const ql_act* a, int64_t nr, const float* bias, float* y) {
  int at[QL_GROUP];
  for (int i = 0; i < QL_GROUP; ++i) at[i] = (int)((o0 + i < n_out ? i : n_out - 1 - o0) * row_bytes);
  __m256 out[QL_MAX_ROWS];
  fn(w + o0 * row_bytes, _mm256_loadu_si256((const __m256i*)at), a, nr, out);
  const int64_t n = n_out - o0 < QL_GROUP ? n_out - o0 : QL_GROUP;
  for (int64_t r = 0; r < nr; ++r) {
    float v[QL_GROUP];
    _mm256_storeu_ps(v, out[r]);
    for (int64_t i = 0; i < n; ++i) y[r * n_out + o0 + i] = v[i] + (bias ? bias[o0 + i] : 0.0f);
  }
}

/* One 256-weight K-quant superblock unpacked: 8 chunks of 32 bytes q, each chunk's integer
 * scales as i16 (two per chunk for Q6_K, one per 16 weights), and `off`: the mins per 16
 * weights (Q4_K/Q5_K, times dmin) or the Q6_K scales (times the offset 32). */
typedef struct {
  __m256i q[8], sc[8], off;
  float d, dmin;
} ql_blkK;

QL_AVX2 QL_INLINE void ql_decodeK(const int fmt, const uint8_t* p, ql_blkK* k) {
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  if (fmt == QL_Q6_K) { /* ql[128] qh[64] scales[16] d */
    k->d = ql_h2f(p + 208), k->dmin = 0.0f;
    const __m256i three = _mm256_set1_epi8(3);
    for (int n = 0; n < 2; ++n) {
      const __m256i l0 = _mm256_loadu_si256((const __m256i*)(p + 64 * n));
      const __m256i l1 = _mm256_loadu_si256((const __m256i*)(p + 64 * n + 32));
      const __m256i h = _mm256_loadu_si256((const __m256i*)(p + 128 + 32 * n));
      /* bits 2c..2c+1 of qh are the top bits of chunk c; shifting 16-bit lanes then
         masking per byte keeps each byte's own bits */
      k->q[4 * n + 0] = _mm256_or_si256(_mm256_and_si256(l0, low4), _mm256_slli_epi16(_mm256_and_si256(h, three), 4));
      k->q[4 * n + 1] = _mm256_or_si256(_mm256_and_si256(l1, low4),
                                        _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(h, 2), three), 4));
      k->q[4 * n + 2] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l0, 4), low4),
                                        _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(h, 4), three), 4));
      k->q[4 * n + 3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l1, 4), low4),
                                        _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(h, 6), three), 4));
    }
    const int8_t* sc = (const int8_t*)(p + 192);
    for (int c = 0; c < 8; ++c)
      k->sc[c] = _mm256_set_m128i(_mm_set1_epi16(sc[2 * c + 1]), _mm_set1_epi16(sc[2 * c]));
    k->off = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)sc));
    return;
  }
  /* Q4_K: d dmin scales[12] qs[128]; Q5_K: d dmin scales[12] qh[32] qs[128] */
  k->d = ql_h2f(p), k->dmin = ql_h2f(p + 2);
  const uint8_t* qs = p + (fmt == QL_Q5_K ? 48 : 16);
  for (int j = 0; j < 4; ++j) {
    const __m256i v = _mm256_loadu_si256((const __m256i*)(qs + 32 * j));
    k->q[2 * j] = _mm256_and_si256(v, low4);
    k->q[2 * j + 1] = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
  }
  if (fmt == QL_Q5_K) { /* bit c of qh[l] is the fifth bit of weight l of chunk c */
    const __m256i h = _mm256_loadu_si256((const __m256i*)(p + 16)), one = _mm256_set1_epi8(1);
    for (int c = 0; c < 8; ++c)
      k->q[c] = _mm256_or_si256(
          k->q[c], _mm256_slli_epi16(_mm256_and_si256(_mm256_srl_epi16(h, _mm_cvtsi32_si128(c)), one), 4));
  }
  /* the eight 6-bit scales and mins (ql_scale_min_k4) in one pass over the 12 bytes, as
     ggml does: bytes 0..7 of u the scales, 8..15 the mins; then spread without a scalar
     store (16 stores read back as one vector stalled on store forwarding) */
  uint32_t u[4];
  memcpy(u, p + 4, 12);
  u[3] = ((u[2] >> 4) & 0x0f0f0f0f) | (((u[1] >> 6) & 0x03030303) << 4);
  const uint32_t m03 = u[1] & 0x3f3f3f3f;
  u[1] = (u[2] & 0x0f0f0f0f) | (((u[0] >> 6) & 0x03030303) << 4);
  u[2] = m03;
  u[0] &= 0x3f3f3f3f;
  const __m128i sm = _mm_set_epi32((int)u[3], (int)u[2], (int)u[1], (int)u[0]);
  const __m256i scales = _mm256_broadcastsi128_si256(_mm_cvtepu8_epi16(sm));
  for (int c = 0; c < 8; ++c) k->sc[c] = _mm256_shuffle_epi8(scales, _mm256_set1_epi16((short)(2 * c | (2 * c + 1) << 8)));
  const __m128i mins = _mm_unpackhi_epi64(sm, sm); /* m0..m7 */
  k->off = _mm256_cvtepu8_epi16(_mm_unpacklo_epi8(mins, mins));
}

/* The integer part of row r's dot with superblock B, as 8 x i32 (the scales applied). */
QL_AVX2 QL_INLINE __m256i ql_isumK_avx2(const ql_blkK* k, const int8_t* y) {
  __m256i isum = _mm256_setzero_si256();
  for (int c = 0; c < 8; ++c) {
    const __m256i p = _mm256_maddubs_epi16(k->q[c], _mm256_loadu_si256((const __m256i*)(y + 32 * c)));
    isum = _mm256_add_epi32(isum, _mm256_madd_epi16(p, k->sc[c]));
  }
  return isum;
}

/* The superblock's offset term and the float step, shared by the AVX2 and AVX-512 paths:
 * Q6_K subtracts 32 * sum_g sc_g * (sum of y over group g) in integers; Q4_K/Q5_K subtract
 * dmin * sum_c m_c * (sum of y over chunk c), a second float term. */
QL_AVX2 QL_INLINE __m256 ql_finishK(const int fmt, const ql_blkK* k, __m256i isum, const int16_t* sum16, float dx,
                                    __m256 acc) {
  const __m256i o = _mm256_madd_epi16(k->off, _mm256_loadu_si256((const __m256i*)sum16));
  if (fmt == QL_Q6_K) return _mm256_fmadd_ps(_mm256_set1_ps(k->d * dx), _mm256_cvtepi32_ps(_mm256_sub_epi32(isum, _mm256_slli_epi32(o, 5))), acc);
  acc = _mm256_fmadd_ps(_mm256_set1_ps(k->d * dx), _mm256_cvtepi32_ps(isum), acc);
  return _mm256_fmadd_ps(_mm256_set1_ps(-k->dmin * dx), _mm256_cvtepi32_ps(o), acc);
}

QL_AVX2 QL_INLINE void ql_rowK_avx2(const int fmt, const uint8_t* w, const ql_act* a, const int64_t nr, float* out) {
  __m256 acc[QL_MAX_ROWS];
  for (int64_t r = 0; r < nr; ++r) acc[r] = _mm256_setzero_ps();
  ql_blkK k;
  for (int64_t B = 0; B < a->nb; ++B) {
    ql_decodeK(fmt, w + B * ql_block_bytes(fmt), &k);
    for (int64_t r = 0; r < nr; ++r) {
      const __m256i isum = ql_isumK_avx2(&k, a->q + r * a->n_in + B * 256);
      acc[r] = ql_finishK(fmt, &k, isum, a->sum16 + (r * a->nb + B) * 16, a->d[r * a->nb + B], acc[r]);
    }
  }
  for (int64_t r = 0; r < nr; ++r) out[r] = hsum(acc[r]);
}

/* F16 / BF16 weights times fp32 x: no activation rounding, 16 weights a step in two chains. */
QL_AVX2 QL_INLINE __m256 ql_widen8(const int fmt, const uint8_t* p) {
  const __m128i h = _mm_loadu_si128((const __m128i*)p);
  if (fmt == QL_F16) return _mm256_cvtph_ps(h);
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

QL_AVX2 QL_INLINE void ql_rowF_avx2(const int fmt, const uint8_t* w, const float* x, int64_t n_in, const int64_t nr,
                                    float* out) {
  __m256 acc0[QL_MAX_ROWS], acc1[QL_MAX_ROWS];
  for (int64_t r = 0; r < nr; ++r) acc0[r] = acc1[r] = _mm256_setzero_ps();
  const int64_t n16 = n_in & ~(int64_t)15;
  for (int64_t i = 0; i < n16; i += 16) {
    const __m256 w0 = ql_widen8(fmt, w + 2 * i), w1 = ql_widen8(fmt, w + 2 * i + 16);
    for (int64_t r = 0; r < nr; ++r) {
      acc0[r] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + r * n_in + i), acc0[r]);
      acc1[r] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + r * n_in + i + 8), acc1[r]);
    }
  }
  for (int64_t r = 0; r < nr; ++r) out[r] = hsum(_mm256_add_ps(acc0[r], acc1[r]));
  for (int64_t i = n16; i < n_in; ++i) /* the last < 16 weights, in order */
    for (int64_t r = 0; r < nr; ++r) out[r] = fmaf(ql_wide_ref(fmt, w + 2 * i), x[r * n_in + i], out[r]);
}

/* One weight row times nr rows, one function per format (fmt is a constant inside); a
 * single row gets its own copy whose accumulators stay in registers. */
#define QL_ROW_FN(isa, name, fmt, body)                                                                   \
  isa static void name(int qtype, const uint8_t* w, const ql_act* a, const float* x, int64_t nr,         \
                       float* out) {                                                                      \
    (void)qtype, (void)x;                                                                                 \
    if (nr == 1)                                                                                          \
      body(fmt, w, a, x, 1, out);                                                                         \
    else                                                                                                  \
      body(fmt, w, a, x, nr, out);                                                                        \
  }

#define QL_BODY32_AVX2(fmt, w, a, x, nr, out) ql_row32_avx2(fmt, w, a, nr, out)
#define QL_BODYK_AVX2(fmt, w, a, x, nr, out) ql_rowK_avx2(fmt, w, a, nr, out)
#define QL_BODYF_AVX2(fmt, w, a, x, nr, out) ql_rowF_avx2(fmt, w, x, (a)->n_in, nr, out)
QL_ROW_FN(QL_AVX2, ql_q8_0_avx2, QL_Q8_0, QL_BODY32_AVX2)
QL_ROW_FN(QL_AVX2, ql_q4_0_avx2, QL_Q4_0, QL_BODY32_AVX2)
QL_ROW_FN(QL_AVX2, ql_q4_1_avx2, QL_Q4_1, QL_BODY32_AVX2)
QL_ROW_FN(QL_AVX2, ql_q5_0_avx2, QL_Q5_0, QL_BODY32_AVX2)
QL_ROW_FN(QL_AVX2, ql_q5_1_avx2, QL_Q5_1, QL_BODY32_AVX2)
QL_ROW_FN(QL_AVX2, ql_q4_k_avx2, QL_Q4_K, QL_BODYK_AVX2)
QL_ROW_FN(QL_AVX2, ql_q5_k_avx2, QL_Q5_K, QL_BODYK_AVX2)
QL_ROW_FN(QL_AVX2, ql_q6_k_avx2, QL_Q6_K, QL_BODYK_AVX2)
QL_ROW_FN(QL_AVX2, ql_f16_avx2, QL_F16, QL_BODYF_AVX2)
QL_ROW_FN(QL_AVX2, ql_bf16_avx2, QL_BF16, QL_BODYF_AVX2)

static ql_row_fn ql_pick_avx2(int fmt) {
  switch (fmt) {
    case QL_Q8_0: return ql_q8_0_avx2;
    case QL_Q4_0: return ql_q4_0_avx2;
    case QL_Q4_1: return ql_q4_1_avx2;
    case QL_Q5_0: return ql_q5_0_avx2;
    case QL_Q5_1: return ql_q5_1_avx2;
    case QL_Q4_K: return ql_q4_k_avx2;
    case QL_Q5_K: return ql_q5_k_avx2;
    case QL_Q6_K: return ql_q6_k_avx2;
    case QL_F16: return ql_f16_avx2;
    case QL_BF16: return ql_bf16_avx2;
    default: return 0;
  }
}

/* ---- dequantization to fp32 (qkv_quant_dequantize) ---- */

/* 32 int8 values (q) as fp32 times scale (plus m where asym), stored to out[0..32). The
 * products are exact, so fmadd rounds d * q + m exactly as the separate mul and add do. */
QL_AVX2 QL_INLINE void ql_store32_scaled(__m256i q, __m256 d, __m256 m, const int asym, float* out) {
  const __m128i lo = _mm256_castsi256_si128(q), hi = _mm256_extracti128_si256(q, 1);
  const __m128i part[4] = {lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)};
  for (int i = 0; i < 4; ++i) {
    const __m256 v = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(part[i]));
    _mm256_storeu_ps(out + 8 * i, asym ? _mm256_fmadd_ps(v, d, m) : _mm256_mul_ps(v, d));
  }
}

/* Q6_K's 16-weight groups have their own scales: the same store with two. */
QL_AVX2 QL_INLINE void ql_store32_two_scales(__m256i q, __m256 d0, __m256 d1, float* out) {
  const __m128i lo = _mm256_castsi256_si128(q), hi = _mm256_extracti128_si256(q, 1);
  _mm256_storeu_ps(out, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(lo)), d0));
  _mm256_storeu_ps(out + 8, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(lo, 8))), d0));
  _mm256_storeu_ps(out + 16, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(hi)), d1));
  _mm256_storeu_ps(out + 24, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(hi, 8))), d1));
}

QL_AVX2 QL_INLINE void ql_deq32_avx2(const int fmt, const uint8_t* w, int64_t n_in, float* out) {
  const int asym = fmt == QL_Q4_1 || fmt == QL_Q5_1;
  for (int64_t b = 0; b < n_in / 32; ++b) {
    const ql_blk32 k = ql_decode32(fmt, w + b * ql_block_bytes(fmt));
    ql_store32_scaled(k.q, _mm256_set1_ps(k.d), _mm256_set1_ps(k.m), asym, out + 32 * b);
  }
}

/* Chunk c of a superblock is weights 32c..32c+31 (ql_decodeK's order): Q4_K/Q5_K weight
 * (d * sc_c) * q - dmin * m_c, Q6_K (d * sc_g) * (q - 32) per 16-weight group g. */
QL_AVX2 QL_INLINE void ql_deqK_avx2(const int fmt, const uint8_t* w, int64_t n_in, float* out) {
  ql_blkK k;
  for (int64_t B = 0; B < n_in / 256; ++B) {
    const uint8_t* p = w + B * ql_block_bytes(fmt);
    ql_decodeK(fmt, p, &k);
    float* o = out + 256 * B;
    for (int c = 0; c < 8; ++c) {
      if (fmt == QL_Q6_K) {
        const int8_t* sc = (const int8_t*)(p + 192);
        ql_store32_two_scales(_mm256_sub_epi8(k.q[c], _mm256_set1_epi8(32)), _mm256_set1_ps(k.d * (float)sc[2 * c]),
                              _mm256_set1_ps(k.d * (float)sc[2 * c + 1]), o + 32 * c);
      } else {
        uint8_t sc, m;
        ql_scale_min_k4(c, p + 4, &sc, &m);
        /* q * step - dm: fmadd with -dm is the rounded difference of an exact product */
        ql_store32_scaled(k.q[c], _mm256_set1_ps(k.d * (float)sc), _mm256_set1_ps(-(k.dmin * (float)m)), 1, o + 32 * c);
      }
    }
  }
}

QL_AVX2 QL_INLINE void ql_deqF_avx2(const int fmt, const uint8_t* w, int64_t n_in, float* out) {
  const int64_t n8 = n_in & ~(int64_t)7;
  for (int64_t i = 0; i < n8; i += 8) _mm256_storeu_ps(out + i, ql_widen8(fmt, w + 2 * i));
  for (int64_t i = n8; i < n_in; ++i) out[i] = ql_wide_ref(fmt, w + 2 * i);
}

#define QL_DEQ_FN(name, fmt, body) \
  QL_AVX2 static void name(int qtype, const uint8_t* w, int64_t n_in, float* out) { \
    (void)qtype;                                                                   \
    body(fmt, w, n_in, out);                                                       \
  }
QL_DEQ_FN(ql_deq_q8_0_avx2, QL_Q8_0, ql_deq32_avx2)
QL_DEQ_FN(ql_deq_q4_0_avx2, QL_Q4_0, ql_deq32_avx2)
QL_DEQ_FN(ql_deq_q4_1_avx2, QL_Q4_1, ql_deq32_avx2)
QL_DEQ_FN(ql_deq_q5_0_avx2, QL_Q5_0, ql_deq32_avx2)
QL_DEQ_FN(ql_deq_q5_1_avx2, QL_Q5_1, ql_deq32_avx2)
QL_DEQ_FN(ql_deq_q4_k_avx2, QL_Q4_K, ql_deqK_avx2)
QL_DEQ_FN(ql_deq_q5_k_avx2, QL_Q5_K, ql_deqK_avx2)
QL_DEQ_FN(ql_deq_q6_k_avx2, QL_Q6_K, ql_deqK_avx2)
QL_DEQ_FN(ql_deq_f16_avx2, QL_F16, ql_deqF_avx2)
QL_DEQ_FN(ql_deq_bf16_avx2, QL_BF16, ql_deqF_avx2)

static ql_deq_fn ql_pick_deq_avx2(int fmt) {
  switch (fmt) {
    case QL_Q8_0: return ql_deq_q8_0_avx2;
    case QL_Q4_0: return ql_deq_q4_0_avx2;
    case QL_Q4_1: return ql_deq_q4_1_avx2;
    case QL_Q5_0: return ql_deq_q5_0_avx2;
    case QL_Q5_1: return ql_deq_q5_1_avx2;
    case QL_Q4_K: return ql_deq_q4_k_avx2;
    case QL_Q5_K: return ql_deq_q5_k_avx2;
    case QL_Q6_K: return ql_deq_q6_k_avx2;
    case QL_F16: return ql_deq_f16_avx2;
    case QL_BF16: return ql_deq_bf16_avx2;
    default: return ql_deq_row_ref;
  }
}
