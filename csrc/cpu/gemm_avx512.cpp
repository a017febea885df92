// The AVX-512 micro-kernels of packed_gemm (gemm.h). This TU alone is compiled for
// AVX-512F and includes nothing but the intrinsics and <utility>'s index sequences, so no
// inline function of a shared header is emitted here with AVX-512 code; gemm.cpp calls
// in only on CPUs that have it.
//
// Tile: R rows x P panels (P * 32 columns) of C in 2 * R * P zmm accumulators, R * P <= 12
// (24 accumulators + 2 * P panel vectors + 1 broadcast fit the 32 registers). Per k: load
// P panel rows, broadcast R values of A, R * 2P FMAs. Many rows run 12 x 1 tiles; up to 3
// rows run 3 x 4 so a single row still has 8 independent FMA chains.
#include <cstdint>
#include <utility>

#include "gemm.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#pragma GCC target("avx512f")
#include <immintrin.h>

namespace cnnlstm_fast::cpu {
namespace {

__mmask16 column_mask(int64_t valid) {
  if (valid >= 16) return 0xFFFF;
  if (valid <= 0) return 0;
  return static_cast<__mmask16>((1u << valid) - 1);
}

template <int R, int P>
void tile(int64_t k, const float* a, int64_t ars, int64_t acs, const float* b, int64_t pstride,
          const float* bias, float beta, float* c, int64_t ldc, int64_t cols) {
  __m512 acc[R][2 * P];
  for (int r = 0; r < R; ++r) {
    for (int q = 0; q < 2 * P; ++q) acc[r][q] = _mm512_setzero_ps();
  }
  for (int64_t kk = 0; kk < k; ++kk) {
    __m512 bv[2 * P];
    for (int p = 0; p < P; ++p) {
      bv[2 * p] = _mm512_loadu_ps(b + p * pstride + kk * kPanelWidth);
      bv[2 * p + 1] = _mm512_loadu_ps(b + p * pstride + kk * kPanelWidth + 16);
    }
    const float* a_k = a + kk * acs;
    for (int r = 0; r < R; ++r) {
      const __m512 av = _mm512_set1_ps(a_k[r * ars]);
      for (int q = 0; q < 2 * P; ++q) acc[r][q] = _mm512_fmadd_ps(av, bv[q], acc[r][q]);
    }
  }
  __mmask16 mask[2 * P];
  __m512 bias_v[2 * P];
  for (int q = 0; q < 2 * P; ++q) {
    mask[q] = column_mask(cols - 16 * q);
    bias_v[q] = bias ? _mm512_maskz_loadu_ps(mask[q], bias + 16 * q) : _mm512_setzero_ps();
  }
  const __m512 beta_v = _mm512_set1_ps(beta);
  for (int r = 0; r < R; ++r) {
    for (int q = 0; q < 2 * P; ++q) {
      if (mask[q] == 0) continue;
      float* cp = c + r * ldc + 16 * q;
      __m512 v = _mm512_add_ps(acc[r][q], bias_v[q]);
      // Masked only where the vector is partial: a masked store to memory measured 1.5x
      // slower for the whole 4096 x 1024 x 128 product on the Zen 5 VM (single thread).
      if (mask[q] == 0xFFFF) {
        if (beta != 0.0f) v = _mm512_fmadd_ps(beta_v, _mm512_loadu_ps(cp), v);
        _mm512_storeu_ps(cp, v);
      } else {
        if (beta != 0.0f) v = _mm512_fmadd_ps(beta_v, _mm512_maskz_loadu_ps(mask[q], cp), v);
        _mm512_mask_storeu_ps(cp, mask[q], v);
      }
    }
  }
}

using TileFn = void (*)(int64_t, const float*, int64_t, int64_t, const float*, int64_t,
                        const float*, float, float*, int64_t, int64_t);

template <int P, int... R>
constexpr TileFn pick(int rows, std::integer_sequence<int, R...>) {
  TileFn fn = nullptr;
  ((fn = rows == R + 1 ? &tile<R + 1, P> : fn), ...);
  return fn;
}

}  // namespace

void packed_gemm_block_avx512(int64_t m, int64_t panels, int64_t cols, int64_t k,
                              const float* a, int64_t ars, int64_t acs, const float* packed,
                              int64_t pstride, const float* bias, float beta, float* c,
                              int64_t ldc) {
  // Few rows: 4 panels at a time (then the rest one by one); else one panel, 12 rows.
  const bool wide = m <= 3;
  int64_t p = 0;
  while (p < panels) {
    const int P = wide && panels - p >= 4 ? 4 : 1;
    const int64_t col0 = p * kPanelWidth;
    const int64_t tile_cols = cols - col0;
    const float* bp = packed + p * pstride;
    const float* bias_p = bias ? bias + col0 : nullptr;
    for (int64_t i = 0; i < m;) {
      const int rows = static_cast<int>(m - i < (P == 4 ? 3 : 12) ? m - i : (P == 4 ? 3 : 12));
      const TileFn fn = P == 4 ? pick<4>(rows, std::make_integer_sequence<int, 3>())
                               : pick<1>(rows, std::make_integer_sequence<int, 12>());
      fn(k, a + i * ars, ars, acs, bp, pstride, bias_p, beta, c + i * ldc + col0, ldc,
         tile_cols);
      i += rows;
    }
    p += P;
  }
}

void pack_a_transposed_avx512(int64_t kc, int64_t rows, const float* a, int64_t acs,
                              float* out) {
  // Whole-vector stores in increasing kk: each one's lanes past `rows` land in the next
  // kk's slots, which the next store overwrites (the caller leaves 16 floats of slack
  // after the last). A masked store measured slower on the Zen 5 VM (see tile()).
  const __mmask16 mask = column_mask(rows);
  for (int64_t kk = 0; kk < kc; ++kk) {
    _mm512_storeu_ps(out + kk * rows, _mm512_maskz_loadu_ps(mask, a + kk * acs));
  }
}

namespace {

// Transposes the 16 x 16 block in v (v[r] lane c -> v[c] lane r) in four rounds of
// shuffles: 32-bit pairs, 64-bit pairs, then 128-bit lanes twice.
void transpose16(__m512 v[16]) {
  __m512 t[16];
  for (int r = 0; r < 16; r += 2) {
    t[r] = _mm512_unpacklo_ps(v[r], v[r + 1]);
    t[r + 1] = _mm512_unpackhi_ps(v[r], v[r + 1]);
  }
  for (int r = 0; r < 16; r += 4) {
    for (int q = 0; q < 2; ++q) {
      const __m512d a = _mm512_castps_pd(t[r + q]), b = _mm512_castps_pd(t[r + 2 + q]);
      v[r + 2 * q] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, b));
      v[r + 2 * q + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, b));
    }
  }
  for (int r = 0; r < 16; r += 8) {
    for (int q = 0; q < 4; ++q) {
      t[r + q] = _mm512_shuffle_f32x4(v[r + q], v[r + 4 + q], 0x88);
      t[r + 4 + q] = _mm512_shuffle_f32x4(v[r + q], v[r + 4 + q], 0xDD);
    }
  }
  for (int q = 0; q < 8; ++q) {
    v[q] = _mm512_shuffle_f32x4(t[q], t[8 + q], 0x88);
    v[8 + q] = _mm512_shuffle_f32x4(t[q], t[8 + q], 0xDD);
  }
}

}  // namespace

void pack_panel_transposed_avx512(int64_t k, int64_t width, const float* w, int64_t ld,
                                  float* out) {
  __m512 v[16];
  for (int64_t k0 = 0; k0 < k; k0 += 16) {
    const int64_t kc = k - k0 < 16 ? k - k0 : 16;
    const __mmask16 mask = column_mask(kc);
    for (int64_t half = 0; half < kPanelWidth; half += 16) {
      for (int r = 0; r < 16; ++r) {
        v[r] = half + r < width ? _mm512_maskz_loadu_ps(mask, w + (half + r) * ld + k0)
                                : _mm512_setzero_ps();
      }
      transpose16(v);
      for (int64_t c = 0; c < kc; ++c) _mm512_storeu_ps(out + (k0 + c) * kPanelWidth + half, v[c]);
    }
  }
}

// 12 independent multiply-add chains, `iters` steps each, in 512-bit or 256-bit vectors:
// the loops gemm.cpp times to tell full-rate 512-bit FMA units from double-pumped ones.
// The chains converge (x <- 0.5 x + 1), so no value grows or turns denormal; the sum of
// the lanes goes to *out so no chain is optimised away.
void fma_chains_512(int64_t iters, float* out) {
  __m512 x[12];
  for (int j = 0; j < 12; ++j) x[j] = _mm512_set1_ps(static_cast<float>(j));
  const __m512 half = _mm512_set1_ps(0.5f), one = _mm512_set1_ps(1.0f);
  for (int64_t i = 0; i < iters; ++i) {
    for (int j = 0; j < 12; ++j) x[j] = _mm512_fmadd_ps(x[j], half, one);
  }
  __m512 sum = x[0];
  for (int j = 1; j < 12; ++j) sum = _mm512_add_ps(sum, x[j]);
  *out = _mm512_reduce_add_ps(sum);
}

__attribute__((target("avx512f,fma"))) void fma_chains_256(int64_t iters, float* out) {
  __m256 x[12];
  for (int j = 0; j < 12; ++j) x[j] = _mm256_set1_ps(static_cast<float>(j));
  const __m256 half = _mm256_set1_ps(0.5f), one = _mm256_set1_ps(1.0f);
  for (int64_t i = 0; i < iters; ++i) {
    for (int j = 0; j < 12; ++j) x[j] = _mm256_fmadd_ps(x[j], half, one);
  }
  __m256 sum = x[0];
  for (int j = 1; j < 12; ++j) sum = _mm256_add_ps(sum, x[j]);
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, sum);
  float total = 0.0f;
  for (float v : lanes) total += v;
  *out = total;
}

}  // namespace cnnlstm_fast::cpu

#else

namespace cnnlstm_fast::cpu {
void packed_gemm_block_avx512(int64_t, int64_t, int64_t, int64_t, const float*, int64_t,
                              int64_t, const float*, int64_t, const float*, float, float*,
                              int64_t) {}
void pack_a_transposed_avx512(int64_t, int64_t, const float*, int64_t, float*) {}
void pack_panel_transposed_avx512(int64_t, int64_t, const float*, int64_t, float*) {}
void fma_chains_512(int64_t, float* out) { *out = 0.0f; }
void fma_chains_256(int64_t, float* out) { *out = 0.0f; }
}  // namespace cnnlstm_fast::cpu

#endif
