// The OpenCL backend's tensor-core path on NVIDIA's driver (kernels/matmul_nv_mma.cl): the setup
// probe that decides whether it runs, its program sources, and the matmul's host side.
//
// The probe (probe.cpp's run_probe) builds nv_mma_probe with each spelling of the asm keyword,
// runs one m16n8k16 product of small integers and compares it with the exact one. A driver whose
// compiler refuses the inline PTX, or whose product is wrong, keeps the portable kernels, with one
// line on stderr saying why.
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "backend/opencl/kernels/common_cl.h"
#include "backend/opencl/kernels/matmul_nv_frag_cl.h"
#include "backend/opencl/kernels/matmul_nv_mma_cl.h"
#include "backend/opencl/opencl_backend_impl.h"
#include "backend/opencl/program_cache.h"
#include "format/quant/fp16.h"

namespace kestrel::backend::opencl {

namespace {

// The instances of the template: weight rows, tokens, warps along rows x tokens, blocks of 32
// columns a step. 16 and 32 tokens (the seed's micro-batches and the tails) read each weight
// once with 8 warps of 16 rows and 4 blocks a step (8 KiB of Q4_0 in flight a work-group: these
// are bound by the weight stream; KESTREL_CL_NV_KB=2 halves it); larger batches take 64-token
// tiles, each warp 32 rows x 32 tokens, 2 blocks a step (4 would not fit NVIDIA's 48 KiB of local
// memory).
struct NvShape {
  const char* name;
  int bm, bn, wm, wn, kb;
};
constexpr NvShape kNvShapes[] = {{"matmul_nv16", 128, 16, 8, 1, 4},
                                 {"matmul_nv32", 128, 32, 8, 1, 4},
                                 {"matmul_nv64", 128, 64, 4, 2, 2}};

// Local memory of an instance: f16 weight and token tiles, rows of 32 kb + 8 halves, and the
// emulation's exchange area (192 words a warp).
size_t nv_local_bytes(const NvShape& s, int kb, bool emulated) {
  return 2 * static_cast<size_t>(32 * kb + 8) * (s.bm + s.bn) +
         (emulated ? 768 * static_cast<size_t>(s.wm * s.wn) : 0);
}

std::string nv_instance(const NvShape& s, int kb) {
  return format(
             "#define NV_BM %d\n#define NV_BN %d\n#define NV_WM %d\n#define NV_WN %d\n"
             "#define NV_KB %d\n#define NV_KERNEL %s\n",
             s.bm, s.bn, s.wm, s.wn, kb, s.name)
      .append(sources::matmul_nv_mma);
}

}  // namespace

// One m16n8k16 product of integers in [-8, 7] (exact in f16 and in the f32 sums): "" when the
// device computed it exactly, else what went wrong.
std::string OpenclBackend::run_nv_probe(const std::string& options) {
  std::mt19937 rng(std::random_device{}());
  std::uniform_int_distribution<int> code(-8, 7);
  int a[16][16], b[8][16];
  for (auto& row : a)
    for (int& v : row) v = code(rng);
  for (auto& row : b)
    for (int& v : row) v = code(rng);
  // f16 pairs in words, low half first: A [16][8 words], B [8 tokens][8 words].
  auto word = [](int lo, int hi) {
    return static_cast<cl_uint>(quant::fp32_to_fp16(static_cast<float>(lo))) |
           (static_cast<cl_uint>(quant::fp32_to_fp16(static_cast<float>(hi))) << 16);
  };
  std::vector<cl_uint> aw(128), bw(64);
  for (int r = 0; r < 16; ++r)
    for (int w = 0; w < 8; ++w) aw[r * 8 + w] = word(a[r][2 * w], a[r][2 * w + 1]);
  for (int t = 0; t < 8; ++t)
    for (int w = 0; w < 8; ++w) bw[t * 8 + w] = word(b[t][2 * w], b[t][2 * w + 1]);
  std::vector<float> c(128);
  const std::string why = run_probe(
      {sources::common, sources::matmul_nv_mma}, options, "nv_mma_probe",
      {{aw.data(), aw.size() * sizeof(cl_uint)}, {bw.data(), bw.size() * sizeof(cl_uint)}}, c, 32);
  if (!why.empty()) return why;
  for (int t = 0; t < 8; ++t)
    for (int r = 0; r < 16; ++r) {
      int want = 0;
      for (int k = 0; k < 16; ++k) want += a[r][k] * b[t][k];
      if (c[t * 16 + r] != static_cast<float>(want))
        return format("the probe's product is wrong (row %d, token %d: %g, not %d)", r, t,
                      static_cast<double>(c[t * 16 + r]), want);
    }
  return "";
}

// KESTREL_CL_NV_MMA: 0 keeps the portable kernels; "emulate" runs the template with the
// fragments exchanged through local memory on any device (for the tests); unset, NVIDIA devices
// whose probe passes use mma.sync.
void OpenclBackend::choose_nv_mma() {
  nv_mma_.clear();
  const char* env = std::getenv("KESTREL_CL_NV_MMA");
  const std::string want = env ? env : "";
  if (want == "0" || !wide_) return;
  const std::string base = "-cl-std=CL1.2";
  if (want == "emulate") {
    const std::string why = run_nv_probe(base);
    if (why.empty())
      nv_mma_ = "emulate";
    else
      std::fprintf(stderr, "kestrel: opencl: KESTREL_CL_NV_MMA=emulate: %s\n", why.c_str());
    return;
  }
  if (info_.vendor.find("NVIDIA") == std::string::npos) return;
  std::string why;
  for (const char* spelling : {"__asm__", "asm"}) {
    why = run_nv_probe(base + " -DNV_ASM=" + spelling);
    if (why.empty()) {
      nv_mma_ = spelling;
      return;
    }
  }
  std::fprintf(stderr, "kestrel: opencl: tensor-core matmuls unavailable, %s\n", why.c_str());
}

void OpenclBackend::add_nv_mma_sources(std::vector<std::string>& srcs,
                                       std::vector<const char*>& names, std::string& options) {
  if (nv_mma_.empty()) return;
  const bool emulated = nv_mma_ == "emulate";
  const int kb_env =
      std::getenv("KESTREL_CL_NV_KB") ? std::atoi(std::getenv("KESTREL_CL_NV_KB")) : 0;
  std::vector<std::string> instances;
  for (const NvShape& s : kNvShapes) {
    int kb = s.bn < 64 && (kb_env == 2 || kb_env == 4) ? kb_env : s.kb;
    if (kb > 2 && nv_local_bytes(s, kb, emulated) > info_.local_mem) kb = 2;
    if (nv_local_bytes(s, kb, emulated) > info_.local_mem) {
      std::fprintf(stderr, "kestrel: opencl: %s needs %zu bytes of local memory, %s has %llu\n",
                   s.name, nv_local_bytes(s, kb, emulated), info_.name.c_str(),
                   static_cast<unsigned long long>(info_.local_mem));
      nv_mma_.clear();
      return;
    }
    instances.push_back(nv_instance(s, kb));
  }
  if (!emulated) options += " -DNV_ASM=" + nv_mma_;
  // By default (fifteenth session, H100, the seed's b128 ub16 case, same call): micro-batches
  // of up to 16 tokens on matmul_nvf16_* (fragments loaded straight into registers) with the
  // split-K sums in the kernel, 1,338 t/s against 1,039 for the template's local tiles and a
  // matmul_reduce launch (fragments alone 1,264, in-kernel sums alone 1,047). KESTREL_CL_NV_FRAG=0
  // and KESTREL_CL_NV_REDUCE=launch bring the former back; KESTREL_CL_NV_FRAG_NB=1|2|4|8 sets the
  // fragment kernel's blocks loaded at once (2 by default since the sixteenth session: 1,438
  // against 1,349 t/s with 4, same call; 8 was slower still in the fifteenth).
  const char* reduce = std::getenv("KESTREL_CL_NV_REDUCE");
  nv_reduce_in_kernel_ = !(reduce && std::string(reduce) == "launch");
  const char* frag = std::getenv("KESTREL_CL_NV_FRAG");
  nv_frag_ = !(frag && std::string(frag) == "0");
  if (const char* min = std::getenv("KESTREL_CL_NV_MIN_TOKENS"))
    nv_min_tokens_ = std::clamp(std::atoi(min), 2, kSmallBatch + 1);
  if (const char* nb = std::getenv("KESTREL_CL_NV_FRAG_NB"); nb && nv_frag_) {
    const int n = std::atoi(nb);
    if (n == 1 || n == 2 || n == 4 || n == 8) options += format(" -DNVF_NB=%d", n);
  }
  for (size_t i = 0; i < instances.size(); ++i) {
    srcs.push_back(std::move(instances[i]));
    names.push_back(kNvShapes[i].name);
  }
  names.push_back("nv_x_f16");
  for (const char* type : {"q4_0", "q8_0"}) {  // matmul_nv_frag.cl, one instance a weight type
    srcs.push_back(format("#define NVF_TYPE %s\n#define NVF_KERNEL matmul_nvf16_%s\n",
                          type[1] == '4' ? "T_Q4_0" : "T_Q8_0", type)
                       .append(sources::matmul_nv_frag));
  }
  names.push_back("matmul_nvf16_q4_0");
  names.push_back("matmul_nvf16_q8_0");
}

// xh (scratch 2): each token's row as f16 pairs, scaled by a power of two; xs (scratch 3): the
// inverse scale per token (matmul_nv_mma.cl).
Status OpenclBackend::nv_activations(const Tensor& x, int n_tokens, const char* op) {
  cl_mem xh = nullptr, xs = nullptr;
  KESTREL_TRY(companion_buffers(1, n_tokens, x.cols, xh, xs));
  cl_kernel k = kernel("nv_x_f16");
  KESTREL_TRY(Args(k, op).mem(x.data)(static_cast<int>(x.cols))(xh)(xs).status());
  const size_t global[1] = {256 * static_cast<size_t>(n_tokens)};
  const size_t local[1] = {256};
  return launch(k, op, 1, global, local);
}

// At least `tiles` arrival counters, all 0 (the kernel leaves each at 0 after use).
Expected<cl_mem> OpenclBackend::nv_arrivals(size_t tiles) {
  if (tiles <= nv_arrivals_n_) return nv_arrivals_;
  if (nv_arrivals_) device_free(nv_arrivals_, nv_arrivals_n_ * sizeof(cl_int));
  nv_arrivals_ = nullptr;
  nv_arrivals_n_ = 0;
  const size_t n = std::max<size_t>(tiles, 4096);
  KESTREL_ASSIGN_OR_RETURN(cl_mem m, device_alloc(n * sizeof(cl_int), "split-K counters"));
  const cl_int zero = 0;
  const cl_int err = clEnqueueFillBuffer(queue_, m, &zero, sizeof zero, 0, n * sizeof(cl_int), 0,
                                         nullptr, nullptr);
  if (err != CL_SUCCESS) {
    device_free(m, n * sizeof(cl_int));
    return cl_status(err, "clEnqueueFillBuffer", "split-K counters");
  }
  nv_arrivals_ = m;
  nv_arrivals_n_ = n;
  return m;
}

// The tensor-core matmuls of up to three Q4_0 / Q8_0 weights of one type over the same input
// and nv_min_tokens_ or more tokens, in one launch: up to 32 tokens in one pass over the weights
// (16- or 32-token tiles), more in 64-token tiles; the input columns split when the output tiles
// leave compute units idle, the partials added by each tile's last work-group (in-kernel sums) or
// by matmul_reduce (one weight a launch then).
Status OpenclBackend::matmul_nv(const MatmulSegment* segs, int n_segs, const Tensor& x,
                                int n_tokens, const char* op) {
  if (n_segs < 1 || n_segs > 3) return error("%s: %d weights in one launch (1 to 3)", op, n_segs);
  const ClWeight& w0 = *segs[0].w;
  if (half_x_ready_ != x.data && !companion_ready(x, n_tokens))
    KESTREL_TRY(nv_activations(x, n_tokens, op));
  cl_mem xh = nullptr, xs = nullptr;
  KESTREL_TRY(companion_buffers(1, n_tokens, w0.n_in, xh, xs));
  const NvShape& s = n_tokens <= 16 ? kNvShapes[0] : n_tokens <= 32 ? kNvShapes[1] : kNvShapes[2];
  const int n_in = static_cast<int>(w0.n_in), n_blocks = n_in / 32;
  int row_blocks[3] = {0, 0, 0}, n_total = 0;
  for (int i = 0; i < n_segs; ++i) {
    const int n_out = static_cast<int>(segs[i].w->n_out);
    row_blocks[i] = (n_out + s.bm - 1) / s.bm;
    n_total += n_out;
  }
  const size_t token_tiles = static_cast<size_t>((n_tokens + s.bn - 1) / s.bn);
  const size_t groups =
      static_cast<size_t>(row_blocks[0] + row_blocks[1] + row_blocks[2]) * token_tiles;
  const int splits = matmul_splits(groups, s.bn < 64, n_blocks);
  if (splits > 1 && n_segs > 1 && !nv_reduce_in_kernel_)
    return error("%s: several weights in one split launch need the in-kernel sums", op);
  const cl_long stride = static_cast<cl_long>(n_tokens) * n_total;
  cl_mem part = nullptr, arrivals = nullptr;
  if (splits > 1) {
    KESTREL_ASSIGN_OR_RETURN(part, scratch(0, sizeof(float) * splits * stride));
  }
  if (splits > 1 && nv_reduce_in_kernel_) {
    KESTREL_ASSIGN_OR_RETURN(arrivals, nv_arrivals(groups));
  }
  // The 16-token register-fragment kernels take the same arguments (matmul_nv_frag.cl).
  const bool frag = nv_frag_ && s.bn == 16;
  cl_kernel k = kernel(!frag                           ? s.name
                       : w0.type == quant::DType::Q4_0 ? "matmul_nvf16_q4_0"
                                                       : "matmul_nvf16_q8_0");
  const int type = static_cast<int>(w0.type), t0 = 0;
  Args a(k, op);
  a(type)(n_in)(xh)(xs)(t0)(n_tokens)(splits);
  part ? a(part) : a.null_mem();
  a(stride);
  arrivals ? a(arrivals) : a.null_mem();
  a(n_total)(row_blocks[0])(row_blocks[1]);
  for (int i = 0; i < 3; ++i) {
    const MatmulSegment& g = segs[std::min(i, n_segs - 1)];  // unused segments repeat the last
    a(g.w->qs)(g.w->d)(static_cast<int>(g.w->n_out)).mem(g.out->data);
    g.bias ? a.mem(g.bias->data) : a.null_mem();
  }
  KESTREL_TRY(a.status());
  const size_t wg = 32 * static_cast<size_t>(s.wm * s.wn);
  const size_t global[3] = {groups / token_tiles * wg, token_tiles, static_cast<size_t>(splits)};
  const size_t local[3] = {wg, 1, 1};
  KESTREL_TRY(launch(k, op, 3, global, local));
  if (splits == 1 || arrivals) return Status::ok();
  // One segment here.
  return reduce_splits(part, splits, stride, static_cast<int>(w0.n_out), t0, n_tokens, *segs[0].out,
                       segs[0].bias, op);
}

}  // namespace kestrel::backend::opencl
