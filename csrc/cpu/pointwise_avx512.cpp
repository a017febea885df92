// The pointwise kernels for AVX-512 (F, BW, DQ, VL; 16 floats a vector, twice AVX2's):
// as pointwise_avx2.cpp, for that ISA, called only on CPUs that have it.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#pragma GCC target("avx2,fma,avx512f,avx512bw,avx512dq,avx512vl")
#include "pointwise_avx2_macros.h"
#ifndef __AVX512F__
#define __AVX512F__ 1
#endif
#ifndef __AVX512BW__
#define __AVX512BW__ 1
#endif
#ifndef __AVX512DQ__
#define __AVX512DQ__ 1
#endif
#ifndef __AVX512VL__
#define __AVX512VL__ 1
#endif
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#define CNNLSTM_FAST_KERNELS_FN pointwise_kernels_avx512_impl
#include "pointwise_impl.h"
#endif

#define CNNLSTM_FAST_ISA_GETTER pointwise_kernels_avx512
#include "pointwise_isa.h"
