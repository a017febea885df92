// The tensor-core persistent forward's experimental variants (CNNLSTM_FAST_EXPERIMENTAL=1;
// not yet run on a GPU): the default kernel, ../persistent_mma.cu, with each pass's G_x,
// c and h loaded at the pass start (MmaVariant::kPassStartLoads, what `auto` and `mma`
// run under the switch) or during the previous pass (kPipelined), or as one thread-block
// cluster (kCluster). Promoting one means making it ../persistent_mma.cu's kernel.
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
// The cluster variant (sm_90, MmaVariant::kCluster) runs the same tiling as ONE
// thread-block cluster (at most 16 blocks, so W_hh must fit in their registers: LSTM up
// to hidden 256, GRU 336, RNN 512). Each block keeps the whole h of the step, double
// buffered, in its own shared memory (rows padded against bank conflicts) and
// reads its B fragments there; the thread that computes h[b, j] also stores it into
// every block's next buffer through distributed shared memory (mapa), and the blocks
// meet at the cluster's hardware barrier (barrier.cluster arrive.release /
// wait.acquire), not at a counter in L2. Like the pipelined variant it loads each pass's
// G_x, c and h during the previous pass. h is still written to h_exchange for the host
// (the final state) and for the thread's own next step. A cluster is scheduled as a
// whole, so co-residency holds by construction; the plan asks the occupancy API whether
// the cluster fits on one GPC at all.
#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cstdint>
#include <type_traits>

#include "../barrier.cuh"
#include "../common.cuh"
#include "../mma.cuh"
#include "cluster.cuh"
#include "cnnlstm_fast/gate_math.h"
#include "experimental.h"

namespace cnnlstm_fast::cuda::experimental {
namespace {

namespace gm = cnnlstm_fast::gate_math;
using Math = gm::ScalarMath<float>;

// Cluster variant: a row of the shared h is hidden rounded up to 16 plus 8 elements, i.e.
// 4 (mod 8) words, so the 8 rows of a B fragment start at 8 distinct multiples of 4 banks
// and the fragment's 32 words hit 32 banks.
constexpr int kHPad = 8;
__host__ __device__ constexpr int shared_h_stride(int hidden) { return (hidden + 15) / 16 * 16 + kHPad; }
constexpr int kMaxClusterBlocks = 16;  // sm_90's largest (non-portable) cluster

// What the pointwise of one (unit j, row b) pair reads at step s besides the matmul: G_x,
// the cell state (LSTM) and the state before the step. A thread owns the same pairs at
// every step, so each value was written by this thread (or before the launch) and may be
// loaded as early as its last write.
template <int kG, typename T>
struct PairInputs {
  float gx[kG];
  float c;
  T h;
};

template <int kCell, typename T>
__device__ __forceinline__ PairInputs<kGates<kCell>, T> load_pair_inputs(
    const PersistentForwardArgs& a, int s, int b, int j, bool mine) {
  constexpr int kG = kGates<kCell>;
  PairInputs<kG, T> in;
  in.c = 0.f;
  in.h = from_float<T>(0.f);
#pragma unroll
  for (int k = 0; k < kG; ++k) in.gx[k] = 0.f;
  if (!mine) return in;
  const int H = a.hidden, B = a.batch;
  const int t = a.reverse ? a.steps - 1 - s : s;
  const T* gx = static_cast<const T*>(a.gx) + ((size_t)t * B + b) * kG * H + j;
#pragma unroll
  for (int k = 0; k < kG; ++k) in.gx[k] = to_float(gx[(size_t)k * H]);
  const size_t o = (size_t)b * H + j;
  const T* hp = static_cast<const T*>(a.h_exchange) + (size_t)(s & 1) * B * H;
  const unsigned short h_bits = __ldcg(reinterpret_cast<const unsigned short*>(hp + o));
  in.h = *reinterpret_cast<const T*>(&h_bits);
  if constexpr (kCell == 0) in.c = a.c_state[o];
  return in;
}

// kVariant (MmaVariant): kPipelined, a thread loads the next pass's PairInputs at the end
// of the current pass, so that their latency (G_x comes from HBM) overlaps the grid
// barrier instead of lengthening the next step; kPassStartLoads, it loads them at the
// start of each pass, in parallel with the h fragments (the default kernel loads G_x
// there and c and h after the warps' reduction). kCluster: see the top of the file (it
// loads the next pass's inputs early as kPipelined does).
template <int kCell, typename T, int kMTiles, int kVariant>
__global__ void __launch_bounds__(kThreads, 1)
    persistent_mma_forward_kernel(PersistentForwardArgs a, int units, int k_steps) {
  constexpr int kG = kGates<kCell>;
  constexpr int kMaxSteps = kMaxKSteps<kMTiles>;
  constexpr int kRows = kMTiles * 16;  // padded gate rows of the block
  constexpr bool kCluster = kVariant == static_cast<int>(MmaVariant::kCluster);
  // The cluster variant pipelines too: its B fragments come from shared memory and its
  // barrier is short, which would leave G_x's load from HBM alone on each step's path.
  constexpr bool kPipelined = kVariant == static_cast<int>(MmaVariant::kPipelined) || kCluster;
  // [kWarps][kRows][kPassRows] partial sums; the cluster variant's h copy follows:
  // T [2][batch][shared_h_stride(hidden)]
  extern __shared__ __align__(16) float partial[];
  const int H = a.hidden, gH = kG * H, B = a.batch;
  const int hs = shared_h_stride(H);  // row stride of the shared h
  T* const h_sm = reinterpret_cast<T*>(partial + kWarps * kRows * kPassRows);
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

  T* y_all = static_cast<T*>(a.y);
  const T* b_hn = static_cast<const T*>(a.b_hn);
  T* h_ex = static_cast<T*>(a.h_exchange);
  const int pairs = units * kPassRows;  // pointwise work of a pass: (unit, row)
  // this thread's pointwise pair in the pass starting at row b0: (unit, row) of the block
  const int u = threadIdx.x % units, j = j0 + u;
  auto row_of = [&](int b0) { return b0 + (int)threadIdx.x / units; };
  auto owns = [&](int b0) { return threadIdx.x < pairs && row_of(b0) < B && j < H; };
  if constexpr (kCluster) {
    // This block's copy of h0; then the cluster meets, because a block may store into a
    // peer's shared memory only once the peer runs (step 0 stores into buffer 1, so it
    // cannot overwrite a peer's h0).
    for (int e = threadIdx.x; e < B * H; e += kThreads) h_sm[(e / H) * hs + e % H] = h_ex[e];
    cluster_barrier();
  }
  PairInputs<kG, T> next;
  if constexpr (kPipelined) {
    if (a.steps > 0) next = load_pair_inputs<kCell, T>(a, 0, row_of(0), j, owns(0));
  }

  for (int s = 0; s < a.steps; ++s) {
    const int t = a.reverse ? a.steps - 1 - s : s;
    const int active = a.active_rows ? a.active_rows[t] : B;
    const T* hp = h_ex + (size_t)(s & 1) * B * H;
    T* hn = h_ex + (size_t)((s + 1) & 1) * B * H;
    for (int b0 = 0; b0 < B; b0 += kPassRows) {
      const int b = row_of(b0);
      const bool mine = owns(b0);
      const bool live = mine && b < active;
      PairInputs<kG, T> in;
      if constexpr (kPipelined) {
        in = next;
      } else {
        in = load_pair_inputs<kCell, T>(a, s, b, j, mine);
      }

      uint32_t hf[kMaxSteps][2][2];
#pragma unroll
      for (int ks = 0; ks < kMaxSteps; ++ks) {
#pragma unroll
        for (int nt = 0; nt < 2; ++nt) {
          const int n = b0 + nt * 8 + grp;
          const int k = k_base + ks * 16 + quad * 2;
          const bool real = ks < k_steps && n < B;
          const T* row = kCluster ? h_sm + ((size_t)(s & 1) * B + n) * hs : hp + (size_t)n * H;
          hf[ks][nt][0] = real ? load_pair<T, !kCluster>(row, k, H) : 0u;
          hf[ks][nt][1] = real ? load_pair<T, !kCluster>(row, k + 8, H) : 0u;
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

      // h[b, j] of step s + 1: into h_exchange and (cluster) every block's next buffer;
      // not at the last step, so no block's shared memory is written after the last
      // cluster barrier and a block may exit as soon as it is done.
      auto store_h = [&](T v) {
        hn[(size_t)b * H + j] = v;
        if constexpr (kCluster) {
          if (s + 1 < a.steps) store_in_every_block(h_sm + ((size_t)((s + 1) & 1) * B + b) * hs + j, v);
        }
      };
      if (mine) {
        const size_t o = (size_t)b * H + j;
        const T h_old_t = in.h;
        const float h_old = to_float(h_old_t);
        const float* gxv = in.gx;
        const size_t ot = (size_t)t * B * H + o;
        if (a.h_prev_all) a.h_prev_all[ot] = h_old;
        if (!live) {  // inactive row: keep the state, output 0
          store_h(h_old_t);
          y_all[ot] = from_float<T>(0.f);
          if constexpr (kCell == 0) {
            if (a.extra) a.extra[ot] = in.c;
          }
        } else {
          float pre[kG];
#pragma unroll
          for (int k = 0; k < kG; ++k) pre[k] = partial[(k * units + u) * kPassRows + (b - b0)];
          float* act = a.act ? a.act + ((size_t)t * B + b) * gH : nullptr;
          float h_new;
          if constexpr (kCell == 0) {
            const float c_prev = in.c;
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
          store_h(h_t);
          y_all[ot] = h_t;
        }
      }
      if constexpr (kPipelined) {  // the next pass: this step's next rows, or step s + 1
        const bool last = b0 + kPassRows >= B;
        const int s2 = last ? s + 1 : s, b2 = last ? 0 : b0 + kPassRows;
        if (s2 < a.steps) next = load_pair_inputs<kCell, T>(a, s2, row_of(b2), j, owns(b2));
      }
      __syncthreads();  // the partials are rewritten by the next pass
    }
    if (s + 1 < a.steps) {
      if constexpr (kCluster) {
        cluster_barrier();
      } else {
        grid_barrier(a.barrier, (unsigned int)(s + 1) * gridDim.x);
      }
    }
  }
}

// f(kernel), the instantiation for cell, dtype (fp16/bf16 only), m_tiles and variant.
template <typename F>
cudaError_t with_mma_kernel(Cell cell, DType dtype, int m_tiles, MmaVariant variant, F&& f) {
  return with_cell(cell, [&](auto cell_c) {
    return with_dtype(dtype, [&](auto type) -> cudaError_t {
      using T = decltype(type);
      constexpr int kCell = decltype(cell_c)::value;
      if constexpr (std::is_same_v<T, float>) {
        return cudaErrorInvalidValue;
      } else {
        auto pick = [&](auto var) -> cudaError_t {
          constexpr int kVar = decltype(var)::value;
          switch (m_tiles) {
            case 1: return f(persistent_mma_forward_kernel<kCell, T, 1, kVar>);
            case 2: return f(persistent_mma_forward_kernel<kCell, T, 2, kVar>);
            case 4: return f(persistent_mma_forward_kernel<kCell, T, 4, kVar>);
          }
          return cudaErrorInvalidValue;
        };
        switch (variant) {
          case MmaVariant::kDefault: break;  // ../persistent_mma.cu
          case MmaVariant::kPassStartLoads: return pick(std::integral_constant<int, 1>{});
          case MmaVariant::kPipelined: return pick(std::integral_constant<int, 2>{});
          case MmaVariant::kCluster: return pick(std::integral_constant<int, 3>{});
        }
        return cudaErrorInvalidValue;
      }
    });
  });
}

}  // namespace

int persistent_mma_forward_plan(Cell cell, DType dtype, int batch, int hidden, MmaVariant variant,
                                PersistentPlan* plan) {
  *plan = PersistentPlan{};
  if (variant == MmaVariant::kDefault) return cudaErrorInvalidValue;  // ../persistent_mma.cu's
  if (dtype == DType::kFloat32 || batch <= 0 || hidden <= 0 || hidden % 2) return cudaSuccess;
  int device = 0, sms = 0, coop = 0, major = 0, smem_optin = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (!err) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (!err) err = cudaDeviceGetAttribute(&coop, cudaDevAttrCooperativeLaunch, device);
  if (!err) err = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
  if (!err) {
    err = cudaDeviceGetAttribute(&smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  }
  if (err) return reported(err);
  const bool cluster = variant == MmaVariant::kCluster;
  if (cluster ? major < 9 : !coop || major < 8) return cudaSuccess;
  const int gates = gates_of(cell);
  const int k_steps = ((hidden + 15) / 16 + kWarps - 1) / kWarps;
  // The fewest gate rows per block (least work per step) whose grid fits on the SMs (in
  // one cluster for the cluster variant).
  for (int m_tiles : {1, 2, 4}) {
    const int units = m_tiles * 16 / gates;
    const int blocks = (hidden + units - 1) / units;
    if (m_tiles * k_steps > kFragRegs || k_steps > 8) return cudaSuccess;  // more tiles need more
    if (blocks > (cluster ? kMaxClusterBlocks : sms) || units * kPassRows > kThreads) continue;
    size_t smem = (size_t)kWarps * m_tiles * 16 * kPassRows * sizeof(float);
    if (cluster) smem += (size_t)2 * batch * shared_h_stride(hidden) * 2;  // T is 2 bytes
    if (smem > (size_t)smem_optin) return cudaSuccess;  // a larger m_tiles needs more
    const cudaError_t err2 = with_mma_kernel(cell, dtype, m_tiles, variant, [&](auto kernel) {
      cudaError_t e = allow_dynamic_smem(reinterpret_cast<const void*>(kernel), smem);
      if (e) return e;
      bool fits = false;
      if (cluster) {
        e = cluster_fits(kernel, blocks, kThreads, smem, &fits);
      } else {
        int per_sm = 0;
        e = reported(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, smem));
        fits = per_sm > 0 && blocks <= per_sm * sms;
      }
      if (e) return e;
      if (fits) *plan = PersistentPlan{true, units, blocks, 0, smem, true, m_tiles, k_steps, variant};
      return cudaSuccess;
    });
    // A cluster too large for the device's GPCs (a MIG slice, fewer SMs per GPC) may fit
    // with fewer, larger blocks; the grid variant's fit does not improve with m_tiles.
    if (err2 || plan->usable || !cluster) return err2;
  }
  return cudaSuccess;
}

int persistent_mma_forward(const PersistentForwardArgs& args, const PersistentPlan& plan,
                           void* stream) {
  if (!plan.usable || !plan.mma) return cudaErrorInvalidConfiguration;
  return with_mma_kernel(args.cell, args.dtype, plan.m_tiles, plan.variant, [&](auto kernel) {
    PersistentForwardArgs a = args;
    int units = plan.units, k_steps = plan.k_steps;
    void* params[] = {&a, &units, &k_steps};
    if (plan.variant == MmaVariant::kCluster) {
      cudaLaunchAttribute attr{};
      const cudaLaunchConfig_t cfg = cluster_config(plan.blocks, kThreads, plan.smem_bytes, stream, &attr);
      return reported(cudaLaunchKernelExC(&cfg, reinterpret_cast<const void*>(kernel), params));
    }
    return reported(cudaLaunchCooperativeKernel(reinterpret_cast<void*>(kernel),
                                                dim3(plan.blocks), dim3(kThreads), params,
                                                plan.smem_bytes,
                                                static_cast<cudaStream_t>(stream)));
  });
}

}  // namespace cnnlstm_fast::cuda::experimental
