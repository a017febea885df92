// The per-step floor of a persistent recurrence on this GPU: what each step of any
// kernel that keeps W_hh on chip and exchanges h through L2 with one grid barrier must
// do, and nothing else. Every block reads the whole h of the step (its recurrent matmul
// needs all of it) with the widest loads, through L2 (ld.global.cg, as the persistent
// kernels read it), reduces it over the block (the kernels' warps meet in shared memory
// too), writes its slice of the next h and meets the other blocks at the same grid
// barrier as ../persistent_mma.cu. The arithmetic of the step (2 x batch x hidden x
// gates*hidden FLOPs) is not in it: cnnlstm_fast/bench/floor.py adds it at the measured
// tensor-core peak. Timed from Python with CUDA events. The cluster variant (sm_90)
// times the other design, one thread-block cluster exchanging h through distributed
// shared memory.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include "../barrier.cuh"
#include "../common.cuh"
#include "cluster.cuh"
#include "floor.h"

namespace cnnlstm_fast::cuda {
namespace {

constexpr int kFloorThreads = 512;  // as the tensor-core kernel's blocks
constexpr int kFloorWarps = kFloorThreads / 32;

// The value every element of the next h gets: the mean of all `state` elements of `in`
// (read 16 bytes at a time, through L2 with ld.global.cg where kGlobal, else from shared
// memory), reduced over the block, plus 1. Every thread of the block calls it and gets
// the value; warp_sums may be reused once every thread has passed a barrier after it.
template <typename T, bool kGlobal>
__device__ __forceinline__ T next_value(const T* in, int state, float* warp_sums) {
  constexpr int kVec = 16 / sizeof(T);
  float acc = 0.f;
  const int n_vec = state / kVec;
  const auto* in4 = reinterpret_cast<const uint4*>(in);  // slots are 16-byte aligned
  for (int i = threadIdx.x; i < n_vec; i += kFloorThreads) {
    const uint4 v = kGlobal ? __ldcg(in4 + i) : in4[i];
    const T* e = reinterpret_cast<const T*>(&v);
#pragma unroll
    for (int q = 0; q < kVec; ++q) acc += to_float(e[q]);
  }
  for (int i = n_vec * kVec + threadIdx.x; i < state; i += kFloorThreads) {
    acc += to_float(kGlobal ? __ldcg(in + i) : in[i]);
  }
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, offset);
  if (threadIdx.x % 32 == 0) warp_sums[threadIdx.x / 32] = acc;
  __syncthreads();
  float total = 0.f;
#pragma unroll
  for (int w = 0; w < kFloorWarps; ++w) total += warp_sums[w];
  return from_float<T>(total / (float)state + 1.f);
}

template <typename T, bool kExchange, bool kFence>
__global__ void __launch_bounds__(kFloorThreads)
    step_floor_kernel(T* h, unsigned int* barrier, int steps, int batch, int hidden,
                      long long slot_stride) {
  __shared__ float warp_sums[kFloorWarps];
  const int state = batch * hidden;
  const int units = (hidden + gridDim.x - 1) / gridDim.x;  // this block's slice of h
  const int j0 = blockIdx.x * units;
  const int mine = j0 < hidden ? min(units, hidden - j0) : 0;
  for (int s = 0; s < steps; ++s) {
    if constexpr (kExchange) {
      const T* in = h + (s & 1) * slot_stride;
      T* out = h + ((s + 1) & 1) * slot_stride;
      const T value = next_value<T, true>(in, state, warp_sums);
      for (int idx = threadIdx.x; idx < batch * mine; idx += kFloorThreads) {
        out[(size_t)(idx / mine) * hidden + j0 + idx % mine] = value;
      }
    }
    // its leading __syncthreads also keeps warp_sums until every warp has read them
    grid_barrier<kFence>(barrier, (unsigned int)(s + 1) * gridDim.x);
  }
}

// The cluster design's exchange (sm_90): the grid is one thread-block cluster; each
// block keeps the whole h of the step in its shared memory (two slots), reads and
// reduces it there, pushes its slice of the next h into every block's next slot
// (distributed shared memory) and meets the others at the cluster barrier, as the
// mma-cluster kernel does. h0 comes from slot 0 of `h`; each block writes its slice of
// the final h back to slot steps % 2.
template <typename T>
__global__ void __launch_bounds__(kFloorThreads)
    cluster_floor_kernel(T* h, int steps, int batch, int hidden, long long slot_stride) {
  extern __shared__ __align__(16) unsigned char floor_smem[];
  __shared__ float warp_sums[kFloorWarps];
  const int state = batch * hidden;
  const int state_pad = (state + 7) / 8 * 8;  // slots start 16-byte aligned
  T* local = reinterpret_cast<T*>(floor_smem);
  const int units = (hidden + gridDim.x - 1) / gridDim.x;
  const int j0 = blockIdx.x * units;
  const int mine = j0 < hidden ? min(units, hidden - j0) : 0;
  for (int i = threadIdx.x; i < state; i += kFloorThreads) local[i] = h[i];
  cluster_barrier();  // every block runs and holds h0 before any block pushes into it
  for (int s = 0; s < steps; ++s) {
    const T* in = local + (s & 1) * state_pad;
    T* next = local + ((s + 1) & 1) * state_pad;
    const T value = next_value<T, false>(in, state, warp_sums);
    for (int idx = threadIdx.x; idx < batch * mine; idx += kFloorThreads) {
      store_in_every_block(next + (idx / mine) * hidden + j0 + idx % mine, value);
    }
    // every thread of every block: also keeps warp_sums until all warps have read them
    cluster_barrier();
  }
  const T* last = local + (steps & 1) * state_pad;
  for (int idx = threadIdx.x; idx < batch * mine; idx += kFloorThreads) {
    const int i = (idx / mine) * hidden + j0 + idx % mine;
    h[(size_t)(steps & 1) * slot_stride + i] = last[i];
  }
}

size_t cluster_floor_smem(DType dtype, int batch, int hidden) {
  const size_t size = dtype == DType::kFloat32 ? 4 : 2;
  return 2 * (((size_t)batch * hidden + 7) / 8 * 8) * size;
}

template <typename F>
cudaError_t with_floor_kernel(DType dtype, bool exchange, bool fence, F&& f) {
  return with_dtype(dtype, [&](auto type) {
    using T = decltype(type);
    if (exchange) {
      return fence ? f(step_floor_kernel<T, true, true>) : f(step_floor_kernel<T, true, false>);
    }
    return fence ? f(step_floor_kernel<T, false, true>) : f(step_floor_kernel<T, false, false>);
  });
}

}  // namespace

int step_floor_max_blocks(DType dtype, int* blocks) {
  *blocks = 0;
  int device = 0, sms = 0, per_sm = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (!err) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (!err) {
    err = with_floor_kernel(dtype, true, true, [&](auto kernel) {
      return cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kFloorThreads, 0);
    });
  }
  if (err) return reported(err);
  *blocks = per_sm * sms;
  return cudaSuccess;
}

int step_floor(const StepFloorArgs& args, void* stream) {
  if (args.steps <= 0) return cudaSuccess;
  if (args.blocks <= 0 || args.batch <= 0 || args.hidden <= 0 || args.slot_stride % 8 ||
      args.slot_stride < (long long)args.batch * args.hidden) {
    return cudaErrorInvalidValue;
  }
  if (args.cluster) {
    return with_dtype(args.dtype, [&](auto type) {
      using T = decltype(type);
      auto kernel = cluster_floor_kernel<T>;
      const size_t smem = cluster_floor_smem(args.dtype, args.batch, args.hidden);
      int device = 0, optin = 0;
      cudaError_t e = cudaGetDevice(&device);
      if (!e) e = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
      if (e) return reported(e);
      if (smem + sizeof(float) * kFloorWarps > (size_t)optin) return cudaErrorInvalidConfiguration;
      e = allow_dynamic_smem(reinterpret_cast<const void*>(kernel), smem);
      if (e) return e;
      bool fits = false;
      e = cluster_fits(kernel, args.blocks, kFloorThreads, smem, &fits);
      if (e) return e;
      if (!fits) return cudaErrorInvalidConfiguration;
      T* h = static_cast<T*>(args.h);
      int steps = args.steps, batch = args.batch, hidden = args.hidden;
      long long stride = args.slot_stride;
      void* params[] = {&h, &steps, &batch, &hidden, &stride};
      cudaLaunchAttribute attr{};
      const cudaLaunchConfig_t cfg = cluster_config(args.blocks, kFloorThreads, smem, stream, &attr);
      return reported(cudaLaunchKernelExC(&cfg, reinterpret_cast<const void*>(kernel), params));
    });
  }
  return with_floor_kernel(args.dtype, args.exchange, args.fence, [&](auto kernel) {
    void* h = args.h;
    unsigned int* barrier = args.barrier;
    int steps = args.steps, batch = args.batch, hidden = args.hidden;
    long long stride = args.slot_stride;
    void* params[] = {&h, &barrier, &steps, &batch, &hidden, &stride};
    return reported(cudaLaunchCooperativeKernel(reinterpret_cast<void*>(kernel),
                                                dim3(args.blocks), dim3(kFloorThreads), params,
                                                0, static_cast<cudaStream_t>(stream)));
  });
}

}  // namespace cnnlstm_fast::cuda
