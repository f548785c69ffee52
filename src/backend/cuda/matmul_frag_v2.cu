// Matmul for micro-batches of 5 to 16 tokens of Q4_0 / Q8_0 weights, on the tensor cores with
// the weights decoded straight into mma fragments: the second version of the v13 kernel
// (matmul_frag.cu, removed once this one measured faster: seed case 2,685 against 2,484 t/s on
// the H200; bench/NOTES.md, v17). Every micro-batch re-reads all weights (the seed's case:
// micro-batches of 16), so the kernel must stream them at memory bandwidth with few instructions
// and few L1 wavefronts per byte.
//
// The trick: a dot product does not care in which order k runs, as long as A and B agree. So
// the k-slots that mma.sync m16n8k16 gives lane c = lane % 4 -- (2c, 2c+1) and (2c+8, 2c+9) --
// mean four consecutive elements of a quant block that lane c holds whole: lane c of each
// quad owns blocks c (and c + 4 for Q4_0) of the current step, loaded for its two rows with
// 16-byte loads (a warp's load covers 64 contiguous bytes of each of 8 rows; the first version
// loads 4 bytes per lane and row and filled the L1 pipe, ncu: memory busy 73%, DRAM 18-23%).
// Each word of codes becomes two k-steps' A fragments (Q4_0: low nibbles, then high), decoded
// to f16 by bit placement (octets.cuh) and scaled in f16 (rounded once, as everywhere).
//
// A block of kWarps warps owns 16 rows per warp, and its warps walk the same K range in steps,
// so that one copy of the step's activations in shared memory (cp.async, double-buffered) serves
// all of them (staged per warp, as in the first version, the activations move ~3.5x the
// weights' bytes from L2). Each lane's 16-byte shared load gives the B fragments of two k-steps
// (rows padded so that a quarter warp's loads fall in distinct banks). grid.y splits K so that
// enough blocks stream at once; the last split of each row block to finish sums the partials in
// a fixed order (deterministic, and no reduction launch: at 16 tokens a launch costs about what
// a 4096 x 4096 product does). bench/lab/emulate_frag_v2.py checks the lane mapping on the CPU.
#include <cooperative_groups.h>
#include <cuda_pipeline_primitives.h>

#include <algorithm>
#include <cstdlib>
#include <string>

#include "backend/cuda/cuda_backend_impl.cuh"
#include "backend/cuda/frag_common.cuh"

namespace kestrel::backend::cuda {

using quant::DType;

namespace {

constexpr int kWarps = 4;
constexpr int kRowsPerBlock = 16 * kWarps;

// Per type: quant blocks a lane owns per step, and the shared-memory layout of a step's
// activations, xs[token][step block][40 halfs] (32 elements + 8 halfs of padding).
template <DType T>
struct FragLayout {
  static constexpr int kBlocksPerLane = T == DType::Q4_0 ? 2 : 1;
  static constexpr int kStepBlocks = 4 * kBlocksPerLane;  // quant blocks per step
  static constexpr int kLoads = 2;  // 16-byte loads per row and step (Q4_0: 2 blocks; Q8_0: 1)
  static constexpr int kBlockStride = 40;  // halfs
  // Row stride in 4-byte words: congruent to 16 mod 32, so that the 8 lanes of a quarter warp
  // (2 tokens x 4 blocks, block stride 20 words) read 16 bytes from 8 distinct bank groups.
  static constexpr int kRowWords0 = kStepBlocks * kBlockStride / 2;
  static constexpr int kRowStride = 2 * (kRowWords0 + (48 - kRowWords0 % 32) % 32);  // halfs
};

// A lane's codes for one step: per row, kLoads 16-byte words (Q4_0: blocks c and c + 4; Q8_0:
// the two halves of block c) and kBlocksPerLane scales. Blocks past the split's end have zero
// scales.
template <DType T>
struct LaneCodes {
  uint4 raw[2][FragLayout<T>::kLoads];  // [row a / b]
  __half scale[2][FragLayout<T>::kBlocksPerLane];

  // Loads the step at quant block cb. qrow / drow: the lane's two rows (codes and scales), so
  // that a step costs the loop no 64-bit index arithmetic.
  __device__ __forceinline__ void load(const uint8_t* const (&qrow)[2],
                                       const __half* const (&drow)[2], int cb, int kb1, int c) {
    constexpr int kBPL = FragLayout<T>::kBlocksPerLane;
#pragma unroll
    for (int ab = 0; ab < 2; ++ab) {
#pragma unroll
      for (int h = 0; h < kBPL; ++h) {
        // Past the split's end: the last block's codes again (valid memory, no zeroing of
        // the words) with a zero scale, so that they decode to zeros.
        const int b = min(cb + c + 4 * h, kb1 - 1);
        const bool in = cb + c + 4 * h < kb1;
        scale[ab][h] = in ? drow[ab][b] : __ushort_as_half(0);
        if constexpr (T == DType::Q4_0) {
          raw[ab][h] = *reinterpret_cast<const uint4*>(qrow[ab] + b * 16);
        } else {
          const uint4* p = reinterpret_cast<const uint4*>(qrow[ab] + b * 32);
          raw[ab][0] = p[0];
          raw[ab][1] = p[1];
        }
      }
    }
  }

  // The word of codes for elements 8q + 4 sub .. + 3 of the lane's block h (Q4_0: high nibbles
  // for the second half of the block; codes_to_half2 masks them).
  __device__ __forceinline__ uint32_t word(int ab, int h, int q, int sub) const {
    if constexpr (T == DType::Q4_0) {
      const uint32_t* w = reinterpret_cast<const uint32_t*>(&raw[ab][h]);
      const uint32_t v = w[2 * (q % 2) + sub];
      return q >= 2 ? v >> 4 : v;
    } else {
      const int i = 2 * q + sub;
      return reinterpret_cast<const uint32_t*>(&raw[ab][i / 4])[i % 4];
    }
  }
};

// Which 16-byte chunks of a step's activations a thread copies: the same block and quarter of a
// block every step, for tokens t0, t0 + kTokensPerPass, ... (a loop over all chunks with a
// stride of the block size compiled to ~200 instructions a step, bench/NOTES.md).
template <DType T, int NT>
struct ActChunks {
  using L = FragLayout<T>;
  static constexpr int kChunksPerToken = L::kStepBlocks * 4;
  static constexpr int kTokensPerPass = kWarps * 32 / kChunksPerToken;
  static constexpr int kPasses = NT / kTokensPerPass;
  static_assert(kWarps * 32 % kChunksPerToken == 0 && NT % kTokensPerPass == 0);
  int blk;          // quant block within the step
  int t0;           // first token
  const __half* x;  // token t0's element 32 blk + 8 q, at quant block 0
  int pass_stride;  // halfs from a pass's token to the next pass's (n_in: a few thousand)
  int xs_at;        // its place in a step's buffer, in halfs

  __device__ __forceinline__ ActChunks(const __half* x16, int64_t n_in) {
    const int tid = static_cast<int>(threadIdx.x), q = tid % 4;
    blk = tid / 4 % L::kStepBlocks;
    t0 = tid / kChunksPerToken;
    x = x16 + t0 * n_in + 32 * blk + 8 * q;
    pass_stride = kTokensPerPass * static_cast<int>(n_in);
    xs_at = t0 * L::kRowStride + blk * L::kBlockStride + 8 * q;
  }

  // Copies quant blocks [cb, cb + kStepBlocks) of every token into xs (zeros past the split's
  // end and past n_tokens) and commits them as one cp.async group.
  __device__ __forceinline__ void stage(int n_tokens, int cb, int kb1, __half* xs) const {
    const bool block_in = cb + blk < kb1;
#pragma unroll
    for (int e = 0; e < kPasses; ++e) {
      const int t = t0 + e * kTokensPerPass;
      const bool in = block_in && t < n_tokens;
      const __half* src = in ? x + (e * pass_stride + 32 * cb) : x;
      __pipeline_memcpy_async(xs + xs_at + e * kTokensPerPass * L::kRowStride, src, 16,
                              in ? 0 : 16);
    }
    __pipeline_commit();
  }
};

// One product of a launch: out = x . W^T (+ bias) for a weight of n_out rows. With gridDim.y > 1
// (split K) each split writes partial[split][T][n_out] and the last split of a row block to
// finish sums them.
struct FragPart {
  const uint8_t* qs;
  const __half* d;
  int64_t n_out;
  float* out;
  const float* bias;
  float* partial;
  int row_block_end;  // row blocks of this part and the ones before it (blockIdx.x range)
};

// The kernel's arguments: up to kMatvecMaxParts products of the same activations (Q, K and V, or
// gate and up: one launch, one wave, one split-K tail). arrivals: one zeroed counter per row
// block of the grid, which the last split to arrive resets.
struct FragV2Args {
  FragPart parts[kMatvecMaxParts];
  int n_parts;
  int64_t n_in;
  const __half* x16;
  int n_tokens;
  int64_t blocks_per_split;
  unsigned* arrivals;
  uint32_t half2_magic;  // 0x64006400 for codes_to_half2, which needs it in a register
};

// The part that row block blockIdx.x belongs to, and the row block within it (constant indices
// only, so that the parameters are read in place).
__device__ __forceinline__ FragPart part_of_block(const FragV2Args& a, int& row_block) {
  FragPart part = a.parts[0];
  int begin = 0;
#pragma unroll
  for (int i = 1; i < kMatvecMaxParts; ++i) {
    if (i < a.n_parts && static_cast<int>(blockIdx.x) >= a.parts[i - 1].row_block_end) {
      begin = a.parts[i - 1].row_block_end;
      part = a.parts[i];
    }
  }
  row_block = static_cast<int>(blockIdx.x) - begin;
  return part;
}

// The last split of row block blockIdx.x to arrive sums every split's partial, in split order
// (deterministic), into out (+ bias): no second launch. Each thread owns NT * 64 / 128 outputs
// and reads one split of all of them at a time, so that a split's loads are in flight together
// (a loop per output chained its L2 round trips: 4096 x 4096 at 16 tokens took 13.5 us with it,
// 12.2 without, H200, bench/NOTES.md).
template <int NT>
__device__ void reduce_splits_if_last(const FragPart& part, int row_block, int n_tokens,
                                      unsigned* arrivals) {
  __shared__ unsigned arrived;
  __threadfence();  // this block's partials are visible to every SM before it is counted
  __syncthreads();
  if (threadIdx.x == 0) arrived = atomicAdd(&arrivals[blockIdx.x], 1u);
  __syncthreads();
  if (arrived != gridDim.y - 1) return;
  __threadfence();
  constexpr int kPer = NT * kRowsPerBlock / (kWarps * 32);
  const int64_t rb0 = static_cast<int64_t>(row_block) * kRowsPerBlock;
  int64_t at[kPer];  // offset of output e in out (and in each split's partial); -1: none
#pragma unroll
  for (int e = 0; e < kPer; ++e) {
    const int i = threadIdx.x + e * kWarps * 32;
    const int t = i / kRowsPerBlock;
    const int64_t r = rb0 + i % kRowsPerBlock;
    at[e] = t < n_tokens && r < part.n_out ? t * part.n_out + r : -1;
  }
  float v[kPer] = {};
  const int64_t split_stride = static_cast<int64_t>(n_tokens) * part.n_out;
#pragma unroll 4
  for (unsigned sp = 0; sp < gridDim.y; ++sp) {
    const float* p = part.partial + sp * split_stride;
#pragma unroll
    for (int e = 0; e < kPer; ++e)
      if (at[e] >= 0) v[e] += __ldcg(p + at[e]);
  }
#pragma unroll
  for (int e = 0; e < kPer; ++e)
    if (at[e] >= 0) part.out[at[e]] = v[e] + (part.bias ? part.bias[at[e] % part.n_out] : 0.0f);
  if (threadIdx.x == 0) arrivals[blockIdx.x] = 0;  // ready for the next launch
}

// On sm_90 devices unless KESTREL_CUDA_FRAG_CLUSTER=0 (the seed's b128 ub16 on the H200, twelfth
// session: 4,134 t/s against 4,014-4,031 without): the splits of a row block are one thread
// block cluster (sm_90), and they sum their results through distributed shared memory instead
// of partials in global memory, a fence, an arrival counter and the last block's reads (the
// chain of dependent round trips that makes most of the ~8 us each 16-token launch costs beyond
// its weights, bench/NOTES.md). Each block leaves its [T][64] results in its own shared memory
// `red`; after the cluster barrier, block `rank` sums outputs rank * 128 + tid, + splits * 128,
// ... over the splits in rank order (deterministic), and a second barrier keeps every block's
// shared memory alive until all have read it.
template <int NT>
__device__ void reduce_splits_in_cluster(const FragPart& part, int row_block, int n_tokens,
                                         const float (&acc)[NT / 8][4], float* red, int g, int c) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  namespace cg = cooperative_groups;
  cg::cluster_group cluster = cg::this_cluster();
  const int warp = threadIdx.x / 32;
  __syncthreads();  // every warp is done with the step buffers that `red` reuses
#pragma unroll
  for (int j = 0; j < NT / 8; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e)
      red[(8 * j + 2 * c + e % 2) * kRowsPerBlock + 16 * warp + g + 8 * (e / 2)] = acc[j][e];
  cluster.sync();
  const int splits = static_cast<int>(cluster.num_blocks()), rank = cluster.block_rank();
  const int64_t rb0 = static_cast<int64_t>(row_block) * kRowsPerBlock;
  for (int i = rank * kWarps * 32 + threadIdx.x; i < NT * kRowsPerBlock;
       i += splits * kWarps * 32) {
    float v = 0.0f;
    for (int r = 0; r < splits; ++r) v += cluster.map_shared_rank(red, r)[i];
    const int t = i / kRowsPerBlock;
    const int64_t row = rb0 + i % kRowsPerBlock;
    if (t < n_tokens && row < part.n_out)
      part.out[t * part.n_out + row] = v + (part.bias ? part.bias[row] : 0.0f);
  }
  cluster.sync();
#else
  (void)part, (void)row_block, (void)n_tokens, (void)acc, (void)red, (void)g, (void)c;
#endif
}

// acc += this step's products: the lane's codes `cur` (rows g, g + 8 of its warp) against the
// step's activations xb in shared memory.
template <DType T, int NT>
__device__ __forceinline__ void multiply_step(const LaneCodes<T>& cur, const __half* xb,
                                              uint32_t magic, int g, int c,
                                              float (&acc)[NT / 8][4]) {
  using L = FragLayout<T>;
#pragma unroll
  for (int h = 0; h < L::kBlocksPerLane; ++h) {
    const __half2 sa = __half2half2(cur.scale[0][h]), sb = __half2half2(cur.scale[1][h]);
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      // Elements 8q .. 8q + 7 of the lane's block, for tokens 8j + g: B of two k-steps.
      uint4 bx[NT / 8];
#pragma unroll
      for (int j = 0; j < NT / 8; ++j)
        bx[j] = *reinterpret_cast<const uint4*>(xb + (8 * j + g) * L::kRowStride +
                                                (c + 4 * h) * L::kBlockStride + 8 * q);
#pragma unroll
      for (int sub = 0; sub < 2; ++sub) {
        const uint32_t qa = cur.word(0, h, q, sub), qb = cur.word(1, h, q, sub);
        // Bytes 0,1 of a word are k-slots 2c, 2c+1; bytes 2,3 are 2c+8, 2c+9. Fragment order:
        // a0 row g, a1 row g+8, a2 / a3 the upper slots.
        const uint32_t af[4] = {
            codes_to_half2<T, 0x5150>(qa, magic, sa), codes_to_half2<T, 0x5150>(qb, magic, sb),
            codes_to_half2<T, 0x5352>(qa, magic, sa), codes_to_half2<T, 0x5352>(qb, magic, sb)};
#pragma unroll
        for (int j = 0; j < NT / 8; ++j)
          mma_16816(acc[j], af, sub ? bx[j].z : bx[j].x, sub ? bx[j].w : bx[j].y);
      }
    }
  }
}

// out[T][n_out] of blockIdx.x's part for its rows [64 * row block, +64), over quant blocks
// [blockIdx.y * blocks_per_split, +blocks_per_split).
// Five resident blocks per SM: the 96 registers the 16-token kernel takes (with the bound left
// out ptxas gives it 104-106 and only 4 fit; capped at 80 for 6 blocks it measured slower, seed
// b128 ub16 3,090 against 3,539 t/s, H200).
template <DType T, int NT, bool kCluster>
__global__ void __launch_bounds__(kWarps * 32, 5) matmul_frag_v2_kernel(const FragV2Args a) {
  int row_block = 0;
  const FragPart part = part_of_block(a, row_block);
  const uint8_t* qs = part.qs;
  const __half* d = part.d;
  const int64_t n_in = a.n_in, n_out = part.n_out;
  const int n_tokens = a.n_tokens;
  using L = FragLayout<T>;
  // Three step buffers, so that one barrier a step suffices: the buffer a step refills was last
  // read two steps before, and every warp has passed the previous step's barrier since.
  __shared__ __align__(16) __half xs[3][NT * L::kRowStride];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, c = lane % 4;
  const int64_t nb = n_in / 32;
  const int64_t row0 = static_cast<int64_t>(row_block) * kRowsPerBlock + 16 * warp;
  const int64_t rows[2] = {min(row0 + g, n_out - 1), min(row0 + g + 8, n_out - 1)};
  const uint8_t* const qrow[2] = {qs + rows[0] * nb * (T == DType::Q4_0 ? 16 : 32),
                                  qs + rows[1] * nb * (T == DType::Q4_0 ? 16 : 32)};
  const __half* const drow[2] = {d + rows[0] * nb, d + rows[1] * nb};
  // Quant block indices fit an int (n_in / 32): 32-bit index arithmetic in the step loop.
  const int kb0 = static_cast<int>(blockIdx.y * a.blocks_per_split);
  const int kb1 = static_cast<int>(min(nb, kb0 + a.blocks_per_split));
  // Launches are 8-token kernels for 5-8 tokens and 16-token ones for 9-16 (launch_type), so
  // every token tile of 8 holds a real token.

  float acc[NT / 8][4];
#pragma unroll
  for (int j = 0; j < NT / 8; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.0f;

  const uint32_t magic = a.half2_magic;
  const ActChunks<T, NT> chunks(a.x16, n_in);
  int buf = 0;
  // One step: multiplies `use` (quant blocks [cb, cb + kStepBlocks)) while the next step's
  // weights load into `fill` and its activations into the next buffer.
  auto step = [&](const LaneCodes<T>& use, LaneCodes<T>& fill, int cb) {
    fill.load(qrow, drow, cb + L::kStepBlocks, kb1, c);
    const int next_buf = buf == 2 ? 0 : buf + 1;
    chunks.stage(n_tokens, cb + L::kStepBlocks, kb1, xs[next_buf]);
    __pipeline_wait_prior(1);  // this step's activations have landed
    __syncthreads();
    multiply_step<T, NT>(use, xs[buf], magic, g, c, acc);
    buf = next_buf;
  };
  // Two code buffers taking turns (a copy of the next step's codes into the current one cost
  // ~20 moves a step).
  LaneCodes<T> codes0, codes1;
  codes0.load(qrow, drow, kb0, kb1, c);
  chunks.stage(n_tokens, kb0, kb1, xs[0]);
  for (int cb = kb0; cb < kb1; cb += 2 * L::kStepBlocks) {
    step(codes0, codes1, cb);
    if (cb + L::kStepBlocks >= kb1) break;
    step(codes1, codes0, cb + L::kStepBlocks);
  }
  __pipeline_wait_prior(0);  // the last (empty) step's copies, before the block exits
  if constexpr (kCluster) {
    static_assert(sizeof(xs) >= sizeof(float) * NT * kRowsPerBlock);
    reduce_splits_in_cluster<NT>(part, row_block, n_tokens, acc, reinterpret_cast<float*>(xs), g,
                                 c);
    return;
  }
  // C fragment: acc[j][0..1] row g, tokens 8j + 2c, +1; acc[j][2..3] row g + 8.
  const bool split = gridDim.y > 1;
  float* dst = split ? part.partial + blockIdx.y * n_tokens * n_out : part.out;
#pragma unroll
  for (int j = 0; j < NT / 8; ++j) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int t = 8 * j + 2 * c + e % 2;
      const int64_t r = row0 + g + 8 * (e / 2);
      if (t < n_tokens && r < n_out)
        dst[t * n_out + r] = acc[j][e] + (!split && part.bias ? part.bias[r] : 0.0f);
    }
  }
  if (split) reduce_splits_if_last<NT>(part, row_block, n_tokens, a.arrivals);
}

// (As a programmatic dependent launch, with its first step's weights loaded before the kernel
// before it ends, it measured the same: 3,582 against 3,539 t/s, seed b128 ub16, H200.)
template <DType T, int NT>
cudaError_t launch_cluster(const FragV2Args& a, dim3 grid, cudaStream_t s) {
  cudaLaunchConfig_t config{};
  config.gridDim = grid;
  config.blockDim = dim3(kWarps * 32);
  config.stream = s;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = 1;
  attr[0].val.clusterDim.y = grid.y;
  attr[0].val.clusterDim.z = 1;
  config.attrs = attr;
  config.numAttrs = 1;
  return cudaLaunchKernelEx(&config, matmul_frag_v2_kernel<T, NT, true>, a);
}

template <DType T>
cudaError_t launch_type(const FragV2Args& a, int splits, bool cluster, cudaStream_t s) {
  const dim3 grid(a.parts[a.n_parts - 1].row_block_end, splits);
  if (cluster && splits > 1)
    return a.n_tokens <= 8 ? launch_cluster<T, 8>(a, grid, s) : launch_cluster<T, 16>(a, grid, s);
  if (a.n_tokens <= 8)
    matmul_frag_v2_kernel<T, 8, false><<<grid, kWarps * 32, 0, s>>>(a);
  else
    matmul_frag_v2_kernel<T, 16, false><<<grid, kWarps * 32, 0, s>>>(a);
  return cudaSuccess;
}

// Splits of a row block summed in a thread block cluster (reduce_splits_in_cluster) on an sm_90
// device unless KESTREL_CUDA_FRAG_CLUSTER=0: at most kMaxClusterSplits (the portable
// cluster size).
constexpr int kMaxClusterSplits = 8;
bool frag_cluster() {
  static const bool on = [] {
    const char* e = std::getenv("KESTREL_CUDA_FRAG_CLUSTER");
    int device = 0, major = 0;
    return !(e && std::string(e) == "0") && cudaGetDevice(&device) == cudaSuccess &&
           cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) ==
               cudaSuccess &&
           major >= 9;
  }();
  return on;
}

// Blocks the grid aims for: enough 4-warp blocks on every SM to keep the weight stream's loads
// in flight (KESTREL_CUDA_FRAG_BLOCKS_PER_SM overrides the 4 per SM, for measurements).
int target_blocks() {
  static const int target = [] {
    int device = 0, sms = 132;
    if (cudaGetDevice(&device) != cudaSuccess ||
        cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess)
      sms = 132;
    const char* env = std::getenv("KESTREL_CUDA_FRAG_BLOCKS_PER_SM");
    const int per_sm = env ? std::clamp(std::atoi(env), 1, 32) : 4;
    return sms * per_sm;
  }();
  return target;
}

// Quant blocks per split: whole steps of either type (8 blocks).
constexpr int64_t kSplitQuantum = 8;

// Blocks of the 16-token Q4_0 kernel that are resident at once on the whole GPU (registers and
// shared memory allow 5 per SM on sm_90, ncu).
int resident_blocks() {
  static const int n = [] {
    int device = 0, sms = 132, per_sm = 0;
    if (cudaGetDevice(&device) != cudaSuccess ||
        cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess)
      sms = 132;
    if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm,
                                                      matmul_frag_v2_kernel<DType::Q4_0, 16, false>,
                                                      kWarps * 32, 0) != cudaSuccess ||
        per_sm <= 0)
      per_sm = 4;
    return sms * per_sm;
  }();
  return n;
}

// As many splits as fit one wave of resident blocks, never more (KESTREL_CUDA_NO_FRAG_ONE_WAVE=1:
// aim at 4 blocks per SM with a rounded-up split count, which for 11008-row matrices gives 688
// blocks against 660 resident: one full wave and a tail of 28 blocks that run alone). H200, seed
// b128 ub16: 2,715 t/s against 2,668 for the unchanged baseline row, within its spread.
bool one_wave() {
  static const bool on = [] {
    const char* e = std::getenv("KESTREL_CUDA_NO_FRAG_ONE_WAVE");
    return !(e && std::string(e) == "1");
  }();
  return on;
}

}  // namespace

bool frag_supports(DType type, int64_t n_in, int n_tokens) {
  return (type == DType::Q4_0 || type == DType::Q8_0) && n_tokens >= kFragMinTokens &&
         n_tokens <= kFragMaxTokens && n_in % 32 == 0;
}

// KESTREL_CUDA_FRAG_SPLITS=N forces N splits of K (at most 16, and at most one per step), for
// measurements; 0 or unset: the rule below.
int forced_splits() {
  static const int n = [] {
    const char* e = std::getenv("KESTREL_CUDA_FRAG_SPLITS");
    return e ? std::clamp(std::atoi(e), 0, 16) : 0;
  }();
  return n;
}

int frag_v2_row_blocks(const MatvecPart* parts, int n_parts) {
  int n = 0;
  for (int i = 0; i < n_parts; ++i) n += ceil_div(parts[i].w->n_out, kRowsPerBlock);
  return n;
}

namespace {

// Quant blocks per split when nb blocks are split `splits` ways: whole quanta.
int64_t blocks_per_split(int64_t nb, int splits) {
  return ceil_div(ceil_div(nb, splits), kSplitQuantum) * kSplitQuantum;
}

}  // namespace

int frag_v2_splits(int64_t n_in, int row_blocks) {
  const int64_t quanta = ceil_div(n_in / 32, kSplitQuantum);
  const int64_t cap = frag_cluster() ? kMaxClusterSplits : 16;
  int splits = 0;
  if (forced_splits() > 0) {
    splits =
        static_cast<int>(std::clamp<int64_t>(forced_splits(), 1, std::min<int64_t>(quanta, cap)));
  } else {
    // Each split keeps at least two steps, so that loads of the next step overlap the current
    // one.
    const int most = static_cast<int>(std::clamp<int64_t>(quanta / 2, 1, cap));
    splits = one_wave() ? std::clamp(resident_blocks() / row_blocks, 1, most)
                        : std::clamp(ceil_div(target_blocks(), row_blocks), 1, most);
  }
  // Splits are whole quanta: drop the ones that rounding up left empty.
  return static_cast<int>(ceil_div(n_in / 32, blocks_per_split(n_in / 32, splits)));
}

Status launch_matmul_frag_v2(const MatvecPart* parts, int n_parts, const __half* x, int n_tokens,
                             float* partial, unsigned* arrivals, cudaStream_t s) {
  if (n_parts < 1 || n_parts > kMatvecMaxParts)
    return error("matmul (fragments): %d products in one launch (1 to %d)", n_parts,
                 kMatvecMaxParts);
  const CudaWeight& w0 = *parts[0].w;
  const int splits = frag_v2_splits(w0.n_in, frag_v2_row_blocks(parts, n_parts));
  const int64_t nb = w0.n_in / 32;
  FragV2Args a{};
  a.n_parts = n_parts;
  a.n_in = w0.n_in;
  a.x16 = x;
  a.n_tokens = n_tokens;
  a.blocks_per_split = blocks_per_split(nb, splits);
  a.arrivals = arrivals;
  a.half2_magic = 0x64006400u;
  int row_blocks = 0;
  int64_t partial_at = 0;
  for (int i = 0; i < n_parts; ++i) {
    const CudaWeight& w = *parts[i].w;
    row_blocks += ceil_div(w.n_out, kRowsPerBlock);
    a.parts[i] = {w.qs,         w.d,           w.n_out,
                  parts[i].out, parts[i].bias, splits > 1 ? partial + partial_at : nullptr,
                  row_blocks};
    partial_at += int64_t{splits} * n_tokens * w.n_out;
  }
  const bool cluster = frag_cluster();
  CUDA_TRY(w0.type == DType::Q4_0 ? launch_type<DType::Q4_0>(a, splits, cluster, s)
                                  : launch_type<DType::Q8_0>(a, splits, cluster, s),
           "matmul (tensor cores, weights in fragments, v2: cluster launch)");
  LAUNCH_CHECK("matmul (tensor cores, weights in fragments, v2)");
  return Status::ok();
}

}  // namespace kestrel::backend::cuda
