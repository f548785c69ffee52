// Matmul out[T][n_out] = x[T][n_in] . W[n_out][n_in]^T (+ bias): fused small-batch kernels that
// decode each weight block once in registers, and, for larger micro-batches, f16 row tiles of
// the dequantized weight multiplied on the tensor cores by cuBLAS.
#include <algorithm>

#include "backend/cuda/cuda_backend_impl.cuh"
#include "backend/cuda/octets.cuh"
#include "backend/cuda/quant_device.cuh"

namespace kestrel::backend::cuda {

namespace {

// Elements of the f16 weight tile dequantized per GEMM (64 Mi halfs = 128 MiB).
constexpr int64_t kTileElems = int64_t{1} << 26;

// Slice s (32 elements) of row r of a weight, in whichever layout load_weight gave it.
template <DType T>
__device__ __forceinline__ void weight_slice(const uint8_t* qs, const __half* d, int64_t n_in,
                                             int64_t r, int64_t s, float* w) {
  if constexpr (T == DType::Q4_0) {
    const int64_t nb = n_in / 32;
    const uint4 q = *reinterpret_cast<const uint4*>(qs + (r * nb + s) * 16);
    const float scale = __half2float(d[r * nb + s]);
    const uint32_t words[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
    for (int i = 0; i < 16; ++i) {
      const int byte = (words[i / 4] >> (8 * (i % 4))) & 255;
      w[i] = static_cast<float>((byte & 15) - 8) * scale;
      w[i + 16] = static_cast<float>((byte >> 4) - 8) * scale;
    }
  } else if constexpr (T == DType::Q8_0) {
    const int64_t nb = n_in / 32;
    const uint4* p = reinterpret_cast<const uint4*>(qs + (r * nb + s) * 32);
    const uint4 a = p[0], b = p[1];
    const uint32_t words[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
    const float scale = __half2float(d[r * nb + s]);
#pragma unroll
    for (int i = 0; i < 32; ++i)
      w[i] = static_cast<float>(static_cast<int8_t>((words[i / 4] >> (8 * (i % 4))) & 255)) * scale;
  } else {
    constexpr int64_t kElems = BlockOf<T>::elems, kBytes = BlockOf<T>::bytes;
    decode_slice<T>(qs + r * (n_in / kElems) * kBytes, s, w);
  }
}

template <DType T>
__global__ void dequant_octets_kernel(const uint8_t* qs, const __half* d, int64_t n_in,
                                      int64_t row0, int64_t n_rows, __half* out) {
  const int64_t octets = n_in / 8;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n_rows * octets) return;
  const int64_t r = i / octets, e0 = (i % octets) * 8;
  *reinterpret_cast<uint4*>(out + r * n_in + e0) =
      octet_to_f16<T>(load_raw_octet<T>(qs, d, n_in, row0 + r, e0), e0);
}

// The epilogue of the one-warp-per-row kernels: each token's partial sums reduced over the warp,
// out[t][r] = sum (+ bias[r]).
template <int kMaxTokens>
__device__ __forceinline__ void store_row_sums(const float* acc, int n_tokens, int lane, int64_t r,
                                               int64_t n_out, const float* bias, float* out) {
#pragma unroll
  for (int t = 0; t < kMaxTokens; ++t) {
    if (t < n_tokens) {
      const float v = warp_sum(acc[t]);
      if (lane == 0) out[t * n_out + r] = v + (bias ? bias[r] : 0.0f);
    }
  }
}

// Small batches, fast types: one warp per output row, each lane an octet of every 256 elements;
// kAhead octets per lane are loaded before any is used (decode reads each weight once and is
// bound by how many loads are in flight).
template <DType T, int kMaxTokens>
__global__ void __launch_bounds__(128)
    matvec_octets_kernel(const uint8_t* qs, const __half* d, int64_t n_in, int64_t n_out,
                         const float* x, int n_tokens, float* out, const float* bias) {
  constexpr int kAhead = 8;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * 4 + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (r >= n_out) return;
  float acc[kMaxTokens];
#pragma unroll
  for (int t = 0; t < kMaxTokens; ++t) acc[t] = 0.0f;
  for (int64_t base = 8 * lane; base < n_in; base += 256 * kAhead) {
    uint4 raw[kAhead];
#pragma unroll
    for (int u = 0; u < kAhead; ++u) {
      const int64_t e0 = base + 256 * u;
      raw[u] = e0 < n_in ? load_raw_octet<T>(qs, d, n_in, r, e0) : make_uint4(0, 0, 0, 0);
    }
#pragma unroll
    for (int u = 0; u < kAhead; ++u) {
      const int64_t e0 = base + 256 * u;
      if (e0 >= n_in) break;
      float w[8];
      decode_raw_octet<T>(raw[u], e0, w);
#pragma unroll
      for (int t = 0; t < kMaxTokens; ++t) {
        if (t < n_tokens) {
          const float4* xv = reinterpret_cast<const float4*>(x + t * n_in + e0);
          const float4 a = __ldg(xv), b = __ldg(xv + 1);
          acc[t] += w[0] * a.x + w[1] * a.y + w[2] * a.z + w[3] * a.w + w[4] * b.x + w[5] * b.y +
                    w[6] * b.z + w[7] * b.w;
        }
      }
    }
  }
  store_row_sums<kMaxTokens>(acc, n_tokens, lane, r, n_out, bias, out);
}

// One thread per 32-element slice of rows [row0, row0 + n_rows): f16 out[n_rows][n_in].
template <DType T>
__global__ void dequant_f16_kernel(const uint8_t* qs, const __half* d, int64_t n_in, int64_t row0,
                                   int64_t n_rows, __half* out) {
  const int64_t slices = n_in / 32;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n_rows * slices) return;
  const int64_t r = i / slices, s = i % slices;
  float w[32];
  weight_slice<T>(qs, d, n_in, row0 + r, s, w);
  __half2 h[16];
#pragma unroll
  for (int j = 0; j < 16; ++j) h[j] = __floats2half2_rn(w[2 * j], w[2 * j + 1]);
  uint4* dst = reinterpret_cast<uint4*>(out + r * n_in + 32 * s);
  const uint4* src = reinterpret_cast<const uint4*>(h);
#pragma unroll
  for (int j = 0; j < 4; ++j) dst[j] = src[j];
}

__global__ void to_f16_kernel(const float* x, int64_t n, __half* out) {
  const int64_t i = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * 4;
  if (i + 3 < n) {
    const float4 v = *reinterpret_cast<const float4*>(x + i);
    reinterpret_cast<__half2*>(out + i)[0] = __floats2half2_rn(v.x, v.y);
    reinterpret_cast<__half2*>(out + i)[1] = __floats2half2_rn(v.z, v.w);
  } else {
    for (int64_t j = i; j < n; ++j) out[j] = __float2half_rn(x[j]);
  }
}

__global__ void add_bias_kernel(float* out, const float* bias, int64_t n, int64_t total) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < total) out[i] += bias[i % n];
}

// Small batches: one warp per output row; each lane decodes whole 32-element slices (strided by
// the warp) and multiplies them with every token's activations, so the weight is read once.
template <DType T, int kMaxTokens>
__global__ void __launch_bounds__(128)
    matmul_small_kernel(const uint8_t* qs, const __half* d, int64_t n_in, int64_t n_out,
                        const float* x, int n_tokens, float* out, const float* bias) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * 4 + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (r >= n_out) return;
  float acc[kMaxTokens];
#pragma unroll
  for (int t = 0; t < kMaxTokens; ++t) acc[t] = 0.0f;
  const int64_t slices = n_in / 32;
  // Unrolled so that several weight loads are in flight per lane (decode is latency-bound).
#pragma unroll 4
  for (int64_t s = lane; s < slices; s += 32) {
    float w[32];
    weight_slice<T>(qs, d, n_in, r, s, w);
#pragma unroll
    for (int t = 0; t < kMaxTokens; ++t) {
      if (t < n_tokens) {
        const float4* xv = reinterpret_cast<const float4*>(x + t * n_in + 32 * s);
        float sum = 0.0f;
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          const float4 v = __ldg(xv + j);
          sum += w[4 * j] * v.x + w[4 * j + 1] * v.y + w[4 * j + 2] * v.z + w[4 * j + 3] * v.w;
        }
        acc[t] += sum;
      }
    }
  }
  store_row_sums<kMaxTokens>(acc, n_tokens, lane, r, n_out, bias, out);
}

template <DType T>
void launch_matvec_octets(const CudaWeight& w, const float* x, int n_tokens, float* out,
                          const float* bias, cudaStream_t s) {
  const int blocks = ceil_div(w.n_out, 4);
  if (n_tokens <= 1)
    matvec_octets_kernel<T, 1>
        <<<blocks, 128, 0, s>>>(w.qs, w.d, w.n_in, w.n_out, x, n_tokens, out, bias);
  else if (n_tokens <= 4)
    matvec_octets_kernel<T, 4>
        <<<blocks, 128, 0, s>>>(w.qs, w.d, w.n_in, w.n_out, x, n_tokens, out, bias);
  else
    matvec_octets_kernel<T, kSmallBatch>
        <<<blocks, 128, 0, s>>>(w.qs, w.d, w.n_in, w.n_out, x, n_tokens, out, bias);
}

}  // namespace

Status launch_dequant_f16(DType t, const uint8_t* qs, const __half* d, int64_t n_in, int64_t row0,
                          int64_t n_rows, __half* out, cudaStream_t s) {
  const int threads = 256;
  if (has_octets(t)) {
    const int blocks = ceil_div(n_rows * (n_in / 8), threads);
    if (t == DType::Q4_0)
      dequant_octets_kernel<DType::Q4_0><<<blocks, threads, 0, s>>>(qs, d, n_in, row0, n_rows, out);
    else if (t == DType::Q8_0)
      dequant_octets_kernel<DType::Q8_0><<<blocks, threads, 0, s>>>(qs, d, n_in, row0, n_rows, out);
    else
      dequant_octets_kernel<DType::F16><<<blocks, threads, 0, s>>>(qs, d, n_in, row0, n_rows, out);
    LAUNCH_CHECK("matmul (dequantize weight tile)");
    return Status::ok();
  }
  const int64_t n = n_rows * (n_in / 32);
  bool ok;
  KESTREL_CUDA_FOR_TYPE(t, ok,
                        dequant_f16_kernel<K>
                        <<<ceil_div(n, threads), threads, 0, s>>>(qs, d, n_in, row0, n_rows, out));
  if (!ok) return error("dequantize: type %s is not supported on CUDA", quant::type_name(t));
  LAUNCH_CHECK("matmul (dequantize weight tile)");
  return Status::ok();
}

Status launch_to_f16(const float* x, int64_t n, __half* out, cudaStream_t s) {
  const int threads = 256;
  to_f16_kernel<<<ceil_div(ceil_div(n, 4), threads), threads, 0, s>>>(x, n, out);
  LAUNCH_CHECK("convert activations to f16");
  return Status::ok();
}

Status launch_add_bias(float* out, const float* bias, int n_tokens, int64_t n, cudaStream_t s) {
  const int64_t total = n * n_tokens;
  add_bias_kernel<<<ceil_div(total, 256), 256, 0, s>>>(out, bias, n, total);
  LAUNCH_CHECK("matmul (bias)");
  return Status::ok();
}

Status launch_matmul_small(const CudaWeight& w, const float* x, int n_tokens, float* out,
                           const float* bias, cudaStream_t s) {
  const int blocks = ceil_div(w.n_out, 4);
  bool ok;
  if (has_octets(w.type)) {
    if (w.type == DType::Q4_0)
      launch_matvec_octets<DType::Q4_0>(w, x, n_tokens, out, bias, s);
    else if (w.type == DType::Q8_0)
      launch_matvec_octets<DType::Q8_0>(w, x, n_tokens, out, bias, s);
    else
      launch_matvec_octets<DType::F16>(w, x, n_tokens, out, bias, s);
    LAUNCH_CHECK("matmul (small batch)");
    return Status::ok();
  }
  if (n_tokens <= 1)
    KESTREL_CUDA_FOR_TYPE(w.type, ok,
                          matmul_small_kernel<K, 1><<<blocks, 128, 0, s>>>(
                              w.qs, w.d, w.n_in, w.n_out, x, n_tokens, out, bias));
  else if (n_tokens <= 4)
    KESTREL_CUDA_FOR_TYPE(w.type, ok,
                          matmul_small_kernel<K, 4><<<blocks, 128, 0, s>>>(
                              w.qs, w.d, w.n_in, w.n_out, x, n_tokens, out, bias));
  else
    KESTREL_CUDA_FOR_TYPE(w.type, ok,
                          matmul_small_kernel<K, kSmallBatch><<<blocks, 128, 0, s>>>(
                              w.qs, w.d, w.n_in, w.n_out, x, n_tokens, out, bias));
  if (!ok) return error("matmul: type %s is not supported on CUDA", quant::type_name(w.type));
  LAUNCH_CHECK("matmul (small batch)");
  return Status::ok();
}

namespace {

Status check_matmul_shapes(const CudaWeight& w, const Tensor& x, int n_tokens, const Tensor& out) {
  if (x.cols != w.n_in || out.cols != w.n_out || n_tokens > x.rows || n_tokens > out.rows)
    return error("matmul '%s': shapes do not match (x %lld x %lld, weight %lld x %lld, out %lld)",
                 w.name.c_str(), static_cast<long long>(n_tokens), static_cast<long long>(x.cols),
                 static_cast<long long>(w.n_out), static_cast<long long>(w.n_in),
                 static_cast<long long>(out.cols));
  return Status::ok();
}

}  // namespace

// Q, K and V (or gate and up) in one launch when all of them take the dp4a path (decode), the
// fragment path (5-16 tokens) or the wgmma path (prompt chunks) with one weight type: seven
// matmuls per layer become four launches, and the grids fill the GPU with fewer tails.
Status CudaBackend::matmul_group(const Tensor& x, int n_tokens, const MatmulOut* outs, int n_outs) {
  return matmul_group_launch(x, n_tokens, outs, n_outs, nullptr);
}

Status CudaBackend::matmul_group_launch(const Tensor& x, int n_tokens, const MatmulOut* outs,
                                        int n_outs, const Stream16Rope* rope) {
  const auto& w0 = static_cast<const CudaWeight&>(*outs[0].w);
  const MatmulPath path = matmul_path(w0.type, w0.n_in, n_tokens);
  bool one_launch = group_matmuls_ && n_outs >= 2 && n_outs <= kMatvecMaxParts &&
                    (path == MatmulPath::kInt8 || path == MatmulPath::kFrag ||
                     (path == MatmulPath::kWgmma && group_wgmma_));
  for (int i = 0; i < n_outs && one_launch; ++i) {
    const MatmulOut& m = outs[i];
    const auto& w = static_cast<const CudaWeight&>(*m.w);
    one_launch = w.type == w0.type && w.n_in == w0.n_in && m.out->data != x.data;
  }
  if (rope && (!one_launch || path != MatmulPath::kFrag))
    return error("matmul+rope+kv_store: the projections do not take the fused launch");
  if (!one_launch) return Backend::matmul_group(x, n_tokens, outs, n_outs);
  MatvecPart parts[kMatvecMaxParts];
  const float* xp = static_cast<const float*>(x.data);
  KESTREL_TRY(check_planes_only(w0, xp, n_tokens, path));
  const int64_t n_in = static_cast<const CudaWeight&>(*outs[0].w).n_in;
  for (int i = 0; i < n_outs; ++i) {
    const auto& w = static_cast<const CudaWeight&>(*outs[i].w);
    KESTREL_TRY(check_matmul_shapes(w, x, n_tokens, *outs[i].out));
    parts[i] = {&w, static_cast<float*>(outs[i].out->data),
                outs[i].bias ? static_cast<const float*>(outs[i].bias->data) : nullptr};
  }
  if (path == MatmulPath::kFrag || path == MatmulPath::kWgmma) {
    const bool x16_held = x16_.holds(xp, n_tokens, n_in);
    x16_ = {true, xp, n_tokens, n_in};
    for (int i = 0; i < n_outs; ++i) {
      if (parts[i].out == acts_.x) acts_.valid = false;
      if (parts[i].out == x16_.x) x16_.valid = false;
    }
    if (n_tokens <= 0 || mode_ == Mode::Stage) return Status::ok();
    if (path == MatmulPath::kFrag)
      return matmul_frag(xp, n_tokens, n_in, x16_held, parts, n_outs, rope);
    KESTREL_ASSIGN_OR_RETURN(const __half* x16, f16_activations(xp, n_tokens, n_in, x16_held));
    return launch_matmul_wgmma(*wgmma_maps_, parts, n_outs, x16, n_tokens, sm_count_, stream_);
  }
  const bool int8_held = acts_.holds(xp, n_tokens, n_in);
  const int planes = hold_int8(xp, n_tokens, n_in, int8_held);
  for (int i = 0; i < n_outs; ++i)
    if (parts[i].out == x16_.x) x16_.valid = false;
  if (n_tokens <= 0 || mode_ == Mode::Stage) return Status::ok();
  return matvec_int8(xp, n_tokens, n_in, int8_held, parts, n_outs, planes);
}

Status CudaBackend::matmul_frag(const float* x, int n_tokens, int64_t n_in, bool held,
                                const MatvecPart* parts, int n_parts, const Stream16Rope* rope) {
  if (lab_skips("matmul")) return Status::ok();
  KESTREL_ASSIGN_OR_RETURN(const __half* x16, f16_activations(x, n_tokens, n_in, held));
  if (stream16_) {
    const Stream16Plan plan = stream16_plan(parts, n_parts, n_tokens, sm_count_, smem_optin_);
    if (plan.splits > 0)
      return launch_matmul_stream16(*wgmma_maps_, parts, n_parts, x16, n_tokens, plan,
                                    stream16_timing_, stream_, rope);
  }
  if (rope) return error("matmul+rope+kv_store: no stream16 launch for the projections");
  const int row_blocks = frag_v2_row_blocks(parts, n_parts);
  float* partial = nullptr;
  unsigned* arrivals = nullptr;
  if (const int splits = frag_v2_splits(n_in, row_blocks); splits > 1) {
    int64_t n_out = 0;
    for (int i = 0; i < n_parts; ++i) n_out += parts[i].w->n_out;
    KESTREL_ASSIGN_OR_RETURN(void* p, scratch(kPartial, sizeof(float) * splits * n_tokens * n_out));
    partial = static_cast<float*>(p);
    KESTREL_ASSIGN_OR_RETURN(arrivals, arrival_counters(row_blocks));
  }
  return launch_matmul_frag_v2(parts, n_parts, x16, n_tokens, partial, arrivals, stream_);
}

Status CudaBackend::matvec_int8(const float* x, int n_tokens, int64_t n_in, bool held,
                                const MatvecPart* parts, int n_parts, int planes) {
  KESTREL_ASSIGN_OR_RETURN(const QuantizedActs acts,
                           int8_activations(x, n_tokens, n_in, held, planes));
  if (lab_skips("matmul")) return Status::ok();
  if (!held) KESTREL_TRY(launch_quantize_acts(x, n_tokens, n_in, acts, stream_));
  if (matvec_stream_ && n_tokens == 1 && !acts.row_ss &&
      matvec_stream_takes(*parts[0].w, smem_optin_)) {
    KESTREL_ASSIGN_OR_RETURN(unsigned* counters, matvec_stream_counters());
    bool launched = false;
    KESTREL_TRY(launch_matvec_stream(parts, n_parts, MatvecStreamInput{acts}, counters, sm_count_,
                                     smem_optin_, stream_, launched));
    if (launched) return Status::ok();
  }
  return launch_matvec_int8(parts, n_parts, acts, n_tokens, stream_);
}

Expected<QuantizedActs> CudaBackend::int8_activations(const float* x, int n_tokens, int64_t n_in,
                                                      bool held, int planes) {
  KESTREL_ASSIGN_OR_RETURN(void* buf, scratch(planes, QuantizedActs::bytes(n_tokens, n_in)));
  QuantizedActs a = QuantizedActs::in(buf, n_tokens, n_in);
  if (held && acts_.holds(x, n_tokens, n_in)) {
    a.row_ss = acts_.row_ss;
    a.eps = acts_.eps;
  }
  return a;
}

int CudaBackend::hold_int8(const float* x, int n_tokens, int64_t k, bool held) {
  ActivationSource a{true, x, n_tokens, k, held ? acts_.slot : kActs};
  if (held) {
    a.row_ss = acts_.row_ss;
    a.eps = acts_.eps;
  }
  acts_ = a;
  return a.slot;
}

Status CudaBackend::check_planes_only(const CudaWeight& w, const float* x, int n_tokens,
                                      MatmulPath path) const {
  if (path != MatmulPath::kInt8 && acts_.holds(x, n_tokens, w.n_in) && acts_.row_ss)
    return error(
        "matmul '%s': its input exists only as decode's int8 planes "
        "(matmul_add_rms_norm wrote it for other matmuls)",
        w.name.c_str());
  return Status::ok();
}

Expected<unsigned*> CudaBackend::matvec_stream_counters() {
  const int pairs = matvec_stream_counter_pairs();
  KESTREL_ASSIGN_OR_RETURN(unsigned* counters, arrival_counters(2 * pairs, kStreamTickets));
  matvec_stream_slot_ = (matvec_stream_slot_ + 1) % pairs;
  return counters + 2 * matvec_stream_slot_;
}

bool CudaBackend::fuses_swiglu_matmul(const Weight& weight, int n_tokens) const {
  const auto& w = static_cast<const CudaWeight&>(weight);
  return fused_swiglu_ && matvec_stream_ && n_tokens == 1 &&
         matmul_path(w.type, w.n_in, n_tokens) == MatmulPath::kInt8 &&
         matvec_stream_takes(w, smem_optin_);
}

// The stream kernel reads gate and up and quantizes silu(gate) * up itself (the bytes SwiGLU
// would have written); gate is left as it was.
Status CudaBackend::swiglu_matmul(Tensor& gate, const Tensor& up, int n_tokens,
                                  const Weight& weight, Tensor& out) {
  if (!fuses_swiglu_matmul(weight, n_tokens))
    return Backend::swiglu_matmul(gate, up, n_tokens, weight, out);
  const auto& w = static_cast<const CudaWeight&>(weight);
  KESTREL_TRY(check_matmul_shapes(w, gate, n_tokens, out));
  if (up.cols != gate.cols || up.rows < n_tokens)
    return error("swiglu+matmul '%s': up (%lld x %lld) does not match gate (%lld columns)",
                 w.name.c_str(), static_cast<long long>(up.rows), static_cast<long long>(up.cols),
                 static_cast<long long>(gate.cols));
  forget_activations();
  KESTREL_ASSIGN_OR_RETURN(unsigned* counters, matvec_stream_counters());
  if (mode_ == Mode::Stage) return Status::ok();
  const MatvecPart part{&w, static_cast<float*>(out.data), nullptr};
  MatvecStreamInput in;
  in.gate = static_cast<const float*>(gate.data);
  in.up = static_cast<const float*>(up.data);
  bool launched = false;
  KESTREL_TRY(
      launch_matvec_stream(&part, 1, in, counters, sm_count_, smem_optin_, stream_, launched));
  if (!launched)
    return error("swiglu+matmul '%s': the stream kernel did not take it", w.name.c_str());
  return Status::ok();
}

bool CudaBackend::fuses_matmul_swiglu(const Weight& w_gate, const Weight& w_up,
                                      int n_tokens) const {
  const auto& g = static_cast<const CudaWeight&>(w_gate);
  const auto& u = static_cast<const CudaWeight&>(w_up);
  return matmul_swiglu_ && fuse_inputs_ && n_tokens == 1 &&
         matmul_path(g.type, g.n_in, n_tokens) == MatmulPath::kInt8 &&
         matmul_path(DType::Q4_0, g.n_out, n_tokens) == MatmulPath::kInt8 &&
         matvec_swiglu_fits(g, u);
}

// x's planes are read from one scratch while silu(gate) * up is written as the down projection's
// planes into the other (kActs / kActs2 in turn): the launch's early blocks finish their
// epilogues while later ones still read x's.
Status CudaBackend::matmul_swiglu(const Tensor& x, int n_tokens, const Weight& w_gate,
                                  const Weight& w_up, Tensor& gate, Tensor& up) {
  if (!fuses_matmul_swiglu(w_gate, w_up, n_tokens))
    return Backend::matmul_swiglu(x, n_tokens, w_gate, w_up, gate, up);
  const auto& g = static_cast<const CudaWeight&>(w_gate);
  const auto& u = static_cast<const CudaWeight&>(w_up);
  KESTREL_TRY(check_matmul_shapes(g, x, n_tokens, gate));
  KESTREL_TRY(check_matmul_shapes(u, x, n_tokens, up));
  if (gate.data == x.data || up.data == x.data || gate.data == up.data)
    return error("matmul+swiglu '%s': x, gate and up must be three buffers", g.name.c_str());
  const float* xp = static_cast<const float*>(x.data);
  const bool held = acts_.holds(xp, n_tokens, g.n_in);
  const int planes = held ? acts_.slot : kActs;
  KESTREL_ASSIGN_OR_RETURN(const QuantizedActs in,
                           int8_activations(xp, n_tokens, g.n_in, held, planes));
  forget_activations();
  float* gp = static_cast<float*>(gate.data);
  KESTREL_ASSIGN_OR_RETURN(
      const MatmulInputOut also,
      fused_matmul_input(gp, n_tokens, g.n_out, planes == kActs ? kActs2 : kActs));
  KESTREL_ASSIGN_OR_RETURN(unsigned* arrivals,
                           arrival_counters(static_cast<int>(g.n_out / 32), kSwigluArrivals));
  if (mode_ == Mode::Stage || lab_skips("matmul")) return Status::ok();
  if (!held) KESTREL_TRY(launch_quantize_acts(xp, n_tokens, g.n_in, in, stream_));
  const MatvecPart parts[2] = {{&g, gp, nullptr}, {&u, static_cast<float*>(up.data), nullptr}};
  return launch_matvec_swiglu(parts, in, arrivals, also, stream_);
}

bool CudaBackend::add_norm_producer(const CudaWeight& w, int n_tokens) const {
  return matmul_add_norm_ && fuse_inputs_ && n_tokens == 1 &&
         matmul_path(w.type, w.n_in, n_tokens) == MatmulPath::kInt8 && matvec_add_norm_fits(w) &&
         matmul_path(DType::Q4_0, w.n_out, n_tokens) == MatmulPath::kInt8;
}

bool CudaBackend::fuses_matmul_add_rms_norm(const Weight& weight, int n_tokens,
                                            const Weight* const* next, int n_next) const {
  const auto& w = static_cast<const CudaWeight&>(weight);
  if (n_next < 1 || !add_norm_producer(w, n_tokens)) return false;
  // Every reader must take the planes on the K-split matvec (the kernel that applies the row
  // scale): not the stream kernel, which would otherwise take its rows.
  for (int i = 0; i < n_next; ++i) {
    const auto& r = static_cast<const CudaWeight&>(*next[i]);
    if (r.n_in != w.n_out || matmul_path(r.type, r.n_in, n_tokens) != MatmulPath::kInt8 ||
        !matvec_add_norm_fits(r) || (matvec_stream_ && matvec_stream_takes(r, smem_optin_)))
      return false;
  }
  return true;
}

// The product is added into x by the matvec itself (proj is not written: the K-split kernel, or
// the weight stream for the rows it takes); the last writer of
// each 32-row block of x writes its planes of x * weight (into the other planes buffer: the
// launch still reads in's) and its sum of squares, and out is remembered as those planes with
// their row scale still to apply (acts_.row_ss): its f32 rows are not written.
Status CudaBackend::matmul_add_rms_norm(const Weight& weight, const Tensor& in, int n_tokens,
                                        Tensor& proj, Tensor& x, const Tensor& norm_weight,
                                        float eps, Tensor& out) {
  const auto& w = static_cast<const CudaWeight&>(weight);
  if (!add_norm_producer(w, n_tokens))
    return Backend::matmul_add_rms_norm(weight, in, n_tokens, proj, x, norm_weight, eps, out);
  KESTREL_TRY(check_matmul_shapes(w, in, n_tokens, x));
  KESTREL_TRY(check_matmul_shapes(w, in, n_tokens, out));
  if (norm_weight.cols != w.n_out)
    return error("matmul+add_rms_norm '%s': the norm weight has %lld values for rows of %lld",
                 w.name.c_str(), static_cast<long long>(norm_weight.cols),
                 static_cast<long long>(w.n_out));
  if (in.data == x.data || in.data == out.data || x.data == out.data)
    return error("matmul+add_rms_norm '%s': in, x and out must be three buffers", w.name.c_str());
  const float* ip = static_cast<const float*>(in.data);
  const bool held = acts_.holds(ip, n_tokens, w.n_in);
  const int planes = held ? acts_.slot : kActs;
  KESTREL_ASSIGN_OR_RETURN(const QuantizedActs in_acts,
                           int8_activations(ip, n_tokens, w.n_in, held, planes));
  forget_activations();
  float* op = static_cast<float*>(out.data);
  AddNormOut o;
  KESTREL_ASSIGN_OR_RETURN(
      o.planes, fused_matmul_input(op, n_tokens, w.n_out, planes == kActs ? kActs2 : kActs));
  const int blocks = static_cast<int>(w.n_out / 32);
  KESTREL_ASSIGN_OR_RETURN(void* ss, scratch(kNormSums, sizeof(float) * blocks));
  KESTREL_ASSIGN_OR_RETURN(o.arrivals, arrival_counters(blocks, kNormArrivals));
  o.x = static_cast<float*>(x.data);
  o.weight = static_cast<const float*>(norm_weight.data);
  o.ss = static_cast<float*>(ss);
  acts_.row_ss = o.ss;
  acts_.eps = eps;
  // Rows of 256-512 blocks (ffn down) on the weight stream, as matvec_int8 would run them.
  const bool stream = matvec_stream_ && !in_acts.row_ss && matvec_stream_takes(w, smem_optin_);
  unsigned* counters = nullptr;
  if (stream) {
    KESTREL_ASSIGN_OR_RETURN(counters, matvec_stream_counters());
  }
  if (mode_ == Mode::Stage || lab_skips("matmul")) return Status::ok();
  if (!held) KESTREL_TRY(launch_quantize_acts(ip, n_tokens, w.n_in, in_acts, stream_));
  if (stream) {
    MatvecStreamInput si{in_acts};
    si.add_norm = o;
    const MatvecPart part{&w, o.x, nullptr};
    bool launched = false;
    KESTREL_TRY(
        launch_matvec_stream(&part, 1, si, counters, sm_count_, smem_optin_, stream_, launched));
    if (launched) return Status::ok();
  }
  return launch_matvec_add_norm(MatvecPart{&w, nullptr, nullptr}, in_acts, o, stream_);
}

Status CudaBackend::matmul(const Weight& weight, const Tensor& x, int n_tokens, Tensor& out,
                           const Tensor* bias) {
  const auto& w = static_cast<const CudaWeight&>(weight);
  KESTREL_TRY(check_matmul_shapes(w, x, n_tokens, out));
  const float* b = bias ? static_cast<const float*>(bias->data) : nullptr;
  const float* xp = static_cast<const float*>(x.data);
  float* op = static_cast<float*>(out.data);
  const MatmulPath path = matmul_path(w.type, w.n_in, n_tokens);
  // Which converted copy of x the path reads (the GEMM path: f16 for quantized weights, f16
  // hi + lo parts written over kX16 for F16 weights, f32 itself for F32), and whether the
  // scratch already holds it.
  const bool reads_x16 =
      path == MatmulPath::kFrag || path == MatmulPath::kMma || path == MatmulPath::kWgmma ||
      (path == MatmulPath::kGemm && w.type != DType::F32 && w.type != DType::F16);
  KESTREL_TRY(check_planes_only(w, xp, n_tokens, path));
  const bool int8_held = acts_.holds(xp, n_tokens, w.n_in);
  const int planes = int8_held ? acts_.slot : kActs;
  const bool x16_held = x16_.holds(xp, n_tokens, w.n_in);
  if (path == MatmulPath::kInt8) hold_int8(xp, n_tokens, w.n_in, int8_held);
  if (reads_x16) x16_ = {true, xp, n_tokens, w.n_in};
  if (path == MatmulPath::kGemm && w.type == DType::F16) x16_.valid = false;
  if (op == acts_.x) acts_.valid = false;
  if (op == x16_.x) x16_.valid = false;
  if (n_tokens <= 0 || mode_ == Mode::Stage) return Status::ok();
  switch (path) {
    case MatmulPath::kFrag: {
      const MatvecPart part{&w, op, b};
      return matmul_frag(xp, n_tokens, w.n_in, x16_held, &part, 1);
    }
    case MatmulPath::kInt8: {
      const MatvecPart part{&w, op, b};
      return matvec_int8(xp, n_tokens, w.n_in, int8_held, &part, 1, planes);
    }
    case MatmulPath::kSmall:
      return launch_matmul_small(w, xp, n_tokens, op, b, stream_);
    case MatmulPath::kMma: {
      KESTREL_ASSIGN_OR_RETURN(const __half* x16, f16_activations(xp, n_tokens, w.n_in, x16_held));
      float* partial = nullptr;
      if (const int splits = mma_splits(w); splits > 1) {
        KESTREL_ASSIGN_OR_RETURN(void* p,
                                 scratch(kPartial, sizeof(float) * splits * n_tokens * w.n_out));
        partial = static_cast<float*>(p);
      }
      return launch_matmul_mma(w, x16, n_tokens, op, b, partial, stream_);
    }
    case MatmulPath::kWgmma: {
      KESTREL_ASSIGN_OR_RETURN(const __half* x16, f16_activations(xp, n_tokens, w.n_in, x16_held));
      const MatvecPart part{&w, op, b};
      return launch_matmul_wgmma(*wgmma_maps_, &part, 1, x16, n_tokens, sm_count_, stream_);
    }
    case MatmulPath::kGemm:
      break;
  }
  return matmul_gemm(w, xp, n_tokens, op, b, x16_held);
}

MatmulPath CudaBackend::matmul_path(DType type, int64_t n_in, int n_tokens) const {
  if (frag_supports(type, n_in, n_tokens) && !frag_disabled_) return MatmulPath::kFrag;
  if (int8_matvec_supports(type, n_in, n_tokens) && !int8_disabled_) return MatmulPath::kInt8;
  if (n_tokens <= kSmallBatch) return MatmulPath::kSmall;
  if (mma_supports(type, n_in, n_tokens) && !mma_disabled_) return MatmulPath::kMma;
  if (wgmma_ && wgmma_supports(type, n_in, n_tokens)) return MatmulPath::kWgmma;
  return MatmulPath::kGemm;
}

Expected<MatmulInputOut> CudaBackend::fused_matmul_input(const float* out, int n_tokens, int64_t k,
                                                         int planes) {
  MatmulInputOut m;
  if (!fuse_inputs_ || n_tokens <= 0 || k % 32 != 0) return m;
  switch (matmul_path(DType::Q4_0, k, n_tokens)) {
    case MatmulPath::kInt8: {
      KESTREL_ASSIGN_OR_RETURN(void* buf, scratch(planes, QuantizedActs::bytes(n_tokens, k)));
      acts_ = {true, out, n_tokens, k, planes};
      return QuantizedActs::in(buf, n_tokens, k).as_output();
    }
    case MatmulPath::kFrag:
    case MatmulPath::kMma:
    case MatmulPath::kWgmma:
    case MatmulPath::kGemm: {
      KESTREL_ASSIGN_OR_RETURN(void* buf, scratch(kX16, sizeof(__half) * n_tokens * k));
      m.x16 = static_cast<__half*>(buf);
      x16_ = {true, out, n_tokens, k};
      return m;
    }
    case MatmulPath::kSmall:
      break;
  }
  return m;
}

Expected<const __half*> CudaBackend::f16_activations(const float* x, int n_tokens, int64_t k,
                                                     bool held) {
  const size_t bytes = sizeof(__half) * n_tokens * k;
  const bool grows = scratch_[kX16].second < bytes;  // a new buffer holds nothing yet
  KESTREL_ASSIGN_OR_RETURN(void* buf, scratch(kX16, bytes));
  auto* x16 = static_cast<__half*>(buf);
  if (!held || grows) KESTREL_TRY(launch_to_f16(x, int64_t{n_tokens} * k, x16, stream_));
  return static_cast<const __half*>(x16);
}

Expected<unsigned*> CudaBackend::arrival_counters(int n, int slot) {
  const size_t bytes = sizeof(unsigned) * n;
  const bool grows = scratch_[slot].second < bytes;
  KESTREL_ASSIGN_OR_RETURN(void* buf, scratch(slot, bytes));
  if (grows) CUDA_TRY(cudaMemsetAsync(buf, 0, bytes, stream_), "matmul (split counters)");
  return static_cast<unsigned*>(buf);
}

// Row-major out[T][n_out] is column-major out^T (n_out x T); the weight rows [n_out][n_in] are
// column-major W^T (n_in x n_out), so out^T = op_T(W^T) . x^T with x^T column-major (n_in x T).
Status CudaBackend::matmul_gemm(const CudaWeight& w, const float* x, int n_tokens, float* out,
                                const float* bias, bool x16_held) {
  const int64_t n_in = w.n_in, n_out = w.n_out;
  const float one = 1.0f, zero = 0.0f;
  cublasStatus_t st;
  if (w.type == DType::F32) {
    st = cublasSgemm(cublas_, CUBLAS_OP_T, CUBLAS_OP_N, n_out, n_tokens, n_in, &one,
                     reinterpret_cast<const float*>(w.qs), n_in, x, n_in, &zero, out, n_out);
    if (st != CUBLAS_STATUS_SUCCESS)
      return error("matmul '%s': cuBLAS SGEMM failed (status %d)", w.name.c_str(), st);
  } else if (w.type == DType::F16) {
    // F16 weights are exact in f16; the activations are split into f16 hi + lo parts so that
    // the product is as exact as f32 (two tensor-core GEMMs): the f16 models are the ones
    // judged with the tightest bounds (and exact rounding of a quantized KV cache).
    const int64_t n = static_cast<int64_t>(n_tokens) * n_in;
    KESTREL_ASSIGN_OR_RETURN(void* x16v, scratch(kX16, 2 * sizeof(__half) * n));
    auto* x_hi = static_cast<__half*>(x16v);
    KESTREL_TRY(launch_split_f16(x, n, x_hi, x_hi + n, stream_));
    for (int part = 0; part < 2; ++part) {
      const float beta = part == 0 ? 0.0f : 1.0f;
      st = cublasGemmEx(cublas_, CUBLAS_OP_T, CUBLAS_OP_N, n_out, n_tokens, n_in, &one, w.qs,
                        CUDA_R_16F, n_in, x_hi + part * n, CUDA_R_16F, n_in, &beta, out, CUDA_R_32F,
                        n_out, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
      if (st != CUBLAS_STATUS_SUCCESS)
        return error("matmul '%s': cuBLAS GEMM failed (status %d)", w.name.c_str(), st);
    }
  } else {
    KESTREL_ASSIGN_OR_RETURN(const __half* x16, f16_activations(x, n_tokens, n_in, x16_held));
    const bool whole = n_out * n_in <= kTileElems;
    // The order of GEMM-path weights, for the prefetch of the next one.
    if (whole) {
      if (last_gemm_) next_[last_gemm_] = w.id;
      last_gemm_ = w.id;
    }
    int b = tiles_[0].holds == w.id ? 0 : tiles_[1].holds == w.id ? 1 : -1;
    const bool prefetched = whole && b >= 0;
    if (!prefetched) b = 1 - last_tile_;
    last_tile_ = b;
    const int64_t tile_rows = whole ? n_out : std::max<int64_t>(1, kTileElems / n_in);
    KESTREL_ASSIGN_OR_RETURN(TileBuffer * tb, tile_buffer(b, tile_rows * n_in));
    // The buffer's last dequantization (a prefetch on the aux stream) must be complete.
    CUDA_TRY(cudaStreamWaitEvent(stream_, tb->ready, 0), "matmul (wait for the weight tile)");
    tb->holds = 0;
    for (int64_t r0 = 0; r0 < n_out; r0 += tile_rows) {
      const int64_t rows = std::min(tile_rows, n_out - r0);
      if (!prefetched)
        KESTREL_TRY(launch_dequant_f16(w.type, w.qs, w.d, n_in, r0, rows, tb->ptr, stream_));
      st = cublasGemmEx(cublas_, CUBLAS_OP_T, CUBLAS_OP_N, rows, n_tokens, n_in, &one, tb->ptr,
                        CUDA_R_16F, n_in, x16, CUDA_R_16F, n_in, &zero, out + r0, CUDA_R_32F, n_out,
                        CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
      if (st != CUBLAS_STATUS_SUCCESS)
        return error("matmul '%s': cuBLAS GEMM failed (status %d)", w.name.c_str(), st);
    }
    if (whole) tb->holds = w.id;
    CUDA_TRY(cudaEventRecord(tb->free, stream_), "matmul (tile release)");
    if (whole) KESTREL_TRY(prefetch_next(w.id));
  }
  if (bias) KESTREL_TRY(launch_add_bias(out, bias, n_tokens, n_out, stream_));
  return Status::ok();
}

// Buffer i with room for `elems` halfs; growing it waits for both streams first.
Expected<CudaBackend::TileBuffer*> CudaBackend::tile_buffer(int i, int64_t elems) {
  TileBuffer& t = tiles_[i];
  if (t.elems >= elems) return &t;
  CUDA_TRY(cudaStreamSynchronize(stream_), "weight tile resize");
  CUDA_TRY(cudaStreamSynchronize(aux_), "weight tile resize");
  if (t.ptr) device_free(t.ptr);
  t.ptr = nullptr;
  t.elems = 0;
  t.holds = 0;
  KESTREL_ASSIGN_OR_RETURN(void* p, device_alloc(sizeof(__half) * elems, "f16 weight tiles"));
  t.ptr = static_cast<__half*>(p);
  t.elems = elems;
  return &t;
}

// Dequantizes the weight that followed `current` last time into the other tile buffer on the
// aux stream, once the GEMM that last read that buffer has finished. Memory-bound dequantization
// then overlaps the compute-bound GEMM of `current`.
Status CudaBackend::prefetch_next(uint64_t current) {
  const auto it = next_.find(current);
  if (it == next_.end()) return Status::ok();
  const auto wit = weights_.find(it->second);
  if (wit == weights_.end()) return Status::ok();
  const CudaWeight& n = *wit->second;
  const int o = 1 - last_tile_;
  if (tiles_[o].holds == n.id) return Status::ok();
  KESTREL_ASSIGN_OR_RETURN(TileBuffer * tb, tile_buffer(o, n.n_out * n.n_in));
  CUDA_TRY(cudaStreamWaitEvent(aux_, tb->free, 0), "prefetch (wait for the tile)");
  KESTREL_TRY(launch_dequant_f16(n.type, n.qs, n.d, n.n_in, 0, n.n_out, tb->ptr, aux_));
  CUDA_TRY(cudaEventRecord(tb->ready, aux_), "prefetch (tile ready)");
  tb->holds = n.id;
  return Status::ok();
}

}  // namespace kestrel::backend::cuda
