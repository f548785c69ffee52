// Shared by every kernel file of the program (it is the first source of the one program): the
// type ids, half <-> float by bit manipulation, and the device decoder of every block format
// Kestrel supports (the layouts of format/quant/quant.h, bit for bit).
//
// Build options set by the host (opencl_backend.cpp): KESTREL_HAS_FP16 when the device has
// cl_khr_fp16 (half arithmetic allowed), MM_* the matmul tile shape chosen for the device.

// Type ids: quant::DType (the GGUF / ggml numbering).
#define T_F32 0
#define T_F16 1
#define T_Q4_0 2
#define T_Q4_1 3
#define T_Q5_0 6
#define T_Q5_1 7
#define T_Q8_0 8
#define T_Q4_K 12
#define T_Q5_K 13
#define T_Q6_K 14
#define T_BF16 30

#ifdef KESTREL_HAS_FP16
#pragma OPENCL EXTENSION cl_khr_fp16 : enable
#endif

// Bytes of one block of a type and elements per block.
inline int block_bytes(int type) {
  switch (type) {
    case T_F32: return 4;
    case T_F16: case T_BF16: return 2;
    case T_Q4_0: return 18;
    case T_Q4_1: return 20;
    case T_Q5_0: return 22;
    case T_Q5_1: return 24;
    case T_Q8_0: return 34;
    case T_Q4_K: return 144;
    case T_Q5_K: return 176;
    case T_Q6_K: return 210;
  }
  return 0;
}

inline uint load_u16(const global uchar* p) {
  return (uint)p[0] | ((uint)p[1] << 8);
}

// IEEE half bits -> float, subnormals included, without relying on the device's half support
// or its denormal mode (a half subnormal is a normal float).
inline float half_bits_to_float(uint h) {
  const uint sign = (h & 0x8000u) << 16;
  const uint exp = (h >> 10) & 0x1fu;
  const uint mant = h & 0x3ffu;
  if (exp == 0) {
    const float v = (float)mant * (1.0f / 16777216.0f);
    return sign ? -v : v;
  }
  if (exp == 31) return as_float(sign | 0x7f800000u | (mant << 13));
  return as_float(sign | ((exp + 112u) << 23) | (mant << 13));
}

inline float load_half_bits(const global uchar* p) {
  return half_bits_to_float(load_u16(p));
}

// The same from a 2-byte aligned address, in one load (NVIDIA's compiler keeps byte loads as
// byte loads: two per scale, one per quant byte).
inline float load_half_bits2(const global uchar* p) {
  return half_bits_to_float(*(const global ushort*)p);
}

// float -> IEEE half bits, round to nearest even, overflow to infinity: the same bits as
// quant::fp32_to_fp16 on every input (the KV cache must equal quantize_row byte for byte).
// Integer arithmetic only, so no device rounding or flush-to-zero mode can change it.
inline uint float_to_half_bits(float f) {
  const uint x = as_uint(f);
  const uint sign = (x >> 16) & 0x8000u;
  const uint a = x & 0x7fffffffu;
  if (a >= 0x7f800000u) return sign | 0x7c00u | (a > 0x7f800000u ? 0x200u : 0u);
  if (a >= 0x477ff000u) return sign | 0x7c00u;  // rounds past 65504
  if (a < 0x38800000u) {
    // A subnormal half (or zero): |f| * 2^24 rounded to the nearest even integer. |f| is
    // m * 2^(e - 150) with the implicit bit in m, so |f| * 2^24 = m >> (126 - e).
    const uint e = a >> 23;
    if (e == 0) return sign;  // a float subnormal is far below half the smallest half
    const uint m = (a & 0x7fffffu) | 0x800000u;
    const uint shift = 126u - e;  // >= 14
    if (shift > 24u) return sign;  // below 2^-25: rounds to zero
    uint q = m >> shift;
    const uint rem = m & ((1u << shift) - 1u), halfway = 1u << (shift - 1u);
    if (rem > halfway || (rem == halfway && (q & 1u))) ++q;
    return sign | q;
  }
  const uint rounded = a + 0xfffu + ((a >> 13) & 1u);
  return sign | ((rounded - (112u << 23)) >> 13);
}

// 6-bit scale and min of sub-block j of a Q4_K / Q5_K superblock's 12 packed bytes.
inline void k_scale_min(const global uchar* s, int j, int* sc, int* mn) {
  if (j < 4) {
    *sc = s[j] & 63;
    *mn = s[j + 4] & 63;
  } else {
    *sc = (s[j + 4] & 15) | ((s[j - 4] >> 6) << 4);
    *mn = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
  }
}

// Elements 32 * s + 8 * part .. + 7 of a row (GGUF bytes of `type`, row-major) into out[8].
// Every element follows quant::dequantize_row's float order: scale * (q + bias) + min.
inline void decode8(int type, const global uchar* row, int s, int part, float* out) {
  const int e0 = 8 * part;  // first element within the 32-element slice
  switch (type) {
    case T_F32: {
      const global float* p = (const global float*)row + 32 * s + e0;
      for (int i = 0; i < 8; ++i) out[i] = p[i];
      break;
    }
    case T_F16: {  // rows of whole 32-element slices: p is 16-byte aligned
      const ushort8 h = vload8(0, (const global ushort*)(row + 2 * (32 * s + e0)));
      out[0] = half_bits_to_float(h.s0), out[1] = half_bits_to_float(h.s1);
      out[2] = half_bits_to_float(h.s2), out[3] = half_bits_to_float(h.s3);
      out[4] = half_bits_to_float(h.s4), out[5] = half_bits_to_float(h.s5);
      out[6] = half_bits_to_float(h.s6), out[7] = half_bits_to_float(h.s7);
      break;
    }
    case T_BF16: {
      const global uchar* p = row + 2 * (32 * s + e0);
      for (int i = 0; i < 8; ++i) out[i] = as_float(load_u16(p + 2 * i) << 16);
      break;
    }
    case T_Q4_0: {  // 18-byte blocks: the scale and the quant bytes are 2-byte aligned
      const global uchar* b = row + 18 * s;
      const float d = load_half_bits2(b);
      const uchar8 q8 = as_uchar8(vload4(0, (const global ushort*)(b + 2 + e0 % 16)));
      const uchar8 q = e0 < 16 ? (q8 & (uchar)15) : (q8 >> (uchar)4);
      out[0] = (float)((int)q.s0 - 8) * d, out[1] = (float)((int)q.s1 - 8) * d;
      out[2] = (float)((int)q.s2 - 8) * d, out[3] = (float)((int)q.s3 - 8) * d;
      out[4] = (float)((int)q.s4 - 8) * d, out[5] = (float)((int)q.s5 - 8) * d;
      out[6] = (float)((int)q.s6 - 8) * d, out[7] = (float)((int)q.s7 - 8) * d;
      break;
    }
    case T_Q4_1: {
      const global uchar* b = row + 20 * s;
      const float d = load_half_bits(b), m = load_half_bits(b + 2);
      for (int i = 0; i < 8; ++i) {
        const int e = e0 + i;
        const int q = e < 16 ? (b[4 + e] & 15) : (b[4 + e - 16] >> 4);
        out[i] = (float)q * d + m;
      }
      break;
    }
    case T_Q8_0: {  // 34-byte blocks: 2-byte aligned
      const global uchar* b = row + 34 * s;
      const float d = load_half_bits2(b);
      const char8 q = as_char8(vload4(0, (const global ushort*)(b + 2 + e0)));
      out[0] = (float)q.s0 * d, out[1] = (float)q.s1 * d, out[2] = (float)q.s2 * d;
      out[3] = (float)q.s3 * d, out[4] = (float)q.s4 * d, out[5] = (float)q.s5 * d;
      out[6] = (float)q.s6 * d, out[7] = (float)q.s7 * d;
      break;
    }
    case T_Q5_0:
    case T_Q5_1: {
      const bool affine = type == T_Q5_1;
      const global uchar* b = row + (affine ? 24 : 22) * s;
      const float d = load_half_bits(b);
      const float m = affine ? load_half_bits(b + 2) : 0.0f;
      const global uchar* qhp = b + (affine ? 4 : 2);
      const uint qh = (uint)qhp[0] | ((uint)qhp[1] << 8) | ((uint)qhp[2] << 16) |
                      ((uint)qhp[3] << 24);
      const global uchar* qs = qhp + 4;
      for (int i = 0; i < 8; ++i) {
        const int e = e0 + i;
        const int nib = e < 16 ? (qs[e] & 15) : (qs[e - 16] >> 4);
        const int q = nib | (int)(((qh >> e) & 1u) << 4);
        out[i] = d * (float)(q + (affine ? 0 : -16)) + m;
      }
      break;
    }
    case T_Q4_K:
    case T_Q5_K: {
      const bool five = type == T_Q5_K;
      const global uchar* b = row + (five ? 176 : 144) * (s / 8);
      const int j = s % 8;  // sub-block: byte group j / 2, nibble j % 2
      const float d = load_half_bits(b), dmin = load_half_bits(b + 2);
      int sc, mn;
      k_scale_min(b + 4, j, &sc, &mn);
      const float scale = d * (float)sc, minv = -(dmin * (float)mn);
      const global uchar* qh = b + 16;
      const global uchar* qs = b + (five ? 48 : 16) + 32 * (j / 2);
      const int shift = 4 * (j % 2);
      for (int i = 0; i < 8; ++i) {
        const int l = e0 + i;
        int q = (qs[l] >> shift) & 15;
        if (five) q |= ((qh[l] >> j) & 1) << 4;
        out[i] = scale * (float)q + minv;
      }
      break;
    }
    case T_Q6_K: {
      const global uchar* b = row + 210 * (s / 8);
      const int s0 = (s % 8) * 32;  // first element of the slice within the superblock
      const int h = s0 / 128, c = (s0 % 128) / 32;
      const float d = load_half_bits(b + 208);
      const global char* scales = (const global char*)(b + 192);
      const global uchar* ql = b + 64 * h + 32 * (c % 2);
      const global uchar* qh = b + 128 + 32 * h;
      for (int i = 0; i < 8; ++i) {
        const int l = e0 + i;
        const int lo = (ql[l] >> (4 * (c / 2))) & 15;
        const int hi = (qh[l] >> (2 * c)) & 3;
        const float scale = d * (float)scales[(s0 + l) / 16];
        out[i] = scale * (float)((lo | (hi << 4)) - 32);
      }
      break;
    }
    default:
      for (int i = 0; i < 8; ++i) out[i] = NAN;
  }
}

// Work-group reductions over `n` work-items (a power of two, the local size) through scratch
// local memory of n floats. Every work-item of the group must call them, and each call passes at
// least one work-group barrier after its first local-memory access (callers publish their own
// local stores through it). With KESTREL_SUBGROUPS (the host's probe found the subgroup
// reductions of cl_khr_subgroups / cl_intel_subgroups exact on this device): each subgroup
// reduces in registers, then every work-item adds the subgroups' results, two barriers where the
// tree takes log2(n) + 2.
#ifdef KESTREL_SUBGROUPS
#ifdef KESTREL_KHR_SUBGROUPS
#pragma OPENCL EXTENSION cl_khr_subgroups : enable
#endif
inline float group_sum(float v, local float* scratch, int lid, int n) {
  v = sub_group_reduce_add(v);
  if (get_sub_group_local_id() == 0) scratch[get_sub_group_id()] = v;
  barrier(CLK_LOCAL_MEM_FENCE);
  float r = 0.0f;
  const uint n_sub = get_num_sub_groups();
  for (uint i = 0; i < n_sub; ++i) r += scratch[i];
  barrier(CLK_LOCAL_MEM_FENCE);
  return r;
}

inline float group_max(float v, local float* scratch, int lid, int n) {
  v = sub_group_reduce_max(v);
  if (get_sub_group_local_id() == 0) scratch[get_sub_group_id()] = v;
  barrier(CLK_LOCAL_MEM_FENCE);
  float r = scratch[0];
  const uint n_sub = get_num_sub_groups();
  for (uint i = 1; i < n_sub; ++i) r = fmax(r, scratch[i]);
  barrier(CLK_LOCAL_MEM_FENCE);
  return r;
}
#else
inline float group_sum(float v, local float* scratch, int lid, int n) {
  scratch[lid] = v;
  barrier(CLK_LOCAL_MEM_FENCE);
  for (int stride = n / 2; stride > 0; stride /= 2) {
    if (lid < stride) scratch[lid] += scratch[lid + stride];
    barrier(CLK_LOCAL_MEM_FENCE);
  }
  const float r = scratch[0];
  barrier(CLK_LOCAL_MEM_FENCE);
  return r;
}

inline float group_max(float v, local float* scratch, int lid, int n) {
  scratch[lid] = v;
  barrier(CLK_LOCAL_MEM_FENCE);
  for (int stride = n / 2; stride > 0; stride /= 2) {
    if (lid < stride) scratch[lid] = fmax(scratch[lid], scratch[lid + stride]);
    barrier(CLK_LOCAL_MEM_FENCE);
  }
  const float r = scratch[0];
  barrier(CLK_LOCAL_MEM_FENCE);
  return r;
}
#endif

// The setup's check of the two reductions on this device and build: out[0] = sum of x[0..n),
// out[1] = max, over one work-group of n work-items (n = 64 or 256), each value read after a
// reduction of its own so that a scratch reused too early shows.
kernel void reduce_probe(global const float* x, global float* out) {
  local float scratch[256];
  const int lid = get_local_id(0), n = get_local_size(0);
  const float s = group_sum(x[lid], scratch, lid, n);
  const float m = group_max(x[lid], scratch, lid, n);
  const float s2 = group_sum(-x[lid], scratch, lid, n);
  if (lid == n - 1) {
    out[0] = s;
    out[1] = m;
    out[2] = s2;
  }
}

// The weight of a grouped matmul launch (up to three weights of one type over one input: Q, K
// and V; gate and up) that work-group row block `block` falls in: blocks [0, blocks0) are
// weight 0's, the next blocks1 weight 1's, the rest weight 2's. .block is the row block within
// that weight, .seg_off the weight's first column in the launch's [n_total] split-K partials.
typedef struct {
  global const uchar* qs;
  global const ushort* d;
  int n_out;
  global float* out;
  global const float* bias;
  int block, seg_off;
} MatmulSegment;

inline MatmulSegment matmul_segment(int block, int blocks0, int blocks1, global const uchar* qs0,
                                    global const ushort* d0, int n_out0, global float* out0,
                                    global const float* bias0, global const uchar* qs1,
                                    global const ushort* d1, int n_out1, global float* out1,
                                    global const float* bias1, global const uchar* qs2,
                                    global const ushort* d2, int n_out2, global float* out2,
                                    global const float* bias2) {
  MatmulSegment s = {qs0, d0, n_out0, out0, bias0, block, 0};
  if (block >= blocks0) {
    s.qs = qs1, s.d = d1, s.n_out = n_out1, s.out = out1, s.bias = bias1;
    s.block = block - blocks0, s.seg_off = n_out0;
    if (s.block >= blocks1) {
      s.qs = qs2, s.d = d2, s.n_out = n_out2, s.out = out2, s.bias = bias2;
      s.block -= blocks1, s.seg_off += n_out1;
    }
  }
  return s;
}
