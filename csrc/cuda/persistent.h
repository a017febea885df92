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
  // streamed kernel only:
  float* partial;          // StreamedPlan::partial_floats
};

// The tensor-core forward's variants. kPipelined: each pass's G_x, c and h are loaded
// during the previous pass. kCluster (sm_90): the grid is one thread-block cluster, each
// block keeps the whole h of the step in its shared memory, a block pushes the h it
// computes into every block's copy (distributed shared memory) and the blocks meet at
// the cluster's hardware barrier instead of a counter in global memory.
enum class MmaVariant : int { kPlain = 0, kPipelined = 1, kCluster = 2 };

struct PersistentPlan {
  bool usable = false;  // false: the shape does not fit co-resident on this device
  int units = 0;        // hidden units per block
  int blocks = 0;       // grid size (all co-resident)
  int lanes = 0;        // threads per (row, unit) pair (CUDA-core kernel)
  size_t smem_bytes = 0;
  bool mma = false;     // the tensor-core kernel (h exchanged in T through h_exchange)
  int m_tiles = 0;      // 16-row tiles of a block's gate rows (gates * units, padded)
  int k_steps = 0;      // 16-wide slices of the reduction per warp
  MmaVariant variant = MmaVariant::kPlain;  // tensor-core kernel: which of its variants
};

// The persistent backward (csrc/cuda/recurrence.cu): the whole reverse-time loop of one
// layer without projection in one cooperative launch, W_hh read from L2 every step.
struct PersistentBackwardArgs {
  Cell cell;
  DType dtype;
  int steps, batch, hidden;
  bool reverse;
  const int* active_rows;  // device (steps,) rows active per step, or null (all)
  const float* act;        // (steps, batch, gates*hidden) saved by forward
  const float* extra;      // (steps, batch, hidden) LSTM c_prev / GRU a_n + b_hn; null for RNN
  const float* h_prev;     // (steps, batch, hidden) state before each step
  const void* d_y;         // (steps, batch, hidden), T
  const void* w_hh;        // (gates*hidden, hidden), T: W_hh as torch stores it
  float* d_h;              // (batch, hidden): d_hT in, d_h0 out
  float* d_c;              // (batch, hidden), LSTM: d_cT in, d_c0 out
  float* d_gx;             // (steps, batch, gates*hidden), zeroed
  float* d_gh;             // GRU: (steps, batch, gates*hidden), zeroed (the recurrent part)
  float* d_h_direct;       // (batch, hidden), GRU scratch
  float* partial;          // StreamedPlan::partial_floats
};

// The plan of a kernel that streams W_hh from L2 (the persistent backward, the streamed
// forward): a co-resident grid, and the per-step product's reduction in p-chunks whose
// float32 partial sums (partial_floats of them) the next phase adds up.
struct StreamedPlan {
  bool usable = false;        // false: no cooperative launch on this device, or no block fits
  int blocks = 0;             // grid size (all co-resident)
  int splits = 0, chunk = 0;  // the reduction in `splits` chunks of `chunk`
  long long partial_floats = 0;
};

int persistent_backward_plan(Cell cell, DType dtype, int batch, int hidden, StreamedPlan* plan);
int persistent_backward(const PersistentBackwardArgs& args, const StreamedPlan& plan,
                        void* stream);
// The streamed forward (csrc/cuda/recurrence.cu): reads gx, w_hh_t, b_hn, h_buf,
// c_state, active_rows and writes y, h_buf, c_state, act, h_prev_all, extra as
// PersistentForwardArgs describes; partial: StreamedPlan::partial_floats.
int streamed_forward_plan(Cell cell, DType dtype, int batch, int hidden, StreamedPlan* plan);
int streamed_forward(const PersistentForwardArgs& args, const StreamedPlan& plan, void* stream);

// Size the grid for the current device from its properties and the occupancy API;
// plan->usable is false where the shape does not fit.
int persistent_forward_plan(Cell cell, DType dtype, int batch, int hidden, PersistentPlan* plan);
int persistent_forward(const PersistentForwardArgs& args, const PersistentPlan& plan, void* stream);
int persistent_mma_forward_plan(Cell cell, DType dtype, int batch, int hidden,
                                MmaVariant variant, PersistentPlan* plan);
int persistent_mma_forward(const PersistentForwardArgs& args, const PersistentPlan& plan,
                           void* stream);

}  // namespace cnnlstm_fast::cuda
