// The inference recurrence of recurrence.cpp for the other CPU ops that write a layer's
// output where it belongs (directions.cpp: both directions into one output).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>
#include <c10/util/string_view.h>

#include <tuple>

namespace cnnlstm_fast::cpu {

// One layer and direction in inference, G_x = x W_ih^T + gx_bias computed a chunk of
// steps at a time, Y written into y: the op recurrence_forward_from_input's work with
// the output given. x is padded (T, B, I), or with batch_sizes a PackedSequence's data
// (N, I), in any strides (read where it lies, never copied). y is (T, B, Hout) or (N, Hout) with unit
// inner stride and evenly spaced rows: a column block of a wider output is fine.
// Returns (h_T, c_T); c_T is empty for the cells without a cell state.
std::tuple<at::Tensor, at::Tensor> forward_from_input_into(
    c10::string_view cell, const at::Tensor& x, const at::Tensor& w_ih,
    const c10::optional<at::Tensor>& gx_bias, const at::Tensor& h0,
    const c10::optional<at::Tensor>& c0, const at::Tensor& w_hh,
    const c10::optional<at::Tensor>& w_hr, const c10::optional<at::Tensor>& b_hn, bool reverse,
    c10::string_view kernel_name, const c10::optional<at::Tensor>& batch_sizes, at::Tensor& y);

}  // namespace cnnlstm_fast::cpu
