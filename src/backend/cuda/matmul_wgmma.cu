// Matmul for prompt chunks (T > kMmaMaxTokens) of Q4_0 weights on Hopper's warpgroup tensor-core
// instructions (wgmma, sm_90a) that read the quantized weight itself. The GEMM path expands every
// weight to f16 in memory first (3.5 GB of Q4_0 read, 13.4 GB of f16 written and read again per
// llama2-7b pass: 4.6 ms of a 16.6 ms pp512 pass, bench/NOTES.md); here each thread decodes its
// share of a weight tile in registers right before the tensor cores take it.
//
// A block computes 128 weight rows x BN tokens (BN = 128 or 192, whichever takes fewer waves of
// blocks: wgmma_tile_tokens): two consumer warpgroups of 64 rows (wgmma m64nBNk16 with the A
// operand in registers, f32 accumulators: BN / 2 registers a thread) sharing each activation
// tile, and one producer warp, one block an SM (KESTREL_CUDA_WGMMA_BM=64: one warpgroup of 64
// rows x 128 or 256 tokens, two blocks an SM). Up to kMatvecMaxParts weights of one width (Q, K
// and V; gate and up) share a launch, their row tiles side by side along the grid's x. For
// each 64-wide step of K the producer has the copy engine (TMA) bring one of the shared-memory
// stages: the f16 activations of the block's tokens in the 128-byte swizzled layout wgmma reads
// through a matrix descriptor, the rows' Q4_0 codes (32 bytes a row) and their scales; a
// full/empty pair of mbarriers per stage hands it over. Each consumer thread
// decodes its fragment of the weight (rows g and g + 8 of its warp's 16) to the same f16 values
// as the GEMM path's dequantization, round((q - 8) * d), and the warpgroup issues four wgmmas,
// one per 16 of K; a step's wgmmas run while the next step is decoded into the other of two
// register sets.
//
// The default since the twelfth session (v4: llama2-7b pp512 34,437 t/s against 31,081 on the GEMM
// path, KESTREL_CUDA_WGMMA=0; full GPU op tests passed). Earlier, on the H200 (bench/NOTES.md,
// ninth session), the version with two warpgroups of 64 rows x 128 tokens a block: ~430-500
// TFLOP/s at 512 tokens including the decoding, against cuBLAS's 570-630 on f16 tiles plus the
// tiles' dequantization, so whole passes came out even (llama2-7b pp512 31,446 against 31,280) or
// slower (llama3-8b pp512 26,832 against 30,109); ncu: tensor pipe 52% busy, the consumers'
// ~180 instructions a warp a step the limit -- hence the 256-token tiles. The first version
// (cp.async by every thread, a block barrier a step) ran ~234 instructions a warp a step at 6
// cycles each. One full GPU op-test run failed four Q4_0 matmul tests with that version (errors
// of 5-20%, n_in = 1024 shapes and the 4096 one) that passed twice in a process of their own;
// v4's full runs (twelfth session: op tests, e2e at -ngl 99 and 1) have not failed.
#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <tuple>

#include "backend/cuda/cuda_backend_impl.cuh"
#include "backend/cuda/frag_common.cuh"
#include "backend/cuda/wgmma_ops.cuh"

namespace kestrel::backend::cuda {

using quant::DType;

namespace {

constexpr int kBK = 64;        // K a step: two Q4_0 blocks a row, one 128-byte swizzle row of f16
constexpr int kScaleCols = 8;  // scales a row a copy (16 bytes: TMA's least box)

// A block: WGS consumer warpgroups of 64 weight rows each and BN tokens, and a producer warp.
// One warpgroup: two blocks an SM (3 stages of 256 tokens, 5 of 128); two warpgroups sharing
// each activation tile (half the copies per output): one block, 6 stages of 128 or 192 tokens
// (256 would need more registers than 9 warps get: 168 a thread, three warps on one scheduler).
template <int WGS, int BN>
struct Tile {
  static constexpr int kBM = 64 * WGS;                      // weight rows a block
  static constexpr int kConsumers = 128 * WGS;              // consumer threads
  static constexpr int kThreads = kConsumers + 32;          // and the producer warp
  static constexpr int kActBytes = BN * kBK * 2;            // a stage's activations
  static constexpr int kCodeBytes = kBM * kBK / 2;          // its codes
  static constexpr int kScaleBytes = kBM * kScaleCols * 2;  // its scales (two a row used)
  static constexpr int kStageBytes = kActBytes + kCodeBytes + kScaleBytes;
  static constexpr int kStages = WGS == 2 ? 6 : BN == 256 ? 3 : 5;
  static constexpr int kSmemBytes = kStages * kStageBytes + 2 * kStages * 8 + 1024;  // + align
  static_assert(kStageBytes % 1024 == 0, "stages keep the activations 1024-aligned (swizzle)");
  static_assert((WGS == 1 ? 2 : 1) * (kSmemBytes + 1024) <= 232448, "blocks an SM");
};

// One product of a launch: blocks [first_tile, next part's) along x take its rows.
struct WgmmaPart {
  int64_t n_out;
  float* out;  // [T][n_out]
  const float* bias;
  int first_tile;
};

// Up to kMatvecMaxParts weights of one width that read the same activations (Q, K and V; gate
// and up) in one launch: with grouped-query attention K and V have a quarter of Q's rows
// (llama3-8b: 1024), 8 row tiles x 4 token tiles at 512 tokens, so alone each held 32 of 132
// SMs for as long as Q's launch took with all of them.
struct WgmmaArgs {
  CUtensorMap act;
  CUtensorMap codes[kMatvecMaxParts];
  CUtensorMap scales[kMatvecMaxParts];
  WgmmaPart parts[kMatvecMaxParts];
  int n_parts;
  int n_tokens;
  int steps;             // n_in / kBK, even
  uint32_t half2_magic;  // 0x64006400 (see codes_to_half2)
};

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)

// The thread's A fragments of a step: A[4 s + i] is register i of the m64k16 fragment of K
// slice s (16 elements): i = 0 / 1 rows g / g + 8 at k = 2t, 2t + 1; i = 2 / 3 the same rows at
// k = 2t + 8, 2t + 9. Slice s is half s % 2 of Q4_0 block s / 2: byte j of a block holds element
// j (low nibble) and j + 16 (high nibble), so the thread's four bytes of a block serve two slices.
// `codes` points at the thread's first row's bytes 4 (t / 2) of a stage's [rows][32] codes,
// `scales` at that row's step scales in a stage's [rows][8] (the addresses are set up once; a
// step adds the stage's offset). sel: the byte selector for t's pairs.
__device__ __forceinline__ void decode_step(const uint8_t* codes, const uint8_t* scales,
                                            uint32_t sel, uint32_t magic, uint32_t (&A)[16]) {
#pragma unroll
  for (int ri = 0; ri < 2; ++ri) {
    const uint32_t sc = *reinterpret_cast<const uint32_t*>(scales + ri * 8 * 2 * kScaleCols);
#pragma unroll
    for (int blk = 0; blk < 2; ++blk) {
      const uint8_t* cb = codes + ri * 8 * 32 + blk * 16;
      // bytes 2t, 2t + 1, 2t + 8, 2t + 9 of the block
      const uint32_t pair = __byte_perm(*reinterpret_cast<const uint32_t*>(cb),
                                        *reinterpret_cast<const uint32_t*>(cb + 8), sel);
      const uint32_t s2 = __byte_perm(sc, 0, blk ? 0x3232 : 0x1010);
      __half2 d;
      memcpy(&d, &s2, 4);
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const uint32_t w = h ? pair >> 4 : pair;
        A[4 * (2 * blk + h) + ri] = codes_to_half2<DType::Q4_0, 0x5150>(w, magic, d);
        A[4 * (2 * blk + h) + 2 + ri] = codes_to_half2<DType::Q4_0, 0x5352>(w, magic, d);
      }
    }
  }
}

template <int BN>
__device__ __forceinline__ void mma_step(uint32_t acts, float* acc, const uint32_t (&A)[16]) {
  uint64_t desc[4];
#pragma unroll
  for (int s = 0; s < 4; ++s) desc[s] = act_descriptor(acts + 32 * s);
  wgmma_fence();
  if constexpr (BN == 256)
    wgmma_m64n256k64(acc, A, desc);
  else if constexpr (BN == 192)
    wgmma_m64n192k64(acc, A, desc);
  else
    wgmma_m64n128k64(acc, A, desc);
  wgmma_commit();
}

// The producer: one thread keeps the stages filled, up to kStages steps ahead of the consumers.
template <int WGS, int BN>
__device__ __forceinline__ void produce(const CUtensorMap& act_map, const CUtensorMap& code_map,
                                        const CUtensorMap& scale_map, int steps, int m0, int n0,
                                        uint32_t stages, uint32_t full, uint32_t empty) {
  using L = Tile<WGS, BN>;
  int s = 0;
  uint32_t phase = 0;  // of the empty barriers' completions this pass over the stages waits for
  for (int ks = 0; ks < steps; ++ks) {
    if (ks >= L::kStages) barrier_wait(empty + 8 * s, phase);
    const uint32_t stage = stages + s * L::kStageBytes, bar = full + 8 * s;
    barrier_expect(bar, L::kStageBytes);
    tma_load(stage, act_map, ks * kBK, n0, bar);
    tma_load(stage + L::kActBytes, code_map, ks * kBK / 2, m0, bar);
    // The scales of steps 4i .. 4i + 3: a box must start 16-byte aligned (a box at step ks's own
    // two scales a row, 4-byte aligned, was an illegal instruction on the H200).
    tma_load(stage + L::kActBytes + L::kCodeBytes, scale_map, (ks / 4) * kScaleCols, m0, bar);
    if (++s == L::kStages) {
      s = 0;
      if (ks >= L::kStages) phase ^= 1;
    }
  }
}

// The accumulators into out (+ bias): acc[4 j + e] is row r + 8 (e / 2), token n + 8 j + e % 2.
template <int BN>
__device__ __forceinline__ void store_tile(const WgmmaPart& a, int n_tokens, const float* acc,
                                           int64_t r, int n) {
#pragma unroll
  for (int e2 = 0; e2 < 2; ++e2, r += 8) {
    if (r >= a.n_out) continue;
    const float b = a.bias ? a.bias[r] : 0.0f;
#pragma unroll
    for (int j = 0; j < BN / 8; ++j) {
#pragma unroll
      for (int e1 = 0; e1 < 2; ++e1) {
        const int tok = n + 8 * j + e1;
        if (tok < n_tokens)
          a.out[static_cast<int64_t>(tok) * a.n_out + r] = acc[4 * j + 2 * e2 + e1] + b;
      }
    }
  }
}

#endif  // __CUDA_ARCH_FEAT_SM90_ALL

// (kThreads, 1): with 2, ptxas capped the 256-token kernel at 168 registers and serialized its
// wgmmas; it takes 171, and two blocks still fit an SM (2 x 5 warps x 176 x 32 registers).
template <int WGS, int BN>
__global__ void __launch_bounds__(Tile<WGS, BN>::kThreads, 1)
    matmul_wgmma_q4_0_kernel(const __grid_constant__ WgmmaArgs a) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using L = Tile<WGS, BN>;
  // One register set of A when 128 accumulators leave no room for two: the other block of the
  // SM keeps the tensor cores busy while this one decodes.
  constexpr bool kOneSet = BN == 256;
  extern __shared__ uint8_t smem_raw[];
  const uint32_t raw = smem_addr(smem_raw);
  const uint32_t pad = ((raw + 1023) & ~1023u) - raw;
  const uint8_t* base = smem_raw + pad;
  const uint32_t stages = raw + pad;
  const uint32_t full = stages + L::kStages * L::kStageBytes, empty = full + 8 * L::kStages;
  const int tid = threadIdx.x;
  if (tid == 0) {
    for (int s = 0; s < L::kStages; ++s) {
      barrier_init(full + 8 * s, 1);
      barrier_init(empty + 8 * s, L::kConsumers);
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  __syncthreads();
  int p = 0;  // the block's product
#pragma unroll
  for (int i = 1; i < kMatvecMaxParts; ++i)
    if (i < a.n_parts && static_cast<int>(blockIdx.x) >= a.parts[i].first_tile) p = i;
  const int m0 = (blockIdx.x - a.parts[p].first_tile) * L::kBM, n0 = blockIdx.y * BN;
  if (tid >= L::kConsumers) {
    if (tid == L::kConsumers)
      produce<WGS, BN>(a.act, a.codes[p], a.scales[p], a.steps, m0, n0, stages, full, empty);
    return;
  }
  const int lane = tid % 32, g = lane / 4, t = lane % 4;
  const int row = 16 * (tid / 32) + g;  // the thread's rows in the block: row, row + 8
  const uint8_t* codes = base + L::kActBytes + row * 32 + 4 * (t / 2);  // stage 0's
  const uint8_t* scales = base + L::kActBytes + L::kCodeBytes + row * 2 * kScaleCols;
  const uint32_t sel = t % 2 ? 0x7632 : 0x5410;

  float acc[BN / 2];
#pragma unroll
  for (int i = 0; i < BN / 2; ++i) acc[i] = 0.0f;
  uint32_t A0[16], A1[16];
  int s = 0, prev = 0;
  uint32_t phase = 0;
  // Step ks in stage s: wait for it, decode, issue its wgmmas, then wait for step ks - 1's wgmmas
  // and hand that step's stage back to the producer (one register set: step ks's own).
  auto step = [&](int ks, uint32_t(&A)[16]) {
    barrier_wait(full + 8 * s, phase);
    const int off = s * L::kStageBytes;
    decode_step(codes + off, scales + off + 4 * (ks % 4), sel, a.half2_magic, A);
    mma_step<BN>(stages + off, acc, A);
    if constexpr (kOneSet) {
      wgmma_wait<0>();
      barrier_arrive(empty + 8 * s);
    } else {
      wgmma_wait<1>();
      if (ks > 0) barrier_arrive(empty + 8 * prev);
    }
    prev = s;
    if (++s == L::kStages) {
      s = 0;
      phase ^= 1;
    }
  };
  for (int ks = 0; ks < a.steps; ks += 2) {
    step(ks, A0);
    step(ks + 1, kOneSet ? A0 : A1);
  }
  wgmma_wait<0>();
#pragma unroll
  for (int i = 0; i < BN / 2; ++i) fence_operand(acc[i]);
  store_tile<BN>(a.parts[p], a.n_tokens, acc, m0 + row, n0 + 2 * t);
#endif
}

// 1 when the kernel above was compiled for sm_90a (the wgmma instructions are there).
__global__ void wgmma_probe_kernel(int* flag) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  *flag = 1;
#else
  *flag = 0;
#endif
}

PFN_cuTensorMapEncodeTiled_v12000 encode_fn = nullptr;

// A 2-D tensor map over `base` (rows of `cols` elements, `row_bytes` apart), copied in boxes of
// box_cols x box_rows.
Expected<CUtensorMap> tensor_map(CUtensorMapDataType type, const void* base, uint64_t cols,
                                 uint64_t rows, uint64_t row_bytes, uint32_t box_cols,
                                 uint32_t box_rows, CUtensorMapSwizzle swizzle) {
  CUtensorMap map;
  const cuuint64_t dims[2] = {cols, rows};
  const cuuint64_t strides[1] = {row_bytes};
  const cuuint32_t box[2] = {box_cols, box_rows};
  const cuuint32_t elem_strides[2] = {1, 1};
  const CUresult r =
      encode_fn(&map, type, 2, const_cast<void*>(base), dims, strides, box, elem_strides,
                CU_TENSOR_MAP_INTERLEAVE_NONE, swizzle, CU_TENSOR_MAP_L2_PROMOTION_L2_128B,
                CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (r != CUDA_SUCCESS)
    return error("wgmma matmul: tensor map of %llu x %llu elements failed (CUDA driver error %d)",
                 static_cast<unsigned long long>(rows), static_cast<unsigned long long>(cols),
                 static_cast<int>(r));
  return map;
}

}  // namespace

// Tensor maps by what they encode (address and shape): a weight's codes and scales, and the f16
// activations of a call. A map stays valid for whatever memory later sits at the same address
// with the same shape.
class WgmmaMapCache {
 public:
  Expected<CUtensorMap> get(int kind, const void* p, int64_t a, int64_t b) {
    const Key key{kind, p, a, b};
    if (const auto it = maps_.find(key); it != maps_.end()) return it->second;
    if (maps_.size() >= 4096) maps_.clear();
    Expected<CUtensorMap> m = make(kind, p, a, b);
    if (m) maps_.emplace(key, *m);
    return m;
  }

 private:
  using Key = std::tuple<int, const void*, int64_t, int64_t>;
  static Expected<CUtensorMap> make(int kind, const void* p, int64_t n_in, int64_t rows) {
    switch (kind) {
      case kMapActs64x128:
      case kMapActs64x192:
      case kMapActs64x256:
      case kMapActs64x16:
        return tensor_map(CU_TENSOR_MAP_DATA_TYPE_FLOAT16, p, n_in, rows, n_in * 2, kBK,
                          kind == kMapActs64x128   ? 128
                          : kind == kMapActs64x192 ? 192
                          : kind == kMapActs64x256 ? 256
                                                   : 16,
                          CU_TENSOR_MAP_SWIZZLE_128B);
      case kMapCodes32x64:
      case kMapCodes32x128:
        return tensor_map(CU_TENSOR_MAP_DATA_TYPE_UINT8, p, n_in / 2, rows, n_in / 2, kBK / 2,
                          kind == kMapCodes32x64 ? 64 : 128, CU_TENSOR_MAP_SWIZZLE_NONE);
      case kMapCodes128x64:
        return tensor_map(CU_TENSOR_MAP_DATA_TYPE_UINT8, p, n_in / 2, rows, n_in / 2, 128, 64,
                          CU_TENSOR_MAP_SWIZZLE_128B);
      default:  // kMapScales8x64, kMapScales8x128
        return tensor_map(CU_TENSOR_MAP_DATA_TYPE_FLOAT16, p, n_in / 32, rows, n_in / 16,
                          kScaleCols, kind == kMapScales8x64 ? 64 : 128,
                          CU_TENSOR_MAP_SWIZZLE_NONE);
    }
  }
  std::map<Key, CUtensorMap> maps_;
};

void WgmmaMapCacheDeleter::operator()(WgmmaMapCache* c) const {
  delete c;
}

Expected<bool> wgmma_available(int device) {
  cudaDeviceProp prop{};
  CUDA_TRY(cudaGetDeviceProperties(&prop, device), "wgmma probe (device properties)");
  if (prop.major != 9 || prop.minor != 0) return false;
  const int most = std::max({Tile<1, 128>::kSmemBytes, Tile<1, 256>::kSmemBytes,
                             Tile<2, 128>::kSmemBytes, Tile<2, 192>::kSmemBytes});
  if (prop.sharedMemPerBlockOptin < static_cast<size_t>(most)) return false;
  static std::once_flag once;
  std::call_once(once, [] {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult q{};
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault,
                                         &q) == cudaSuccess &&
        q == cudaDriverEntryPointSuccess)
      encode_fn = reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(fn);
    cudaGetLastError();
  });
  if (!encode_fn) return false;
  KESTREL_ASSIGN_OR_RETURN(const bool compiled,
                           probe_says_compiled(wgmma_probe_kernel, "wgmma probe"));
  if (!compiled) return false;
  CUDA_TRY(
      cudaFuncSetAttribute(matmul_wgmma_q4_0_kernel<1, 128>,
                           cudaFuncAttributeMaxDynamicSharedMemorySize, Tile<1, 128>::kSmemBytes),
      "wgmma matmul (shared memory limit)");
  CUDA_TRY(
      cudaFuncSetAttribute(matmul_wgmma_q4_0_kernel<1, 256>,
                           cudaFuncAttributeMaxDynamicSharedMemorySize, Tile<1, 256>::kSmemBytes),
      "wgmma matmul (shared memory limit)");
  CUDA_TRY(
      cudaFuncSetAttribute(matmul_wgmma_q4_0_kernel<2, 128>,
                           cudaFuncAttributeMaxDynamicSharedMemorySize, Tile<2, 128>::kSmemBytes),
      "wgmma matmul (shared memory limit)");
  CUDA_TRY(
      cudaFuncSetAttribute(matmul_wgmma_q4_0_kernel<2, 192>,
                           cudaFuncAttributeMaxDynamicSharedMemorySize, Tile<2, 192>::kSmemBytes),
      "wgmma matmul (shared memory limit)");
  return true;
}

WgmmaMapCache* new_wgmma_map_cache() {
  return new WgmmaMapCache();
}

Expected<CUtensorMap> wgmma_tensor_map(WgmmaMapCache& maps, WgmmaMapKind kind, const void* p,
                                       int64_t n_in, int64_t rows) {
  return maps.get(kind, p, n_in, rows);
}

// n_in a multiple of 256: an even number of steps, and scale rows whose byte stride TMA takes (a
// multiple of 16).
bool wgmma_supports(DType type, int64_t n_in, int n_tokens) {
  return type == DType::Q4_0 && n_in % 256 == 0 && n_tokens > kMmaMaxTokens;
}

namespace {

// The launch of one tile shape: its tensor maps (codes and scales in boxes of its rows) and grid,
// the parts' row tiles side by side along x.
template <int WGS, int BN>
Status launch_tile(WgmmaMapCache& maps, const MatvecPart* parts, int n_parts, const __half* x16,
                   int n_tokens, cudaStream_t s) {
  using L = Tile<WGS, BN>;
  const int64_t n_in = parts[0].w->n_in;
  WgmmaArgs args{};
  KESTREL_ASSIGN_OR_RETURN(args.act, maps.get(BN == 256   ? kMapActs64x256
                                              : BN == 192 ? kMapActs64x192
                                                          : kMapActs64x128,
                                              x16, n_in, n_tokens));
  int tiles = 0;
  for (int i = 0; i < n_parts; ++i) {
    const CudaWeight& w = *parts[i].w;
    KESTREL_ASSIGN_OR_RETURN(
        args.codes[i], maps.get(WGS == 1 ? kMapCodes32x64 : kMapCodes32x128, w.qs, n_in, w.n_out));
    KESTREL_ASSIGN_OR_RETURN(
        args.scales[i], maps.get(WGS == 1 ? kMapScales8x64 : kMapScales8x128, w.d, n_in, w.n_out));
    args.parts[i] = {w.n_out, parts[i].out, parts[i].bias, tiles};
    tiles += ceil_div(w.n_out, L::kBM);
  }
  args.n_parts = n_parts;
  args.n_tokens = n_tokens;
  args.steps = static_cast<int>(n_in / kBK);
  args.half2_magic = 0x64006400u;
  const dim3 grid(tiles, ceil_div(n_tokens, BN));
  matmul_wgmma_q4_0_kernel<WGS, BN><<<grid, L::kThreads, L::kSmemBytes, s>>>(args);
  LAUNCH_CHECK("matmul (wgmma, Q4_0)");
  return Status::ok();
}

int env_int(const char* name) {
  const char* e = std::getenv(name);
  return e ? std::atoi(e) : 0;
}

// The token width of a launch's two-warpgroup tiles, 128 or 192 (one block an SM either way):
// whichever takes fewer waves of blocks, a 192-token block counted as 1.2 of a 128-token one
// (the decoding of the weights, the kernel's limit, is the same for both; its products take 1.5x
// as long). Fitted on the H100 (twentieth session): pp2048 with 192 everywhere 36,564 t/s
// against 33,182 with 128 (16 against 11 tiles of tokens), pp512 32,473 against 33,954 (the
// 4096-row products, 32 row tiles, fill 96 of 132 SMs with three 192-token tiles).
int wgmma_tile_tokens(int row_tiles, int n_tokens, int sms) {
  constexpr double kBlockTime192 = 1.2;
  const auto waves = [&](int bn) {
    return ceil_div(int64_t{row_tiles} * ceil_div(n_tokens, bn), sms);
  };
  return kBlockTime192 * waves(192) < waves(128) ? 192 : 128;
}

}  // namespace

// Two-warpgroup blocks of wgmma_tile_tokens' width (KESTREL_CUDA_WGMMA_BN=128 / 192 forces it);
// KESTREL_CUDA_WGMMA_BM=64: one warpgroup, with 256-token tiles unless 128 pads T less
// (KESTREL_CUDA_WGMMA_BN=128 / 256 forcing that width).
Status launch_matmul_wgmma(WgmmaMapCache& maps, const MatvecPart* parts, int n_parts,
                           const __half* x16, int n_tokens, int sms, cudaStream_t s) {
  if (n_parts < 1 || n_parts > kMatvecMaxParts)
    return error("matmul (wgmma): %d products in one launch (1 to %d)", n_parts, kMatvecMaxParts);
  for (int i = 1; i < n_parts; ++i)
    if (parts[i].w->n_in != parts[0].w->n_in)
      return error("matmul (wgmma): '%s' and '%s' differ in width", parts[0].w->name.c_str(),
                   parts[i].w->name.c_str());
  static const int forced_bm = env_int("KESTREL_CUDA_WGMMA_BM");
  static const int forced_bn = env_int("KESTREL_CUDA_WGMMA_BN");
  if (forced_bm != 64) {
    int row_tiles = 0;
    for (int i = 0; i < n_parts; ++i) row_tiles += ceil_div(parts[i].w->n_out, Tile<2, 128>::kBM);
    const int bn = forced_bn == 128 || forced_bn == 192
                       ? forced_bn
                       : wgmma_tile_tokens(row_tiles, n_tokens, std::max(sms, 1));
    return bn == 192 ? launch_tile<2, 192>(maps, parts, n_parts, x16, n_tokens, s)
                     : launch_tile<2, 128>(maps, parts, n_parts, x16, n_tokens, s);
  }
  const int bn = forced_bn == 128 || forced_bn == 256                             ? forced_bn
                 : ceil_div(n_tokens, 256) * 256 <= ceil_div(n_tokens, 128) * 128 ? 256
                                                                                  : 128;
  return bn == 256 ? launch_tile<1, 256>(maps, parts, n_parts, x16, n_tokens, s)
                   : launch_tile<1, 128>(maps, parts, n_parts, x16, n_tokens, s);
}

}  // namespace kestrel::backend::cuda
