// Embedding lookup, RMS norm, RoPE, SwiGLU, add and row gathers. Activations are f32,
// row-major [tokens][cols]. Small index arrays (token ids, positions, row lists) come through
// the backend's upload ring: `ints` is the ring, `ints_off` where this call's array starts.

// out[t][:] = dequant(table[ids[t]]): one work-item per (slice of 32 elements, token).
kernel void embed_rows(global const uchar* table, int type, long row_bytes, int n_slices,
                       global const int* ints, int ints_off, global float* out) {
  const int s = get_global_id(0), t = get_global_id(1);
  if (s >= n_slices) return;
  const global uchar* row = table + (long)ints[ints_off + t] * row_bytes;
  global float* dst = out + ((long)t * n_slices + s) * 32;
  float v[8];
  for (int part = 0; part < 4; ++part) {
    decode8(type, row, s, part, v);
    for (int i = 0; i < 8; ++i) dst[8 * part + i] = v[i];
  }
}

// The f16 companion of an f32 activation row: what the matmuls of more than 8 tokens in half or
// on the tensor cores read (their conversion kernels, x_half_blocks and nv_x_f16, would make it
// from the f32 row), written by the kernel that produced the row so that the conversion needs no
// launch of its own (~20 us on NVIDIA's driver, 3 a layer). Both round to nearest even, as those
// kernels do, so the halves are theirs bit for bit.
#define F16_NONE 0
#define F16_TOKEN 1   // nv_x_f16: the row times 2^e, max |x| in [2^14, 2^15); xs[t] = 2^-e
#define F16_BLOCKS 2  // x_half_blocks: each 32-block over 2^e > its max |x|; xs[t][b] = 2^e

// Block b of row t, v[0..32) (just stored as f32): in the F16_BLOCKS form its halves and scale;
// returns max |v| (for F16_TOKEN's scale).
inline float block_companion(const float* v, int mode, int n, int t, int b, global half* xh,
                             global float* xs) {
  float m = 0.0f;
  for (int j = 0; j < 32; ++j) m = fmax(m, fabs(v[j]));
  if (mode != F16_BLOCKS) return m;
  int e = 0;
  frexp(m, &e);  // m = f * 2^e with f in [0.5, 1); e = 0 for m = 0
  const float inv = ldexp(1.0f, -e);
  for (int j = 0; j < 32; ++j) vstore_half_rte(v[j] * inv, (long)t * n + 32 * b + j, xh);
  xs[(long)t * (n / 32) + b] = ldexp(1.0f, e);
  return m;
}

// The F16_TOKEN form of row t once its f32 values o[0..n) are stored, m the work-item's max |o|.
// Each work-item reads back the elements it wrote, i = lid + k * wg, so that neighbours touch
// neighbouring addresses (a block of 32 a work-item made every load and store of a warp touch
// 32 lines: add_rms_norm 21 us and swiglu 37 us a call for 16 tokens on the H100, 20% of the
// seed's micro-batch). Every work-item calls it.
inline void token_companion(global const float* o, float m, int mode, int n, int t, int lid,
                            int wg, local float* scratch, global half* xh, global float* xs) {
  if (mode != F16_TOKEN) return;
  m = group_max(m, scratch, lid, wg);
  int e = 0;
  frexp(m, &e);
  e = m > 0.0f ? clamp(15 - e, -120, 120) : 0;
  const float f = ldexp(1.0f, e);
  for (int i = lid; i < n; i += wg) vstore_half_rte(o[i] * f, (long)t * n + i, xh);
  if (lid == 0) xs[t] = ldexp(1.0f, -e);
}

// out[t] = x[t] / sqrt(mean(x[t]^2) + eps) * w: one work-group of RMS_WG per token. With y
// (add_rms_norm) x += y first: the residual add and the next norm in one launch (a work-group owns
// its row, so the sum it stores is read back by the same work-items). With f16 != F16_NONE, the
// row's f16 companion too (n a multiple of 32).
#ifndef RMS_WG
#define RMS_WG 256
#endif
inline void norm_row(global float* x, global const float* y, int n, global const float* w,
                     float eps, global float* out, int f16, global half* xh, global float* xs,
                     local float* scratch) {
  const int t = get_group_id(0), lid = get_local_id(0);
  global float* xr = x + (long)t * n;
  float ss = 0.0f;
  for (int i = lid; i < n; i += RMS_WG) {
    const float v = y ? xr[i] + y[(long)t * n + i] : xr[i];
    if (y) xr[i] = v;
    ss += v * v;
  }
  ss = group_sum(ss, scratch, lid, RMS_WG);
  const float scale = 1.0f / sqrt(ss / (float)n + eps);
  global float* o = out + (long)t * n;
  if (f16 != F16_BLOCKS) {  // each work-item reads back only what it stored above
    float m = 0.0f;
    for (int i = lid; i < n; i += RMS_WG) {
      const float v = xr[i] * scale * w[i];
      o[i] = v;
      m = fmax(m, fabs(v));
    }
    token_companion(o, m, f16, n, t, lid, RMS_WG, scratch, xh, xs);
    return;
  }
  // F16_BLOCKS: a block of 32 a work-item, as its companion needs the block's values together.
  // With y, other work-items stored the sums this one reads: a barrier over global memory first
  // (y is the same for the whole work-group).
  if (y) barrier(CLK_GLOBAL_MEM_FENCE);
  float m = 0.0f;
  for (int b = lid; b < n / 32; b += RMS_WG) {
    float v[32];
    for (int j = 0; j < 32; ++j) {
      v[j] = xr[32 * b + j] * scale * w[32 * b + j];
      o[32 * b + j] = v[j];
    }
    m = fmax(m, block_companion(v, f16, n, t, b, xh, xs));
  }
}

kernel __attribute__((reqd_work_group_size(RMS_WG, 1, 1))) void rms_norm(
    global float* x, int n, global const float* w, float eps, global float* out, int f16,
    global half* xh, global float* xs) {
  local float scratch[RMS_WG];
  norm_row(x, 0, n, w, eps, out, f16, xh, xs, scratch);
}

kernel __attribute__((reqd_work_group_size(RMS_WG, 1, 1))) void add_rms_norm(
    global float* x, global const float* y, int n, global const float* w, float eps,
    global float* out, int f16, global half* xh, global float* xs) {
  local float scratch[RMS_WG];
  norm_row(x, y, n, w, eps, out, f16, xh, xs, scratch);
}

// RoPE of one pair (x0, x1) at position p with inverse frequency inv_hi + inv_lo: the angle
// p * inv_freq formed as a two-float value (fma gives the product's rounding error) and reduced
// modulo 2 pi with 2 pi in three floats, so that the reduced angle is good to ~1e-7 rad at any
// position: a plain f32 product errs by pos * 2^-24 rad (5e-6 at position 93, 2.4e-4 at 4096),
// enough to flip q4_0 cache codes against the reference. The rotation takes one fma each
// (x0 c - x1 s with one rounding of x1 s and one of the sum: closer to the float64 reference
// than three roundings, which flipped q4_0 codes of an e2e case that the fused form passes).
// Every multiply-add is written out and contraction is off, so that rope and rope_kv_store,
// which share this function, agree bit for bit whatever each kernel's compiler would choose.
inline float2 rope_pair(float x0, float x1, float p, float inv_hi, float inv_lo) {
#pragma OPENCL FP_CONTRACT OFF
  const float t_hi = p * inv_hi;
  const float t_lo = fma(p, inv_lo, fma(p, inv_hi, -t_hi));
  const float k = rint(t_hi * 0.159154943091895336f);  // 1 / (2 pi)
  float r = fma(-k, 6.28318548202514648f, t_hi);      // 2 pi = these three floats
  r = fma(-k, -1.74845553146951715e-07f, r);
  r = fma(-k, -7.10542735760100186e-15f, r) + t_lo;
  const float c = cos(r), s = sin(r);
  return (float2)(fma(x0, c, -(x1 * s)), fma(x0, s, x1 * c));
}

// In place on xa[T][heads_a * head_dim] and xb[T][heads_b * head_dim] (Q and K in one launch;
// heads_b 0 for one tensor): one work-item per (pair, head, token). inv_freq[i] =
// base^(-2i / head_dim) comes from the host, computed there in double and passed as two floats
// (hi, lo). neox: pairs (i, i + head_dim / 2); otherwise adjacent pairs (2i, 2i + 1).
kernel void rope(global float* xa, int heads_a, global float* xb, int heads_b, int head_dim,
                 int neox, global const float* inv_freq, global const int* ints, int ints_off) {
  const int i = get_global_id(0), hh = get_global_id(1), t = get_global_id(2);
  const int half_dim = head_dim / 2;
  if (i >= half_dim) return;
  const float p = (float)ints[ints_off + t];  // exact below 2^24
  const int first = hh < heads_a;
  const int n_heads = first ? heads_a : heads_b, h = first ? hh : hh - heads_a;
  global float* v = (first ? xa : xb) + ((long)t * n_heads + h) * head_dim;
  const int a = neox ? i : 2 * i, b = neox ? i + half_dim : 2 * i + 1;
  const float2 r = rope_pair(v[a], v[b], p, inv_freq[2 * i], inv_freq[2 * i + 1]);
  v[a] = r.x;
  v[b] = r.y;
}

// out = silu(gate) * up = gate / (1 + exp(-gate)) * up; out may be gate.
inline float silu_mul(float g, float u) {
  return g / (1.0f + exp(-g)) * u;
}

kernel void swiglu(global const float* gate, global const float* up, long n, global float* out) {
  const long i = get_global_id(0);
  if (i >= n) return;
  out[i] = silu_mul(gate[i], up[i]);
}

// swiglu of rows of n with their f16 companion (f16 != F16_NONE, n a multiple of 32): a
// work-group of RMS_WG per token; for F16_BLOCKS a block of 32 a work-item, for F16_TOKEN
// neighbouring elements in neighbouring work-items (token_companion).
kernel __attribute__((reqd_work_group_size(RMS_WG, 1, 1))) void swiglu_rows(
    global const float* gate, global const float* up, int n, global float* out, int f16,
    global half* xh, global float* xs) {
  local float scratch[RMS_WG];
  const int t = get_group_id(0), lid = get_local_id(0);
  const long row = (long)t * n;
  float m = 0.0f;
  if (f16 == F16_TOKEN) {
    for (int i = lid; i < n; i += RMS_WG) {
      const float v = silu_mul(gate[row + i], up[row + i]);
      out[row + i] = v;
      m = fmax(m, fabs(v));
    }
    token_companion(out + row, m, f16, n, t, lid, RMS_WG, scratch, xh, xs);
    return;
  }
  for (int b = lid; b < n / 32; b += RMS_WG) {
    float v[32];
    for (int j = 0; j < 32; ++j) {
      v[j] = silu_mul(gate[row + 32 * b + j], up[row + 32 * b + j]);
      out[row + 32 * b + j] = v[j];
    }
    m = fmax(m, block_companion(v, f16, n, t, b, xh, xs));
  }
}

kernel void add_inplace(global float* x, global const float* y, long n) {
  const long i = get_global_id(0);
  if (i < n) x[i] = x[i] + y[i];
}

// out[r][:] = x[rows[r]][:]: one work-item per (column, output row).
kernel void get_rows(global const float* x, long n_cols, global const int* ints, int ints_off,
                     global float* out) {
  const long c = get_global_id(0);
  const int r = get_global_id(1);
  if (c >= n_cols) return;
  out[(long)r * n_cols + c] = x[(long)ints[ints_off + r] * n_cols + c];
}
