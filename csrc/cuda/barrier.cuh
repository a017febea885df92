// The grid barrier of the persistent kernels (persistent_mma.cu) and of the step-floor
// measurement (floor.cu), one definition so that the floor times the same barrier.
#pragma once

namespace cnnlstm_fast::cuda {

// Every block arrives once per step; `target` is (step + 1) * gridDim.x. The counter
// starts at zero. Needs every block co-resident (a cooperative launch).
__device__ __forceinline__ void grid_barrier(unsigned int* counter, unsigned int target) {
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence();
    asm volatile("red.release.gpu.global.add.u32 [%0], 1;" ::"l"(counter) : "memory");
    unsigned int seen;
    do {
      asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(seen) : "l"(counter) : "memory");
    } while (seen < target);
  }
  __syncthreads();
}

}  // namespace cnnlstm_fast::cuda
