// cnnlstm_fast::conv2seq_projection: the input projection of a recurrent stack's first
// layer, G_x = seq W_ih^T + b, computed straight from a convolution's RAW output x, with
// seq = reduce_H(activation(x * scale[c] + shift[c])) laid out as the recurrence's
// time-major sequence (cnnlstm_fast/nn/conv2seq.py, ConvToSequence).
//
// One pass, no activated sequence in memory: the per-channel affine (a batch norm folded
// to scale/shift), the activation and the height reduction are applied while the GEMM's
// row tiles of A are packed (packed_gemm's K-blocked layout, gemm.h), and each tile then
// runs through every column panel of W_ih for all directions at once, so x is read
// once whatever the number of directions. A tile is 12 consecutive steps of one sequence:
// x (B, C, T) holds them adjacent per channel (the conv's own layout; any strides), and
// their rows of G_x lie B * G apart in the (T, B, G) output, one stride per tile.
//
// x: (B, C, T), or (B, C, H, W) with reduce "mean" / "max" over H (the sequence along W).
// w_ih: (D * G, C), the D directions' weights stacked; bias: (D * G) or none.
// Returns G_x as D tensors (T, B, G), one per direction, each contiguous: the layout the
// recurrence op reads (separate tensors, so no gradient is ever stacked or sliced). Fused for float32 where packed_gemm runs (AVX-512F); other
// dtypes and CPUs get the same result from ATen ops (composition below).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/add.h>
#include <ATen/ops/amax.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/gelu.h>
#include <ATen/ops/hardtanh.h>
#include <ATen/ops/leaky_relu.h>
#include <ATen/ops/linear.h>
#include <ATen/ops/relu.h>
#include <ATen/ops/tanh.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <tuple>
#include <vector>

#include "alloc.h"
#include "gemm.h"

namespace cnnlstm_fast::cpu {
namespace {

using at::Tensor;

constexpr int64_t kTile = 12;        // rows per micro-kernel tile (gemm_avx512.cpp)
constexpr int64_t kRowBlock = 96;    // rows (steps of one sequence) per task
constexpr int64_t kKBlock = 256;     // channels per block of K

enum class Act { kNone, kRelu, kLeakyRelu, kHardtanh, kGelu, kTanh };

Act parse_activation(c10::string_view name) {
  if (name == "none") return Act::kNone;
  if (name == "relu") return Act::kRelu;
  if (name == "leaky_relu") return Act::kLeakyRelu;
  if (name == "hardtanh") return Act::kHardtanh;
  if (name == "gelu") return Act::kGelu;
  if (name == "tanh") return Act::kTanh;
  TORCH_CHECK(false, "cnnlstm_fast::conv2seq_projection: activation must be one of 'none', "
              "'relu', 'leaky_relu', 'hardtanh', 'gelu', 'tanh', got '", name, "'");
}

// torch's defaults: leaky_relu's negative_slope 0.01, hardtanh's [-1, 1], exact gelu.
template <Act A>
inline float activate(float v) {
  if constexpr (A == Act::kRelu) return v > 0.0f ? v : 0.0f;
  if constexpr (A == Act::kLeakyRelu) return v > 0.0f ? v : 0.01f * v;
  if constexpr (A == Act::kHardtanh) return std::min(1.0f, std::max(-1.0f, v));
  if constexpr (A == Act::kGelu) return 0.5f * v * (1.0f + std::erf(v * 0.70710678118654752f));
  if constexpr (A == Act::kTanh) return std::tanh(v);
  return v;
}

struct Prologue {
  const float* x;
  int64_t sb, sc, sh, st;  // x's strides: batch, channel, height (reduce), step
  int64_t height;          // 1 without a reduction
  bool max;                // reduce by max (else mean)
  const float* scale;      // per channel, or null (1)
  const float* shift;      // per channel, or null (0)
};

// Rows r in [0, rows) = steps t0 + r of sequence b, channels [k0, k0 + kc): out[kk * rows
// + r] (the K-blocked A layout of gemm.cpp's blocked_task).
template <Act A>
void pack_tile(const Prologue& p, int64_t b, int64_t t0, int64_t rows, int64_t k0, int64_t kc,
               float* out) {
  for (int64_t kk = 0; kk < kc; ++kk) {
    const int64_t c = k0 + kk;
    const float s = p.scale ? p.scale[c] : 1.0f, h = p.shift ? p.shift[c] : 0.0f;
    const float* src = p.x + b * p.sb + c * p.sc + t0 * p.st;
    float* dst = out + kk * rows;
    if (p.height == 1) {
      if (p.st == 1) {
        for (int64_t r = 0; r < rows; ++r) dst[r] = activate<A>(src[r] * s + h);
      } else {
        for (int64_t r = 0; r < rows; ++r) dst[r] = activate<A>(src[r * p.st] * s + h);
      }
      continue;
    }
    // heights outside, rows inside: each pass over the tile's rows is a plain loop
    // (vectorised), not a scalar walk down the height of every row
    for (int64_t r = 0; r < rows; ++r) dst[r] = activate<A>(src[r * p.st] * s + h);
    for (int64_t y = 1; y < p.height; ++y) {
      const float* row = src + y * p.sh;
      if (p.max) {
        for (int64_t r = 0; r < rows; ++r) {
          const float v = activate<A>(row[r * p.st] * s + h);
          dst[r] = v > dst[r] || v != v ? v : dst[r];  // NaN wins, as amax has it
        }
      } else {
        for (int64_t r = 0; r < rows; ++r) dst[r] += activate<A>(row[r * p.st] * s + h);
      }
    }
    if (!p.max) {
      const float n = static_cast<float>(p.height);
      for (int64_t r = 0; r < rows; ++r) dst[r] /= n;
    }
  }
}

using PackFn = void (*)(const Prologue&, int64_t, int64_t, int64_t, int64_t, int64_t, float*);

PackFn pack_fn(Act a) {
  switch (a) {
    case Act::kRelu: return pack_tile<Act::kRelu>;
    case Act::kLeakyRelu: return pack_tile<Act::kLeakyRelu>;
    case Act::kHardtanh: return pack_tile<Act::kHardtanh>;
    case Act::kGelu: return pack_tile<Act::kGelu>;
    case Act::kTanh: return pack_tile<Act::kTanh>;
    default: return pack_tile<Act::kNone>;
  }
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

void check_channels(const c10::optional<Tensor>& t, const char* name, int64_t channels,
                    at::ScalarType dtype) {
  if (!t.has_value() || !t->defined()) return;
  TORCH_CHECK(t->dim() == 1 && t->size(0) == channels && t->scalar_type() == dtype,
              "cnnlstm_fast::conv2seq_projection: ", name, " must be ", dtype, " of shape (",
              channels, "), got ", t->scalar_type(), " of shape ", t->sizes());
}

// The same result in ATen ops (other dtypes, CPUs without AVX-512, the GEMM set to "blas"):
// the activated sequence materialised, then one linear for all directions.
std::vector<Tensor> composition(const Tensor& x, const c10::optional<Tensor>& scale,
                   const c10::optional<Tensor>& shift, Act act, c10::string_view reduce,
                   const Tensor& w_ih, const c10::optional<Tensor>& bias, int64_t directions) {
  std::vector<int64_t> channel(x.dim(), 1);
  channel[1] = x.size(1);
  Tensor v = x;
  if (scale.has_value() && scale->defined()) v = at::mul(v, scale->view(channel));
  if (shift.has_value() && shift->defined()) v = at::add(v, shift->view(channel));
  switch (act) {
    case Act::kRelu: v = at::relu(v); break;
    case Act::kLeakyRelu: v = at::leaky_relu(v, 0.01); break;
    case Act::kHardtanh: v = at::hardtanh(v, -1.0, 1.0); break;
    case Act::kGelu: v = at::gelu(v); break;
    case Act::kTanh: v = at::tanh(v); break;
    default: break;
  }
  if (reduce == "mean") v = v.mean(2);
  if (reduce == "max") v = v.amax(2);
  const int64_t T = v.size(2), B = v.size(0), G = w_ih.size(0) / directions;
  const Tensor gx = at::linear(v.permute({2, 0, 1}), w_ih, bias);  // (T, B, D * G)
  std::vector<Tensor> out;
  for (const Tensor& part : gx.view({T, B, directions, G}).unbind(2)) out.push_back(part.contiguous());
  return out;
}

// batch_order (B int64, a permutation) or undefined: row b of x is row batch_order[b] of
// G_x (a packed sequence's sorted order, so the recurrence reads it as it is).
Tensor batch_order(const c10::optional<Tensor>& order, int64_t batch) {
  if (!order.has_value() || !order->defined()) return Tensor();
  TORCH_CHECK(order->dim() == 1 && order->size(0) == batch && order->scalar_type() == at::kLong &&
                  order->device().is_cpu(),
              "cnnlstm_fast::conv2seq_projection: batch_order must be a CPU int64 tensor of ",
              "shape (", batch, "), got ", order->scalar_type(), " of shape ", order->sizes());
  const Tensor out = order->contiguous();
  const int64_t* p = out.const_data_ptr<int64_t>();
  std::vector<bool> seen(batch, false);
  for (int64_t b = 0; b < batch; ++b) {
    TORCH_CHECK(p[b] >= 0 && p[b] < batch && !seen[p[b]],
                "cnnlstm_fast::conv2seq_projection: batch_order must be a permutation of 0..",
                batch - 1);
    seen[p[b]] = true;
  }
  return out;
}

}  // namespace

std::vector<Tensor> conv2seq_projection(const Tensor& x, const c10::optional<Tensor>& scale_in,
                           const c10::optional<Tensor>& shift_in, c10::string_view activation,
                           c10::string_view reduce, const Tensor& w_ih,
                           const c10::optional<Tensor>& bias_in, int64_t directions,
                           const c10::optional<Tensor>& batch_order_in) {
  const bool reduced = reduce != "none";
  TORCH_CHECK(reduce == "none" || reduce == "mean" || reduce == "max",
              "cnnlstm_fast::conv2seq_projection: reduce must be 'none', 'mean' or 'max', got '",
              reduce, "'");
  TORCH_CHECK(x.dim() == (reduced ? 4 : 3), "cnnlstm_fast::conv2seq_projection: x must be ",
              reduced ? "(B, C, H, W) with a reduction" : "(B, C, T)", ", got shape ", x.sizes());
  TORCH_CHECK(x.scalar_type() == w_ih.scalar_type(),
              "cnnlstm_fast::conv2seq_projection: x and w_ih must have one dtype, got ",
              x.scalar_type(), " and ", w_ih.scalar_type());
  const int64_t B = x.size(0), C = x.size(1), T = x.size(-1);
  const int64_t height = reduced ? x.size(2) : 1;
  TORCH_CHECK(directions >= 1 && w_ih.dim() == 2 && w_ih.size(1) == C &&
                  w_ih.size(0) % directions == 0,
              "cnnlstm_fast::conv2seq_projection: w_ih must be (directions * G, C) = (", directions,
              " * G, ", C, "), got ", w_ih.sizes());
  TORCH_CHECK(!reduced || height > 0, "cnnlstm_fast::conv2seq_projection: x's height (dim 2) "
              "must be at least 1 to reduce over, got shape ", x.sizes());
  const int64_t G = w_ih.size(0) / directions;
  const bool has_bias = bias_in.has_value() && bias_in->defined();
  TORCH_CHECK(!has_bias || (bias_in->dim() == 1 && bias_in->size(0) == w_ih.size(0) &&
                            bias_in->scalar_type() == x.scalar_type()),
              "cnnlstm_fast::conv2seq_projection: bias must be ", x.scalar_type(), " of shape (",
              w_ih.size(0), "), got ", has_bias ? bias_in->sizes() : c10::IntArrayRef{});
  check_channels(scale_in, "scale", C, x.scalar_type());
  check_channels(shift_in, "shift", C, x.scalar_type());
  const Act act = parse_activation(activation);
  const Tensor order = batch_order(batch_order_in, B);
  if (x.scalar_type() != at::kFloat || !use_packed_gemm()) {
    std::vector<Tensor> out = composition(x, scale_in, shift_in, act, reduce, w_ih, bias_in,
                                          directions);
    if (order.defined()) {  // row b to position order[b]: gather by the inverse
      const Tensor inverse = at::empty_like(order).scatter_(
          0, order, at::arange(B, order.options()));
      for (Tensor& part : out) part = part.index_select(1, inverse);
    }
    return out;
  }
  const int64_t* pos = order.defined() ? order.const_data_ptr<int64_t>() : nullptr;

  std::vector<Tensor> out;
  std::vector<float*> dst;
  for (int64_t d = 0; d < directions; ++d) {
    out.push_back(empty_large({T, B, G}, x.options()));
    dst.push_back(out.back().data_ptr<float>());
  }
  if (T * B * G == 0) return out;
  if (C == 0) {  // seq has no features: G_x is the bias
    for (int64_t d = 0; d < directions; ++d) {
      if (has_bias) {
        out[d].copy_(bias_in->narrow(0, d * G, G).view({1, 1, G}).expand({T, B, G}));
      } else {
        out[d].zero_();
      }
    }
    return out;
  }
  const Tensor scale = scale_in.has_value() && scale_in->defined() ? scale_in->contiguous() : Tensor();
  const Tensor shift = shift_in.has_value() && shift_in->defined() ? shift_in->contiguous() : Tensor();
  const Tensor bias = has_bias ? bias_in->contiguous() : Tensor();

  // Each direction's weight packed into its own panels, the directions' panels in a row.
  const int64_t per_dir = ceil_div(G, kPanelWidth);
  const int64_t panels = directions * per_dir;
  Tensor packed = empty_large({panels * C * kPanelWidth}, w_ih.options());
  for (int64_t d = 0; d < directions; ++d) {
    const Tensor w = w_ih.narrow(0, d * G, G);
    pack_b(C, G, w.const_data_ptr<float>(), w.stride(1), w.stride(0),
           packed.data_ptr<float>() + d * per_dir * C * kPanelWidth);
  }

  Prologue p{x.const_data_ptr<float>(),
             x.stride(0),
             x.stride(1),
             reduced ? x.stride(2) : 0,
             x.stride(-1),
             height,
             reduce == "max",
             scale.defined() ? scale.const_data_ptr<float>() : nullptr,
             shift.defined() ? shift.const_data_ptr<float>() : nullptr};
  const PackFn pack = pack_fn(act);
  const float* w = packed.const_data_ptr<float>();
  const float* bp = has_bias ? bias.const_data_ptr<float>() : nullptr;
  const int64_t ldc = B * G;

  // Tasks (sequence, block of its steps, group of panels); with few row blocks the
  // panels are split in groups so that every thread has work (each group packs its rows
  // of A again: 1 / (2 * group columns) of its arithmetic).
  // Steps split evenly: in blocks of at most kRowBlock, each in tiles of at most kTile
  // (T = 26 runs tiles of 9, 9, 8 rather than 12, 12, 2, whose last is a third as fast).
  const int64_t blocks = ceil_div(T, kRowBlock);
  const int64_t block_rows = ceil_div(T, blocks);
  const int64_t row_tasks = B * blocks;
  const int64_t want = 4 * at::get_num_threads();
  const int64_t groups = std::min(panels, std::max<int64_t>(1, ceil_div(want, row_tasks)));
  const int64_t group = ceil_div(panels, groups);
  at::parallel_for(0, row_tasks * groups, 1, [&](int64_t begin, int64_t end) {
    // + 16: slack past a tile, as gemm.cpp keeps for its packing
    std::unique_ptr<float[]> buffer(new float[kRowBlock * kKBlock + 16]);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t rt = task / groups, g = task % groups;
      const int64_t b = rt / blocks, t0 = (rt % blocks) * block_rows;
      const int64_t rows = std::min(block_rows, T - t0);
      const int64_t tile = ceil_div(rows, ceil_div(rows, kTile));
      const int64_t p0 = g * group, count = std::min(group, panels - p0);
      if (count <= 0) continue;
      for (int64_t k0 = 0; k0 < C; k0 += kKBlock) {
        const int64_t kc = std::min(kKBlock, C - k0);
        for (int64_t r0 = 0; r0 < rows; r0 += tile) {
          pack(p, b, t0 + r0, std::min(tile, rows - r0), k0, kc, buffer.get() + r0 * kc);
        }
        const bool first = k0 == 0;
        for (int64_t q = p0; q < p0 + count; ++q) {
          const int64_t d = q / per_dir, col0 = (q % per_dir) * kPanelWidth;
          const float* panel = w + q * C * kPanelWidth + k0 * kPanelWidth;
          float* base = dst[d] + (pos ? pos[b] : b) * G + col0;
          for (int64_t r0 = 0; r0 < rows; r0 += tile) {
            const int64_t tr = std::min(tile, rows - r0);
            packed_gemm_block_avx512(tr, 1, std::min(kPanelWidth, G - col0), kc,
                                     buffer.get() + r0 * kc, 1, tr, panel, C * kPanelWidth,
                                     first && bp ? bp + d * G + col0 : nullptr,
                                     first ? 0.0f : 1.0f, base + (t0 + r0) * ldc, ldc);
          }
        }
      }
    }
  });
  return out;
}

// The GEMMs of the projection's backward: d_seq[b] (C x T) = sum_d W_d^T dG_d[:, b]^T and
// dW_d = sum_b dG_d[:, b]^T seq[b]^T, each as one GEMM over the whole batch (below).
// d_seq comes out as (B, C, T) contiguous, the layout of the conv output x, so the
// permute's backward is a view and the conv's backward reads it as it is; seq (B, C, T)
// may have any strides. float32 where packed_gemm runs; the module computes the same in
// PyTorch ops elsewhere.
std::tuple<Tensor, Tensor> conv2seq_projection_backward(at::TensorList grads, const Tensor& seq,
                                                         const Tensor& w_ih, bool need_seq,
                                                         bool need_w,
                                                         const c10::optional<Tensor>& order_in) {
  const int64_t D = static_cast<int64_t>(grads.size());
  TORCH_CHECK(D >= 1 && seq.dim() == 3 && w_ih.dim() == 2 && w_ih.size(0) % D == 0 &&
                  w_ih.size(1) == seq.size(1),
              "cnnlstm_fast::conv2seq_projection_backward: seq must be (B, C, T) and w_ih "
              "(D * G, C) for D gradients, got ", seq.sizes(), ", ", w_ih.sizes(), ", ", D);
  TORCH_CHECK(seq.scalar_type() == at::kFloat && w_ih.scalar_type() == at::kFloat &&
                  use_packed_gemm(),
              "cnnlstm_fast::conv2seq_projection_backward: float32 with the AVX-512 GEMM only");
  const int64_t B = seq.size(0), C = seq.size(1), T = seq.size(2), G = w_ih.size(0) / D;
  std::vector<Tensor> g;
  for (const Tensor& grad : grads) {
    TORCH_CHECK(grad.dim() == 3 && grad.size(0) == T && grad.size(1) == B && grad.size(2) == G &&
                    grad.scalar_type() == at::kFloat,
                "cnnlstm_fast::conv2seq_projection_backward: each gradient must be float32 (",
                T, ", ", B, ", ", G, "), got ", grad.sizes());
    g.push_back(grad.contiguous());
  }
  const Tensor order = batch_order(order_in, B);
  Tensor d_seq, d_w;
  if (B * T == 0 || G == 0 || C == 0) {
    return {need_seq ? at::zeros({B, C, T}, seq.options()) : Tensor(),
            need_w ? at::zeros({D * G, C}, w_ih.options()) : Tensor()};
  }
  // Whole-batch GEMMs over the T * B time-major rows of dG (K = T * B for dW), not one
  // per sequence: per-sequence products (K = T) ran at about two thirds of the rate of
  // these on the 2-core EPYC VM (45 against 64 ms for CRNN's bidirectional first layer).
  // seq is read in place (packed for the GEMM straight from its strides, never copied);
  // dX is computed time-major and written into (B, C, T) in one transposing pass.
  const int64_t* pos = order.defined() ? order.const_data_ptr<int64_t>() : nullptr;
  const auto opts = seq.options();
  if (need_seq) {  // rows (T*B x C) = sum over d of dG_d (T*B x G) . W_d (G x C)
    Tensor rows = empty_large({T * B, C}, opts);
    Tensor pw = empty_large({packed_size(G, C)}, opts);
    for (int64_t d = 0; d < D; ++d) {
      const float* w = w_ih.const_data_ptr<float>() + d * G * w_ih.stride(0);
      pack_b(G, C, w, w_ih.stride(0), w_ih.stride(1), pw.data_ptr<float>());
      packed_gemm(T * B, C, G, g[d].const_data_ptr<float>(), G, 1, pw.const_data_ptr<float>(),
                  nullptr, d == 0 ? 0.0f : 1.0f, rows.data_ptr<float>(), C);
    }
    d_seq = at::empty({B, C, T}, opts);
    const float* r = rows.const_data_ptr<float>();
    float* out = d_seq.data_ptr<float>();
    constexpr int64_t kSteps = 16;  // a block of steps per channel sweep
    at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        const int64_t row = pos ? pos[b] : b;
        for (int64_t t0 = 0; t0 < T; t0 += kSteps) {
          const int64_t t1 = std::min(T, t0 + kSteps);
          for (int64_t c = 0; c < C; ++c) {
            float* o = out + (b * C + c) * T;
            for (int64_t t = t0; t < t1; ++t) o[t] = r[(t * B + row) * C + c];
          }
        }
      }
    });
  }
  if (need_w) {  // dW_d (G x C) = dG_d^T (G x T*B) . S (T*B x C), S[t*B + pos[b]] = seq[b, :, t]
    const int64_t K = T * B, panels = (C + kPanelWidth - 1) / kPanelWidth;
    Tensor ps = empty_large({packed_size(K, C)}, opts);
    float* pk = ps.data_ptr<float>();
    const float* sp = seq.const_data_ptr<float>();
    const int64_t sb = seq.stride(0), sc = seq.stride(1), st = seq.stride(2);
    at::parallel_for(0, panels * B, 1, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t p = task / B, b = task % B, row = pos ? pos[b] : b;
        const int64_t c0 = p * kPanelWidth, width = std::min(kPanelWidth, C - c0);
        for (int64_t t = 0; t < T; ++t) {
          float* dst = pk + p * K * kPanelWidth + (t * B + row) * kPanelWidth;
          const float* src = sp + b * sb + c0 * sc + t * st;
          for (int64_t j = 0; j < width; ++j) dst[j] = src[j * sc];
          for (int64_t j = width; j < kPanelWidth; ++j) dst[j] = 0.0f;
        }
      }
    });
    d_w = at::empty({D * G, C}, w_ih.options());
    for (int64_t d = 0; d < D; ++d) {
      packed_gemm(G, C, K, g[d].const_data_ptr<float>(), 1, G, pk, nullptr, 0.0f,
                  d_w.data_ptr<float>() + d * G * C, C);
    }
  }
  return {d_seq, d_w};
}

namespace {

// The derivative of activation A at pre (a = A(pre) given for tanh).
template <Act A, typename T>
inline T derivative(T pre, T a) {
  if constexpr (A == Act::kRelu) return pre > T(0) ? T(1) : T(0);
  if constexpr (A == Act::kLeakyRelu) return pre > T(0) ? T(1) : T(0.01);
  if constexpr (A == Act::kHardtanh) return pre > T(-1) && pre < T(1) ? T(1) : T(0);
  if constexpr (A == Act::kTanh) return T(1) - a * a;
  if constexpr (A == Act::kGelu) {
    const T cdf = T(0.5) * (T(1) + std::erf(pre * T(0.70710678118654752)));
    return cdf + pre * std::exp(T(-0.5) * pre * pre) * T(0.39894228040143268);
  }
  return T(1);
}

template <Act A, typename T>
inline T activated(T pre) {
  if constexpr (A == Act::kTanh) return std::tanh(pre);
  return pre;  // only tanh's derivative reads a
}

template <Act A, typename T>
void prologue_backward(const Tensor& x, const Tensor& d_seq, const T* scale, const T* shift,
                       bool mean, Tensor& d_x, double* d_scale, double* d_shift) {
  const int64_t B = x.size(0), C = x.size(1), T_ = x.size(-1);
  const int64_t H = x.dim() == 4 ? x.size(2) : 1;
  const int64_t xb = x.stride(0), xc = x.stride(1), xh = x.dim() == 4 ? x.stride(2) : 0,
                xt = x.stride(-1);
  const int64_t gb = d_seq.stride(0), gc = d_seq.stride(1), gt = d_seq.stride(2);
  const T* xp = x.const_data_ptr<T>();
  const T* gp = d_seq.const_data_ptr<T>();
  T* dxp = d_x.defined() ? d_x.data_ptr<T>() : nullptr;  // contiguous, x's shape
  const T inv_h = mean ? T(1) / static_cast<T>(H) : T(1);
  at::parallel_for(0, C, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const T s = scale ? scale[c] : T(1), h = shift ? shift[c] : T(0);
      double acc_s = 0.0, acc_h = 0.0;
      for (int64_t b = 0; b < B; ++b) {
        for (int64_t y = 0; y < H; ++y) {
          const T* xr = xp + b * xb + c * xc + y * xh;
          const T* gr = gp + b * gb + c * gc;
          T* dr = dxp ? dxp + ((b * C + c) * H + y) * T_ : nullptr;
          T row_s = T(0), row_h = T(0);
          for (int64_t t = 0; t < T_; ++t) {
            const T v = xr[t * xt];
            const T pre = v * s + h;
            const T dp = gr[t * gt] * inv_h * derivative<A>(pre, activated<A>(pre));
            if (dr) dr[t] = dp * s;
            row_s += dp * v;
            row_h += dp;
          }
          acc_s += row_s;
          acc_h += row_h;
        }
      }
      d_scale[c] = acc_s;
      d_shift[c] = acc_h;
    }
  });
}

template <typename T>
using BackwardFn = void (*)(const Tensor&, const Tensor&, const T*, const T*, bool, Tensor&,
                            double*, double*);

template <typename T>
BackwardFn<T> backward_fn(Act a) {
  switch (a) {
    case Act::kRelu: return prologue_backward<Act::kRelu, T>;
    case Act::kLeakyRelu: return prologue_backward<Act::kLeakyRelu, T>;
    case Act::kHardtanh: return prologue_backward<Act::kHardtanh, T>;
    case Act::kGelu: return prologue_backward<Act::kGelu, T>;
    case Act::kTanh: return prologue_backward<Act::kTanh, T>;
    default: return prologue_backward<Act::kNone, T>;
  }
}

}  // namespace

// The prologue's backward in one pass over x per channel: from d_seq (B, C, T), the
// gradient of the (reduced) activated sequence, d_x (x's shape, contiguous: the conv's
// layout) = d_pre * scale, and d_scale = sum d_pre * x, d_shift = sum d_pre over all but
// the channel (accumulated in double), with d_pre = d_seq (/ H for a mean over H) *
// activation'(x * scale + shift). A max over H is not handled here (its ties need a
// count: the module's PyTorch ops do it).
std::tuple<Tensor, Tensor, Tensor> conv2seq_prologue_backward(
    const Tensor& x, const Tensor& d_seq, const c10::optional<Tensor>& scale_in,
    const c10::optional<Tensor>& shift_in, c10::string_view activation, c10::string_view reduce,
    bool need_x) {
  TORCH_CHECK(reduce == "none" || reduce == "mean",
              "cnnlstm_fast::conv2seq_prologue_backward: reduce must be 'none' or 'mean', got '",
              reduce, "'");
  TORCH_CHECK(x.dim() == (reduce == "none" ? 3 : 4) && d_seq.dim() == 3 &&
                  d_seq.size(0) == x.size(0) && d_seq.size(1) == x.size(1) &&
                  d_seq.size(2) == x.size(-1) && d_seq.scalar_type() == x.scalar_type(),
              "cnnlstm_fast::conv2seq_prologue_backward: x ", x.sizes(), " and d_seq ",
              d_seq.sizes(), " do not match");
  const int64_t C = x.size(1);
  check_channels(scale_in, "scale", C, x.scalar_type());
  check_channels(shift_in, "shift", C, x.scalar_type());
  const Act act = parse_activation(activation);
  Tensor d_x = need_x ? at::empty(x.sizes(), x.options()) : Tensor();
  Tensor sums = at::empty({2, C}, x.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "conv2seq_prologue_backward", [&] {
    const Tensor scale = scale_in.has_value() && scale_in->defined() ? scale_in->contiguous() : Tensor();
    const Tensor shift = shift_in.has_value() && shift_in->defined() ? shift_in->contiguous() : Tensor();
    double* s = sums.data_ptr<double>();
    backward_fn<scalar_t>(act)(x, d_seq, scale.defined() ? scale.const_data_ptr<scalar_t>() : nullptr,
                               shift.defined() ? shift.const_data_ptr<scalar_t>() : nullptr,
                               reduce == "mean", d_x, s, s + C);
  });
  const Tensor out = sums.to(x.scalar_type());
  return {d_x, out[0], out[1]};
}

}  // namespace cnnlstm_fast::cpu

TORCH_LIBRARY_FRAGMENT(cnnlstm_fast, m) {
  m.def("conv2seq_projection(Tensor x, Tensor? scale, Tensor? shift, str activation, "
        "str reduce, Tensor w_ih, Tensor? bias, int directions, Tensor? batch_order) -> Tensor[]");
  m.def("conv2seq_prologue_backward(Tensor x, Tensor d_seq, Tensor? scale, Tensor? shift, "
        "str activation, str reduce, bool need_x) -> (Tensor, Tensor, Tensor)");
  m.def("conv2seq_projection_backward(Tensor[] grads, Tensor seq, Tensor w_ih, bool need_seq, "
        "bool need_w, Tensor? batch_order) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(cnnlstm_fast, CPU, m) {
  m.impl("conv2seq_projection", &cnnlstm_fast::cpu::conv2seq_projection);
  m.impl("conv2seq_prologue_backward", &cnnlstm_fast::cpu::conv2seq_prologue_backward);
  m.impl("conv2seq_projection_backward", &cnnlstm_fast::cpu::conv2seq_projection_backward);
}
