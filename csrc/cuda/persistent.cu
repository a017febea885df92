// Persistent forward kernel: one cooperative launch for the whole sequence.
//
// Tiling: block x owns `units` hidden units (all gates of them) for every batch row and
// keeps its slice of W_hh^T, (out_size x gates*units) in the input dtype, in shared
// memory for all steps. Each (row, unit) pair is computed by `lanes` threads that split
// the reduction over the previous state and combine with warp shuffles.
// Synchronisation: h is double-buffered in global memory (read with ld.global.cg so no
// stale L1 line survives a step) and the grid meets once per step (grid.sync()).
// Co-residency: the host sizes the grid from the occupancy API so that every block is
// resident at once (cudaLaunchCooperativeKernel also refuses otherwise); shapes that
// cannot fit (W_hh slice larger than shared memory) use the per-step kernels. No
// projection (the per-step path handles proj_size).
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

constexpr int kThreads = 256;

template <int kCell, typename T>
__global__ void __launch_bounds__(kThreads)
    persistent_forward_kernel(PersistentForwardArgs a, int units, int lanes) {
  constexpr int kG = kGates<kCell>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* w = reinterpret_cast<T*>(smem_raw);  // w[p][k][u] = W_hh^T[p, k*H + j0 + u]
  const int H = a.hidden, gH = kG * H, B = a.batch;
  const int j0 = blockIdx.x * units;
  const int width = kG * units;
  const T* w_t = static_cast<const T*>(a.w_hh_t);
  for (int idx = threadIdx.x; idx < H * width; idx += blockDim.x) {
    const int p = idx / width, k = (idx % width) / units, u = idx % units;
    w[idx] = j0 + u < H ? w_t[(size_t)p * gH + k * H + j0 + u] : from_float<T>(0.f);
  }
  __syncthreads();

  cg::grid_group grid = cg::this_grid();
  const T* gx_all = static_cast<const T*>(a.gx);
  T* y_all = static_cast<T*>(a.y);
  const T* b_hn = static_cast<const T*>(a.b_hn);
  const int groups = blockDim.x / lanes;
  const int group = threadIdx.x / lanes, lane = threadIdx.x % lanes;
  const int pairs = B * units;
  const int rounds = (pairs + groups - 1) / groups;  // uniform: every lane shuffles

  for (int s = 0; s < a.steps; ++s) {
    const int t = a.reverse ? a.steps - 1 - s : s;
    const int active = a.active_rows ? a.active_rows[t] : B;
    const float* hp = a.h_buf + (size_t)(s & 1) * B * H;
    float* hn = a.h_buf + (size_t)((s + 1) & 1) * B * H;
    for (int round = 0; round < rounds; ++round) {
      const int pair = round * groups + group;
      const int b = pair / units, u = pair % units, j = j0 + u;
      const bool valid = pair < pairs && j < H;
      float acc[kG] = {};
      if (valid && b < active) {
        for (int p = lane; p < H; p += lanes) {
          const float h = __ldcg(hp + (size_t)b * H + p);
          const T* wp = w + (size_t)p * width + u;
#pragma unroll
          for (int k = 0; k < kG; ++k) acc[k] += h * to_float(wp[k * units]);
        }
      }
#pragma unroll
      for (int k = 0; k < kG; ++k) {
        for (int off = lanes / 2; off > 0; off /= 2) acc[k] += __shfl_down_sync(0xffffffffu, acc[k], off, lanes);
      }
      if (!valid || lane != 0) continue;
      const size_t o = (size_t)b * H + j;
      const float h_old = __ldcg(hp + o);
      if (a.h_prev_all) a.h_prev_all[(size_t)t * B * H + o] = h_old;
      if (b >= active) {  // inactive row: keep the state, output 0
        hn[o] = h_old;
        y_all[(size_t)t * B * H + o] = from_float<T>(0.f);
        // saved as the reference saves it: the cell state before the step, every row
        if constexpr (kCell == 0) {
          if (a.extra) a.extra[(size_t)t * B * H + o] = a.c_state[o];
        }
        continue;
      }
      const T* gx = gx_all + ((size_t)t * B + b) * gH;
      float* act = a.act ? a.act + ((size_t)t * B + b) * gH : nullptr;
      float h_new;
      if constexpr (kCell == 0) {
        const float c_prev = a.c_state[o];
        const auto r = gm::lstm_forward<Math>(acc[0] + to_float(gx[j]), acc[1] + to_float(gx[H + j]),
                                              acc[2] + to_float(gx[2 * H + j]),
                                              acc[3] + to_float(gx[3 * H + j]), c_prev);
        a.c_state[o] = r.c;
        if (act) {
          act[j] = r.i, act[H + j] = r.f, act[2 * H + j] = r.g, act[3 * H + j] = r.o;
          a.extra[(size_t)t * B * H + o] = c_prev;
        }
        h_new = r.m;
      } else if constexpr (kCell == 1) {
        const auto r = gm::gru_forward<Math>(to_float(gx[j]), to_float(gx[H + j]), to_float(gx[2 * H + j]),
                                             acc[0], acc[1], acc[2], b_hn ? to_float(b_hn[j]) : 0.f,
                                             h_old);
        if (act) {
          act[j] = r.r, act[H + j] = r.z, act[2 * H + j] = r.n;
          a.extra[(size_t)t * B * H + o] = r.h_n;
        }
        h_new = r.h;
      } else {
        h_new = gm::rnn_forward<Math, kCell == 3>(acc[0] + to_float(gx[j]));
        if (act) act[j] = h_new;
      }
      hn[o] = h_new;
      y_all[(size_t)t * B * H + o] = from_float<T>(h_new);
    }
    grid.sync();
  }
}

}  // namespace

int persistent_forward_plan(Cell cell, DType dtype, int batch, int hidden, PersistentPlan* plan) {
  *plan = PersistentPlan{};
  int device = 0, sms = 0, smem_optin = 0, coop = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (!err) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (!err) err = cudaDeviceGetAttribute(&smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (!err) err = cudaDeviceGetAttribute(&coop, cudaDevAttrCooperativeLaunch, device);
  if (err) return reported(err);
  if (!coop || batch <= 0 || hidden <= 0) return cudaSuccess;
  const int g = gates_of(cell);
  return with_cell(cell, [&](auto cell_c) { return with_dtype(dtype, [&](auto type) {
    using T = decltype(type);
    auto kernel = persistent_forward_kernel<decltype(cell_c)::value, T>;
    for (int units = (hidden + sms - 1) / sms; units <= hidden; ++units) {
      const size_t smem = (size_t)hidden * g * units * sizeof(T);
      if (smem > (size_t)smem_optin) return cudaSuccess;  // larger units only need more
      cudaError_t e = allow_dynamic_smem(reinterpret_cast<const void*>(kernel), smem);
      if (e) return e;
      int per_sm = 0;
      e = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, smem);
      if (e) return reported(e);
      const int blocks = (hidden + units - 1) / units;
      if (per_sm > 0 && blocks <= per_sm * sms) {
        int lanes = 32;
        while (lanes > 1 && (kThreads / lanes) < batch * units) lanes /= 2;
        *plan = PersistentPlan{true, units, blocks, lanes, smem};
        return cudaSuccess;
      }
    }
    return cudaSuccess;
  }); });
}

int persistent_forward(const PersistentForwardArgs& args, const PersistentPlan& plan,
                       void* stream) {
  if (!plan.usable) return cudaErrorInvalidConfiguration;
  return with_cell(args.cell, [&](auto cell_c) { return with_dtype(args.dtype, [&](auto type) {
    using T = decltype(type);
    auto kernel = persistent_forward_kernel<decltype(cell_c)::value, T>;
    PersistentForwardArgs a = args;
    int units = plan.units, lanes = plan.lanes;
    void* params[] = {&a, &units, &lanes};
    return reported(cudaLaunchCooperativeKernel(reinterpret_cast<void*>(kernel),
                                                dim3(plan.blocks), dim3(kThreads), params,
                                                plan.smem_bytes,
                                                static_cast<cudaStream_t>(stream)));
  }); });
}

}  // namespace cnnlstm_fast::cuda
