// How the blocks of a persistent kernel meet once per step: the grid barrier (a counter
// in L2), shared by the tensor-core kernels (persistent_mma.cu, experimental/) and the
// step-floor measurement (experimental/floor.cu), so that the floor times the kernels'
// own synchronisation. The cluster variant's meeting is in experimental/cluster.cuh.
#pragma once

#include <cuda_runtime_api.h>

#include "common.cuh"

namespace cnnlstm_fast::cuda {

// Every block arrives once per step; `target` is (step + 1) * gridDim.x. The counter
// starts at zero. Needs every block co-resident (a cooperative launch). kFence: a full
// fence before the arrival. The arrival is a release at GPU scope, after a bar.sync
// that orders the block's writes before it, so by PTX's memory model the fence should
// add nothing but time; experimental/floor.cu times both (the persistent kernels keep it
// until a GPU run shows both correct and what it costs).
template <bool kFence = true>
__device__ __forceinline__ void grid_barrier(unsigned int* counter, unsigned int target) {
  __syncthreads();
  if (threadIdx.x == 0) {
    if constexpr (kFence) __threadfence();
    asm volatile("red.release.gpu.global.add.u32 [%0], 1;" ::"l"(counter) : "memory");
    unsigned int seen;
    do {
      asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(seen) : "l"(counter) : "memory");
    } while (seen < target);
  }
  __syncthreads();
}

}  // namespace cnnlstm_fast::cuda
