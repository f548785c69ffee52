// AVX2 + FMA + F16C kernels (no VNNI): u8 x s8 products through maddubs, pairs summed to
// int32 with madd. Same packed layout as AVX-512, taken as two halves of 8 rows.
#include "backend/cpu/kernels.h"

#if defined(__x86_64__)
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>

namespace kestrel::backend::cpu {
namespace {

using quant::DType;

inline float hsum(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 h = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
}

void quantize_acts_avx2(const float* x, int64_t k, uint8_t* row_out) {
  auto* q1 = reinterpret_cast<int8_t*>(row_out);
  auto* q2 = reinterpret_cast<int8_t*>(row_out + k);
  auto* d = reinterpret_cast<float*>(row_out + 2 * k);
  auto* s = reinterpret_cast<int32_t*>(row_out + 2 * k + 4 * (k / kBlock));
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  const __m256 inv128 = _mm256_set1_ps(1.0f / 128.0f);
  for (int64_t b = 0; b < k / kBlock; ++b) {
    __m256 v[4];
    __m256 m = _mm256_setzero_ps();
    for (int i = 0; i < 4; ++i) {
      v[i] = _mm256_loadu_ps(x + b * kBlock + 8 * i);
      m = _mm256_max_ps(m, _mm256_and_ps(v[i], abs_mask));
    }
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
    const float unit = _mm_cvtss_f32(m4) / (127.0f * 128.0f);
    const __m256 inv = _mm256_set1_ps(unit > 0 ? 1.0f / unit : 0.0f);
    int32_t sum = 0;
    for (int i = 0; i < 4; ++i) {
      const __m256i vi = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], inv));
      const __m256i hi = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_cvtepi32_ps(vi), inv128));
      const __m256i lo = _mm256_sub_epi32(vi, _mm256_slli_epi32(hi, 7));
      alignas(32) int32_t th[8], tl[8], tv[8];
      _mm256_store_si256(reinterpret_cast<__m256i*>(th), hi);
      _mm256_store_si256(reinterpret_cast<__m256i*>(tl), lo);
      _mm256_store_si256(reinterpret_cast<__m256i*>(tv), vi);
      for (int j = 0; j < 8; ++j) {
        q1[b * kBlock + 8 * i + j] = static_cast<int8_t>(th[j]);
        q2[b * kBlock + 8 * i + j] = static_cast<int8_t>(tl[j]);
        sum += tv[j];
      }
    }
    d[b] = unit;
    s[b] = sum;
  }
}

template <DType T, int NT>
inline void half_tile(const uint8_t* panel, int64_t n_blocks, const QuantActs& acts, int64_t t0,
                      int half, float* out, int64_t ld_out, int n_valid) {
  constexpr int64_t kBytes = T == DType::Q4_0 ? 320 : T == DType::Q4_1 ? 384 : 576;
  __m256 acc[NT];
  for (int t = 0; t < NT; ++t) acc[t] = _mm256_setzero_ps();
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  const __m256i ones = _mm256_set1_epi16(1);
  for (int64_t b = 0; b < n_blocks; ++b) {
    const uint8_t* blk = panel + b * kBytes;
    const __m256 wscale = _mm256_loadu_ps(reinterpret_cast<const float*>(blk) + 8 * half);
    __m256i dot_hi[NT], dot_lo[NT];
    for (int t = 0; t < NT; ++t) dot_hi[t] = dot_lo[t] = _mm256_setzero_si256();
    for (int g = 0; g < 8; ++g) {
      __m256i w;
      if constexpr (T == DType::Q8_0) {
        w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 64 + 64 * g + 32 * half));
      } else {
        const uint8_t* nib = blk + (T == DType::Q4_1 ? 128 : 64) + 64 * (g / 2) + 32 * half;
        const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(nib));
        w = (g & 1) ? _mm256_and_si256(_mm256_srli_epi16(raw, 4), low4)
                    : _mm256_and_si256(raw, low4);
      }
      // signed weights (Q8_0): |w| as u8 and the sign moved onto x (x stays within 127)
      const __m256i wu = T == DType::Q8_0 ? _mm256_sign_epi8(w, w) : w;
      for (int t = 0; t < NT; ++t) {
        const __m256i xh =
            _mm256_set1_epi32(reinterpret_cast<const int32_t*>(acts.q1(t0 + t) + b * kBlock)[g]);
        const __m256i xl =
            _mm256_set1_epi32(reinterpret_cast<const int32_t*>(acts.q2(t0 + t) + b * kBlock)[g]);
        const __m256i ph =
            _mm256_maddubs_epi16(wu, T == DType::Q8_0 ? _mm256_sign_epi8(xh, w) : xh);
        const __m256i pl =
            _mm256_maddubs_epi16(wu, T == DType::Q8_0 ? _mm256_sign_epi8(xl, w) : xl);
        dot_hi[t] = _mm256_add_epi32(dot_hi[t], _mm256_madd_epi16(ph, ones));
        dot_lo[t] = _mm256_add_epi32(dot_lo[t], _mm256_madd_epi16(pl, ones));
      }
    }
    for (int t = 0; t < NT; ++t) {
      const float xd = acts.d(t0 + t)[b];
      const int32_t xs = acts.s(t0 + t)[b];
      __m256i di = _mm256_add_epi32(_mm256_slli_epi32(dot_hi[t], 7), dot_lo[t]);
      if constexpr (T == DType::Q4_0) di = _mm256_sub_epi32(di, _mm256_set1_epi32(8 * xs));
      acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(di), _mm256_mul_ps(wscale, _mm256_set1_ps(xd)),
                               acc[t]);
      if constexpr (T == DType::Q4_1) {
        const __m256 wmin = _mm256_loadu_ps(reinterpret_cast<const float*>(blk) + 16 + 8 * half);
        acc[t] = _mm256_fmadd_ps(wmin, _mm256_set1_ps(xd * static_cast<float>(xs)), acc[t]);
      }
    }
  }
  for (int t = 0; t < NT; ++t) {
    alignas(32) float tmp[8];
    _mm256_store_ps(tmp, acc[t]);
    for (int r = 0; r < n_valid; ++r) out[(t0 + t) * ld_out + 8 * half + r] = tmp[r];
  }
}

template <DType T>
void panel_avx2(const uint8_t* panel, int64_t n_blocks, const QuantActs& acts, int64_t t0,
                int n_tokens, float* out, int64_t ld_out, int n_valid_rows) {
  for (int half = 0; half < 2; ++half) {
    const int nv = n_valid_rows - 8 * half;
    if (nv <= 0) break;
    const int n = nv > 8 ? 8 : nv;
    int t = 0;
    for (; t + 4 <= n_tokens; t += 4)
      half_tile<T, 4>(panel, n_blocks, acts, t0 + t, half, out, ld_out, n);
    for (; t < n_tokens; ++t) half_tile<T, 1>(panel, n_blocks, acts, t0 + t, half, out, ld_out, n);
  }
}

inline __m256 load8(DType type, const uint8_t* w, int64_t i) {
  if (type == DType::F16)
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + 2 * i)));
  if (type == DType::BF16)
    return _mm256_castsi256_ps(_mm256_slli_epi32(
        _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + 2 * i))), 16));
  return _mm256_loadu_ps(reinterpret_cast<const float*>(w) + i);
}

void dense_avx2(DType type, const uint8_t* w, int64_t w_row_bytes, int n_rows, const float* x,
                int64_t ld_x, int n_tokens, int64_t k, float* out, int64_t ld_out) {
  if (k % 8 != 0) {
    generic_kernels().dense(type, w, w_row_bytes, n_rows, x, ld_x, n_tokens, k, out, ld_out);
    return;
  }
  for (int r = 0; r < n_rows; ++r) {
    const uint8_t* wr = w + r * w_row_bytes;
    int t = 0;
    for (; t + 2 <= n_tokens; t += 2) {
      __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
      for (int64_t i = 0; i < k; i += 8) {
        const __m256 wv = load8(type, wr, i);
        a0 = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + t * ld_x + i), a0);
        a1 = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + (t + 1) * ld_x + i), a1);
      }
      out[t * ld_out + r] = hsum(a0);
      out[(t + 1) * ld_out + r] = hsum(a1);
    }
    for (; t < n_tokens; ++t) {
      __m256 a0 = _mm256_setzero_ps();
      for (int64_t i = 0; i < k; i += 8)
        a0 = _mm256_fmadd_ps(load8(type, wr, i), _mm256_loadu_ps(x + t * ld_x + i), a0);
      out[t * ld_out + r] = hsum(a0);
    }
  }
}

float dot_f32_avx2(const float* a, const float* b, int n) {
  __m256 acc = _mm256_setzero_ps();
  int i = 0;
  for (; i + 8 <= n; i += 8)
    acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
  float s = hsum(acc);
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

void axpy_f32_avx2(float a, const float* x, float* y, int n) {
  const __m256 av = _mm256_set1_ps(a);
  int i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(y + i, _mm256_fmadd_ps(av, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
  for (; i < n; ++i) y[i] += a * x[i];
}

void f16_to_f32_avx2(const uint16_t* x, float* y, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(y + i,
                     _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x + i))));
  for (; i < n; ++i) y[i] = _cvtsh_ss(x[i]);
}

KernelTable make_avx2() {
  KernelTable k;
  k.isa = "avx2";
  k.q8_unsigned = false;
  k.quantize_acts = quantize_acts_avx2;
  k.panel_q4_0 = panel_avx2<DType::Q4_0>;
  k.panel_q4_1 = panel_avx2<DType::Q4_1>;
  k.panel_q8_0 = panel_avx2<DType::Q8_0>;
  k.panel_u8min = panel_u8min_avx2;
  k.panel_q6 = panel_q6_avx2;
  k.dense = dense_avx2;
  k.dot_f32 = dot_f32_avx2;
  k.axpy_f32 = axpy_f32_avx2;
  k.f16_to_f32 = f16_to_f32_avx2;
  return k;
}

}  // namespace

const KernelTable* avx2_kernels() {
  static const KernelTable table = make_avx2();
  return &table;
}

}  // namespace kestrel::backend::cpu

#else
namespace kestrel::backend::cpu {
const KernelTable* avx2_kernels() {
  return nullptr;
}
}  // namespace kestrel::backend::cpu
#endif
#endif  // __x86_64__
