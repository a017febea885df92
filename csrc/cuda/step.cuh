// The per-step kernels of the recurrence (the general path, valid for any size), as
// templates: recurrence.cu launches them as they were verified on a GPU, and
// experimental/pdl.cu with programmatic dependent launch; the experimental streamed
// kernels (experimental/streamed.cu) share their pointwise math.
//
// Tiling: a block owns kUnits hidden units (ALL gates of them, so the pointwise math
// is local) x kRows batch rows; one thread per (row, unit). The previous state of the
// block's rows is staged through shared memory in kTileP-wide chunks; W_hh is read
// transposed (out_size, gates*hidden) so a warp's loads of one p are contiguous.
// Synchronisation: none across blocks; steps are ordered by the stream, and h is
// double-buffered by the host loop (h_prev and h_next are different buffers).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <type_traits>
#include <utility>

#include "cnnlstm_fast/gate_math.h"
#include "common.cuh"

namespace cnnlstm_fast::cuda {
namespace {

namespace gm = cnnlstm_fast::gate_math;
using Math = gm::ScalarMath<float>;

constexpr int kUnits = 32;  // threadIdx.x: hidden units (or output columns)
constexpr int kRows = 8;    // threadIdx.y: batch rows
constexpr int kTileP = 64;  // reduction chunk staged in shared memory

// What a per-step kernel runs before it touches global memory: nothing in the launches
// of recurrence.cu; experimental/pdl.cu's prologue waits for the previous kernel.
struct NoPrologue {
  __device__ static void run() {}
};

// kernel<<<grid, block, 0, stream>>>(args...), the launch of recurrence.cu.
struct PlainLaunch {
  template <typename... KernelArgs, typename... Args>
  cudaError_t operator()(void (*kernel)(KernelArgs...), dim3 grid, dim3 block,
                         cudaStream_t stream, Args&&... args) const {
    kernel<<<grid, block, 0, stream>>>(std::forward<Args>(args)...);
    return cudaGetLastError();
  }
};


// acc[k] += sum_p a[row, p] * mat[p, k*stride + col] for this thread's (row, col).
// All threads of the block must call it (it synchronises).
template <int kG, typename TA, typename TM>
__device__ __forceinline__ void accumulate_rows(float (&acc)[kG], const TA* a, const TM* mat,
                                                int batch, int p_size, int mat_cols,
                                                int stride, int row0, int col) {
  __shared__ float tile[kRows][kTileP];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int row = row0 + ty;
  for (int p0 = 0; p0 < p_size; p0 += kTileP) {
    for (int pp = tx; pp < kTileP; pp += kUnits) {
      const int p = p0 + pp;
      tile[ty][pp] = (row < batch && p < p_size) ? to_float(a[(size_t)row * p_size + p]) : 0.f;
    }
    __syncthreads();
    if (col < stride) {
      const int p_end = min(kTileP, p_size - p0);
      for (int pp = 0; pp < p_end; ++pp) {
        const float v = tile[ty][pp];
        const TM* m = mat + (size_t)(p0 + pp) * mat_cols + col;
#pragma unroll
        for (int k = 0; k < kG; ++k) acc[k] += v * to_float(m[(size_t)k * stride]);
      }
    }
    __syncthreads();
  }
}

// The pointwise forward of one (row, unit) of a step, given the recurrent pre-activations
// acc (h W_hh^T of the unit's gates): G_x added, activations, state update, saved
// tensors. Reads and writes only this (b, j)'s elements of h, c and the outputs, so a
// thread that owns (b, j) across steps needs no synchronisation for them.
template <int kCell, typename T>
__device__ __forceinline__ void forward_pointwise(const StepForwardArgs& args,
                                                  const float (&acc)[kGates<kCell>], int b,
                                                  int j) {
  constexpr int kG = kGates<kCell>;
  const int H = args.hidden, gH = kG * args.hidden, Hout = args.out_size;
  if (b >= args.active) {  // inactive row: keep the state, output 0
    if (args.m_out == nullptr) {
      args.h_next[(size_t)b * Hout + j] = args.h_prev[(size_t)b * Hout + j];
      static_cast<T*>(args.y_t)[(size_t)b * Hout + j] = from_float<T>(0.f);
    }
    if constexpr (kCell == static_cast<int>(Cell::kLstm)) {
      const float c_prev = args.c_prev[(size_t)b * H + j];
      args.c_next[(size_t)b * H + j] = c_prev;
      // saved as the reference saves it: the cell state before the step, every row
      if (args.extra_t) args.extra_t[(size_t)b * H + j] = c_prev;
    }
    return;
  }

  const T* gx = static_cast<const T*>(args.gx_t) + (size_t)b * gH;
  float* act = args.act_t ? args.act_t + (size_t)b * gH : nullptr;
  float h_new;
  if constexpr (kCell == static_cast<int>(Cell::kLstm)) {
    const float c_prev = args.c_prev[(size_t)b * H + j];
    const auto s = gm::lstm_forward<Math>(acc[0] + to_float(gx[j]), acc[1] + to_float(gx[H + j]),
                                          acc[2] + to_float(gx[2 * H + j]),
                                          acc[3] + to_float(gx[3 * H + j]), c_prev);
    args.c_next[(size_t)b * H + j] = s.c;
    if (act) {
      act[j] = s.i, act[H + j] = s.f, act[2 * H + j] = s.g, act[3 * H + j] = s.o;
      args.extra_t[(size_t)b * H + j] = c_prev;
    }
    if (args.m_out != nullptr) {  // the projection kernel writes h and y
      args.m_out[(size_t)b * H + j] = s.m;
      return;
    }
    h_new = s.m;
  } else if constexpr (kCell == static_cast<int>(Cell::kGru)) {
    const float b_hn = args.b_hn ? to_float(static_cast<const T*>(args.b_hn)[j]) : 0.f;
    const auto s = gm::gru_forward<Math>(to_float(gx[j]), to_float(gx[H + j]),
                                         to_float(gx[2 * H + j]), acc[0], acc[1], acc[2], b_hn,
                                         args.h_prev[(size_t)b * Hout + j]);
    if (act) {
      act[j] = s.r, act[H + j] = s.z, act[2 * H + j] = s.n;
      args.extra_t[(size_t)b * H + j] = s.h_n;
    }
    h_new = s.h;
  } else {
    constexpr bool kRelu = kCell == static_cast<int>(Cell::kRnnRelu);
    h_new = gm::rnn_forward<Math, kRelu>(acc[0] + to_float(gx[j]));
    if (act) act[j] = h_new;
  }
  args.h_next[(size_t)b * Hout + j] = h_new;
  static_cast<T*>(args.y_t)[(size_t)b * Hout + j] = from_float<T>(h_new);
}

template <int kCell, typename T, typename Prologue>
__global__ void step_forward_kernel(StepForwardArgs args) {
  Prologue::run();
  constexpr int kG = kGates<kCell>;
  const int j = blockIdx.x * kUnits + threadIdx.x;
  const int b = blockIdx.y * kRows + threadIdx.y;
  float acc[kG] = {};
  accumulate_rows<kG>(acc, args.h_prev, static_cast<const T*>(args.w_hh_t), args.batch,
                      args.out_size, kG * args.hidden, args.hidden, blockIdx.y * kRows, j);
  if (j >= args.hidden || b >= args.batch) return;
  forward_pointwise<kCell, T>(args, acc, b, j);
}

// rowmat, split-K: block (x, y, z) owns kSplitCols output columns x kSplitRows rows (one
// column per thread, the rows in registers) over the p-chunk y; a[rows, chunk] is staged
// in shared memory kSplitP at a time and read as a broadcast. The per-step GEMMs of the
// backward (B x 4H times 4H x H) have a small batch and a long reduction, so splitting p
// is what fills the device; the previous one-block-per-tile kernel ran ~140 us a step.
constexpr int kSplitCols = 128;
constexpr int kSplitRows = 16;
constexpr int kSplitP = 64;

struct SplitPlan {
  int splits, chunk;  // p-chunks of chunk (a multiple of kSplitP) columns of a
};

SplitPlan split_plan(int batch, int p, int q, int sms) {
  const int tiles =
      std::max(1, ((q + kSplitCols - 1) / kSplitCols) * ((batch + kSplitRows - 1) / kSplitRows));
  const int max_splits = std::max(1, (p + kSplitP - 1) / kSplitP);
  const int want = std::min(max_splits, std::max(1, (4 * sms + tiles - 1) / tiles));
  const int chunk = std::max(kSplitP, ((p + want - 1) / want + kSplitP - 1) / kSplitP * kSplitP);
  return {std::max(1, (p + chunk - 1) / chunk), chunk};
}

template <typename TA, typename TM, typename Prologue>
__global__ void __launch_bounds__(kSplitCols) rowmat_partial_kernel(RowMatArgs args, int chunk) {
  Prologue::run();
  __shared__ float tile[kSplitRows][kSplitP];
  const int q = blockIdx.x * kSplitCols + threadIdx.x;
  const int row0 = blockIdx.z * kSplitRows;
  const int rows = min(kSplitRows, args.active - row0);
  const int p_begin = blockIdx.y * chunk, p_end = min(args.p, p_begin + chunk);
  const TA* a = static_cast<const TA*>(args.a);
  const TM* mat = static_cast<const TM*>(args.mat);
  float acc[kSplitRows] = {};
  for (int p0 = p_begin; p0 < p_end; p0 += kSplitP) {
    for (int i = threadIdx.x; i < kSplitRows * kSplitP; i += kSplitCols) {
      const int r = i / kSplitP, p = p0 + i % kSplitP;
      tile[r][i % kSplitP] = (r < rows && p < p_end) ? to_float(a[(size_t)(row0 + r) * args.p + p]) : 0.f;
    }
    __syncthreads();
    if (q < args.q) {
      const int n = min(kSplitP, p_end - p0);
#pragma unroll 4
      for (int pp = 0; pp < n; ++pp) {
        const float w = to_float(mat[(size_t)(p0 + pp) * args.q + q]);
#pragma unroll
        for (int r = 0; r < kSplitRows; ++r) acc[r] += tile[r][pp] * w;
      }
    }
    __syncthreads();
  }
  if (q >= args.q) return;
  float* out = args.workspace + ((size_t)blockIdx.y * args.batch + row0) * args.q + q;
  for (int r = 0; r < rows; ++r) out[(size_t)r * args.q] = acc[r];
}

template <typename TM, typename Prologue>
__global__ void rowmat_reduce_kernel(RowMatArgs args, int splits) {
  Prologue::run();
  const size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  const size_t n = (size_t)args.batch * args.q;
  if (idx >= n) return;
  const int b = static_cast<int>(idx / args.q);
  float v;
  if (b < args.active) {
    v = args.addend ? args.addend[idx] : 0.f;
    for (int s = 0; s < splits; ++s) v += args.workspace[s * n + idx];
  } else {
    v = args.passthrough ? args.passthrough[idx] : 0.f;
  }
  args.out[idx] = v;
  if (args.y) static_cast<TM*>(args.y)[idx] = from_float<TM>(b < args.active ? v : 0.f);
}

// The pointwise backward of one active (row, unit) of a step: gate gradients from the
// saved activations; d_c carried in place. Reads and writes only this (b, j)'s elements
// of d_h, d_c, d_h_direct and m_t, so a thread that owns (b, j) across steps needs no
// synchronisation for them.
template <int kCell, typename T>
__device__ __forceinline__ void backward_pointwise(const StepBackwardArgs& args, int b, int j) {
  constexpr int kG = kGates<kCell>;
  const int H = args.hidden, gH = kG * H, Hout = args.out_size;
  const float* act = args.act_t + (size_t)b * gH;
  float* d_gx = args.d_gx_t + (size_t)b * gH;
  const T* d_y = static_cast<const T*>(args.d_y_t);
  const size_t o = (size_t)b * Hout + j;
  if constexpr (kCell == static_cast<int>(Cell::kLstm)) {
    const float d_m = args.d_m ? args.d_m[(size_t)b * H + j] : args.d_h[o] + to_float(d_y[o]);
    const auto g = gm::lstm_backward<Math>(act[j], act[H + j], act[2 * H + j], act[3 * H + j],
                                           args.extra_t[(size_t)b * H + j], d_m,
                                           args.d_c[(size_t)b * H + j]);
    d_gx[j] = g.d_i, d_gx[H + j] = g.d_f, d_gx[2 * H + j] = g.d_g, d_gx[3 * H + j] = g.d_o;
    args.d_c[(size_t)b * H + j] = g.d_c_prev;
    if (args.m_t) args.m_t[(size_t)b * H + j] = g.m;
  } else if constexpr (kCell == static_cast<int>(Cell::kGru)) {
    const float g_h = args.d_h[o] + to_float(d_y[o]);
    const auto g = gm::gru_backward<Math>(act[j], act[H + j], act[2 * H + j],
                                          args.extra_t[(size_t)b * H + j], args.h_prev_t[o], g_h);
    d_gx[j] = g.d_r, d_gx[H + j] = g.d_z, d_gx[2 * H + j] = g.d_n;
    float* d_gh = args.d_gh_t + (size_t)b * gH;
    d_gh[j] = g.d_r, d_gh[H + j] = g.d_z, d_gh[2 * H + j] = g.d_a_n;
    args.d_h_direct[o] = g.d_h_direct;
  } else {
    constexpr bool kRelu = kCell == static_cast<int>(Cell::kRnnRelu);
    d_gx[j] = gm::rnn_backward<Math, kRelu>(act[j], args.d_h[o] + to_float(d_y[o]));
  }
}

template <int kCell, typename T, typename Prologue>
__global__ void step_backward_kernel(StepBackwardArgs args) {
  Prologue::run();
  const int idx = blockIdx.x * blockDim.x + threadIdx.x;
  const int b = idx / args.hidden, j = idx % args.hidden;
  if (b >= args.active) return;  // inactive rows: d_gx stays 0, d_c is carried as is
  backward_pointwise<kCell, T>(args, b, j);
}

dim3 tiles(int cols, int rows) {
  return dim3((cols + kUnits - 1) / kUnits, (rows + kRows - 1) / kRows);
}

inline int sm_count(int* sms) {
  int device = 0;
  int err = cudaGetDevice(&device);
  if (!err) err = cudaDeviceGetAttribute(sms, cudaDevAttrMultiProcessorCount, device);
  return reported(static_cast<cudaError_t>(err));
}

// The launchers of ../recurrence.h (step_forward, rowmat, step_backward), with the
// kernels' Prologue and a Launch functor that launches kernel, grid, block, stream, args.
template <typename Prologue, typename Launch>
cudaError_t launch_step_forward(const StepForwardArgs& args, cudaStream_t stream,
                                const Launch& launch) {
  // nothing to compute (the op lets an empty layer through): a grid of 0 blocks fails
  if (args.batch == 0 || args.hidden == 0) return cudaSuccess;
  return with_cell(args.cell, [&](auto cell) {
    return with_dtype(args.dtype, [&](auto type) {
      using T = decltype(type);
      return launch(step_forward_kernel<decltype(cell)::value, T, Prologue>,
                    tiles(args.hidden, args.batch), dim3(kUnits, kRows), stream, args);
    });
  });
}

template <typename Prologue, typename Launch>
cudaError_t launch_rowmat(const RowMatArgs& args, cudaStream_t stream, const Launch& launch) {
  if (args.batch == 0 || args.q == 0) return cudaSuccess;
  int sms = 0;
  if (int err = sm_count(&sms)) return static_cast<cudaError_t>(err);
  const SplitPlan plan = split_plan(args.batch, args.p, args.q, sms);
  return with_dtype(args.mat_dtype, [&](auto mat_type) {
    using TM = decltype(mat_type);
    auto partial = [&](auto a_type) {
      using TA = decltype(a_type);
      const dim3 grid((args.q + kSplitCols - 1) / kSplitCols, plan.splits,
                      (args.active + kSplitRows - 1) / kSplitRows);
      return launch(rowmat_partial_kernel<TA, TM, Prologue>, grid, dim3(kSplitCols), stream,
                    args, plan.chunk);
    };
    if (args.active > 0 && args.p > 0) {
      const cudaError_t err = args.a_dtype == DType::kFloat32 ? partial(float{}) : partial(TM{});
      if (err != cudaSuccess) return err;
    }
    // with an empty reduction no partial sums were written: the sum over 0 splits is 0
    const int splits = args.p > 0 ? plan.splits : 0;
    const size_t n = (size_t)args.batch * args.q;
    return launch(rowmat_reduce_kernel<TM, Prologue>, dim3((unsigned)((n + 255) / 256)),
                  dim3(256), stream, args, splits);
  });
}

template <typename Prologue, typename Launch>
cudaError_t launch_step_backward(const StepBackwardArgs& args, cudaStream_t stream,
                                 const Launch& launch) {
  const int n = args.active * args.hidden;
  if (n == 0) return cudaSuccess;
  return with_cell(args.cell, [&](auto cell) {
    return with_dtype(args.dtype, [&](auto type) {
      using T = decltype(type);
      return launch(step_backward_kernel<decltype(cell)::value, T, Prologue>,
                    dim3((n + 255) / 256), dim3(256), stream, args);
    });
  });
}

}  // namespace
}  // namespace cnnlstm_fast::cuda
