// Matmul for mid-sized micro-batches (kSmallBatch < T <= 64) of Q4_0 / Q8_0 weights: the weight
// is read once from its repacked blocks, dequantized into shared memory in 32-row x 64-column
// tiles and multiplied with the f16 activations on the tensor cores (mma.sync m16n8k16, f32
// accumulation). This is the seed's case (micro-batches of 16): every micro-batch re-reads all
// weights, so the kernel must stream them near memory bandwidth rather than expand them to f16
// in memory first (the GEMM path writes and reads 3.5x the weight bytes per micro-batch).
//
// Each block of 4 warps owns 32 output rows; warps 0/1 take rows 0-15/16-31 of the first half
// of each 64-column tile and warps 2/3 the second half, reduced through shared memory at the
// end. The next tile's raw weight bytes and activations are loaded into registers while the
// current tile is multiplied. Deterministic split-K over blocks (partials reduced by a second
// kernel) keeps enough blocks in flight when n_out is small.
#include <algorithm>

#include "backend/cuda/cuda_backend_impl.cuh"
#include "backend/cuda/frag_common.cuh"
#include "backend/cuda/octets.cuh"

namespace kestrel::backend::cuda {

using quant::DType;

namespace {

constexpr int kBM = 32, kBK = 64, kLD = kBK + 8;  // +8 halfs: conflict-free fragment loads

// out (or partial[blockIdx.y]) [T][n_out] for rows [32 * blockIdx.x, +32) and columns
// [k_begin, k_end) of split blockIdx.y.
template <DType T, int NT>
__global__ void __launch_bounds__(128)
    matmul_mma_kernel(const uint8_t* qs, const __half* d, int64_t n_in, int64_t n_out,
                      const __half* x16, int n_tokens, int64_t k_per_split, float* out,
                      const float* bias) {
  __shared__ __align__(16) __half As[kBM * kLD];
  __shared__ __align__(16) __half Bs[NT * kLD];
  __shared__ float red[2][16][NT + 1];
  constexpr int kA = kBM * 8 / 128;         // weight octets per thread per tile (2)
  constexpr int kB = (NT * 8 + 127) / 128;  // activation octets per thread per tile
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, c = lane % 4;
  const int rw = warp % 2, kh = warp / 2;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kBM;
  const int64_t k_begin = blockIdx.y * k_per_split;
  const int64_t k_end = min(n_in, k_begin + k_per_split);

  uint4 ra[kA];
  uint4 rb[kB];
  auto load = [&](int64_t k0) {
#pragma unroll
    for (int i = 0; i < kA; ++i) {
      const int o = threadIdx.x + 128 * i;
      const int64_t r = row0 + o / 8, e0 = k0 + 8 * (o % 8);
      ra[i] = (r < n_out && e0 < k_end) ? load_raw_octet<T>(qs, d, n_in, r, e0)
                                        : make_uint4(0, 0, 0, 0);
    }
#pragma unroll
    for (int i = 0; i < kB; ++i) {
      const int o = threadIdx.x + 128 * i;
      const int t = o / 8;
      const int64_t e0 = k0 + 8 * (o % 8);
      rb[i] = (o < NT * 8 && t < n_tokens && e0 < k_end)
                  ? *reinterpret_cast<const uint4*>(x16 + t * n_in + e0)
                  : make_uint4(0, 0, 0, 0);
    }
  };

  float acc[NT / 8][4];
#pragma unroll
  for (int j = 0; j < NT / 8; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.0f;
  load(k_begin);
  for (int64_t k0 = k_begin; k0 < k_end; k0 += kBK) {
#pragma unroll
    for (int i = 0; i < kA; ++i) {
      const int o = threadIdx.x + 128 * i;
      *reinterpret_cast<uint4*>(As + (o / 8) * kLD + 8 * (o % 8)) =
          octet_to_f16<T>(ra[i], 8 * (o % 8));
    }
#pragma unroll
    for (int i = 0; i < kB; ++i) {
      const int o = threadIdx.x + 128 * i;
      if (o < NT * 8) *reinterpret_cast<uint4*>(Bs + (o / 8) * kLD + 8 * (o % 8)) = rb[i];
    }
    __syncthreads();
    if (k0 + kBK < k_end) load(k0 + kBK);  // in flight while this tile is multiplied
#pragma unroll
    for (int s = 0; s < 2; ++s) {
      const int kk = 32 * kh + 16 * s;
      const __half* a = As + (16 * rw + g) * kLD + kk + 2 * c;
      const uint32_t af[4] = {*reinterpret_cast<const uint32_t*>(a),
                              *reinterpret_cast<const uint32_t*>(a + 8 * kLD),
                              *reinterpret_cast<const uint32_t*>(a + 8),
                              *reinterpret_cast<const uint32_t*>(a + 8 * kLD + 8)};
#pragma unroll
      for (int j = 0; j < NT / 8; ++j) {
        const __half* b = Bs + (8 * j + g) * kLD + kk + 2 * c;
        mma_16816(acc[j], af, *reinterpret_cast<const uint32_t*>(b),
                  *reinterpret_cast<const uint32_t*>(b + 8));
      }
    }
    __syncthreads();
  }
  // The second k-half's warps hand their sums to the first half's.
  if (kh == 1) {
#pragma unroll
    for (int j = 0; j < NT / 8; ++j) {
      red[rw][g][8 * j + 2 * c] = acc[j][0];
      red[rw][g][8 * j + 2 * c + 1] = acc[j][1];
      red[rw][g + 8][8 * j + 2 * c] = acc[j][2];
      red[rw][g + 8][8 * j + 2 * c + 1] = acc[j][3];
    }
  }
  __syncthreads();
  if (kh == 1) return;
  float* dst = gridDim.y > 1 ? out + blockIdx.y * n_tokens * n_out : out;
  const float* bb = gridDim.y > 1 ? nullptr : bias;
#pragma unroll
  for (int j = 0; j < NT / 8; ++j) {
#pragma unroll
    for (int h = 0; h < 4; ++h) {
      const int rr = g + 8 * (h / 2), t = 8 * j + 2 * c + h % 2;
      const int64_t r = row0 + 16 * rw + rr;
      if (t < n_tokens && r < n_out)
        dst[t * n_out + r] = acc[j][h] + red[rw][rr][t] + (bb ? bb[r] : 0.0f);
    }
  }
}

// out[t][r] = sum over splits of partial[s][t][r] (+ bias[r]), in a fixed order.
__global__ void reduce_splits_kernel(const float* partial, int splits, int n_tokens, int64_t n_out,
                                     float* out, const float* bias) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t total = n_tokens * n_out;
  if (i >= total) return;
  float v = bias ? bias[i % n_out] : 0.0f;
  for (int s = 0; s < splits; ++s) v += partial[s * total + i];
  out[i] = v;
}

template <DType T, int NT>
void launch_mma(const CudaWeight& w, const __half* x16, int n_tokens, int splits,
                int64_t k_per_split, float* out, const float* bias, cudaStream_t s) {
  const dim3 grid(ceil_div(w.n_out, kBM), splits);
  matmul_mma_kernel<T, NT>
      <<<grid, 128, 0, s>>>(w.qs, w.d, w.n_in, w.n_out, x16, n_tokens, k_per_split, out, bias);
}

template <DType T>
void launch_mma_nt(const CudaWeight& w, const __half* x16, int n_tokens, int splits,
                   int64_t k_per_split, float* out, const float* bias, cudaStream_t s) {
  if (n_tokens <= 16)
    launch_mma<T, 16>(w, x16, n_tokens, splits, k_per_split, out, bias, s);
  else if (n_tokens <= 32)
    launch_mma<T, 32>(w, x16, n_tokens, splits, k_per_split, out, bias, s);
  else
    launch_mma<T, 64>(w, x16, n_tokens, splits, k_per_split, out, bias, s);
}

}  // namespace

bool mma_supports(DType type, int64_t /*n_in*/, int n_tokens) {
  return (type == DType::Q4_0 || type == DType::Q8_0) && n_tokens > kSmallBatch &&
         n_tokens <= kMmaMaxTokens;
}

int mma_splits(const CudaWeight& w) {
  // Enough blocks for eight per SM on a large GPU (each block has few loads in flight, so the
  // latency is hidden by many blocks); each split keeps whole 64-column tiles.
  const int row_blocks = ceil_div(w.n_out, kBM);
  const int tiles = ceil_div(w.n_in, kBK);
  return std::clamp(ceil_div(1056, row_blocks), 1, std::min(16, tiles));
}

Status launch_matmul_mma(const CudaWeight& w, const __half* x16, int n_tokens, float* out,
                         const float* bias, float* partial, cudaStream_t s) {
  const int splits = mma_splits(w);
  const int64_t tiles = ceil_div(w.n_in, kBK);
  const int64_t k_per_split = ceil_div(tiles, splits) * int64_t{kBK};
  float* dst = splits > 1 ? partial : out;
  if (w.type == DType::Q4_0)
    launch_mma_nt<DType::Q4_0>(w, x16, n_tokens, splits, k_per_split, dst, bias, s);
  else
    launch_mma_nt<DType::Q8_0>(w, x16, n_tokens, splits, k_per_split, dst, bias, s);
  LAUNCH_CHECK("matmul (tensor cores, mid batch)");
  if (splits > 1) return launch_reduce_splits(partial, splits, n_tokens, w.n_out, out, bias, s);
  return Status::ok();
}

Status launch_reduce_splits(const float* partial, int splits, int n_tokens, int64_t n_out,
                            float* out, const float* bias, cudaStream_t s) {
  const int64_t total = n_tokens * n_out;
  reduce_splits_kernel<<<ceil_div(total, 256), 256, 0, s>>>(partial, splits, n_tokens, n_out, out,
                                                            bias);
  LAUNCH_CHECK("matmul (split reduction)");
  return Status::ok();
}

}  // namespace kestrel::backend::cuda
