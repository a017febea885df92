// CUDA implementations of the torch.library ops cnnlstm_fast::recurrence_forward and
// recurrence_backward (schema in csrc/cpu/recurrence.cpp; same saved-state contract as
// the reference backend, saved tensors in float32).
//
// The host runs the time loop and launches the per-step kernels of csrc/cuda/ on the
// caller's current stream (taken from c10, so no CUDA headers of torch are needed and
// a CPU-only torch compiles this file). In the backward, each step's d_h = dG_h W_hh
// (and d_m = g W_hr) is rowmat, a split-K kernel: cuBLAS's float32 GEMM measured 10 us
// a step at B=16, H=768 and 50 us at H=128 (one block) on an H100. dW_hh and dW_hr are
// one ATen GEMM each after the loop. Compiled only when setup.py found nvcc
// (CNNLSTM_FAST_WITH_CUDA).
//
// Which kernels run is the ops' `kernel_name`, `pdl` and `experimental` arguments, chosen
// in Python (cnnlstm_fast/experimental.py: the pins of set_kernels, a process setting,
// and the switch CNNLSTM_FAST_EXPERIMENTAL); the C++ reads no environment variable. With
// `experimental` false (the default) only the kernels verified on a GPU run, as they were
// verified; with it true the kernels of csrc/cuda/experimental/ may run too: the default
// kernels' newer versions (the tensor-core forward's loads at the pass start, packed row
// counts written on the device) and the opt-in ones that `kernel_name` and `pdl` name.
#ifdef CNNLSTM_FAST_WITH_CUDA

#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <torch/library.h>

#include <cstdint>
#include <cstdlib>
#include <initializer_list>
#include <optional>
#include <string>
#include <string_view>
#include <tuple>
#include <vector>

#include "cuda/experimental/experimental.h"
#include "cuda/experimental/floor.h"
#include "cuda/persistent.h"
#include "cuda/recurrence.h"

namespace cnnlstm_fast::cuda {
namespace {

using at::Tensor;
using Tensors6 = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;

void check_launch(int error, const char* kernel) {
  TORCH_CHECK(error == 0, "cnnlstm_fast cuda backend: launching ", kernel, " failed: ",
              error_string(error));
}

void* current_stream(const at::Device& device) {
  const auto* impl = c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA);
  return impl->getStream(device).native_handle();
}

Cell parse_cell(std::string_view cell) {
  if (cell == "lstm") return Cell::kLstm;
  if (cell == "gru") return Cell::kGru;
  if (cell == "rnn_tanh") return Cell::kRnnTanh;
  TORCH_CHECK(cell == "rnn_relu", "cell must be lstm, gru, rnn_tanh or rnn_relu, got ", cell);
  return Cell::kRnnRelu;
}

int64_t gates_of(Cell cell) { return cell == Cell::kLstm ? 4 : cell == Cell::kGru ? 3 : 1; }

DType dtype_of(const Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default:
      TORCH_CHECK(false, name, " must be float32, float16 or bfloat16 for the cuda backend, got ",
                  t.scalar_type());
  }
}

// Active rows per step, from the CPU batch_sizes tensor (sorted, decreasing).
std::vector<int64_t> active_rows(const std::optional<Tensor>& batch_sizes, int64_t steps,
                                 int64_t batch) {
  if (!batch_sizes.has_value()) return std::vector<int64_t>(steps, batch);
  const Tensor sizes = batch_sizes->to(at::kCPU, at::kLong).contiguous();
  TORCH_CHECK(sizes.numel() == steps, "batch_sizes must have ", steps, " entries, got ",
              sizes.numel());
  const int64_t* p = sizes.data_ptr<int64_t>();
  std::vector<int64_t> rows(p, p + steps);
  for (int64_t n : rows) {
    TORCH_CHECK(n >= 0 && n <= batch, "batch_sizes entries must lie in [0, ", batch, "], got ", n);
  }
  return rows;
}

// The active rows of every step as a device int32 tensor, for the kernels that read them
// there (persistent, streamed). By default copied from the host (pageable: the host
// waits for the stream, and a CUDA graph cannot capture it), as GPU-verified; with
// `allow_experimental`, written by kernels that take the values as arguments
// (experimental::write_row_runs): no host-to-device copy, so the forward and backward
// stay capturable in a CUDA graph and never wait for the stream.
Tensor device_rows(const std::vector<int64_t>& rows, const at::TensorOptions& options,
                   void* stream, bool allow_experimental) {
  if (!allow_experimental) {
    return at::tensor(std::vector<int32_t>(rows.begin(), rows.end()), options.dtype(at::kInt));
  }
  using experimental::kMaxRowRuns;
  Tensor out = at::empty({static_cast<int64_t>(rows.size())}, options.dtype(at::kInt));
  experimental::RowRuns runs;
  auto flush = [&] {
    check_launch(experimental::write_row_runs(runs, out.data_ptr<int32_t>(), stream),
                 "write_row_runs");
    runs.start = runs.end[runs.count - 1], runs.count = 0;
  };
  for (size_t t = 0; t < rows.size(); ++t) {
    if (runs.count > 0 && runs.value[runs.count - 1] == rows[t]) {
      runs.end[runs.count - 1] = static_cast<int>(t + 1);
      continue;
    }
    if (runs.count == kMaxRowRuns) flush();
    runs.value[runs.count] = static_cast<int>(rows[t]);
    runs.end[runs.count++] = static_cast<int>(t + 1);
  }
  if (runs.count > 0) flush();
  return out;
}

// The shape checks of the CPU kernels (csrc/cpu/recurrence.cpp), plus the device: the
// dispatcher picks this kernel when any argument is on CUDA, and a tensor elsewhere
// would reach a kernel as a pointer it cannot read.
void check_tensor(const Tensor& t, const char* name, const at::Device& device,
                  std::initializer_list<int64_t> shape) {
  TORCH_CHECK(t.device() == device, "cnnlstm_fast cuda backend: ", name, " must be on ", device,
              ", got ", t.device());
  TORCH_CHECK(t.sizes().equals(shape), "cnnlstm_fast cuda backend: ", name, " must have shape ",
              c10::IntArrayRef(shape), ", got ", t.sizes());
}

// Saved tensors are read by the kernels as float32.
void check_saved(const Tensor& t, const char* name, const at::Device& device,
                 std::initializer_list<int64_t> shape) {
  check_tensor(t, name, device, shape);
  TORCH_CHECK(t.scalar_type() == at::kFloat, "cnnlstm_fast cuda backend: ", name,
              " must be float32 (as forward saves it), got ", t.scalar_type());
}

// Checks the kernel an op call names: one of `verified`, or with `allow_experimental` one
// of `unverified` too; errors name the argument, what was expected and what was got.
void check_kernel(std::string_view kernel, const char* what,
                  std::initializer_list<const char*> verified,
                  std::initializer_list<const char*> unverified, bool allow_experimental) {
  for (const char* k : verified) {
    if (kernel == k) return;
  }
  std::string values;
  for (const char* k : verified) values += std::string(values.empty() ? "" : ", ") + k;
  for (const char* k : unverified) {
    TORCH_CHECK(kernel != k || allow_experimental, "cnnlstm_fast cuda backend: the ", what,
                " kernel '", kernel, "' is experimental (not yet verified on a GPU) and runs "
                "only with experimental=True (CNNLSTM_FAST_EXPERIMENTAL=1); without it kernel "
                "must be ", values);
    if (kernel == k) return;
    values += std::string(", ") + k;
  }
  TORCH_CHECK(false, "cnnlstm_fast cuda backend: the ", what, " kernel must be one of ", values,
              ", got '", kernel, "'");
}

// The forward kernels (the op's `kernel_name`): "auto" (the tensor-core persistent kernel where
// it fits, else the CUDA-core persistent kernel where it fits, else the per-step kernels),
// "step", "persistent" (CUDA cores), "mma" (tensor cores); experimental: "mma-pipelined"
// (each pass's G_x, c and h loaded during the previous pass's barrier), "mma-cluster" (one
// thread-block cluster on sm_90: h through distributed shared memory, the cluster's
// barrier) or "streamed" (one cooperative launch reading W_hh from L2 each step). A named
// kernel is an error where it cannot run.
void check_forward_kernel(std::string_view kernel, bool allow_experimental) {
  check_kernel(kernel, "forward", {"auto", "step", "persistent", "mma"},
               {"mma-pipelined", "mma-cluster", "streamed"}, allow_experimental);
}

// The backward kernels: "auto" (= "step", the per-step kernels), "step"; experimental:
// "persistent" (one cooperative launch for the sequence, no projection; an error where it
// cannot run).
void check_backward_kernel(std::string_view kernel, bool allow_experimental) {
  check_kernel(kernel, "backward", {"auto", "step"}, {"persistent"}, allow_experimental);
}

// pdl: the per-step kernels with programmatic dependent launch (experimental/pdl.cu).
void check_pdl(bool pdl, bool allow_experimental) {
  TORCH_CHECK(!pdl || allow_experimental, "cnnlstm_fast cuda backend: pdl=True (programmatic "
              "dependent launch) is experimental and runs only with experimental=True "
              "(CNNLSTM_FAST_EXPERIMENTAL=1)");
}

template <typename T>
T* ptr(const Tensor& t) {
  return t.defined() && t.numel() > 0 ? static_cast<T*>(t.data_ptr()) : nullptr;
}

// x[t] of a dense (steps, ...) tensor as a raw pointer, null for an undefined or empty x.
// The backward's loop is bound by host time at small batches, and an ATen select costs
// about a microsecond of it.
template <typename T>
T* step_ptr(const Tensor& x, int64_t t) {
  if (!x.defined() || x.numel() == 0) return nullptr;
  return reinterpret_cast<T*>(static_cast<char*>(x.data_ptr()) +
                              t * x.stride(0) * x.element_size());
}

// rowmat's workspace for these sizes.
Tensor rowmat_buffer(int64_t batch, int64_t p, int64_t q, const at::TensorOptions& f32) {
  long long floats = 0;
  check_launch(rowmat_workspace(static_cast<int>(batch), static_cast<int>(p), static_cast<int>(q),
                                &floats),
               "rowmat_workspace");
  return at::empty({static_cast<int64_t>(floats)}, f32);
}

Tensors6 recurrence_forward(std::string_view cell_name, const Tensor& gx_in, const Tensor& h0,
                            const std::optional<Tensor>& c0, const Tensor& w_hh,
                            const std::optional<Tensor>& w_hr, const std::optional<Tensor>& b_hn,
                            const std::optional<Tensor>& batch_sizes, bool reverse,
                            bool need_saved, std::string_view kernel, bool pdl,
                            bool allow_experimental) {
  TORCH_CHECK(gx_in.is_cuda() && gx_in.dim() == 3,
              "cnnlstm_fast cuda backend: gx must be a 3-D CUDA tensor, got ", gx_in.dim(),
              "-D on ", gx_in.device());
  const c10::DeviceGuard guard(gx_in.device());
  check_forward_kernel(kernel, allow_experimental);
  check_pdl(pdl, allow_experimental);
  const Cell cell = parse_cell(cell_name);
  const DType dtype = dtype_of(gx_in, "gx");
  const Tensor gx = gx_in.contiguous();
  const int64_t steps = gx.size(0), batch = gx.size(1), gate_width = gx.size(2);
  TORCH_CHECK(gate_width % gates_of(cell) == 0, "cnnlstm_fast cuda backend: gx's last dim (",
              gate_width, ") must be a multiple of ", gates_of(cell), " for cell ", cell_name);
  const int64_t hidden = gate_width / gates_of(cell);
  const bool lstm = cell == Cell::kLstm, proj = w_hr.has_value();
  TORCH_CHECK(!proj || lstm, "w_hr (projection) is only supported for lstm");
  TORCH_CHECK(!b_hn.has_value() || cell == Cell::kGru, "b_hn is only used by gru");
  TORCH_CHECK(lstm == c0.has_value(), "c0 must be given for lstm and only for lstm");
  const int64_t out = proj ? w_hr->size(0) : hidden;
  const at::Device device = gx.device();
  check_tensor(h0, "h0", device, {batch, out});
  check_tensor(w_hh, "w_hh", device, {gate_width, out});
  if (proj) check_tensor(*w_hr, "w_hr", device, {out, hidden});
  if (b_hn.has_value()) check_tensor(*b_hn, "b_hn", device, {hidden});
  if (lstm) check_tensor(*c0, "c0", device, {batch, hidden});
  const auto f32 = gx.options().dtype(at::kFloat);
  const Tensor w_hr_t = proj ? w_hr->to(gx.scalar_type()).t().contiguous() : Tensor();
  const Tensor bias_n = b_hn.has_value() ? b_hn->to(gx.scalar_type()).contiguous() : Tensor();

  Tensor h[2] = {h0.to(at::kFloat).contiguous().clone(), at::empty({batch, out}, f32)};
  Tensor c[2];
  if (lstm) c[0] = c0->to(at::kFloat).contiguous().clone(), c[1] = at::empty({batch, hidden}, f32);
  const Tensor m = proj ? at::empty({batch, hidden}, f32) : Tensor();
  Tensor y = at::empty({steps, batch, out}, gx.options());
  const Tensor none = at::empty({0}, f32);
  Tensor act = need_saved ? at::zeros({steps, batch, gate_width}, f32) : none;
  Tensor h_prev = need_saved ? at::empty({steps, batch, out}, f32) : none;
  Tensor extra = need_saved && cell != Cell::kRnnTanh && cell != Cell::kRnnRelu
                     ? at::zeros({steps, batch, hidden}, f32)
                     : none;
  const auto rows = active_rows(batch_sizes, steps, batch);
  void* stream = current_stream(gx.device());

  const std::string choice(kernel);
  PersistentPlan plan;
  if (!proj && (choice == "auto" || choice.rfind("mma", 0) == 0)) {
    if (allow_experimental) {  // under the switch, auto and mma run the newer loads
      const MmaVariant variant = choice == "mma-pipelined" ? MmaVariant::kPipelined
                                 : choice == "mma-cluster" ? MmaVariant::kCluster
                                                           : MmaVariant::kPassStartLoads;
      check_launch(experimental::persistent_mma_forward_plan(cell, dtype, batch, hidden, variant,
                                                             &plan),
                   "experimental persistent tensor-core plan");
    } else {
      check_launch(persistent_mma_forward_plan(cell, dtype, batch, hidden, &plan),
                   "persistent tensor-core plan");
    }
  }
  if (!proj && !plan.usable && (choice == "auto" || choice == "persistent")) {
    check_launch(persistent_forward_plan(cell, dtype, batch, hidden, &plan), "persistent plan");
  }
  experimental::StreamedPlan streamed;
  if (!proj && choice == "streamed") {
    check_launch(experimental::streamed_forward_plan(cell, dtype, batch, hidden, &streamed),
                 "streamed plan");
  }
  // an empty batch has nothing to launch: the step loop returns h0 and c0 as they are
  TORCH_CHECK(plan.usable || streamed.usable || choice == "auto" || choice == "step" ||
                  batch == 0 || hidden == 0,
              "cuda_forward='", choice, "' (cnnlstm_fast.experimental.set_kernels), but that "
              "kernel cannot run ", cell_name,
              " with hidden_size ", hidden, ", batch ", batch, ", dtype ", gx.scalar_type(),
              proj ? " and proj_size" : "", " on this device (the tensor-core kernel needs "
              "float16/bfloat16, an even hidden_size and W_hh spread over at most one block "
              "per SM; mma-cluster also an sm_90 device, W_hh in at most 16 blocks (LSTM "
              "hidden_size <= 256, GRU <= 336, RNN <= 512) and 2 x batch x (hidden_size "
              "rounded up to 16, + 8) x 2 bytes of h in shared memory beside the partial sums; "
              "the streamed kernel "
              "a cooperative launch; none of the persistent or streamed kernels supports "
              "proj_size)");
  // The tensor-core kernel reads W_hh as stored; the others read it transposed.
  const Tensor w_hh_c = plan.mma ? w_hh.to(gx.scalar_type()).contiguous()
                                 : w_hh.to(gx.scalar_type()).t().contiguous();
  if (plan.usable || streamed.usable) {
    const Tensor rows_dev =
        batch_sizes.has_value() ? device_rows(rows, gx.options(), stream, allow_experimental)
                                : Tensor();
    // Double-buffered h, [0] = h0. The tensor-core kernel exchanges h in the input dtype
    // (its MMA operand), so each step reads h rounded to T, as torch.nn's (cuDNN's)
    // fp16/bf16 LSTM does; the CUDA-core kernel keeps it in float32.
    Tensor h_buf = at::empty({2, batch, hidden}, plan.mma ? gx.options() : f32);
    h_buf[0].copy_(h[0]);
    const bool counter = plan.mma && plan.variant != MmaVariant::kCluster;  // the grid barrier
    const Tensor barrier = counter ? at::zeros({1}, gx.options().dtype(at::kInt)) : Tensor();
    PersistentForwardArgs a{};
    a.cell = cell, a.dtype = dtype;
    a.steps = steps, a.batch = batch, a.hidden = hidden, a.reverse = reverse;
    a.active_rows = rows_dev.defined() ? rows_dev.data_ptr<int32_t>() : nullptr;
    a.gx = gx.data_ptr();
    a.b_hn = bias_n.defined() ? bias_n.data_ptr() : nullptr;
    a.c_state = lstm ? ptr<float>(c[0]) : nullptr;
    a.y = y.data_ptr();
    a.act = need_saved ? ptr<float>(act) : nullptr;
    a.h_prev_all = need_saved ? ptr<float>(h_prev) : nullptr;
    a.extra = need_saved ? ptr<float>(extra) : nullptr;
    if (streamed.usable) {
      const Tensor partial = at::empty({static_cast<int64_t>(streamed.partial_floats)}, f32);
      a.w_hh_t = w_hh_c.data_ptr(), a.h_buf = ptr<float>(h_buf);
      check_launch(experimental::streamed_forward(a, streamed, ptr<float>(partial), stream),
                   "streamed_forward");
    } else if (plan.mma) {
      a.w_hh = w_hh_c.data_ptr(), a.h_exchange = h_buf.data_ptr();
      a.barrier = counter ? reinterpret_cast<unsigned int*>(barrier.data_ptr<int32_t>()) : nullptr;
      check_launch(plan.variant == MmaVariant::kDefault
                       ? persistent_mma_forward(a, plan, stream)
                       : experimental::persistent_mma_forward(a, plan, stream),
                   "persistent_mma_forward");
    } else {
      a.w_hh_t = w_hh_c.data_ptr(), a.h_buf = ptr<float>(h_buf);
      check_launch(persistent_forward(a, plan, stream), "persistent_forward");
    }
    const Tensor c_t = lstm ? c[0].to(c0->scalar_type()) : none;
    // a copy, not a view into h_buf (at a storage offset when steps is odd): outputs are
    // fresh tensors, as the op's fake makes them (torch.library.opcheck checks offsets)
    return {y, h_buf[steps % 2].to(h0.scalar_type(), /*non_blocking=*/false, /*copy=*/true),
            c_t, act, h_prev, extra};
  }

  const Tensor proj_ws = proj ? rowmat_buffer(batch, hidden, out, f32) : Tensor();
  int cur = 0;
  for (int64_t s = 0; s < steps; ++s) {
    const int64_t t = reverse ? steps - 1 - s : s;
    if (need_saved) h_prev[t].copy_(h[cur]);
    StepForwardArgs a{};
    a.cell = cell, a.dtype = dtype;
    a.batch = batch, a.active = rows[t], a.hidden = hidden, a.out_size = out;
    a.gx_t = gx[t].data_ptr(), a.h_prev = ptr<float>(h[cur]), a.w_hh_t = w_hh_c.data_ptr();
    a.b_hn = bias_n.defined() ? bias_n.data_ptr() : nullptr;
    a.h_next = ptr<float>(h[1 - cur]), a.y_t = y[t].data_ptr();
    if (lstm) a.c_prev = ptr<float>(c[cur]), a.c_next = ptr<float>(c[1 - cur]);
    a.m_out = proj ? ptr<float>(m) : nullptr;
    a.act_t = need_saved ? ptr<float>(act[t]) : nullptr;
    a.extra_t = need_saved && extra.numel() ? ptr<float>(extra[t]) : nullptr;
    check_launch(pdl ? experimental::step_forward_pdl(a, stream) : step_forward(a, stream),
                 "step_forward");
    if (proj) {  // h = m W_hr^T for active rows; inactive rows keep h
      RowMatArgs r{};
      r.a_dtype = DType::kFloat32, r.mat_dtype = dtype;
      r.batch = batch, r.active = rows[t], r.p = hidden, r.q = out;
      r.a = m.data_ptr(), r.mat = w_hr_t.data_ptr(), r.passthrough = ptr<float>(h[cur]);
      r.out = ptr<float>(h[1 - cur]), r.y = y[t].data_ptr(), r.workspace = ptr<float>(proj_ws);
      check_launch(pdl ? experimental::rowmat_pdl(r, stream) : rowmat(r, stream),
                   "rowmat (projection)");
    }
    cur = 1 - cur;
  }
  const Tensor c_t = lstm ? c[cur].to(c0->scalar_type()) : none;
  return {y, h[cur].to(h0.scalar_type()), c_t, act, h_prev, extra};
}

Tensors6 recurrence_backward(std::string_view cell_name, const Tensor& act_in,
                             const Tensor& h_prev_in,
                             const std::optional<Tensor>& extra, const Tensor& w_hh,
                             const std::optional<Tensor>& w_hr,
                             const std::optional<Tensor>& batch_sizes, bool reverse,
                             const Tensor& d_y_in, const Tensor& d_hT,
                             const std::optional<Tensor>& d_cT, std::string_view kernel,
                             bool pdl, bool allow_experimental) {
  TORCH_CHECK(act_in.is_cuda() && act_in.dim() == 3,
              "cnnlstm_fast cuda backend: act must be a 3-D CUDA tensor, got ", act_in.dim(),
              "-D on ", act_in.device());
  const c10::DeviceGuard guard(act_in.device());
  check_backward_kernel(kernel, allow_experimental);
  check_pdl(pdl, allow_experimental);
  const Cell cell = parse_cell(cell_name);
  const DType dtype = dtype_of(d_y_in, "d_y");
  const int64_t steps = act_in.size(0), batch = act_in.size(1), gate_width = act_in.size(2);
  const int64_t hidden = gate_width / gates_of(cell);
  const bool lstm = cell == Cell::kLstm, gru = cell == Cell::kGru, proj = w_hr.has_value();
  const int64_t out = proj ? w_hr->size(0) : hidden;
  const at::Device device = act_in.device();
  check_saved(act_in, "act", device, {steps, batch, gate_width});
  check_saved(h_prev_in, "h_prev", device, {steps, batch, out});
  if (lstm || gru) {
    TORCH_CHECK(extra.has_value(), "extra must be given for ", cell_name);
    check_saved(*extra, "extra", device, {steps, batch, hidden});
  }
  check_tensor(w_hh, "w_hh", device, {gate_width, out});
  if (proj) check_tensor(*w_hr, "w_hr", device, {out, hidden});
  check_tensor(d_y_in, "d_y", device, {steps, batch, out});
  check_tensor(d_hT, "d_hT", device, {batch, out});
  if (lstm && d_cT.has_value()) check_tensor(*d_cT, "d_cT", device, {batch, hidden});
  // the kernels index the saved tensors as dense (steps, batch, width) arrays
  const Tensor act = act_in.contiguous(), h_prev = h_prev_in.contiguous();
  const Tensor d_y = d_y_in.contiguous();
  const auto f32 = act.options().dtype(at::kFloat);
  const Tensor w_hh_c = w_hh.to(d_y.scalar_type()).contiguous();
  const Tensor w_hr_c = proj ? w_hr->to(d_y.scalar_type()).contiguous() : Tensor();

  Tensor dh[2] = {d_hT.to(at::kFloat).contiguous().clone(), at::empty({batch, out}, f32)};
  Tensor dc;
  if (lstm) {
    dc = d_cT.has_value() ? d_cT->to(at::kFloat).contiguous().clone()
                          : at::zeros({batch, hidden}, f32);
  }
  Tensor d_gx = at::zeros({steps, batch, gate_width}, f32);
  Tensor d_gh = gru ? at::zeros({steps, batch, gate_width}, f32) : d_gx;
  const Tensor d_h_direct = gru ? at::empty({batch, out}, f32) : Tensor();
  const Tensor g_all = proj ? at::zeros({steps, batch, out}, f32) : Tensor();
  const Tensor m_all = proj ? at::zeros({steps, batch, hidden}, f32) : Tensor();
  const Tensor d_m = proj ? at::empty({batch, hidden}, f32) : Tensor();
  const Tensor extra_c = extra.has_value() && extra->numel() ? extra->contiguous() : Tensor();
  const auto rows = active_rows(batch_sizes, steps, batch);
  void* stream = current_stream(act.device());
  experimental::StreamedPlan plan;
  if (kernel == "persistent") {
    // an empty batch or hidden size has nothing to launch: the step loop handles it
    const bool empty = batch == 0 || hidden == 0;
    TORCH_CHECK(!proj || empty, "cuda_backward='persistent' (cnnlstm_fast.experimental."
                "set_kernels), but the persistent backward has no projection (proj_size)");
    check_launch(experimental::persistent_backward_plan(cell, dtype, batch, hidden, &plan),
                 "persistent backward plan");
    TORCH_CHECK(plan.usable || empty, "cuda_backward='persistent' (cnnlstm_fast.experimental."
                "set_kernels), but this device cannot launch it (no cooperative launch, or no "
                "block of it fits on an SM)");
  }
  const bool step_loop = !plan.usable;
  const Tensor d_h_ws = step_loop ? rowmat_buffer(batch, gate_width, out, f32) : Tensor();
  const Tensor d_m_ws = step_loop && proj ? rowmat_buffer(batch, out, hidden, f32) : Tensor();
  if (plan.usable) {
    const Tensor rows_dev =
        batch_sizes.has_value() ? device_rows(rows, act.options(), stream, allow_experimental)
                                : Tensor();
    const Tensor partial = at::empty({static_cast<int64_t>(plan.partial_floats)}, f32);
    experimental::PersistentBackwardArgs a{};
    a.cell = cell, a.dtype = dtype;
    a.steps = steps, a.batch = batch, a.hidden = hidden, a.reverse = reverse;
    a.active_rows = rows_dev.defined() ? rows_dev.data_ptr<int32_t>() : nullptr;
    a.act = ptr<float>(act), a.extra = ptr<float>(extra_c), a.h_prev = ptr<float>(h_prev);
    a.d_y = d_y.data_ptr(), a.w_hh = w_hh_c.data_ptr();
    a.d_h = ptr<float>(dh[0]), a.d_c = lstm ? ptr<float>(dc) : nullptr;
    a.d_gx = ptr<float>(d_gx), a.d_gh = ptr<float>(d_gh);
    a.d_h_direct = gru ? ptr<float>(d_h_direct) : nullptr;
    a.partial = ptr<float>(partial);
    check_launch(experimental::persistent_backward(a, plan, stream), "persistent_backward");
  }

  int cur = 0;
  for (int64_t s = 0; step_loop && s < steps; ++s) {
    const int64_t t = reverse ? s : steps - 1 - s;  // forward's order, backwards
    const int active = static_cast<int>(rows[t]);
    if (proj) {  // d_m = (d_h + d_y[t]) W_hr on active rows (the others are not read)
      check_launch(add_output_grad(dtype, batch, active, out, ptr<float>(dh[cur]),
                                   step_ptr<void>(d_y, t), step_ptr<float>(g_all, t), stream),
                   "add_output_grad");
      RowMatArgs r{};
      r.a_dtype = DType::kFloat32, r.mat_dtype = dtype;
      r.batch = batch, r.active = active, r.p = out, r.q = hidden;
      r.a = step_ptr<void>(g_all, t), r.mat = w_hr_c.data_ptr(), r.out = ptr<float>(d_m);
      r.workspace = ptr<float>(d_m_ws);
      check_launch(pdl ? experimental::rowmat_pdl(r, stream) : rowmat(r, stream),
                   "rowmat (projection backward)");
    }
    StepBackwardArgs a{};
    a.cell = cell, a.dtype = dtype;
    a.batch = batch, a.active = active, a.hidden = hidden, a.out_size = out;
    a.act_t = step_ptr<float>(act, t);
    a.extra_t = step_ptr<float>(extra_c, t);
    a.h_prev_t = step_ptr<float>(h_prev, t);
    a.d_h = ptr<float>(dh[cur]), a.d_y_t = step_ptr<void>(d_y, t);
    a.d_m = proj ? ptr<float>(d_m) : nullptr;
    a.d_c = lstm ? ptr<float>(dc) : nullptr;
    a.d_gx_t = step_ptr<float>(d_gx, t);
    a.d_gh_t = gru ? step_ptr<float>(d_gh, t) : nullptr;
    a.d_h_direct = gru ? ptr<float>(d_h_direct) : nullptr;
    a.m_t = proj ? step_ptr<float>(m_all, t) : nullptr;
    check_launch(pdl ? experimental::step_backward_pdl(a, stream) : step_backward(a, stream),
                 "step_backward");
    // d_h for the previous step: d_gh W_hh (+ d_h z for GRU); inactive rows carry d_h
    RowMatArgs r{};
    r.a_dtype = DType::kFloat32, r.mat_dtype = dtype;
    r.batch = batch, r.active = active, r.p = gate_width, r.q = out;
    r.a = step_ptr<void>(d_gh, t), r.mat = w_hh_c.data_ptr();
    r.addend = gru ? ptr<float>(d_h_direct) : nullptr;
    r.passthrough = ptr<float>(dh[cur]), r.out = ptr<float>(dh[1 - cur]);
    r.workspace = ptr<float>(d_h_ws);
    check_launch(pdl ? experimental::rowmat_pdl(r, stream) : rowmat(r, stream), "rowmat (d_h)");
    cur = 1 - cur;
  }
  const Tensor none = at::empty({0}, f32);
  const Tensor d_w_hh =
      d_gh.flatten(0, 1).t().mm(h_prev.flatten(0, 1)).to(w_hh.scalar_type());
  // flatten, not reshape({-1, n}): -1 is ambiguous for zero elements (hidden_size 0)
  const Tensor d_w_hr = proj ? g_all.flatten(0, 1).t().mm(m_all.flatten(0, 1))
                                   .to(w_hr->scalar_type())
                             : none;
  const Tensor d_b_hn = gru ? d_gh.narrow(2, 2 * hidden, hidden).sum(at::IntArrayRef{0, 1}) : none;
  const Tensor dc0 = lstm ? dc.to(d_cT.has_value() ? d_cT->scalar_type() : d_hT.scalar_type())
                          : none;
  return {d_gx.to(d_y.scalar_type()), dh[cur].to(d_hT.scalar_type()), dc0, d_w_hh, d_w_hr, d_b_hn};
}

// The per-step floor (csrc/cuda/floor.h): `steps` steps of the exchange and barrier
// alone, on the current stream, into h (2, slot_stride) and a zeroed int32 counter.
void step_floor_op(const Tensor& h, const Tensor& barrier, int64_t steps, int64_t batch,
                int64_t hidden, int64_t blocks, bool exchange, bool fence, bool cluster) {
  TORCH_CHECK(h.is_cuda() && h.dim() == 2 && h.size(0) == 2 && h.is_contiguous(),
              "step_floor: h must be a contiguous (2, slot_stride) CUDA tensor, got ", h.sizes());
  TORCH_CHECK(h.size(1) % 8 == 0 && h.size(1) >= batch * hidden, "step_floor: slot_stride ",
              h.size(1), " must be a multiple of 8 and at least batch x hidden = ",
              batch * hidden);
  TORCH_CHECK(barrier.is_cuda() && barrier.scalar_type() == at::kInt && barrier.numel() == 1 &&
                  barrier.device() == h.device(),
              "step_floor: barrier must be one int32 on h's device");
  TORCH_CHECK(reinterpret_cast<uintptr_t>(h.data_ptr()) % 16 == 0,
              "step_floor: h must start 16-byte aligned (the kernel reads it 16 bytes at a time)");
  TORCH_CHECK(steps >= 0 && batch > 0 && hidden > 0 && blocks > 0,
              "step_floor: steps >= 0, batch, hidden and blocks > 0 required, got steps ",
              steps, ", batch ", batch, ", hidden ", hidden, ", blocks ", blocks);
  // int arguments, and the barrier's 32-bit target (step + 1) x blocks
  TORCH_CHECK(batch * hidden <= INT32_MAX && blocks <= INT32_MAX && steps <= INT32_MAX &&
                  steps * blocks <= int64_t{UINT32_MAX},
              "step_floor: batch x hidden and steps must fit in int32 and steps x blocks in "
              "uint32, got ", batch * hidden, ", ", steps, " and ", steps * blocks);
  TORCH_CHECK(!cluster || (exchange && blocks <= 16),
              "step_floor: the cluster variant exchanges h and runs at most 16 blocks, got "
              "exchange ", exchange, ", blocks ", blocks);
  const c10::DeviceGuard guard(h.device());
  StepFloorArgs a{};
  a.dtype = dtype_of(h, "h");
  a.steps = static_cast<int>(steps), a.batch = static_cast<int>(batch);
  a.hidden = static_cast<int>(hidden), a.blocks = static_cast<int>(blocks);
  a.exchange = exchange, a.fence = fence, a.cluster = cluster, a.slot_stride = h.size(1);
  a.h = h.data_ptr(), a.barrier = reinterpret_cast<unsigned int*>(barrier.data_ptr<int32_t>());
  check_launch(cnnlstm_fast::cuda::step_floor(a, current_stream(h.device())), "step_floor");
}

int64_t step_floor_max_blocks_op(const Tensor& like) {
  const c10::DeviceGuard guard(like.device());
  int blocks = 0;
  check_launch(cnnlstm_fast::cuda::step_floor_max_blocks(dtype_of(like, "like"), &blocks),
               "step_floor_max_blocks");
  return blocks;
}

}  // namespace
}  // namespace cnnlstm_fast::cuda

// Measurement ops, CUDA builds only (cnnlstm_fast/bench/floor.py).
TORCH_LIBRARY_FRAGMENT(cnnlstm_fast, m) {
  m.def("step_floor(Tensor(a!) h, Tensor(b!) barrier, int steps, int batch, int hidden, "
        "int blocks, bool exchange, bool fence=True, bool cluster=False) -> ()");
  m.def("step_floor_max_blocks(Tensor like) -> int");
}

TORCH_LIBRARY_IMPL(cnnlstm_fast, CUDA, m) {
  m.impl("recurrence_forward", &cnnlstm_fast::cuda::recurrence_forward);
  m.impl("recurrence_backward", &cnnlstm_fast::cuda::recurrence_backward);
  m.impl("step_floor", &cnnlstm_fast::cuda::step_floor_op);
  m.impl("step_floor_max_blocks", &cnnlstm_fast::cuda::step_floor_max_blocks_op);
}

#endif  // CNNLSTM_FAST_WITH_CUDA
