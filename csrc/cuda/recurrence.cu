// Per-step fused recurrence kernels (the general path, valid for any size).
//
// Tiling: a block owns kUnits hidden units (ALL gates of them, so the pointwise math
// is local) x kRows batch rows; one thread per (row, unit). The previous state of the
// block's rows is staged through shared memory in kTileP-wide chunks; W_hh is read
// transposed (out_size, gates*hidden) so a warp's loads of one p are contiguous.
// Synchronisation: none across blocks; steps are ordered by the stream, and h is
// double-buffered by the host loop (h_prev and h_next are different buffers).
#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <type_traits>

#include "cnnlstm_fast/gate_math.h"
#include "common.cuh"
#include "persistent.h"

namespace cnnlstm_fast::cuda {
namespace {

namespace cg = cooperative_groups;
namespace gm = cnnlstm_fast::gate_math;
using Math = gm::ScalarMath<float>;

constexpr int kUnits = 32;  // threadIdx.x: hidden units (or output columns)
constexpr int kRows = 8;    // threadIdx.y: batch rows
constexpr int kTileP = 64;  // reduction chunk staged in shared memory

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

template <int kCell, typename T>
__global__ void step_forward_kernel(StepForwardArgs args) {
  pdl_wait();
  pdl_launch_dependents();
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

template <typename TA, typename TM>
__global__ void __launch_bounds__(kSplitCols) rowmat_partial_kernel(RowMatArgs args, int chunk) {
  pdl_wait();
  pdl_launch_dependents();
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

template <typename TM>
__global__ void rowmat_reduce_kernel(RowMatArgs args, int splits) {
  pdl_wait();
  pdl_launch_dependents();
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

template <int kCell, typename T>
__global__ void step_backward_kernel(StepBackwardArgs args) {
  pdl_wait();
  pdl_launch_dependents();
  const int idx = blockIdx.x * blockDim.x + threadIdx.x;
  const int b = idx / args.hidden, j = idx % args.hidden;
  if (b >= args.active) return;  // inactive rows: d_gx stays 0, d_c is carried as is
  backward_pointwise<kCell, T>(args, b, j);
}

// Persistent backward (CUDA cores, any dtype): one cooperative launch for the sequence;
// W_hh is not kept on chip but read from L2 every step (so any hidden size fits), and
// the grid meets twice a step:
//   A. each thread owns fixed (row, unit) elements: it adds up the previous step's
//      partial sums into d_h (+ d_h z for GRU; inactive rows keep d_h), then runs the
//      pointwise backward of step t, writing dG[t];
//   B. the blocks share the work items (kSplitCols columns of d_h x a p-chunk x
//      kSplitRows rows) of partial[chunk] = dG_h[t, rows, chunk] W_hh[chunk, columns],
//      with dG_h[t] staged transposed in shared memory (four rows per 16-byte read).
// Data written by other blocks within the launch (dG_h[t], the partial sums) is read
// with ld.global.cg, so no stale L1 line is used. The partial sums are added in a fixed
// order (deterministic). After the last step, phase A's sum alone gives d_h0.
constexpr int kPbPad = 4;  // tile row padding: 4-way instead of 16-way bank conflicts on staging
using PartialTile = float[kSplitP][kSplitRows + kPbPad];  // tile[pp][r]: a^T, a chunk of p

// partial[sp][b][q] = sum over p in chunk sp of a[b][p] mat[p][q], rows b < active,
// columns q < q_size, for one step of a streamed kernel: the blocks of the grid share
// the work items (kSplitCols columns x a p-chunk x kSplitRows rows). `a` (float32,
// (batch, p_size)) was written by other blocks in this launch: read with ld.global.cg.
// Every thread of every block must call it (it synchronises the block).
template <typename T>
__device__ void partial_items(const float* a, int p_size, const T* mat, int q_size, int batch,
                              int active, int splits, int chunk, float* partial,
                              PartialTile& tile) {
  const int col_tiles = (q_size + kSplitCols - 1) / kSplitCols;
  const int row_tiles = (active + kSplitRows - 1) / kSplitRows;
  const int items = col_tiles * splits * row_tiles;
  for (int item = blockIdx.x; item < items; item += gridDim.x) {  // uniform in a block
    const int ct = item % col_tiles, sp = item / col_tiles % splits;
    const int row0 = item / (col_tiles * splits) * kSplitRows;
    const int rows = min(kSplitRows, active - row0);
    const int q = ct * kSplitCols + threadIdx.x;
    const int p_begin = sp * chunk, p_end = min(p_size, p_begin + chunk);
    float acc[kSplitRows] = {};
    for (int p0 = p_begin; p0 < p_end; p0 += kSplitP) {
      __syncthreads();  // the tile's previous contents are used up
      for (int i = threadIdx.x; i < kSplitRows * kSplitP; i += kSplitCols) {
        const int r = i / kSplitP, pp = i % kSplitP, col = p0 + pp;
        tile[pp][r] = r < rows && col < p_end ? __ldcg(a + (size_t)(row0 + r) * p_size + col) : 0.f;
      }
      __syncthreads();
      if (q < q_size) {
        const int count = min(kSplitP, p_end - p0);
#pragma unroll 4
        for (int pp = 0; pp < count; ++pp) {
          const float wv = to_float(mat[(size_t)(p0 + pp) * q_size + q]);
          const float4* v4 = reinterpret_cast<const float4*>(tile[pp]);
#pragma unroll
          for (int r4 = 0; r4 < kSplitRows / 4; ++r4) {
            const float4 v = v4[r4];
            acc[4 * r4] += v.x * wv, acc[4 * r4 + 1] += v.y * wv;
            acc[4 * r4 + 2] += v.z * wv, acc[4 * r4 + 3] += v.w * wv;
          }
        }
      }
    }
    if (q < q_size) {
      float* out = partial + ((size_t)sp * batch + row0) * q_size + q;
      for (int r = 0; r < rows; ++r) out[(size_t)r * q_size] = acc[r];
    }
  }
}

template <int kCell, typename T>
__global__ void __launch_bounds__(kSplitCols)
    persistent_backward_kernel(PersistentBackwardArgs a, int splits, int chunk) {
  constexpr int kG = kGates<kCell>;
  constexpr bool kGru = kCell == static_cast<int>(Cell::kGru);
  __shared__ __align__(16) PartialTile tile;
  cg::grid_group grid = cg::this_grid();
  const int H = a.hidden, gH = kG * H, B = a.batch;
  const size_t n = (size_t)B * H;
  const size_t first = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  const size_t stride = (size_t)gridDim.x * blockDim.x;
  const T* w = static_cast<const T*>(a.w_hh);
  const T* d_y = static_cast<const T*>(a.d_y);
  int pending = 0;  // rows of the step whose partial sums phase A adds up next
  for (int s = 0; s <= a.steps; ++s) {
    const bool has_step = s < a.steps;
    const int t = a.reverse ? s : a.steps - 1 - s;  // forward's order, backwards
    const int active = has_step ? (a.active_rows ? a.active_rows[t] : B) : 0;
    StepBackwardArgs p{};
    if (has_step) {
      const size_t at = (size_t)t * B;
      p.batch = B, p.active = active, p.hidden = H, p.out_size = H;
      p.act_t = a.act + at * gH;
      p.extra_t = a.extra ? a.extra + at * H : nullptr;
      p.h_prev_t = a.h_prev + at * H;
      p.d_h = a.d_h, p.d_y_t = d_y + at * H, p.d_c = a.d_c;
      p.d_gx_t = a.d_gx + at * gH;
      p.d_gh_t = kGru ? a.d_gh + at * gH : nullptr;
      p.d_h_direct = a.d_h_direct;
    }
    for (size_t idx = first; idx < n; idx += stride) {  // phase A
      const int b = static_cast<int>(idx / H), j = static_cast<int>(idx % H);
      if (b < pending) {
        float v = kGru ? a.d_h_direct[idx] : 0.f;
        for (int sp = 0; sp < splits; ++sp) v += __ldcg(a.partial + sp * n + idx);
        a.d_h[idx] = v;
      }
      if (b < active) backward_pointwise<kCell, T>(p, b, j);
    }
    if (!has_step) break;
    grid.sync();

    const float* d_gh = (kGru ? a.d_gh : a.d_gx) + (size_t)t * B * gH;  // phase B
    partial_items(d_gh, gH, w, H, B, active, splits, chunk, a.partial, tile);
    grid.sync();
    pending = active;
  }
}

// Streamed forward (CUDA cores, any dtype; opt-in, CNNLSTM_FAST_CUDA_KERNEL=streamed):
// the per-step kernels' work in one cooperative launch for shapes whose W_hh the
// persistent kernels cannot hold on chip; W_hh^T is read from L2 every step, and the
// grid meets twice a step:
//   B. the blocks share the work items of partial[chunk] = h[rows, chunk] W_hh^T[chunk,
//      gate columns] (rows < active; h written by other blocks: ld.global.cg);
//   A. each thread owns fixed (row, unit) elements: it adds up its unit's gate
//      pre-activations in a fixed order and runs the pointwise forward (G_x,
//      activations, state, saved tensors; inactive rows keep their state).
// h is double-buffered (h_buf[s % 2] before step s); c is updated in place.
template <int kCell, typename T>
__global__ void __launch_bounds__(kSplitCols)
    streamed_forward_kernel(PersistentForwardArgs a, int splits, int chunk) {
  constexpr int kG = kGates<kCell>;
  __shared__ __align__(16) PartialTile tile;
  cg::grid_group grid = cg::this_grid();
  const int H = a.hidden, gH = kG * H, B = a.batch;
  const size_t n = (size_t)B * H, ng = (size_t)B * gH;
  const size_t first = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  const size_t stride = (size_t)gridDim.x * blockDim.x;
  const T* w_t = static_cast<const T*>(a.w_hh_t);
  for (int s = 0; s < a.steps; ++s) {
    const int t = a.reverse ? a.steps - 1 - s : s;
    const int active = a.active_rows ? a.active_rows[t] : B;
    float* h_cur = a.h_buf + (size_t)(s & 1) * n;
    partial_items(h_cur, H, w_t, gH, B, active, splits, chunk, a.partial, tile);  // phase B
    grid.sync();

    const size_t at = (size_t)t * B;  // phase A
    StepForwardArgs p{};
    p.batch = B, p.active = active, p.hidden = H, p.out_size = H;
    p.gx_t = static_cast<const T*>(a.gx) + at * gH;
    p.h_prev = h_cur, p.h_next = a.h_buf + (size_t)((s + 1) & 1) * n;
    p.c_prev = a.c_state, p.c_next = a.c_state;
    p.b_hn = a.b_hn, p.y_t = static_cast<T*>(a.y) + at * H;
    p.act_t = a.act ? a.act + at * gH : nullptr;
    p.extra_t = a.extra ? a.extra + at * H : nullptr;
    for (size_t idx = first; idx < n; idx += stride) {
      const int b = static_cast<int>(idx / H), j = static_cast<int>(idx % H);
      if (a.h_prev_all) a.h_prev_all[at * H + idx] = h_cur[idx];
      float acc[kG] = {};
      if (b < active) {
        const float* mine = a.partial + (size_t)b * gH + j;
#pragma unroll
        for (int g = 0; g < kG; ++g) {
          for (int sp = 0; sp < splits; ++sp) acc[g] += __ldcg(mine + sp * ng + (size_t)g * H);
        }
      }
      forward_pointwise<kCell, T>(p, acc, b, j);
    }
    grid.sync();  // h of this step complete; the partial sums used up
  }
}

template <typename T>
__global__ void add_output_grad_kernel(int batch, int active, int width, const float* d_h,
                                       const T* d_y, float* out) {
  const int idx = blockIdx.x * blockDim.x + threadIdx.x;
  if (idx >= batch * width) return;
  out[idx] = (idx / width) < active ? d_h[idx] + to_float(d_y[idx]) : 0.f;
}

dim3 tiles(int cols, int rows) {
  return dim3((cols + kUnits - 1) / kUnits, (rows + kRows - 1) / kRows);
}

}  // namespace

int step_forward(const StepForwardArgs& args, void* stream_ptr) {
  // nothing to compute (the op lets an empty layer through): a grid of 0 blocks fails
  if (args.batch == 0 || args.hidden == 0) return cudaSuccess;
  auto stream = static_cast<cudaStream_t>(stream_ptr);
  return with_cell(args.cell, [&](auto cell) {
    return with_dtype(args.dtype, [&](auto type) {
      using T = decltype(type);
      return launch(args.pdl, step_forward_kernel<decltype(cell)::value, T>,
                    tiles(args.hidden, args.batch), dim3(kUnits, kRows), stream, args);
    });
  });
}

static int sm_count(int* sms) {
  int device = 0;
  int err = cudaGetDevice(&device);
  if (!err) err = cudaDeviceGetAttribute(sms, cudaDevAttrMultiProcessorCount, device);
  return reported(static_cast<cudaError_t>(err));
}

int rowmat_workspace(int batch, int p, int q, long long* floats) {
  int sms = 0;
  if (int err = sm_count(&sms)) return err;
  *floats = (long long)split_plan(batch, p, q, sms).splits * batch * q;
  return cudaSuccess;
}

int rowmat(const RowMatArgs& args, void* stream_ptr) {
  if (args.batch == 0 || args.q == 0) return cudaSuccess;
  auto stream = static_cast<cudaStream_t>(stream_ptr);
  int sms = 0;
  if (int err = sm_count(&sms)) return err;
  const SplitPlan plan = split_plan(args.batch, args.p, args.q, sms);
  return with_dtype(args.mat_dtype, [&](auto mat_type) {
    using TM = decltype(mat_type);
    auto partial = [&](auto a_type) {
      using TA = decltype(a_type);
      const dim3 grid((args.q + kSplitCols - 1) / kSplitCols, plan.splits,
                      (args.active + kSplitRows - 1) / kSplitRows);
      return launch(args.pdl, rowmat_partial_kernel<TA, TM>, grid, dim3(kSplitCols), stream,
                    args, plan.chunk);
    };
    if (args.active > 0 && args.p > 0) {
      const cudaError_t err = args.a_dtype == DType::kFloat32 ? partial(float{}) : partial(TM{});
      if (err != cudaSuccess) return err;
    }
    // with an empty reduction no partial sums were written: the sum over 0 splits is 0
    const int splits = args.p > 0 ? plan.splits : 0;
    const size_t n = (size_t)args.batch * args.q;
    return launch(args.pdl, rowmat_reduce_kernel<TM>, dim3((unsigned)((n + 255) / 256)),
                  dim3(256), stream, args, splits);
  });
}

int step_backward(const StepBackwardArgs& args, void* stream_ptr) {
  const int n = args.active * args.hidden;
  if (n == 0) return cudaSuccess;
  auto stream = static_cast<cudaStream_t>(stream_ptr);
  return with_cell(args.cell, [&](auto cell) {
    return with_dtype(args.dtype, [&](auto type) {
      using T = decltype(type);
      return launch(args.pdl, step_backward_kernel<decltype(cell)::value, T>,
                    dim3((n + 255) / 256), dim3(256), stream, args);
    });
  });
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

namespace {

// The grid and the p-split of a streamed kernel (p: the reduction, q: the columns of
// the per-step product) on the current device; plan->usable false where the device has
// no cooperative launch or no block fits.
template <typename K>
cudaError_t streamed_plan(K kernel, int batch, int p, int q, StreamedPlan* plan) {
  *plan = StreamedPlan{};
  if (batch <= 0 || p <= 0 || q <= 0) return cudaSuccess;
  int device = 0, sms = 0, coop = 0, per_sm = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (!err) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (!err) err = cudaDeviceGetAttribute(&coop, cudaDevAttrCooperativeLaunch, device);
  if (!err) err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kSplitCols, 0);
  if (err) return reported(err);
  if (!coop || per_sm <= 0) return cudaSuccess;
  // two blocks per SM: enough warps to hide L2 latency, few arrivals per grid barrier
  const int blocks = std::min(per_sm, 2) * sms;
  const int tiles = ((q + kSplitCols - 1) / kSplitCols) * ((batch + kSplitRows - 1) / kSplitRows);
  // at most one work item per block (rounding up would leave some blocks two, doubling
  // the phase), and p-chunks of at least 32 (fewer partial sums for phase A to add up at
  // small shapes)
  const int want = std::max(1, std::min(blocks / tiles, (p + 31) / 32));
  const int chunk = ((p + want - 1) / want + 7) / 8 * 8;
  plan->usable = true;
  plan->blocks = blocks;
  plan->chunk = chunk;
  plan->splits = (p + chunk - 1) / chunk;
  plan->partial_floats = (long long)plan->splits * batch * q;
  return cudaSuccess;
}

template <typename Args>
cudaError_t streamed_launch(const void* kernel, const Args& args, const StreamedPlan& plan,
                            void* stream) {
  Args a = args;
  int splits = plan.splits, chunk = plan.chunk;
  void* params[] = {&a, &splits, &chunk};
  return reported(cudaLaunchCooperativeKernel(kernel, dim3(plan.blocks), dim3(kSplitCols),
                                              params, 0, static_cast<cudaStream_t>(stream)));
}

}  // namespace

int persistent_backward_plan(Cell cell, DType dtype, int batch, int hidden, StreamedPlan* plan) {
  return with_cell(cell, [&](auto cell_c) {
    return with_dtype(dtype, [&](auto type) {
      auto kernel = persistent_backward_kernel<decltype(cell_c)::value, decltype(type)>;
      return streamed_plan(kernel, batch, gates_of(cell) * hidden, hidden, plan);
    });
  });
}

int streamed_forward_plan(Cell cell, DType dtype, int batch, int hidden, StreamedPlan* plan) {
  return with_cell(cell, [&](auto cell_c) {
    return with_dtype(dtype, [&](auto type) {
      auto kernel = streamed_forward_kernel<decltype(cell_c)::value, decltype(type)>;
      return streamed_plan(kernel, batch, hidden, gates_of(cell) * hidden, plan);
    });
  });
}

int streamed_forward(const PersistentForwardArgs& args, const StreamedPlan& plan, void* stream) {
  if (!plan.usable) return cudaErrorInvalidConfiguration;
  return with_cell(args.cell, [&](auto cell_c) {
    return with_dtype(args.dtype, [&](auto type) {
      auto kernel = streamed_forward_kernel<decltype(cell_c)::value, decltype(type)>;
      return streamed_launch(reinterpret_cast<const void*>(kernel), args, plan, stream);
    });
  });
}

int persistent_backward(const PersistentBackwardArgs& args, const StreamedPlan& plan,
                        void* stream) {
  if (!plan.usable) return cudaErrorInvalidConfiguration;
  return with_cell(args.cell, [&](auto cell_c) {
    return with_dtype(args.dtype, [&](auto type) {
      auto kernel = persistent_backward_kernel<decltype(cell_c)::value, decltype(type)>;
      return streamed_launch(reinterpret_cast<const void*>(kernel), args, plan, stream);
    });
  });
}

const char* error_string(int error) { return cudaGetErrorString(static_cast<cudaError_t>(error)); }

}  // namespace cnnlstm_fast::cuda
