// cnnlstm_fast::pad_rows: the packed rows of a PackedSequence layer (N, F) scattered to
// their flat positions of the padded (T * B, F) layout, zeros elsewhere: the module's
// packed-to-padded step before each recurrence (cnnlstm_fast/nn/rnn.py, _PackedLayout).
// cnnlstm_fast::pack_rows is its inverse (the rows at those positions gathered): each
// is the other's gradient. cnnlstm_fast::cat_features joins a bidirectional layer's two
// outputs along the features (torch.cat(dim=-1)) into a cached buffer likewise.
//
// Why an op: in PyTorch ops it is new_zeros + index_copy_, whose (T * B, F) output is
// fresh memory on every call, which glibc hands over unmapped above its mmap threshold:
// zeroing it faulted it in a page at a time, a seventh of a packed BiGRU's inference on
// the 2-core VM. Here the buffer comes from the cpu backend's block cache (alloc.h) and
// each thread zeroes and fills the output rows it owns in one pass.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <cstring>

#include "alloc.h"

namespace cnnlstm_fast::cpu {

using at::Tensor;

Tensor pad_rows(const Tensor& data, const Tensor& index, int64_t rows) {
  TORCH_CHECK(data.dim() == 2, "cnnlstm_fast::pad_rows: data must be 2-D (N, F), got ",
              data.dim(), "-D");
  TORCH_CHECK(index.dim() == 1 && index.size(0) == data.size(0) &&
                  index.scalar_type() == at::kLong,
              "cnnlstm_fast::pad_rows: index must be int64 of shape (", data.size(0),
              "), got ", index.scalar_type(), " of shape ", index.sizes());
  TORCH_CHECK(rows >= data.size(0), "cnnlstm_fast::pad_rows: rows (", rows,
              ") must be at least the number of data rows (", data.size(0), ")");
  const Tensor src = data.contiguous();
  const Tensor where = index.contiguous();
  Tensor out = empty_large({rows, data.size(1)}, data.options());
  const int64_t n = src.size(0);
  const size_t row_bytes = static_cast<size_t>(data.size(1)) * data.element_size();
  // source row of each output row (-1: a padding row), so each thread writes the output
  // rows of its range once, in order
  std::vector<int64_t> source(rows, -1);
  const int64_t* idx = where.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(idx[i] >= 0 && idx[i] < rows, "cnnlstm_fast::pad_rows: index ", idx[i],
                " out of range for ", rows, " rows");
    source[idx[i]] = i;
  }
  const auto* in = static_cast<const char*>(src.const_data_ptr());
  auto* dst = static_cast<char*>(out.data_ptr());
  at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      if (source[r] < 0) {
        std::memset(dst + r * row_bytes, 0, row_bytes);
      } else {
        std::memcpy(dst + r * row_bytes, in + source[r] * row_bytes, row_bytes);
      }
    }
  });
  return out;
}

Tensor pack_rows(const Tensor& padded, const Tensor& index) {
  TORCH_CHECK(padded.dim() == 2, "cnnlstm_fast::pack_rows: padded must be 2-D (rows, F), got ",
              padded.dim(), "-D");
  TORCH_CHECK(index.dim() == 1 && index.scalar_type() == at::kLong,
              "cnnlstm_fast::pack_rows: index must be 1-D int64, got ", index.scalar_type(),
              " of shape ", index.sizes());
  const Tensor src = padded.contiguous();
  const Tensor where = index.contiguous();
  const int64_t n = where.size(0), rows = src.size(0);
  Tensor out = empty_large({n, src.size(1)}, src.options());
  const size_t row_bytes = static_cast<size_t>(src.size(1)) * src.element_size();
  const int64_t* idx = where.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(idx[i] >= 0 && idx[i] < rows, "cnnlstm_fast::pack_rows: index ", idx[i],
                " out of range for ", rows, " rows");
  }
  const auto* in = static_cast<const char*>(src.const_data_ptr());
  auto* dst = static_cast<char*>(out.data_ptr());
  at::parallel_for(0, n, 64, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      std::memcpy(dst + i * row_bytes, in + idx[i] * row_bytes, row_bytes);
    }
  });
  return out;
}

Tensor cat_features(at::TensorList parts) {
  TORCH_CHECK(!parts.empty(), "cnnlstm_fast::cat_features: no tensors");
  const Tensor& first = parts[0];
  TORCH_CHECK(first.dim() >= 1, "cnnlstm_fast::cat_features: tensors must have a feature dimension");
  std::vector<Tensor> src;
  std::vector<size_t> width_bytes;
  int64_t features = 0;
  for (const Tensor& part : parts) {
    TORCH_CHECK(part.dim() == first.dim() &&
                    part.sizes().slice(0, part.dim() - 1) == first.sizes().slice(0, first.dim() - 1) &&
                    part.scalar_type() == first.scalar_type() && part.device() == first.device(),
                "cnnlstm_fast::cat_features: tensors must match in dtype, device and all but the "
                "last dimension, got ", first.sizes(), " ", first.scalar_type(), " and ",
                part.sizes(), " ", part.scalar_type());
    src.push_back(part.contiguous());
    width_bytes.push_back(static_cast<size_t>(part.size(-1)) * part.element_size());
    features += part.size(-1);
  }
  std::vector<int64_t> shape(first.sizes().begin(), first.sizes().end());
  shape.back() = features;
  Tensor out = empty_large(shape, first.options());
  const int64_t rows = features == 0 ? 0 : out.numel() / features;
  const size_t out_row = static_cast<size_t>(features) * first.element_size();
  auto* dst = static_cast<char*>(out.data_ptr());
  at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      size_t offset = 0;
      for (size_t p = 0; p < src.size(); ++p) {
        std::memcpy(dst + r * out_row + offset,
                    static_cast<const char*>(src[p].const_data_ptr()) + r * width_bytes[p],
                    width_bytes[p]);
        offset += width_bytes[p];
      }
    }
  });
  return out;
}

}  // namespace cnnlstm_fast::cpu

TORCH_LIBRARY_FRAGMENT(cnnlstm_fast, m) {
  m.def("pad_rows(Tensor data, Tensor index, int rows) -> Tensor");
  m.def("pack_rows(Tensor padded, Tensor index) -> Tensor");
  m.def("cat_features(Tensor[] parts) -> Tensor");
}

TORCH_LIBRARY_IMPL(cnnlstm_fast, CPU, m) {
  m.impl("pad_rows", &cnnlstm_fast::cpu::pad_rows);
  m.impl("pack_rows", &cnnlstm_fast::cpu::pack_rows);
  m.impl("cat_features", &cnnlstm_fast::cpu::cat_features);
}
