// AVX-512 (F, BW, VL, DQ, VNNI) kernels. Compiled with those flags only; chosen at run time.
#include "backend/cpu/kernels.h"

#if defined(__x86_64__)
#if defined(__AVX512F__) && defined(__AVX512VNNI__) && defined(__AVX512BW__)
#include <immintrin.h>

#include <cmath>

namespace kestrel::backend::cpu {
namespace {

using quant::DType;

void quantize_acts_avx512(const float* x, int64_t k, uint8_t* row_out) {
  auto* q1 = reinterpret_cast<int8_t*>(row_out);
  auto* q2 = reinterpret_cast<int8_t*>(row_out + k);
  auto* d = reinterpret_cast<float*>(row_out + 2 * k);
  auto* s = reinterpret_cast<int32_t*>(row_out + 2 * k + 4 * (k / kBlock));
  const __m512 sign_mask = _mm512_castsi512_ps(_mm512_set1_epi32(0x7fffffff));
  const __m512 inv128 = _mm512_set1_ps(1.0f / 128.0f);
  for (int64_t b = 0; b < k / kBlock; ++b) {
    const __m512 v0 = _mm512_loadu_ps(x + b * kBlock);
    const __m512 v1 = _mm512_loadu_ps(x + b * kBlock + 16);
    const __m512 a = _mm512_max_ps(_mm512_and_ps(v0, sign_mask), _mm512_and_ps(v1, sign_mask));
    const float unit = _mm512_reduce_max_ps(a) / (127.0f * 128.0f);
    const __m512 inv = _mm512_set1_ps(unit > 0 ? 1.0f / unit : 0.0f);
    // round to nearest even, as nearbyint does in the generic path
    const __m512i i0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, inv));
    const __m512i i1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, inv));
    const __m512i h0 = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_cvtepi32_ps(i0), inv128));
    const __m512i h1 = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_cvtepi32_ps(i1), inv128));
    const __m512i l0 = _mm512_sub_epi32(i0, _mm512_slli_epi32(h0, 7));
    const __m512i l1 = _mm512_sub_epi32(i1, _mm512_slli_epi32(h1, 7));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q1 + b * kBlock), _mm512_cvtsepi32_epi8(h0));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q1 + b * kBlock + 16), _mm512_cvtsepi32_epi8(h1));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q2 + b * kBlock), _mm512_cvtsepi32_epi8(l0));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q2 + b * kBlock + 16), _mm512_cvtsepi32_epi8(l1));
    d[b] = unit;
    s[b] = _mm512_reduce_add_epi32(_mm512_add_epi32(i0, i1));
  }
}

// A panel of 16 rows against NT tokens. Per block: unpack the 8 groups of 4 elements x 16
// rows once, then per token 8 dpbusd per activation plane with the activation's 4 bytes
// broadcast. The low plane's accumulator starts at the block's bias (-8 * sum for Q4_0,
// -128 * sum for unsigned Q8_0) so the unsigned weights need no correction afterwards.
template <DType T, int NT>
inline void panel_tile(const uint8_t* panel, int64_t n_blocks, const QuantActs& acts, int64_t t0,
                       float* out, int64_t ld_out, int n_valid_rows) {
  constexpr int64_t kBytes = T == DType::Q4_0 ? 320 : T == DType::Q4_1 ? 384 : 576;
  constexpr int kBias = T == DType::Q4_0 ? -8 : T == DType::Q8_0 ? -128 : 0;
  __m512 acc[NT];
  const int8_t* xq1[NT];
  const int8_t* xq2[NT];
  const float* xd[NT];
  const int32_t* xs[NT];
#pragma GCC unroll 8
  for (int t = 0; t < NT; ++t) {
    acc[t] = _mm512_setzero_ps();
    xq1[t] = acts.q1(t0 + t);
    xq2[t] = acts.q2(t0 + t);
    xd[t] = acts.d(t0 + t);
    xs[t] = acts.s(t0 + t);
  }
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  for (int64_t b = 0; b < n_blocks; ++b) {
    const uint8_t* blk = panel + b * kBytes;
    const __m512 wscale = _mm512_loadu_ps(blk);
    __m512 wmin = _mm512_setzero_ps();
    if constexpr (T == DType::Q4_1) wmin = _mm512_loadu_ps(blk + 64);
    __m512i w[8];
    if constexpr (T == DType::Q8_0) {
      for (int g = 0; g < 8; ++g) w[g] = _mm512_loadu_si512(blk + 64 + 64 * g);
    } else {
      const uint8_t* nib = blk + (T == DType::Q4_1 ? 128 : 64);
      for (int j = 0; j < 4; ++j) {
        const __m512i raw = _mm512_loadu_si512(nib + 64 * j);
        w[2 * j] = _mm512_and_si512(raw, low4);
        w[2 * j + 1] = _mm512_and_si512(_mm512_srli_epi16(raw, 4), low4);
      }
    }
#pragma GCC unroll 8
    for (int t = 0; t < NT; ++t) {
      const int32_t* hi4 = reinterpret_cast<const int32_t*>(xq1[t] + b * kBlock);
      const int32_t* lo4 = reinterpret_cast<const int32_t*>(xq2[t] + b * kBlock);
      __m512i dot_hi = _mm512_setzero_si512();
      __m512i dot_lo = _mm512_set1_epi32(kBias * xs[t][b]);
#pragma GCC unroll 8
      for (int g = 0; g < 8; ++g) {
        dot_hi = _mm512_dpbusd_epi32(dot_hi, w[g], _mm512_set1_epi32(hi4[g]));
        dot_lo = _mm512_dpbusd_epi32(dot_lo, w[g], _mm512_set1_epi32(lo4[g]));
      }
      const __m512i dot = _mm512_add_epi32(_mm512_slli_epi32(dot_hi, 7), dot_lo);
      const __m512 dx = _mm512_set1_ps(xd[t][b]);
      acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(wscale, dx), acc[t]);
      if constexpr (T == DType::Q4_1)
        acc[t] =
            _mm512_fmadd_ps(wmin, _mm512_set1_ps(xd[t][b] * static_cast<float>(xs[t][b])), acc[t]);
    }
  }
  const __mmask16 mask = static_cast<__mmask16>((1u << n_valid_rows) - 1);
#pragma GCC unroll 8
  for (int t = 0; t < NT; ++t) _mm512_mask_storeu_ps(out + (t0 + t) * ld_out, mask, acc[t]);
}

// The last n < 8 tokens: one instantiation per tile width, so the accumulators stay in
// registers.
template <DType T, int NT>
inline void panel_tail(int n, const uint8_t* panel, int64_t n_blocks, const QuantActs& acts,
                       int64_t t0, float* out, int64_t ld_out, int n_valid_rows) {
  if constexpr (NT > 0) {
    if (n == NT)
      panel_tile<T, NT>(panel, n_blocks, acts, t0, out, ld_out, n_valid_rows);
    else
      panel_tail<T, NT - 1>(n, panel, n_blocks, acts, t0, out, ld_out, n_valid_rows);
  }
}

template <DType T>
void panel_avx512(const uint8_t* panel, int64_t n_blocks, const QuantActs& acts, int64_t t0,
                  int n_tokens, float* out, int64_t ld_out, int n_valid_rows) {
  constexpr int kTile = 8;
  int t = 0;
  for (; t + kTile <= n_tokens; t += kTile)
    panel_tile<T, kTile>(panel, n_blocks, acts, t0 + t, out, ld_out, n_valid_rows);
  panel_tail<T, kTile - 1>(n_tokens - t, panel, n_blocks, acts, t0 + t, out, ld_out, n_valid_rows);
}

inline __m512 load16(DType type, const uint8_t* w, int64_t i) {
  if (type == DType::F16)
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 2 * i)));
  if (type == DType::BF16)
    return _mm512_castsi512_ps(_mm512_slli_epi32(
        _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 2 * i))),
        16));
  return _mm512_loadu_ps(reinterpret_cast<const float*>(w) + i);
}

// Dense weights (f32, f16, bf16): tiles of 4 rows x 4 tokens, 16 vector accumulators.
template <int NR, int NT>
void dense_tile(DType type, const uint8_t* w, int64_t w_row_bytes, const float* x, int64_t ld_x,
                int64_t k, float* out, int64_t ld_out) {
  __m512 acc[NR][NT];
  for (int r = 0; r < NR; ++r)
    for (int t = 0; t < NT; ++t) acc[r][t] = _mm512_setzero_ps();
  for (int64_t i = 0; i < k; i += 16) {
    __m512 xv[NT];
    for (int t = 0; t < NT; ++t) xv[t] = _mm512_loadu_ps(x + t * ld_x + i);
    for (int r = 0; r < NR; ++r) {
      const __m512 wv = load16(type, w + r * w_row_bytes, i);
      for (int t = 0; t < NT; ++t) acc[r][t] = _mm512_fmadd_ps(wv, xv[t], acc[r][t]);
    }
  }
  for (int r = 0; r < NR; ++r)
    for (int t = 0; t < NT; ++t) out[t * ld_out + r] = _mm512_reduce_add_ps(acc[r][t]);
}

void dense_avx512(DType type, const uint8_t* w, int64_t w_row_bytes, int n_rows, const float* x,
                  int64_t ld_x, int n_tokens, int64_t k, float* out, int64_t ld_out) {
  if (k % 16 != 0) {
    generic_kernels().dense(type, w, w_row_bytes, n_rows, x, ld_x, n_tokens, k, out, ld_out);
    return;
  }
  int r = 0;
  for (; r + 4 <= n_rows; r += 4) {
    int t = 0;
    for (; t + 4 <= n_tokens; t += 4)
      dense_tile<4, 4>(type, w + r * w_row_bytes, w_row_bytes, x + t * ld_x, ld_x, k,
                       out + t * ld_out + r, ld_out);
    for (; t < n_tokens; ++t)
      dense_tile<4, 1>(type, w + r * w_row_bytes, w_row_bytes, x + t * ld_x, ld_x, k,
                       out + t * ld_out + r, ld_out);
  }
  for (; r < n_rows; ++r)
    for (int t = 0; t < n_tokens; ++t)
      dense_tile<1, 1>(type, w + r * w_row_bytes, w_row_bytes, x + t * ld_x, ld_x, k,
                       out + t * ld_out + r, ld_out);
}

float dot_f32_avx512(const float* a, const float* b, int n) {
  __m512 acc = _mm512_setzero_ps();
  int i = 0;
  for (; i + 16 <= n; i += 16)
    acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc);
  float s = _mm512_reduce_add_ps(acc);
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

void axpy_f32_avx512(float a, const float* x, float* y, int n) {
  const __m512 av = _mm512_set1_ps(a);
  int i = 0;
  for (; i + 16 <= n; i += 16)
    _mm512_storeu_ps(y + i, _mm512_fmadd_ps(av, _mm512_loadu_ps(x + i), _mm512_loadu_ps(y + i)));
  for (; i < n; ++i) y[i] += a * x[i];
}

void f16_to_f32_avx512(const uint16_t* x, float* y, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    _mm512_storeu_ps(y + i,
                     _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + i))));
  for (; i < n; ++i) y[i] = _cvtsh_ss(x[i]);
}

KernelTable make_avx512() {
  KernelTable k;
  k.isa = "avx512-vnni";
  k.q8_unsigned = true;
  k.quantize_acts = quantize_acts_avx512;
  k.panel_q4_0 = panel_avx512<DType::Q4_0>;
  k.panel_q4_1 = panel_avx512<DType::Q4_1>;
  k.panel_q8_0 = panel_avx512<DType::Q8_0>;
  k.panel_u8min = panel_u8min_avx512;
  k.panel_q6 = panel_q6_avx512;
  k.dense = dense_avx512;
  k.dot_f32 = dot_f32_avx512;
  k.axpy_f32 = axpy_f32_avx512;
  k.f16_to_f32 = f16_to_f32_avx512;
  return k;
}

}  // namespace

const KernelTable* avx512_kernels() {
  static const KernelTable table = make_avx512();
  return &table;
}

}  // namespace kestrel::backend::cpu

#else
namespace kestrel::backend::cpu {
const KernelTable* avx512_kernels() {
  return nullptr;
}
}  // namespace kestrel::backend::cpu
#endif
#endif  // __x86_64__
