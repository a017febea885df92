// Toolkit and runtime queries behind build_info() and cuda_runtime_info(). The CUDA
// runtime is linked statically, so these answer even where libcudart is not installed;
// without a driver or device they return the runtime's own error.
#include "device_query.h"

#include <cuda_runtime.h>

namespace cnnlstm_fast::cuda {
namespace {

QueryResult result_of(cudaError_t status, int value) {
  QueryResult result;
  result.value = value;
  result.error = static_cast<int>(status);
  if (status != cudaSuccess) {
    result.error_name = cudaGetErrorName(status);
    result.error_string = cudaGetErrorString(status);
    cudaGetLastError();  // a failed query must not leak into the next CUDA call
  }
  return result;
}

}  // namespace

int toolkit_version() { return CUDART_VERSION; }

QueryResult runtime_version() {
  int value = 0;
  cudaError_t status = cudaRuntimeGetVersion(&value);
  return result_of(status, value);
}

QueryResult driver_version() {
  int value = 0;
  cudaError_t status = cudaDriverGetVersion(&value);
  return result_of(status, value);
}

QueryResult device_count() {
  int value = 0;
  cudaError_t status = cudaGetDeviceCount(&value);
  return result_of(status, value);
}

}  // namespace cnnlstm_fast::cuda
