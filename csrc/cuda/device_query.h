// What the CUDA toolkit and runtime say about this machine, for build_info() and
// cuda_runtime_info(). Plain C++ types only: this header is included by sources that
// g++ compiles without the CUDA headers.
#pragma once

namespace cnnlstm_fast::cuda {

// One runtime call's outcome: its value, or the CUDA error it returned.
struct QueryResult {
  int value = 0;
  int error = 0;                   // cudaError_t; 0 is cudaSuccess
  const char* error_name = "";     // cudaGetErrorName
  const char* error_string = "";   // cudaGetErrorString
};

// CUDART_VERSION of the toolkit these objects were compiled with (e.g. 13000).
int toolkit_version();

QueryResult runtime_version();  // cudaRuntimeGetVersion
QueryResult driver_version();   // cudaDriverGetVersion (0 when no driver is installed)
QueryResult device_count();     // cudaGetDeviceCount

}  // namespace cnnlstm_fast::cuda
