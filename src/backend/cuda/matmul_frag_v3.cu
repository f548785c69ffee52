// Matmul for micro-batches of 5 to 16 tokens of Q4_0 / Q8_0 weights, third version (under trial:
// KESTREL_CUDA_FRAG_V3=1, or a ring shape: see v3_shape). Same lane mapping as v2
// (matmul_frag_v2.cu: lane c of a quad owns whole quant blocks, loaded 16 bytes at a time, each
// word of codes two k-steps' A fragments), changed where ncu found v2 waiting (bench/NOTES.md: 24%
// occupancy, one step of weights in flight per warp, ~420 instructions per warp and step, 8 cycles
// per issued instruction):
//
// - A deeper pipeline: every operand of a step -- the lane's codes, its rows' scales and the
//   block's activations -- goes through cp.async into a ring of kStages shared-memory stages, so
//   kStages - 1 steps are in flight while one is multiplied (v2: the next step's codes in
//   registers, one step ahead). One __syncthreads per step (v2: two).
// - Half the decoding: the fragments hold the unscaled codes q - offset (exact in f16: one lop3
//   and one hsub2 per half2, v2 also multiplied each by the scale); each quant block's mma
//   products go into fresh f32 accumulators that are scaled once per block and token tile
//   (4 FFMA per 8 mma). The scale also stays in f32: no f16 rounding of q * d.
//
// Scales: the 4 lanes of a quad share two rows; lanes 0 and 1 copy those rows' step scales (16
// bytes for Q4_0's 8 blocks, 8 for Q8_0's 4) into a per-quad slot that the barrier publishes.
// That needs whole steps on 16-byte boundaries: n_in a multiple of 256 (8 blocks), else v2.
#include <cuda_pipeline_primitives.h>

#include <algorithm>
#include <cstdlib>
#include <string>

#include "backend/cuda/cuda_backend_impl.cuh"
#include "backend/cuda/frag_common.cuh"

namespace kestrel::backend::cuda {

using quant::DType;

namespace {

// A step: kStepBlocks quant blocks of every row (Q4_0: 8 = blocks c and c + 4 of each lane;
// Q8_0: 4 = block c, two 16-byte halves). Activations per stage as in v2: xs[token][block][40
// halfs], rows padded so that a quarter warp's 16-byte reads fall in distinct bank groups.
template <DType T>
struct V3Layout {
  static constexpr int kBlocksPerLane = T == DType::Q4_0 ? 2 : 1;
  static constexpr int kStepBlocks = 4 * kBlocksPerLane;
  static constexpr int kLoads = 2;         // 16-byte code loads per row and step
  static constexpr int kBlockStride = 40;  // halfs
  static constexpr int kRowWords0 = kStepBlocks * kBlockStride / 2;
  static constexpr int kRowStride = 2 * (kRowWords0 + (48 - kRowWords0 % 32) % 32);  // halfs
  static constexpr int kScaleBytes = 2 * kStepBlocks;  // one row's scales of a step
};

// Byte offsets inside one stage of the ring, for W warps and NT tokens.
template <DType T, int NT, int W>
struct V3Stage {
  using L = V3Layout<T>;
  static constexpr int kThreads = 32 * W;
  static constexpr int kActs = NT * L::kRowStride * 2;
  static constexpr int kCodes = kThreads * 2 * L::kLoads * 16;  // [ab][load][thread] uint4
  static constexpr int kScales = W * 8 * 2 * 16;                // [warp][quad][ab] 16-byte slot
  static constexpr int kBytes = kActs + kCodes + kScales;
};

struct FragV3Args {
  const uint8_t* qs;
  const __half* d;
  int64_t n_in, n_out;
  const __half* x16;
  int n_tokens;
  int64_t blocks_per_split;  // a multiple of 8 quant blocks
  float* out;
  const float* bias;
  float* partial;
  unsigned* arrivals;
};

// Issues (does not commit) the copies of step cb into `stage`: the block's activations, the
// lane's codes, and for lanes 0 and 1 of a quad its rows' scales.
template <DType T, int NT, int W>
__device__ __forceinline__ void issue_step(const FragV3Args& a, const int64_t (&rows)[2],
                                           int64_t cb, unsigned char* stage) {
  using L = V3Layout<T>;
  using S = V3Stage<T, NT, W>;
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32, g = lane / 4, c = lane % 4;
  const int64_t nb = a.n_in / 32;
  __half* xs = reinterpret_cast<__half*>(stage);
  constexpr int kChunks = NT * L::kStepBlocks * 4;
  for (int i = tid; i < kChunks; i += S::kThreads) {
    const int t = i / (L::kStepBlocks * 4), blk = i / 4 % L::kStepBlocks, q = i % 4;
    const bool in = t < a.n_tokens;
    const __half* src = in ? a.x16 + t * a.n_in + 32 * (cb + blk) + 8 * q : a.x16;
    __pipeline_memcpy_async(xs + t * L::kRowStride + blk * L::kBlockStride + 8 * q, src, 16,
                            in ? 0 : 16);
  }
  uint4* codes = reinterpret_cast<uint4*>(stage + S::kActs);
#pragma unroll
  for (int ab = 0; ab < 2; ++ab) {
#pragma unroll
    for (int l = 0; l < L::kLoads; ++l) {
      const uint8_t* src = T == DType::Q4_0 ? a.qs + (rows[ab] * nb + cb + c + 4 * l) * 16
                                            : a.qs + (rows[ab] * nb + cb + c) * 32 + 16 * l;
      __pipeline_memcpy_async(codes + (ab * L::kLoads + l) * S::kThreads + tid, src, 16);
    }
  }
  if (c < 2) {
    unsigned char* slot = stage + S::kActs + S::kCodes + ((warp * 8 + g) * 2 + c) * 16;
    __pipeline_memcpy_async(slot, a.d + (c == 0 ? rows[0] : rows[1]) * nb + cb, L::kScaleBytes);
  }
}

// The word of codes for elements 8q + 4 sub .. + 3 of the lane's block h (v2's mapping).
template <DType T>
__device__ __forceinline__ uint32_t code_word(const uint4 (&raw)[2], int h, int q, int sub) {
  if constexpr (T == DType::Q4_0) {
    const uint32_t* w = reinterpret_cast<const uint32_t*>(&raw[h]);
    const uint32_t v = w[2 * (q % 2) + sub];
    return q >= 2 ? v >> 4 : v;
  } else {
    const int i = 2 * q + sub;
    return reinterpret_cast<const uint32_t*>(&raw[i / 4])[i % 4];
  }
}

// acc += this stage's step: per quant block h of the lane, 8 mma (4 x 2 k-steps) into fresh
// accumulators, then scaled by the rows' block scales.
template <DType T, int NT, int W>
__device__ __forceinline__ void multiply_step(const unsigned char* stage, int n_tiles,
                                              float (&acc)[NT / 8][4]) {
  using L = V3Layout<T>;
  using S = V3Stage<T, NT, W>;
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32, g = lane / 4, c = lane % 4;
  const __half* xb = reinterpret_cast<const __half*>(stage);
  const uint4* codes = reinterpret_cast<const uint4*>(stage + S::kActs);
  uint4 raw[2][L::kLoads];
#pragma unroll
  for (int ab = 0; ab < 2; ++ab)
#pragma unroll
    for (int l = 0; l < L::kLoads; ++l)
      raw[ab][l] = codes[(ab * L::kLoads + l) * S::kThreads + tid];
  const __half* scales =
      reinterpret_cast<const __half*>(stage + S::kActs + S::kCodes + (warp * 8 + g) * 2 * 16);
#pragma unroll
  for (int h = 0; h < L::kBlocksPerLane; ++h) {
    const float da = __half2float(scales[c + 4 * h]), db = __half2float(scales[8 + c + 4 * h]);
    float blk[NT / 8][4];
#pragma unroll
    for (int j = 0; j < NT / 8; ++j) blk[j][0] = blk[j][1] = blk[j][2] = blk[j][3] = 0.0f;
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      uint4 bx[NT / 8];
#pragma unroll
      for (int j = 0; j < NT / 8; ++j)
        bx[j] = *reinterpret_cast<const uint4*>(xb + (8 * j + g) * L::kRowStride +
                                                (c + 4 * h) * L::kBlockStride + 8 * q);
#pragma unroll
      for (int sub = 0; sub < 2; ++sub) {
        const uint32_t qa = code_word<T>(raw[0], h, q, sub), qb = code_word<T>(raw[1], h, q, sub);
        const uint32_t af[4] = {codes_to_half2_unscaled<T>(__byte_perm(qa, 0, 0x4140)),
                                codes_to_half2_unscaled<T>(__byte_perm(qb, 0, 0x4140)),
                                codes_to_half2_unscaled<T>(__byte_perm(qa, 0, 0x4342)),
                                codes_to_half2_unscaled<T>(__byte_perm(qb, 0, 0x4342))};
#pragma unroll
        for (int j = 0; j < NT / 8; ++j) {
          if (j >= n_tiles) break;
          mma_16816(blk[j], af, sub ? bx[j].z : bx[j].x, sub ? bx[j].w : bx[j].y);
        }
      }
    }
#pragma unroll
    for (int j = 0; j < NT / 8; ++j) {
      acc[j][0] += da * blk[j][0];
      acc[j][1] += da * blk[j][1];
      acc[j][2] += db * blk[j][2];
      acc[j][3] += db * blk[j][3];
    }
  }
}

// The last split of row block blockIdx.x to arrive sums every split's partial, in split order
// (deterministic), into out (+ bias): no second launch.
template <int kRows>
__device__ void v3_reduce_splits_if_last(const FragV3Args& a) {
  __shared__ unsigned arrived;
  __threadfence();  // this block's partials are visible to every SM before it is counted
  __syncthreads();
  if (threadIdx.x == 0) arrived = atomicAdd(&a.arrivals[blockIdx.x], 1u);
  __syncthreads();
  if (arrived != gridDim.y - 1) return;
  __threadfence();
  const int64_t rb0 = static_cast<int64_t>(blockIdx.x) * kRows;
  for (int i = threadIdx.x; i < a.n_tokens * kRows; i += blockDim.x) {
    const int t = i / kRows;
    const int64_t r = rb0 + i % kRows;
    if (r >= a.n_out) continue;
    float v = 0.0f;
    for (unsigned sp = 0; sp < gridDim.y; ++sp)
      v += __ldcg(a.partial + (static_cast<int64_t>(sp) * a.n_tokens + t) * a.n_out + r);
    a.out[t * a.n_out + r] = v + (a.bias ? a.bias[r] : 0.0f);
  }
  if (threadIdx.x == 0) a.arrivals[blockIdx.x] = 0;  // ready for the next launch
}

// out[T][n_out] for rows [16 W blockIdx.x, +16 W), over quant blocks [blockIdx.y *
// blocks_per_split, +blocks_per_split), through a ring of kStages stages.
template <DType T, int NT, int W, int kStages>
__global__ void __launch_bounds__(W * 32) matmul_frag_v3_kernel(const FragV3Args a) {
  using L = V3Layout<T>;
  using S = V3Stage<T, NT, W>;
  extern __shared__ __align__(16) unsigned char ring[];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, c = lane % 4;
  const int64_t nb = a.n_in / 32;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * 16 * W + 16 * warp;
  const int64_t rows[2] = {min(row0 + g, a.n_out - 1), min(row0 + g + 8, a.n_out - 1)};
  const int64_t kb0 = blockIdx.y * a.blocks_per_split;
  const int64_t kb1 = min(nb, kb0 + a.blocks_per_split);
  const int n_steps = kb1 > kb0 ? static_cast<int>((kb1 - kb0) / L::kStepBlocks) : 0;
  const int n_tiles = min(NT / 8, (a.n_tokens + 7) / 8);

  float acc[NT / 8][4];
#pragma unroll
  for (int j = 0; j < NT / 8; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.0f;
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < n_steps) issue_step<T, NT, W>(a, rows, kb0 + s * L::kStepBlocks, ring + s * S::kBytes);
    __pipeline_commit();
  }
  for (int i = 0; i < n_steps; ++i) {
    __pipeline_wait_prior(kStages - 2);  // step i has landed (this thread's copies)
    __syncthreads();  // ... every thread's; and step i - 1's stage is free to refill
    const int next = i + kStages - 1;
    if (next < n_steps)
      issue_step<T, NT, W>(a, rows, kb0 + next * L::kStepBlocks, ring + next % kStages * S::kBytes);
    __pipeline_commit();
    multiply_step<T, NT, W>(ring + i % kStages * S::kBytes, n_tiles, acc);
  }
  __pipeline_wait_prior(0);
  // C fragment: acc[j][0..1] row g, tokens 8j + 2c, +1; acc[j][2..3] row g + 8.
  const bool split = gridDim.y > 1;
  float* dst = split ? a.partial + blockIdx.y * a.n_tokens * a.n_out : a.out;
#pragma unroll
  for (int j = 0; j < NT / 8; ++j) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int t = 8 * j + 2 * c + e % 2;
      const int64_t r = row0 + g + 8 * (e / 2);
      if (t < a.n_tokens && r < a.n_out)
        dst[t * a.n_out + r] = acc[j][e] + (!split && a.bias ? a.bias[r] : 0.0f);
    }
  }
  if (split) v3_reduce_splits_if_last<16 * W>(a);
}

// The ring's shape: warps per block and stages. KESTREL_CUDA_FRAG_V3 = 1 (w4s4), w4s3, w4s4 or
// w8s3 turns the trial on with that shape; warps 0 means off.
struct V3Shape {
  int warps, stages;
};

V3Shape v3_shape() {
  static const V3Shape shape = [] {
    const char* e = std::getenv("KESTREL_CUDA_FRAG_V3");
    const std::string s = e ? e : "";
    if (s == "1" || s == "w4s4") return V3Shape{4, 4};
    if (s == "w4s3") return V3Shape{4, 3};
    if (s == "w8s3") return V3Shape{8, 3};
    return V3Shape{0, 0};
  }();
  return shape;
}

template <DType T, int NT, int W, int kStages>
constexpr int v3_smem() {
  return kStages * V3Stage<T, NT, W>::kBytes;
}

// Raises an instantiation's dynamic shared-memory limit to what it launches with.
template <DType T, int NT, int W, int kStages>
cudaError_t v3_allow_smem() {
  return cudaFuncSetAttribute(matmul_frag_v3_kernel<T, NT, W, kStages>,
                              cudaFuncAttributeMaxDynamicSharedMemorySize,
                              v3_smem<T, NT, W, kStages>());
}

template <int W, int kStages>
cudaError_t v3_prepare_shape() {
  for (cudaError_t e :
       {v3_allow_smem<DType::Q4_0, 8, W, kStages>(), v3_allow_smem<DType::Q4_0, 16, W, kStages>(),
        v3_allow_smem<DType::Q8_0, 8, W, kStages>(), v3_allow_smem<DType::Q8_0, 16, W, kStages>()})
    if (e != cudaSuccess) return e;
  return cudaSuccess;
}

// Whole-GPU resident blocks of the chosen shape (16-token Q4_0 kernel: the most shared memory).
int v3_resident_blocks() {
  static const int n = [] {
    const V3Shape sh = v3_shape();
    const cudaError_t prepared = sh.warps == 8    ? v3_prepare_shape<8, 3>()
                                 : sh.stages == 3 ? v3_prepare_shape<4, 3>()
                                                  : v3_prepare_shape<4, 4>();
    int device = 0, sms = 132, per_sm = 0;
    if (cudaGetDevice(&device) != cudaSuccess ||
        cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess)
      sms = 132;
    cudaError_t e = prepared;
    if (e == cudaSuccess) {
      if (sh.warps == 8)
        e = cudaOccupancyMaxActiveBlocksPerMultiprocessor(
            &per_sm, matmul_frag_v3_kernel<DType::Q4_0, 16, 8, 3>, 256,
            v3_smem<DType::Q4_0, 16, 8, 3>());
      else if (sh.stages == 3)
        e = cudaOccupancyMaxActiveBlocksPerMultiprocessor(
            &per_sm, matmul_frag_v3_kernel<DType::Q4_0, 16, 4, 3>, 128,
            v3_smem<DType::Q4_0, 16, 4, 3>());
      else
        e = cudaOccupancyMaxActiveBlocksPerMultiprocessor(
            &per_sm, matmul_frag_v3_kernel<DType::Q4_0, 16, 4, 4>, 128,
            v3_smem<DType::Q4_0, 16, 4, 4>());
    }
    if (e != cudaSuccess || per_sm <= 0) return 0;  // the launch then reports v2's path
    return sms * per_sm;
  }();
  return n;
}

template <DType T, int W, int kStages>
void launch_v3_type(const FragV3Args& a, int splits, cudaStream_t s) {
  const dim3 grid(ceil_div(a.n_out, 16 * W), splits);
  if (a.n_tokens <= 8)
    matmul_frag_v3_kernel<T, 8, W, kStages><<<grid, W * 32, v3_smem<T, 8, W, kStages>(), s>>>(a);
  else
    matmul_frag_v3_kernel<T, 16, W, kStages><<<grid, W * 32, v3_smem<T, 16, W, kStages>(), s>>>(a);
}

template <int W, int kStages>
void launch_v3_shape(const FragV3Args& a, bool q4, int splits, cudaStream_t s) {
  if (q4)
    launch_v3_type<DType::Q4_0, W, kStages>(a, splits, s);
  else
    launch_v3_type<DType::Q8_0, W, kStages>(a, splits, s);
}

}  // namespace

bool frag_v3_used(const CudaWeight& w) {
  return v3_shape().warps > 0 && w.n_in % 256 == 0 && v3_resident_blocks() > 0;
}

int frag_v3_row_blocks(const CudaWeight& w) {
  return ceil_div(w.n_out, 16 * v3_shape().warps);
}

int frag_v3_splits(const CudaWeight& w) {
  // As many splits as fit one wave of resident blocks, each keeping at least kStages steps.
  const V3Shape sh = v3_shape();
  const int64_t steps = w.n_in / 256;  // 8-block steps (Q8_0's 4-block steps: twice as many)
  const int most = static_cast<int>(std::clamp<int64_t>(steps / sh.stages, 1, 16));
  return std::clamp(v3_resident_blocks() / frag_v3_row_blocks(w), 1, most);
}

Status launch_matmul_frag_v3(const CudaWeight& w, const __half* x, int n_tokens, float* out,
                             const float* bias, float* partial, unsigned* arrivals,
                             cudaStream_t s) {
  const int splits = frag_v3_splits(w);
  const int64_t nb = w.n_in / 32;
  const int64_t bps = ceil_div(ceil_div(nb, splits), 8) * 8;
  const FragV3Args a{w.qs, w.d, w.n_in, w.n_out, x, n_tokens, bps, out, bias, partial, arrivals};
  const V3Shape sh = v3_shape();
  const bool q4 = w.type == DType::Q4_0;
  if (sh.warps == 8)
    launch_v3_shape<8, 3>(a, q4, splits, s);
  else if (sh.stages == 3)
    launch_v3_shape<4, 3>(a, q4, splits, s);
  else
    launch_v3_shape<4, 4>(a, q4, splits, s);
  LAUNCH_CHECK("matmul (tensor cores, weights in fragments, v3)");
  return Status::ok();
}

}  // namespace kestrel::backend::cuda
