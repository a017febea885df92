// The `cpu` backend: the whole-sequence recurrence of one layer and one direction, for
// every cell type, as the torch.library ops cnnlstm_fast::recurrence_forward and
// cnnlstm_fast::recurrence_backward (CPU dispatch key). The contract and the exact
// semantics, saved state included, are those of cnnlstm_fast/backends/reference.py.
//
// Per step t, on the active row prefix [0, batch_sizes[t]): one BLAS GEMM h W_hh^T
// written straight into the step's slice of the saved activations, then one fused
// pointwise pass (pointwise.h: vectorised, parallel over rows x hidden). With a
// projection a second GEMM m W_hr^T gives h. Every buffer is allocated before the loop.
// Backward walks the steps in the opposite order with the transposed GEMMs and
// computes dW_hh (and dW_hr) as one GEMM over all steps after the loop.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <omp.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <thread>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "alloc.h"
#include "gemm.h"
#include "linear.h"
#include "pointwise.h"
#include "recurrence.h"
#include "stats.h"

// The Fortran BLAS of the BLAS torch links (MKL, OpenBLAS): the per-step GEMMs go
// there directly, as ATen's own CPU gemm does, without a dispatcher round trip and
// tensor views per step. Weak: a torch without them uses at::mm instead.
extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
            const float* beta, float* c, const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const double* alpha, const double* a, const int* lda, const double* b,
            const int* ldb, const double* beta, double* c, const int* ldc) __attribute__((weak));
// MKL's packed GEMM: a weight used at every step is packed once into MKL's internal
// layout and each step's GEMM skips the packing (measured 1.4x at 64 rows to 5x at one
// row with torch's MKL, single thread). Weak: absent without MKL.
size_t cblas_sgemm_pack_get_size(int identifier, int m, int n, int k) __attribute__((weak));
void cblas_sgemm_pack(int layout, int identifier, int trans, int m, int n, int k, float alpha,
                      const float* src, int ld, float* dest) __attribute__((weak));
void cblas_sgemm_compute(int layout, int transa, int transb, int m, int n, int k, const float* a,
                         int lda, const float* b, int ldb, float beta, float* c, int ldc)
    __attribute__((weak));
}

namespace cnnlstm_fast::cpu {
namespace {

using at::Tensor;

constexpr int kGates[kNumCells] = {4, 3, 1, 1};

Cell parse_cell(c10::string_view name) {
  if (name == "lstm") return kLstm;
  if (name == "gru") return kGru;
  if (name == "rnn_tanh") return kRnnTanh;
  if (name == "rnn_relu") return kRnnRelu;
  TORCH_CHECK(false, "cell must be one of 'lstm', 'gru', 'rnn_tanh', 'rnn_relu', got '",
              std::string(name), "'");
}

// Row-major C (m x n, leading dim ldc) = A (m x k) B' + beta C, with B' = B (k x n) or,
// with trans_b, B^T for B stored (n x k). Column-major BLAS computes C^T = B'^T A^T.
template <typename scalar_t>
void gemm_rows(bool trans_b, int64_t m, int64_t n, int64_t k, const scalar_t* a, int64_t lda,
               const scalar_t* b, int64_t ldb, scalar_t beta, scalar_t* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  const int mi = static_cast<int>(m), ni = static_cast<int>(n), ki = static_cast<int>(k);
  const int lda_i = static_cast<int>(lda), ldb_i = static_cast<int>(ldb);
  const int ldc_i = static_cast<int>(ldc);
  const char tb = trans_b ? 'T' : 'N', ta = 'N';
  const scalar_t one = 1;
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (sgemm_ != nullptr) {
      sgemm_(&tb, &ta, &ni, &mi, &ki, &one, b, &ldb_i, a, &lda_i, &beta, c, &ldc_i);
      return;
    }
  } else {
    if (dgemm_ != nullptr) {
      dgemm_(&tb, &ta, &ni, &mi, &ki, &one, b, &ldb_i, a, &lda_i, &beta, c, &ldc_i);
      return;
    }
  }
  const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<scalar_t>::value);
  auto view = [&](const scalar_t* p, int64_t rows, int64_t cols, int64_t ld) {
    return at::from_blob(const_cast<scalar_t*>(p), {rows, cols}, {ld, 1}, opts);
  };
  Tensor out = view(c, m, n, ldc);
  Tensor rhs = trans_b ? view(b, n, k, ldb).t() : view(b, k, n, ldb);
  if (beta == scalar_t(0)) {
    at::mm_out(out, view(a, m, k, lda), rhs);
  } else {
    out.addmm_(view(a, m, k, lda), rhs, beta);
  }
}

// A weight W (out_cols x k; any strides, so a transposed view needs no copy) applied at
// every step as C = A W^T + beta C for A (rows x k). Prepared once before the loop, by
// the first of: packed for our AVX-512 GEMM (float, gemm.h); MKL-packed (float with
// MKL: each step's GEMM skips the packing, measured 1.4x at 64 rows to 5x at one row on
// a Xeon); else contiguous plus a copy transposed once, because for few rows BLAS runs
// the GEMV-like shape fastest with the weight streamed along its output dimension
// (measured with MKL: ~10x at 1 row) and for many rows the stored layout (~1.2x at 64).
template <typename scalar_t>
class StepWeight {
 public:
  StepWeight(const Tensor& w, int64_t max_rows) : out_cols_(w.size(0)), k_(w.size(1)) {
    if constexpr (std::is_same_v<scalar_t, float>) {
      if (use_packed_gemm()) {
        packed_kind_ = kOurs;
        packed_ = pack_weight(w);
        return;
      }
    }
    w_ = w.contiguous();
    if constexpr (std::is_same_v<scalar_t, float>) {
      constexpr int kRowMajor = 101, kTrans = 112, kBMatrix = 162;
      if (cblas_sgemm_pack_get_size && cblas_sgemm_pack && cblas_sgemm_compute && max_rows > 0 &&
          out_cols_ > 0 && k_ > 0) {
        packed_kind_ = kMkl;
        const size_t bytes = cblas_sgemm_pack_get_size(kBMatrix, max_rows, out_cols_, k_);
        packed_ = at::empty({static_cast<int64_t>(bytes / sizeof(float)) + 1}, w.options());
        cblas_sgemm_pack(kRowMajor, kBMatrix, kTrans, max_rows, out_cols_, k_, 1.0f,
                         w_.const_data_ptr<float>(), k_, packed_.data_ptr<float>());
        return;
      }
    }
    w_t_ = w_.t().contiguous();
  }

  void apply(int64_t rows, const scalar_t* a, scalar_t beta, scalar_t* c) const {
    if (rows == 0) return;
    if constexpr (std::is_same_v<scalar_t, float>) {
      if (packed_kind_ == kOurs) {
        packed_gemm(rows, out_cols_, k_, a, k_, 1, packed_.const_data_ptr<float>(), nullptr,
                    beta, c, out_cols_);
        return;
      }
      if (packed_kind_ == kMkl) {
        constexpr int kRowMajor = 101, kNoTrans = 111, kPacked = 151;
        cblas_sgemm_compute(kRowMajor, kNoTrans, kPacked, rows, out_cols_, k_, a, k_,
                            packed_.const_data_ptr<float>(), out_cols_, beta, c, out_cols_);
        return;
      }
    }
    if (rows <= kFewRows) {
      gemm_rows<scalar_t>(false, rows, out_cols_, k_, a, k_, w_t_.const_data_ptr<scalar_t>(),
                          out_cols_, beta, c, out_cols_);
    } else {
      gemm_rows<scalar_t>(true, rows, out_cols_, k_, a, k_, w_.const_data_ptr<scalar_t>(), k_,
                          beta, c, out_cols_);
    }
  }

 private:
  static constexpr int64_t kFewRows = 32;
  enum Packing { kNone, kOurs, kMkl };
  int64_t out_cols_, k_;
  Packing packed_kind_ = kNone;
  Tensor w_, w_t_, packed_;
};

template <typename scalar_t>
const PointwiseKernels<scalar_t>& pointwise_kernels() {
  static const PointwiseKernels<scalar_t>* kernels = [] {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl")) {
      if (auto* k = pointwise_kernels_avx512<scalar_t>()) return k;
    }
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
      if (auto* k = pointwise_kernels_avx2<scalar_t>()) return k;
    }
#endif
    return &pointwise_kernels_default<scalar_t>();
  }();
  return *kernels;
}

// Active rows per step: batch_sizes, or every row.
std::vector<int64_t> active_rows(const c10::optional<Tensor>& batch_sizes, int64_t steps,
                                 int64_t batch) {
  if (!batch_sizes.has_value() || !batch_sizes->defined()) {
    return std::vector<int64_t>(steps, batch);
  }
  const Tensor& sizes = *batch_sizes;
  TORCH_CHECK(sizes.device().is_cpu() && sizes.scalar_type() == at::kLong && sizes.dim() == 1,
              "batch_sizes must be a 1-D int64 CPU tensor, got ", sizes.dim(), "-D ",
              sizes.scalar_type(), " on ", sizes.device());
  TORCH_CHECK(sizes.size(0) == steps, "batch_sizes must have one entry per step (", steps,
              "), got ", sizes.size(0));
  const Tensor contiguous = sizes.contiguous();
  const int64_t* data = contiguous.const_data_ptr<int64_t>();
  std::vector<int64_t> rows(data, data + steps);
  for (int64_t n : rows) {
    TORCH_CHECK(n >= 0 && n <= batch, "batch_sizes entries must lie in [0, ", batch, "], got ",
                n);
  }
  return rows;
}

// Where each step's rows lie in the layer input x, in G_x computed from it and in Y.
// Padded: (T, B, .), step t's rows from t * B on, rows[t] of them active (the others
// are zeroed in Y). Packed (a PackedSequence's data, (N, .)): step t's rows[t] rows
// from first[t] on, rows[t] never increasing; no other rows exist.
struct StepRows {
  std::vector<int64_t> rows;   // active rows of step t
  std::vector<int64_t> first;  // T + 1 entries: step t's first row; first[T] = all rows
  bool packed = false;
  int64_t batch = 0;  // B: rows of the state (packed: batch_sizes[0])
  int64_t steps() const { return static_cast<int64_t>(rows.size()); }
};

StepRows padded_rows(std::vector<int64_t> rows, int64_t B) {
  StepRows out;
  const int64_t T = static_cast<int64_t>(rows.size());
  out.batch = B;
  out.rows = std::move(rows);
  out.first.resize(T + 1);
  for (int64_t t = 0; t <= T; ++t) out.first[t] = t * B;
  return out;
}

// The steps of packed input of `total` rows: batch_sizes never increasing, summing to
// total (PackedSequence's invariants, checked: the recurrence relies on them).
StepRows packed_rows(const Tensor& batch_sizes, int64_t total) {
  TORCH_CHECK(batch_sizes.dim() == 1, "batch_sizes must be 1-D, got ", batch_sizes.dim(), "-D");
  const int64_t T = batch_sizes.size(0);
  const int64_t B = T == 0 ? 0 : batch_sizes.contiguous().const_data_ptr<int64_t>()[0];
  StepRows out;
  out.packed = true;
  out.batch = B;
  out.rows = active_rows(batch_sizes, T, B);
  out.first.resize(T + 1, 0);
  for (int64_t t = 0; t < T; ++t) {
    TORCH_CHECK(t == 0 || out.rows[t] <= out.rows[t - 1],
                "batch_sizes must never increase (a PackedSequence's), got ", out.rows[t - 1],
                " then ", out.rows[t], " at step ", t);
    out.first[t + 1] = out.first[t] + out.rows[t];
  }
  TORCH_CHECK(out.first[T] == total, "batch_sizes must sum to x's rows (", total, "), got ",
              out.first[T]);
  return out;
}

// The steps of t's rows (an op's x, G_x or saved activations): packed, (N, .) with
// batch_sizes, or padded, (T, B, .) with batch_sizes or without (every row active).
StepRows step_rows(const Tensor& t, const c10::optional<Tensor>& batch_sizes, bool packed) {
  if (packed) return packed_rows(*batch_sizes, t.size(0));
  return padded_rows(active_rows(batch_sizes, t.size(0), t.size(1)), t.size(1));
}

void check_tensor(const Tensor& t, const char* name, at::ScalarType dtype,
                  std::initializer_list<int64_t> shape) {
  TORCH_CHECK(t.device().is_cpu(), "cnnlstm_fast cpu backend: ", name,
              " must be a CPU tensor, got one on ", t.device());
  TORCH_CHECK(t.scalar_type() == dtype, "cnnlstm_fast cpu backend: ", name,
              " must have dtype ", dtype, " (that of gx), got ", t.scalar_type());
  TORCH_CHECK(t.sizes().equals(shape), "cnnlstm_fast cpu backend: ", name,
              " must have shape ", c10::IntArrayRef(shape), ", got ", t.sizes());
}

bool present(const c10::optional<Tensor>& t) { return t.has_value() && t->defined(); }

// Zeroes rows [rows, batch) of a (batch, width) slab: inactive rows of a step.
template <typename scalar_t>
void zero_tail(scalar_t* slab, int64_t rows, int64_t batch, int64_t width) {
  if (rows < batch) std::memset(slab + rows * width, 0, (batch - rows) * width * sizeof(scalar_t));
}

// The same for rows `stride` apart.
template <typename scalar_t>
void zero_tail(scalar_t* slab, int64_t rows, int64_t batch, int64_t width, int64_t stride) {
  if (stride == width) return zero_tail(slab, rows, batch, width);
  for (int64_t r = rows; r < batch; ++r) std::memset(slab + r * stride, 0, width * sizeof(scalar_t));
}

// How many steps of step_bytes each fit in budget bytes: at least 1, at most T (>= 1).
int64_t steps_per_chunk(int64_t budget, int64_t step_bytes, int64_t T) {
  return std::clamp<int64_t>(budget / std::max<int64_t>(1, step_bytes), 1,
                             std::max<int64_t>(T, 1));
}

// Where each step's G_x comes from: the whole (T, B, G) tensor, or (inference from the
// layer input) computed a chunk of steps at a time as x W_ih^T + b into one reused
// buffer, so the (T, B, G) projection is never materialised: writing fresh memory that
// size cost more in page faults than the projection's GEMM (8 ms for 32 MB on the
// 2-core Zen 5 VM). x is padded (T, B, I) or packed (N, I) rows (StepRows), in any
// strides: a batch-first input's transposed view and a conv output permuted to
// (T, B, C) are read where they lie (the GEMM packs its A tiles from any strides).
template <typename scalar_t>
class GxSource {
 public:
  // G_x given whole: (T, B, G) padded or (N, G) packed (steps)
  GxSource(const Tensor& gx, const StepRows& steps)
      : steps_(&steps), whole_(gx.const_data_ptr<scalar_t>()), gates_width_(gx.size(-1)) {}

  GxSource(const Tensor& x, const Tensor& w_ih, const Tensor& bias, int64_t gates_width,
           int64_t B, const StepRows& steps)
      : steps_(&steps), from_input_(true), x_(x), w_ih_(w_ih), bias_(bias), batch_(B),
        gates_width_(gates_width) {
    const int64_t T = steps.steps();
    col_stride_ = x.stride(-1);
    if (steps.packed) {
      row_stride_ = x.stride(0);
    } else {
      step_stride_ = x.stride(0);
      // one batch row per step: the rows of consecutive steps are step_stride_ apart
      row_stride_ = B == 1 ? x.stride(0) : x.stride(1);
      even_ = B == 1 || x.stride(0) == B * x.stride(1);
    }
    chunk_ = steps_per_chunk(int64_t{2} << 20, B * gates_width * int64_t{sizeof(scalar_t)}, T);
    // The chunk's buffer and the packed W_ih are made at the first projection (at()):
    // the persistent path projects into buffers of its own and never asks for them
    // (made here they doubled its G_x memory: 3.3 against torch.nn's 2.0 MiB tensor peak
    // for the seq2seq GRU encoder's inference, benchmarks/peak_memory.py).
  }

  // Whether G_x is computed from the input (then x, w_ih, bias), else given whole. Not
  // whole() == nullptr: an empty G_x (hidden_size or batch 0) has a null data pointer.
  bool from_input() const { return from_input_; }
  // The whole G_x (null when it is computed from the input, or empty).
  const scalar_t* whole() const { return whole_; }
  const Tensor& x() const { return x_; }
  const Tensor& w_ih() const { return w_ih_; }
  const Tensor& bias() const { return bias_; }

  // Calls block(a, lda, acs, rows, out_row) over the input rows of steps
  // [first, first + len): a (rows x I, element (r, k) at a[r * lda + k * acs]) goes to
  // rows [out_row, out_row + rows) of the chunk's G_x. One block where those rows are
  // evenly spaced (packed input, time-major rows), else one per step.
  template <typename Block>
  void for_each_block(int64_t first, int64_t len, const Block& block) const {
    const scalar_t* x = x_.const_data_ptr<scalar_t>();
    const auto& at = steps_->first;
    if (steps_->packed) {
      block(x + at[first] * row_stride_, row_stride_, col_stride_, at[first + len] - at[first],
            int64_t{0});
    } else if (even_) {
      block(x + first * step_stride_, row_stride_, col_stride_, len * batch_, int64_t{0});
    } else {
      for (int64_t i = 0; i < len; ++i) {
        block(x + (first + i) * step_stride_, row_stride_, col_stride_, batch_, i * batch_);
      }
    }
  }

  // G_x[t] for the step-th step of the walk (t = step, or T - 1 - step in reverse).
  const scalar_t* at(int64_t step, int64_t t, bool reverse, int64_t T) {
    if (!from_input_) return whole_ + steps_->first[t] * gates_width_;
    if (step % chunk_ == 0) {
      const int64_t len = std::min(chunk_, T - step);
      first_ = reverse ? T - step - len : step;
      project(first_, len);
    }
    const auto& at = steps_->first;
    return buffer_.const_data_ptr<scalar_t>() + (at[t] - at[first_]) * gates_width_;
  }

 private:
  void project(int64_t first, int64_t len) {
    const int64_t I = w_ih_.size(1), G = gates_width_;
    if (!buffer_.defined()) {
      buffer_ = empty_large({chunk_ * batch_, G}, x_.options());
      if constexpr (std::is_same_v<scalar_t, float>) {
        if (use_packed_gemm()) packed_ = pack_weight(w_ih_);
      }
    }
    scalar_t* out = buffer_.data_ptr<scalar_t>();
    for_each_block(first, len, [&](const scalar_t* a, int64_t lda, int64_t acs, int64_t rows,
                                   int64_t row) {
      if (rows == 0) return;
      if constexpr (std::is_same_v<scalar_t, float>) {
        if (packed_.defined()) {
          packed_gemm(rows, G, I, a, lda, acs, packed_.const_data_ptr<float>(),
                      bias_.defined() ? bias_.const_data_ptr<float>() : nullptr, 0.0f,
                      out + row * G, G);
          return;
        }
      }
      const Tensor a_rows = at::from_blob(const_cast<scalar_t*>(a), {rows, I}, {lda, acs},
                                          x_.options());
      Tensor c = buffer_.narrow(0, row, rows);
      if (bias_.defined()) {
        at::addmm_out(c, bias_, a_rows, w_ih_.t());
      } else {
        at::mm_out(c, a_rows, w_ih_.t());
      }
    });
  }

  const StepRows* steps_;
  bool from_input_ = false;
  const scalar_t* whole_ = nullptr;
  int64_t step_stride_ = 0, row_stride_ = 0;  // x's: padded step stride, row stride,
  int64_t col_stride_ = 1;                    // and feature stride
  bool even_ = true;                          // padded x: rows of a chunk evenly spaced
  Tensor x_, w_ih_, bias_, buffer_, packed_;
  int64_t batch_ = 0, gates_width_ = 0;
  int64_t chunk_ = 1, first_ = 0;
};

// ---------------------------------------------------------------------------------------
// The persistent path (float32, our GEMM, no projection): one OpenMP parallel region for
// the whole sequence instead of a fork and join per GEMM and per pointwise pass. Thread i
// owns hidden units [j0, j1) (whole 32-unit panels) for the whole sequence, so the data
// of its units stays in its core's caches:
// - forward: it holds the rows of W_hh (and, on the from-input path, of W_ih and the
//   bias) of every gate of its units, computes their part of h W_hh^T (and of G_x, a
//   chunk of steps at a time) into its own buffer, runs the pointwise pass on its units
//   and writes its part of h_t into the other of two h buffers; one spin barrier per
//   step publishes h_t to every thread.
// - backward: the pointwise pass of its units writes their columns of dG[t] (all gates);
//   one barrier per step; then it computes its columns of dh = dG[t] W_hh from all of
//   dG[t] with its columns of W_hh. dG has a slab per step, and dh and dc are read and
//   written by the owner of the columns only, so nothing else needs a barrier.
// At batch 1 a step is a GEMV over all of W_hh (256 KB at H=128), which one core reads
// from its L2 in about as long as torch's whole step takes; split across the cores, each
// keeps its slice in its own L2. At larger batches the per-step path's fork/joins and its
// two different work splits (GEMM by columns, pointwise by rows) move each step's data
// between cores. Each element is computed in the same order as on the per-step path (the
// same micro-kernel, one column's dot product in k order), so results do not depend on
// the path or on the thread count.

// Whether the persistent path runs: the ops' kernel_name argument (the cpu backend passes
// cnnlstm_fast.backends.cpu.get_kernel()). "auto" (default) where it measured faster,
// "persistent" wherever it can run (float32 with our GEMM, no projection, at least two
// threads with units to own; elsewhere the per-step path runs, as under "auto"),
// "per_step" never.
enum class PersistentMode { kAuto, kAlways, kNever };

PersistentMode persistent_mode(c10::string_view kernel_name) {
  if (kernel_name == "auto") return PersistentMode::kAuto;
  if (kernel_name == "persistent") return PersistentMode::kAlways;
  TORCH_CHECK(kernel_name == "per_step",
              "cnnlstm_fast cpu backend: kernel_name must be one of 'auto', 'per_step', "
              "'persistent', got '", std::string(kernel_name), "'");
  return PersistentMode::kNever;
}

// Under "auto", batches up to this many rows take the path even when it has fewer
// threads than torch (H < 32 * threads): at T=1000 I=32 H=128 on the 2-core Zen 5 VM, in
// ad hoc runs of the first (16-unit-slice) forward, it measured 1.26x-2.1x the per-step
// path (LSTM and GRU) at batch 1, 2, 4, 8 and 16. Against torch.nn see
// benchmarks/results/cpu-amd-epyc/small-batch-lstm-*. Larger batches take it only with
// every thread (else the per-step path's split by rows uses more cores).
constexpr int64_t kSmallBatchRows = 16;
// Under "auto", W_hh below this many bytes stays on the per-step path. At exactly 64 KB
// (LSTM H=64) the split measured 1.5x at batch 1; smaller weights are unmeasured, where
// the barrier is expected to cost more than the split saves.
constexpr int64_t kPersistentMinWeightBytes = int64_t{64} << 10;
constexpr int64_t kUnitWidth = kPanelWidth;  // hidden units per slice step: one GEMM panel

std::atomic<int64_t> persistent_forward_count{0};
std::atomic<int64_t> persistent_backward_count{0};

// The number of threads the persistent path runs with for this layer, or 0 where it
// does not run (then the per-step path computes the same thing).
int persistent_team(PersistentMode mode, int64_t T, int64_t B, int64_t G, int64_t H,
                    bool projection) {
  if (mode == PersistentMode::kNever || projection || !use_packed_gemm() || B == 0 || T == 0 ||
      at::in_parallel_region()) {
    return 0;
  }
  const int64_t units = (H + kUnitWidth - 1) / kUnitWidth;
  const int threads = at::get_num_threads();
  const int team = static_cast<int>(std::min<int64_t>(threads, units));
  if (team < 2) return 0;
  if (mode == PersistentMode::kAuto &&
      ((B > kSmallBatchRows && team < threads) ||
       G * H * int64_t{sizeof(float)} < kPersistentMinWeightBytes)) {
    return 0;
  }
  return team;
}

// Thread i's hidden units [j0, j1) of H among `team` threads: whole 32-unit panels.
std::pair<int64_t, int64_t> unit_slice(int64_t H, int i, int team) {
  const int64_t units = (H + kUnitWidth - 1) / kUnitWidth;
  return {std::min(H, units * i / team * kUnitWidth),
          std::min(H, units * (i + 1) / team * kUnitWidth)};
}

// A barrier for the threads of one parallel region, spinning (the wait is short: one
// step's work) and yielding after a while in case the threads outnumber the free cores.
class SpinBarrier {
 public:
  void wait(int team) {
    const int64_t generation = generation_.load(std::memory_order_acquire);
    if (arrived_.fetch_add(1, std::memory_order_acq_rel) == team - 1) {
      arrived_.store(0, std::memory_order_relaxed);
      generation_.fetch_add(1, std::memory_order_release);
      return;
    }
    for (int spins = 0; generation_.load(std::memory_order_acquire) == generation; ++spins) {
      if (spins < kSpinsBeforeYield) {
#if defined(__x86_64__)
        __builtin_ia32_pause();
#endif
      } else {
        std::this_thread::yield();
      }
    }
  }

 private:
  static constexpr int kSpinsBeforeYield = 1 << 14;
  alignas(64) std::atomic<int> arrived_{0};
  alignas(64) std::atomic<int64_t> generation_{0};
};

// Runs body(i) on `team` OpenMP threads, i the thread's number, and returns true; or
// returns false, nobody having run body, when the runtime gives fewer threads than asked
// (a limit, nesting): the per-step path then computes the same thing.
template <typename Body>
bool run_on_team(int team, const Body& body) {
  std::atomic<bool> full_team{true};
#pragma omp parallel num_threads(team)
  {
    if (omp_get_num_threads() != team) {
      full_team.store(false);
    } else {
      body(omp_get_thread_num());
    }
  }
  return full_team.load();
}

struct PersistentSlice {
  int64_t j0 = 0, j1 = 0;
  // Packed rows of each gate's units, gate after gate, each gate's part padded to whole
  // panels (pspan columns): W_hh, and on the from-input path W_ih and the bias.
  Tensor w_hh, w_ih, bias;
  Tensor hw, gx;  // (B, gates*pspan) and (chunk, B, gates*pspan) buffers
};

// Packs rows q * H + j, j in [j0, j1), of every gate q of w (gates*H x k, any strides)
// into `packed`, gate q's panels from q * pspan * k on (pack_b zero-pads each gate's last
// panel).
void pack_gate_rows(const Tensor& w, int gates, int64_t H, int64_t j0, int64_t j1,
                    int64_t pspan, float* packed) {
  const int64_t k = w.size(1);
  for (int q = 0; q < gates; ++q) {
    pack_b(k, j1 - j0, w.const_data_ptr<float>() + (q * H + j0) * w.stride(0), w.stride(1),
           w.stride(0), packed + q * pspan * k);
  }
}

bool persistent_forward(PersistentMode mode, Cell cell, const StepRows& steps, bool reverse,
                        GxSource<float>& source, int64_t T, int64_t B, int64_t G,
                        const Tensor& w_hh, const Tensor& w_hr, const Tensor& b_hn, Tensor& h,
                        Tensor& c, Tensor& y, Tensor& act, Tensor& h_prev, Tensor& extra,
                        bool need_saved) {
  const int gates = kGates[cell];
  const int64_t H = G / gates;
  const int team = persistent_team(mode, T, B, G, H, w_hr.defined());
  if (team == 0) return false;
  const int64_t units = (H + kUnitWidth - 1) / kUnitWidth;
  const bool from_input = source.from_input();
  const int64_t I = from_input ? source.w_ih().size(1) : 0;
  const std::vector<int64_t>& rows = steps.rows;
  const std::vector<int64_t>& at_row = steps.first;
  const int64_t y_ld = y.stride(-2);
  std::vector<PersistentSlice> slices(team);
  // Steps per projected chunk, one for all threads (they project at the same steps and
  // each buffer holds `chunk` steps of its own slice), about 1 MB for the widest slice.
  const int64_t widest = gates * ((units + team - 1) / team) * kUnitWidth;
  const int64_t chunk = from_input ? steps_per_chunk(int64_t{1} << 20, B * widest * 4, T) : 1;
  for (int i = 0; i < team; ++i) {  // buffers only: each thread packs its own slice
    PersistentSlice& sl = slices[i];
    std::tie(sl.j0, sl.j1) = unit_slice(H, i, team);
    const int64_t pspan = (sl.j1 - sl.j0 + kPanelWidth - 1) / kPanelWidth * kPanelWidth;
    const int64_t width = gates * pspan;
    sl.w_hh = empty_large({width * H}, h.options());
    sl.hw = empty_large({B, width}, h.options());
    if (from_input) {
      sl.w_ih = empty_large({width * I}, h.options());
      sl.bias = at::zeros({width}, h.options());
      sl.gx = empty_large({chunk, B, width}, h.options());
    }
  }
  Tensor other = at::empty_like(h);
  const auto& kernels = pointwise_kernels<float>();
  SpinBarrier barrier;
  const bool ran = run_on_team(team, [&](int i) {
    const PersistentSlice& sl = slices[i];
    const int64_t j0 = sl.j0, j1 = sl.j1, span = j1 - j0;
    const int64_t pspan = (span + kPanelWidth - 1) / kPanelWidth * kPanelWidth;
    const int64_t width = gates * pspan, panels = width / kPanelWidth;
    // Packed here, by the thread that reads it at every step.
    pack_gate_rows(w_hh, gates, H, j0, j1, pspan, sl.w_hh.data_ptr<float>());
    if (from_input) {
      pack_gate_rows(source.w_ih(), gates, H, j0, j1, pspan, sl.w_ih.data_ptr<float>());
      if (source.bias().defined()) {
        for (int q = 0; q < gates; ++q) {
          std::memcpy(sl.bias.data_ptr<float>() + q * pspan,
                      source.bias().const_data_ptr<float>() + q * H + j0, span * sizeof(float));
        }
      }
    }
    float* cur = h.data_ptr<float>();
    float* next = other.data_ptr<float>();
    float* const c_data = c.defined() ? c.data_ptr<float>() : nullptr;
    ForwardStep<float> s{};
    s.hidden = H;
    s.col_begin = j0;
    s.col_end = j1;
    s.hw = sl.hw.data_ptr<float>() - j0;
    s.hw_row_stride = width;
    s.hw_gate_stride = pspan;
    s.c = c_data;
    s.b_hn = b_hn.defined() ? b_hn.const_data_ptr<float>() : nullptr;
    int64_t first = 0;  // first step of the projected chunk
    auto copy_units = [&](float* dst, const float* src, int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        std::memcpy(dst + r * H + j0, src + r * H + j0, span * sizeof(float));
      }
    };
    auto zero_units = [&](float* dst, int64_t r0, int64_t r1, int64_t stride, int copies) {
      for (int64_t r = r0; r < r1; ++r) {
        for (int q = 0; q < copies; ++q) {
          std::memset(dst + r * stride + q * H + j0, 0, span * sizeof(float));
        }
      }
    };
    for (int64_t step = 0; step < T; ++step) {
      const int64_t t = reverse ? T - 1 - step : step;
      const int64_t n = rows[t];
      float* y_t = y.data_ptr<float>() + at_row[t] * y_ld;
      const int64_t r0 = at_row[t];  // the step's first row in the saved tensors
      float* act_t = act.data_ptr<float>() + (need_saved ? r0 * G : 0);
      if (!steps.packed) zero_units(y_t, n, B, y_ld, 1);
      if (need_saved) {
        // packed: the step has n rows in the saved tensors; padded: B, the last B - n zero
        const int64_t saved_rows = steps.packed ? n : B;
        if (!steps.packed) zero_units(act_t, n, B, G, gates);
        copy_units(h_prev.data_ptr<float>() + r0 * H, cur, 0, saved_rows);
        if (cell == kLstm) {
          copy_units(extra.data_ptr<float>() + r0 * H, c_data, 0, saved_rows);
        } else if (cell == kGru && !steps.packed) {
          zero_units(extra.data_ptr<float>() + r0 * H, n, B, H, 1);
        }
      }
      if (from_input) {
        if (step % chunk == 0) {
          const int64_t len = std::min(chunk, T - step);
          first = reverse ? T - step - len : step;
          if (span > 0) {
            source.for_each_block(first, len, [&](const float* a, int64_t lda, int64_t acs,
                                                  int64_t m, int64_t row) {
              if (m == 0) return;
              packed_gemm_block_avx512(m, panels, width, I, a, lda, acs,
                                       sl.w_ih.const_data_ptr<float>(), I * kPanelWidth,
                                       sl.bias.const_data_ptr<float>(), 0.0f,
                                       sl.gx.data_ptr<float>() + row * width, width);
            });
          }
        }
        s.gx = sl.gx.const_data_ptr<float>() + (at_row[t] - at_row[first]) * width - j0;
        s.gx_row_stride = width;
        s.gx_gate_stride = pspan;
      } else {
        s.gx = source.whole() + r0 * G;
        s.gx_row_stride = G;
        s.gx_gate_stride = H;
      }
      if (n > 0 && span > 0) {
        packed_gemm_block_avx512(n, panels, width, H, cur, H, 1,
                                 sl.w_hh.const_data_ptr<float>(), H * kPanelWidth, nullptr,
                                 0.0f, sl.hw.data_ptr<float>(), width);
        s.rows = n;
        s.act = need_saved ? act_t : nullptr;  // inference: nothing reads the activations
        s.h_in = cur;
        s.h = next;
        s.y = y_t;
        s.y_row_stride = y_ld;
        s.extra = need_saved && cell == kGru ? extra.data_ptr<float>() + r0 * H : nullptr;
        kernels.forward[cell](s);
      }
      copy_units(next, cur, n, B);  // rows past the step keep their state
      barrier.wait(team);
      std::swap(cur, next);
    }
    // After an odd number of steps h_T is in `other`: copy this thread's units back.
    if (T % 2 == 1) copy_units(h.data_ptr<float>(), cur, 0, B);
  });
  if (!ran) return false;
  persistent_forward_count.fetch_add(1, std::memory_order_relaxed);
  return true;
}

// y: (T, B, Hout) padded or (N, Hout) packed (steps), rows y.stride(-2) apart (a
// column block of a wider output).
template <typename scalar_t>
void forward_loop(PersistentMode mode, Cell cell, const StepRows& steps, bool reverse,
                  GxSource<scalar_t>& gx, int64_t T, int64_t B, int64_t G, const Tensor& w_hh,
                  const Tensor& w_hr, const Tensor& b_hn, Tensor& h, Tensor& c, Tensor& y,
                  Tensor& act, Tensor& h_prev, Tensor& extra, bool need_saved) {
  const int64_t H = G / kGates[cell], Hout = h.size(1);
  const bool proj = w_hr.defined();
  const std::vector<int64_t>& rows = steps.rows;
  const int64_t y_ld = y.stride(-2);
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (persistent_forward(mode, cell, steps, reverse, gx, T, B, G, w_hh, w_hr, b_hn, h, c, y, act,
                           h_prev, extra, need_saved)) {
      return;
    }
  }
  const auto& kernels = pointwise_kernels<scalar_t>();
  Tensor m = proj ? at::empty({B, H}, h.options()) : Tensor();

  ForwardStep<scalar_t> s{};
  s.hidden = H;
  s.col_begin = 0;
  s.col_end = H;
  s.gx_row_stride = s.hw_row_stride = G;
  s.gx_gate_stride = s.hw_gate_stride = H;
  s.y_row_stride = y_ld;
  s.h = h.data_ptr<scalar_t>();
  s.h_in = s.h;
  s.c = c.defined() ? c.data_ptr<scalar_t>() : nullptr;
  s.m = proj ? m.data_ptr<scalar_t>() : nullptr;
  s.b_hn = b_hn.defined() ? b_hn.const_data_ptr<scalar_t>() : nullptr;
  const StepWeight<scalar_t> recurrent(w_hh, B);
  const std::optional<StepWeight<scalar_t>> projection =
      proj ? std::make_optional<StepWeight<scalar_t>>(w_hr, B) : std::nullopt;
  for (int64_t step = 0; step < T; ++step) {
    const int64_t t = reverse ? T - 1 - step : step;
    const int64_t n = rows[t];
    scalar_t* y_t = y.data_ptr<scalar_t>() + steps.first[t] * y_ld;
    const int64_t r0 = steps.first[t];  // the step's first row in the saved tensors
    scalar_t* act_t = act.data_ptr<scalar_t>() + (need_saved ? r0 * G : 0);
    if (!steps.packed) zero_tail(y_t, n, B, Hout, y_ld);
    if (need_saved) {
      // packed: the step has n rows in the saved tensors; padded: B, the last B - n zero
      const int64_t saved_rows = steps.packed ? n : B;
      if (!steps.packed) zero_tail(act_t, n, B, G);
      std::memcpy(h_prev.data_ptr<scalar_t>() + r0 * Hout, s.h,
                  saved_rows * Hout * sizeof(scalar_t));
      if (cell == kLstm) {
        std::memcpy(extra.data_ptr<scalar_t>() + r0 * H, s.c, saved_rows * H * sizeof(scalar_t));
      } else if (cell == kGru && !steps.packed) {
        zero_tail(extra.data_ptr<scalar_t>() + r0 * H, n, B, H);
      }
    }
    const scalar_t* gx_t = gx.at(step, t, reverse, T);
    if (n == 0) continue;
    recurrent.apply(n, s.h, 0, act_t);
    s.rows = n;
    s.gx = gx_t;
    s.hw = act_t;
    s.act = act_t;
    s.y = y_t;
    s.extra = need_saved && cell == kGru ? extra.data_ptr<scalar_t>() + r0 * H : nullptr;
    kernels.forward[cell](s);
    if (proj) {
      projection->apply(n, s.m, 0, s.h);
      for (int64_t r = 0; r < n; ++r) {
        std::memcpy(y_t + r * y_ld, s.h + r * Hout, Hout * sizeof(scalar_t));
      }
    }
  }
}

// The checks both forward ops share, for G_x of shape (T, B, G) given or to be computed.
void check_layer(Cell cell, c10::string_view cell_name, at::ScalarType dtype, int64_t B,
                 int64_t G, const Tensor& h0, const c10::optional<Tensor>& c0,
                 const Tensor& w_hh, const c10::optional<Tensor>& w_hr,
                 const c10::optional<Tensor>& b_hn) {
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble,
              "cnnlstm_fast cpu backend supports float32 and float64, got ", dtype);
  TORCH_CHECK(G % kGates[cell] == 0, "cnnlstm_fast cpu backend: the gate width (", G,
              ") must be a multiple of ", kGates[cell], " for cell ", std::string(cell_name));
  const int64_t H = G / kGates[cell];
  const bool proj = present(w_hr);
  TORCH_CHECK(!proj || cell == kLstm, "w_hr (projection) is only supported for lstm");
  TORCH_CHECK(!present(b_hn) || cell == kGru, "b_hn is only used by gru");
  const int64_t Hout = proj ? w_hr->size(0) : H;
  check_tensor(h0, "h0", dtype, {B, Hout});
  check_tensor(w_hh, "w_hh", dtype, {G, Hout});
  if (proj) check_tensor(*w_hr, "w_hr", dtype, {Hout, H});
  if (present(b_hn)) check_tensor(*b_hn, "b_hn", dtype, {H});
  TORCH_CHECK((cell == kLstm) == present(c0), "c0 must be given for lstm and only for lstm");
  if (cell == kLstm) check_tensor(*c0, "c0", dtype, {B, H});
}

// Runs the forward loop into y (allocated by the caller: (T, B, Hout) padded, or (N, Hout)
// packed, or a column block of a wider output): (h_T, c_T, act, h_prev, extra).
template <typename MakeSource>
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> run_forward(
    Cell cell, at::ScalarType dtype, int64_t T, int64_t B, int64_t G, const Tensor& h0,
    const c10::optional<Tensor>& c0, const Tensor& w_hh_in, const c10::optional<Tensor>& w_hr_in,
    const c10::optional<Tensor>& b_hn_in, const StepRows& steps, bool reverse,
    bool need_saved, PersistentMode mode, Tensor& y, const MakeSource& make_source) {
  const int64_t H = G / kGates[cell];
  const bool proj = present(w_hr_in);
  const int64_t Hout = proj ? w_hr_in->size(0) : H;
  const Tensor w_hh = w_hh_in.contiguous();
  const Tensor w_hr = proj ? w_hr_in->contiguous() : Tensor();
  const Tensor b_hn = present(b_hn_in) ? b_hn_in->contiguous() : Tensor();
  const auto opts = h0.options();
  Tensor h = h0.clone(at::MemoryFormat::Contiguous);
  Tensor c = cell == kLstm ? c0->clone(at::MemoryFormat::Contiguous) : at::empty({0}, opts);
  // The saved tensors: (T, B, width) padded, (N, width) packed.
  auto saved = [&](int64_t width) {
    return steps.packed ? empty_large({steps.first[T], width}, opts)
                        : empty_large({T, B, width}, opts);
  };
  // Without need_saved the activations of a step go to one reused (B, G) scratch slab.
  Tensor act = need_saved ? saved(G) : at::empty({B, G}, opts);
  Tensor h_prev = need_saved ? saved(Hout) : at::empty({0}, opts);
  Tensor extra = need_saved && (cell == kLstm || cell == kGru) ? saved(H) : at::empty({0}, opts);
  Tensor c_state = cell == kLstm ? c : Tensor();
  AT_DISPATCH_FLOATING_TYPES(dtype, "cnnlstm_fast_recurrence_forward", [&] {
    GxSource<scalar_t> source = make_source(scalar_t{});
    forward_loop<scalar_t>(mode, cell, steps, reverse, source, T, B, G, w_hh, w_hr, b_hn, h,
                           c_state, y, act, h_prev, extra, need_saved);
  });
  if (!need_saved) act = at::empty({0}, opts);
  return {h, c, act, h_prev, extra};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> recurrence_forward(
    c10::string_view cell_name, const Tensor& gx_in, const Tensor& h0,
    const c10::optional<Tensor>& c0, const Tensor& w_hh, const c10::optional<Tensor>& w_hr,
    const c10::optional<Tensor>& b_hn, const c10::optional<Tensor>& batch_sizes, bool reverse,
    bool need_saved, c10::string_view kernel_name, bool /*pdl*/, bool /*experimental*/) {
  const Cell cell = parse_cell(cell_name);
  const PersistentMode mode = persistent_mode(kernel_name);
  // packed: gx is (N, G), a PackedSequence's rows (as are y and the saved tensors)
  const bool packed = gx_in.dim() == 2 && present(batch_sizes);
  TORCH_CHECK(gx_in.dim() == 3 || packed, "cnnlstm_fast cpu backend: gx must be 3-D (T, B, "
              "gates*H), or 2-D (rows, gates*H) with batch_sizes, got ", gx_in.dim(), "-D");
  const auto dtype = gx_in.scalar_type();
  const StepRows steps = step_rows(gx_in, batch_sizes, packed);
  const int64_t T = steps.steps(), G = gx_in.size(-1), B = steps.batch;
  check_layer(cell, cell_name, dtype, B, G, h0, c0, w_hh, w_hr, b_hn);
  const Tensor gx = gx_in.contiguous();
  Tensor y = packed ? empty_large({gx.size(0), h0.size(1)}, h0.options())
                    : empty_large({T, B, h0.size(1)}, h0.options());
  auto [h, c, act, h_prev, extra] =
      run_forward(cell, dtype, T, B, G, h0, c0, w_hh, w_hr, b_hn, steps, reverse, need_saved,
                  mode, y, [&](auto zero) { return GxSource<decltype(zero)>(gx, steps); });
  return {y, h, c, act, h_prev, extra};
}

}  // namespace

// See recurrence.h.
std::tuple<Tensor, Tensor> forward_from_input_into(
    c10::string_view cell_name, const Tensor& x_in, const Tensor& w_ih,
    const c10::optional<Tensor>& gx_bias, const Tensor& h0, const c10::optional<Tensor>& c0,
    const Tensor& w_hh, const c10::optional<Tensor>& w_hr, const c10::optional<Tensor>& b_hn,
    bool reverse, c10::string_view kernel_name, const c10::optional<Tensor>& batch_sizes,
    Tensor& y) {
  const Cell cell = parse_cell(cell_name);
  const PersistentMode mode = persistent_mode(kernel_name);
  const bool packed = present(batch_sizes);
  const auto dtype = x_in.scalar_type();
  TORCH_CHECK(x_in.dim() == (packed ? 2 : 3), "cnnlstm_fast cpu backend: x must be ",
              packed ? "2-D (rows, input) with batch_sizes" : "3-D (T, B, input)", ", got ",
              x_in.dim(), "-D");
  const int64_t G = w_ih.size(0), I = x_in.size(-1);
  const StepRows steps = step_rows(x_in, batch_sizes, packed);
  const int64_t T = steps.steps(), B = steps.batch;
  check_layer(cell, cell_name, dtype, B, G, h0, c0, w_hh, w_hr, b_hn);
  check_tensor(w_ih, "w_ih", dtype, {G, I});
  if (present(gx_bias)) check_tensor(*gx_bias, "gx_bias", dtype, {G});
  const int64_t Hout = h0.size(1);
  TORCH_CHECK(y.scalar_type() == dtype && y.size(-1) == Hout && y.stride(-1) == 1 &&
                  (packed ? y.dim() == 2 && y.size(0) == x_in.size(0)
                          : y.dim() == 3 && y.size(0) == T && y.size(1) == B &&
                                y.stride(0) == B * y.stride(1)),
              "cnnlstm_fast cpu backend: the output must match x's rows and h0's width, rows "
              "evenly spaced, got ", y.sizes(), " with strides ", y.strides());
  const Tensor& x = x_in;  // any strides: read where it lies (GxSource)
  const Tensor w = w_ih.contiguous();
  const Tensor bias = present(gx_bias) ? gx_bias->contiguous() : Tensor();
  auto [h, c, act, h_prev, extra] =
      run_forward(cell, dtype, T, B, G, h0, c0, w_hh, w_hr, b_hn, steps, reverse, false, mode,
                  y, [&](auto zero) { return GxSource<decltype(zero)>(x, w, bias, G, B, steps); });
  return {h, c};
}

namespace {

// Inference of one layer and direction straight from its input: recurrence_forward with
// G_x = x W_ih^T + gx_bias computed a chunk of steps at a time (GxSource), never whole.
// x is padded (T, B, I), or with batch_sizes a PackedSequence's data (N, I); y has x's
// rows.
std::tuple<Tensor, Tensor, Tensor> recurrence_forward_from_input(
    c10::string_view cell_name, const Tensor& x, const Tensor& w_ih,
    const c10::optional<Tensor>& gx_bias, const Tensor& h0, const c10::optional<Tensor>& c0,
    const Tensor& w_hh, const c10::optional<Tensor>& w_hr, const c10::optional<Tensor>& b_hn,
    bool reverse, c10::string_view kernel_name, const c10::optional<Tensor>& batch_sizes) {
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  if (!shape.empty()) shape.back() = h0.size(-1);
  Tensor y = empty_large(shape, h0.options());
  auto [h, c] = forward_from_input_into(cell_name, x, w_ih, gx_bias, h0, c0, w_hh, w_hr, b_hn,
                                        reverse, kernel_name, batch_sizes, y);
  return {y, h, c};
}

// The backward of the persistent path (see above): bit for bit the per-step path's.
bool persistent_backward(PersistentMode mode, Cell cell, const StepRows& steps, bool reverse,
                         int64_t B, int64_t G,
                         const Tensor& act, const Tensor& h_prev, const Tensor& extra,
                         const Tensor& w_hh, const Tensor& w_hr, const Tensor& d_y, Tensor& dh,
                         Tensor& dc, Tensor& d_gx, Tensor& d_gh) {
  const int64_t T = steps.steps();
  const std::vector<int64_t>& rows = steps.rows;
  const int gates = kGates[cell];
  const int64_t H = G / gates;
  const int team = persistent_team(mode, T, B, G, H, w_hr.defined());
  if (team == 0) return false;
  // W_hh's columns [j0, j1) as B (G x span) of dh = dG W_hh, packed by their owner.
  std::vector<Tensor> packed(team);
  for (int i = 0; i < team; ++i) {
    const auto [j0, j1] = unit_slice(H, i, team);
    packed[i] = empty_large({packed_size(G, j1 - j0)}, act.options());
  }
  const auto& kernels = pointwise_kernels<float>();
  SpinBarrier barrier;
  const bool ran = run_on_team(team, [&](int i) {
    const auto [j0, j1] = unit_slice(H, i, team);
    const int64_t span = j1 - j0;
    float* const w = packed[i].data_ptr<float>();
    pack_b(G, span, w_hh.const_data_ptr<float>() + j0, H, 1, w);
    BackwardStep<float> s{};
    s.hidden = H;
    s.col_begin = j0;
    s.col_end = j1;
    s.dh = dh.data_ptr<float>();
    s.dc = dc.defined() ? dc.data_ptr<float>() : nullptr;
    // Zeroes this thread's units of every gate in rows [n, B) of a (B, G) slab.
    auto zero_units = [&](float* slab, int64_t n) {
      for (int64_t r = n; r < B; ++r) {
        for (int q = 0; q < gates; ++q) {
          std::memset(slab + r * G + q * H + j0, 0, span * sizeof(float));
        }
      }
    };
    for (int64_t step = 0; step < T; ++step) {
      const int64_t t = reverse ? step : T - 1 - step;
      const int64_t n = rows[t];
      const int64_t r0 = steps.first[t];  // the step's first row
      s.d_gx = d_gx.data_ptr<float>() + r0 * G;
      s.d_gh = d_gh.data_ptr<float>() + r0 * G;
      if (!steps.packed) {
        zero_units(s.d_gx, n);
        if (cell == kGru) zero_units(s.d_gh, n);
      }
      if (n == 0) continue;  // every thread skips the step: no barrier
      s.rows = n;
      s.act = act.const_data_ptr<float>() + r0 * G;
      s.extra = extra.numel() > 0 ? extra.const_data_ptr<float>() + r0 * H : nullptr;
      s.h_prev = h_prev.const_data_ptr<float>() + r0 * H;
      s.d_y = d_y.const_data_ptr<float>() + r0 * H;
      kernels.backward[cell](s);
      barrier.wait(team);  // dG[t] complete
      // GRU: the pointwise pass left d_h * z in dh; the recurrent part adds to it.
      packed_gemm_block_avx512(n, (span + kPanelWidth - 1) / kPanelWidth, span, G, s.d_gh, G,
                               1, w, G * kPanelWidth, nullptr, cell == kGru ? 1.0f : 0.0f,
                               s.dh + j0, H);
    }
  });
  if (!ran) return false;
  persistent_backward_count.fetch_add(1, std::memory_order_relaxed);
  return true;
}

// The saved tensors, d_y and the gradients: (T, B, width) padded or (N, width) packed
// (steps).
template <typename scalar_t>
void backward_loop(PersistentMode mode, Cell cell, const StepRows& steps, bool reverse,
                   int64_t B, int64_t G, const Tensor& act,
                   const Tensor& h_prev, const Tensor& extra, const Tensor& w_hh,
                   const Tensor& w_hr, const Tensor& d_y, Tensor& dh, Tensor& dc, Tensor& d_gx,
                   Tensor& d_gh, Tensor& dh_all, Tensor& m_all) {
  const int64_t T = steps.steps();
  const std::vector<int64_t>& rows = steps.rows;
  const int64_t H = G / kGates[cell], Hout = dh.size(1);
  const bool proj = w_hr.defined();
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (persistent_backward(mode, cell, steps, reverse, B, G, act, h_prev, extra, w_hh, w_hr, d_y,
                            dh, dc, d_gx, d_gh)) {
      return;
    }
  }
  const auto& kernels = pointwise_kernels<scalar_t>();
  Tensor d_m = proj ? at::empty({B, H}, act.options()) : Tensor();

  BackwardStep<scalar_t> s{};
  s.hidden = H;
  s.col_begin = 0;
  s.col_end = H;
  s.dh = dh.data_ptr<scalar_t>();
  s.dc = dc.defined() ? dc.data_ptr<scalar_t>() : nullptr;
  s.d_m = proj ? d_m.data_ptr<scalar_t>() : nullptr;
  // dh = dG W_hh and d_m = dh W_hr: the weights applied transposed.
  const StepWeight<scalar_t> recurrent(w_hh.t(), B);
  const std::optional<StepWeight<scalar_t>> projection =
      proj ? std::make_optional<StepWeight<scalar_t>>(w_hr.t(), B) : std::nullopt;
  for (int64_t step = 0; step < T; ++step) {
    const int64_t t = reverse ? step : T - 1 - step;
    const int64_t n = rows[t];
    const int64_t r0 = steps.first[t];  // the step's first row
    s.d_gx = d_gx.data_ptr<scalar_t>() + r0 * G;
    s.d_gh = d_gh.data_ptr<scalar_t>() + r0 * G;
    scalar_t* dh_all_t = proj ? dh_all.data_ptr<scalar_t>() + r0 * Hout : nullptr;
    s.m = proj ? m_all.data_ptr<scalar_t>() + r0 * H : nullptr;
    if (!steps.packed) {  // packed: the step's rows are all active
      zero_tail(s.d_gx, n, B, G);
      if (cell == kGru) zero_tail(s.d_gh, n, B, G);
      if (proj) {
        zero_tail(dh_all_t, n, B, Hout);
        zero_tail(s.m, n, B, H);
      }
    }
    if (n == 0) continue;
    s.rows = n;
    s.act = act.const_data_ptr<scalar_t>() + r0 * G;
    s.extra = extra.numel() > 0 ? extra.const_data_ptr<scalar_t>() + r0 * H : nullptr;
    s.h_prev = h_prev.const_data_ptr<scalar_t>() + r0 * Hout;
    s.d_y = d_y.const_data_ptr<scalar_t>() + r0 * Hout;
    if (proj) {
      kernels.add(n * Hout, s.dh, s.d_y, dh_all_t);
      projection->apply(n, dh_all_t, 0, d_m.data_ptr<scalar_t>());
    }
    kernels.backward[cell](s);
    // GRU: the pointwise pass left d_h * z in dh; the recurrent part adds to it.
    recurrent.apply(n, s.d_gh, cell == kGru ? 1 : 0, s.dh);
  }
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> recurrence_backward(
    c10::string_view cell_name, const Tensor& act_in, const Tensor& h_prev_in,
    const c10::optional<Tensor>& extra_in, const Tensor& w_hh_in,
    const c10::optional<Tensor>& w_hr_in, const c10::optional<Tensor>& batch_sizes,
    bool reverse, const Tensor& d_y_in, const Tensor& d_hT, const c10::optional<Tensor>& d_cT,
    c10::string_view kernel_name, bool /*pdl*/, bool /*experimental*/) {
  const Cell cell = parse_cell(cell_name);
  const PersistentMode mode = persistent_mode(kernel_name);
  // packed: act is (N, G), a PackedSequence's rows (as are h_prev, extra, d_y and d_gx)
  const bool packed = act_in.dim() == 2 && present(batch_sizes);
  TORCH_CHECK(act_in.dim() == 3 || packed, "cnnlstm_fast cpu backend: act must be 3-D, or "
              "2-D with batch_sizes, got ", act_in.dim(), "-D");
  const auto dtype = act_in.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble,
              "cnnlstm_fast cpu backend supports float32 and float64, got ", dtype);
  const StepRows steps = step_rows(act_in, batch_sizes, packed);
  const int64_t T = steps.steps(), G = act_in.size(-1), B = steps.batch;
  const int64_t H = G / kGates[cell];
  const bool proj = present(w_hr_in);
  const int64_t Hout = proj ? w_hr_in->size(0) : H;
  const int64_t N = steps.first[T];
  auto shape = [&](int64_t width) {
    return packed ? std::vector<int64_t>{N, width} : std::vector<int64_t>{T, B, width};
  };
  auto check_rows = [&](const Tensor& t, const char* name, int64_t width) {
    const auto want = shape(width);
    TORCH_CHECK(t.device().is_cpu(), "cnnlstm_fast cpu backend: ", name,
                " must be a CPU tensor, got one on ", t.device());
    TORCH_CHECK(t.scalar_type() == dtype, "cnnlstm_fast cpu backend: ", name,
                " must have dtype ", dtype, " (that of act), got ", t.scalar_type());
    TORCH_CHECK(t.sizes().equals(want), "cnnlstm_fast cpu backend: ", name, " must have shape ",
                c10::IntArrayRef(want), ", got ", t.sizes());
  };
  check_rows(h_prev_in, "h_prev", Hout);
  check_tensor(w_hh_in, "w_hh", dtype, {G, Hout});
  if (proj) check_tensor(*w_hr_in, "w_hr", dtype, {Hout, H});
  check_rows(d_y_in, "d_y", Hout);
  check_tensor(d_hT, "d_hT", dtype, {B, Hout});
  if (cell == kLstm || cell == kGru) {
    TORCH_CHECK(present(extra_in), "extra must be given for ", std::string(cell_name));
    check_rows(*extra_in, "extra", H);
  }
  if (present(d_cT)) check_tensor(*d_cT, "d_cT", dtype, {B, H});

  const Tensor act = act_in.contiguous(), h_prev = h_prev_in.contiguous();
  const Tensor extra = present(extra_in) ? extra_in->contiguous() : at::empty({0}, act.options());
  const Tensor w_hh = w_hh_in.contiguous(), d_y = d_y_in.contiguous();
  const Tensor w_hr = proj ? w_hr_in->contiguous() : Tensor();
  const auto opts = act.options();
  Tensor dh = d_hT.clone(at::MemoryFormat::Contiguous);
  Tensor dc = cell != kLstm       ? at::empty({0}, opts)
              : present(d_cT) ? d_cT->clone(at::MemoryFormat::Contiguous)
                              : at::zeros({B, H}, opts);
  Tensor d_gx = empty_large(shape(G), opts);
  Tensor d_gh = cell == kGru ? empty_large(shape(G), opts) : d_gx;
  Tensor dh_all = proj ? empty_large(shape(Hout), opts) : Tensor();
  Tensor m_all = proj ? empty_large(shape(H), opts) : Tensor();
  Tensor dc_state = cell == kLstm ? dc : Tensor();
  AT_DISPATCH_FLOATING_TYPES(dtype, "cnnlstm_fast_recurrence_backward", [&] {
    backward_loop<scalar_t>(mode, cell, steps, reverse, B, G, act, h_prev, extra, w_hh, w_hr, d_y,
                            dh, dc_state, d_gx, d_gh, dh_all, m_all);
  });
  // dW = dG^T h_prev as linear(dG^T, h_prev^T): transposed views, our GEMM where in use.
  Tensor d_w_hh =
      cnnlstm_fast::cpu::linear(d_gh.view({N, G}).t(), h_prev.view({N, Hout}).t(), {});
  Tensor d_w_hr = proj ? cnnlstm_fast::cpu::linear(dh_all.view({N, Hout}).t(),
                                                   m_all.view({N, H}).t(), {})
                       : at::empty({0}, opts);
  Tensor d_b_hn = cell == kGru ? at::sum(d_gh.view({N, G}).narrow(1, 2 * H, H), {0})
                               : at::empty({0}, opts);
  return {d_gx, dh, dc, d_w_hh, d_w_hr, d_b_hn};
}

}  // namespace

PersistentRuns persistent_runs() {
  return {persistent_forward_count.load(), persistent_backward_count.load()};
}

}  // namespace cnnlstm_fast::cpu

// kernel_name selects the kernel: on CPU "auto", "per_step" or "persistent" (persistent_mode
// above; the cpu backend passes cnnlstm_fast.backends.cpu.get_kernel()), on CUDA among the
// cuda kernels (csrc/recurrence_cuda.cpp; the cuda backend passes what
// cnnlstm_fast/experimental.py selects). pdl and experimental are the cuda kernels' only:
// the cpu kernels take them and ignore them. Not `kernel`: inductor passes an op's
// arguments by keyword to a function whose first parameter is `kernel`.
TORCH_LIBRARY_FRAGMENT(cnnlstm_fast, m) {
  m.def(
      "recurrence_forward(str cell, Tensor gx, Tensor h0, Tensor? c0, Tensor w_hh, "
      "Tensor? w_hr, Tensor? b_hn, Tensor? batch_sizes, bool reverse, bool need_saved, "
      "str kernel_name=\"auto\", bool pdl=False, bool experimental=False) "
      "-> (Tensor y, Tensor h_T, Tensor c_T, Tensor act, Tensor h_prev, Tensor extra)");
  m.def(
      "recurrence_forward_from_input(str cell, Tensor x, Tensor w_ih, Tensor? gx_bias, "
      "Tensor h0, Tensor? c0, Tensor w_hh, Tensor? w_hr, Tensor? b_hn, bool reverse, "
      "str kernel_name=\"auto\", Tensor? batch_sizes=None) "
      "-> (Tensor y, Tensor h_T, Tensor c_T)");
  m.def(
      "recurrence_backward(str cell, Tensor act, Tensor h_prev, Tensor? extra, Tensor w_hh, "
      "Tensor? w_hr, Tensor? batch_sizes, bool reverse, Tensor d_y, Tensor d_hT, "
      "Tensor? d_cT, str kernel_name=\"auto\", bool pdl=False, bool experimental=False) "
      "-> (Tensor d_gx, Tensor dh0, Tensor dc0, Tensor d_w_hh, Tensor d_w_hr, Tensor d_b_hn)");
}

TORCH_LIBRARY_IMPL(cnnlstm_fast, CPU, m) {
  m.impl("recurrence_forward", &cnnlstm_fast::cpu::recurrence_forward);
  m.impl("recurrence_forward_from_input", &cnnlstm_fast::cpu::recurrence_forward_from_input);
  m.impl("recurrence_backward", &cnnlstm_fast::cpu::recurrence_backward);
}
