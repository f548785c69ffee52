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

// Elements 8 * part .. + 7 of block b of weight row r, any layout, as a vector (kept in
// registers: no private array whose address escapes on the fast types). The repacked blocks are
// read by typed 8-byte loads (8-byte aligned; vload8 of bytes became eight byte loads on NVIDIA).
inline float8 weight8(int type, const global uchar* qs, const global ushort* d, long row_bytes,
                      int n_out, int r, int b, int part) {
  if (type == T_Q4_0) {
    const long blk = (long)b * n_out + r;
    const float scale = half_bits_to_float(d[blk]);
    const uchar8 q = as_uchar8(*(const global uint2*)(qs + blk * 16 + 8 * (part & 1)));
    const uchar8 nib = part < 2 ? (q & (uchar)15) : (q >> (uchar)4);
    return (convert_float8(nib) - 8.0f) * scale;
  }
  if (type == T_Q8_0) {
    const long blk = (long)b * n_out + r;
    const float scale = half_bits_to_float(d[blk]);
    return convert_float8(as_char8(*(const global uint2*)(qs + blk * 32 + 8 * part))) * scale;
  }
  float v[8];
  decode8(type, qs + (long)r * row_bytes, b, part, v);
  return vload8(0, v);
}

inline float dot8(float8 a, float8 b) {
  return dot(a.lo, b.lo) + dot(a.hi, b.hi);
}

// Small batches: a work-group of MV_ROWS x MV_SPLIT work-items computes MV_ROWS output rows;
// the MV_SPLIT work-items of a row split its blocks and add their partial sums in local memory.
// One launch serves up to three weights of one type over the same input (Q, K and V; gate and
// up: a launch costs ~20 us on NVIDIA's driver, more than a decode step's matvec of K or V),
// its row blocks divided as matmul_segment (common.cl) says.
#ifndef MV_ROWS
#define MV_ROWS 16
#endif
#ifndef MV_SPLIT
#define MV_SPLIT 16
#endif
#define MV_MAX_T 8
kernel __attribute__((reqd_work_group_size(MV_ROWS, MV_SPLIT, 1))) void matmul_small(
    int type, long row_bytes, int n_in, global const float* x, int n_tokens, int blocks0,
    int blocks1, global const uchar* qs0, global const ushort* d0, int n_out0,
    global float* out0, global const float* bias0, global const uchar* qs1,
    global const ushort* d1, int n_out1, global float* out1, global const float* bias1,
    global const uchar* qs2, global const ushort* d2, int n_out2, global float* out2,
    global const float* bias2) {
  local float partial[MV_SPLIT][MV_MAX_T][MV_ROWS];
  const MatmulSegment seg =
      matmul_segment(get_group_id(0), blocks0, blocks1, qs0, d0, n_out0, out0, bias0, qs1, d1,
                     n_out1, out1, bias1, qs2, d2, n_out2, out2, bias2);
  const int block = seg.block, n_out = seg.n_out;
  global const uchar* qs = seg.qs;
  global const ushort* d = seg.d;
  global float* out = seg.out;
  global const float* bias = seg.bias;
  const int lr = get_local_id(0), ks = get_local_id(1);
  const int r = block * MV_ROWS + lr;
  const int n_blocks = n_in / 32;
  float acc[MV_MAX_T];
#pragma unroll
  for (int t = 0; t < MV_MAX_T; ++t) acc[t] = 0.0f;
  if (r < n_out && (type == T_Q4_0 || type == T_Q8_0)) {
    // The repacked types: a whole block per load (16 or 32 bytes, 16-byte aligned), the scale
    // applied once to each block's dot product. Typed loads, not vload16: NVIDIA's compiler
    // made vload16 of bytes sixteen byte loads and of floats sixteen scalar loads.
    for (int b = ks; b < n_blocks; b += MV_SPLIT) {
      const long blk = (long)b * n_out + r;
      const float scale = half_bits_to_float(d[blk]);
      float16 w_lo, w_hi;  // elements 0..15 and 16..31
      if (type == T_Q4_0) {
        const uchar16 q = as_uchar16(*(const global uint4*)(qs + blk * 16));
        w_lo = convert_float16(q & (uchar)15) - 8.0f;
        w_hi = convert_float16(q >> (uchar)4) - 8.0f;
      } else {
        const global uint4* q = (const global uint4*)(qs + blk * 32);
        w_lo = convert_float16(as_char16(q[0]));
        w_hi = convert_float16(as_char16(q[1]));
      }
      for (int t = 0; t < MV_MAX_T; ++t) {
        if (t >= n_tokens) break;
        const global float16* xb = (const global float16*)(x + (long)t * n_in + 32 * b);
        const float16 p = w_lo * xb[0] + w_hi * xb[1];
        const float8 h = p.lo + p.hi;
        const float4 f = h.lo + h.hi;
        acc[t] += scale * ((f.x + f.y) + (f.z + f.w));
      }
    }
  } else if (r < n_out) {
    for (int b = ks; b < n_blocks; b += MV_SPLIT) {
      for (int part = 0; part < 4; ++part) {
        const float8 wv = weight8(type, qs, d, row_bytes, n_out, r, b, part);
        for (int t = 0; t < MV_MAX_T; ++t) {
          if (t >= n_tokens) break;
          const float8 p = wv * vload8(0, x + (long)t * n_in + 32 * b + 8 * part);
          acc[t] += ((p.s0 + p.s1) + (p.s2 + p.s3)) + ((p.s4 + p.s5) + (p.s6 + p.s7));
        }
      }
    }
  }
  if (ks > 0) {
#pragma unroll
    for (int t = 0; t < MV_MAX_T; ++t) partial[ks][t][lr] = acc[t];
  }
  barrier(CLK_LOCAL_MEM_FENCE);
  if (ks > 0 || r >= n_out) return;
  for (int t = 0; t < n_tokens; ++t) {
    float sum = acc[t];
    for (int k = 1; k < MV_SPLIT; ++k) sum += partial[k][t][lr];
    if (bias) sum += bias[r];
    out[(long)t * n_out + r] = sum;
  }
}

// out[t][r] = sum over s of part[s][t][r] (+ bias[r]), for tokens [t0, t0 + n_tokens): the
// split-K partial sums of the tiled kernels.
kernel void matmul_reduce(global const float* part, int splits, long part_stride, int n_out,
                          int t0, int n_tokens, global float* out, global const float* bias) {
  const int r = get_global_id(0), t = t0 + get_global_id(1);
  if (r >= n_out || t >= t0 + n_tokens) return;
  const long i = (long)t * n_out + r;
  float sum = 0.0f;
  for (int s = 0; s < splits; ++s) sum += part[s * part_stride + i];
  if (bias) sum += bias[r];
  out[i] = sum;
}

// Mid-sized micro-batches (the seed's -ub 16 and the tails of larger ones): weight-stationary.
// A work-group of MID_ROWS x MID_SPLIT work-items owns MID_ROWS weight rows and MID_T tokens;
// each work-item decodes 32-element blocks of its own row straight into registers (no weight
// tile in local memory: every weight is decoded once per MID_T tokens, by one work-item) and
// multiplies them with the activations of all MID_T tokens, staged in local memory MID_CHUNK
// blocks at a time and read as float4 broadcasts. The MID_SPLIT work-items of a row share its
// blocks; split-K over get_group_id(2) as in the tiled kernels.
#ifndef MID_SPLIT
#define MID_SPLIT 2
#endif
#ifndef MID_ROWS
#define MID_ROWS 128
#endif
#define MID_T 16
#define MID_CHUNK 8
#if MID_SPLIT * MID_ROWS > MID_CHUNK * 32
#error "matmul_mid reuses its activation tile for the reduction: MID_SPLIT * MID_ROWS too large"
#endif
kernel __attribute__((reqd_work_group_size(MID_ROWS, MID_SPLIT, 1))) void matmul_mid(
    global const uchar* qs, global const ushort* d, int type, long row_bytes, int n_in,
    int n_out, global const float* x, int t0, int n_tokens, global float* out,
    global const float* bias, int splits, global float* part, long part_stride) {
  // Activations [MID_T][MID_CHUNK * 32], then (reused) the partial sums
  // [MID_SPLIT][MID_T][MID_ROWS] of the final reduction: MID_SPLIT * MID_ROWS <= MID_CHUNK * 32.
  local float x_l[MID_T * MID_CHUNK * 32];
  const int lr = get_local_id(0), ks = get_local_id(1);
  const int lid = ks * MID_ROWS + lr;
  const int r = get_group_id(0) * MID_ROWS + lr;
  const int tok0 = t0 + get_group_id(1) * MID_T;
  const int nt = min(MID_T, t0 + n_tokens - tok0);
  const int n_blocks = n_in / 32;
  const int split = get_group_id(2);
  const int b_begin = (int)((long)n_blocks * split / splits);
  const int b_end = (int)((long)n_blocks * (split + 1) / splits);
  if (splits > 1) {
    out = part + split * part_stride;
    bias = 0;
  }
  float acc[MID_T];
#pragma unroll
  for (int t = 0; t < MID_T; ++t) acc[t] = 0.0f;
  for (int c0 = b_begin; c0 < b_end; c0 += MID_CHUNK) {
    const int n_chunk = min(MID_CHUNK, b_end - c0);
    for (int u = lid; u < MID_T * MID_CHUNK * 8; u += MID_ROWS * MID_SPLIT) {
      const int tt = u / (MID_CHUNK * 8), q = u % (MID_CHUNK * 8);
      float4 v = (float4)(0.0f);
      if (tt < nt && q < n_chunk * 8) v = vload4(q, x + (long)(tok0 + tt) * n_in + c0 * 32);
      vstore4(v, tt * MID_CHUNK * 8 + q, x_l);
    }
    barrier(CLK_LOCAL_MEM_FENCE);
    if (r < n_out) {
      for (int b = ks; b < n_chunk; b += MID_SPLIT) {
        const float8 w0 = weight8(type, qs, d, row_bytes, n_out, r, c0 + b, 0);
        const float8 w1 = weight8(type, qs, d, row_bytes, n_out, r, c0 + b, 1);
        const float8 w2 = weight8(type, qs, d, row_bytes, n_out, r, c0 + b, 2);
        const float8 w3 = weight8(type, qs, d, row_bytes, n_out, r, c0 + b, 3);
#pragma unroll
        for (int t = 0; t < MID_T; ++t) {
          const local float* xp = x_l + t * MID_CHUNK * 32 + b * 32;
          acc[t] += (dot8(w0, vload8(0, xp)) + dot8(w1, vload8(1, xp))) +
                    (dot8(w2, vload8(2, xp)) + dot8(w3, vload8(3, xp)));
        }
      }
    }
    barrier(CLK_LOCAL_MEM_FENCE);
  }
#pragma unroll
  for (int t = 0; t < MID_T; ++t) x_l[(ks * MID_T + t) * MID_ROWS + lr] = acc[t];
  barrier(CLK_LOCAL_MEM_FENCE);
  if (r >= n_out) return;
  for (int t = ks; t < nt; t += MID_SPLIT) {
    float sum = 0.0f;
    for (int k = 0; k < MID_SPLIT; ++k) sum += x_l[(k * MID_T + t) * MID_ROWS + lr];
    if (bias) sum += bias[r];
    out[(long)(tok0 + t) * n_out + r] = sum;
  }
}
