// Pointwise kernels of the CPU recurrence, instantiated by pointwise_default.cpp and
// pointwise_avx2.cpp (see pointwise.h). The includer defines CNNLSTM_FAST_KERNELS_FN,
// the name of the table getter it exports; everything else has internal linkage, so
// the two instantiations (different ISA) never mix.
//
// Work split: the rows x hidden elements of a step, in units of one SIMD vector of one
// row, across at::parallel_for (torch's intra-op threads). A unit reads all gates of its
// hidden slice, so the whole step is a single pass over G_x, the GEMM result and the
// state. A unit computes the same thing whatever chunk it falls in, so results do not
// depend on the thread count.
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <type_traits>

#include "cnnlstm_fast/gate_math.h"
#include "pointwise.h"

#ifndef CNNLSTM_FAST_KERNELS_FN
#error "define CNNLSTM_FAST_KERNELS_FN before including pointwise_impl.h"
#endif

namespace cnnlstm_fast::cpu {
namespace {

namespace gm = cnnlstm_fast::gate_math;

// exp of 16 floats, inlined (Sleef's, which at::vec calls, is a function call per
// vector): e^x = 2^n e^r with n = round(x / ln 2), r = x - n ln 2 (ln 2 in two parts,
// |r| <= ln 2 / 2) and e^r by its Taylor series to r^7 (the first term left out is below
// 1e-8 relative); 2^n applied by scalef, which overflows to inf and underflows to 0 as
// exp does. x is clamped first (e^x is inf above 88.8 and 0 below -104 either way) so
// that r stays finite for x = +-inf; min/max return their second operand, x, when it is
// NaN. Within 1.3 ulps of exp; measured 1.6 ns a vector, and the LSTM step's pointwise
// pass 17.3 -> 11.6 us at 64 x 128 units on the Zen 5 VM (standalone harness).
#if defined(CPU_CAPABILITY_AVX512)
__attribute__((always_inline)) inline at::vec::Vectorized<float> exp_float(
    at::vec::Vectorized<float> v) {
  __m512 x = _mm512_min_ps(_mm512_set1_ps(88.8f), v);
  x = _mm512_max_ps(_mm512_set1_ps(-104.0f), x);
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);  // ln 2, high part
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);      // and the rest
  __m512 p = _mm512_set1_ps(1.0f / 5040);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}
#endif

// e^x: exp_float for float vectors on AVX-512, else at::vec's (Sleef's) exp.
template <typename V>
V exp_of(V x) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<V, at::vec::Vectorized<float>>) return exp_float(x);
#endif
  return x.exp();
}

// tanh of float vectors without Sleef's tanh: torch.tanh took 1.2 ns an element on a
// Zen 5, 8x torch.sigmoid (whose cost is its exp), and most of an LSTM step's pointwise
// time. Below |x| = 0.55 the odd Taylor
// series to x^15 (the first term left out is < 5e-8 relative there); above it
// sign(x) (1 - 2 / (exp(2|x|) + 1)), where the subtraction cancels no leading digits. Both
// are within a few float ulps of tanh; NaN and +-inf come out as tanh's.
template <typename V>
__attribute__((always_inline)) inline V tanh_float(V x) {
  const V x2 = x * x;
  V p = V(-929569.0f / 638512875.0f);
  p = at::vec::fmadd(p, x2, V(21844.0f / 6081075.0f));
  p = at::vec::fmadd(p, x2, V(-1382.0f / 155925.0f));
  p = at::vec::fmadd(p, x2, V(62.0f / 2835.0f));
  p = at::vec::fmadd(p, x2, V(-17.0f / 315.0f));
  p = at::vec::fmadd(p, x2, V(2.0f / 15.0f));
  p = at::vec::fmadd(p, x2, V(-1.0f / 3.0f));
  const V series = at::vec::fmadd(p * x2, x, x);
  const V ax = x.abs();
  const V far = V(1) - V(2) / (exp_of(ax + ax) + V(1));
  const V signed_far = V::blendv(far, far.neg(), x < V(0));
  return V::blendv(signed_far, series, ax < V(0.55f));
}

template <typename scalar_t>
struct VecMath {
  using V = at::vec::Vectorized<scalar_t>;
  static V sigmoid(V x) { return V(1) / (V(1) + exp_of(x.neg())); }
  static V tanh(V x) {
    if constexpr (std::is_same_v<scalar_t, float>) {
      return tanh_float(x);
    } else {
      return x.tanh();
    }
  }
  static V relu(V x) { return at::vec::maximum(x, V(0)); }
  static V relu_grad(V h) { return (h > V(0)) & V(1); }
};

// Below this many elements a step runs on the calling thread: forking costs more.
constexpr int64_t kGrainElements = 2048;

template <typename scalar_t, typename F>
void for_each_vector(int64_t rows, int64_t col_begin, int64_t col_end, const F& body) {
  constexpr int64_t width = at::vec::Vectorized<scalar_t>::size();
  const int64_t per_row = (col_end - col_begin + width - 1) / width;
  at::parallel_for(0, rows * per_row, std::max<int64_t>(1, kGrainElements / width),
                   [&](int64_t begin, int64_t end) {
                     for (int64_t unit = begin; unit < end; ++unit) {
                       const int64_t row = unit / per_row;
                       const int64_t j = col_begin + (unit - row * per_row) * width;
                       body(row, j, std::min<int64_t>(width, col_end - j));
                     }
                   });
}

// Loads gate `gate` of G_x + h W_hh^T at (row, j) for n lanes.
template <typename scalar_t>
struct ForwardInputs {
  const ForwardStep<scalar_t>& s;
  int64_t row, j, n;
  using V = at::vec::Vectorized<scalar_t>;
  V gx(int gate) const {
    return V::loadu(s.gx + row * s.gx_row_stride + gate * s.gx_gate_stride + j, n);
  }
  V hw(int gate) const {
    return V::loadu(s.hw + row * s.hw_row_stride + gate * s.hw_gate_stride + j, n);
  }
};

template <typename scalar_t>
void lstm_forward(const ForwardStep<scalar_t>& s) {
  using V = at::vec::Vectorized<scalar_t>;
  const int64_t H = s.hidden;
  for_each_vector<scalar_t>(s.rows, s.col_begin, s.col_end, [&](int64_t row, int64_t j, int64_t n) {
    const ForwardInputs<scalar_t> in{s, row, j, n};
    const int64_t k = row * H + j;
    auto pre = [&](int gate) { return in.hw(gate) + in.gx(gate); };
    const auto r = gm::lstm_forward<VecMath<scalar_t>>(pre(0), pre(1), pre(2), pre(3),
                                                        V::loadu(s.c + k, n));
    if (s.act != nullptr) {
      scalar_t* a = s.act + row * 4 * H + j;
      r.i.store(a, n);
      r.f.store(a + H, n);
      r.g.store(a + 2 * H, n);
      r.o.store(a + 3 * H, n);
    }
    r.c.store(s.c + k, n);
    if (s.m != nullptr) {
      r.m.store(s.m + k, n);
    } else {
      r.m.store(s.h + k, n);
      r.m.store(s.y + row * s.y_row_stride + j, n);
    }
  });
}

template <typename scalar_t>
void gru_forward(const ForwardStep<scalar_t>& s) {
  using V = at::vec::Vectorized<scalar_t>;
  const int64_t H = s.hidden;
  for_each_vector<scalar_t>(s.rows, s.col_begin, s.col_end, [&](int64_t row, int64_t j, int64_t n) {
    const ForwardInputs<scalar_t> in{s, row, j, n};
    const int64_t k = row * H + j;
    const V b_hn = s.b_hn != nullptr ? V::loadu(s.b_hn + j, n) : V(0);
    const auto r = gm::gru_forward<VecMath<scalar_t>>(in.gx(0), in.gx(1), in.gx(2), in.hw(0),
                                                       in.hw(1), in.hw(2), b_hn,
                                                       V::loadu(s.h_in + k, n));
    if (s.act != nullptr) {
      scalar_t* a = s.act + row * 3 * H + j;
      r.r.store(a, n);
      r.z.store(a + H, n);
      r.n.store(a + 2 * H, n);
    }
    if (s.extra != nullptr) r.h_n.store(s.extra + k, n);
    r.h.store(s.h + k, n);
    r.h.store(s.y + row * s.y_row_stride + j, n);
  });
}

template <typename scalar_t, bool Relu>
void rnn_forward(const ForwardStep<scalar_t>& s) {
  using V = at::vec::Vectorized<scalar_t>;
  const int64_t H = s.hidden;
  for_each_vector<scalar_t>(s.rows, s.col_begin, s.col_end, [&](int64_t row, int64_t j, int64_t n) {
    const ForwardInputs<scalar_t> in{s, row, j, n};
    const int64_t k = row * H + j;
    const V h = gm::rnn_forward<VecMath<scalar_t>, Relu>(in.hw(0) + in.gx(0));
    if (s.act != nullptr) h.store(s.act + k, n);
    h.store(s.h + k, n);
    h.store(s.y + row * s.y_row_stride + j, n);
  });
}

template <typename scalar_t>
void lstm_backward(const BackwardStep<scalar_t>& s) {
  using V = at::vec::Vectorized<scalar_t>;
  const int64_t H = s.hidden;
  for_each_vector<scalar_t>(s.rows, s.col_begin, s.col_end, [&](int64_t row, int64_t j, int64_t n) {
    const scalar_t* a = s.act + row * 4 * H + j;
    scalar_t* d = s.d_gx + row * 4 * H + j;
    const int64_t k = row * H + j;
    const V d_m = s.d_m != nullptr ? V::loadu(s.d_m + k, n)
                                   : V::loadu(s.dh + k, n) + V::loadu(s.d_y + k, n);
    const auto r = gm::lstm_backward<VecMath<scalar_t>>(
        V::loadu(a, n), V::loadu(a + H, n), V::loadu(a + 2 * H, n), V::loadu(a + 3 * H, n),
        V::loadu(s.extra + k, n), d_m, V::loadu(s.dc + k, n));
    r.d_i.store(d, n);
    r.d_f.store(d + H, n);
    r.d_g.store(d + 2 * H, n);
    r.d_o.store(d + 3 * H, n);
    r.d_c_prev.store(s.dc + k, n);
    if (s.m != nullptr) r.m.store(s.m + k, n);
  });
}

template <typename scalar_t>
void gru_backward(const BackwardStep<scalar_t>& s) {
  using V = at::vec::Vectorized<scalar_t>;
  const int64_t H = s.hidden;
  for_each_vector<scalar_t>(s.rows, s.col_begin, s.col_end, [&](int64_t row, int64_t j, int64_t n) {
    const scalar_t* a = s.act + row * 3 * H + j;
    scalar_t* dx = s.d_gx + row * 3 * H + j;
    scalar_t* dr = s.d_gh + row * 3 * H + j;
    const int64_t k = row * H + j;
    const auto g = gm::gru_backward<VecMath<scalar_t>>(
        V::loadu(a, n), V::loadu(a + H, n), V::loadu(a + 2 * H, n), V::loadu(s.extra + k, n),
        V::loadu(s.h_prev + k, n), V::loadu(s.dh + k, n) + V::loadu(s.d_y + k, n));
    g.d_r.store(dx, n);
    g.d_z.store(dx + H, n);
    g.d_n.store(dx + 2 * H, n);
    g.d_r.store(dr, n);
    g.d_z.store(dr + H, n);
    g.d_a_n.store(dr + 2 * H, n);
    g.d_h_direct.store(s.dh + k, n);
  });
}

template <typename scalar_t, bool Relu>
void rnn_backward(const BackwardStep<scalar_t>& s) {
  using V = at::vec::Vectorized<scalar_t>;
  const int64_t H = s.hidden;
  for_each_vector<scalar_t>(s.rows, s.col_begin, s.col_end, [&](int64_t row, int64_t j, int64_t n) {
    const int64_t k = row * H + j;
    const V d_a = gm::rnn_backward<VecMath<scalar_t>, Relu>(
        V::loadu(s.act + k, n), V::loadu(s.dh + k, n) + V::loadu(s.d_y + k, n));
    d_a.store(s.d_gx + k, n);
  });
}

template <typename scalar_t>
void add(int64_t size, const scalar_t* a, const scalar_t* b, scalar_t* out) {
  using V = at::vec::Vectorized<scalar_t>;
  at::vec::map2([](V x, V y) { return x + y; }, out, a, b, size);
}

}  // namespace

template <typename scalar_t>
const PointwiseKernels<scalar_t>& CNNLSTM_FAST_KERNELS_FN() {
  static const PointwiseKernels<scalar_t> kernels{
      {lstm_forward<scalar_t>, gru_forward<scalar_t>, rnn_forward<scalar_t, false>,
       rnn_forward<scalar_t, true>},
      {lstm_backward<scalar_t>, gru_backward<scalar_t>, rnn_backward<scalar_t, false>,
       rnn_backward<scalar_t, true>},
      add<scalar_t>,
  };
  return kernels;
}

}  // namespace cnnlstm_fast::cpu
