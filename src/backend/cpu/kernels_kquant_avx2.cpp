// AVX2 panel kernels of the U8Min (Q5_1, Q5_K) and Q6 (Q6_K) panel formats, shaped like the
// half tiles of kernels_avx2.cpp (8 rows per half). The codes are unsigned and small (<= 63),
// so maddubs takes them directly as its u8 operand: a pair sum is at most 2 * 63 * 127, far
// from the int16 saturation that signed Q8_0 weights must avoid with the sign trick.
#include "backend/cpu/kernels.h"

#if defined(__x86_64__)
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>

namespace kestrel::backend::cpu {
namespace {

template <PanelFormat F, int NT>
inline void half_tile(const uint8_t* panel, int64_t n_blocks, const QuantActs& acts, int64_t t0,
                      int half, float* out, int64_t ld_out, int n_valid) {
  constexpr int64_t kBytes = 640;
  constexpr bool kQ6 = F == PanelFormat::Q6;
  __m256 acc[NT];
  for (int t = 0; t < NT; ++t) acc[t] = _mm256_setzero_ps();
  const __m256i ones = _mm256_set1_epi16(1);
  for (int64_t b = 0; b < n_blocks; ++b) {
    const uint8_t* blk = panel + b * kBytes;
    const __m256 f0 = _mm256_loadu_ps(reinterpret_cast<const float*>(blk) + 8 * half);
    const __m256 f1 = _mm256_loadu_ps(reinterpret_cast<const float*>(blk) + 16 + 8 * half);
    // [t][0] = elements 0..15, [t][1] = 16..31 (U8Min uses [t][0] only)
    __m256i dot_hi[NT][2], dot_lo[NT][2];
    for (int t = 0; t < NT; ++t)
      for (int h = 0; h < 2; ++h) dot_hi[t][h] = dot_lo[t][h] = _mm256_setzero_si256();
    for (int g = 0; g < 8; ++g) {
      const __m256i w =
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 128 + 64 * g + 32 * half));
      const int h = kQ6 ? g / 4 : 0;
      for (int t = 0; t < NT; ++t) {
        const __m256i xh =
            _mm256_set1_epi32(reinterpret_cast<const int32_t*>(acts.q1(t0 + t) + b * kBlock)[g]);
        const __m256i xl =
            _mm256_set1_epi32(reinterpret_cast<const int32_t*>(acts.q2(t0 + t) + b * kBlock)[g]);
        dot_hi[t][h] =
            _mm256_add_epi32(dot_hi[t][h], _mm256_madd_epi16(_mm256_maddubs_epi16(w, xh), ones));
        dot_lo[t][h] =
            _mm256_add_epi32(dot_lo[t][h], _mm256_madd_epi16(_mm256_maddubs_epi16(w, xl), ones));
      }
    }
    for (int t = 0; t < NT; ++t) {
      const __m256 dx = _mm256_set1_ps(acts.d(t0 + t)[b]);
      if constexpr (kQ6) {
        const int32_t* hs = acts.hs(t0 + t);
        for (int h = 0; h < 2; ++h) {
          __m256i di = _mm256_add_epi32(_mm256_slli_epi32(dot_hi[t][h], 7), dot_lo[t][h]);
          di = _mm256_sub_epi32(di, _mm256_set1_epi32(32 * hs[2 * b + h]));
          acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(di), _mm256_mul_ps(h ? f1 : f0, dx), acc[t]);
        }
      } else {
        const __m256i di = _mm256_add_epi32(_mm256_slli_epi32(dot_hi[t][0], 7), dot_lo[t][0]);
        acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(di), _mm256_mul_ps(f0, dx), acc[t]);
        const float xs = static_cast<float>(acts.s(t0 + t)[b]);
        acc[t] = _mm256_fmadd_ps(f1, _mm256_set1_ps(acts.d(t0 + t)[b] * xs), acc[t]);
      }
    }
  }
  for (int t = 0; t < NT; ++t) {
    alignas(32) float tmp[8];
    _mm256_store_ps(tmp, acc[t]);
    for (int r = 0; r < n_valid; ++r) out[(t0 + t) * ld_out + 8 * half + r] = tmp[r];
  }
}

template <PanelFormat F>
void panel(const uint8_t* p, int64_t n_blocks, const QuantActs& acts, int64_t t0, int n_tokens,
           float* out, int64_t ld_out, int n_valid_rows) {
  for (int half = 0; half < 2; ++half) {
    const int nv = n_valid_rows - 8 * half;
    if (nv <= 0) break;
    const int n = nv > 8 ? 8 : nv;
    int t = 0;
    for (; t + 4 <= n_tokens; t += 4)
      half_tile<F, 4>(p, n_blocks, acts, t0 + t, half, out, ld_out, n);
    for (; t < n_tokens; ++t) half_tile<F, 1>(p, n_blocks, acts, t0 + t, half, out, ld_out, n);
  }
}

}  // namespace

void panel_u8min_avx2(const uint8_t* p, int64_t nb, const QuantActs& a, int64_t t0, int nt,
                      float* out, int64_t ld, int nv) {
  panel<PanelFormat::U8Min>(p, nb, a, t0, nt, out, ld, nv);
}
void panel_q6_avx2(const uint8_t* p, int64_t nb, const QuantActs& a, int64_t t0, int nt, float* out,
                   int64_t ld, int nv) {
  panel<PanelFormat::Q6>(p, nb, a, t0, nt, out, ld, nv);
}

}  // namespace kestrel::backend::cpu

#endif
#endif  // __x86_64__
