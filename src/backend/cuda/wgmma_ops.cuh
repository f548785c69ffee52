// Hopper (sm_90a) primitives of the wgmma matmul (matmul_wgmma.cu): mbarriers, bulk tensor
// copies (TMA), shared-memory matrix descriptors and warpgroup matrix products. Call them only
// from code compiled for sm_90a (inside #if defined(__CUDA_ARCH_FEAT_SM90_ALL)).
#pragma once

#include <cudaTypedefs.h>

#include <cstdint>

namespace kestrel::backend::cuda {

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void barrier_init(uint32_t bar, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}

__device__ __forceinline__ void barrier_arrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}

__device__ __forceinline__ void barrier_expect(uint32_t bar, int bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes)
               : "memory");
}

// Waits for the completion of the barrier's phase with this parity.
__device__ __forceinline__ void barrier_wait(uint32_t bar, uint32_t parity) {
  asm volatile(
      "{\n.reg .pred p;\n"
      "WAIT:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n"
      "@p bra DONE;\n"
      "bra WAIT;\n"
      "DONE:\n}\n" ::"r"(bar),
      "r"(parity)
      : "memory");
}

// The copy engine brings `bytes` (a multiple of 16) from global src to shared dst, completing on
// the barrier at `bar`.
__device__ __forceinline__ void bulk_load(uint32_t dst, const void* src, uint32_t bytes,
                                          uint32_t bar) {
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::
          "r"(dst),
      "l"(src), "r"(bytes), "r"(bar)
      : "memory");
}

// The box of `map` at (c0, c1) (c0 along the contiguous dimension) into shared memory at dst,
// completing on `bar`.
__device__ __forceinline__ void tma_load(uint32_t dst, const CUtensorMap& map, int c0, int c1,
                                         uint32_t bar) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, "
      "{%2, %3}], [%4];\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(&map)), "r"(c0), "r"(c1), "r"(bar)
      : "memory");
}

// A matrix descriptor for wgmma's B operand: 8-row groups of 128-byte rows, 1024 bytes apart,
// 128-byte swizzle (bits 62-63 = 1); the leading-dimension offset is unused for K-major tiles
// one swizzle row wide.
__device__ __forceinline__ uint64_t act_descriptor(uint32_t addr) {
  return static_cast<uint64_t>((addr & 0x3FFFF) >> 4) | (uint64_t{1} << 16) |
         (uint64_t{1024 >> 4} << 32) | (uint64_t{1} << 62);
}

__device__ __forceinline__ void wgmma_fence() {
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
}

__device__ __forceinline__ void wgmma_commit() {
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}

template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}

// Keeps the compiler from moving reads of accumulators across a wgmma wait.
__device__ __forceinline__ void fence_operand(float& r) {
  asm volatile("" : "+f"(r)::"memory");
}

// The accumulator operands of the asm blocks below: %0 .. %63, and %64 .. %127 for 256 columns.
#define KESTREL_WGMMA_D64                                                            \
  "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "           \
  "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, " \
  "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, " \
  "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
#define KESTREL_WGMMA_D128_HI                                                                    \
  "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, "             \
  "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, "             \
  "%96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, " \
  "%112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127"

// One m64nNk16 product into the accumulators D, A in registers A, B by descriptor DESC.
// clang-format off
#define KESTREL_WGMMA_K16(N, D, A, DESC) \
  "wgmma.mma_async.sync.aligned.m64n" N "k16.f32.f16.f16 {" D "}, {" A "}, " DESC ", p, 1, 1, 0;\n"
// clang-format on

// Eight accumulator operands d[i .. i + 7]; the 16 A registers and 4 descriptors after them.
#define KESTREL_WGMMA_F8(i)                                                                   \
  "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3]), "+f"(d[i + 4]), "+f"(d[i + 5]), \
      "+f"(d[i + 6]), "+f"(d[i + 7])
#define KESTREL_WGMMA_INPUTS                                                              \
  "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(a[4]), "r"(a[5]), "r"(a[6]), "r"(a[7]), \
      "r"(a[8]), "r"(a[9]), "r"(a[10]), "r"(a[11]), "r"(a[12]), "r"(a[13]), "r"(a[14]),   \
      "r"(a[15]), "l"(desc[0]), "l"(desc[1]), "l"(desc[2]), "l"(desc[3])

// d[64] += A (64 x 64, registers: four 16-wide slices) . B (64 x 128, shared memory: four
// descriptors), as four wgmmas in one asm block so that nothing but wgmmas sits between them
// (ptxas serializes wgmmas whose inputs other instructions define inside the group).
__device__ __forceinline__ void wgmma_m64n128k64(float* d, const uint32_t (&a)[16],
                                                 const uint64_t (&desc)[4]) {
  // clang-format off
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"
      KESTREL_WGMMA_K16("128", KESTREL_WGMMA_D64, "%64, %65, %66, %67", "%80")
      KESTREL_WGMMA_K16("128", KESTREL_WGMMA_D64, "%68, %69, %70, %71", "%81")
      KESTREL_WGMMA_K16("128", KESTREL_WGMMA_D64, "%72, %73, %74, %75", "%82")
      KESTREL_WGMMA_K16("128", KESTREL_WGMMA_D64, "%76, %77, %78, %79", "%83")
      "}\n"
      // clang-format on
      : KESTREL_WGMMA_F8(0), KESTREL_WGMMA_F8(8), KESTREL_WGMMA_F8(16), KESTREL_WGMMA_F8(24),
        KESTREL_WGMMA_F8(32), KESTREL_WGMMA_F8(40), KESTREL_WGMMA_F8(48), KESTREL_WGMMA_F8(56)
      : KESTREL_WGMMA_INPUTS
      : "memory");
}

// The same with B 64 x 256 into d[128].
__device__ __forceinline__ void wgmma_m64n256k64(float* d, const uint32_t (&a)[16],
                                                 const uint64_t (&desc)[4]) {
#define KESTREL_WGMMA_D128 KESTREL_WGMMA_D64 ", " KESTREL_WGMMA_D128_HI
  // clang-format off
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"
      KESTREL_WGMMA_K16("256", KESTREL_WGMMA_D128, "%128, %129, %130, %131", "%144")
      KESTREL_WGMMA_K16("256", KESTREL_WGMMA_D128, "%132, %133, %134, %135", "%145")
      KESTREL_WGMMA_K16("256", KESTREL_WGMMA_D128, "%136, %137, %138, %139", "%146")
      KESTREL_WGMMA_K16("256", KESTREL_WGMMA_D128, "%140, %141, %142, %143", "%147")
      "}\n"
      // clang-format on
      : KESTREL_WGMMA_F8(0), KESTREL_WGMMA_F8(8), KESTREL_WGMMA_F8(16), KESTREL_WGMMA_F8(24),
        KESTREL_WGMMA_F8(32), KESTREL_WGMMA_F8(40), KESTREL_WGMMA_F8(48), KESTREL_WGMMA_F8(56),
        KESTREL_WGMMA_F8(64), KESTREL_WGMMA_F8(72), KESTREL_WGMMA_F8(80), KESTREL_WGMMA_F8(88),
        KESTREL_WGMMA_F8(96), KESTREL_WGMMA_F8(104), KESTREL_WGMMA_F8(112), KESTREL_WGMMA_F8(120)
      : KESTREL_WGMMA_INPUTS
      : "memory");
#undef KESTREL_WGMMA_D128
}

// The same with B 64 x 192 into d[96] (the prompt kernel's 192-token tiles).
__device__ __forceinline__ void wgmma_m64n192k64(float* d, const uint32_t (&a)[16],
                                                 const uint64_t (&desc)[4]) {
#define KESTREL_WGMMA_D96                                                        \
  KESTREL_WGMMA_D64                                                              \
      ", %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, " \
      "%78, %79, %80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, "   \
      "%92, %93, %94, %95"
  // clang-format off
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"
      KESTREL_WGMMA_K16("192", KESTREL_WGMMA_D96, "%96, %97, %98, %99", "%112")
      KESTREL_WGMMA_K16("192", KESTREL_WGMMA_D96, "%100, %101, %102, %103", "%113")
      KESTREL_WGMMA_K16("192", KESTREL_WGMMA_D96, "%104, %105, %106, %107", "%114")
      KESTREL_WGMMA_K16("192", KESTREL_WGMMA_D96, "%108, %109, %110, %111", "%115")
      "}\n"
      // clang-format on
      : KESTREL_WGMMA_F8(0), KESTREL_WGMMA_F8(8), KESTREL_WGMMA_F8(16), KESTREL_WGMMA_F8(24),
        KESTREL_WGMMA_F8(32), KESTREL_WGMMA_F8(40), KESTREL_WGMMA_F8(48), KESTREL_WGMMA_F8(56),
        KESTREL_WGMMA_F8(64), KESTREL_WGMMA_F8(72), KESTREL_WGMMA_F8(80), KESTREL_WGMMA_F8(88)
      : KESTREL_WGMMA_INPUTS
      : "memory");
#undef KESTREL_WGMMA_D96
}

// d[8] += A (64 x 64, registers) . B (64 x 16, shared memory: four descriptors): the
// 16-token kernel's product (matmul_stream16.cu), four wgmmas in one asm block as above.
__device__ __forceinline__ void wgmma_m64n16k64(float* d, const uint32_t (&a)[16],
                                                const uint64_t (&desc)[4]) {
#define KESTREL_WGMMA_D8 "%0, %1, %2, %3, %4, %5, %6, %7"
  // clang-format off
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"
      KESTREL_WGMMA_K16("16", KESTREL_WGMMA_D8, "%8, %9, %10, %11", "%24")
      KESTREL_WGMMA_K16("16", KESTREL_WGMMA_D8, "%12, %13, %14, %15", "%25")
      KESTREL_WGMMA_K16("16", KESTREL_WGMMA_D8, "%16, %17, %18, %19", "%26")
      KESTREL_WGMMA_K16("16", KESTREL_WGMMA_D8, "%20, %21, %22, %23", "%27")
      "}\n"
                // clang-format on
                : KESTREL_WGMMA_F8(0)
                : KESTREL_WGMMA_INPUTS
                : "memory");
#undef KESTREL_WGMMA_D8
}

#undef KESTREL_WGMMA_D64
#undef KESTREL_WGMMA_D128_HI
#undef KESTREL_WGMMA_K16
#undef KESTREL_WGMMA_F8
#undef KESTREL_WGMMA_INPUTS

}  // namespace kestrel::backend::cuda
