// Matmul out[T][n_out] = x[T][n_in] . W[n_out][n_in]^T (+ bias), the parts shared by every
// token count: reading weights, and the small-batch kernels (T <= MV_MAX_T: decode and short
// micro-batches, bandwidth-bound, each weight read once). The tiled kernels for larger T are in
// matmul_tiled.cl.
//
// Weights: Q4_0 and Q8_0 are repacked at load (opencl_backend.cpp) block-major, quants and
// scales apart, so that consecutive rows are consecutive in memory and a work-group reading
// block b of its rows reads one contiguous run:
//   qs[b][n_out][16] (Q4_0: byte j holds elements j and j + 16) or qs[b][n_out][32] (Q8_0),
//   d[b][n_out]: the fp16 scale bits.
// Every other type keeps its GGUF rows (row_bytes apart) and is decoded by decode8.

// Elements 8 * part .. + 7 of block b of weight row r, any layout.
inline void weight8(int type, const global uchar* qs, const global ushort* d, long row_bytes,
                    int n_out, int r, int b, int part, float* out) {
  if (type == T_Q4_0) {
    const long blk = (long)b * n_out + r;
    const float scale = half_bits_to_float(d[blk]);
    const uchar8 q = vload8(0, qs + blk * 16 + 8 * (part & 1));
    const uchar8 nib = part < 2 ? (q & (uchar)15) : (q >> (uchar)4);
    const float8 v = (convert_float8(convert_char8(nib)) - 8.0f) * scale;
    vstore8(v, 0, out);
  } else if (type == T_Q8_0) {
    const long blk = (long)b * n_out + r;
    const float scale = half_bits_to_float(d[blk]);
    const char8 q = vload8(0, (const global char*)(qs + blk * 32 + 8 * part));
    vstore8(convert_float8(q) * scale, 0, out);
  } else {
    decode8(type, qs + (long)r * row_bytes, b, part, out);
  }
}

// Small batches: a work-group of MV_ROWS x MV_SPLIT work-items computes MV_ROWS output rows;
// the MV_SPLIT work-items of a row split its blocks and add their partial sums in local memory.
#define MV_ROWS 64
#ifndef MV_SPLIT
#define MV_SPLIT 4
#endif
#define MV_MAX_T 8
kernel __attribute__((reqd_work_group_size(MV_ROWS, MV_SPLIT, 1))) void matmul_small(
    global const uchar* qs, global const ushort* d, int type, long row_bytes, int n_in,
    int n_out, global const float* x, int n_tokens, global float* out,
    global const float* bias) {
  local float partial[MV_SPLIT][MV_MAX_T][MV_ROWS];
  const int lr = get_local_id(0), ks = get_local_id(1);
  const int r = get_group_id(0) * MV_ROWS + lr;
  const int n_blocks = n_in / 32;
  float acc[MV_MAX_T];
  for (int t = 0; t < MV_MAX_T; ++t) acc[t] = 0.0f;
  if (r < n_out) {
    for (int b = ks; b < n_blocks; b += MV_SPLIT) {
      for (int part = 0; part < 4; ++part) {
        float w[8];
        weight8(type, qs, d, row_bytes, n_out, r, b, part, w);
        const float8 wv = vload8(0, w);
        for (int t = 0; t < MV_MAX_T; ++t) {
          if (t >= n_tokens) break;
          const float8 xv = vload8(0, x + (long)t * n_in + 32 * b + 8 * part);
          const float8 p = wv * xv;
          acc[t] += ((p.s0 + p.s1) + (p.s2 + p.s3)) + ((p.s4 + p.s5) + (p.s6 + p.s7));
        }
      }
    }
  }
  if (ks > 0)
    for (int t = 0; t < MV_MAX_T; ++t) partial[ks][t][lr] = acc[t];
  barrier(CLK_LOCAL_MEM_FENCE);
  if (ks > 0 || r >= n_out) return;
  for (int t = 0; t < n_tokens; ++t) {
    float sum = acc[t];
    for (int k = 1; k < MV_SPLIT; ++k) sum += partial[k][t][lr];
    if (bias) sum += bias[r];
    out[(long)t * n_out + r] = sum;
  }
}
