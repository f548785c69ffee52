// Matmul for decode and small micro-batches (T <= kSmallBatch) of Q4_0 / Q8_0 weights with
// integer dot products (dp4a): the activations are quantized once per matmul into two int8
// planes per 32-element block, x ~= unit * (128 * q1 + q2) (the CPU backend's format, see
// cpu/kernels.h: one plane alone costs ~0.5% per matmul and pushes whole-model logits past the
// 1e-2 bound; two are ~128x tighter), and each 32-weight block then costs 8 or 16 dp4a per token
// instead of ~40 float instructions. Decode reads every weight once and must stream it at memory
// bandwidth; the float kernel it replaces issued so many instructions per byte that it reached
// only ~22% of DRAM bandwidth (bench/NOTES.md).
//
// Layout: a warp owns kRowsFor<NT> consecutive output rows; its lanes take the rows' 32-element
// blocks lane, lane + 32, ... so that a warp's weight loads are 512 contiguous bytes per row
// (Q4_0), and every block's activations (two planes, 64 bytes per token) serve all of them.
#include <cstdlib>
#include <limits>
#include <string>

#include "backend/cuda/acts_device.cuh"
#include "backend/cuda/cuda_backend_impl.cuh"
#include "backend/cuda/matvec_device.cuh"

namespace kestrel::backend::cuda {

using quant::DType;

namespace {

// Output rows per warp. Two: each block's activations serve both. Measured against it in decode:
// one row per warp, for twice the warps in flight (tg128 219 -> 193 t/s on the H100; 289 against
// ~340 on the H200), four rows (289), and registers capped for 8 blocks per SM (278).
template <int NT>
constexpr int kRowsFor = 2;
constexpr int kWarps = 4;

// One thread per element, one warp per 32-element block (n is a multiple of 32, so a warp is
// wholly inside or outside).
__global__ void quantize_acts_kernel(const float* x, int64_t n, MatmulInputOut m) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  write_matmul_input1(m, i, x[i]);
}

// The products of one launch: weights of one type and width read the same activations, and
// blocks [first_block[p], first_block[p + 1]) compute part p (decode: Q, K and V in one launch,
// gate and up in another -- each launch costs ~3 us of ramp and tail at this size, ncu on an
// H200, against ~2 us of streaming for a 4096 x 4096 Q4_0 matrix).
struct MatvecArgs {
  const uint8_t* qs[kMatvecMaxParts];
  const __half* d[kMatvecMaxParts];
  int64_t n_out[kMatvecMaxParts];
  float* out[kMatvecMaxParts];
  const float* bias[kMatvecMaxParts];
  int first_block[kMatvecMaxParts];
  int n_parts;
  int64_t n_in;
  const int8_t* q1;
  const int8_t* q2;
  const ActBlock* meta;
  int n_tokens;
  bool dependent;  // matvec_ksplit_kernel as a programmatic dependent launch
  bool trigger;    // ... letting its own dependents start once it has its inputs
  // launch_matvec_swiglu: parts 0 and 1 are gate and up; a counter a 32-row block of them, and
  // where silu(gate) * up goes as the down projection's input.
  unsigned* swiglu_arrivals;
  MatmulInputOut swiglu_also;
  // The activations' pending row scale (QuantizedActs::row_ss; K-split kernel only), and
  // launch_matvec_add_norm's epilogue.
  const float* in_ss;
  float in_eps;
  AddNormOut add_norm;
};

// The product this block computes, its fields picked without indexing the parameter arrays by a
// runtime value (which would copy them to local memory).
struct MatvecTarget {
  const uint8_t* qs;
  const __half* d;
  int64_t n_out;
  float* out;
  const float* bias;
  int first_block;
};

__device__ __forceinline__ MatvecTarget target_of(const MatvecArgs& args, int block) {
  int part = 0;
#pragma unroll
  for (int p = 1; p < kMatvecMaxParts; ++p)
    if (p < args.n_parts && block >= args.first_block[p]) part = p;
  MatvecTarget m{args.qs[0], args.d[0], args.n_out[0], args.out[0], args.bias[0], 0};
#pragma unroll
  for (int p = 1; p < kMatvecMaxParts; ++p)
    if (part == p)
      m = {args.qs[p], args.d[p], args.n_out[p], args.out[p], args.bias[p], args.first_block[p]};
  return m;
}

__device__ __forceinline__ MatvecTarget block_target(const MatvecArgs& args) {
  return target_of(args, static_cast<int>(blockIdx.x));
}

// The two activation planes of block b of token t (words a1[i], a2[i] hold elements 4i..4i+3).
__device__ __forceinline__ void load_act_block(const MatvecArgs& args, int t, int64_t b, int* a1,
                                               int* a2) {
  const int4* p1 = reinterpret_cast<const int4*>(args.q1 + t * args.n_in + 32 * b);
  const int4* p2 = reinterpret_cast<const int4*>(args.q2 + t * args.n_in + 32 * b);
#pragma unroll
  for (int v = 0; v < 2; ++v) {
    const int4 x1 = __ldg(p1 + v), x2 = __ldg(p2 + v);
    a1[4 * v] = x1.x, a1[4 * v + 1] = x1.y, a1[4 * v + 2] = x1.z, a1[4 * v + 3] = x1.w;
    a2[4 * v] = x2.x, a2[4 * v + 1] = x2.y, a2[4 * v + 2] = x2.z, a2[4 * v + 3] = x2.w;
  }
}

// The quant words and the scale of block b of row r.
template <DType T>
__device__ __forceinline__ float load_weight_block(const MatvecTarget& m, int64_t nb, int64_t r,
                                                   int64_t b, int* w) {
  return load_quant_block<T>(m.qs, m.d, nb, r, b, w);
}

template <DType T, int NT>
__global__ void __launch_bounds__(kWarps * 32) matvec_int8_kernel(const MatvecArgs args) {
  const MatvecTarget m = block_target(args);
  constexpr int kWords = T == DType::Q4_0 ? 4 : 8;  // 32-bit words of quants per block
  constexpr int kRows = kRowsFor<NT>;
  constexpr int kAhead = 8 / kRows;  // blocks per lane loaded before any is used
  const int64_t r0 =
      (static_cast<int64_t>(blockIdx.x - m.first_block) * kWarps + threadIdx.x / 32) * kRows;
  const int lane = threadIdx.x % 32;
  if (r0 >= m.n_out) return;
  const int64_t nb = args.n_in / 32;
  float acc[kRows][NT];
#pragma unroll
  for (int rr = 0; rr < kRows; ++rr)
#pragma unroll
    for (int t = 0; t < NT; ++t) acc[rr][t] = 0.0f;

  for (int64_t b0 = lane; b0 < nb; b0 += 32 * kAhead) {
    int w[kAhead][kRows][kWords];
    float dw[kAhead][kRows];
#pragma unroll
    for (int u = 0; u < kAhead; ++u) {
      const int64_t b = b0 + 32 * u;
#pragma unroll
      for (int rr = 0; rr < kRows; ++rr)  // rows past the end read the last row (valid memory)
        if (b < nb) dw[u][rr] = load_weight_block<T>(m, nb, min(r0 + rr, m.n_out - 1), b, w[u][rr]);
    }
#pragma unroll
    for (int u = 0; u < kAhead; ++u) {
      const int64_t b = b0 + 32 * u;
      if (b >= nb) break;
#pragma unroll
      for (int t = 0; t < NT; ++t) {
        if (t >= args.n_tokens) break;
        int a1[8], a2[8];
        load_act_block(args, t, b, a1, a2);
        const ActBlock am = args.meta[t * nb + b];
#pragma unroll
        for (int rr = 0; rr < kRows; ++rr)
          acc[rr][t] += block_term<T>(w[u][rr], dw[u][rr], a1, a2, am);
      }
    }
  }
#pragma unroll
  for (int rr = 0; rr < kRows; ++rr) {
    const int64_t r = r0 + rr;
#pragma unroll
    for (int t = 0; t < NT; ++t) {
      if (t < args.n_tokens) {
        const float v = warp_sum(acc[rr][t]);
        if (lane == 0 && r < m.n_out) m.out[t * m.n_out + r] = v + (m.bias ? m.bias[r] : 0.0f);
      }
    }
  }
}

// Decode (one token) with the block's warps splitting K, as llama.cpp's matvec does: a block owns
// kKSplitRows rows and thread j takes quant blocks j, j + 128, ... of each (a 4096-wide row is
// one quant block per thread and row), the sums meeting in shared memory in a fixed order. The
// warp-per-row kernel above runs a 4096-row matrix as 512 blocks, 0.78 waves at the 5 blocks per
// SM its registers allow, each warp one round of loads: ncu put it at ~1.6 TB/s of 4.8 for
// 4096 x 4096. The default for decode (KESTREL_CUDA_NO_MATVEC_KSPLIT=1: the warp-per-row
// kernel); H200 tg128 366 t/s against 354 for the unchanged baseline row of the same run.
constexpr int kKSplitRows = 4;

// The sum over the block's threads of each of its kKSplitRows rows, in a fixed order (warp sums,
// then the warps in turn through `partial`): thread rr < kKSplitRows gets row rr's, the others 0.
// One block barrier; the K-split and pipelined kernels share it, so their results agree bit for
// bit.
__device__ __forceinline__ float block_row_sums(const float (&acc)[kKSplitRows],
                                                float (*partial)[kKSplitRows]) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
#pragma unroll
  for (int rr = 0; rr < kKSplitRows; ++rr) {
    const float v = warp_sum(acc[rr]);
    if (lane == 0) partial[warp][rr] = v;
  }
  __syncthreads();
  float v = 0.0f;
  if (threadIdx.x < kKSplitRows)
#pragma unroll
    for (int i = 0; i < kWarps; ++i) v += partial[i][threadIdx.x];
  return v;
}

// launch_matvec_swiglu's epilogue, after a block wrote its kKSplitRows rows of gate or of up: the
// last of the 2 x 32 / kKSplitRows blocks that write one 32-row block of both (counted on that
// block's counter, as attention_merge.cuh counts a head's splits) computes silu(gate) * up for it
// with one warp, writes it over gate and as the down projection's int8 planes (the warp is one
// block of them), and sets the counter back to zero. No block waits for another.
__device__ __forceinline__ void swiglu_epilogue(const MatvecArgs& args, int64_t r0) {
  const int64_t ab = r0 / 32;
  if (threadIdx.x >= 32 ||
      !last_to_arrive(&args.swiglu_arrivals[ab], 2 * (32 / kKSplitRows), threadIdx.x))
    return;
  const int64_t i = 32 * ab + threadIdx.x;  // (other blocks wrote them: read past L1)
  const float r = silu_times(__ldcg(args.out[0] + i), __ldcg(args.out[1] + i));
  args.out[0][i] = r;
  write_matmul_input1(args.swiglu_also, i, r);
  if (threadIdx.x == 0) args.swiglu_arrivals[ab] = 0;  // ready for the next launch
}

// launch_matvec_add_norm's epilogue, after a block added its kKSplitRows rows into x: the last of
// the 32 / kKSplitRows blocks that write one 32-row block of x writes that block's sum of
// squares and x * weight as the next matmuls' planes (their readers divide by rms(x) from the
// sums: QuantizedActs::row_ss), and sets the counter back to zero.
__device__ __forceinline__ void add_norm_epilogue(const AddNormOut& o, int64_t r0) {
  const int64_t ab = r0 / 32;
  if (threadIdx.x >= 32 || !last_to_arrive(&o.arrivals[ab], 32 / kKSplitRows, threadIdx.x)) return;
  add_norm_block(o, ab, threadIdx.x);
}

// 1 / rms of activations whose planes are of x * w (QuantizedActs::row_ss), in two steps so that
// the sums' loads do not hold up the weights' (a block asked L2 for them first and then waited a
// round trip and a barrier before its first weight load): load_row_ss before the weights, each
// thread its first kRowSsEarly of the nb sums, and row_inv_rms after them, the block's threads
// summing in a fixed order so that every block gets the same value.
constexpr int kRowSsEarly = 4;

__device__ __forceinline__ void load_row_ss(const float* ss, int64_t nb, float* v) {
#pragma unroll
  for (int i = 0; i < kRowSsEarly; ++i) {
    const int64_t b = threadIdx.x + i * int64_t{kWarps * 32};
    v[i] = ss && b < nb ? ss[b] : 0.0f;
  }
}

__device__ __forceinline__ float row_inv_rms(const float* v, const float* ss, int64_t nb, int64_t n,
                                             float eps) {
  constexpr int kThreads = kWarps * 32;
  __shared__ float part[kWarps];
  float s = 0.0f;
#pragma unroll
  for (int i = 0; i < kRowSsEarly; ++i) s += v[i];
  for (int64_t b = threadIdx.x + kRowSsEarly * kThreads; b < nb; b += kThreads) s += ss[b];
  s = warp_sum(s);
  if (threadIdx.x % 32 == 0) part[threadIdx.x / 32] = s;
  __syncthreads();
  double total = 0.0;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) total += part[w];
  return static_cast<float>(1.0 / sqrt(total / static_cast<double>(n) + eps));
}

enum MatvecEpilogue { kStoreRows, kSwigluRows, kAddNormRows };

template <DType T, int kEpilogue>
__global__ void __launch_bounds__(kWarps * 32) matvec_ksplit_kernel(const MatvecArgs args) {
  const MatvecTarget m = block_target(args);
  constexpr int kWords = T == DType::Q4_0 ? 4 : 8;
  constexpr int kThreads = kWarps * 32;
  const int64_t r0 = static_cast<int64_t>(blockIdx.x - m.first_block) * kKSplitRows;
  const int64_t nb = args.n_in / 32;
  if (args.dependent) {
    // A programmatic dependent launch: the block's rows (contiguous) are asked of L2 while the
    // kernel that writes the activations still runs, then the block waits for it.
    if (r0 < m.n_out) {
      const int64_t rows = min(static_cast<int64_t>(kKSplitRows), m.n_out - r0);
      const uint8_t* q0 = m.qs + r0 * nb * (4 * kWords);
      for (int64_t off = 128 * threadIdx.x; off < rows * nb * 4 * kWords; off += 128 * kThreads)
        prefetch_l2(q0 + off);
      const int64_t scale_bytes = rows * nb * 2;
      if (128 * threadIdx.x < scale_bytes)
        prefetch_l2(reinterpret_cast<const uint8_t*>(m.d + r0 * nb) + 128 * threadIdx.x);
    }
    grid_dependency_wait();
  }
  if (args.trigger) grid_dependents_launch();
  if (r0 >= m.n_out) return;  // the whole block
  float row_ss[kRowSsEarly];
  load_row_ss(args.in_ss, nb, row_ss);
  float acc[kKSplitRows] = {};
#pragma unroll 2
  for (int64_t b = threadIdx.x; b < nb; b += kThreads) {
    int w[kKSplitRows][kWords];
    float dw[kKSplitRows];
#pragma unroll
    for (int rr = 0; rr < kKSplitRows; ++rr)
      dw[rr] = load_weight_block<T>(m, nb, min(r0 + rr, m.n_out - 1), b, w[rr]);
    int a1[8], a2[8];
    load_act_block(args, 0, b, a1, a2);
    const ActBlock am = args.meta[b];
#pragma unroll
    for (int rr = 0; rr < kKSplitRows; ++rr) acc[rr] += block_term<T>(w[rr], dw[rr], a1, a2, am);
  }
  const float scale =
      args.in_ss ? row_inv_rms(row_ss, args.in_ss, nb, args.n_in, args.in_eps) : 1.0f;
  __shared__ float partial[kWarps][kKSplitRows];
  float v = block_row_sums(acc, partial);
  if (threadIdx.x < kKSplitRows) {
    const int64_t r = r0 + threadIdx.x;
    if (r < m.n_out) {
      v = v * scale + (m.bias ? m.bias[r] : 0.0f);
      if constexpr (kEpilogue == kAddNormRows)
        m.out[r] += v;  // out is the residual x
      else
        m.out[r] = v;
    }
  }
  if constexpr (kEpilogue == kSwigluRows) swiglu_epilogue(args, r0);
  if constexpr (kEpilogue == kAddNormRows) add_norm_epilogue(args.add_norm, r0);
}

// Decode's K-split matvec as a pipeline of resident blocks: the default for rows wider than
// 4096 (more than one K-block a thread: llama2's ffn down, 11008), KESTREL_CUDA_MATVEC_PIPE
// below. Why: a block of matvec_ksplit_kernel lives one round of loads (two with unroll 2, and a
// third for 11008: 2.7 K-blocks a thread), and a 4096-row matrix is 1,024 blocks against the 924
// that fit at once (7 an SM at 72 registers), so ~10% of them run as a second wave on an
// otherwise idle card. Here the grid is what fits (or fewer), each block takes the same number of
// 4-row groups (blockIdx.x, + gridDim.x, ...), and a thread walks its steps (group, K-block of
// the group) in order with the next step's weights loaded before this step's dot products. A
// group's rows are summed as the K-split kernel sums them (the same results bit for bit). As a
// dependent launch, a block's first step is loaded before it waits for the kernel before.
// Measured (H100, ncu, us a launch, K-split / pipeline): ffn down 15.0 / 12.6, but Q/K/V 12.5 /
// 14.3, output 6.4 / 7.2, gate/up 19.8 / 21.5 (one step a group there: a block barrier every
// step, one step in flight across it); tg128 481 against 472 with ffn down alone on it, 461-463
// with every product (bench/NOTES.md, twenty-eighth session).
struct PipeStep {  // where a thread's step is: group g (launch-wide), K-block b
  int g;
  int64_t b;
};

template <DType T>
__device__ __forceinline__ void load_pipe_step(const MatvecArgs& args, PipeStep st, int64_t nb,
                                               int groups, int (&w)[kKSplitRows][kQuantWords<T>],
                                               float (&dw)[kKSplitRows]) {
  if (st.g >= groups || st.b >= nb) return;
  const MatvecTarget m = target_of(args, st.g);
  const int64_t r0 = static_cast<int64_t>(st.g - m.first_block) * kKSplitRows;
#pragma unroll
  for (int rr = 0; rr < kKSplitRows; ++rr)
    dw[rr] = load_weight_block<T>(m, nb, min(r0 + rr, m.n_out - 1), st.b, w[rr]);
}

// One step: the next step's loads, this step's dot products, and at a group's last step the
// group's sums (partial: two sets by the group's parity, so one barrier a group suffices).
template <DType T>
__device__ __forceinline__ void pipe_step(const MatvecArgs& args, PipeStep& st, int& k, int its,
                                          int64_t nb, int groups, float (&acc)[kKSplitRows],
                                          const int (&w)[kKSplitRows][kQuantWords<T>],
                                          const float (&dw)[kKSplitRows],
                                          int (&next_w)[kKSplitRows][kQuantWords<T>],
                                          float (&next_dw)[kKSplitRows], int& parity,
                                          float (*partial)[kWarps][kKSplitRows]) {
  constexpr int kThreads = kWarps * 32;
  const bool group_end = k == its - 1;
  const PipeStep next =
      group_end ? PipeStep{st.g + static_cast<int>(gridDim.x), static_cast<int64_t>(threadIdx.x)}
                : PipeStep{st.g, st.b + kThreads};
  load_pipe_step<T>(args, next, nb, groups, next_w, next_dw);
  if (st.b < nb) {
    int a1[8], a2[8];
    load_act_block(args, 0, st.b, a1, a2);
    const ActBlock am = args.meta[st.b];
#pragma unroll
    for (int rr = 0; rr < kKSplitRows; ++rr) acc[rr] += block_term<T>(w[rr], dw[rr], a1, a2, am);
  }
  if (group_end) {
    const float v = block_row_sums(acc, partial[parity]);
#pragma unroll
    for (int rr = 0; rr < kKSplitRows; ++rr) acc[rr] = 0.0f;
    if (threadIdx.x < kKSplitRows) {
      const MatvecTarget m = target_of(args, st.g);
      const int64_t r = static_cast<int64_t>(st.g - m.first_block) * kKSplitRows + threadIdx.x;
      if (r < m.n_out) m.out[r] = v + (m.bias ? m.bias[r] : 0.0f);
    }
    parity ^= 1;
  }
  st = next;
  k = group_end ? 0 : k + 1;
}

// Registers capped for 6 blocks an SM (Q4_0: 80, no spills; 96 uncapped).
template <DType T>
__global__ void __launch_bounds__(kWarps * 32, T == DType::Q4_0 ? 6 : 4)
    matvec_pipe_kernel(const MatvecArgs args, int groups, int its) {
  constexpr int kWords = kQuantWords<T>;
  const int64_t nb = args.n_in / 32;
  __shared__ float partial[2][kWarps][kKSplitRows];
  int w0[kKSplitRows][kWords], w1[kKSplitRows][kWords];
  float d0[kKSplitRows], d1[kKSplitRows];
  PipeStep st{static_cast<int>(blockIdx.x), static_cast<int64_t>(threadIdx.x)};
  load_pipe_step<T>(args, st, nb, groups, w0, d0);
  if (args.dependent) grid_dependency_wait();
  if (args.trigger) grid_dependents_launch();
  const int block_groups = (groups - static_cast<int>(blockIdx.x) + gridDim.x - 1) / gridDim.x;
  const int steps = block_groups * its;
  float acc[kKSplitRows] = {};
  int k = 0, parity = 0;
  for (int s = 0; s < steps; s += 2) {  // two steps a turn: the buffers' roles fixed in code
    pipe_step<T>(args, st, k, its, nb, groups, acc, w0, d0, w1, d1, parity, partial);
    if (s + 1 < steps)
      pipe_step<T>(args, st, k, its, nb, groups, acc, w1, d1, w0, d0, parity, partial);
  }
}

// matvec_pipe_kernel's launch over `groups` 4-row groups: at most the blocks that fit on the card
// at once, every block the same number of groups (no block's last turn is shorter). Should the
// card not say what fits, a block a group (correct, as the K-split kernel's grid).
template <DType T>
cudaError_t launch_pipe(const MatvecArgs& args, int groups, cudaStream_t s) {
  constexpr int kThreads = kWarps * 32;
  static const int fit = [] {  // blocks resident at once (one device a process)
    int device = 0, sms = 0, per_sm = 0;
    if (cudaGetDevice(&device) != cudaSuccess ||
        cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess ||
        cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, matvec_pipe_kernel<T>, kThreads,
                                                      0) != cudaSuccess ||
        sms * per_sm < 1) {
      (void)cudaGetLastError();  // not left for the next launch check
      return std::numeric_limits<int>::max();
    }
    return sms * per_sm;
  }();
  const int grid = ceil_div(groups, ceil_div(groups, fit));
  const int its = ceil_div(args.n_in / 32, kThreads);
  return launch_dependent(args.dependent, matvec_pipe_kernel<T>, dim3(grid), dim3(kThreads), s,
                          args, groups, its);
}

// The launch's own error (cudaLaunchKernelEx returns it); the <<<>>> launches leave theirs to
// the caller's LAUNCH_CHECK.
template <DType T>
cudaError_t launch_matvec(MatvecArgs args, int blocks, bool ksplit, bool pipe, cudaStream_t s) {
  const int threads = kWarps * 32;
  if (ksplit && pipe) return launch_pipe<T>(args, blocks, s);
  if (ksplit && args.swiglu_arrivals)
    return launch_dependent(args.dependent, matvec_ksplit_kernel<T, kSwigluRows>, dim3(blocks),
                            dim3(threads), s, args);
  if (ksplit && args.add_norm.arrivals)
    return launch_dependent(args.dependent, matvec_ksplit_kernel<T, kAddNormRows>, dim3(blocks),
                            dim3(threads), s, args);
  if (ksplit)
    return launch_dependent(args.dependent, matvec_ksplit_kernel<T, kStoreRows>, dim3(blocks),
                            dim3(threads), s, args);
  if (args.n_tokens <= 1)
    matvec_int8_kernel<T, 1><<<blocks, threads, 0, s>>>(args);
  else if (args.n_tokens <= 4)
    matvec_int8_kernel<T, 4><<<blocks, threads, 0, s>>>(args);
  else
    matvec_int8_kernel<T, kSmallBatch><<<blocks, threads, 0, s>>>(args);
  return cudaSuccess;
}

// Blocks of a product of n_out rows with NT tokens.
int matvec_blocks(int64_t n_out, int n_tokens, bool ksplit) {
  if (ksplit) return ceil_div(n_out, kKSplitRows);
  const int rows = n_tokens <= 1   ? kRowsFor<1>
                   : n_tokens <= 4 ? kRowsFor<4>
                                   : kRowsFor<kSmallBatch>;
  return ceil_div(n_out, kWarps * rows);
}

// Decode on matvec_ksplit_kernel unless KESTREL_CUDA_NO_MATVEC_KSPLIT=1.
bool ksplit_enabled() {
  static const bool on = [] {
    const char* e = std::getenv("KESTREL_CUDA_NO_MATVEC_KSPLIT");
    return !(e && std::string(e) == "1");
  }();
  return on;
}

// Whether the K-split matvec of n_parts products lets the next kernel start (its blocks up to
// their wait: the next matvec asks L2 for its rows, the weight stream fills its ring, decode
// attention loads the cache's keys) once every block of it has its inputs: all launches with
// KESTREL_CUDA_KSPLIT_TRIGGER=1 (tg128 -8% on the H100, thirty-second session), the three-part
// ones (decode's Q/K/V, which attention follows) with =3 (lab); by default the next kernel starts
// when it ends.
bool ksplit_triggers(int n_parts) {
  static const int mode = [] {
    const char* e = std::getenv("KESTREL_CUDA_KSPLIT_TRIGGER");
    return e && (e[0] == '1' || e[0] == '3') && !e[1] ? e[0] - '0' : 0;
  }();
  return mode == 1 || (mode == 3 && n_parts == 3);
}

// Which of decode's plain products go on matvec_pipe_kernel (KESTREL_CUDA_MATVEC_PIPE): 2 (the
// default) those of more than one K-block a thread (rows wider than 4096), 1 all of them, 0 none.
bool pipe_takes(int64_t n_in) {
  static const int mode = [] {
    const char* e = std::getenv("KESTREL_CUDA_MATVEC_PIPE");
    return e && (e[0] == '0' || e[0] == '1') && !e[1] ? e[0] - '0' : 2;
  }();
  return mode == 1 || (mode == 2 && n_in > int64_t{32} * kWarps * 32);
}

}  // namespace

QuantizedActs QuantizedActs::in(void* buffer, int n_tokens, int64_t k) {
  QuantizedActs a;
  const int64_t n = int64_t{n_tokens} * k;
  a.q1 = static_cast<int8_t*>(buffer);
  a.q2 = a.q1 + n;
  a.meta = reinterpret_cast<ActBlock*>(a.q2 + n);
  return a;
}

size_t QuantizedActs::bytes(int n_tokens, int64_t k) {
  const int64_t n = int64_t{n_tokens} * k;
  return static_cast<size_t>(2 * n + (n / 32) * static_cast<int64_t>(sizeof(ActBlock)));
}

bool int8_matvec_supports(DType type, int64_t n_in, int n_tokens) {
  return (type == DType::Q4_0 || type == DType::Q8_0) && n_tokens <= kSmallBatch && n_in % 32 == 0;
}

Status launch_quantize_acts(const float* x, int n_tokens, int64_t k, const QuantizedActs& a,
                            cudaStream_t s) {
  const int64_t n = int64_t{n_tokens} * k;
  quantize_acts_kernel<<<ceil_div(n, 256), 256, 0, s>>>(x, n, a.as_output());
  LAUNCH_CHECK("matmul (quantize activations)");
  return Status::ok();
}

namespace {

// The products `parts` of one launch; with swiglu_arrivals, gate and up with SwiGLU's epilogue
// into `also` (launch_matvec_swiglu); with add_norm.arrivals, the residual add and the norm's
// epilogue (launch_matvec_add_norm).
Status launch_matvec_parts(const MatvecPart* parts, int n_parts, const QuantizedActs& a,
                           int n_tokens, unsigned* swiglu_arrivals, const MatmulInputOut& also,
                           const AddNormOut& add_norm, cudaStream_t s) {
  if (n_parts < 1 || n_parts > kMatvecMaxParts)
    return error("matmul (small batch, int8): %d products in one launch (1 to %d)", n_parts,
                 kMatvecMaxParts);
  const CudaWeight& w0 = *parts[0].w;
  MatvecArgs args{};
  const bool ksplit = n_tokens == 1 && ksplit_enabled();
  int blocks = 0;
  for (int p = 0; p < n_parts; ++p) {
    const CudaWeight& w = *parts[p].w;
    if (w.type != w0.type || w.n_in != w0.n_in)
      return error("matmul (small batch, int8): '%s' and '%s' differ in type or width",
                   w0.name.c_str(), w.name.c_str());
    args.qs[p] = w.qs;
    args.d[p] = w.d;
    args.n_out[p] = w.n_out;
    args.out[p] = parts[p].out;
    args.bias[p] = parts[p].bias;
    args.first_block[p] = blocks;
    blocks += matvec_blocks(w.n_out, n_tokens, ksplit);
  }
  args.n_parts = n_parts;
  args.n_in = w0.n_in;
  args.q1 = a.q1;
  args.q2 = a.q2;
  args.meta = a.meta;
  args.n_tokens = n_tokens;
  args.dependent = ksplit && dependent_launches();
  args.trigger = args.dependent && ksplit_triggers(n_parts);
  args.swiglu_arrivals = swiglu_arrivals;
  args.swiglu_also = also;
  args.in_ss = a.row_ss;
  args.in_eps = a.eps;
  args.add_norm = add_norm;
  if ((swiglu_arrivals || add_norm.arrivals || a.row_ss) && !ksplit)
    return error(
        "matmul '%s': a fused epilogue or a normed input needs decode's K-split matvec "
        "(one token, KESTREL_CUDA_NO_MATVEC_KSPLIT unset)",
        w0.name.c_str());
  // The pipeline takes the plain products (no epilogue, no pending row scale).
  const bool pipe =
      ksplit && !swiglu_arrivals && !add_norm.arrivals && !a.row_ss && pipe_takes(w0.n_in);
  CUDA_TRY(w0.type == DType::Q4_0 ? launch_matvec<DType::Q4_0>(args, blocks, ksplit, pipe, s)
                                  : launch_matvec<DType::Q8_0>(args, blocks, ksplit, pipe, s),
           "matmul (small batch, int8)");
  LAUNCH_CHECK(swiglu_arrivals     ? "matmul+swiglu"
               : add_norm.arrivals ? "matmul+add_rms_norm"
                                   : "matmul (small batch, int8)");
  return Status::ok();
}

}  // namespace

Status launch_matvec_int8(const MatvecPart* parts, int n_parts, const QuantizedActs& a,
                          int n_tokens, cudaStream_t s) {
  return launch_matvec_parts(parts, n_parts, a, n_tokens, nullptr, MatmulInputOut{}, AddNormOut{},
                             s);
}

bool matvec_swiglu_fits(const CudaWeight& gate, const CudaWeight& up) {
  return ksplit_enabled() && (gate.type == DType::Q4_0 || gate.type == DType::Q8_0) &&
         up.type == gate.type && up.n_in == gate.n_in && up.n_out == gate.n_out &&
         gate.n_in % 32 == 0 && gate.n_out % 32 == 0;
}

Status launch_matvec_swiglu(const MatvecPart (&parts)[2], const QuantizedActs& a,
                            unsigned* arrivals, const MatmulInputOut& also, cudaStream_t s) {
  if (!matvec_swiglu_fits(*parts[0].w, *parts[1].w) || !arrivals || parts[0].bias || parts[1].bias)
    return error("matmul+swiglu: '%s' and '%s' do not fit the fused launch",
                 parts[0].w->name.c_str(), parts[1].w->name.c_str());
  return launch_matvec_parts(parts, 2, a, 1, arrivals, also, AddNormOut{}, s);
}

bool matvec_add_norm_fits(const CudaWeight& w) {
  return ksplit_enabled() && (w.type == DType::Q4_0 || w.type == DType::Q8_0) && w.n_in % 32 == 0 &&
         w.n_out % 32 == 0;
}

Status launch_matvec_add_norm(const MatvecPart& part, const QuantizedActs& a, const AddNormOut& o,
                              cudaStream_t s) {
  if (!matvec_add_norm_fits(*part.w) || part.bias || !o.x || !o.weight || !o.ss || !o.arrivals ||
      !o.planes.q1)
    return error("matmul+add_rms_norm: '%s' does not fit the fused launch", part.w->name.c_str());
  const MatvecPart p{part.w, o.x, nullptr};
  return launch_matvec_parts(&p, 1, a, 1, nullptr, MatmulInputOut{}, o, s);
}

}  // namespace kestrel::backend::cuda
