// How the blocks of one thread-block cluster (sm_90) meet and exchange h: the cluster
// barrier, the store into every block of the cluster (distributed shared memory), the
// launch configuration of a grid that is one cluster and its fit. Used by the cluster
// variant of the tensor-core forward (persistent_mma.cu here) and by the step floor's
// cluster exchange (floor.cu); experimental, not yet run on a GPU.
#pragma once

#include <cooperative_groups.h>
#include <cuda_runtime_api.h>

#include "../common.cuh"

namespace cnnlstm_fast::cuda {

// The cluster variant's barrier: every thread of every block arrives with release
// semantics and waits with acquire semantics, so what a block stored into a peer's
// shared memory before it is visible to the peer after it.
__device__ __forceinline__ void cluster_barrier() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  cooperative_groups::this_cluster().sync();
#else
  __trap();  // cluster code runs only from an sm_90 binary (cluster_fits checks)
#endif
}

// v into the same shared-memory location as `local` in every block of the cluster.
template <typename T>
__device__ __forceinline__ void store_in_every_block(T* local, T v) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  cooperative_groups::cluster_group cluster = cooperative_groups::this_cluster();
  const unsigned int blocks = cluster.num_blocks();
  for (unsigned int r = 0; r < blocks; ++r) *cluster.map_shared_rank(local, r) = v;
#else
  __trap();
#endif
}

// The launch configuration of a grid that is one cluster of `blocks` blocks of `threads`
// threads. `attr` is the storage the configuration points to.
inline cudaLaunchConfig_t cluster_config(int blocks, int threads, size_t smem, void* stream,
                                         cudaLaunchAttribute* attr) {
  cudaLaunchConfig_t cfg{};
  cfg.gridDim = dim3(blocks);
  cfg.blockDim = dim3(threads);
  cfg.dynamicSmemBytes = smem;
  cfg.stream = static_cast<cudaStream_t>(stream);
  attr->id = cudaLaunchAttributeClusterDimension;
  attr->val.clusterDim.x = blocks;
  attr->val.clusterDim.y = 1;
  attr->val.clusterDim.z = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  return cfg;
}

// Whether `blocks` blocks of `kernel` can run as one cluster on this device: an sm_90
// binary (the kernel traps elsewhere), the cluster size allowed, and one such cluster
// fitting on a GPC with this shared memory.
template <typename K>
cudaError_t cluster_fits(K kernel, int blocks, int threads, size_t smem, bool* fits) {
  *fits = false;
  cudaFuncAttributes attrs{};
  cudaError_t e = cudaFuncGetAttributes(&attrs, reinterpret_cast<const void*>(kernel));
  if (e) return reported(e);
  // ptxVersion is the __CUDA_ARCH__ the code was built for (binaryVersion would be the
  // device's own where the driver compiled sm_80 PTX, whose cluster code traps).
  if (attrs.ptxVersion < 90) return cudaSuccess;
  e = cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1);
  if (e) return reported(e);
  cudaLaunchAttribute attr{};
  const cudaLaunchConfig_t cfg = cluster_config(blocks, threads, smem, nullptr, &attr);
  int largest = 0, clusters = 0;
  e = cudaOccupancyMaxPotentialClusterSize(&largest, reinterpret_cast<const void*>(kernel), &cfg);
  if (e) return reported(e);
  if (blocks > largest) return cudaSuccess;
  e = cudaOccupancyMaxActiveClusters(&clusters, reinterpret_cast<const void*>(kernel), &cfg);
  if (e) return reported(e);
  *fits = clusters >= 1;
  return cudaSuccess;
}

}  // namespace cnnlstm_fast::cuda
