// A float32 GEMM for the products the CPU recurrence repeats: C = A B (+ bias) (+ beta C)
// with B packed once (a weight used at every step) into column panels of kPanelWidth.
//
// Why our own: torch's BLAS on x86 is MKL, which on a 2-core AMD Zen 5 measured
// 112-200 GFLOP/s (the rate of its AVX2 code; MKL_VERBOSE names no AVX-512 path there),
// where a standalone prototype of this micro-kernel reached 410-450 at the recurrence's
// shapes and this build 390-425 on a 2048-square product (the bench's peak_tflops in
// benchmarks/results/cpu-amd-epyc/); torch.nn.LSTM's oneDNN kernels are not reachable
// from an extension. On Zen 4, whose cores split a 512-bit FMA in two, the same build
// measured ~190 GFLOP/s at 2048 square against MKL's 130-200: no gain there
// (fma_rate_ratio below tells the two apart for auto's rules). The AVX-512 micro-kernel (gemm_avx512.cpp) keeps a 12 x 32 (or
// 3 x 128 for few rows) tile of C in 24 zmm registers, streams B's panel and broadcasts
// A; the caller's threads split the panels, so with the same thread count each thread
// reads the same slice of a weight at every step and it stays in that core's cache.
// Every element of C is computed by one thread in one fixed order: results do not
// depend on the thread count.
#pragma once

#include <cstdint>
#include <string>

namespace cnnlstm_fast::cpu {

constexpr int64_t kPanelWidth = 32;

// Whether packed_gemm can run here: built for x86-64 and the CPU has AVX-512F.
bool packed_gemm_supported();

// Which float32 GEMM the cpu ops (the recurrence, cnnlstm_fast::linear, conv2seq) use: a
// process-wide setting, "auto" (default: packed_gemm where supported), "avx512" (packed_gemm)
// or "blas" (torch's BLAS). Set from Python (cnnlstm_fast.backends.cpu.set_gemm through
// _C.cpu_set_gemm); C++ reads no environment variable for it. set_gemm_choice throws
// std::invalid_argument (Python's ValueError) for another name, and for "avx512" where
// packed_gemm_supported() is false; the setting is then unchanged.
void set_gemm_choice(const std::string& name);
std::string gemm_choice();

// Whether the float32 CPU ops use packed_gemm (true) or torch's BLAS (false) now.
bool use_packed_gemm();

// Floats of a packed (k x n) B: ceil(n / kPanelWidth) panels of k x kPanelWidth.
int64_t packed_size(int64_t k, int64_t n);

// Packs B (k x n), element (kk, j) at b[kk * b_row_stride + j * b_col_stride], so a
// weight W (n x k) stored row-major packs as B = W^T with strides (1, k). Zero-pads the
// last panel.
void pack_b(int64_t k, int64_t n, const float* b, int64_t b_row_stride, int64_t b_col_stride,
            float* packed);

// C (m x n, row stride ldc) = A B + bias + beta C, with A (m x k) element (i, kk) at
// a[i * a_row_stride + kk * a_col_stride], B from pack_b, bias (n) or null. With beta 0,
// C is only written. Parallel over torch's intra-op threads. Requires
// packed_gemm_supported().
void packed_gemm(int64_t m, int64_t n, int64_t k, const float* a, int64_t a_row_stride,
                 int64_t a_col_stride, const float* packed, const float* bias, float beta,
                 float* c, int64_t ldc);

// The micro-kernel driver of gemm_avx512.cpp: rows [0, m) of C times `panels` panels
// of k rows each, the first at `packed` and the next `panel_stride` floats on (C and
// bias already offset to the first panel's column), with `cols` valid columns in all.
void packed_gemm_block_avx512(int64_t m, int64_t panels, int64_t cols, int64_t k,
                              const float* a, int64_t a_row_stride, int64_t a_col_stride,
                              const float* packed, int64_t panel_stride, const float* bias,
                              float beta, float* c, int64_t ldc);

// Copies rows (<= 16) adjacent floats at a + kk * acs, kk in [0, kc), to out + kk * rows:
// a tile of a transposed A packed for the micro-kernel (one load and store per kk). It
// writes up to 16 - rows floats past out + kc * rows: leave that much slack.
void pack_a_transposed_avx512(int64_t kc, int64_t rows, const float* a, int64_t acs,
                              float* out);

// One panel of pack_b for B = W^T, W (width <= kPanelWidth rows of k floats, row stride
// ld) stored row-major: out[kk * kPanelWidth + j] = w[j * ld + kk], zero for j >= width.
// 16 x 16 blocks transposed in registers instead of a strided read per element.
void pack_panel_transposed_avx512(int64_t k, int64_t width, const float* w, int64_t ld,
                                  float* out);

// The loops of fma_rate_ratio (gemm_avx512.cpp): 12 chains of `iters` FMAs in 512-bit
// (16 float) or 256-bit (8 float) vectors. Require packed_gemm_supported().
void fma_chains_512(int64_t iters, float* out);
void fma_chains_256(int64_t iters, float* out);

// Float32 FMA throughput of one core in 512-bit vectors over that in 256-bit vectors,
// timed once per process on the calling thread (~0.1 ms; the fastest of several rounds):
// about 2 where the core has full-width 512-bit FMA units (AMD Zen 5, Intel server cores
// with two FMA-512 ports), about 1 where it splits a 512-bit FMA into two 256-bit halves
// (AMD Zen 4) or has one FMA-512 port. There our GEMM gains nothing over torch's AVX2
// BLAS, and oneDNN's LSTM keeps its lead (the `avx512_full_rate` fact of auto's rules,
// cnnlstm_fast/backends/rules.py). 0 where packed_gemm_supported() is false.
double fma_rate_ratio();

}  // namespace cnnlstm_fast::cpu
