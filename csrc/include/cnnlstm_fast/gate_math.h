// Gate math of the recurrent cells: activations, state update and their derivatives,
// for one element (or one SIMD vector) of one row. Shared by the CPU kernels and, later,
// the CUDA kernels: no torch includes, plain templates.
//
// Every function is a template on the value type T (float, double, or a SIMD vector
// type) and on a math policy M with static sigmoid/tanh/relu/relu_grad for T, so the
// CPU path can instantiate it on at::vec::Vectorized and a GPU kernel on float.
// ScalarMath<T> is the policy for plain float/double.
//
// The formulas are those of cnnlstm_fast/backends/reference.py (the specification),
// term for term, in torch's gate order: LSTM (i, f, g, o), GRU (r, z, n).
#pragma once

#include <cmath>

#if defined(__CUDACC__)
#define CNNLSTM_FAST_HD __host__ __device__ __forceinline__
#else
#define CNNLSTM_FAST_HD inline
#endif

namespace cnnlstm_fast::gate_math {

CNNLSTM_FAST_HD float exp_(float x) { return ::expf(x); }
CNNLSTM_FAST_HD double exp_(double x) { return ::exp(x); }
CNNLSTM_FAST_HD float tanh_(float x) { return ::tanhf(x); }
CNNLSTM_FAST_HD double tanh_(double x) { return ::tanh(x); }

template <typename T>
struct ScalarMath {
  static CNNLSTM_FAST_HD T sigmoid(T x) { return T(1) / (T(1) + exp_(-x)); }
  static CNNLSTM_FAST_HD T tanh(T x) { return tanh_(x); }
  static CNNLSTM_FAST_HD T relu(T x) { return x > T(0) ? x : T(0); }
  // d relu / d pre-activation, written in terms of the output h = relu(pre).
  static CNNLSTM_FAST_HD T relu_grad(T h) { return h > T(0) ? T(1) : T(0); }
};

// ---- LSTM -------------------------------------------------------------------------

template <typename T>
struct LstmForward {
  T i, f, g, o;  // gate activations (what forward saves)
  T c;           // new cell state
  T m;           // o * tanh(c): the new h, or the input of the projection
};

// a_*: pre-activations (G_x + h W_hh^T); c_prev: the cell state before the step.
template <typename M, typename T>
CNNLSTM_FAST_HD LstmForward<T> lstm_forward(T a_i, T a_f, T a_g, T a_o, T c_prev) {
  LstmForward<T> r;
  r.i = M::sigmoid(a_i);
  r.f = M::sigmoid(a_f);
  r.g = M::tanh(a_g);
  r.o = M::sigmoid(a_o);
  r.c = r.f * c_prev + r.i * r.g;
  r.m = r.o * M::tanh(r.c);
  return r;
}

template <typename T>
struct LstmBackward {
  T d_i, d_f, d_g, d_o;  // gradients of the pre-activations (= dG_x of the step)
  T d_c_prev;            // gradient of the cell state before the step
  T m;                   // o * tanh(c), recomputed (the projection's dW_hr needs it)
};

// d_m: gradient of m (of h without projection); d_c: gradient of the new cell state
// coming from the later steps.
template <typename M, typename T>
CNNLSTM_FAST_HD LstmBackward<T> lstm_backward(T i, T f, T g, T o, T c_prev, T d_m, T d_c) {
  const T one(1);
  const T tanh_c = M::tanh(f * c_prev + i * g);
  const T d_c_total = d_c + d_m * o * (one - tanh_c * tanh_c);
  LstmBackward<T> r;
  r.d_i = d_c_total * g * i * (one - i);
  r.d_f = d_c_total * c_prev * f * (one - f);
  r.d_g = d_c_total * i * (one - g * g);
  r.d_o = d_m * tanh_c * o * (one - o);
  r.d_c_prev = d_c_total * f;
  r.m = o * tanh_c;
  return r;
}

// ---- GRU --------------------------------------------------------------------------

template <typename T>
struct GruForward {
  T r, z, n;  // gate activations (what forward saves)
  T h_n;      // a_n + b_hn (saved: r's gradient needs it)
  T h;        // new hidden state
};

// x_*: the G_x parts; a_*: the recurrent parts h W_hh^T; h_prev: the state before.
template <typename M, typename T>
CNNLSTM_FAST_HD GruForward<T> gru_forward(T x_r, T x_z, T x_n, T a_r, T a_z, T a_n, T b_hn,
                                          T h_prev) {
  GruForward<T> s;
  s.h_n = a_n + b_hn;
  s.r = M::sigmoid(x_r + a_r);
  s.z = M::sigmoid(x_z + a_z);
  s.n = M::tanh(x_n + s.r * s.h_n);
  s.h = (T(1) - s.z) * s.n + s.z * h_prev;
  return s;
}

template <typename T>
struct GruBackward {
  T d_r, d_z, d_n;  // gradients of the G_x parts (dG_x of the step)
  T d_a_n;          // gradient of the recurrent n part (a_n + b_hn): d_n * r
  T d_h_direct;     // gradient of h_prev through z * h_prev (W_hh's part comes apart)
};

// d_h: gradient of the new hidden state.
template <typename M, typename T>
CNNLSTM_FAST_HD GruBackward<T> gru_backward(T r, T z, T n, T h_n, T h_prev, T d_h) {
  const T one(1);
  GruBackward<T> g;
  g.d_n = d_h * (one - z) * (one - n * n);
  g.d_r = g.d_n * h_n * r * (one - r);
  g.d_z = d_h * (h_prev - n) * z * (one - z);
  g.d_a_n = g.d_n * r;
  g.d_h_direct = d_h * z;
  return g;
}

// ---- Elman RNN --------------------------------------------------------------------

template <typename M, bool Relu, typename T>
CNNLSTM_FAST_HD T rnn_forward(T pre) {
  if constexpr (Relu) {
    return M::relu(pre);
  } else {
    return M::tanh(pre);
  }
}

// h: the step's output (saved by forward); d_h: its gradient.
template <typename M, bool Relu, typename T>
CNNLSTM_FAST_HD T rnn_backward(T h, T d_h) {
  if constexpr (Relu) {
    return d_h * M::relu_grad(h);
  } else {
    return d_h * (T(1) - h * h);
  }
}

}  // namespace cnnlstm_fast::gate_math
