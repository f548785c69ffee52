// AVX-512 VNNI panel kernels of the U8Min (Q5_1, Q5_K) and Q6 (Q6_K) panel formats: the same
// tiling as the Q8_0 kernel of kernels_avx512.cpp (8 dpbusd per activation plane per block,
// weights loaded once per block for 8 tokens), with the codes used as unsigned bytes as they
// are stored. U8Min adds the min term once per block like Q4_1; Q6 keeps two dot sums per
// block, one per 16 elements, each started at -32 times the half-block activation sum.
#include "backend/cpu/kernels.h"

#if defined(__x86_64__)
#if defined(__AVX512F__) && defined(__AVX512VNNI__) && defined(__AVX512BW__)
#include <immintrin.h>

namespace kestrel::backend::cpu {
namespace {

template <PanelFormat F, int NT>
inline void tile(const uint8_t* panel, int64_t n_blocks, const QuantActs& acts, int64_t t0,
                 float* out, int64_t ld_out, int n_valid_rows) {
  constexpr int64_t kBytes = 640;
  constexpr bool kQ6 = F == PanelFormat::Q6;
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
    xs[t] = kQ6 ? acts.hs(t0 + t) : acts.s(t0 + t);
  }
  for (int64_t b = 0; b < n_blocks; ++b) {
    const uint8_t* blk = panel + b * kBytes;
    const __m512 f0 = _mm512_loadu_ps(blk);       // scale (U8Min) / scale of 0..15 (Q6)
    const __m512 f1 = _mm512_loadu_ps(blk + 64);  // min (U8Min) / scale of 16..31 (Q6)
    __m512i w[8];
#pragma GCC unroll 8
    for (int g = 0; g < 8; ++g) w[g] = _mm512_loadu_si512(blk + 128 + 64 * g);
#pragma GCC unroll 8
    for (int t = 0; t < NT; ++t) {
      const int32_t* hi4 = reinterpret_cast<const int32_t*>(xq1[t] + b * kBlock);
      const int32_t* lo4 = reinterpret_cast<const int32_t*>(xq2[t] + b * kBlock);
      const __m512 dx = _mm512_set1_ps(xd[t][b]);
      if constexpr (kQ6) {
        __m512i hi_a = _mm512_setzero_si512(), hi_b = _mm512_setzero_si512();
        __m512i lo_a = _mm512_set1_epi32(-32 * xs[t][2 * b]);
        __m512i lo_b = _mm512_set1_epi32(-32 * xs[t][2 * b + 1]);
#pragma GCC unroll 4
        for (int g = 0; g < 4; ++g) {
          hi_a = _mm512_dpbusd_epi32(hi_a, w[g], _mm512_set1_epi32(hi4[g]));
          lo_a = _mm512_dpbusd_epi32(lo_a, w[g], _mm512_set1_epi32(lo4[g]));
          hi_b = _mm512_dpbusd_epi32(hi_b, w[g + 4], _mm512_set1_epi32(hi4[g + 4]));
          lo_b = _mm512_dpbusd_epi32(lo_b, w[g + 4], _mm512_set1_epi32(lo4[g + 4]));
        }
        const __m512i da = _mm512_add_epi32(_mm512_slli_epi32(hi_a, 7), lo_a);
        const __m512i db = _mm512_add_epi32(_mm512_slli_epi32(hi_b, 7), lo_b);
        acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(da), _mm512_mul_ps(f0, dx), acc[t]);
        acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(db), _mm512_mul_ps(f1, dx), acc[t]);
      } else {
        __m512i hi = _mm512_setzero_si512(), lo = _mm512_setzero_si512();
#pragma GCC unroll 8
        for (int g = 0; g < 8; ++g) {
          hi = _mm512_dpbusd_epi32(hi, w[g], _mm512_set1_epi32(hi4[g]));
          lo = _mm512_dpbusd_epi32(lo, w[g], _mm512_set1_epi32(lo4[g]));
        }
        const __m512i dot = _mm512_add_epi32(_mm512_slli_epi32(hi, 7), lo);
        acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(f0, dx), acc[t]);
        acc[t] =
            _mm512_fmadd_ps(f1, _mm512_set1_ps(xd[t][b] * static_cast<float>(xs[t][b])), acc[t]);
      }
    }
  }
  const __mmask16 mask = static_cast<__mmask16>((1u << n_valid_rows) - 1);
#pragma GCC unroll 8
  for (int t = 0; t < NT; ++t) _mm512_mask_storeu_ps(out + (t0 + t) * ld_out, mask, acc[t]);
}

template <PanelFormat F, int NT>
inline void tail(int n, const uint8_t* panel, int64_t n_blocks, const QuantActs& acts, int64_t t0,
                 float* out, int64_t ld_out, int n_valid_rows) {
  if constexpr (NT > 0) {
    if (n == NT)
      tile<F, NT>(panel, n_blocks, acts, t0, out, ld_out, n_valid_rows);
    else
      tail<F, NT - 1>(n, panel, n_blocks, acts, t0, out, ld_out, n_valid_rows);
  }
}

template <PanelFormat F>
void panel(const uint8_t* p, int64_t n_blocks, const QuantActs& acts, int64_t t0, int n_tokens,
           float* out, int64_t ld_out, int n_valid_rows) {
  constexpr int kTile = 8;
  int t = 0;
  for (; t + kTile <= n_tokens; t += kTile)
    tile<F, kTile>(p, n_blocks, acts, t0 + t, out, ld_out, n_valid_rows);
  tail<F, kTile - 1>(n_tokens - t, p, n_blocks, acts, t0 + t, out, ld_out, n_valid_rows);
}

}  // namespace

void panel_u8min_avx512(const uint8_t* p, int64_t nb, const QuantActs& a, int64_t t0, int nt,
                        float* out, int64_t ld, int nv) {
  panel<PanelFormat::U8Min>(p, nb, a, t0, nt, out, ld, nv);
}
void panel_q6_avx512(const uint8_t* p, int64_t nb, const QuantActs& a, int64_t t0, int nt,
                     float* out, int64_t ld, int nv) {
  panel<PanelFormat::Q6>(p, nb, a, t0, nt, out, ld, nv);
}

}  // namespace kestrel::backend::cpu

#endif
#endif  // __x86_64__
