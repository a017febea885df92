// Persistent forward kernel on tensor cores (fp16/bf16): one cooperative launch for the
// whole sequence.
//
// Tiling: block x owns `units` hidden units, i.e. gates*units rows of W_hh (padded to
// m_tiles*16). Its 16 warps split the reduction over the previous h (K = hidden) into
// k_steps slices of 16 each and keep their W_hh fragments in registers for all steps.
// The batch is the MMA's narrow side (n = 8): a pass covers 16 rows, mma.sync
// m16n8k16 with fp32 accumulation, B fragments read straight from the h exchange
// buffer in L2 (ld.global.cg). Warp partials meet in shared memory, one thread per
// (unit, row) applies the shared gate math (fp32 cell state) and writes h in T.
// Synchronisation: h is double-buffered in global memory; once per step every block
// adds 1 to a counter (release) and waits until it reaches (step+1)*blocks (acquire).
// Co-residency: the grid is at most one block per SM, sized with the occupancy API, and
// cudaLaunchCooperativeKernel refuses a grid that could not be co-resident, so the
// spin-wait cannot deadlock.
//
// This is the kernel as verified on a GPU; its variants (each pass's inputs loaded at the
// pass start or a pass early, one thread-block cluster) are experimental/persistent_mma.cu.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cstdint>
#include <type_traits>

#include "barrier.cuh"
#include "cnnlstm_fast/gate_math.h"
#include "common.cuh"
#include "mma.cuh"
#include "persistent.h"

namespace cnnlstm_fast::cuda {
namespace {

namespace gm = cnnlstm_fast::gate_math;
using Math = gm::ScalarMath<float>;

template <int kCell, typename T, int kMTiles>
__global__ void __launch_bounds__(kThreads, 1)
    persistent_mma_forward_kernel(PersistentForwardArgs a, int units, int k_steps) {
  constexpr int kG = kGates<kCell>;
  constexpr int kMaxSteps = kMaxKSteps<kMTiles>;
  constexpr int kRows = kMTiles * 16;  // padded gate rows of the block
  extern __shared__ __align__(16) float partial[];  // [kWarps][kRows][kPassRows]
  const int H = a.hidden, gH = kG * H, B = a.batch;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int grp = lane / 4, quad = lane % 4;  // the MMA fragment layout's row / column pair
  const int j0 = blockIdx.x * units;
  const int k_base = warp * k_steps * 16;

  // W_hh rows of this block: local row m = gate * units + u is global row gate*H + j0 + u.
  const T* w = static_cast<const T*>(a.w_hh);
  uint32_t wf[kMaxSteps][kMTiles][4];
#pragma unroll
  for (int ks = 0; ks < kMaxSteps; ++ks) {
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int m = mt * 16 + grp + half * 8;
        const int gate = m / units, u = m % units;
        const bool real = ks < k_steps && gate < kG && j0 + u < H;
        const T* row = w + (size_t)(gate * H + j0 + u) * H;
        const int k = k_base + ks * 16 + quad * 2;
        wf[ks][mt][half] = real ? load_pair<T, false>(row, k, H) : 0u;
        wf[ks][mt][half + 2] = real ? load_pair<T, false>(row, k + 8, H) : 0u;
      }
    }
  }

  const T* gx_all = static_cast<const T*>(a.gx);
  T* y_all = static_cast<T*>(a.y);
  const T* b_hn = static_cast<const T*>(a.b_hn);
  T* h_ex = static_cast<T*>(a.h_exchange);
  const int pairs = units * kPassRows;  // pointwise work of a pass: (unit, row)

  for (int s = 0; s < a.steps; ++s) {
    const int t = a.reverse ? a.steps - 1 - s : s;
    const int active = a.active_rows ? a.active_rows[t] : B;
    const T* hp = h_ex + (size_t)(s & 1) * B * H;
    T* hn = h_ex + (size_t)((s + 1) & 1) * B * H;
    for (int b0 = 0; b0 < B; b0 += kPassRows) {
      // this thread's pointwise pair; its G_x loads are issued before the matmul
      const int u = threadIdx.x % units, b = b0 + threadIdx.x / units, j = j0 + u;
      const bool mine = threadIdx.x < pairs && b < B && j < H;
      const bool live = mine && b < active;
      float gxv[kG];
#pragma unroll
      for (int k = 0; k < kG; ++k) {
        gxv[k] = live ? to_float(gx_all[((size_t)t * B + b) * gH + k * H + j]) : 0.f;
      }

      uint32_t hf[kMaxSteps][2][2];
#pragma unroll
      for (int ks = 0; ks < kMaxSteps; ++ks) {
#pragma unroll
        for (int nt = 0; nt < 2; ++nt) {
          const int n = b0 + nt * 8 + grp;
          const int k = k_base + ks * 16 + quad * 2;
          const bool real = ks < k_steps && n < B;
          const T* row = hp + (size_t)n * H;
          hf[ks][nt][0] = real ? load_pair<T, true>(row, k, H) : 0u;
          hf[ks][nt][1] = real ? load_pair<T, true>(row, k + 8, H) : 0u;
        }
      }
      float acc[kMTiles][2][4] = {};
#pragma unroll
      for (int ks = 0; ks < kMaxSteps; ++ks) {
        if (ks < k_steps) {
#pragma unroll
          for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
            for (int nt = 0; nt < 2; ++nt) mma_16816<T>(acc[mt][nt], wf[ks][mt], hf[ks][nt][0], hf[ks][nt][1]);
          }
        }
      }
      float* mine_partial = partial + (size_t)warp * kRows * kPassRows;
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
        for (int nt = 0; nt < 2; ++nt) {
          const int m = mt * 16 + grp, col = nt * 8 + quad * 2;
          *reinterpret_cast<float2*>(mine_partial + m * kPassRows + col) =
              make_float2(acc[mt][nt][0], acc[mt][nt][1]);
          *reinterpret_cast<float2*>(mine_partial + (m + 8) * kPassRows + col) =
              make_float2(acc[mt][nt][2], acc[mt][nt][3]);
        }
      }
      __syncthreads();
      // sum the warps' partials into warp 0's slot
      for (int e = threadIdx.x; e < kRows * kPassRows; e += kThreads) {
        float sum = 0.f;
#pragma unroll
        for (int w2 = 0; w2 < kWarps; ++w2) sum += partial[w2 * kRows * kPassRows + e];
        partial[e] = sum;
      }
      __syncthreads();

      if (mine) {
        const size_t o = (size_t)b * H + j;
        const unsigned short h_bits = __ldcg(reinterpret_cast<const unsigned short*>(hp + o));
        const T h_old_t = *reinterpret_cast<const T*>(&h_bits);
        const float h_old = to_float(h_old_t);
        const size_t ot = (size_t)t * B * H + o;
        if (a.h_prev_all) a.h_prev_all[ot] = h_old;
        if (!live) {  // inactive row: keep the state, output 0
          hn[o] = h_old_t;
          y_all[ot] = from_float<T>(0.f);
          if constexpr (kCell == 0) {
            if (a.extra) a.extra[ot] = a.c_state[o];
          }
        } else {
          float pre[kG];
#pragma unroll
          for (int k = 0; k < kG; ++k) pre[k] = partial[(k * units + u) * kPassRows + (b - b0)];
          float* act = a.act ? a.act + ((size_t)t * B + b) * gH : nullptr;
          float h_new;
          if constexpr (kCell == 0) {
            const float c_prev = a.c_state[o];
            const auto r = gm::lstm_forward<Math>(pre[0] + gxv[0], pre[1] + gxv[1],
                                                  pre[2] + gxv[2], pre[3] + gxv[3], c_prev);
            a.c_state[o] = r.c;
            if (act) {
              act[j] = r.i, act[H + j] = r.f, act[2 * H + j] = r.g, act[3 * H + j] = r.o;
              a.extra[ot] = c_prev;
            }
            h_new = r.m;
          } else if constexpr (kCell == 1) {
            const auto r = gm::gru_forward<Math>(gxv[0], gxv[1], gxv[2], pre[0], pre[1], pre[2],
                                                 b_hn ? to_float(b_hn[j]) : 0.f, h_old);
            if (act) {
              act[j] = r.r, act[H + j] = r.z, act[2 * H + j] = r.n;
              a.extra[ot] = r.h_n;
            }
            h_new = r.h;
          } else {
            h_new = gm::rnn_forward<Math, kCell == 3>(pre[0] + gxv[0]);
            if (act) act[j] = h_new;
          }
          const T h_t = from_float<T>(h_new);
          hn[o] = h_t;
          y_all[ot] = h_t;
        }
      }
      __syncthreads();  // the partials are rewritten by the next pass
    }
    if (s + 1 < a.steps) grid_barrier(a.barrier, (unsigned int)(s + 1) * gridDim.x);
  }
}

// f(kernel), the instantiation for cell, dtype (fp16/bf16 only) and m_tiles.
template <typename F>
cudaError_t with_mma_kernel(Cell cell, DType dtype, int m_tiles, F&& f) {
  return with_cell(cell, [&](auto cell_c) {
    return with_dtype(dtype, [&](auto type) -> cudaError_t {
      using T = decltype(type);
      constexpr int kCell = decltype(cell_c)::value;
      if constexpr (std::is_same_v<T, float>) {
        return cudaErrorInvalidValue;
      } else {
        switch (m_tiles) {
          case 1: return f(persistent_mma_forward_kernel<kCell, T, 1>);
          case 2: return f(persistent_mma_forward_kernel<kCell, T, 2>);
          case 4: return f(persistent_mma_forward_kernel<kCell, T, 4>);
        }
        return cudaErrorInvalidValue;
      }
    });
  });
}

}  // namespace

int persistent_mma_forward_plan(Cell cell, DType dtype, int batch, int hidden,
                                PersistentPlan* plan) {
  *plan = PersistentPlan{};
  if (dtype == DType::kFloat32 || batch <= 0 || hidden <= 0 || hidden % 2) return cudaSuccess;
  int device = 0, sms = 0, coop = 0, major = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (!err) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (!err) err = cudaDeviceGetAttribute(&coop, cudaDevAttrCooperativeLaunch, device);
  if (!err) err = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
  if (err) return reported(err);
  if (!coop || major < 8) return cudaSuccess;
  const int gates = gates_of(cell);
  const int k_steps = ((hidden + 15) / 16 + kWarps - 1) / kWarps;
  // The fewest gate rows per block (least work per step) whose grid fits on the SMs.
  for (int m_tiles : {1, 2, 4}) {
    const int units = m_tiles * 16 / gates;
    const int blocks = (hidden + units - 1) / units;
    if (m_tiles * k_steps > kFragRegs || k_steps > 8) return cudaSuccess;  // more tiles need more
    if (blocks > sms || units * kPassRows > kThreads) continue;
    const size_t smem = (size_t)kWarps * m_tiles * 16 * kPassRows * sizeof(float);
    return with_mma_kernel(cell, dtype, m_tiles, [&](auto kernel) {
      cudaError_t e = allow_dynamic_smem(reinterpret_cast<const void*>(kernel), smem);
      if (e) return e;
      int per_sm = 0;
      e = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, smem);
      if (e) return reported(e);
      if (per_sm > 0 && blocks <= per_sm * sms) {
        *plan = PersistentPlan{true, units, blocks, 0, smem, true, m_tiles, k_steps};
      }
      return cudaSuccess;
    });
  }
  return cudaSuccess;
}

int persistent_mma_forward(const PersistentForwardArgs& args, const PersistentPlan& plan,
                           void* stream) {
  if (!plan.usable || !plan.mma) return cudaErrorInvalidConfiguration;
  return with_mma_kernel(args.cell, args.dtype, plan.m_tiles, [&](auto kernel) {
    PersistentForwardArgs a = args;
    int units = plan.units, k_steps = plan.k_steps;
    void* params[] = {&a, &units, &k_steps};
    return reported(cudaLaunchCooperativeKernel(reinterpret_cast<void*>(kernel),
                                                dim3(plan.blocks), dim3(kThreads), params,
                                                plan.smem_bytes,
                                                static_cast<cudaStream_t>(stream)));
  });
}

}  // namespace cnnlstm_fast::cuda
