// Launchers of the persistent forward kernels: csrc/cuda/persistent.cu (any dtype, CUDA
// cores, W_hh in shared memory) and csrc/cuda/persistent_mma.cu (fp16/bf16, tensor
// cores, W_hh in registers). Same conventions as recurrence.h: no CUDA or torch
// headers, errors as int cudaError_t.
#pragma once

#include <cstddef>

#include "recurrence.h"

namespace cnnlstm_fast::cuda {

struct PersistentForwardArgs {
  Cell cell;
  DType dtype;
  int steps, batch, hidden;
  bool reverse;
  const int* active_rows;  // device (steps,) rows active per step, or null (all)
  const void* gx;          // (steps, batch, gates*hidden), T
  const void* w_hh_t;      // (hidden, gates*hidden), T: W_hh transposed
  const void* b_hn;        // (hidden,), T, GRU only, may be null
  float* h_buf;            // (2, batch, hidden): [0] holds h0; the final h is [steps % 2]
  float* c_state;          // (batch, hidden): c0 in, c_T out (LSTM)
  void* y;                 // (steps, batch, hidden), T
  float* act;              // (steps, batch, gates*hidden) saved, or null
  float* h_prev_all;       // (steps, batch, hidden) saved, or null
  float* extra;            // (steps, batch, hidden) saved (LSTM c_prev, GRU a_n + b_hn), or null
  // tensor-core kernel only:
  const void* w_hh;        // (gates*hidden, hidden), T: W_hh as torch stores it
  void* h_exchange;        // (2, batch, hidden), T: [0] holds h0; the final h is [steps % 2]
  unsigned int* barrier;   // one zeroed counter: the grid's arrivals, all steps together
};

// Which tensor-core forward kernel a plan is for: kDefault, the GPU-verified one
// (persistent_mma.cu); the others are experimental (experimental/persistent_mma.cu, only
// with CNNLSTM_FAST_EXPERIMENTAL=1). kPassStartLoads: each pass's G_x, c and h loaded at
// the pass start. kPipelined: loaded during the previous pass. kCluster (sm_90): the grid
// is one thread-block cluster, each block keeps the whole h of the step in its shared
// memory, a block pushes the h it computes into every block's copy (distributed shared
// memory) and the blocks meet at the cluster's hardware barrier instead of a counter in
// global memory.
enum class MmaVariant : int { kDefault = 0, kPassStartLoads = 1, kPipelined = 2, kCluster = 3 };

struct PersistentPlan {
  bool usable = false;  // false: the shape does not fit co-resident on this device
  int units = 0;        // hidden units per block
  int blocks = 0;       // grid size (all co-resident)
  int lanes = 0;        // threads per (row, unit) pair (CUDA-core kernel)
  size_t smem_bytes = 0;
  bool mma = false;     // the tensor-core kernel (h exchanged in T through h_exchange)
  int m_tiles = 0;      // 16-row tiles of a block's gate rows (gates * units, padded)
  int k_steps = 0;      // 16-wide slices of the reduction per warp
  MmaVariant variant = MmaVariant::kDefault;  // tensor-core kernel: which one
};

// Size the grid for the current device from its properties and the occupancy API;
// plan->usable is false where the shape does not fit.
int persistent_forward_plan(Cell cell, DType dtype, int batch, int hidden, PersistentPlan* plan);
int persistent_forward(const PersistentForwardArgs& args, const PersistentPlan& plan, void* stream);
int persistent_mma_forward_plan(Cell cell, DType dtype, int batch, int hidden, PersistentPlan* plan);
int persistent_mma_forward(const PersistentForwardArgs& args, const PersistentPlan& plan,
                           void* stream);

}  // namespace cnnlstm_fast::cuda
