// Matmul for micro-batches of 5 to 16 tokens of Q4_0 / Q8_0 weights, on the tensor
// cores with the weights decoded straight into mma fragments (the activations pass through a
// per-warp shared-memory run; no block-wide synchronization inside the K loop). Every micro-batch
// re-reads all weights (the seed's case: micro-batches of 16), so the kernel must stream them at
// memory bandwidth with few instructions per byte; the shared-memory tile kernel of matmul_mma.cu
// spent ~70% of its issue slots staging (ncu: SM 60-69% busy, DRAM 14-17%).
//
// The trick: a dot product does not care in which order k runs, as long as A and B agree. So
// each lane takes the k-slots that mma.sync m16n8k16 gives it -- (2c, 2c+1) and (2c+8, 2c+9) for
// lane c = lane % 4 -- to mean four consecutive elements e..e+3 of the weight block that its
// own 32-bit load holds, and reads the activations of the same four elements for B. A Q4_0
// block's 16 quant bytes then reach the fragments as one 4-byte load per lane and row (word c:
// elements 4c..4c+3 in the low nibbles for k-step 0, 16+4c.. in the high nibbles for k-step 1),
// decoded to f16 by bit placement (octets.cuh) and scaled in f16 (rounded once, as everywhere).
//
// A block of 8 warps owns 16 output rows; its warps take interleaved runs of kAhead quant
// blocks of the block's K range and are reduced in shared memory in a fixed order at the end
// (deterministic); grid.y splits K further (partials reduced by a second kernel) only when there
// are too few row tiles to fill the GPU.
#include <algorithm>

#include "backend/cuda/cuda_backend_impl.cuh"
#include "backend/cuda/frag_common.cuh"

namespace kestrel::backend::cuda {

using quant::DType;

namespace {

constexpr int kWarps = 8;
// Quant blocks per warp per step, all loaded before any is used: 8 (decode) or 4 (16 tokens),
// as registers allow.
template <int NT>
constexpr int kAheadFor = NT <= 8 ? 8 : 4;

// First of the four elements of a 32-element block that lane c holds in k-step s.
template <DType T>
__device__ __forceinline__ int first_element(int s, int c) {
  return T == DType::Q4_0 ? 16 * s + 4 * c : 8 * c + 4 * s;
}

// The 4 bytes of codes of row `r`, block `b` that lane c decodes in k-step s (Q4_0: the same
// word for both steps, high nibbles in step 1; Q8_0: word s of its 8 bytes).
template <DType T>
__device__ __forceinline__ uint32_t step_word(const uint2& raw, int s) {
  if constexpr (T == DType::Q4_0)
    return s == 0 ? raw.x : raw.x >> 4;
  else
    return s == 0 ? raw.x : raw.y;
}

template <DType T>
__device__ __forceinline__ uint2 load_codes(const uint8_t* qs, int64_t nb, int64_t r, int64_t b,
                                            int c) {
  if constexpr (T == DType::Q4_0)
    return make_uint2(*reinterpret_cast<const uint32_t*>(qs + (r * nb + b) * 16 + 4 * c), 0);
  else
    return *reinterpret_cast<const uint2*>(qs + (r * nb + b) * 32 + 8 * c);
}

// out (or partial[blockIdx.y]) [T][n_out] for rows [16 * blockIdx.x, +16) and quant blocks
// [blockIdx.y * blocks_per_split, +blocks_per_split).
template <DType T, int NT>
__global__ void __launch_bounds__(kWarps * 32)
    matmul_frag_kernel(const uint8_t* qs, const __half* d, int64_t n_in, int64_t n_out,
                       const __half* x16, int n_tokens, int64_t blocks_per_split, float* out,
                       const float* bias) {
  constexpr int kAhead = kAheadFor<NT>;
  constexpr int kRun = 32 * kAhead;  // elements of a warp's run
  constexpr int kChunks = kRun / 8;  // 16-byte chunks of one token's activations in a run
  constexpr int kXLoads = NT * kChunks / 32;
  // Each warp's activations of its current run, [token][element]; rows padded by 8 halfs so
  // that the fragment loads (8 tokens x 4 lanes) fall in distinct banks.
  __shared__ __align__(16) __half xs[kWarps][NT][kRun + 8];
  __shared__ float red[kWarps][NT][17];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, c = lane % 4;
  const int64_t nb = n_in / 32;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * 16;
  const int64_t ra = min(row0 + g, n_out - 1), rb = min(row0 + g + 8, n_out - 1);
  const int64_t kb0 = blockIdx.y * blocks_per_split;
  const int64_t kb1 = min(nb, kb0 + blocks_per_split);
  const int n_tiles = min(NT / 8, (n_tokens + 7) / 8);  // token tiles with any real token

  float acc[NT / 8][4];
#pragma unroll
  for (int j = 0; j < NT / 8; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.0f;

  for (int64_t cb = kb0 + warp * kAhead; cb < kb1; cb += kWarps * kAhead) {
    // Every global load of the step is issued before the first mma. The activations go through
    // shared memory: loaded straight into fragments, each load touched 8 token rows, and the
    // L1 pipe (not DRAM) limited the kernel (ncu: memory busy 73%, DRAM 23%).
    uint2 wa[kAhead], wb[kAhead];
    __half da[kAhead], db[kAhead];
#pragma unroll
    for (int u = 0; u < kAhead; ++u) {
      const int64_t b = cb + u;
      if (b < kb1) {
        wa[u] = load_codes<T>(qs, nb, ra, b, c);
        wb[u] = load_codes<T>(qs, nb, rb, b, c);
        da[u] = d[ra * nb + b];
        db[u] = d[rb * nb + b];
      }
    }
    uint4 xr[kXLoads];
#pragma unroll
    for (int i = 0; i < kXLoads; ++i) {
      const int idx = lane + 32 * i, t = idx / kChunks, ch = idx % kChunks;
      xr[i] = t < n_tokens && cb + ch / 4 < kb1
                  ? __ldg(reinterpret_cast<const uint4*>(x16 + t * n_in + 32 * cb + 8 * ch))
                  : make_uint4(0, 0, 0, 0);
    }
    __syncwarp();  // the previous run's fragments are read
#pragma unroll
    for (int i = 0; i < kXLoads; ++i) {
      const int idx = lane + 32 * i, t = idx / kChunks, ch = idx % kChunks;
      *reinterpret_cast<uint4*>(&xs[warp][t][8 * ch]) = xr[i];
    }
    __syncwarp();
#pragma unroll
    for (int u = 0; u < kAhead; ++u) {
      if (cb + u >= kb1) break;
      const __half2 sa = __half2half2(da[u]), sb = __half2half2(db[u]);
#pragma unroll
      for (int s = 0; s < 2; ++s) {
        const uint32_t qa = step_word<T>(wa[u], s), qb = step_word<T>(wb[u], s);
        // Bytes 0,1 of the word are elements e, e+1 (k-slots 2c, 2c+1); bytes 2,3 are e+2, e+3
        // (k-slots 2c+8, 2c+9). Fragment order: a0 row g, a1 row g+8, a2 / a3 the upper slots.
        const uint32_t a[4] = {codes_to_half2<T>(__byte_perm(qa, 0, 0x4140), sa),
                               codes_to_half2<T>(__byte_perm(qb, 0, 0x4140), sb),
                               codes_to_half2<T>(__byte_perm(qa, 0, 0x4342), sa),
                               codes_to_half2<T>(__byte_perm(qb, 0, 0x4342), sb)};
        const int e = 32 * u + first_element<T>(s, c);
#pragma unroll
        for (int j = 0; j < NT / 8; ++j) {
          if (j >= n_tiles) break;
          const uint2 bx = *reinterpret_cast<const uint2*>(&xs[warp][8 * j + g][e]);
          mma_16816(acc[j], a, bx.x, bx.y);
        }
      }
    }
  }
  // C fragment: acc[j][0..1] row g, tokens 8j + 2c, +1; acc[j][2..3] row g + 8.
#pragma unroll
  for (int j = 0; j < NT / 8; ++j) {
    red[warp][8 * j + 2 * c][g] = acc[j][0];
    red[warp][8 * j + 2 * c + 1][g] = acc[j][1];
    red[warp][8 * j + 2 * c][g + 8] = acc[j][2];
    red[warp][8 * j + 2 * c + 1][g + 8] = acc[j][3];
  }
  __syncthreads();
  float* dst = gridDim.y > 1 ? out + blockIdx.y * n_tokens * n_out : out;
  const float* bb = gridDim.y > 1 ? nullptr : bias;
  for (int i = threadIdx.x; i < NT * 16; i += kWarps * 32) {
    const int t = i / 16, rr = i % 16;
    const int64_t r = row0 + rr;
    if (t >= n_tokens || r >= n_out) continue;
    float v = 0.0f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) v += red[w][t][rr];
    dst[t * n_out + r] = v + (bb ? bb[r] : 0.0f);
  }
}

template <DType T, int NT>
void launch_nt(const CudaWeight& w, const __half* x, int n_tokens, int splits,
               int64_t blocks_per_split, float* out, const float* bias, cudaStream_t s) {
  const dim3 grid(ceil_div(w.n_out, 16), splits);
  matmul_frag_kernel<T, NT><<<grid, kWarps * 32, 0, s>>>(w.qs, w.d, w.n_in, w.n_out, x, n_tokens,
                                                         blocks_per_split, out, bias);
}

template <DType T>
void launch_type(const CudaWeight& w, const __half* x, int n_tokens, int splits, int64_t bps,
                 float* out, const float* bias, cudaStream_t s) {
  if (n_tokens <= 8)
    launch_nt<T, 8>(w, x, n_tokens, splits, bps, out, bias, s);
  else
    launch_nt<T, 16>(w, x, n_tokens, splits, bps, out, bias, s);
}

}  // namespace

bool frag_supports(DType type, int64_t n_in, int n_tokens) {
  return (type == DType::Q4_0 || type == DType::Q8_0) && n_tokens >= kFragMinTokens &&
         n_tokens <= kFragMaxTokens && n_in % 32 == 0;
}

bool frag_takes_f32(int n_tokens) {
  return n_tokens <= 8;
}

int frag_splits(const CudaWeight& w) {
  // At least ~256 blocks of 8 warps (15 warps per SM on an H100), each warp with a few runs.
  const int row_tiles = ceil_div(w.n_out, 16);
  const int64_t nb = w.n_in / 32;
  const int most = static_cast<int>(std::max<int64_t>(1, nb / (kWarps * kAheadFor<8> * 2)));
  return std::clamp(ceil_div(256, row_tiles), 1, std::min(16, most));
}

Status launch_matmul_frag(const CudaWeight& w, const __half* x, int n_tokens, float* out,
                          const float* bias, float* partial, cudaStream_t s) {
  const int splits = frag_splits(w);
  const int64_t nb = w.n_in / 32;
  // Whole runs of blocks per split (a multiple of every kAheadFor), so that no run straddles two.
  const int64_t bps = ceil_div(ceil_div(nb, splits), kAheadFor<8>) * int64_t{kAheadFor<8>};
  float* dst = splits > 1 ? partial : out;
  if (w.type == DType::Q4_0)
    launch_type<DType::Q4_0>(w, x, n_tokens, splits, bps, dst, bias, s);
  else
    launch_type<DType::Q8_0>(w, x, n_tokens, splits, bps, dst, bias, s);
  LAUNCH_CHECK("matmul (tensor cores, weights in fragments)");
  if (splits > 1) return launch_reduce_splits(partial, splits, n_tokens, w.n_out, out, bias, s);
  return Status::ok();
}

}  // namespace kestrel::backend::cuda
