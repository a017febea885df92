// What the .cu files share: dtype conversions, the gate count of a cell, dispatch from
// the runtime cell and dtype to template arguments, the error return that clears
// the runtime's sticky last error, what the host remembers per kernel and device, and
// the dynamic shared memory limit of a kernel.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <map>
#include <mutex>
#include <type_traits>
#include <utility>

#include "recurrence.h"

namespace cnnlstm_fast::cuda {

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v) {
  if constexpr (std::is_same_v<T, float>) {
    return v;
  } else if constexpr (std::is_same_v<T, __half>) {
    return __float2half_rn(v);
  } else {
    return __float2bfloat16_rn(v);
  }
}

template <int kCell>
inline constexpr int kGates =
    kCell == static_cast<int>(Cell::kLstm) ? 4 : kCell == static_cast<int>(Cell::kGru) ? 3 : 1;

inline int gates_of(Cell cell) { return cell == Cell::kLstm ? 4 : cell == Cell::kGru ? 3 : 1; }

// f(std::integral_constant<int, cell>{}).
template <typename F>
cudaError_t with_cell(Cell cell, F&& f) {
  switch (cell) {
    case Cell::kLstm: return f(std::integral_constant<int, 0>{});
    case Cell::kGru: return f(std::integral_constant<int, 1>{});
    case Cell::kRnnTanh: return f(std::integral_constant<int, 2>{});
    case Cell::kRnnRelu: return f(std::integral_constant<int, 3>{});
  }
  return cudaErrorInvalidValue;
}

// f(T{}) with T the C++ type of dtype.
template <typename F>
cudaError_t with_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat32: return f(float{});
    case DType::kFloat16: return f(__half{});
    case DType::kBFloat16: return f(__nv_bfloat16{});
  }
  return cudaErrorInvalidValue;
}

// A failed runtime call also leaves its error as this runtime's last error (the
// extension links its own static cudart), which the next cudaGetLastError() after a
// launch would report again as that launch's failure: clear it here.
inline cudaError_t reported(cudaError_t e) {
  if (e != cudaSuccess) cudaGetLastError();
  return e;
}

// What the host remembers per (kernel, device), behind a mutex (plans and launches run
// on any host thread).
template <typename V>
struct PerKernel {
  std::mutex mutex;
  std::map<std::pair<const void*, int>, V> values;
};

// Lets `kernel` launch with `bytes` of dynamic shared memory on the current device by
// raising its limit (cudaFuncAttributeMaxDynamicSharedMemorySize) where it is lower,
// never lowering it. A plan that set the limit to its own size could lower it, on
// another host thread, between this thread's plan and its launch, which would then
// fail. The limit is only a bound: occupancy queries and launches take their own size.
inline cudaError_t allow_dynamic_smem(const void* kernel, size_t bytes) {
  static PerKernel<size_t> limits;
  int device = 0;
  cudaError_t e = cudaGetDevice(&device);
  if (e) return reported(e);
  std::lock_guard<std::mutex> lock(limits.mutex);
  size_t& limit = limits.values[{kernel, device}];
  if (bytes <= limit) return cudaSuccess;
  e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes);
  if (e) return reported(e);
  limit = bytes;
  return cudaSuccess;
}

}  // namespace cnnlstm_fast::cuda
