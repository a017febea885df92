// packed_gemm's packing, threading and CPU check (gemm.h); the arithmetic is in
// gemm_avx512.cpp.
#include "gemm.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <stdexcept>
#include <memory>
#include <string>

namespace cnnlstm_fast::cpu {
namespace {

// Rows of C per task when C is tall (the input projection): 8 tiles of 12 rows, so a
// task's rows of A stay in the core's L2 while it walks the panels.
constexpr int64_t kRowBlock = 96;
// Multiply-adds below which a chunk of tasks is not worth a thread (~1 us on one core).
constexpr int64_t kMinWorkPerThread = int64_t{1} << 17;

// Steps of k per block of the K-blocked path: a 12-row tile of packed A (12 KB) and a
// panel's slice of B (32 KB) stay in L1/L2 while a block runs.
constexpr int64_t kKBlock = 256;
constexpr int64_t kTileRows = 12;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The K-blocked path with A packed (blocked_task) for products with many rows whose A is
// not stored row-major: the gradient GEMMs dW = dG^T h read dG^T, whose direct reads
// jump a page per step of k, with k = T*B so long that a panel of B (k x 128 bytes) does
// not stay in L2 while the row tiles walk it. Measured on the Zen 5 VM at 1024 x 8192 x
// 256: 210 GFLOP/s direct, 296 blocked. Row-major A (the per-step GEMMs, the input
// projection and dx) stays direct: packing it cost more than it saved (460 -> 277 GFLOP/s
// at 8192 x 1024 x 128).
bool use_k_blocks(int64_t m, int64_t ars, int64_t acs) { return m > kTileRows && acs != 1; }

}  // namespace

bool packed_gemm_supported() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  static const bool supported = __builtin_cpu_supports("avx512f");
  return supported;
#else
  return false;
#endif
}

namespace {

// Seconds of the fastest of `rounds` calls of fn(iters).
double fastest(void (*fn)(int64_t, float*), int64_t iters, int rounds) {
  double best = 1e30;
  float sink = 0.0f;
  for (int r = 0; r < rounds; ++r) {
    const auto start = std::chrono::steady_clock::now();
    fn(iters, &sink);
    const std::chrono::duration<double> took = std::chrono::steady_clock::now() - start;
    best = std::min(best, took.count());
  }
  volatile float keep = sink;  // the chains' result is used
  (void)keep;
  return best;
}

double measure_fma_rate_ratio() {
  if (!packed_gemm_supported()) return 0.0;
  // 12 chains x 2048 steps: ~12k cycles at two 512-bit FMAs a cycle, long enough to time
  // and short enough that the fastest of 7 rounds misses preemption. Warm-up first: a
  // core may run 512-bit code slower until its upper lanes power up.
  constexpr int64_t kIters = 2048;
  fastest(&fma_chains_512, kIters, 3);
  fastest(&fma_chains_256, kIters, 3);
  double t512 = 1e30, t256 = 1e30;
  for (int round = 0; round < 3; ++round) {  // interleaved, against drifting clocks
    t512 = std::min(t512, fastest(&fma_chains_512, kIters, 7));
    t256 = std::min(t256, fastest(&fma_chains_256, kIters, 7));
  }
  return t512 > 0.0 ? 2.0 * t256 / t512 : 0.0;  // 16 lanes against 8
}

}  // namespace

double fma_rate_ratio() {
  static const double ratio = measure_fma_rate_ratio();
  return ratio;
}

namespace {

// 0 auto, 1 avx512, 2 blas (set_gemm_choice); an atomic, so a call on another thread sees
// either the old or the new choice.
std::atomic<int> gemm_setting{0};
constexpr const char* kGemmNames[] = {"auto", "avx512", "blas"};

}  // namespace

void set_gemm_choice(const std::string& name) {
  int index = -1;
  for (int i = 0; i < 3; ++i) {
    if (name == kGemmNames[i]) index = i;
  }
  if (index < 0) {
    throw std::invalid_argument("cnnlstm_fast cpu backend: gemm must be one of 'auto', "
                                "'avx512', 'blas', got '" + name + "'");
  }
  if (index == 1 && !packed_gemm_supported()) {
    throw std::invalid_argument("cnnlstm_fast cpu backend: gemm 'avx512' needs a CPU with "
                                "AVX-512F and an x86-64 build, which this is not; use 'auto' "
                                "or 'blas'");
  }
  gemm_setting.store(index, std::memory_order_relaxed);
}

std::string gemm_choice() { return kGemmNames[gemm_setting.load(std::memory_order_relaxed)]; }

bool use_packed_gemm() {
  switch (gemm_setting.load(std::memory_order_relaxed)) {
    case 1:
      return true;  // set_gemm_choice checked packed_gemm_supported()
    case 2:
      return false;
    default:
      return packed_gemm_supported();
  }
}

int64_t packed_size(int64_t k, int64_t n) { return ceil_div(n, kPanelWidth) * kPanelWidth * k; }

void pack_b(int64_t k, int64_t n, const float* b, int64_t rs, int64_t cs, float* packed) {
  const int64_t panels = ceil_div(n, kPanelWidth);
  at::parallel_for(0, panels, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      float* out = packed + p * k * kPanelWidth;
      const int64_t j0 = p * kPanelWidth, width = std::min(kPanelWidth, n - j0);
      if (rs == 1 && packed_gemm_supported()) {  // W row-major: transpose 16 x 16 blocks
        // A 1024 x 256 weight: 29 us against 68 for the loop below, compiled as this file is
        // (one thread, Zen 5 VM, standalone harness).
        pack_panel_transposed_avx512(k, width, b + j0 * cs, cs, out);
        continue;
      }
      for (int64_t kk = 0; kk < k; ++kk) {
        float* row = out + kk * kPanelWidth;
        for (int64_t j = 0; j < width; ++j) row[j] = b[kk * rs + (j0 + j) * cs];
        std::fill(row + width, row + kPanelWidth, 0.0f);
      }
    }
  });
}

namespace {

// C (rows [i0, i0 + rows) x the panels of one group) of a K-blocked product: per block of
// kKBlock steps of k, the block's rows of A are packed tile by tile into `buffer` as
// [k][tile rows] (one contiguous stream the micro-kernel broadcasts from, whatever A's
// strides), then every panel runs over them with its matching kKBlock x 32 slice of B.
// C accumulates across blocks in k order, so the sum is the same for any thread count.
void blocked_task(int64_t i0, int64_t rows, int64_t p0, int64_t count, int64_t n, int64_t k,
                  const float* a, int64_t ars, int64_t acs, const float* packed,
                  const float* bias, float beta, float* c, int64_t ldc, float* buffer) {
  for (int64_t k0 = 0; k0 < k; k0 += kKBlock) {
    const int64_t kc = std::min(kKBlock, k - k0);
    for (int64_t r0 = 0; r0 < rows; r0 += kTileRows) {
      const int64_t tr = std::min(kTileRows, rows - r0);
      float* dst = buffer + r0 * kc;
      const float* src = a + (i0 + r0) * ars + k0 * acs;
      if (ars == 1) {  // A transposed (dW = dG^T h): a tile's rows are adjacent per k
        // One load and store per k: std::copy here was a memmove call per k for 48 bytes
        // (measured 5-15% of dW_ih and dW_hh at T*B = 8192 on the Zen 5 VM).
        pack_a_transposed_avx512(kc, tr, src, acs, dst);
      } else {
        for (int64_t r = 0; r < tr; ++r) {
          for (int64_t kk = 0; kk < kc; ++kk) dst[kk * tr + r] = src[r * ars + kk * acs];
        }
      }
    }
    const bool first = k0 == 0;
    for (int64_t p = p0; p < p0 + count; ++p) {
      const int64_t col0 = p * kPanelWidth;
      const float* bp = packed + p * k * kPanelWidth + k0 * kPanelWidth;
      for (int64_t r0 = 0; r0 < rows; r0 += kTileRows) {
        const int64_t tr = std::min(kTileRows, rows - r0);
        // One panel per call; the panel stride is unused with one panel.
        packed_gemm_block_avx512(tr, 1, std::min(kPanelWidth, n - col0), kc, buffer + r0 * kc,
                                 1, tr, bp, k * kPanelWidth,
                                 first && bias ? bias + col0 : nullptr, first ? beta : 1.0f,
                                 c + (i0 + r0) * ldc + col0, ldc);
      }
    }
  }
}

}  // namespace

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
  const int64_t row_blocks = ceil_div(m, kRowBlock);
  if (use_k_blocks(m, ars, acs)) {
    // Tasks (row block, group of panels): enough of them to share among the threads;
    // each packs its own rows of A, which costs 1/(2 * group columns) of its arithmetic.
    const int64_t want = 4 * at::get_num_threads();
    const int64_t groups = std::min(panels, ceil_div(want, row_blocks));
    const int64_t group = ceil_div(panels, groups);
    at::parallel_for(0, row_blocks * groups, 1, [&](int64_t begin, int64_t end) {
      // + 16: the slack pack_a_transposed_avx512 writes past a tile.
      std::unique_ptr<float[]> buffer(new float[kRowBlock * kKBlock + 16]);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t rb = task / groups, g = task % groups;
        const int64_t i0 = rb * kRowBlock, p0 = g * group;
        if (p0 >= panels) continue;
        blocked_task(i0, std::min(kRowBlock, m - i0), p0, std::min(group, panels - p0), n, k, a,
                     ars, acs, packed, bias, beta, c, ldc, buffer.get());
      }
    });
    return;
  }
  // Few rows: groups of 4 panels, the micro-kernel's wide tile (gemm_avx512.cpp).
  const int64_t group = m <= 3 ? 4 : 1;
  const int64_t groups = ceil_div(panels, group);
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
                               a + i0 * ars, ars, acs, packed + p0 * k * kPanelWidth, k * kPanelWidth,
                               bias ? bias + col0 : nullptr, beta, c + i0 * ldc + col0, ldc);
    }
  });
}

}  // namespace cnnlstm_fast::cpu
