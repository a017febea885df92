// cnnlstm_fast::linear's CPU kernel (linear.cpp), for the recurrence's own weight
// gradients as well, and the weight packing every user of packed_gemm shares.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

namespace cnnlstm_fast::cpu {

// A float32 weight W (n x k, any strides) packed for packed_gemm as B = W^T (gemm.h).
at::Tensor pack_weight(const at::Tensor& weight);

// input @ weight^T + bias; any strides. Our AVX-512 GEMM for float32 where in use
// (gemm.h), else at::linear.
at::Tensor linear(const at::Tensor& input, const at::Tensor& weight,
                  const c10::optional<at::Tensor>& bias);

}  // namespace cnnlstm_fast::cpu
