// The pointwise kernels for AVX2+FMA: this TU alone is compiled for that ISA (the rest
// of the extension keeps the baseline flags) and recurrence.cpp calls it only on CPUs
// that have AVX2 and FMA. CPU_CAPABILITY puts at::vec's types in their own inline
// namespace, as torch's own AVX2 kernels do, so they never clash with the baseline TU.
// The pragma does not define the ISA macros that sleef.h and at::vec test, hence the
// defines: the whole TU is compiled for AVX2+FMA, so they are true.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#pragma GCC target("avx2,fma")
#include "pointwise_avx2_macros.h"
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#define CNNLSTM_FAST_KERNELS_FN pointwise_kernels_avx2_impl
#include "pointwise_impl.h"
#endif

#define CNNLSTM_FAST_ISA_GETTER pointwise_kernels_avx2
#include "pointwise_isa.h"
