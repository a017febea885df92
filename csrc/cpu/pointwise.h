// The fused per-step pointwise pass of the CPU recurrence (bias, activations, state
// update; or their derivatives), one function per cell type and direction.
//
// The kernels are compiled three times from pointwise_impl.h: for the baseline ISA
// (pointwise_default.cpp), for AVX2+FMA (pointwise_avx2.cpp) and for AVX-512
// (pointwise_avx512.cpp), because an extension is built with the compiler's baseline
// flags while the SIMD math (at::vec::Vectorized, Sleef) only vectorises when its TU
// targets AVX2 or AVX-512.
// recurrence.cpp picks the table at run time from what the CPU supports.
#pragma once

#include <cstdint>

namespace cnnlstm_fast::cpu {

enum Cell : int { kLstm = 0, kGru = 1, kRnnTanh = 2, kRnnRelu = 3, kNumCells = 4 };

// One forward step on rows [0, rows) and hidden units [col_begin, col_end). Row-major,
// gates of a row contiguous (gates * hidden) in act. G_x and the recurrent product
// h W_hh^T are read at p + row * row_stride + gate * gate_stride + j for hidden unit j:
// in place in the whole (rows, gates*hidden) layout (strides gates*hidden and hidden),
// or, on the persistent path, from a thread's buffer of its own units (the pointer
// offset back by col_begin). Pointers that a cell does not use are null.
template <typename scalar_t>
struct ForwardStep {
  int64_t rows;
  int64_t hidden;
  int64_t col_begin, col_end;  // the hidden units this call updates
  const scalar_t* gx;          // G_x[t]
  int64_t gx_row_stride, gx_gate_stride;
  const scalar_t* hw;  // h W_hh^T (may be act itself)
  int64_t hw_row_stride, hw_gate_stride;
  scalar_t* act;         // (rows, gates*hidden) out: gate activations, or null (not saved)
  const scalar_t* h_in;  // GRU (rows, hidden): h_{t-1} (may be h)
  scalar_t* h;           // (rows, hidden) out: h_t (not with projection)
  scalar_t* y;           // (rows, hidden) out: Y[t] (not with projection)
  int64_t y_row_stride;  // Y[t]'s row stride: hidden, or wider where Y is a column block
  scalar_t* c;           // LSTM (rows, hidden): cell state, updated in place
  scalar_t* m;           // LSTM with projection (rows, hidden) out: o * tanh(c)
  scalar_t* extra;       // GRU (rows, hidden) out: a_n + b_hn, saved for backward (nullable)
  const scalar_t* b_hn;  // GRU (hidden) or null (no bias)
};

// One backward step on rows [0, rows) and hidden units [col_begin, col_end) (all gates
// of those units in d_gx and d_gh).
template <typename scalar_t>
struct BackwardStep {
  int64_t rows;
  int64_t hidden;
  int64_t col_begin, col_end;
  const scalar_t* act;      // (rows, gates*hidden) gate activations saved by forward
  const scalar_t* extra;    // LSTM: cell state before the step; GRU: a_n + b_hn
  const scalar_t* h_prev;   // GRU (rows, hidden): h before the step
  const scalar_t* d_y;      // (rows, hidden) dY[t]
  scalar_t* dh;             // (rows, hidden) in: dh from later steps; GRU out: d_h * z
  const scalar_t* d_m;      // LSTM with projection (rows, hidden): gradient of m, else null
  scalar_t* dc;             // LSTM (rows, hidden): cell-state gradient, updated in place
  scalar_t* d_gx;           // (rows, gates*hidden) out: dG_x[t]
  scalar_t* d_gh;           // GRU (rows, gates*hidden) out: gradient of h W_hh^T (+ b_hn)
  scalar_t* m;              // LSTM with projection (rows, hidden) out: o * tanh(c)
};

template <typename scalar_t>
struct PointwiseKernels {
  void (*forward[kNumCells])(const ForwardStep<scalar_t>&);
  void (*backward[kNumCells])(const BackwardStep<scalar_t>&);
  void (*add)(int64_t size, const scalar_t* a, const scalar_t* b, scalar_t* out);
};

template <typename scalar_t>
const PointwiseKernels<scalar_t>& pointwise_kernels_default();

// Null when this build has no AVX2 / AVX-512 variant (a non-x86 target).
template <typename scalar_t>
const PointwiseKernels<scalar_t>* pointwise_kernels_avx2();
template <typename scalar_t>
const PointwiseKernels<scalar_t>* pointwise_kernels_avx512();

}  // namespace cnnlstm_fast::cpu
