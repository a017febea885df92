// The end of pointwise_avx2.cpp and pointwise_avx512.cpp: the exported getter
// CNNLSTM_FAST_ISA_GETTER of the table that pointwise_impl.h built as
// CNNLSTM_FAST_KERNELS_FN, or null where the file built none (a non-x86 target).
#include "pointwise.h"

namespace cnnlstm_fast::cpu {
template <typename scalar_t>
const PointwiseKernels<scalar_t>* CNNLSTM_FAST_ISA_GETTER() {
#ifdef CNNLSTM_FAST_KERNELS_FN
  return &CNNLSTM_FAST_KERNELS_FN<scalar_t>();
#else
  return nullptr;
#endif
}
template const PointwiseKernels<float>* CNNLSTM_FAST_ISA_GETTER<float>();
template const PointwiseKernels<double>* CNNLSTM_FAST_ISA_GETTER<double>();
}  // namespace cnnlstm_fast::cpu
