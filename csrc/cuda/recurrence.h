// Launchers of the CUDA recurrence kernels (csrc/cuda/recurrence.cu).
//
// No torch headers here or in the .cu, and no CUDA headers here either, so the g++
// side compiles without the toolkit: raw pointers and sizes, the stream as void*,
// errors returned as the int value of a cudaError_t (0 = success). The ATen-side op (csrc/recurrence_cuda.cpp) allocates the buffers, runs
// the time loop on the host and turns errors into exceptions.
//
// Conventions: T is the input dtype (float32, float16 or bfloat16); every state, saved
// tensor and accumulator is float32. Rows [0, active) of a step are updated; the others
// keep their state and get zero outputs.
#pragma once

namespace cnnlstm_fast::cuda {

enum class Cell : int { kLstm = 0, kGru = 1, kRnnTanh = 2, kRnnRelu = 3 };
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// One forward step, fused: a = G_x[t] + h W_hh^T for all gates of a tile of hidden
// units and rows, then activations and the state update.
struct StepForwardArgs {
  Cell cell;
  DType dtype;
  int batch, active, hidden, out_size;
  const void* gx_t;      // (batch, gates*hidden), T
  const float* h_prev;   // (batch, out_size)
  const float* c_prev;   // (batch, hidden), LSTM only
  const void* w_hh_t;    // (out_size, gates*hidden), T: W_hh transposed
  const void* b_hn;      // (hidden,), T, GRU only, may be null
  float* h_next;         // (batch, out_size); unused with a projection
  float* c_next;         // (batch, hidden), LSTM only
  void* y_t;             // (batch, out_size), T; unused with a projection
  float* m_out;          // (batch, hidden): non-null means LSTM with projection
  float* act_t;          // (batch, gates*hidden) saved activations, may be null
  float* extra_t;        // (batch, hidden) saved: LSTM c_prev, GRU a_n + b_hn; may be null
};
int step_forward(const StepForwardArgs& args, void* stream);

// out[b, q] = sum_p a[b, p] * mat[p, q] (+ addend[b, q]) for rows b < active;
// rows b >= active get passthrough[b, q] (or 0). Optionally also writes out cast to T
// into y (0 for inactive rows). a is float32 or T (a_dtype), mat is T (mat_dtype).
// The p-reduction is split over blocks (enough of them to fill the device at a small
// batch) into float32 partial sums in workspace, which a second kernel adds up in a
// fixed order (deterministic).
struct RowMatArgs {
  DType a_dtype, mat_dtype;
  int batch, active, p, q;
  const void* a;            // (batch, p)
  const void* mat;          // (p, q)
  const float* addend;      // (batch, q) or null
  const float* passthrough; // (batch, q) or null
  float* out;               // (batch, q)
  void* y;                  // (batch, q) of mat_dtype, or null
  float* workspace;         // rowmat_workspace(batch, p, q) floats
};
int rowmat(const RowMatArgs& args, void* stream);
// Floats of workspace rowmat needs for these sizes on the current device (*floats).
int rowmat_workspace(int batch, int p, int q, long long* floats);

// The pointwise part of one backward step: gradients of the pre-activations from the
// saved activations. g = d_h + d_y[t] is the gradient of the step's output; with a
// projection, d_m = g W_hr is given instead (and g itself is not needed here).
struct StepBackwardArgs {
  Cell cell;
  DType dtype;
  int batch, active, hidden, out_size;
  const float* act_t;    // (batch, gates*hidden)
  const float* extra_t;  // (batch, hidden): LSTM c_prev, GRU a_n + b_hn
  const float* h_prev_t; // (batch, out_size): GRU only
  const float* d_h;      // (batch, out_size): gradient carried from the later steps
  const void* d_y_t;     // (batch, out_size), T
  const float* d_m;      // (batch, hidden) with a projection, else null
  float* d_c;            // (batch, hidden), LSTM: in = carried, out = for the previous step
  float* d_gx_t;         // (batch, gates*hidden)
  float* d_gh_t;         // (batch, gates*hidden), GRU only (recurrent part's gradient)
  float* d_h_direct;     // (batch, out_size), GRU only: d_h * z
  float* m_t;            // (batch, hidden) o*tanh(c) for dW_hr, projection only
};
int step_backward(const StepBackwardArgs& args, void* stream);

// out[b, p] = d_h[b, p] + d_y[b, p] for b < active, 0 otherwise (projection backward).
int add_output_grad(DType dtype, int batch, int active, int width, const float* d_h,
                    const void* d_y_t, float* out, void* stream);

// cudaGetErrorString of an error returned above.
const char* error_string(int error);

}  // namespace cnnlstm_fast::cuda
