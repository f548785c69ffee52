// Load-time transcoding of Q5_0, Q5_1, Q4_K, Q5_K and Q6_K rows into the 16-row panels of
// kernels.h, and the portable panel kernels of the two panel formats they add (U8Min, Q6).
//
// Why transcode instead of a kernel per GGUF layout: the panel kernels spend their time in
// the int8 dot instructions, and those want one element per byte (or nibble) lane grouped by
// 4 per row. The K-quant superblock layouts (scales packed in 6 bits, high bits in separate
// planes, interleaved 64-element halves) would cost shifts and masks per weight per token
// tile if decoded in the kernel; decoded once at load time they cost nothing per token. The
// transcoding is exact: every per-32 scale and min of these formats is an fp16 times a small
// integer, which f32 holds exactly (quant::Slice32), so the panels compute the same function
// as dequantize_row, up to the activation quantization shared by every type.
#include <cstring>

#include "backend/cpu/kernels.h"
#include "format/quant/quant.h"

namespace kestrel::backend::cpu {

using quant::DType;

void quantize_acts_half_sums(int64_t k, uint8_t* row) {
  const auto* q1 = reinterpret_cast<const int8_t*>(row);
  const auto* q2 = reinterpret_cast<const int8_t*>(row + k);
  auto* hs = reinterpret_cast<int32_t*>(row + 2 * k + 8 * (k / kBlock));
  for (int64_t h = 0; h < k / 16; ++h) {
    int32_t s = 0;
    for (int i = 0; i < 16; ++i) s += 128 * q1[16 * h + i] + q2[16 * h + i];
    hs[h] = s;
  }
}

void pack_slice(DType type, const uint8_t* row, int64_t b, int r, bool q8_unsigned, uint8_t* dst) {
  quant::Slice32 s;
  if (!quant::decode_slice32(type, row, b, &s)) return;
  auto* f = reinterpret_cast<float*>(dst);
  switch (panel_format(type)) {
    case PanelFormat::Q8_0:  // Q5_0: signed q - 16, one scale
      f[r] = s.scale[0];
      for (int g = 0; g < 8; ++g)
        for (int e = 0; e < 4; ++e)
          dst[64 + 64 * g + 4 * r + e] =
              static_cast<uint8_t>(s.q[4 * g + e] + s.bias + (q8_unsigned ? 128 : 0));
      return;
    case PanelFormat::Q4_1:  // Q4_K: nibbles with scale and min
      f[r] = s.scale[0];
      f[16 + r] = s.min;
      for (int j = 0; j < 4; ++j)
        for (int e = 0; e < 4; ++e)
          dst[128 + 64 * j + 4 * r + e] =
              static_cast<uint8_t>(s.q[8 * j + e] | (s.q[8 * j + 4 + e] << 4));
      return;
    case PanelFormat::U8Min:  // Q5_1, Q5_K
    case PanelFormat::Q6:     // Q6_K: two scales, min slot holds the second scale
      f[r] = s.scale[0];
      f[16 + r] = panel_format(type) == PanelFormat::Q6 ? s.scale[1] : s.min;
      for (int g = 0; g < 8; ++g)
        for (int e = 0; e < 4; ++e) dst[128 + 64 * g + 4 * r + e] = s.q[4 * g + e];
      return;
    default:
      return;
  }
}

namespace {

// The definition the SIMD kernels of the two formats must agree with.
template <PanelFormat F>
void panel_generic(const uint8_t* panel, int64_t n_blocks, const QuantActs& acts, int64_t t0,
                   int n_tokens, float* out, int64_t ld_out, int n_valid_rows) {
  constexpr int64_t kBytes = 640;
  for (int t = 0; t < n_tokens; ++t) {
    const int8_t* q1 = acts.q1(t0 + t);
    const int8_t* q2 = acts.q2(t0 + t);
    const float* xd = acts.d(t0 + t);
    const int32_t* xs = acts.s(t0 + t);
    const int32_t* xh = F == PanelFormat::Q6 ? acts.hs(t0 + t) : nullptr;
    for (int r = 0; r < n_valid_rows; ++r) {
      float acc = 0;
      for (int64_t b = 0; b < n_blocks; ++b) {
        const uint8_t* blk = panel + b * kBytes;
        const float* f = reinterpret_cast<const float*>(blk);
        int32_t dot[2] = {0, 0};  // elements 0..15 and 16..31
        for (int g = 0; g < 8; ++g)
          for (int e = 0; e < 4; ++e)
            dot[g / 4] += blk[128 + 64 * g + 4 * r + e] *
                          (128 * q1[b * kBlock + 4 * g + e] + q2[b * kBlock + 4 * g + e]);
        if constexpr (F == PanelFormat::Q6) {
          acc += f[r] * xd[b] * static_cast<float>(dot[0] - 32 * xh[2 * b]) +
                 f[16 + r] * xd[b] * static_cast<float>(dot[1] - 32 * xh[2 * b + 1]);
        } else {
          acc += f[r] * xd[b] * static_cast<float>(dot[0] + dot[1]) +
                 f[16 + r] * xd[b] * static_cast<float>(xs[b]);
        }
      }
      out[(t0 + t) * ld_out + r] = acc;
    }
  }
}

}  // namespace

void panel_u8min_generic(const uint8_t* p, int64_t nb, const QuantActs& a, int64_t t0, int nt,
                         float* out, int64_t ld, int nv) {
  panel_generic<PanelFormat::U8Min>(p, nb, a, t0, nt, out, ld, nv);
}
void panel_q6_generic(const uint8_t* p, int64_t nb, const QuantActs& a, int64_t t0, int nt,
                      float* out, int64_t ld, int nv) {
  panel_generic<PanelFormat::Q6>(p, nb, a, t0, nt, out, ld, nv);
}

}  // namespace kestrel::backend::cpu
