// Tiled matmul for micro-batches of more than MV_MAX_T tokens, a template: the host includes
// this file once per tile shape, with MM_TM (weight rows per work-group), MM_TN (tokens per
// work-group), MM_WX x MM_WY (the work-group), MM_VEC4 (0 or 1, below), MM_PREFETCH (0 or 1,
// below) and MM_KERNEL (the kernel's name) defined before it and undefined after. Per step of 32
// input columns a work-group decodes its weight tile once into local memory, where all MM_TN
// tokens reuse it, and each work-item accumulates MM_TM / MM_WX rows x MM_TN / MM_WY tokens in
// registers (in f32).
//
// Tokens [t0, t0 + n_tokens) of x and out are computed, so that one call can run the full
// tiles with a large MM_TN and the rest with a small one. With splits > 1 the input columns are
// split over get_group_id(2) (more work-groups when the output alone gives too few to fill the
// device): split s writes its partial sums, without bias, to part + s * part_stride, and
// matmul_reduce adds them up.

#define MM_RM (MM_TM / MM_WX)
#define MM_RN (MM_TN / MM_WY)
#define MM_WG (MM_WX * MM_WY)
// Units of 8 values a work-item stages per step: weight rows x 4 parts, tokens x 4 parts.
#define MM_WUNITS ((MM_TM * 4 + MM_WG - 1) / MM_WG)
#define MM_XUNITS ((MM_TN * 4 + MM_WG - 1) / MM_WG)
// Which rows and tokens of the tile work-item (lx, ly) accumulates. MM_VEC4: runs of four,
// 4 * lx + 4 * MM_WX * (i / 4) + i % 4 (and the same for tokens), read from local memory as
// float4s: per step of k, 8 rows and 4 tokens cost 3 vector loads instead of 12 scalar ones,
// which held the kernel at ~1/3 of the FP32 rate on NVIDIA (local-memory bound). Without it,
// every MM_WX-th row (lx + MM_WX * i), scalar loads.
#if MM_VEC4
#define MM_ROW(i) (4 * lx + 4 * MM_WX * ((i) / 4) + (i) % 4)
#define MM_TOK(j) (4 * ly + 4 * MM_WY * ((j) / 4) + (j) % 4)
#else
#define MM_ROW(i) (lx + (i) * MM_WX)
#define MM_TOK(j) (ly + (j) * MM_WY)
#endif

#ifndef MM_TILED_HELPERS
#define MM_TILED_HELPERS
// MM_PREFETCH: for Q4_0 / Q8_0 the next step's weight bytes and activations are loaded into
// registers before the current step is multiplied, so that their global-memory latency overlaps
// the products (without it, every step waits for its loads behind the barrier). The raw bytes
// of weight8's unit: 8 quant bytes in x, y and the scale's bits in z.
inline uint4 weight_raw8(int type, const global uchar* qs, const global ushort* d, int n_out,
                         int r, int b, int part) {
  const long blk = (long)b * n_out + r;
  const global uchar* p =
      type == T_Q4_0 ? qs + blk * 16 + 8 * (part & 1) : qs + blk * 32 + 8 * part;
  // A typed 8-byte load (p is 8-byte aligned): NVIDIA's compiler turned vload8 of bytes into
  // eight byte loads.
  const uint2 q = *(const global uint2*)p;
  return (uint4)(q.x, q.y, d[blk], 0);
}

// weight8's arithmetic on raw bytes (the same values, bit for bit).
inline float8 decode_raw8(int type, uint4 raw, int part) {
  const float scale = half_bits_to_float((ushort)raw.z);
  const uchar8 q = as_uchar8((uint2)(raw.x, raw.y));
  if (type == T_Q4_0) {
    const uchar8 nib = part < 2 ? (q & (uchar)15) : (q >> (uchar)4);
    return (convert_float8(nib) - 8.0f) * scale;
  }
  return convert_float8(as_char8(q)) * scale;
}

// Writes 8 values as column `col` of rows 8 * part .. + 7 of a [32][width] tile.
#define MM_STORE8(tile, part, col, v)  \
  do {                                 \
    tile[8 * (part) + 0][col] = (v).s0; \
    tile[8 * (part) + 1][col] = (v).s1; \
    tile[8 * (part) + 2][col] = (v).s2; \
    tile[8 * (part) + 3][col] = (v).s3; \
    tile[8 * (part) + 4][col] = (v).s4; \
    tile[8 * (part) + 5][col] = (v).s5; \
    tile[8 * (part) + 6][col] = (v).s6; \
    tile[8 * (part) + 7][col] = (v).s7; \
  } while (0)
#endif

kernel __attribute__((reqd_work_group_size(MM_WX, MM_WY, 1))) void MM_KERNEL(
    global const uchar* qs, global const ushort* d, int type, long row_bytes, int n_in,
    int n_out, global const float* x, int t0, int n_tokens, global float* out,
    global const float* bias, int splits, global float* part, long part_stride) {
  // The tiles are float4 arrays read as float4s (MM_VEC4) and written as floats through w_tile /
  // x_tile: NVIDIA's compiler split float4 reads through a cast float pointer into four scalar
  // loads, which made the products local-memory bound (12 loads per 32 multiply-adds).
  local float4 w_tile4[32][MM_TM / 4];
  local float4 x_tile4[32][MM_TN / 4];
  local float(*w_tile)[MM_TM] = (local float(*)[MM_TM])w_tile4;
  local float(*x_tile)[MM_TN] = (local float(*)[MM_TN])x_tile4;
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
  float acc[MM_RM][MM_RN];
  for (int i = 0; i < MM_RM; ++i)
    for (int j = 0; j < MM_RN; ++j) acc[i][j] = 0.0f;

  const bool raw = MM_PREFETCH && (type == T_Q4_0 || type == T_Q8_0);
  uint4 wraw[MM_WUNITS];
  float8 xraw[MM_XUNITS];
  // Loads step b's units into wraw / xraw, zeros past the rows and tokens. The loads read the
  // last row or token there instead, so that they stay in bounds even when a compiler issues
  // them before the condition (PoCL did: a guarded load past the last row of a Q8_0 weight
  // segfaulted its outlier test).
#define MM_LOAD_STEP(b)                                                                   \
  do {                                                                                    \
    for (int k = 0; k < MM_WUNITS; ++k) {                                                 \
      const int u = lid + k * MM_WG, r = row0 + (u >> 2);                                 \
      const uint4 w = weight_raw8(type, qs, d, n_out, min(r, n_out - 1), (b), u & 3);     \
      wraw[k] = u < MM_TM * 4 && r < n_out ? w : (uint4)(0);                              \
    }                                                                                     \
    for (int k = 0; k < MM_XUNITS; ++k) {                                                 \
      const int u = lid + k * MM_WG, t = tok0 + (u >> 2);                                 \
      const float8 v = *(const global float8*)(x + (long)min(t, tok_end - 1) * n_in +    \
                                               32 * (b) + 8 * (u & 3));                   \
      xraw[k] = u < MM_TN * 4 && t < tok_end ? v : (float8)(0.0f);                        \
    }                                                                                     \
  } while (0)
  if (raw && b_begin < b_end) MM_LOAD_STEP(b_begin);

  for (int b = b_begin; b < b_end; ++b) {
    if (raw) {
      for (int k = 0; k < MM_WUNITS; ++k) {
        const int u = lid + k * MM_WG;
        if (u < MM_TM * 4) {
          const float8 w = decode_raw8(type, wraw[k], u & 3);
          MM_STORE8(w_tile, u & 3, u >> 2, w);
        }
      }
      for (int k = 0; k < MM_XUNITS; ++k) {
        const int u = lid + k * MM_WG;
        if (u < MM_TN * 4) MM_STORE8(x_tile, u & 3, u >> 2, xraw[k]);
      }
    } else {
      // Weight tile: MM_TM rows x 4 parts of 8 elements.
      for (int u = lid; u < MM_TM * 4; u += MM_WG) {
        const int rr = u >> 2, part = u & 3, r = row0 + rr;
        const float8 w =
            r < n_out ? weight8(type, qs, d, row_bytes, n_out, r, b, part) : (float8)(0.0f);
        MM_STORE8(w_tile, part, rr, w);
      }
      // Activation tile: MM_TN tokens x 4 parts of 8 floats.
      for (int u = lid; u < MM_TN * 4; u += MM_WG) {
        const int tt = u >> 2, part = u & 3, t = tok0 + tt;
        float8 v = (float8)(0.0f);
        if (t < tok_end) v = vload8(0, x + (long)t * n_in + 32 * b + 8 * part);
        MM_STORE8(x_tile, part, tt, v);
      }
    }
    barrier(CLK_LOCAL_MEM_FENCE);
    if (raw && b + 1 < b_end) MM_LOAD_STEP(b + 1);  // in flight during the products below
    // The block's 32 products in fresh sums, added to acc once: one chain of n_in additions
    // erred ~3x more than the other kernels (and flipped q4_0 K/V codes in the e2e test).
    float blk[MM_RM][MM_RN];
    for (int i = 0; i < MM_RM; ++i)
      for (int j = 0; j < MM_RN; ++j) blk[i][j] = 0.0f;
#pragma unroll 4
    for (int k = 0; k < 32; ++k) {
      float wr[MM_RM], xr[MM_RN];
#if MM_VEC4
      for (int i = 0; i < MM_RM; i += 4) {
        const float4 v = w_tile4[k][MM_ROW(i) / 4];
        wr[i] = v.x, wr[i + 1] = v.y, wr[i + 2] = v.z, wr[i + 3] = v.w;
      }
      for (int j = 0; j < MM_RN; j += 4) {
        const float4 v = x_tile4[k][MM_TOK(j) / 4];
        xr[j] = v.x, xr[j + 1] = v.y, xr[j + 2] = v.z, xr[j + 3] = v.w;
      }
#else
      for (int i = 0; i < MM_RM; ++i) wr[i] = w_tile[k][MM_ROW(i)];
      for (int j = 0; j < MM_RN; ++j) xr[j] = x_tile[k][MM_TOK(j)];
#endif
      for (int i = 0; i < MM_RM; ++i)
        for (int j = 0; j < MM_RN; ++j) blk[i][j] += wr[i] * xr[j];
    }
    for (int i = 0; i < MM_RM; ++i)
      for (int j = 0; j < MM_RN; ++j) acc[i][j] += blk[i][j];
    barrier(CLK_LOCAL_MEM_FENCE);
  }
  for (int j = 0; j < MM_RN; ++j) {
    const int t = tok0 + MM_TOK(j);
    if (t >= tok_end) continue;
    for (int i = 0; i < MM_RM; ++i) {
      const int r = row0 + MM_ROW(i);
      if (r >= n_out) continue;
      float v = acc[i][j];
      if (bias) v += bias[r];
      out[(long)t * n_out + r] = v;
    }
  }
}

#undef MM_LOAD_STEP
#undef MM_RM
#undef MM_RN
#undef MM_WG
#undef MM_WUNITS
#undef MM_XUNITS
#undef MM_PREFETCH
#undef MM_ROW
#undef MM_TOK
#undef MM_VEC4
#undef MM_TM
#undef MM_TN
#undef MM_WX
#undef MM_WY
#undef MM_KERNEL
