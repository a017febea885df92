// The ISA macros sleef.h and at::vec test for AVX2+FMA, which `#pragma GCC target` does
// not define: included right after that pragma by pointwise_avx2.cpp and
// pointwise_avx512.cpp, whose whole TU is compiled for (at least) that ISA.
#ifndef __AVX__
#define __AVX__ 1
#endif
#ifndef __AVX2__
#define __AVX2__ 1
#endif
#ifndef __FMA__
#define __FMA__ 1
#endif
