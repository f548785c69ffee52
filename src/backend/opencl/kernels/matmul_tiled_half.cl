// Tiled matmul in half arithmetic, for devices with cl_khr_fp16 (mobile GPUs such as Adreno run
// half at twice their f32 rate, and half tiles need half the local memory) and the repacked
// Q4_0 / Q8_0 weights. A template like matmul_tiled.cl: the host appends it once per tile shape
// (after matmul_tiled.cl, whose weight_raw8 and MM_STORE8 it uses) with MM_TM, MM_TN, MM_WX,
// MM_WY, MM_PREFETCH and MM_KERNEL defined; every work-item reads runs of four rows and four
// tokens as half4 (the rows and tokens of matmul_tiled's MM_VEC4 layout).
//
// Why half is safe here: the weight tile holds the integer codes (q4_0 -8..7, q8_0 -128..127,
// exact in half) with each row's block scale apart in f32, and the activations come from
// x_half_blocks, which divides each token's 32-column block by a power of two s >= max |x|
// (exact) before rounding it to half. Eight products at a time are then summed in half, with
// |sum| <= 8 * 128 = 1024, far from half's 65504 whatever the activations' range (the outlier
// tests' 1e5 outputs exist only in f32); a block's four sums of eight are added in f32 and
// multiplied by the row's scale and s. Error: one half rounding per activation, product and
// addition; on the op tests' weights (rows with 40x outliers) ~3e-3 of a token's outputs in l2
// and ~1.7e-2 of their rms at most, where the f32 kernels err by ~1e-6 (KESTREL_CL_HALF=0 keeps
// those).

#if !defined(KESTREL_HAS_FP16)
#error "matmul_tiled_half.cl needs cl_khr_fp16"
#endif

#define MMH_RM (MM_TM / MM_WX)
#define MMH_RN (MM_TN / MM_WY)
#define MMH_WG (MM_WX * MM_WY)
#define MMH_WUNITS ((MM_TM * 4 + MMH_WG - 1) / MMH_WG)
#define MMH_XUNITS ((MM_TN * 4 + MMH_WG - 1) / MMH_WG)
#if MMH_RM % 4 != 0 || MMH_RN % 4 != 0
#error "matmul_tiled_half: each work-item needs runs of four rows and four tokens"
#endif
// Row i and token j of work-item (lx, ly) within the tile (as matmul_tiled's MM_VEC4).
#define MMH_ROW(i) (4 * lx + 4 * MM_WX * ((i) / 4) + (i) % 4)
#define MMH_TOK(j) (4 * ly + 4 * MM_WY * ((j) / 4) + (j) % 4)

#ifndef MMH_HELPERS
#define MMH_HELPERS
// The 8 integer codes of weight8's unit `part`, from weight_raw8's bytes.
inline half8 codes8(int type, uint4 raw, int part) {
  const uchar8 q = as_uchar8((uint2)(raw.x, raw.y));
  if (type == T_Q4_0) {
    const uchar8 nib = part < 2 ? (q & (uchar)15) : (q >> (uchar)4);
    return convert_half8(as_char8(nib) - (char)8);
  }
  return convert_half8(as_char8(q));
}

// xh[t][n_in] = x[t][n_in] / s[t][b] rounded to half, xs[t][b] = s[t][b]: per token and
// 32-column block b, the smallest power of two s with s > max |x| (1 for a block of zeros), so
// that the division is exact and |xh| < 1. One work-item per (block, token).
kernel void x_half_blocks(global const float* x, int n_in, int n_tokens, global half* xh,
                          global float* xs) {
  const int b = get_global_id(0), t = get_global_id(1);
  const int n_blocks = n_in / 32;
  if (b >= n_blocks || t >= n_tokens) return;
  const long at = (long)t * n_in + 32 * b;
  float8 v[4];
  float m = 0.0f;
  for (int i = 0; i < 4; ++i) {
    v[i] = *(const global float8*)(x + at + 8 * i);
    const float8 a = fabs(v[i]);
    const float4 m4 = fmax(a.lo, a.hi);
    m = fmax(m, fmax(fmax(m4.x, m4.y), fmax(m4.z, m4.w)));
  }
  int e = 0;
  frexp(m, &e);  // m = f * 2^e with f in [0.5, 1); e = 0 for m = 0
  const float inv = ldexp(1.0f, -e);
  for (int i = 0; i < 4; ++i) vstore_half8_rte(v[i] * inv, 0, xh + at + 8 * i);
  xs[(long)t * n_blocks + b] = ldexp(1.0f, e);
}
#endif

kernel __attribute__((reqd_work_group_size(MM_WX, MM_WY, 1))) void MM_KERNEL(
    global const uchar* qs, global const ushort* d, int type, int n_in, int n_out,
    global const half* xh, global const float* xs, int t0, int n_tokens, global float* out,
    global const float* bias, int splits, global float* part, long part_stride) {
  local half4 w_tile4[32][MM_TM / 4];  // codes
  local half4 x_tile4[32][MM_TN / 4];  // activations / s
  local float w_scale[MM_TM], x_scale[MM_TN];
  local half(*w_tile)[MM_TM] = (local half(*)[MM_TM])w_tile4;
  local half(*x_tile)[MM_TN] = (local half(*)[MM_TN])x_tile4;
  const int lx = get_local_id(0), ly = get_local_id(1);
  const int lid = ly * MM_WX + lx;
  const int row0 = get_group_id(0) * MM_TM;
  const int tok0 = t0 + get_group_id(1) * MM_TN;
  const int tok_end = t0 + n_tokens;
  const int n_blocks = n_in / 32;
  const int split = get_group_id(2);
  const int b_begin = (int)((long)n_blocks * split / splits);
  const int b_end = (int)((long)n_blocks * (split + 1) / splits);
  if (splits > 1) {
    out = part + split * part_stride;
    bias = 0;
  }
  float acc[MMH_RM][MMH_RN];
  for (int i = 0; i < MMH_RM; ++i)
    for (int j = 0; j < MMH_RN; ++j) acc[i][j] = 0.0f;

  // Step b's units in registers: weight bytes and scale bits (weight_raw8), 8 halves of a token
  // and its block's s. Past the last row or token: zeros, loaded from the last one (in bounds).
  uint4 wraw[MMH_WUNITS], xraw[MMH_XUNITS];
  float xsraw[MMH_XUNITS];
#define MMH_LOAD_STEP(b)                                                                  \
  do {                                                                                    \
    for (int k = 0; k < MMH_WUNITS; ++k) {                                                \
      const int u = lid + k * MMH_WG, r = row0 + (u >> 2);                                \
      const uint4 w = weight_raw8(type, qs, d, n_out, min(r, n_out - 1), (b), u & 3);     \
      wraw[k] = u < MM_TM * 4 && r < n_out ? w : (uint4)(0);                              \
    }                                                                                     \
    for (int k = 0; k < MMH_XUNITS; ++k) {                                                \
      const int u = lid + k * MMH_WG, t = min(tok0 + (u >> 2), tok_end - 1);              \
      const bool in = u < MM_TN * 4 && tok0 + (u >> 2) < tok_end;                         \
      const uint4 v = *(const global uint4*)(xh + (long)t * n_in + 32 * (b) + 8 * (u & 3)); \
      const float s = xs[(long)t * n_blocks + (b)];                                       \
      xraw[k] = in ? v : (uint4)(0);                                                      \
      xsraw[k] = in ? s : 0.0f;                                                           \
    }                                                                                     \
  } while (0)
  if (MM_PREFETCH && b_begin < b_end) MMH_LOAD_STEP(b_begin);

  for (int b = b_begin; b < b_end; ++b) {
    if (!MM_PREFETCH) MMH_LOAD_STEP(b);
    for (int k = 0; k < MMH_WUNITS; ++k) {
      const int u = lid + k * MMH_WG;
      if (u < MM_TM * 4) {
        MM_STORE8(w_tile, u & 3, u >> 2, codes8(type, wraw[k], u & 3));
        if ((u & 3) == 0) w_scale[u >> 2] = half_bits_to_float(wraw[k].z);
      }
    }
    for (int k = 0; k < MMH_XUNITS; ++k) {
      const int u = lid + k * MMH_WG;
      if (u < MM_TN * 4) {
        MM_STORE8(x_tile, u & 3, u >> 2, as_half8(xraw[k]));
        if ((u & 3) == 0) x_scale[u >> 2] = xsraw[k];
      }
    }
    barrier(CLK_LOCAL_MEM_FENCE);
    if (MM_PREFETCH && b + 1 < b_end) MMH_LOAD_STEP(b + 1);  // in flight during the products
    // The block's products summed in half eight at a time (rows 4i..4i+3 of token j in a half4),
    // the four sums of eight in f32: one half chain of all 32 erred ~2.5x more (matmul/q4_0
    // max/rms 3.5e-2 against 1.4e-2 on Intel's CPU runtime).
    float4 blk[MMH_RM / 4][MMH_RN];
    for (int i = 0; i < MMH_RM / 4; ++i)
      for (int j = 0; j < MMH_RN; ++j) blk[i][j] = (float4)(0.0f);
    for (int k0 = 0; k0 < 32; k0 += 8) {
      half4 part8[MMH_RM / 4][MMH_RN];
      for (int i = 0; i < MMH_RM / 4; ++i)
        for (int j = 0; j < MMH_RN; ++j) part8[i][j] = (half4)(0.0h);
#pragma unroll
      for (int k = k0; k < k0 + 8; ++k) {
        half4 w4[MMH_RM / 4];
        half xr[MMH_RN];
        for (int i = 0; i < MMH_RM / 4; ++i) w4[i] = w_tile4[k][lx + MM_WX * i];
        for (int j = 0; j < MMH_RN; j += 4) {
          const half4 v = x_tile4[k][ly + MM_WY * (j / 4)];
          xr[j] = v.x, xr[j + 1] = v.y, xr[j + 2] = v.z, xr[j + 3] = v.w;
        }
        for (int i = 0; i < MMH_RM / 4; ++i)
          for (int j = 0; j < MMH_RN; ++j) part8[i][j] = fma(w4[i], (half4)(xr[j]), part8[i][j]);
      }
      for (int i = 0; i < MMH_RM / 4; ++i)
        for (int j = 0; j < MMH_RN; ++j) blk[i][j] += convert_float4(part8[i][j]);
    }
    for (int j = 0; j < MMH_RN; ++j) {
      const float s = x_scale[MMH_TOK(j)];
      for (int i = 0; i < MMH_RM / 4; ++i) {
        const float4 sum = blk[i][j];
        acc[4 * i + 0][j] += sum.x * (w_scale[MMH_ROW(4 * i + 0)] * s);
        acc[4 * i + 1][j] += sum.y * (w_scale[MMH_ROW(4 * i + 1)] * s);
        acc[4 * i + 2][j] += sum.z * (w_scale[MMH_ROW(4 * i + 2)] * s);
        acc[4 * i + 3][j] += sum.w * (w_scale[MMH_ROW(4 * i + 3)] * s);
      }
    }
    barrier(CLK_LOCAL_MEM_FENCE);
  }
  for (int j = 0; j < MMH_RN; ++j) {
    const int t = tok0 + MMH_TOK(j);
    if (t >= tok_end) continue;
    for (int i = 0; i < MMH_RM; ++i) {
      const int r = row0 + MMH_ROW(i);
      if (r >= n_out) continue;
      float v = acc[i][j];
      if (bias) v += bias[r];
      out[(long)t * n_out + r] = v;
    }
  }
}

#undef MMH_LOAD_STEP
#undef MMH_RM
#undef MMH_RN
#undef MMH_WG
#undef MMH_WUNITS
#undef MMH_XUNITS
#undef MMH_ROW
#undef MMH_TOK
#undef MM_PREFETCH
#undef MM_TM
#undef MM_TN
#undef MM_WX
#undef MM_WY
#undef MM_KERNEL
