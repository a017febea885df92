// packed_gemm's packing, threading and CPU check (gemm.h); the arithmetic is in
// gemm_avx512.cpp.
#include "gemm.h"

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdlib>
#include <string>

namespace cnnlstm_fast::cpu {
namespace {

// Rows of C per task when C is tall (the input projection): 8 tiles of 12 rows, so a
// task's rows of A stay in the core's L2 while it walks the panels.
constexpr int64_t kRowBlock = 96;
// Multiply-adds below which a chunk of tasks is not worth a thread (~1 us on one core).
constexpr int64_t kMinWorkPerThread = int64_t{1} << 17;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace

bool packed_gemm_supported() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  static const bool supported = __builtin_cpu_supports("avx512f");
  return supported;
#else
  return false;
#endif
}

bool use_packed_gemm() {
  const char* env = std::getenv("CNNLSTM_FAST_CPU_GEMM");
  const std::string choice = env == nullptr || *env == '\0' ? "auto" : env;
  if (choice == "auto") return packed_gemm_supported();
  if (choice == "blas") return false;
  TORCH_CHECK(choice == "avx512",
              "CNNLSTM_FAST_CPU_GEMM must be one of 'auto', 'avx512', 'blas', got '", choice,
              "'");
  TORCH_CHECK(packed_gemm_supported(),
              "CNNLSTM_FAST_CPU_GEMM=avx512, but this CPU has no AVX-512F (or the build is not "
              "for x86-64); use 'auto' or 'blas'");
  return true;
}

int64_t packed_size(int64_t k, int64_t n) { return ceil_div(n, kPanelWidth) * kPanelWidth * k; }

void pack_b(int64_t k, int64_t n, const float* b, int64_t rs, int64_t cs, float* packed) {
  const int64_t panels = ceil_div(n, kPanelWidth);
  at::parallel_for(0, panels, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      float* out = packed + p * k * kPanelWidth;
      const int64_t j0 = p * kPanelWidth, width = std::min(kPanelWidth, n - j0);
      for (int64_t kk = 0; kk < k; ++kk) {
        float* row = out + kk * kPanelWidth;
        for (int64_t j = 0; j < width; ++j) row[j] = b[kk * rs + (j0 + j) * cs];
        std::fill(row + width, row + kPanelWidth, 0.0f);
      }
    }
  });
}

void packed_gemm(int64_t m, int64_t n, int64_t k, const float* a, int64_t ars, int64_t acs,
                 const float* packed, const float* bias, float beta, float* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  if (k == 0) {  // A B is empty: C = bias + beta C
    for (int64_t i = 0; i < m; ++i) {
      for (int64_t j = 0; j < n; ++j) {
        const float prior = beta != 0.0f ? beta * c[i * ldc + j] : 0.0f;
        c[i * ldc + j] = (bias ? bias[j] : 0.0f) + prior;
      }
    }
    return;
  }
  const int64_t panels = ceil_div(n, kPanelWidth);
  // Few rows: groups of 4 panels, the micro-kernel's wide tile (gemm_avx512.cpp).
  const int64_t group = m <= 3 ? 4 : 1;
  const int64_t groups = ceil_div(panels, group);
  const int64_t row_blocks = ceil_div(m, kRowBlock);
  const int64_t task_work = std::min(m, kRowBlock) * k * kPanelWidth * group;
  const int64_t grain = std::max<int64_t>(1, ceil_div(kMinWorkPerThread, task_work));
  // Tasks ordered row block first: with few rows the threads split the panels, each
  // always the same ones for the same shape and thread count.
  at::parallel_for(0, row_blocks * groups, grain, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t rb = task / groups, g = task % groups;
      const int64_t i0 = rb * kRowBlock, rows = std::min(kRowBlock, m - i0);
      const int64_t p0 = g * group, count = std::min(group, panels - p0);
      const int64_t col0 = p0 * kPanelWidth;
      packed_gemm_block_avx512(rows, count, std::min(count * kPanelWidth, n - col0), k,
                               a + i0 * ars, ars, acs, packed + p0 * k * kPanelWidth,
                               bias ? bias + col0 : nullptr, beta, c + i0 * ldc + col0, ldc);
    }
  });
}

}  // namespace cnnlstm_fast::cpu
