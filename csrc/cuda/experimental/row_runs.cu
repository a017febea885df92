// Packed row counts written on the device (experimental: CNNLSTM_FAST_EXPERIMENTAL=1 runs
// them for the persistent and streamed kernels of packed input; the default path copies
// the counts from the host, as GPU-verified): a kernel per at most kMaxRowRuns runs of
// equal counts, the values passed by value, so a CUDA graph captures them and the host
// never waits for the stream.
#include <cuda_runtime_api.h>

#include "experimental.h"

namespace cnnlstm_fast::cuda::experimental {
namespace {

__global__ void write_row_runs_kernel(RowRuns runs, int* out) {
  const int t = runs.start + blockIdx.x * blockDim.x + threadIdx.x;
  if (runs.count == 0 || t >= runs.end[runs.count - 1]) return;
  int r = 0;
  while (t >= runs.end[r]) ++r;
  out[t] = runs.value[r];
}

}  // namespace

int write_row_runs(const RowRuns& runs, int* out, void* stream) {
  if (runs.count == 0) return cudaSuccess;
  const int n = runs.end[runs.count - 1] - runs.start;
  write_row_runs_kernel<<<(n + 255) / 256, 256, 0, static_cast<cudaStream_t>(stream)>>>(runs, out);
  return cudaGetLastError();
}

}  // namespace cnnlstm_fast::cuda::experimental
