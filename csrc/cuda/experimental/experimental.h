// Launchers of the experimental CUDA kernels: compiled in every CUDA build, not yet
// verified on a GPU, so reachable only with CNNLSTM_FAST_EXPERIMENTAL=1 (the ops get
// `experimental` as an argument, csrc/recurrence_cuda.cpp; docs/gpu.md says how a kernel
// that passes its GPU tests is promoted to the default path). Same conventions as
// ../recurrence.h: no CUDA or torch headers, errors as int cudaError_t.
#pragma once

#include "../persistent.h"
#include "../recurrence.h"

namespace cnnlstm_fast::cuda::experimental {

// --- the per-step kernels with programmatic dependent launch (pdl.cu) --------------------
// step_forward, rowmat and step_backward of ../recurrence.h, each kernel launched so that
// it may start while the previous kernel in the stream still runs (sm_90, where the
// kernel runs sm_90 code; elsewhere plain launches): it waits for its predecessor before
// it touches memory and lets its successor launch once its own blocks run.
int step_forward_pdl(const StepForwardArgs& args, void* stream);
int rowmat_pdl(const RowMatArgs& args, void* stream);
int step_backward_pdl(const StepBackwardArgs& args, void* stream);

// --- packed row counts written on the device (row_runs.cu) -------------------------------
// Runs of equal active-row counts (a step range [end of the previous run, end[r]) with
// value[r] rows), passed to a kernel by value: a CUDA graph captures them, where a copy
// from a host buffer would read that buffer again at every replay (and a pageable copy
// blocks the host until the stream is idle).
constexpr int kMaxRowRuns = 120;
struct RowRuns {
  int start = 0;  // the first step of run 0
  int count = 0;
  int end[kMaxRowRuns];
  int value[kMaxRowRuns];
};
// out[t] = value of the run holding step t, for the steps the runs cover.
int write_row_runs(const RowRuns& runs, int* out, void* stream);

// --- kernels that stream W_hh from L2 in one cooperative launch (streamed.cu) ------------

// The plan of a streamed kernel: a co-resident grid, and the per-step product's
// reduction in p-chunks whose float32 partial sums (partial_floats of them) the next
// phase adds up.
struct StreamedPlan {
  bool usable = false;        // false: no cooperative launch on this device, or no block fits
  int blocks = 0;             // grid size (all co-resident)
  int splits = 0, chunk = 0;  // the reduction in `splits` chunks of `chunk`
  long long partial_floats = 0;
};

// The persistent backward: the whole reverse-time loop of one layer without projection
// in one cooperative launch, W_hh read from L2 every step.
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

int persistent_backward_plan(Cell cell, DType dtype, int batch, int hidden, StreamedPlan* plan);
int persistent_backward(const PersistentBackwardArgs& args, const StreamedPlan& plan,
                        void* stream);
// The streamed forward: reads gx, w_hh_t, b_hn, h_buf, c_state, active_rows and writes
// y, h_buf, c_state, act, h_prev_all, extra as PersistentForwardArgs describes; partial:
// StreamedPlan::partial_floats floats of scratch.
int streamed_forward_plan(Cell cell, DType dtype, int batch, int hidden, StreamedPlan* plan);
int streamed_forward(const PersistentForwardArgs& args, const StreamedPlan& plan, float* partial,
                     void* stream);

// --- the tensor-core forward's variants (persistent_mma.cu) ------------------------------
// As ../persistent.h's persistent_mma_forward_plan / persistent_mma_forward, for a
// variant other than MmaVariant::kDefault.
int persistent_mma_forward_plan(Cell cell, DType dtype, int batch, int hidden,
                                MmaVariant variant, PersistentPlan* plan);
int persistent_mma_forward(const PersistentForwardArgs& args, const PersistentPlan& plan,
                           void* stream);

}  // namespace cnnlstm_fast::cuda::experimental
