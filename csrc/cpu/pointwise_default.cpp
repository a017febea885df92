// The pointwise kernels for the baseline ISA the extension is compiled for.
#define CNNLSTM_FAST_KERNELS_FN pointwise_kernels_default
#include "pointwise_impl.h"

namespace cnnlstm_fast::cpu {
template const PointwiseKernels<float>& pointwise_kernels_default<float>();
template const PointwiseKernels<double>& pointwise_kernels_default<double>();
}  // namespace cnnlstm_fast::cpu
