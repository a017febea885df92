// What the tensor-core persistent forward kernels share (persistent_mma.cu, the
// default, and experimental/persistent_mma.cu, its variants): the block shape, how many
// W_hh fragments a warp keeps, the m16n8k16 MMA and the paired loads of its fragments.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cstdint>
#include <type_traits>

namespace cnnlstm_fast::cuda {
namespace {

constexpr int kWarps = 16;
constexpr int kThreads = kWarps * 32;
constexpr int kFragRegs = 16;  // W_hh fragments (4 registers each) a warp keeps: m_tiles * k_steps
constexpr int kPassRows = 16;  // batch rows per pass: two n = 8 tiles
// k-steps a warp can hold: W_hh fragments (4 registers each) and the h fragments of a
// pass (4 each) must fit in the 128 registers of a 512-thread block.
template <int kMTiles>
inline constexpr int kMaxKSteps = kFragRegs / kMTiles < 8 ? kFragRegs / kMTiles : 8;

// d += a * b: a 16x16 (row-major fragment), b 16x8 (column-major), fp32 accumulators.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                          uint32_t b1) {
  if constexpr (std::is_same_v<T, __half>) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

// Two consecutive elements [k, k+1] of a row as one register, 0 past `limit`. k is even
// and rows start 4-byte aligned (the plan requires an even hidden size).
template <typename T, bool kCoherent>
__device__ __forceinline__ uint32_t load_pair(const T* row, int k, int limit) {
  if (k >= limit) return 0u;
  const auto* p = reinterpret_cast<const unsigned int*>(row + k);
  return kCoherent ? __ldcg(p) : *p;
}

}  // namespace
}  // namespace cnnlstm_fast::cuda
