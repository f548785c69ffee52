// Tensor-core matmul for NVIDIA's OpenCL driver: Q4_0 / Q8_0 micro-batches of more than 8 tokens
// on mma.sync (m16n8k16, f16 inputs, f32 sums) through inline PTX, which NVIDIA's OpenCL
// compiler accepts (its OpenCL C goes through the same PTX as CUDA). OpenCL has no matrix
// instructions of its own, so the portable kernels (matmul_tiled.cl) run on the FP32 units at
// ~1/15 of an H100's f16 tensor rate; this is the same device adapting, like the half kernels on
// devices with cl_khr_fp16. The backend compiles it only on NVIDIA devices whose probe
// (nv_mma_probe, below, built and checked against exact products at setup) passed, and
// KESTREL_CL_NV_MMA=0 keeps the portable kernels.
//
// A template: the host appends it once per shape with NV_BM (weight rows a work-group), NV_BN
// (tokens a work-group), NV_WM x NV_WN (warps along rows x tokens), NV_KB (blocks of 32 input
// columns a step: the bytes a work-group has in flight) and NV_KERNEL defined. A step is
// 32 * NV_KB input columns: the work-group decodes its NV_BM x 32 NV_KB weight tile to f16 in
// local memory (d * q rounded once, as the CUDA backend's tensor-core kernels) and copies its
// tokens' f16 activations next to it; each warp multiplies (NV_BM / NV_WM) rows x (NV_BN / NV_WN)
// tokens. The next step's raw bytes are loaded into registers during the products.
//
// Activations come from nv_x_f16: each token's row multiplied by a power of two that puts its
// largest magnitude in [2^14, 2^15) before rounding to f16 (no overflow whatever the range, the
// op tests' 1e5 outputs included), the output multiplied back (exact). Error: one f16 rounding of
// each weight and activation (2^-11 relative), sums in f32.

#ifndef NVM_HELPERS
#define NVM_HELPERS
#ifdef NV_ASM
// NV_ASM is the compiler's spelling of the asm keyword (__asm__ or asm), found by the probe.
// Two floats as one f16x2 word (lo in bits 0-15), round to nearest even.
inline uint nv_pack_half2(float lo, float hi) {
  uint r;
  NV_ASM("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
  return r;
}

// c[0..3] += A (16 x 16, row-major fragment a0..a3) * B (16 x 8, column-major fragment b0, b1):
// lane (g = lane / 4, k = lane % 4) holds a0 = A[g][2k..], a1 = A[g + 8][2k..], a2 = A[g][2k + 8..],
// a3 = A[g + 8][2k + 8..], b0 = B[2k..][g], b1 = B[2k + 8..][g]; c = C[g][2k], C[g][2k + 1],
// C[g + 8][2k], C[g + 8][2k + 1].
#define NV_MMA(c, a0, a1, a2, a3, b0, b1)                                                   \
  NV_ASM volatile(                                                                          \
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "  \
      "{%8,%9}, {%0,%1,%2,%3};"                                                           \
      : "+f"((c)[0]), "+f"((c)[1]), "+f"((c)[2]), "+f"((c)[3])                             \
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1))
#define NV_SCRATCH(warps)
#define NV_FENCE() NV_ASM volatile("membar.gl;" ::: "memory")
#else
// Without NV_ASM (KESTREL_CL_NV_MMA=emulate, for the tests on any device): the same fragments
// exchanged through local memory (a warp's 192 words at nv_scratch, the work-group's barrier),
// f16 products summed in f32. Slow; it checks everything but the instruction itself.
inline uint nv_pack_half2(float lo, float hi) {
  ushort h[2];
  vstore_half_rte(lo, 0, (half*)h);
  vstore_half_rte(hi, 1, (half*)h);
  return (uint)h[0] | ((uint)h[1] << 16);
}

inline void nv_mma_emulated(float* c, uint a0, uint a1, uint a2, uint a3, uint b0, uint b1,
                            local uint* s) {
  const int lane = get_local_id(0) % 32, g = lane / 4, k = lane % 4;
  s[g * 8 + k] = a0;  // A [16][8 words], B [8 tokens][8 words] at s + 128
  s[(g + 8) * 8 + k] = a1;
  s[g * 8 + k + 4] = a2;
  s[(g + 8) * 8 + k + 4] = a3;
  s[128 + g * 8 + k] = b0;
  s[128 + g * 8 + k + 4] = b1;
  barrier(CLK_LOCAL_MEM_FENCE);
  for (int h = 0; h < 4; ++h) {
    const int row = g + 8 * (h / 2), col = 2 * k + h % 2;
    float sum = 0.0f;
    for (int w = 0; w < 8; ++w) {
      const uint a = s[row * 8 + w], b = s[128 + col * 8 + w];
      sum += half_bits_to_float(a & 0xffffu) * half_bits_to_float(b & 0xffffu) +
             half_bits_to_float(a >> 16) * half_bits_to_float(b >> 16);
    }
    c[h] += sum;
  }
  barrier(CLK_LOCAL_MEM_FENCE);
}
#define NV_MMA(c, a0, a1, a2, a3, b0, b1) nv_mma_emulated((c), a0, a1, a2, a3, b0, b1, nv_scratch)
#define NV_FENCE() mem_fence(CLK_GLOBAL_MEM_FENCE)
// The kernels' local scratch for the emulation, `warps` warps.
#define NV_SCRATCH(warps)            \
  local uint nv_scratch_all[(warps) * 192]; \
  local uint* nv_scratch = nv_scratch_all + 192 * (get_local_id(0) / 32)
#endif

// One m16n8k16 product of a [16][8 words] A and a [8 tokens][8 words] B (f16 pairs), written as
// c[token][row]: the setup's check that the instruction and the fragment layout above hold on
// this device and driver. One warp.
kernel void nv_mma_probe(global const uint* a, global const uint* b, global float* c) {
  const int lane = get_local_id(0), g = lane / 4, k = lane % 4;
  NV_SCRATCH(1);
  float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  NV_MMA(acc, a[g * 8 + k], a[(g + 8) * 8 + k], a[g * 8 + k + 4], a[(g + 8) * 8 + k + 4],
         b[g * 8 + k], b[g * 8 + k + 4]);
  for (int h = 0; h < 4; ++h) c[(2 * k + h % 2) * 16 + g + 8 * (h / 2)] = acc[h];
}

// xh[t] = x[t] * f rounded to f16 (pairs in words), xs[t] = 1 / f, with f the power of two that
// puts max |x[t]| in [2^14, 2^15) (1 for a row of zeros). A work-group of 256 per token, which
// keeps its first NVX_HELD x 1024 values in registers between the two passes: issued at once,
// their loads cost one memory latency (a loop of dependent passes over a 4096-11008-value row
// took ~40 us with the 16 work-groups of a 16-token micro-batch).
#define NVX_HELD 12
kernel __attribute__((reqd_work_group_size(256, 1, 1))) void nv_x_f16(global const float* x,
                                                                      int n_in, global uint* xh,
                                                                      global float* xs) {
  local float red[256];
  const int t = get_group_id(0), lid = get_local_id(0), n4 = n_in / 4;
  const global float4* row = (const global float4*)(x + (long)t * n_in);
  float4 held[NVX_HELD];
  float m = 0.0f;
#pragma unroll
  for (int c = 0; c < NVX_HELD; ++c) {
    const int i = lid + 256 * c;
    held[c] = i < n4 ? row[i] : (float4)(0.0f);
    const float4 a = fabs(held[c]);
    m = fmax(m, fmax(fmax(a.x, a.y), fmax(a.z, a.w)));
  }
  for (int i = lid + 256 * NVX_HELD; i < n4; i += 256) {
    const float4 a = fabs(row[i]);
    m = fmax(m, fmax(fmax(a.x, a.y), fmax(a.z, a.w)));
  }
  red[lid] = m;
  barrier(CLK_LOCAL_MEM_FENCE);
  for (int s = 128; s > 0; s >>= 1) {
    if (lid < s) red[lid] = fmax(red[lid], red[lid + s]);
    barrier(CLK_LOCAL_MEM_FENCE);
  }
  m = red[0];
  int e = 0;
  frexp(m, &e);  // m = f * 2^e, f in [0.5, 1); 0 for m = 0
  e = m > 0.0f ? clamp(15 - e, -120, 120) : 0;
  const float f = ldexp(1.0f, e);
  global uint2* dst = (global uint2*)(xh + (long)t * (n_in / 2));
#pragma unroll
  for (int c = 0; c < NVX_HELD; ++c) {
    const int i = lid + 256 * c;
    const float4 v = held[c] * f;
    if (i < n4) dst[i] = (uint2)(nv_pack_half2(v.x, v.y), nv_pack_half2(v.z, v.w));
  }
  for (int i = lid + 256 * NVX_HELD; i < n4; i += 256) {
    const float4 v = row[i] * f;
    dst[i] = (uint2)(nv_pack_half2(v.x, v.y), nv_pack_half2(v.z, v.w));
  }
  if (lid == 0) xs[t] = ldexp(1.0f, -e);
}

// The split-K sums of a tile by its last work-group: every work-group makes its partial visible
// device-wide and counts itself in; the one that counts `splits` adds the partials in split
// order (the same sums as matmul_reduce) and sets the counter back to 0 for the next launch.
// Partials are read volatile (from L2, not a stale L1).
// Partials are [split][t][n_total] over a launch's segments, a segment's rows at seg_off.
inline void nv_last_group_sums(int bm, int bn, int row0, int tok0, int tok_end, int n_out,
                               int n_total, int seg_off, int splits, global const float* part,
                               long part_stride, global float* out, global const float* bias,
                               global int* arrivals, local int* last) {
  NV_FENCE();
  barrier(CLK_GLOBAL_MEM_FENCE | CLK_LOCAL_MEM_FENCE);
  const int lid = get_local_id(0);
  const int tile = get_group_id(1) * get_num_groups(0) + get_group_id(0);
  if (lid == 0) *last = atomic_inc(arrivals + tile) == splits - 1;
  barrier(CLK_LOCAL_MEM_FENCE);
  if (!*last) return;
  NV_FENCE();
  const volatile global float* p = part;
  const int rows = min(n_out - row0, bm), tokens = min(tok_end - tok0, bn);
  for (int e = lid; e < rows * tokens; e += get_local_size(0)) {
    const int r = row0 + e % rows, t = tok0 + e / rows;
    const long i = (long)t * n_total + seg_off + r;
    float sum = 0.0f;
    for (int s = 0; s < splits; ++s) sum += p[s * part_stride + i];
    if (bias) sum += bias[r];
    out[(long)t * n_out + r] = sum;
  }
  if (lid == 0) arrivals[tile] = 0;
}

// Output v (already scaled back) of row r and token t: with splits > 1 to the split's partials
// ([t][n_total] at the weight's seg_off, no bias), else with the bias to the output.
inline void nv_store(float v, int r, int t, int splits, global float* dst, int n_total,
                     int seg_off, int n_out, global const float* bias) {
  if (splits > 1) {
    dst[(long)t * n_total + seg_off + r] = v;
    return;
  }
  if (bias) v += bias[r];
  dst[(long)t * n_out + r] = v;
}

// Eight codes of a raw unit (weight_raw8's bytes) times the scale, as four f16x2 words; for
// Q4_0 `hi` selects the high nibbles.
inline uint4 nv_unit_words(int type, uint4 raw, bool hi) {
  const float s = half_bits_to_float(raw.z);
  float v[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const uint byte = ((i < 4 ? raw.x : raw.y) >> (8 * (i % 4))) & 0xffu;
    v[i] = type == T_Q4_0 ? (float)((int)(hi ? byte >> 4 : byte & 15u) - 8)
                          : (float)(((int)(byte << 24)) >> 24);
  }
  return (uint4)(nv_pack_half2(v[0] * s, v[1] * s), nv_pack_half2(v[2] * s, v[3] * s),
                 nv_pack_half2(v[4] * s, v[5] * s), nv_pack_half2(v[6] * s, v[7] * s));
}
#endif

// The template (absent from the probe's build, which defines no NV_KERNEL).
#ifdef NV_KERNEL
#define NVM_WG (32 * NV_WM * NV_WN)
#define NVM_WROWS (NV_BM / NV_WM)  // rows a warp
#define NVM_WTOKS (NV_BN / NV_WN)  // tokens a warp
#define NVM_MT (NVM_WROWS / 16)
#define NVM_NT (NVM_WTOKS / 8)
// Halves a tile row: the step's columns + 8, so that a fragment's loads hit 32 banks (rows 4
// words apart modulo 32).
#define NVM_LD (32 * NV_KB + 8)
#define NVM_LDW (NVM_LD / 2)
// Units a work-item loads per step: weights in 8-byte units (4 a block row for Q8_0, 2 for
// Q4_0), tokens in 8-value units (4 a block).
#define NVM_WU ((NV_BM * 4 * NV_KB + NVM_WG - 1) / NVM_WG)
#define NVM_XU ((NV_BN * 4 * NV_KB + NVM_WG - 1) / NVM_WG)
#if NVM_WROWS % 16 != 0 || NVM_WTOKS % 8 != 0
#error "matmul_nv_mma: a warp takes whole 16-row x 8-token fragments"
#endif

// out[t][r] for rows [row0, +NV_BM) and tokens [tok0, +NV_BN) within [t0, t0 + n_tokens); with
// splits > 1 the blocks of split get_group_id(2) only, to part + split * part_stride (no bias),
// added up by matmul_reduce, or, given `arrivals` (one zeroed counter a tile), by the tile's
// last work-group to finish (one launch less a matmul: NVIDIA's driver spends ~10-20 us a
// launch). One launch serves up to three weights of the same input and type (segments: Q, K,
// V or gate, up), blocks0 and blocks1 row blocks for the first two, the rest for the third;
// their partials side by side, [split][t][n_total].
kernel __attribute__((reqd_work_group_size(NVM_WG, 1, 1))) void NV_KERNEL(
    int type, int n_in, global const uint* xh, global const float* xs, int t0, int n_tokens,
    int splits, global float* part, long part_stride, global int* arrivals, int n_total,
    int blocks0, int blocks1, global const uchar* qs0, global const ushort* d0, int n_out0,
    global float* out0, global const float* bias0, global const uchar* qs1,
    global const ushort* d1, int n_out1, global float* out1, global const float* bias1,
    global const uchar* qs2, global const ushort* d2, int n_out2, global float* out2,
    global const float* bias2) {
  local uint4 a_tile4[NV_BM * NVM_LD / 8];
  local uint4 x_tile4[NV_BN * NVM_LD / 8];
  local const uint* a_tile = (local const uint*)a_tile4;
  local const uint* x_tile = (local const uint*)x_tile4;
  NV_SCRATCH(NV_WM * NV_WN);
  local int last_of_tile;
  const int lid = get_local_id(0), warp = lid / 32, lane = lid % 32, g = lane / 4, k4 = lane % 4;
  const int wm = warp % NV_WM, wn = warp / NV_WM;
  const MatmulSegment seg =
      matmul_segment(get_group_id(0), blocks0, blocks1, qs0, d0, n_out0, out0, bias0, qs1, d1,
                     n_out1, out1, bias1, qs2, d2, n_out2, out2, bias2);
  const int block = seg.block, seg_off = seg.seg_off, n_out = seg.n_out;
  global const uchar* qs = seg.qs;
  global const ushort* d = seg.d;
  global float* out = seg.out;
  global const float* bias = seg.bias;
  const int row0 = block * NV_BM;
  const int tok0 = t0 + get_group_id(1) * NV_BN;
  const int tok_end = t0 + n_tokens;
  const int n_blocks = n_in / 32;
  const int split = get_group_id(2);
  const int b_begin = (int)((long)n_blocks * split / splits);
  const int b_end = (int)((long)n_blocks * (split + 1) / splits);
  global float* dst = splits > 1 ? part + split * part_stride : out;
  // Weight unit u of a step: block u / (NV_BM * upb) of the two, row (u / upb) % NV_BM, part
  // u % upb: consecutive work-items read consecutive 8 bytes of the repacked blocks.
  const int upb = type == T_Q4_0 ? 2 : 4;
  const int w_units = NV_KB * NV_BM * upb;
  float acc[NVM_MT][NVM_NT][4];
#pragma unroll
  for (int i = 0; i < NVM_MT; ++i)
#pragma unroll
    for (int j = 0; j < NVM_NT; ++j) acc[i][j][0] = acc[i][j][1] = acc[i][j][2] = acc[i][j][3] = 0.0f;

  uint4 wraw[NVM_WU], xraw[NVM_XU];
  // Past the last row, token or block of the split: zeros, loaded from an index in bounds.
#define NVM_LOAD_STEP(b0)                                                                    \
  do {                                                                                       \
    _Pragma("unroll") for (int i = 0; i < NVM_WU; ++i) {                                                       \
      const int u = lid + i * NVM_WG, blk = u / (NV_BM * upb);                              \
      const int r = row0 + (u / upb) % NV_BM, b = (b0) + blk;                               \
      wraw[i] = (uint4)(0);                                                                  \
      if (u >= w_units) continue; /* Q4_0 needs half the units of Q8_0 */                   \
      const uint4 w = weight_raw8(type, qs, d, n_out, min(r, n_out - 1), min(b, b_end - 1), \
                                  u % upb);                                                  \
      if (r < n_out && b < b_end) wraw[i] = w;                                               \
    }                                                                                        \
    _Pragma("unroll") for (int i = 0; i < NVM_XU; ++i) {                                                       \
      const int u = lid + i * NVM_WG, t = tok0 + u / (4 * NV_KB), b = (b0) + (u % (4 * NV_KB)) / 4; \
      const uint4 v = *(const global uint4*)(xh + ((long)min(t, tok_end - 1) * n_in +        \
                                                   32 * min(b, b_end - 1) + 8 * (u % 4)) / 2); \
      xraw[i] = u < NV_BN * 4 * NV_KB && t < tok_end && b < b_end ? v : (uint4)(0);          \
    }                                                                                        \
  } while (0)
  if (b_begin < b_end) NVM_LOAD_STEP(b_begin);

  for (int b0 = b_begin; b0 < b_end; b0 += NV_KB) {
#pragma unroll
    for (int i = 0; i < NVM_WU; ++i) {
      const int u = lid + i * NVM_WG;
      if (u >= w_units) break;
      const int blk = u / (NV_BM * upb), rr = (u / upb) % NV_BM, p = u % upb;
      // Q4_0: bytes 8p..8p+7 hold columns 8p.. (low nibbles) and 16 + 8p.. (high nibbles).
      const int col = 32 * blk + 8 * p;
      if (type == T_Q4_0) {
        a_tile4[(rr * NVM_LD + col) / 8] = nv_unit_words(type, wraw[i], false);
        a_tile4[(rr * NVM_LD + col + 16) / 8] = nv_unit_words(type, wraw[i], true);
      } else {
        a_tile4[(rr * NVM_LD + col) / 8] = nv_unit_words(type, wraw[i], false);
      }
    }
#pragma unroll
    for (int i = 0; i < NVM_XU; ++i) {
      const int u = lid + i * NVM_WG;
      if (u < NV_BN * 4 * NV_KB)
        x_tile4[((u / (4 * NV_KB)) * NVM_LD + 8 * (u % (4 * NV_KB))) / 8] = xraw[i];
    }
    barrier(CLK_LOCAL_MEM_FENCE);
    if (b0 + NV_KB < b_end) NVM_LOAD_STEP(b0 + NV_KB);  // in flight during the products
#pragma unroll
    for (int s = 0; s < 2 * NV_KB; ++s) {  // the step's 16-column slices
      const int kw = 8 * s + k4;
      uint af[NVM_MT][4];
#pragma unroll
      for (int i = 0; i < NVM_MT; ++i) {
        const int at = (wm * NVM_WROWS + 16 * i + g) * NVM_LDW + kw;
        af[i][0] = a_tile[at];
        af[i][1] = a_tile[at + 8 * NVM_LDW];
        af[i][2] = a_tile[at + 4];
        af[i][3] = a_tile[at + 8 * NVM_LDW + 4];
      }
#pragma unroll
      for (int j = 0; j < NVM_NT; ++j) {
        const int bt = (wn * NVM_WTOKS + 8 * j + g) * NVM_LDW + kw;
        const uint b0w = x_tile[bt], b1w = x_tile[bt + 4];
#pragma unroll
        for (int i = 0; i < NVM_MT; ++i)
          NV_MMA(acc[i][j], af[i][0], af[i][1], af[i][2], af[i][3], b0w, b1w);
      }
    }
    barrier(CLK_LOCAL_MEM_FENCE);
  }
#pragma unroll
  for (int i = 0; i < NVM_MT; ++i)
#pragma unroll
    for (int j = 0; j < NVM_NT; ++j)
#pragma unroll
      for (int h = 0; h < 4; ++h) {
        const int r = row0 + wm * NVM_WROWS + 16 * i + g + 8 * (h / 2);
        const int t = tok0 + wn * NVM_WTOKS + 8 * j + 2 * k4 + h % 2;
        if (r < n_out && t < tok_end)
          nv_store(acc[i][j][h] * xs[t], r, t, splits, dst, n_total, seg_off, n_out, bias);
      }
  if (splits > 1 && arrivals)
    nv_last_group_sums(NV_BM, NV_BN, row0, tok0, tok_end, n_out, n_total, seg_off, splits, part,
                       part_stride, out, bias, arrivals, &last_of_tile);
}

#undef NVM_LOAD_STEP
#undef NVM_WG
#undef NVM_WROWS
#undef NVM_WTOKS
#undef NVM_MT
#undef NVM_NT
#undef NVM_LD
#undef NVM_LDW
#undef NVM_WU
#undef NVM_XU
#undef NV_BM
#undef NV_BN
#undef NV_WM
#undef NV_WN
#undef NV_KB
#undef NV_KERNEL
#endif  // NV_KERNEL
