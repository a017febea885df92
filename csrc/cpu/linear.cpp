// cnnlstm_fast::linear: input @ weight^T + bias for float32 CPU tensors through
// packed_gemm (gemm.h), the input projection G_x = x W_ih^T + b of the `cpu` backend and
// the GEMMs of its gradient (cnnlstm_fast/backends/cpu.py). Any strides: a transposed
// view as input or weight costs no copy (the gradient's dW = dG^T x reads both so).
// Where packed_gemm is not in use (set_gemm_choice, the CPU) it is at::linear.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/linear.h>
#include <c10/util/accumulate.h>
#include <torch/library.h>

#include "alloc.h"
#include "gemm.h"
#include "linear.h"

namespace cnnlstm_fast::cpu {

using at::Tensor;

Tensor pack_weight(const Tensor& weight) {
  const int64_t n = weight.size(0), k = weight.size(1);
  Tensor packed = empty_large({packed_size(k, n)}, weight.options());
  pack_b(k, n, weight.const_data_ptr<float>(), weight.stride(1), weight.stride(0),
         packed.data_ptr<float>());
  return packed;
}

Tensor linear(const Tensor& input, const Tensor& weight, const c10::optional<Tensor>& bias_in) {
  const bool has_bias = bias_in.has_value() && bias_in->defined();
  TORCH_CHECK(input.dim() >= 1, "cnnlstm_fast::linear: input must have at least 1 dimension");
  TORCH_CHECK(weight.dim() == 2, "cnnlstm_fast::linear: weight must be 2-D (out, in), got ",
              weight.dim(), "-D");
  TORCH_CHECK(input.size(-1) == weight.size(1), "cnnlstm_fast::linear: input's last dimension (",
              input.size(-1), ") must equal weight's second (", weight.size(1), ")");
  TORCH_CHECK(!has_bias || (bias_in->dim() == 1 && bias_in->size(0) == weight.size(0)),
              "cnnlstm_fast::linear: bias must have shape (", weight.size(0), "), got ",
              has_bias ? bias_in->sizes() : c10::IntArrayRef{});
  const bool all_float = input.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat &&
                         (!has_bias || bias_in->scalar_type() == at::kFloat);
  if (!all_float || !use_packed_gemm()) return at::linear(input, weight, bias_in);

  const int64_t k = weight.size(1), n = weight.size(0);
  // the rows as a product, not reshape({-1, k}): that is ambiguous for k == 0
  const int64_t rows = c10::multiply_integers(input.sizes().begin(), input.sizes().end() - 1);
  const Tensor a = input.dim() == 2 ? input : input.reshape({rows, k});
  const int64_t m = a.size(0);
  const Tensor packed = pack_weight(weight);
  const Tensor bias = has_bias ? bias_in->contiguous() : Tensor();
  Tensor out = empty_large({m, n}, input.options());
  packed_gemm(m, n, k, a.const_data_ptr<float>(), a.stride(0), a.stride(1),
              packed.const_data_ptr<float>(), has_bias ? bias.const_data_ptr<float>() : nullptr,
              0.0f, out.data_ptr<float>(), n);
  std::vector<int64_t> shape(input.sizes().begin(), input.sizes().end());
  shape.back() = n;
  return out.view(shape);
}

}  // namespace cnnlstm_fast::cpu

TORCH_LIBRARY_FRAGMENT(cnnlstm_fast, m) {
  m.def("linear(Tensor input, Tensor weight, Tensor? bias) -> Tensor");
}

TORCH_LIBRARY_IMPL(cnnlstm_fast, CPU, m) {
  m.impl("linear", &cnnlstm_fast::cpu::linear);
}
