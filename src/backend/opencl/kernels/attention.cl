// The KV cache: the quantize-on-write store (f16, q8_0, q4_0 rows equal to quant::quantize_row
// byte for byte) and causal attention reading those rows.

// Block b of a cache row = quantize(x[0..32)) (f16, q8_0 or q4_0, equal to quant::quantize_row
// byte for byte).
inline void store_kv_block(const float* x, int type, global uchar* row, int b) {
  // Quantization must round exactly as the scalar reference: no contraction of a * b + c. Only
  // in this function: the program is one translation unit, and a file-scope pragma would also
  // forbid the fused multiply-adds of every kernel after it (the matmuls, attention).
#pragma OPENCL FP_CONTRACT OFF
  if (type == T_F16) {
    for (int j = 0; j < 32; ++j) {
      const uint h = float_to_half_bits(x[j]);
      row[2 * (32 * b + j)] = (uchar)(h & 0xffu);
      row[2 * (32 * b + j) + 1] = (uchar)(h >> 8);
    }
    return;
  }
  if (type == T_Q8_0) {
    global uchar* blk = row + 34 * b;
    float amax = 0.0f;
    for (int j = 0; j < 32; ++j) amax = fmax(amax, fabs(x[j]));
    const uint dh = float_to_half_bits(amax / 127.0f);
    const float d = half_bits_to_float(dh);  // quantize against the scale actually stored
    blk[0] = (uchar)(dh & 0xffu);
    blk[1] = (uchar)(dh >> 8);
    for (int j = 0; j < 32; ++j) {
      const int q = d == 0.0f ? 0 : (int)fmin(fmax(round(x[j] / d), -127.0f), 127.0f);
      blk[2 + j] = (uchar)(char)q;
    }
    return;
  }
  if (type == T_Q4_0) {
    // d = m / -8, m the element of largest magnitude with its sign (the first one on ties).
    global uchar* blk = row + 18 * b;
    float amax = 0.0f, m = 0.0f;
    for (int j = 0; j < 32; ++j) {
      if (fabs(x[j]) > amax) {
        amax = fabs(x[j]);
        m = x[j];
      }
    }
    const uint dh = float_to_half_bits(m / -8.0f);
    const float d = half_bits_to_float(dh);
    blk[0] = (uchar)(dh & 0xffu);
    blk[1] = (uchar)(dh >> 8);
    for (int j = 0; j < 16; ++j) {
      const int lo = d == 0.0f ? 8 : (int)fmin(fmax(round(x[j] / d), -8.0f), 7.0f) + 8;
      const int hi = d == 0.0f ? 8 : (int)fmin(fmax(round(x[j + 16] / d), -8.0f), 7.0f) + 8;
      blk[2 + j] = (uchar)(lo | (hi << 4));
    }
  }
}

// cache[pos[t]] = quantize(src[t]) for K (get_global_id(2) == 0) and V (1) in one launch (a
// launch costs ~20 us on NVIDIA's driver): one work-item per (32-element block, token, K or V).
// src rows are f32 [T][dim]; cache rows are `row_bytes` apart.
kernel void kv_store(global const float* k_src, int k_dim, int k_type, global uchar* k_cache,
                     long k_row_bytes, global const float* v_src, int v_dim, int v_type,
                     global uchar* v_cache, long v_row_bytes, global const int* ints,
                     int ints_off) {
  const bool v = get_global_id(2) == 1;
  global const float* src = v ? v_src : k_src;
  const int dim = v ? v_dim : k_dim, type = v ? v_type : k_type;
  global uchar* cache = v ? v_cache : k_cache;
  const long row_bytes = v ? v_row_bytes : k_row_bytes;
  const int b = get_global_id(0), t = get_global_id(1);
  if (b >= dim / 32) return;
  const global float* x = src + (long)t * dim + 32 * b;
  float xb[32];
  for (int j = 0; j < 32; ++j) xb[j] = x[j];
  store_kv_block(xb, type, cache + (long)ints[ints_off + t] * row_bytes, b);
}

// rope of q and k in place, then kv_store of k and v, in one launch (what rope and kv_store do
// in two, bit for bit): one work-item per (unit, head, token), the heads counted over Q's, then
// K's, then V's (kv_dim / head_dim "heads", which only store). A unit is the 32-element block u
// of the head, or for neox, whose pairs are (i, i + head_dim / 2), blocks u and u + head_dim / 64
// for u < head_dim / 64 (head_dim a multiple of 64 there). inv_freq as for rope.
kernel void rope_kv_store(global float* q, int heads_q, global float* k, global const float* v,
                          int heads_kv, int head_dim, int neox, global const float* inv_freq,
                          int k_type, global uchar* k_cache, long k_row_bytes, int v_type,
                          global uchar* v_cache, long v_row_bytes, global const int* ints,
                          int ints_off) {
  const int u = get_global_id(0), hh = get_global_id(1), t = get_global_id(2);
  const int half_blocks = head_dim / 64;  // neox: the block offset of a pair's second element
  const int pos = ints[ints_off + t];
  const int kind = hh < heads_q ? 0 : hh < heads_q + heads_kv ? 1 : 2;  // Q, K, V
  if (kind == 2) {  // V: one block, stored
    const int h = hh - heads_q - heads_kv;
    const global float* src = v + ((long)t * heads_kv + h) * head_dim + 32 * u;
    float xb[32];
    for (int j = 0; j < 32; ++j) xb[j] = src[j];
    store_kv_block(xb, v_type, v_cache + (long)pos * v_row_bytes, h * (head_dim / 32) + u);
    return;
  }
  if (neox && u >= half_blocks) return;
  const int h = kind == 0 ? hh : hh - heads_q;
  global float* x = (kind == 0 ? q : k) + ((long)t * (kind == 0 ? heads_q : heads_kv) + h) * head_dim;
  const float p = (float)pos;  // exact below 2^24
  float a[32], b[32];  // neox: blocks u and u + half_blocks; else block u (in a)
  for (int j = 0; j < 32; ++j) a[j] = x[32 * u + j];
  if (neox) {
    for (int j = 0; j < 32; ++j) b[j] = x[32 * (u + half_blocks) + j];
    for (int j = 0; j < 32; ++j) {
      const int i = 32 * u + j;  // pair (i, i + head_dim / 2)
      const float2 r = rope_pair(a[j], b[j], p, inv_freq[2 * i], inv_freq[2 * i + 1]);
      a[j] = r.x;
      b[j] = r.y;
    }
  } else {
    for (int j = 0; j < 16; ++j) {
      const int i = 16 * u + j;  // pair (2i, 2i + 1)
      const float2 r = rope_pair(a[2 * j], a[2 * j + 1], p, inv_freq[2 * i], inv_freq[2 * i + 1]);
      a[2 * j] = r.x;
      a[2 * j + 1] = r.y;
    }
  }
  for (int j = 0; j < 32; ++j) x[32 * u + j] = a[j];
  if (neox)
    for (int j = 0; j < 32; ++j) x[32 * (u + half_blocks) + j] = b[j];
  if (kind == 0) return;
  global uchar* row = k_cache + (long)pos * k_row_bytes;
  const int blk0 = h * (head_dim / 32);
  store_kv_block(a, k_type, row, blk0 + u);
  if (neox) store_kv_block(b, k_type, row, blk0 + u + half_blocks);
}

// One element of a cache row (f16, q8_0 or q4_0 as quantize_row wrote it).
inline float cache_elem(int type, const global uchar* row, int c) {
  if (type == T_F16) return load_half_bits(row + 2 * c);
  const int b = c / 32, e = c % 32;
  if (type == T_Q8_0) {
    const global uchar* blk = row + 34 * b;
    return (float)((char)blk[2 + e]) * load_half_bits(blk);
  }
  const global uchar* blk = row + 18 * b;
  const int q = e < 16 ? (blk[2 + e] & 15) : (blk[2 + e - 16] >> 4);
  return (float)(q - 8) * load_half_bits(blk);
}

// Causal attention with GQA: query token t, head h attends to cache rows 0 .. pos[t] of KV
// head h / group. One work-group of ATT_WG work-items per (head, token); keys are visited in
// tiles of ATT_WG (one key per work-item for the scores) with an online softmax, and each
// work-item accumulates head_dim / ATT_WG output dimensions. head_dim <= ATT_MAX_DIM.
#define ATT_WG 64
#define ATT_MAX_DIM 256
kernel __attribute__((reqd_work_group_size(ATT_WG, 1, 1))) void attention_query(
    global const float* q, global const uchar* k_cache, global const uchar* v_cache, int k_type,
    int v_type, long k_row_bytes, long v_row_bytes, global const int* ints, int ints_off,
    int n_head, int group, int head_dim, float scale, global float* out) {
  local float q_l[ATT_MAX_DIM];
  local float p_l[ATT_WG];
  local float scratch[ATT_WG];
  const int h = get_group_id(0), t = get_group_id(1), lid = get_local_id(0);
  const int g = h / group;
  const long q_dim = (long)n_head * head_dim;
  const global float* qh = q + t * q_dim + (long)h * head_dim;
  for (int d = lid; d < head_dim; d += ATT_WG) q_l[d] = qh[d];
  barrier(CLK_LOCAL_MEM_FENCE);
  const int n_keys = ints[ints_off + t] + 1;
  const int col0 = g * head_dim;  // first cache column of this KV head
  const int n_mine = (head_dim + ATT_WG - 1) / ATT_WG;
  float acc[ATT_MAX_DIM / ATT_WG];
  for (int i = 0; i < ATT_MAX_DIM / ATT_WG; ++i) acc[i] = 0.0f;
  float m = -INFINITY, l = 0.0f;
  for (int j0 = 0; j0 < n_keys; j0 += ATT_WG) {
    const int j = j0 + lid;
    float s = -INFINITY;
    if (j < n_keys) {
      const global uchar* kr = k_cache + (long)j * k_row_bytes;
      float dot = 0.0f;
      for (int c = 0; c < head_dim; c += 8) {
        float kv[8];
        decode8(k_type, kr, (col0 + c) / 32, (c / 8) % 4, kv);
        for (int i = 0; i < 8; ++i) dot += q_l[c + i] * kv[i];
      }
      s = dot * scale;
    }
    const float tile_max = group_max(s, scratch, lid, ATT_WG);
    const float m_new = fmax(m, tile_max);
    const float corr = exp(m - m_new);  // 0 on the first tile (m = -inf)
    const float p = j < n_keys ? exp(s - m_new) : 0.0f;
    p_l[lid] = p;
    l = l * corr + group_sum(p, scratch, lid, ATT_WG);  // group_sum's barriers publish p_l
    m = m_new;
    const int n_tile = min(ATT_WG, n_keys - j0);
    for (int i = 0; i < n_mine; ++i) {
      const int d = lid + i * ATT_WG;
      if (d >= head_dim) break;
      float sum = 0.0f;
      for (int jj = 0; jj < n_tile; ++jj)
        sum += p_l[jj] * cache_elem(v_type, v_cache + (long)(j0 + jj) * v_row_bytes, col0 + d);
      acc[i] = acc[i] * corr + sum;
    }
    barrier(CLK_LOCAL_MEM_FENCE);  // p_l is rewritten by the next tile
  }
  global float* o = out + t * q_dim + (long)h * head_dim;
  for (int i = 0; i < n_mine; ++i) {
    const int d = lid + i * ATT_WG;
    if (d < head_dim) o[d] = acc[i] / l;
  }
}

// Causal attention for micro-batches of several tokens: one work-group of ATB_WG work-items per
// (head, block of ATB_Q consecutive query tokens). Each tile of ATB_K keys is decoded once into
// local memory and serves all ATB_Q queries (the one-query kernel above reads and decodes every
// key once per query); scores, the online softmax and the output accumulate in f32. For
// head_dim <= ATB_MAX_DIM (the host uses the one-query kernel beyond).
// With n_splits > 1 the keys are divided among get_group_id(2) in whole tiles (flash-decoding
// style), so that a micro-batch of 16 tokens runs n_head x n_splits work-groups instead of
// n_head: each writes its unnormalized output with its running maximum and sum to `part`, and
// attention_combine merges them.
#define ATB_WG 64
#define ATB_Q 16
#define ATB_K 32
#define ATB_MAX_DIM 128
kernel __attribute__((reqd_work_group_size(ATB_WG, 1, 1))) void attention_block(
    global const float* q, global const uchar* k_cache, global const uchar* v_cache, int k_type,
    int v_type, long k_row_bytes, long v_row_bytes, global const int* ints, int ints_off,
    int n_tokens, int n_head, int group, int head_dim, float scale, global float* out,
    int n_splits, global float* part) {
  local float q_l[ATB_Q][ATB_MAX_DIM];
  local float kv_l[ATB_K][ATB_MAX_DIM + 1];  // the K tile, then the V tile
  local float p_l[ATB_Q][ATB_K + 1];         // scores, then probabilities
  local float corr_l[ATB_Q], m_l[ATB_Q], l_l[ATB_Q];
  local int limit_l[ATB_Q];
  const int h = get_group_id(0), tb = get_group_id(1) * ATB_Q, lid = get_local_id(0);
  const int g = h / group, col0 = g * head_dim;
  const long q_dim = (long)n_head * head_dim;
  const int nq = min(ATB_Q, n_tokens - tb);
  for (int u = lid; u < ATB_Q * head_dim; u += ATB_WG) {
    const int qi = u / head_dim, c = u % head_dim;
    q_l[qi][c] = qi < nq ? q[(tb + qi) * q_dim + (long)h * head_dim + c] : 0.0f;
  }
  if (lid < ATB_Q) {
    limit_l[lid] = lid < nq ? ints[ints_off + tb + lid] : -1;  // last key each query sees
    m_l[lid] = -INFINITY;
    l_l[lid] = 0.0f;
  }
  barrier(CLK_LOCAL_MEM_FENCE);
  int n_keys = 0;
  for (int qi = 0; qi < ATB_Q; ++qi) n_keys = max(n_keys, limit_l[qi] + 1);
  const int n_dims = head_dim / ATB_WG + (lid < head_dim % ATB_WG ? 1 : 0);  // d = lid + i*WG
  float acc[ATB_Q][ATB_MAX_DIM / ATB_WG];
  for (int qi = 0; qi < ATB_Q; ++qi)
    for (int i = 0; i < ATB_MAX_DIM / ATB_WG; ++i) acc[qi][i] = 0.0f;
  const int parts = head_dim / 8;
  // This work-group's keys: split get_group_id(2) of n_splits runs of whole tiles.
  const int tiles = (n_keys + ATB_K - 1) / ATB_K;
  const int per_split = (tiles + n_splits - 1) / n_splits, split = get_group_id(2);
  const int j_begin = min(n_keys, split * per_split * ATB_K);
  const int j_end = min(n_keys, (split + 1) * per_split * ATB_K);
  for (int j0 = j_begin; j0 < j_end; j0 += ATB_K) {
    const int nk = min(ATB_K, j_end - j0);
    // K tile: nk keys x head_dim, decoded 8 elements per unit.
    for (int u = lid; u < ATB_K * parts; u += ATB_WG) {
      const int jj = u / parts, c = (u % parts) * 8;
      float v[8];
      if (jj < nk) {
        decode8(k_type, k_cache + (long)(j0 + jj) * k_row_bytes, (col0 + c) / 32, (c / 8) % 4, v);
      } else {
        for (int i = 0; i < 8; ++i) v[i] = 0.0f;
      }
      for (int i = 0; i < 8; ++i) kv_l[jj][c + i] = v[i];
    }
    barrier(CLK_LOCAL_MEM_FENCE);
    // Scores: work-item lid takes key lid % ATB_K for queries lid / ATB_K + 2i.
    {
      const int jj = lid % ATB_K;
      for (int qi = lid / ATB_K; qi < ATB_Q; qi += ATB_WG / ATB_K) {
        float dot = 0.0f;
        for (int c = 0; c < head_dim; ++c) dot += q_l[qi][c] * kv_l[jj][c];
        p_l[qi][jj] = j0 + jj <= limit_l[qi] ? dot * scale : -INFINITY;
      }
    }
    barrier(CLK_LOCAL_MEM_FENCE);
    // Online softmax, one work-item per query row.
    if (lid < ATB_Q) {
      float mx = -INFINITY;
      for (int jj = 0; jj < nk; ++jj) mx = fmax(mx, p_l[lid][jj]);
      const float m_old = m_l[lid], m_new = fmax(m_old, mx);
      float sum = 0.0f;
      for (int jj = 0; jj < ATB_K; ++jj) {
        const float s = jj < nk ? p_l[lid][jj] : -INFINITY;
        const float p = s == -INFINITY ? 0.0f : exp(s - m_new);
        p_l[lid][jj] = p;
        sum += p;
      }
      const float corr = m_old == -INFINITY ? 0.0f : exp(m_old - m_new);
      corr_l[lid] = corr;
      l_l[lid] = l_l[lid] * corr + sum;
      m_l[lid] = m_new;
    }
    // V tile (the K tile is no longer read after the barrier above).
    for (int u = lid; u < ATB_K * parts; u += ATB_WG) {
      const int jj = u / parts, c = (u % parts) * 8;
      float v[8];
      if (jj < nk) {
        decode8(v_type, v_cache + (long)(j0 + jj) * v_row_bytes, (col0 + c) / 32, (c / 8) % 4, v);
      } else {
        for (int i = 0; i < 8; ++i) v[i] = 0.0f;
      }
      for (int i = 0; i < 8; ++i) kv_l[jj][c + i] = v[i];
    }
    barrier(CLK_LOCAL_MEM_FENCE);
    for (int i = 0; i < ATB_MAX_DIM / ATB_WG; ++i) {
      if (i >= n_dims) break;
      const int d = lid + i * ATB_WG;
      for (int qi = 0; qi < ATB_Q; ++qi) {
        float sum = 0.0f;
        for (int jj = 0; jj < nk; ++jj) sum += p_l[qi][jj] * kv_l[jj][d];
        acc[qi][i] = acc[qi][i] * corr_l[qi] + sum;
      }
    }
    barrier(CLK_LOCAL_MEM_FENCE);  // kv_l and p_l are rewritten by the next tile
  }
  if (n_splits == 1) {
    for (int qi = 0; qi < nq; ++qi) {
      global float* o = out + (tb + qi) * q_dim + (long)h * head_dim;
      for (int i = 0; i < n_dims; ++i) o[lid + i * ATB_WG] = acc[qi][i] / l_l[qi];
    }
    return;
  }
  // A split whose keys no query sees leaves m = -inf, l = 0 and a zero output.
  for (int qi = 0; qi < nq; ++qi) {
    global float* r = part + (((long)split * n_tokens + tb + qi) * n_head + h) * (head_dim + 2);
    for (int i = 0; i < n_dims; ++i) r[lid + i * ATB_WG] = acc[qi][i];
    if (lid == 0) {
      r[head_dim] = m_l[qi];
      r[head_dim + 1] = l_l[qi];
    }
  }
}

// out[t][h][d] from the n_splits partial results of attention_block: each split's output and
// sum weighted by exp(its maximum - the overall maximum). Split 0 holds key 0, which every
// query sees, so the overall maximum is finite.
kernel void attention_combine(global const float* part, int n_splits, int n_tokens, int n_head,
                              int head_dim, global float* out) {
  const int d = get_global_id(0), h = get_global_id(1), t = get_global_id(2);
  if (d >= head_dim) return;
  const long rec = head_dim + 2, split_stride = (long)n_tokens * n_head * rec;
  const global float* r0 = part + ((long)t * n_head + h) * rec;
  float m = -INFINITY;
  for (int s = 0; s < n_splits; ++s) m = fmax(m, r0[s * split_stride + head_dim]);
  float num = 0.0f, den = 0.0f;
  for (int s = 0; s < n_splits; ++s) {
    const global float* r = r0 + s * split_stride;
    if (r[head_dim] == -INFINITY) continue;
    const float w = exp(r[head_dim] - m);
    num += w * r[d];
    den += w * r[head_dim + 1];
  }
  out[((long)t * n_head + h) * head_dim + d] = num / den;
}
