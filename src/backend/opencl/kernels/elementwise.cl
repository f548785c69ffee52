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

// out[t] = x[t] / sqrt(mean(x[t]^2) + eps) * w: one work-group of RMS_WG per token.
#ifndef RMS_WG
#define RMS_WG 256
#endif
kernel __attribute__((reqd_work_group_size(RMS_WG, 1, 1))) void rms_norm(
    global const float* x, int n, global const float* w, float eps, global float* out) {
  local float scratch[RMS_WG];
  const int t = get_group_id(0), lid = get_local_id(0);
  const global float* xr = x + (long)t * n;
  float ss = 0.0f;
  for (int i = lid; i < n; i += RMS_WG) ss += xr[i] * xr[i];
  ss = group_sum(ss, scratch, lid, RMS_WG);
  const float scale = 1.0f / sqrt(ss / (float)n + eps);
  global float* o = out + (long)t * n;
  for (int i = lid; i < n; i += RMS_WG) o[i] = xr[i] * scale * w[i];
}

// x += y, then out = rms_norm(x): the residual add and the next norm in one launch (a
// work-group owns its row, so the sum it stores is read back by the same work-items).
kernel __attribute__((reqd_work_group_size(RMS_WG, 1, 1))) void add_rms_norm(
    global float* x, global const float* y, int n, global const float* w, float eps,
    global float* out) {
  local float scratch[RMS_WG];
  const int t = get_group_id(0), lid = get_local_id(0);
  global float* xr = x + (long)t * n;
  const global float* yr = y + (long)t * n;
  float ss = 0.0f;
  for (int i = lid; i < n; i += RMS_WG) {
    const float v = xr[i] + yr[i];
    xr[i] = v;
    ss += v * v;
  }
  ss = group_sum(ss, scratch, lid, RMS_WG);
  const float scale = 1.0f / sqrt(ss / (float)n + eps);
  global float* o = out + (long)t * n;
  for (int i = lid; i < n; i += RMS_WG) o[i] = xr[i] * scale * w[i];
}

// RoPE of one pair (x0, x1) at position p with inverse frequency inv_hi + inv_lo: the angle
// p * inv_freq formed as a two-float value (fma gives the product's rounding error) and reduced
// modulo 2 pi with 2 pi in three floats, so that the reduced angle is good to ~1e-7 rad at any
// position: a plain f32 product errs by pos * 2^-24 rad (5e-6 at position 93, 2.4e-4 at 4096),
// enough to flip q4_0 cache codes against the reference. Shared by rope and rope_kv_store, which
// must agree bit for bit: no contraction of the rotation, so no kernel's compiler choice differs.
inline float2 rope_pair(float x0, float x1, float p, float inv_hi, float inv_lo) {
#pragma OPENCL FP_CONTRACT OFF
  const float t_hi = p * inv_hi;
  const float t_lo = fma(p, inv_hi, -t_hi) + p * inv_lo;
  const float k = rint(t_hi * 0.159154943091895336f);  // 1 / (2 pi)
  float r = fma(-k, 6.28318548202514648f, t_hi);      // 2 pi = these three floats
  r = fma(-k, -1.74845553146951715e-07f, r);
  r = fma(-k, -7.10542735760100186e-15f, r) + t_lo;
  const float c = cos(r), s = sin(r);
  return (float2)(x0 * c - x1 * s, x0 * s + x1 * c);
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
kernel void swiglu(global const float* gate, global const float* up, long n, global float* out) {
  const long i = get_global_id(0);
  if (i >= n) return;
  const float g = gate[i];
  out[i] = g / (1.0f + exp(-g)) * up[i];
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
