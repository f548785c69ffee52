// Scalar references of the 5-bit and K-quant formats (Q5_0, Q5_1, Q4_K, Q5_K, Q6_K), written
// from the block layouts documented in quant.h. Every element is decoded through
// decode_slice32 (integer code, per-16 scale, bias, min), which is also what the CPU backend
// transcodes its panels from, so there is one definition of each bit layout.
#include <cassert>
#include <cmath>
#include <cstring>
#include <limits>

#include "format/quant/fp16.h"
#include "format/quant/quant.h"
#include "format/quant/quant_ext.h"

namespace kestrel::quant::detail {

namespace {

int round_clamp(float v, int lo, int hi) {
  const float r =
      std::fmin(std::fmax(std::round(v), static_cast<float>(lo)), static_cast<float>(hi));
  return static_cast<int>(r);
}

// The 4 low bits of element i (0..31) of a Q4_0-style nibble array.
inline uint8_t nibble32(const uint8_t* qs, int i) {
  return i < 16 ? (qs[i] & 0x0F) : (qs[i - 16] >> 4);
}

// 6-bit scale and min of sub-block j of a Q4_K / Q5_K superblock.
inline void scale_min_k(const uint8_t* s, int j, int* sc, int* mn) {
  if (j < 4) {
    *sc = s[j] & 63;
    *mn = s[j + 4] & 63;
  } else {
    *sc = (s[j + 4] & 15) | ((s[j - 4] >> 6) << 4);
    *mn = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
  }
}

void pack_scale_min_k(const int* sc, const int* mn, uint8_t* s) {
  std::memset(s, 0, 12);
  for (int j = 0; j < 4; ++j) {
    s[j] = static_cast<uint8_t>((sc[j] & 63) | ((sc[j + 4] >> 4) << 6));
    s[j + 4] = static_cast<uint8_t>((mn[j] & 63) | ((mn[j + 4] >> 4) << 6));
    s[j + 8] = static_cast<uint8_t>((sc[j + 4] & 15) | ((mn[j + 4] & 15) << 4));
  }
}

// ---- quantizers ---------------------------------------------------------------------------

void quantize_q5_0(const float* x, BlockQ5_0* b) {
  float amax = 0.0f, m = 0.0f;
  for (int j = 0; j < kBlock; ++j) {
    if (std::fabs(x[j]) > amax) {
      amax = std::fabs(x[j]);
      m = x[j];
    }
  }
  b->d = fp32_to_fp16(m / -16.0f);
  const float d = fp16_to_fp32(b->d);
  std::memset(b->qh, 0, sizeof b->qh);
  std::memset(b->qs, 0, sizeof b->qs);
  for (int j = 0; j < kBlock; ++j) {
    const int q = d == 0.0f ? 16 : round_clamp(x[j] / d, -16, 15) + 16;
    b->qs[j % 16] |= static_cast<uint8_t>((q & 15) << (j < 16 ? 0 : 4));
    b->qh[j / 8] |= static_cast<uint8_t>((q >> 4) << (j % 8));
  }
}

void quantize_q5_1(const float* x, BlockQ5_1* b) {
  float lo = x[0], hi = x[0];
  for (int j = 1; j < kBlock; ++j) {
    lo = std::fmin(lo, x[j]);
    hi = std::fmax(hi, x[j]);
  }
  b->d = fp32_to_fp16((hi - lo) / 31.0f);
  b->m = fp32_to_fp16(lo);
  const float d = fp16_to_fp32(b->d);
  const float m = fp16_to_fp32(b->m);
  std::memset(b->qh, 0, sizeof b->qh);
  std::memset(b->qs, 0, sizeof b->qs);
  for (int j = 0; j < kBlock; ++j) {
    const int q = d == 0.0f ? 0 : round_clamp((x[j] - m) / d, 0, 31);
    b->qs[j % 16] |= static_cast<uint8_t>((q & 15) << (j < 16 ? 0 : 4));
    b->qh[j / 8] |= static_cast<uint8_t>((q >> 4) << (j % 8));
  }
}

// Sub-block scales and mins of a Q4_K / Q5_K superblock (codes 0..qmax), with a small
// search: the 6-bit scale and min codes next to the rounded ones are tried as well and the
// pair with the least squared error against x is kept.
void quantize_k_affine(const float* x, int qmax, uint16_t* d_out, uint16_t* dmin_out, int* sc,
                       int* mn, uint8_t* q) {
  float s[8], o[8], smax = 0, omax = 0;
  for (int j = 0; j < 8; ++j) {
    float lo = x[32 * j], hi = x[32 * j];
    for (int l = 1; l < 32; ++l) {
      lo = std::fmin(lo, x[32 * j + l]);
      hi = std::fmax(hi, x[32 * j + l]);
    }
    lo = std::fmin(lo, 0.0f);  // the offset is -dmin * mn <= 0
    s[j] = (hi - lo) / static_cast<float>(qmax);
    o[j] = -lo;
    smax = std::fmax(smax, s[j]);
    omax = std::fmax(omax, o[j]);
  }
  *d_out = fp32_to_fp16(smax / 63.0f);
  *dmin_out = fp32_to_fp16(omax / 63.0f);
  const float d = fp16_to_fp32(*d_out);
  const float dmin = fp16_to_fp32(*dmin_out);
  for (int j = 0; j < 8; ++j) {
    const float* xs = x + 32 * j;
    const int sc0 = d > 0 ? round_clamp(s[j] / d, 0, 63) : 0;
    const int mn0 = dmin > 0 ? round_clamp(o[j] / dmin, 0, 63) : 0;
    double best = std::numeric_limits<double>::infinity();
    for (int dsc = -1; dsc <= 1; ++dsc) {
      for (int dmn = -1; dmn <= 1; ++dmn) {
        const int c = sc0 + dsc, m = mn0 + dmn;
        if (c < 0 || c > 63 || m < 0 || m > 63) continue;
        const float scale = d * static_cast<float>(c);
        const float off = dmin * static_cast<float>(m);
        double err = 0;
        uint8_t qq[32];
        for (int l = 0; l < 32; ++l) {
          qq[l] = static_cast<uint8_t>(scale > 0 ? round_clamp((xs[l] + off) / scale, 0, qmax) : 0);
          const double e = static_cast<double>(scale * qq[l] - off) - xs[l];
          err += e * e;
        }
        if (err < best) {
          best = err;
          sc[j] = c;
          mn[j] = m;
          std::memcpy(q + 32 * j, qq, 32);
        }
      }
    }
  }
}

void quantize_q4_k(const float* x, BlockQ4_K* b) {
  int sc[8], mn[8];
  uint8_t q[kSuperBlock];
  quantize_k_affine(x, 15, &b->d, &b->dmin, sc, mn, q);
  pack_scale_min_k(sc, mn, b->scales);
  for (int i = 0; i < 4; ++i)
    for (int l = 0; l < 32; ++l)
      b->qs[32 * i + l] = static_cast<uint8_t>(q[64 * i + l] | (q[64 * i + 32 + l] << 4));
}

void quantize_q5_k(const float* x, BlockQ5_K* b) {
  int sc[8], mn[8];
  uint8_t q[kSuperBlock];
  quantize_k_affine(x, 31, &b->d, &b->dmin, sc, mn, q);
  pack_scale_min_k(sc, mn, b->scales);
  std::memset(b->qh, 0, sizeof b->qh);
  for (int i = 0; i < 4; ++i)
    for (int l = 0; l < 32; ++l) {
      const uint8_t lo = q[64 * i + l], hi = q[64 * i + 32 + l];
      b->qs[32 * i + l] = static_cast<uint8_t>((lo & 15) | ((hi & 15) << 4));
      b->qh[l] |= static_cast<uint8_t>(((lo >> 4) << (2 * i)) | ((hi >> 4) << (2 * i + 1)));
    }
}

void quantize_q6_k(const float* x, BlockQ6_K* b) {
  float s[16], smax = 0;
  for (int j = 0; j < 16; ++j) {
    float amax = 0, m = 0;
    for (int l = 0; l < 16; ++l) {
      if (std::fabs(x[16 * j + l]) > amax) {
        amax = std::fabs(x[16 * j + l]);
        m = x[16 * j + l];
      }
    }
    s[j] = m / -32.0f;
    smax = std::fmax(smax, std::fabs(s[j]));
  }
  b->d = fp32_to_fp16(smax / 127.0f);
  const float d = fp16_to_fp32(b->d);
  uint8_t q[kSuperBlock];
  for (int j = 0; j < 16; ++j) {
    const float* xs = x + 16 * j;
    const int sc0 = d > 0 ? round_clamp(s[j] / d, -128, 127) : 0;
    double best = std::numeric_limits<double>::infinity();
    b->scales[j] = 0;
    for (int l = 0; l < 16; ++l) q[16 * j + l] = 32;
    for (int c = sc0 - 1; c <= sc0 + 1; ++c) {  // a small search around the rounded scale
      if (c < -128 || c > 127 || c == 0) continue;
      const float scale = d * static_cast<float>(c);
      double err = 0;
      uint8_t qq[16];
      for (int l = 0; l < 16; ++l) {
        qq[l] = static_cast<uint8_t>(round_clamp(xs[l] / scale, -32, 31) + 32);
        const double e = static_cast<double>(scale * static_cast<float>(qq[l] - 32)) - xs[l];
        err += e * e;
      }
      if (err < best) {
        best = err;
        b->scales[j] = static_cast<int8_t>(c);
        std::memcpy(q + 16 * j, qq, 16);
      }
    }
  }
  std::memset(b->ql, 0, sizeof b->ql);
  std::memset(b->qh, 0, sizeof b->qh);
  for (int h = 0; h < 2; ++h)
    for (int c = 0; c < 4; ++c)
      for (int l = 0; l < 32; ++l) {
        const uint8_t v = q[128 * h + 32 * c + l];
        b->ql[64 * h + 32 * (c % 2) + l] |= static_cast<uint8_t>((v & 15) << (4 * (c / 2)));
        b->qh[32 * h + l] |= static_cast<uint8_t>((v >> 4) << (2 * c));
      }
}

template <typename Block, void (*F)(const float*, Block*), int N>
void quantize_all(const float* src, void* dst, int64_t n) {
  auto* blocks = static_cast<Block*>(dst);
  for (int64_t i = 0; i < n / N; ++i) F(src + i * N, &blocks[i]);
}

}  // namespace

bool decode_slice(DType t, const void* row, int64_t b, Slice32* out) {
  const auto* base = static_cast<const uint8_t*>(row);
  switch (t) {
    case DType::Q5_0:
    case DType::Q5_1: {
      const bool q50 = t == DType::Q5_0;
      const uint8_t* blk = base + b * (q50 ? sizeof(BlockQ5_0) : sizeof(BlockQ5_1));
      uint16_t d, m = 0;
      uint32_t qh;
      std::memcpy(&d, blk, 2);
      if (!q50) std::memcpy(&m, blk + 2, 2);
      const uint8_t* p = blk + (q50 ? 2 : 4);
      qh = static_cast<uint32_t>(p[0]) | static_cast<uint32_t>(p[1]) << 8 |
           static_cast<uint32_t>(p[2]) << 16 | static_cast<uint32_t>(p[3]) << 24;
      const uint8_t* qs = p + 4;
      for (int i = 0; i < kBlock; ++i)
        out->q[i] = static_cast<uint8_t>(nibble32(qs, i) | (((qh >> i) & 1) << 4));
      out->scale[0] = out->scale[1] = fp16_to_fp32(d);
      out->min = q50 ? 0.0f : fp16_to_fp32(m);
      out->bias = q50 ? -16 : 0;
      return true;
    }
    case DType::Q4_K:
    case DType::Q5_K: {
      const bool q4 = t == DType::Q4_K;
      const int64_t sb = b / 8;
      const int j = static_cast<int>(b % 8);
      const uint8_t* blk = base + sb * (q4 ? sizeof(BlockQ4_K) : sizeof(BlockQ5_K));
      uint16_t d, dmin;
      std::memcpy(&d, blk, 2);
      std::memcpy(&dmin, blk + 2, 2);
      const uint8_t* scales = blk + 4;
      const uint8_t* qh = blk + 16;
      const uint8_t* qs = blk + (q4 ? 16 : 48);
      int sc, mn;
      scale_min_k(scales, j, &sc, &mn);
      for (int l = 0; l < 32; ++l) {
        int q = (qs[32 * (j / 2) + l] >> (4 * (j % 2))) & 15;
        if (!q4) q |= ((qh[l] >> j) & 1) << 4;
        out->q[l] = static_cast<uint8_t>(q);
      }
      out->scale[0] = out->scale[1] = fp16_to_fp32(d) * static_cast<float>(sc);
      out->min = -(fp16_to_fp32(dmin) * static_cast<float>(mn));
      out->bias = 0;
      return true;
    }
    case DType::Q6_K: {
      const auto* blk = reinterpret_cast<const BlockQ6_K*>(base + (b / 8) * sizeof(BlockQ6_K));
      const int s = static_cast<int>(b % 8);
      const int h = s / 4, c = s % 4;
      uint16_t dh;
      std::memcpy(&dh, &blk->d, 2);
      const float d = fp16_to_fp32(dh);
      for (int l = 0; l < 32; ++l) {
        const int lo = (blk->ql[64 * h + 32 * (c % 2) + l] >> (4 * (c / 2))) & 15;
        const int hi = (blk->qh[32 * h + l] >> (2 * c)) & 3;
        out->q[l] = static_cast<uint8_t>(lo | (hi << 4));
      }
      out->scale[0] = d * static_cast<float>(blk->scales[8 * h + 2 * c]);
      out->scale[1] = d * static_cast<float>(blk->scales[8 * h + 2 * c + 1]);
      out->min = 0.0f;
      out->bias = -32;
      return true;
    }
    default:
      return false;
  }
}

void dequantize_slices(DType t, const void* src, float* dst, int64_t n) {
  Slice32 s;
  for (int64_t b = 0; b < n / kBlock; ++b) {
    decode_slice(t, src, b, &s);
    for (int i = 0; i < kBlock; ++i)
      dst[b * kBlock + i] = s.scale[i / 16] * static_cast<float>(s.q[i] + s.bias) + s.min;
  }
}

void quantize_ext(DType t, const float* src, void* dst, int64_t n) {
  switch (t) {
    case DType::Q5_0:
      return quantize_all<BlockQ5_0, quantize_q5_0, kBlock>(src, dst, n);
    case DType::Q5_1:
      return quantize_all<BlockQ5_1, quantize_q5_1, kBlock>(src, dst, n);
    case DType::Q4_K:
      return quantize_all<BlockQ4_K, quantize_q4_k, kSuperBlock>(src, dst, n);
    case DType::Q5_K:
      return quantize_all<BlockQ5_K, quantize_q5_k, kSuperBlock>(src, dst, n);
    case DType::Q6_K:
      return quantize_all<BlockQ6_K, quantize_q6_k, kSuperBlock>(src, dst, n);
    default:
      return;
  }
}

double dot_slices(DType t, const void* w, const float* x, int64_t n) {
  double sum = 0.0;
  Slice32 s;
  for (int64_t b = 0; b < n / kBlock; ++b) {
    decode_slice(t, w, b, &s);
    for (int i = 0; i < kBlock; ++i) {
      const float y = s.scale[i / 16] * static_cast<float>(s.q[i] + s.bias) + s.min;
      sum += static_cast<double>(y) * static_cast<double>(x[b * kBlock + i]);
    }
  }
  return sum;
}

}  // namespace kestrel::quant::detail

namespace kestrel::quant {
bool decode_slice32(DType t, const void* row, int64_t b, Slice32* out) {
  return detail::decode_slice(t, row, b, out);
}
}  // namespace kestrel::quant
