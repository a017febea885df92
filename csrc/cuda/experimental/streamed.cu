// Kernels that stream W_hh from L2 in one cooperative launch per layer (experimental:
// set_kernels(cuda_backward="persistent") and set_kernels(cuda_forward="streamed"), with
// CNNLSTM_FAST_EXPERIMENTAL=1). Their pointwise math is the per-step kernels' (../step.cuh).
#include <cooperative_groups.h>
#include <cuda_runtime_api.h>

#include <algorithm>

#include "../step.cuh"
#include "experimental.h"

namespace cnnlstm_fast::cuda::experimental {
namespace {

namespace cg = cooperative_groups;

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

// Streamed forward (CUDA cores, any dtype; set_kernels(cuda_forward="streamed")):
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
    streamed_forward_kernel(PersistentForwardArgs a, float* partial, int splits, int chunk) {
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
    partial_items(h_cur, H, w_t, gH, B, active, splits, chunk, partial, tile);  // phase B
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
        const float* mine = partial + (size_t)b * gH + j;
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

// kernel(params..., splits, chunk) as a cooperative launch of the plan's grid.
template <typename... Params>
cudaError_t streamed_launch(const void* kernel, const StreamedPlan& plan, void* stream,
                            Params... params) {
  int splits = plan.splits, chunk = plan.chunk;
  void* args[] = {&params..., &splits, &chunk};
  return reported(cudaLaunchCooperativeKernel(kernel, dim3(plan.blocks), dim3(kSplitCols),
                                              args, 0, static_cast<cudaStream_t>(stream)));
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

int streamed_forward(const PersistentForwardArgs& args, const StreamedPlan& plan, float* partial,
                     void* stream) {
  if (!plan.usable) return cudaErrorInvalidConfiguration;
  return with_cell(args.cell, [&](auto cell_c) {
    return with_dtype(args.dtype, [&](auto type) {
      auto kernel = streamed_forward_kernel<decltype(cell_c)::value, decltype(type)>;
      return streamed_launch(reinterpret_cast<const void*>(kernel), plan, stream, args, partial);
    });
  });
}

int persistent_backward(const PersistentBackwardArgs& args, const StreamedPlan& plan,
                        void* stream) {
  if (!plan.usable) return cudaErrorInvalidConfiguration;
  return with_cell(args.cell, [&](auto cell_c) {
    return with_dtype(args.dtype, [&](auto type) {
      auto kernel = persistent_backward_kernel<decltype(cell_c)::value, decltype(type)>;
      return streamed_launch(reinterpret_cast<const void*>(kernel), plan, stream, args);
    });
  });
}

}  // namespace cnnlstm_fast::cuda::experimental
