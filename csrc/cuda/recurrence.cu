// The per-step recurrence kernels (step.cuh) as GPU-verified: the launchers of
// recurrence.h with plain launches, and the backward's add_output_grad.
#include <cuda_runtime_api.h>

#include "step.cuh"

namespace cnnlstm_fast::cuda {
namespace {

template <typename T>
__global__ void add_output_grad_kernel(int batch, int active, int width, const float* d_h,
                                       const T* d_y, float* out) {
  const int idx = blockIdx.x * blockDim.x + threadIdx.x;
  if (idx >= batch * width) return;
  out[idx] = (idx / width) < active ? d_h[idx] + to_float(d_y[idx]) : 0.f;
}

}  // namespace

int step_forward(const StepForwardArgs& args, void* stream) {
  return launch_step_forward<NoPrologue>(args, static_cast<cudaStream_t>(stream), PlainLaunch{});
}

int rowmat_workspace(int batch, int p, int q, long long* floats) {
  int sms = 0;
  if (int err = sm_count(&sms)) return err;
  *floats = (long long)split_plan(batch, p, q, sms).splits * batch * q;
  return cudaSuccess;
}

int rowmat(const RowMatArgs& args, void* stream) {
  return launch_rowmat<NoPrologue>(args, static_cast<cudaStream_t>(stream), PlainLaunch{});
}

int step_backward(const StepBackwardArgs& args, void* stream) {
  return launch_step_backward<NoPrologue>(args, static_cast<cudaStream_t>(stream), PlainLaunch{});
}

int add_output_grad(DType dtype, int batch, int active, int width, const float* d_h,
                    const void* d_y_t, float* out, void* stream_ptr) {
  const int n = batch * width;
  if (n == 0) return cudaSuccess;
  auto stream = static_cast<cudaStream_t>(stream_ptr);
  return with_dtype(dtype, [&](auto type) {
    using T = decltype(type);
    add_output_grad_kernel<T>
        <<<(n + 255) / 256, 256, 0, stream>>>(batch, active, width, d_h, static_cast<const T*>(d_y_t), out);
    return cudaGetLastError();
  });
}

const char* error_string(int error) { return cudaGetErrorString(static_cast<cudaError_t>(error)); }

}  // namespace cnnlstm_fast::cuda
