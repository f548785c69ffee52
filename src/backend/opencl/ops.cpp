// The host side of the OpenCL backend's ops: shape and index checks (errors name the op and
// the weight), kernel arguments and launches. Every launch is enqueued without waiting.
#include <algorithm>
#include <cassert>
#include <cmath>
#include <cstring>
#include <vector>

#include "backend/opencl/opencl_backend_impl.h"
#include "format/quant/quant.h"

namespace kestrel::backend::opencl {

namespace {

using quant::DType;

bool is_f32(const Tensor& t) {
  return t.type == DType::F32 && t.data;
}

constexpr int kMaxHeadDim = 256;  // ATT_MAX_DIM of kernels/attention.cl

}  // namespace

Status OpenclBackend::embed(const HostMatrix& table, const int32_t* tokens, int n_tokens,
                            Tensor& out) {
  for (int i = 0; i < n_tokens; ++i)
    if (tokens[i] < 0 || tokens[i] >= table.n_out)
      return error("token id %d is outside the vocabulary of %lld tokens", tokens[i],
                   static_cast<long long>(table.n_out));
  if (!quant::is_supported(table.type) || table.n_in % 32 != 0)
    return error("embed: token table of type %s and %lld columns is not supported",
                 quant::type_name(table.type), static_cast<long long>(table.n_in));
  if (!is_f32(out) || out.cols != table.n_in || n_tokens > out.rows)
    return error("embed: output of %lld x %lld cannot hold %d rows of %lld",
                 static_cast<long long>(out.rows), static_cast<long long>(out.cols), n_tokens,
                 static_cast<long long>(table.n_in));
  if (n_tokens <= 0) return Status::ok();
  KESTREL_ASSIGN_OR_RETURN(cl_mem dev, device_table(table));
  KESTREL_ASSIGN_OR_RETURN(int ids, upload_ints(tokens, n_tokens, "embed"));
  cl_kernel k = kernel("embed_rows");
  const int n_slices = static_cast<int>(table.n_in / 32);
  const cl_long rb = quant::row_bytes(table.type, table.n_in);
  const int type = static_cast<int>(table.type);
  KESTREL_TRY(Args(k, "embed")(dev)(type)(rb)(n_slices)(ring_dev_)(ids).mem(out.data).status());
  const size_t global[2] = {static_cast<size_t>(n_slices), static_cast<size_t>(n_tokens)};
  const size_t local[2] = {32, 1};
  return launch(k, "embed", 2, global, local);
}

Status OpenclBackend::rms_norm(const Tensor& x, int n_tokens, const Tensor& weight, float eps,
                               Tensor& out) {
  return norm_rows(const_cast<Tensor&>(x), nullptr, n_tokens, weight, eps, out);
}

Status OpenclBackend::add_rms_norm(Tensor& x, const Tensor& y, int n_tokens, const Tensor& weight,
                                   float eps, Tensor& out) {
  if (!is_f32(y) || y.cols != x.cols || n_tokens > y.rows)
    return error("add_rms_norm: shapes do not match (%lld and %lld columns)",
                 static_cast<long long>(x.cols), static_cast<long long>(y.cols));
  return norm_rows(x, &y, n_tokens, weight, eps, out);
}

// rms_norm, or with y add_rms_norm (x += y first, stored).
Status OpenclBackend::norm_rows(Tensor& x, const Tensor* y, int n_tokens, const Tensor& weight,
                                float eps, Tensor& out) {
  const char* what = y ? "add_rms_norm" : "rms_norm";
  if (!is_f32(x) || !is_f32(out) || weight.cols != x.cols || out.cols != x.cols ||
      n_tokens > x.rows || n_tokens > out.rows)
    return error("%s: shapes do not match (x %lld x %lld, weight %lld, out %lld x %lld)", what,
                 static_cast<long long>(x.rows), static_cast<long long>(x.cols),
                 static_cast<long long>(weight.cols), static_cast<long long>(out.rows),
                 static_cast<long long>(out.cols));
  if (n_tokens <= 0) return Status::ok();
  cl_kernel k = kernel(what);
  const int n = static_cast<int>(x.cols);
  const int f16 = companion_mode(n_tokens, out.cols);
  cl_mem xh = nullptr, xs = nullptr;
  if (f16) KESTREL_TRY(companion_buffers(f16, n_tokens, out.cols, xh, xs));
  Args args(k, what);
  args.mem(x.data);
  if (y) args.mem(y->data);
  args(n).mem(weight.data)(eps).mem(out.data)(f16);
  xh ? args(xh)(xs) : args.null_mem().null_mem();
  KESTREL_TRY(args.status());
  const size_t wg = info_.max_work_group >= 256 ? 256 : 64;
  const size_t global[1] = {wg * n_tokens};
  const size_t local[1] = {wg};
  KESTREL_TRY(launch(k, what, 1, global, local));
  if (f16) companion_written(out, n_tokens);
  return Status::ok();
}

Expected<cl_mem> OpenclBackend::rope_freqs(float base, int head_dim) {
  const auto key = std::make_pair(base, head_dim);
  if (auto it = rope_freqs_.find(key); it != rope_freqs_.end()) return it->second;
  // Each frequency as two floats, hi and lo (the kernel forms pos * inv_freq to ~2^-48).
  const int half = head_dim / 2;
  std::vector<float> f(static_cast<size_t>(2 * half));
  for (int i = 0; i < half; ++i) {
    const double v = std::pow(static_cast<double>(base), -2.0 * i / head_dim);
    f[2 * i] = static_cast<float>(v);
    f[2 * i + 1] = static_cast<float>(v - static_cast<double>(f[2 * i]));
  }
  KESTREL_ASSIGN_OR_RETURN(cl_mem m, device_alloc(f.size() * sizeof(float), "rope frequencies"));
  const cl_int err = clEnqueueWriteBuffer(queue_, m, CL_TRUE, 0, f.size() * sizeof(float), f.data(),
                                          0, nullptr, nullptr);
  if (err != CL_SUCCESS) {
    device_free(m, f.size() * sizeof(float));
    return cl_status(err, "clEnqueueWriteBuffer", "rope");
  }
  rope_freqs_[key] = m;
  return m;
}

Status OpenclBackend::rope(Tensor& x, int n_tokens, const int32_t* positions, const RopeParams& p) {
  return rope_rows(x, p, nullptr, 0, n_tokens, positions);
}

Status OpenclBackend::rope_qk(Tensor& q, Tensor& k, int n_tokens, const int32_t* positions,
                              const RopeParams& pq, const RopeParams& pk) {
  if (pq.head_dim != pk.head_dim || pq.freq_base != pk.freq_base || pq.layout != pk.layout)
    return Backend::rope_qk(q, k, n_tokens, positions, pq, pk);
  if (!is_f32(k) || pk.n_heads <= 0 || k.cols != int64_t{pk.n_heads} * pk.head_dim ||
      n_tokens > k.rows)
    return error("rope: %d heads of %d do not match rows of %lld", pk.n_heads, pk.head_dim,
                 static_cast<long long>(k.cols));
  return rope_rows(q, pq, &k, pk.n_heads, n_tokens, positions);
}

// RoPE in place on x (p.n_heads heads) and, in the same launch, on x1's heads1 heads.
Status OpenclBackend::rope_rows(Tensor& x, const RopeParams& p, Tensor* x1, int heads1,
                                int n_tokens, const int32_t* positions) {
  if (!is_f32(x) || p.n_heads <= 0 || p.head_dim <= 0 || p.head_dim % 2 != 0 ||
      x.cols != int64_t{p.n_heads} * p.head_dim || n_tokens > x.rows)
    return error("rope: %d heads of %d do not match rows of %lld", p.n_heads, p.head_dim,
                 static_cast<long long>(x.cols));
  if (n_tokens <= 0) return Status::ok();
  KESTREL_ASSIGN_OR_RETURN(cl_mem freqs, rope_freqs(p.freq_base, p.head_dim));
  KESTREL_ASSIGN_OR_RETURN(int pos, upload_ints(positions, n_tokens, "rope"));
  cl_kernel k = kernel("rope");
  const int neox = p.layout == RopeLayout::NeoX ? 1 : 0;
  KESTREL_TRY(Args(k, "rope")
                  .mem(x.data)(p.n_heads)
                  .mem(x1 ? x1->data : x.data)(heads1)(p.head_dim)(neox)(freqs)(ring_dev_)(pos)
                  .status());
  const size_t global[3] = {static_cast<size_t>(p.head_dim / 2),
                            static_cast<size_t>(p.n_heads + heads1), static_cast<size_t>(n_tokens)};
  return launch(k, "rope", 3, global, nullptr);
}

Status OpenclBackend::swiglu(const Tensor& gate, const Tensor& up, int n_tokens, Tensor& out) {
  if (!is_f32(gate) || !is_f32(up) || !is_f32(out) || up.cols != gate.cols ||
      out.cols != gate.cols || n_tokens > gate.rows || n_tokens > up.rows || n_tokens > out.rows)
    return error("swiglu: shapes do not match (gate %lld, up %lld, out %lld columns)",
                 static_cast<long long>(gate.cols), static_cast<long long>(up.cols),
                 static_cast<long long>(out.cols));
  const cl_long n = static_cast<cl_long>(n_tokens) * gate.cols;
  if (n <= 0) return Status::ok();
  if (const int f16 = companion_mode(n_tokens, out.cols)) {  // rows, with the f16 companion
    cl_mem xh = nullptr, xs = nullptr;
    KESTREL_TRY(companion_buffers(f16, n_tokens, out.cols, xh, xs));
    cl_kernel k = kernel("swiglu_rows");
    KESTREL_TRY(Args(k, "swiglu")
                    .mem(gate.data)
                    .mem(up.data)(static_cast<int>(out.cols))
                    .mem(out.data)(f16)(xh)(xs)
                    .status());
    const size_t wg = info_.max_work_group >= 256 ? 256 : 64;
    const size_t global[1] = {wg * n_tokens};
    const size_t local[1] = {wg};
    KESTREL_TRY(launch(k, "swiglu", 1, global, local));
    companion_written(out, n_tokens);
    return Status::ok();
  }
  cl_kernel k = kernel("swiglu");
  KESTREL_TRY(Args(k, "swiglu").mem(gate.data).mem(up.data)(n).mem(out.data).status());
  const size_t global[1] = {static_cast<size_t>(n)};
  const size_t local[1] = {64};
  return launch(k, "swiglu", 1, global, local);
}

Status OpenclBackend::add(Tensor& x, const Tensor& y, int n_tokens) {
  if (!is_f32(x) || !is_f32(y) || y.cols != x.cols || n_tokens > x.rows || n_tokens > y.rows)
    return error("add: shapes do not match (%lld and %lld columns)", static_cast<long long>(x.cols),
                 static_cast<long long>(y.cols));
  const cl_long n = static_cast<cl_long>(n_tokens) * x.cols;
  if (n <= 0) return Status::ok();
  cl_kernel k = kernel("add_inplace");
  KESTREL_TRY(Args(k, "add").mem(x.data).mem(y.data)(n).status());
  const size_t global[1] = {static_cast<size_t>(n)};
  const size_t local[1] = {64};
  return launch(k, "add", 1, global, local);
}

Status OpenclBackend::get_rows(const Tensor& x, const int32_t* rows, int n_rows, Tensor& out) {
  for (int i = 0; i < n_rows; ++i)
    if (rows[i] < 0 || rows[i] >= x.rows)
      return error("get_rows: row %d outside a tensor of %lld rows", rows[i],
                   static_cast<long long>(x.rows));
  if (!is_f32(x) || !is_f32(out) || out.cols != x.cols || n_rows > out.rows)
    return error("get_rows: output of %lld x %lld cannot hold %d rows of %lld",
                 static_cast<long long>(out.rows), static_cast<long long>(out.cols), n_rows,
                 static_cast<long long>(x.cols));
  if (n_rows <= 0) return Status::ok();
  KESTREL_ASSIGN_OR_RETURN(int off, upload_ints(rows, n_rows, "get_rows"));
  cl_kernel k = kernel("get_rows");
  const cl_long cols = x.cols;
  KESTREL_TRY(Args(k, "get_rows").mem(x.data)(cols)(ring_dev_)(off).mem(out.data).status());
  const size_t global[2] = {static_cast<size_t>(cols), static_cast<size_t>(n_rows)};
  const size_t local[2] = {64, 1};
  return launch(k, "get_rows", 2, global, local);
}

int OpenclBackend::first_tiled_tokens(DType type) const {
  const bool nv = !nv_mma_.empty() && (type == DType::Q4_0 || type == DType::Q8_0);
  return nv ? nv_min_tokens_ : kSmallBatch + 1;
}

bool OpenclBackend::uses_half(const ClWeight& w, int n_tokens) const {
  return (w.type == DType::Q4_0 || w.type == DType::Q8_0) &&
         n_tokens >= first_tiled_tokens(w.type) &&
         (!nv_mma_.empty() || half_tiled_ || (half_tiled16_ && mid_tiled_));
}

int OpenclBackend::companion_mode(int n_tokens, int64_t cols) const {
  // (Q4_0 stands for the weight types whose matmuls read the companion.)
  if (!fused_f16_ || n_tokens < first_tiled_tokens(DType::Q4_0) || cols % 32 != 0) return 0;
  if (!nv_mma_.empty()) return 1;
  return half_tiled_ || (half_tiled16_ && mid_tiled_) ? 2 : 0;
}

Status OpenclBackend::companion_buffers(int mode, int n_tokens, int64_t cols, cl_mem& xh,
                                        cl_mem& xs) {
  const size_t values = static_cast<size_t>(n_tokens) * cols;
  KESTREL_ASSIGN_OR_RETURN(xh, scratch(2, 2 * values));
  KESTREL_ASSIGN_OR_RETURN(
      xs, scratch(3, sizeof(float) * (mode == 1 ? static_cast<size_t>(n_tokens) : values / 32)));
  return Status::ok();
}

bool OpenclBackend::companion_ready(const Tensor& x, int n_tokens) const {
  return companion_.data == x.data && companion_.n_tokens == n_tokens &&
         companion_.cols == x.cols && companion_.after == launches_;
}

void OpenclBackend::companion_written(const Tensor& x, int n_tokens) {
  companion_ = {x.data, n_tokens, x.cols, launches_};
}

Status OpenclBackend::half_activations(const Tensor& x, int n_tokens, const char* op) {
  cl_mem xh = nullptr, xs = nullptr;
  KESTREL_TRY(companion_buffers(2, n_tokens, x.cols, xh, xs));
  cl_kernel k = kernel("x_half_blocks");
  Args a(k, op);
  a.mem(x.data)(static_cast<int>(x.cols))(n_tokens)(xh)(xs);
  KESTREL_TRY(a.status());
  const size_t global[2] = {static_cast<size_t>(x.cols / 32), static_cast<size_t>(n_tokens)};
  const size_t local[2] = {32, 1};
  return launch(k, op, 2, global, local);
}

// Q/K/V and gate/up share their input: in half arithmetic it is converted once for the group.
Status OpenclBackend::matmul_group(const Tensor& x, int n_tokens, const MatmulOut* outs,
                                   int n_outs) {
  bool half = false;
  for (int i = 0; i < n_outs; ++i)
    half = half || (outs[i].w->n_in == x.cols &&
                    uses_half(static_cast<const ClWeight&>(*outs[i].w), n_tokens));
  if (half && n_tokens <= x.rows && is_f32(x)) {
    if (!companion_ready(x, n_tokens))
      KESTREL_TRY(nv_mma_.empty() ? half_activations(x, n_tokens, "matmul group")
                                  : nv_activations(x, n_tokens, "matmul group"));
    half_x_ready_ = x.data;
  }
  Status s = Status::ok();
  MatmulSegment segs[3];
  const bool one_launch = group_fits(x, n_tokens, outs, n_outs);
  for (int i = 0; i < n_outs && one_launch; ++i)
    segs[i] = {static_cast<const ClWeight*>(outs[i].w), outs[i].out, outs[i].bias};
  if (one_launch && n_tokens < first_tiled_tokens(segs[0].w->type))  // decode, short tails
    return matmul_small_batch(segs, n_outs, x, n_tokens, "matmul group");
  if (one_launch && half_x_ready_ && !nv_mma_.empty() && nv_reduce_in_kernel_ &&
      uses_half(*segs[0].w, n_tokens)) {
    // The tensor-core path with in-kernel sums: the whole group in one launch.
    s = matmul_nv(segs, n_outs, x, n_tokens, "matmul group");
    half_x_ready_ = nullptr;
    return s;
  }
  for (int i = 0; i < n_outs && s.is_ok(); ++i)
    s = matmul(*outs[i].w, x, n_tokens, *outs[i].out, outs[i].bias);
  half_x_ready_ = nullptr;
  return s;
}

// Whether a matmul group can be one launch: 2 or 3 weights of one type on x, every output and bias
// of the right shape (else each matmul runs alone, and reports any mismatch).
bool OpenclBackend::group_fits(const Tensor& x, int n_tokens, const MatmulOut* outs,
                               int n_outs) const {
  if (n_outs < 2 || n_outs > 3 || !is_f32(x) || n_tokens > x.rows) return false;
  for (int i = 0; i < n_outs; ++i) {
    const Weight& w = *outs[i].w;
    const Tensor& out = *outs[i].out;
    const Tensor* bias = outs[i].bias;
    if (w.type != outs[0].w->type || w.n_in != x.cols || out.cols != w.n_out ||
        n_tokens > out.rows || !is_f32(out) || (bias && bias->cols != w.n_out))
      return false;
  }
  return true;
}

// matmul_small (kernels/matmul.cl) over up to three weights of one type on x: MV_ROWS-row
// work-groups, each weight's rows rounded up to whole work-groups.
Status OpenclBackend::matmul_small_batch(const MatmulSegment* segs, int n_segs, const Tensor& x,
                                         int n_tokens, const char* op) {
  constexpr int kRows = 16;  // MV_ROWS
  const ClWeight& w0 = *segs[0].w;
  int row_blocks[3] = {0, 0, 0};
  for (int i = 0; i < n_segs; ++i)
    row_blocks[i] = static_cast<int>((segs[i].w->n_out + kRows - 1) / kRows);
  cl_kernel k = kernel("matmul_small");
  Args a(k, op);
  a(static_cast<int>(w0.type))(static_cast<cl_long>(w0.row_bytes))(static_cast<int>(w0.n_in))
      .mem(x.data)(n_tokens)(row_blocks[0])(row_blocks[1]);
  for (int i = 0; i < 3; ++i) {
    const MatmulSegment& g = segs[std::min(i, n_segs - 1)];  // unused segments repeat the last
    a(g.w->qs);
    g.w->d ? a(g.w->d) : a.null_mem();
    a(static_cast<int>(g.w->n_out)).mem(g.out->data);
    g.bias ? a.mem(g.bias->data) : a.null_mem();
  }
  KESTREL_TRY(a.status());
  const size_t split = wide_ ? 16 : 4;  // MV_SPLIT
  const size_t global[2] = {
      static_cast<size_t>(row_blocks[0] + row_blocks[1] + row_blocks[2]) * kRows, split};
  const size_t local[2] = {kRows, split};
  return launch(k, op, 2, global, local);
}

Status OpenclBackend::matmul(const Weight& weight, const Tensor& x, int n_tokens, Tensor& out,
                             const Tensor* bias) {
  const auto& w = static_cast<const ClWeight&>(weight);
  if (x.cols != w.n_in || out.cols != w.n_out || n_tokens > x.rows || n_tokens > out.rows ||
      !is_f32(x) || !is_f32(out) || (bias && bias->cols != w.n_out))
    return error("matmul '%s': shapes do not match (x %lld x %lld, weight %lld x %lld, out %lld)",
                 w.name.c_str(), static_cast<long long>(n_tokens), static_cast<long long>(x.cols),
                 static_cast<long long>(w.n_out), static_cast<long long>(w.n_in),
                 static_cast<long long>(out.cols));
  if (n_tokens <= 0) return Status::ok();
  const std::string op = "matmul '" + w.name + "'";
  const int type = static_cast<int>(w.type);
  const cl_long rb = w.row_bytes;
  const int n_in = static_cast<int>(w.n_in), n_out = static_cast<int>(w.n_out);
  auto set_common = [&](cl_kernel k, Args& a) {
    (void)k;
    a(w.qs);
    if (w.d)
      a(w.d);
    else
      a.null_mem();
    a(type)(rb)(n_in)(n_out).mem(x.data);
  };
  auto set_bias = [&](Args& a) {
    if (bias)
      a.mem(bias->data);
    else
      a.null_mem();
  };
  const MatmulSegment seg{&w, &out, bias};
  if (n_tokens < first_tiled_tokens(w.type))
    return matmul_small_batch(&seg, 1, x, n_tokens, op.c_str());
  if (!nv_mma_.empty() && uses_half(w, n_tokens))
    return matmul_nv(&seg, 1, x, n_tokens, op.c_str());
  // Up to mid_max_tokens_ tokens: matmul_mid; beyond, full tiles of matmul_tiled and the rest
  // on matmul_mid when it is that short (a 71-token micro-batch costs 64 tiled token slots and 7
  // mid ones, not 128), else on one more partial tile.
  const int n_blocks = n_in / 32;
  constexpr int kMidTokens = 16;  // MID_T of kernels/matmul.cl
  const int mid_rows = mid_rows_, mid_split = mid_split_;
  // Half arithmetic (matmul_tiled_half.cl): the activations as half blocks with their
  // power-of-two scales (once per matmul_group), then the half instances of the tiled kernels.
  const bool half_tiled = uses_half(w, n_tokens) && half_tiled_;
  const bool half_tiled16 = uses_half(w, n_tokens) && half_tiled16_ && mid_tiled_;
  cl_mem xh = nullptr, xs = nullptr;
  if (half_tiled || half_tiled16) {
    const bool ready = half_x_ready_ == x.data || companion_ready(x, n_tokens);
    KESTREL_TRY(companion_buffers(2, n_tokens, n_in, xh, xs));
    if (!ready) KESTREL_TRY(half_activations(x, n_tokens, op.c_str()));
  }
  int t0 = 0;
  while (t0 < n_tokens) {
    const int rest = n_tokens - t0;
    const bool tiled = rest > mid_max_tokens_;
    const int count = tiled && rest >= tile_.tn ? rest / tile_.tn * tile_.tn : rest;
    assert(count > 0);
    const TileShape& tile = tiled ? tile_ : mid_tile_;  // a tiled instance
    const bool on_tile = tiled || mid_tiled_;
    const int tm = on_tile ? tile.tm : mid_rows, tn = tiled ? tile_.tn : kMidTokens;
    const size_t groups_r = static_cast<size_t>((n_out + tm - 1) / tm);
    const size_t groups_t = static_cast<size_t>((count + tn - 1) / tn);
    // Split the input columns when the output tiles alone would leave compute units idle
    // (decode-sized outputs, short micro-batches): about 4 work-groups per unit for the tiled
    // kernel, mid_groups_per_cu_ for mid-sized batches.
    const int splits = matmul_splits(groups_r * groups_t, !tiled, n_blocks);
    const cl_long stride = static_cast<cl_long>(n_tokens) * n_out;
    cl_mem part = nullptr;
    if (splits > 1) {
      KESTREL_ASSIGN_OR_RETURN(part, scratch(0, sizeof(float) * splits * stride));
    }
    const bool half = tiled ? half_tiled : half_tiled16;
    cl_kernel k = kernel(tiled        ? (half ? "matmul_tiled_half" : "matmul_tiled")
                         : half       ? "matmul_tiled16_half"
                         : mid_tiled_ ? "matmul_tiled16"
                                      : "matmul_mid");
    Args a(k, op.c_str());
    if (half)
      a(w.qs)(w.d)(type)(n_in)(n_out)(xh)(xs);
    else
      set_common(k, a);
    a(t0)(count).mem(out.data);
    set_bias(a);
    a(splits);
    if (part)
      a(part);
    else
      a.null_mem();
    a(stride);
    KESTREL_TRY(a.status());
    const size_t wx = on_tile ? tile.wx : mid_rows, wy = on_tile ? tile.wy : mid_split;
    const size_t global[3] = {groups_r * wx, groups_t * wy, static_cast<size_t>(splits)};
    const size_t local[3] = {wx, wy, 1};
    KESTREL_TRY(launch(k, op.c_str(), 3, global, local));
    if (splits > 1)
      KESTREL_TRY(reduce_splits(part, splits, stride, n_out, t0, count, out, bias, op.c_str()));
    t0 += count;
  }
  return Status::ok();
}

// Split-K slices for `groups` output tiles: when they alone leave compute units idle, enough to
// reach about 4 work-groups a unit for the large tiles, mid_groups_per_cu_ for mid-sized batches
// (at most 8, resp. mid_max_splits_ slices, and a quarter of the input blocks).
int OpenclBackend::matmul_splits(size_t groups, bool mid_sized, int n_blocks) const {
  const size_t want = static_cast<size_t>(mid_sized ? mid_groups_per_cu_ : 4) *
                      std::max<size_t>(info_.compute_units, 1);
  if (groups == 0 || groups >= want) return 1;
  return static_cast<int>(std::min<size_t>({(want + groups - 1) / groups,
                                            static_cast<size_t>(mid_sized ? mid_max_splits_ : 8),
                                            static_cast<size_t>(std::max(n_blocks / 4, 1))}));
}

// out[t][r] (+ bias) = the sum over the splits of part, tokens [t0, t0 + count) (matmul_reduce).
Status OpenclBackend::reduce_splits(cl_mem part, int splits, cl_long stride, int n_out, int t0,
                                    int count, const Tensor& out, const Tensor* bias,
                                    const char* op) {
  cl_kernel r = kernel("matmul_reduce");
  Args ra(r, op);
  ra(part)(splits)(stride)(n_out)(t0)(count).mem(out.data);
  bias ? ra.mem(bias->data) : ra.null_mem();
  KESTREL_TRY(ra.status());
  const size_t rg[2] = {static_cast<size_t>(n_out), static_cast<size_t>(count)};
  const size_t rl[2] = {64, 1};
  return launch(r, op, 2, rg, rl);
}

Status OpenclBackend::kv_store(const Tensor& k, const Tensor& v, int n_tokens,
                               const int32_t* positions, Tensor& k_cache, Tensor& v_cache) {
  const int64_t cache_rows = std::min(k_cache.rows, v_cache.rows);
  if (k.cols != k_cache.cols || v.cols != v_cache.cols || n_tokens > k.rows || n_tokens > v.rows ||
      !is_f32(k) || !is_f32(v))
    return error("kv_store: rows of %lld/%lld values do not match the caches' %lld/%lld",
                 static_cast<long long>(k.cols), static_cast<long long>(v.cols),
                 static_cast<long long>(k_cache.cols), static_cast<long long>(v_cache.cols));
  for (const Tensor* c : {&k_cache, &v_cache})
    if (!quant::is_kv_type(c->type) || c->cols % 32 != 0)
      return error(
          "kv_store: a cache of type %s and %lld columns is not supported (f16, q8_0 "
          "or q4_0 rows of a multiple of 32)",
          quant::type_name(c->type), static_cast<long long>(c->cols));
  KESTREL_TRY(check_kv_positions(positions, n_tokens, cache_rows));
  if (n_tokens <= 0) return Status::ok();
  KESTREL_ASSIGN_OR_RETURN(int pos, upload_ints(positions, n_tokens, "kv_store"));
  // K and V in one launch (get_global_id(2)).
  cl_kernel kern = kernel("kv_store");
  Args a(kern, "kv_store");
  for (const auto& [src, cache] : {std::pair<const Tensor*, Tensor*>{&k, &k_cache}, {&v, &v_cache}})
    a.mem(src->data)(static_cast<int>(src->cols))(static_cast<int>(cache->type))
        .mem(cache->data)(static_cast<cl_long>(cache->row_bytes()));
  KESTREL_TRY(a(ring_dev_)(pos).status());
  const size_t global[3] = {static_cast<size_t>(std::max(k.cols, v.cols) / 32),
                            static_cast<size_t>(n_tokens), 2};
  return launch(kern, "kv_store", 3, global, nullptr);
}

Status OpenclBackend::check_kv_positions(const int32_t* positions, int n_tokens,
                                         int64_t cache_rows) {
  for (int t = 0; t < n_tokens; ++t)
    if (positions[t] < 0 || positions[t] >= cache_rows)
      return error("kv_store: position %d outside the cache of %lld positions", positions[t],
                   static_cast<long long>(cache_rows));
  return Status::ok();
}

bool OpenclBackend::fuses_rope_kv_store(const Tensor& k_cache, const Tensor& v_cache) const {
  return fused_rope_kv_ && quant::is_kv_type(k_cache.type) && quant::is_kv_type(v_cache.type);
}

// One launch where rope_qk and kv_store would take two (a launch costs ~20 us on NVIDIA's
// driver, as much as the two kernels' work in a micro-batch of 16). Shapes it does not take, and
// their errors, go to the two ops.
Status OpenclBackend::rope_kv_store(Tensor& q, Tensor& k, const Tensor& v, int n_tokens,
                                    const int32_t* positions, const RopeParams& pq,
                                    const RopeParams& pk, Tensor& k_cache, Tensor& v_cache) {
  const int D = pq.head_dim;
  const bool neox = pq.layout == RopeLayout::NeoX;
  const bool fits =
      fuses_rope_kv_store(k_cache, v_cache) && pk.head_dim == D && pk.freq_base == pq.freq_base &&
      pk.layout == pq.layout && D > 0 && D % (neox ? 64 : 32) == 0 && pq.n_heads > 0 &&
      pk.n_heads > 0 && is_f32(q) && is_f32(k) && is_f32(v) && q.cols == int64_t{pq.n_heads} * D &&
      k.cols == int64_t{pk.n_heads} * D && v.cols == k.cols && k_cache.cols == k.cols &&
      v_cache.cols == v.cols && n_tokens <= q.rows && n_tokens <= k.rows && n_tokens <= v.rows;
  if (!fits) return Backend::rope_kv_store(q, k, v, n_tokens, positions, pq, pk, k_cache, v_cache);
  KESTREL_TRY(check_kv_positions(positions, n_tokens, std::min(k_cache.rows, v_cache.rows)));
  if (n_tokens <= 0) return Status::ok();
  KESTREL_ASSIGN_OR_RETURN(cl_mem freqs, rope_freqs(pq.freq_base, D));
  KESTREL_ASSIGN_OR_RETURN(int pos, upload_ints(positions, n_tokens, "rope+kv_store"));
  cl_kernel kern = kernel("rope_kv_store");
  KESTREL_TRY(Args(kern, "rope+kv_store")
                  .mem(q.data)(pq.n_heads)
                  .mem(k.data)
                  .mem(v.data)(pk.n_heads)(D)(neox ? 1 : 0)(freqs)(static_cast<int>(k_cache.type))
                  .mem(k_cache.data)(static_cast<cl_long>(k_cache.row_bytes()))(
                      static_cast<int>(v_cache.type))
                  .mem(v_cache.data)(static_cast<cl_long>(v_cache.row_bytes()))(ring_dev_)(pos)
                  .status());
  // Units a head (neox: block pairs, the upper half's work-items only store V), Q, K and V heads.
  const size_t global[3] = {static_cast<size_t>(D / 32),
                            static_cast<size_t>(pq.n_heads + 2 * pk.n_heads),
                            static_cast<size_t>(n_tokens)};
  return launch(kern, "rope+kv_store", 3, global, nullptr);
}

Status OpenclBackend::attention(const Tensor& q, int n_tokens, const int32_t* positions,
                                const Tensor& k_cache, const Tensor& v_cache,
                                const AttentionParams& p, Tensor& out) {
  const int D = p.head_dim, H = p.n_head, Hkv = p.n_head_kv;
  if (H <= 0 || Hkv <= 0 || H % Hkv != 0 || D <= 0 || D % 32 != 0 || D > kMaxHeadDim ||
      k_cache.cols != int64_t{Hkv} * D || v_cache.cols != k_cache.cols ||
      q.cols != int64_t{H} * D || out.cols != q.cols || n_tokens > q.rows || n_tokens > out.rows ||
      !is_f32(q) || !is_f32(out) || !quant::is_kv_type(k_cache.type) ||
      !quant::is_kv_type(v_cache.type))
    return error(
        "attention: %d heads / %d KV heads of %d do not match q rows of %lld, the cache rows of "
        "%lld / %lld or the output (head_dim: a multiple of 32 up to %d)",
        H, Hkv, D, static_cast<long long>(q.cols), static_cast<long long>(k_cache.cols),
        static_cast<long long>(v_cache.cols), kMaxHeadDim);
  for (int t = 0; t < n_tokens; ++t)
    if (positions[t] < 0 || positions[t] >= std::min(k_cache.rows, v_cache.rows))
      return error("attention: position %d outside a cache of %lld rows", positions[t],
                   static_cast<long long>(std::min(k_cache.rows, v_cache.rows)));
  if (n_tokens <= 0) return Status::ok();
  KESTREL_ASSIGN_OR_RETURN(int pos, upload_ints(positions, n_tokens, "attention"));
  // Several queries (and head_dim <= 128): attention_block shares each decoded key tile among
  // 16 queries, when its (head, 16-query, key split) work-groups are enough to occupy the device;
  // decode-sized and short micro-batches take the one-query kernel (a work-group per head and
  // query, each decoding every key again). Keys are split (in tiles of 32, up to 16 ways) only
  // when the (head, 16-query) work-groups alone are too few: 32 heads x 1 for the seed's
  // micro-batches of 16 on the H200's 132 units. att_splits_forced_ (KESTREL_CL_ATT_SPLITS)
  // overrides the count; 0 turns splitting off (the choice before it existed: those
  // micro-batches on the one-query kernel).
  int n_kv = 0;
  for (int t = 0; t < n_tokens; ++t) n_kv = std::max(n_kv, positions[t] + 1);
  // A recorded pass replays its launch shapes at every position: choose them for the whole
  // cache (the kernel gives key splits past the last key nothing to do).
  if (rec_mode_ != RecMode::Eager) n_kv = static_cast<int>(std::min(k_cache.rows, v_cache.rows));
  const int tiles = (n_kv + 31) / 32;  // ATB_K of kernels/attention.cl
  const size_t blocks = static_cast<size_t>(H) * ((n_tokens + 15) / 16);
  const size_t want = 2 * static_cast<size_t>(std::max<cl_uint>(info_.compute_units, 1));
  int splits = 1;
  if (blocks < want)
    splits = static_cast<int>(
        std::min<size_t>({(want + blocks - 1) / blocks, 16, static_cast<size_t>(tiles)}));
  const bool forced = att_splits_forced_ > 0;
  if (att_splits_forced_ == 0) splits = 1;
  if (forced) splits = std::min(att_splits_forced_, std::max(tiles, 1));
  // The split work-groups need only reach one per unit: each decodes a key once for 16 queries,
  // where the one-query kernel decodes it 16 times (~6x the work at head_dim 128).
  if (attention_block_fits_ && n_tokens >= 4 && D <= 128 &&
      (forced || blocks * splits >= want / 2)) {
    cl_kernel kb = kernel("attention_block");
    const int kt = static_cast<int>(k_cache.type), vt = static_cast<int>(v_cache.type);
    const cl_long krb = static_cast<cl_long>(k_cache.row_bytes()),
                  vrb = static_cast<cl_long>(v_cache.row_bytes());
    const int group = H / Hkv;
    // Partial results of the splits: [splits][n_tokens][H][D + 2] floats (scratch slot 1; the
    // matmuls' split-K partials use slot 0).
    cl_mem part = nullptr;
    if (splits > 1) {
      KESTREL_ASSIGN_OR_RETURN(
          part, scratch(1, sizeof(float) * static_cast<size_t>(splits) * n_tokens * H * (D + 2)));
    }
    KESTREL_TRY(
        Args(kb, "attention")
            .mem(q.data)
            .mem(k_cache.data)
            .mem(v_cache.data)(kt)(vt)(krb)(vrb)(ring_dev_)(pos)(n_tokens)(H)(group)(D)(p.scale)
            .mem(out.data)(splits)
            .mem(part)
            .status());
    const size_t global[3] = {static_cast<size_t>(H) * 64,
                              static_cast<size_t>((n_tokens + 15) / 16),
                              static_cast<size_t>(splits)};
    const size_t local[3] = {64, 1, 1};
    KESTREL_TRY(launch(kb, "attention", 3, global, local));
    if (splits == 1) return Status::ok();
    cl_kernel kc = kernel("attention_combine");
    KESTREL_TRY(Args(kc, "attention").mem(part)(splits)(n_tokens)(H)(D).mem(out.data).status());
    const size_t cg[3] = {static_cast<size_t>(D), static_cast<size_t>(H),
                          static_cast<size_t>(n_tokens)};
    const size_t cl[3] = {32, 1, 1};  // D is a multiple of 32
    return launch(kc, "attention", 3, cg, cl);
  }
  cl_kernel k = kernel("attention_query");
  const int kt = static_cast<int>(k_cache.type), vt = static_cast<int>(v_cache.type);
  const cl_long krb = static_cast<cl_long>(k_cache.row_bytes()),
                vrb = static_cast<cl_long>(v_cache.row_bytes());
  const int group = H / Hkv;
  KESTREL_TRY(Args(k, "attention")
                  .mem(q.data)
                  .mem(k_cache.data)
                  .mem(v_cache.data)(kt)(vt)(krb)(vrb)(ring_dev_)(pos)(H)(group)(D)(p.scale)
                  .mem(out.data)
                  .status());
  const size_t global[2] = {static_cast<size_t>(H) * 64, static_cast<size_t>(n_tokens)};
  const size_t local[2] = {64, 1};
  return launch(k, "attention", 2, global, local);
}

}  // namespace kestrel::backend::opencl
