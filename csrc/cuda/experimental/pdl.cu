// The per-step kernels (../step.cuh) with programmatic dependent launch, sm_90
// (experimental: set_kernels(cuda_pdl=True) with CNNLSTM_FAST_EXPERIMENTAL=1). A kernel
// launched so may start while the previous kernel in the stream still runs, hiding the
// launch latency between the steps' small kernels: each one waits (griddepcontrol.wait)
// until its predecessor has completed and its writes are visible before it touches
// global memory, then lets its successor launch once all of its own blocks run.
#include <cuda_runtime_api.h>

#include <mutex>
#include <utility>

#include "../step.cuh"
#include "experimental.h"

namespace cnnlstm_fast::cuda::experimental {
namespace {

// The prologue of the PDL kernels; both instructions are no-ops in a kernel launched
// without PDL and are compiled for sm_90 only.
struct PdlPrologue {
  __device__ static void run() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
  }
};

// Whether `kernel` runs code built for sm_90 or later on the current device, where its
// wait is compiled in: an sm_80-only build JIT-compiles its PTX on an H100, and that
// code has no wait, so launching it with PDL would let it read too early.
cudaError_t runs_sm90_code(const void* kernel, bool* yes) {
  static PerKernel<bool> known;
  int device = 0;
  cudaError_t e = cudaGetDevice(&device);
  if (e) return reported(e);
  std::lock_guard<std::mutex> lock(known.mutex);
  const auto key = std::make_pair(kernel, device);
  auto found = known.values.find(key);
  if (found == known.values.end()) {
    int major = 0;
    cudaFuncAttributes attrs{};
    e = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
    if (!e) e = cudaFuncGetAttributes(&attrs, kernel);
    if (e) return reported(e);
    found = known.values.emplace(key, major >= 9 && attrs.ptxVersion >= 90).first;
  }
  *yes = found->second;
  return cudaSuccess;
}

// kernel<<<grid, block, 0, stream>>>(args...) with programmatic stream serialization
// where the kernel runs sm_90 code on the current device (runs_sm90_code), else plain.
struct PdlLaunch {
  template <typename... KernelArgs, typename... Args>
  cudaError_t operator()(void (*kernel)(KernelArgs...), dim3 grid, dim3 block,
                         cudaStream_t stream, Args&&... args) const {
    bool sm90 = false;
    if (cudaError_t e = runs_sm90_code(reinterpret_cast<const void*>(kernel), &sm90)) return e;
    if (!sm90) return PlainLaunch{}(kernel, grid, block, stream, std::forward<Args>(args)...);
    cudaLaunchConfig_t cfg{};
    cfg.gridDim = grid, cfg.blockDim = block, cfg.stream = stream;
    cudaLaunchAttribute attr{};
    attr.id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr.val.programmaticStreamSerializationAllowed = 1;
    cfg.attrs = &attr, cfg.numAttrs = 1;
    return reported(cudaLaunchKernelEx(&cfg, kernel, std::forward<Args>(args)...));
  }
};

}  // namespace

int step_forward_pdl(const StepForwardArgs& args, void* stream) {
  return launch_step_forward<PdlPrologue>(args, static_cast<cudaStream_t>(stream), PdlLaunch{});
}

int rowmat_pdl(const RowMatArgs& args, void* stream) {
  return launch_rowmat<PdlPrologue>(args, static_cast<cudaStream_t>(stream), PdlLaunch{});
}

int step_backward_pdl(const StepBackwardArgs& args, void* stream) {
  return launch_step_backward<PdlPrologue>(args, static_cast<cudaStream_t>(stream), PdlLaunch{});
}

}  // namespace cnnlstm_fast::cuda::experimental
