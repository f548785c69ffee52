// Register-fragment tensor-core matmul for micro-batches of 9-16 tokens on NVIDIA's driver
// (KESTREL_CL_NV_FRAG=1; opt-in until it has run there), after matmul_nv_mma.cl (its helpers:
// NV_MMA, nv_pack_half2, nv_store, nv_last_group_sums). A template: the host appends it once
// per weight type with NVF_TYPE (T_Q4_0 or T_Q8_0) and NVF_KERNEL defined.
//
// Why: in the 16-token instance of matmul_nv_mma.cl every weight row is used by one warp only,
// yet it goes through local memory (a decoded f16 tile, two barriers a step); at 16 tokens that
// kernel streamed the weights at ~380 GB/s on the H200 where CUDA's reaches 1.4-1.8 TB/s. Here
// each lane loads the bytes of its own A fragment straight from the repacked blocks and its B
// fragment words straight from the f16 activations (the 8 warps share them through L1): no local
// memory, no barrier in the loop, NVF_NB blocks' loads issued before their products.
//
// A fragment of a block (rows g and g + 8 of the warp's 16, lane k = lane % 4): Q4_0 bytes 2k,
// 2k + 1 and 2k + 8, 2k + 9 of each row hold both 16-column slices (low nibbles columns 0-15,
// high nibbles 16-31); Q8_0 the same bytes of each 16-byte half. Codes become f16 without a
// conversion instruction: a code c in 0..255 or-ed into 0x6400 is the f16 1024 + c; subtracting
// 1032 (Q4_0) or 1152 (Q8_0, its byte xor 0x80) gives the signed code exactly, and one f16
// multiply by the block scale rounds d * q once, to nearest even, as the template's f32 product
// and conversion do: the two kernels give the same results bit for bit. Tiles (128 rows x 16
// tokens, 8 warps), arguments and split-K are the template's.

#ifndef NVF_HELPERS
#define NVF_HELPERS
#ifndef NVF_NB
#define NVF_NB 2
#endif

// Bytes 2i and 2i + 1 of w in bits 0-7 and 16-23.
inline uint nvf_spread(uint w, int i) {
  return ((w >> (16 * i)) & 0xffu) | (((w >> (16 * i + 8)) & 0xffu) << 16);
}

#ifdef NV_ASM
// (h - bias) * dd on f16 pairs, each rounded to nearest even (exact for the subtraction).
inline uint nvf_scale2(uint h, uint bias, uint dd) {
  uint t, r;
  NV_ASM("sub.rn.f16x2 %0, %1, %2;" : "=r"(t) : "r"(h), "r"(bias));
  NV_ASM("mul.rn.f16x2 %0, %1, %2;" : "=r"(r) : "r"(t), "r"(dd));
  return r;
}
#else
// The same in f32 (both differences exact, each product exact, then rounded once to f16).
inline uint nvf_scale2(uint h, uint bias, uint dd) {
  const float d = half_bits_to_float(dd & 0xffffu);
  const float lo = (half_bits_to_float(h & 0xffffu) - half_bits_to_float(bias & 0xffffu)) * d;
  const float hi = (half_bits_to_float(h >> 16) - half_bits_to_float(bias >> 16)) * d;
  return nv_pack_half2(lo, hi);
}
#endif
#endif  // NVF_HELPERS

// Word i (0: columns 2k, 2k + 1; 1: columns 2k + 8, 2k + 9) of slice `sl` of a row's fragment,
// from its raw word w (the four bytes of the slice) and scale pair dd.
#if NVF_TYPE == T_Q4_0
#define NVF_WORD(w, i, sl, dd) \
  nvf_scale2(((nvf_spread((w), (i)) >> (4 * (sl))) & 0x000f000fu) | 0x64006400u, 0x64086408u, (dd))
#define NVF_ROW_BYTES 16
#else
#define NVF_WORD(w, i, sl, dd) \
  nvf_scale2((nvf_spread((w), (i)) ^ 0x00800080u) | 0x64006400u, 0x64806480u, (dd))
#define NVF_ROW_BYTES 32
#endif

kernel __attribute__((reqd_work_group_size(256, 1, 1))) void NVF_KERNEL(
    int type, int n_in, global const uint* xh, global const float* xs, int t0, int n_tokens,
    int splits, global float* part, long part_stride, global int* arrivals, int n_total,
    int blocks0, int blocks1, global const uchar* qs0, global const ushort* d0, int n_out0,
    global float* out0, global const float* bias0, global const uchar* qs1,
    global const ushort* d1, int n_out1, global float* out1, global const float* bias1,
    global const uchar* qs2, global const ushort* d2, int n_out2, global float* out2,
    global const float* bias2) {
  (void)type;  // NVF_TYPE
  NV_SCRATCH(8);
  local int last_of_tile;
  const int lid = get_local_id(0), warp = lid / 32, lane = lid % 32, g = lane / 4, k4 = lane % 4;
  const MatmulSegment seg =
      matmul_segment(get_group_id(0), blocks0, blocks1, qs0, d0, n_out0, out0, bias0, qs1, d1,
                     n_out1, out1, bias1, qs2, d2, n_out2, out2, bias2);
  const int block = seg.block, seg_off = seg.seg_off, n_out = seg.n_out;
  global const uchar* qs = seg.qs;
  global const ushort* d = seg.d;
  global float* out = seg.out;
  global const float* bias = seg.bias;
  const int row0 = block * 128, wrow = row0 + 16 * warp;
  const int tok0 = t0 + get_group_id(1) * 16, tok_end = t0 + n_tokens;
  const int n_blocks = n_in / 32, split = get_group_id(2);
  const int b_begin = (int)((long)n_blocks * split / splits);
  const int b_end = (int)((long)n_blocks * (split + 1) / splits);
  global float* dst = splits > 1 ? part + split * part_stride : out;
  // Rows g and g + 8 of the warp's 16, tokens g and 8 + g of the 16: past the end, the last one
  // (their products land in rows and tokens that are not stored).
  const int row_a = min(wrow + g, n_out - 1), row_b = min(wrow + g + 8, n_out - 1);
  const global uint* x_a = xh + (long)min(tok0 + g, tok_end - 1) * (n_in / 2) + k4;
  const global uint* x_b = xh + (long)min(tok0 + 8 + g, tok_end - 1) * (n_in / 2) + k4;
  float acc[2][4];
  for (int j = 0; j < 2; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.0f;
  for (int bb = b_begin; bb < b_end; bb += NVF_NB) {
    // The raw bytes of NVF_NB blocks first (past the split's end, its last block again, loaded
    // but not multiplied): per row and slice a word, the row's scale as an f16 pair, per token
    // tile and slice two activation words.
    uint wa[NVF_NB][2][2], da[NVF_NB][2], xw[NVF_NB][2][2][2];
#pragma unroll
    for (int i = 0; i < NVF_NB; ++i) {
      const int b = min(bb + i, b_end - 1);
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const long blk = (long)b * n_out + (r ? row_b : row_a);
        const global ushort* p = (const global ushort*)(qs + blk * NVF_ROW_BYTES) + k4;
        const uint dh = d[blk];
        da[i][r] = dh | (dh << 16);
        wa[i][r][0] = (uint)p[0] | ((uint)p[4] << 16);  // bytes 2k, 2k + 1 | 2k + 8, 2k + 9
#if NVF_TYPE == T_Q4_0
        wa[i][r][1] = wa[i][r][0];
#else
        wa[i][r][1] = (uint)p[8] | ((uint)p[12] << 16);
#endif
      }
#pragma unroll
      for (int sl = 0; sl < 2; ++sl) {
        xw[i][0][sl][0] = x_a[16 * b + 8 * sl];
        xw[i][0][sl][1] = x_a[16 * b + 8 * sl + 4];
        xw[i][1][sl][0] = x_b[16 * b + 8 * sl];
        xw[i][1][sl][1] = x_b[16 * b + 8 * sl + 4];
      }
    }
#pragma unroll
    for (int i = 0; i < NVF_NB; ++i) {
      if (bb + i < b_end) {  // the same for the whole work-group
#pragma unroll
        for (int sl = 0; sl < 2; ++sl) {
          const uint a0 = NVF_WORD(wa[i][0][sl], 0, sl, da[i][0]);
          const uint a1 = NVF_WORD(wa[i][1][sl], 0, sl, da[i][1]);
          const uint a2 = NVF_WORD(wa[i][0][sl], 1, sl, da[i][0]);
          const uint a3 = NVF_WORD(wa[i][1][sl], 1, sl, da[i][1]);
#pragma unroll
          for (int j = 0; j < 2; ++j)
            NV_MMA(acc[j], a0, a1, a2, a3, xw[i][j][sl][0], xw[i][j][sl][1]);
        }
      }
    }
  }
#pragma unroll
  for (int j = 0; j < 2; ++j)
#pragma unroll
    for (int h = 0; h < 4; ++h) {
      const int r = wrow + g + 8 * (h / 2), t = tok0 + 8 * j + 2 * k4 + h % 2;
      if (r < n_out && t < tok_end)
        nv_store(acc[j][h] * xs[t], r, t, splits, dst, n_total, seg_off, n_out, bias);
    }
  if (splits > 1 && arrivals)
    nv_last_group_sums(128, 16, row0, tok0, tok_end, n_out, n_total, seg_off, splits, part,
                       part_stride, out, bias, arrivals, &last_of_tile);
}

#undef NVF_WORD
#undef NVF_ROW_BYTES
#undef NVF_TYPE
#undef NVF_KERNEL
